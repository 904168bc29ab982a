"""Offline evaluation: leave-one-out, full ranking, against popularity, same run.

    promptrec eval offline --dataset ml-100k [--steps N]

Protocol: per user (events in time order) the last item is the test target, the one
before it the validation target, the rest train. Every item of the catalog is ranked;
the user's earlier items are masked. Metrics: HR@10 and NDCG@10 (one relevant item).
Cold start: a fixed 5% of items (by hash) never appear in training (as target or in a
history); `cold_hr10` is HR@10 over test events whose target is such an item; only the
text-based item vectors can rank them.

`promptrec eval offline` writes the result to bench/results/quality_<dataset>.json.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from bench.common import Popularity
from services.backbone import load_backbone, resolve_backbone_path
from services.catalog import Catalog
from services.config import Settings
from services.data import Interactions
from services.prompt_model import PromptRecModel
from services.weights import PromptWeights, initial_weights, unseen_items_fall_back_to_text
from training.examples import PAD, Examples
from training.step import evaluate, make_optimizer, train_step

COLD_SHARE = 20  # 1 item in 20 is held out of training


def is_cold(item_id: str) -> bool:
    return zlib.crc32(f"cold:{item_id}".encode()) % COLD_SHARE == 0


@dataclass
class Split:
    train: Examples
    val: Examples
    test: Examples
    test_cold: Examples
    val_cold: Examples  # validation events whose target is a cold item: picks the cold rule
    train_item_counts: np.ndarray  # [N] popularity from the training portion only


def _row(items: list[int], history_len: int) -> np.ndarray:
    row = np.full(history_len, PAD, np.int32)
    tail = items[-history_len:]
    row[: len(tail)] = tail
    return row


def leave_one_out(interactions: Interactions, catalog: Catalog, history_len: int,
                  max_users: int | None = None) -> Split:
    order = np.lexsort((interactions.ts, interactions.user_ids.astype(str)))
    users = interactions.user_ids[order].astype(str)
    items = np.array([catalog.index.get(str(i), PAD) for i in interactions.item_ids[order]],
                     np.int32)
    cold = np.array([is_cold(item.item_id) for item in catalog.items])
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    if max_users is not None:
        starts, ends = starts[:max_users], ends[:max_users]
    parts: dict[str, tuple[list, list]] = {
        k: ([], []) for k in ("train", "val", "test", "cold", "val_cold")}
    counts = np.zeros(len(catalog), np.int64)
    for start, end in zip(starts, ends, strict=True):
        seq = [i for i in items[start:end] if i != PAD]
        if len(seq) < 3:
            continue
        warm = [i for i in seq[:-2] if not cold[i]]  # training never sees a cold item
        for i in warm:
            counts[i] += 1
        for pos in range(1, len(warm)):
            parts["train"][0].append(_row(warm[:pos], history_len))
            parts["train"][1].append(warm[pos])
        parts["val"][0].append(_row(seq[:-2], history_len))
        parts["val"][1].append(seq[-2])
        if cold[seq[-2]]:
            parts["val_cold"][0].append(_row(seq[:-2], history_len))
            parts["val_cold"][1].append(seq[-2])
        parts["test"][0].append(_row(seq[:-1], history_len))
        parts["test"][1].append(seq[-1])
        if cold[seq[-1]]:
            parts["cold"][0].append(_row(seq[:-1], history_len))
            parts["cold"][1].append(seq[-1])

    def pack(name: str) -> Examples:
        hist, target = parts[name]
        if not target:
            return Examples(np.zeros((0, history_len), np.int32), np.zeros(0, np.int32))
        return Examples(np.stack(hist), np.array(target, np.int32))

    return Split(pack("train"), pack("val"), pack("test"), pack("cold"), pack("val_cold"),
                 counts)


def pick_cold_rule(model: PromptRecModel, weights: PromptWeights, split: Split,
                   vectors: torch.Tensor, personal_alpha: float) -> tuple[str, dict[str, float]]:
    """Load `weights` with the unseen-item rule that ranks cold validation targets best
    ("text": zero token, mean bias; "neighbours": those of the nearest seen items by
    text); ties keep "text". -> (rule, validation cold HR@10 per rule)."""
    seen = split.train_item_counts > 0
    candidates = {"text": unseen_items_fall_back_to_text(weights, seen)}
    if weights.has_item_weights:  # otherwise the neighbours rule changes nothing
        candidates["neighbours"] = unseen_items_fall_back_to_text(weights, seen, vectors)
    scores = {}
    for name, candidate in candidates.items():
        model.load_weights(candidate)
        scores[name] = round(evaluate(model, split.val_cold, vectors,
                                      personal_alpha=personal_alpha)["hr10"], 4)
    rule = max(scores, key=lambda name: (scores[name], name == "text"))
    model.load_weights(candidates[rule])
    return rule, scores


def run_offline(settings: Settings, catalog: Catalog, interactions: Interactions, steps: int,
                eval_every: int = 0, max_users: int | None = None, seed: int = 0,
                progress: bool = True) -> dict:
    """Train on the training portion with `settings` (model section, training's batch size
    and rates, streaming's history length and personal rate), keep the weights best on
    validation, report test and cold-start figures against popularity -> the result."""
    dataset, model_config = settings.infra.dataset, settings.model
    batch_size, learning_rate = settings.training.batch_size, settings.training.learning_rate
    history_len, personal_alpha = settings.streaming.history_len, settings.streaming.personal_alpha
    item_token_lr = settings.training.item_token_lr
    torch.manual_seed(seed)
    split = leave_one_out(interactions, catalog, history_len, max_users)
    vectors = catalog.vectors
    pop = Popularity(split.train_item_counts)
    pop_test = evaluate(pop, split.test, vectors)
    pop_cold = evaluate(pop, split.test_cold, vectors)

    tokenizer, encoder = load_backbone(resolve_backbone_path(model_config.backbone_path))
    model = PromptRecModel(encoder, initial_weights(tokenizer, encoder, model_config,
                                                    num_items=len(catalog)))
    optimizer = make_optimizer(model, learning_rate, item_token_lr)
    rng = np.random.default_rng(seed)
    best = (evaluate(model, split.val, vectors, personal_alpha=personal_alpha)["ndcg10"],
            model.weights(), 0)
    step_iter = range(1, steps + 1)
    if progress:
        from tqdm import tqdm

        step_iter = tqdm(step_iter, desc=f"training on {dataset}", unit="step")
    started, losses = time.monotonic(), []
    for step in step_iter:
        batch = split.train.subset(rng.integers(0, len(split.train), batch_size))
        losses.append(train_step(model, optimizer, batch, vectors, personal_alpha))
        if (eval_every and step % eval_every == 0) or step == steps:
            val = evaluate(model, split.val, vectors, personal_alpha=personal_alpha)["ndcg10"]
            if val >= best[0]:  # the validation split picks the weights, never the test
                best = (val, model.weights(), step)
    train_seconds = time.monotonic() - started
    model.load_weights(best[1])
    cold_rule, cold_rule_val = pick_cold_rule(model, best[1], split, vectors, personal_alpha)
    test = evaluate(model, split.test, vectors, personal_alpha=personal_alpha)
    cold = evaluate(model, split.test_cold, vectors, personal_alpha=personal_alpha)
    backbone_params = sum(p.numel() for p in encoder.parameters())
    result = {
        "dataset": dataset, "item_bias": model_config.item_bias,
        "item_tokens": model_config.item_tokens,
        "item_token_lr": item_token_lr if model_config.item_tokens else None,
        "causal": model_config.causal,
        "ndcg10": round(test["ndcg10"], 4), "hr10": round(test["hr10"], 4),
        "pop_ndcg10": round(pop_test["ndcg10"], 4), "pop_hr10": round(pop_test["hr10"], 4),
        "cold_hr10": round(cold["hr10"], 4), "pop_cold_hr10": round(pop_cold["hr10"], 4),
        "cold_test_events": cold["n"], "cold_rule": cold_rule,
        "cold_rule_val_hr10": cold_rule_val, "cold_val_events": len(split.val_cold),
        "val_ndcg10": round(best[0], 4),
        "best_step": best[2], "steps": steps, "batch_size": batch_size,
        "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
        "trainable_params": model.trainable_parameters(), "backbone_params": backbone_params,
        "trainable_share": round(model.trainable_parameters() / backbone_params, 6),
        "weights_bytes": len(model.weights().to_bytes()),
        "per_user_state_floats": model.hidden_size, "train_seconds": round(train_seconds, 1),
        "train_examples": len(split.train), "test_users": test["n"],
        "items": len(catalog),
        "protocol": "leave-one-out per user (last = test, second-last = validation), full "
                    "ranking over all items, user's earlier items masked, HR@10/NDCG@10; "
                    "weights chosen on validation NDCG@10; popularity = training counts; "
                    f"cold = 1/{COLD_SHARE} of items never in training",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return result
