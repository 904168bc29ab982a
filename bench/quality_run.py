"""One training run of the offline evaluation: train on a split's training rows, keep
the checkpoint best on validation NDCG@10, then give unseen items the rule validation
picks. The split and the protocol are bench/quality.py's."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from services.backbone import load_backbone, resolve_backbone_path
from services.catalog import Catalog
from services.config import Settings
from services.item_weights import unseen_items_fall_back_to_text
from services.prompt_model import PromptRecModel
from services.weights import PromptWeights, initial_weights
from training.examples import batches
from training.step import evaluate, make_optimizer, make_schedule, train_step

if TYPE_CHECKING:
    from bench.quality import EvalSet, Split


def personal_rate(settings: Settings) -> float | None:
    """The personal-prompt rate training replays; None when serving turns them off."""
    return settings.streaming.personal_alpha if settings.serving.personal_prompts else None


def score(model, evalset: EvalSet, vectors: torch.Tensor, personal_alpha: float | None,
          bf16: bool = False) -> dict:
    return evaluate(model, evalset.examples, vectors, personal_alpha=personal_alpha,
                    exclude=evalset.exclude, bf16=bf16)


# The bias quantiles an unseen item may start at (pick_cold_rule): the mean bias lifted
# never-trained items into every list on ML-1M, "trained" buries them (cold_hr10 0).
LOW_BIAS_QUANTILES = (0.25, 0.1)


def pick_cold_rule(model: PromptRecModel, weights: PromptWeights, split: Split,
                   vectors: torch.Tensor, personal_alpha: float | None, bf16: bool = False
                   ) -> tuple[str, dict[str, float], dict[str, float]]:
    """Load `weights` with the unseen-item rule that gives the best NDCG@10 over the whole
    validation split: "trained" (the weights as trained: full softmax pushed unseen items
    down), "text" (zero token, mean bias) or "neighbours" (those of the nearest seen items
    by text), each of the last two also with the bias at a low quantile of the seen
    items' ("text@q25": the 25th percentile; LOW_BIAS_QUANTILES); ties keep the earlier.
    Judging on unseen targets alone would ignore what lifting unseen items costs every
    other user's list (on ML-1M it cost 0.016 NDCG@10).
    -> (rule, validation HR@10 of the unseen-target events per rule, validation NDCG@10
    per rule)."""
    seen = split.train_item_counts > 0
    candidates = {"trained": weights, "text": unseen_items_fall_back_to_text(weights, seen)}
    if weights.has_item_weights:  # otherwise the neighbours rule changes nothing
        candidates["neighbours"] = unseen_items_fall_back_to_text(weights, seen, vectors)
        for q in LOW_BIAS_QUANTILES if weights.item_bias is not None else ():
            for name, near in (("text", None), ("neighbours", vectors)):
                candidates[f"{name}@q{round(q * 100)}"] = unseen_items_fall_back_to_text(
                    weights, seen, near, bias_quantile=q)
    unseen_hr, all_ndcg = {}, {}
    for name, candidate in candidates.items():
        model.load_weights(candidate)
        unseen_hr[name] = round(score(model, split.val_unseen, vectors, personal_alpha,
                                      bf16)["hr10"], 4)
        all_ndcg[name] = round(score(model, split.val, vectors, personal_alpha, bf16)["ndcg10"],
                               4)
    order = list(candidates)
    rule = max(order, key=lambda name: (all_ndcg[name], -order.index(name)))
    model.load_weights(candidates[rule])
    return rule, unseen_hr, all_ndcg


@dataclass
class Run:
    """One training run on one split, its weights chosen on validation."""

    model: PromptRecModel
    val_ndcg10: float
    best_step: int
    losses: list[float]
    train_seconds: float
    rule: str
    rule_val_hr10: dict[str, float]  # per rule, over the unseen-target validation events
    rule_val_ndcg10: dict[str, float]  # per rule, over all validation events (it picks)
    curve: list[tuple[int, float]]  # (step, validation NDCG@10) at each checkpoint


def train_run(settings: Settings, catalog: Catalog, split: Split, steps: int, eval_every: int,
              seed: int, progress: bool, label: str) -> Run:
    """Train the configured model on split.train, keep the step best on validation
    NDCG@10, then give unseen items the rule that validation picks."""
    vectors, alpha = catalog.vectors, personal_rate(settings)
    torch.manual_seed(seed)
    tokenizer, encoder = load_backbone(resolve_backbone_path(settings.model.backbone_path))
    model = PromptRecModel(encoder, initial_weights(tokenizer, encoder, settings.model,
                                                    num_items=len(catalog)))
    optimizer = make_optimizer(model, settings.training)
    schedule = make_schedule(optimizer, settings.training, steps)
    rng = np.random.default_rng(seed)
    bf16 = settings.training.bf16  # the checkpoints' users too; test scores are float32
    best = (score(model, split.val, vectors, alpha, bf16)["ndcg10"], model.weights(), 0)
    curve = [(0, round(best[0], 4))]
    step_iter = enumerate(batches(len(split.train), settings.training.batch_size, steps, rng), 1)
    if progress:
        from tqdm import tqdm

        step_iter = tqdm(step_iter, total=steps, desc=f"{label} on {settings.infra.dataset}",
                         unit="step")
    started, losses = time.monotonic(), []
    for step, rows in step_iter:
        losses.append(train_step(model, optimizer, split.train.subset(rows), vectors, alpha,
                                 bf16=bf16, dropout=settings.training.dropout,
                                 text_dropout=settings.training.user_text_dropout, rng=rng))
        schedule.step()
        if (eval_every and step % eval_every == 0) or step == steps:
            val = score(model, split.val, vectors, alpha, bf16)["ndcg10"]
            curve.append((step, round(val, 4)))
            if progress:
                step_iter.set_postfix(val_ndcg10=f"{val:.4f}", best=f"{max(val, best[0]):.4f}")
            if val >= best[0]:  # the validation split picks the weights, never the test
                best = (val, model.weights(), step)
    train_seconds = time.monotonic() - started
    model.load_weights(best[1])
    rule, rule_val, rule_ndcg = pick_cold_rule(model, best[1], split, vectors, alpha, bf16)
    return Run(model, best[0], best[2], losses, train_seconds, rule, rule_val, rule_ndcg, curve)
