"""The training step and the evaluator, as plain torch functions.

No Ray here, so the same code runs inside a Ray Train worker, under torchrun,
or on a lent GPU box directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.config import StreamingSettings, TrainingSettings
from services.personal import replay
from services.rank_metrics import hit_ndcg_of_ranks
from services.user_text import TEXT_PAD
from training.examples import PAD, Examples

# The shards' personal-prompt rate (its one default is the setting's); examples carry no
# shard state, so training replays the rule over each example's history window.
DEFAULT_PERSONAL_ALPHA = StreamingSettings.personal_alpha


def collate(history: np.ndarray, item_vectors: torch.Tensor, device: torch.device | str = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """history [B, L] catalog indices (PAD = -1) -> (vectors [B, L, H], mask [B, L])."""
    idx = torch.as_tensor(history, dtype=torch.long, device=device)
    mask = idx != PAD
    vectors = item_vectors[idx.clamp(min=0)] * mask.unsqueeze(-1)
    return vectors, mask


def replay_personal(history: np.ndarray, weights: np.ndarray | None,
                    item_vectors: torch.Tensor, alpha: float | None, every_step: bool = False
                    ) -> torch.Tensor | None:
    """The shards' personal-prompt rule replayed over each example's history window.

    history [B, L] catalog indices (PAD = -1), weights [B, L] event weights or None,
    item_vectors [N, H] frozen text vectors (the shards never see item tokens) ->
    personal [B, H], or with `every_step` [B, L, H]; None when `alpha` is None (personal
    prompts off, as `ServingSettings.personal_prompts` turns them off in serving).
    """
    if alpha is None:
        return None
    text_history, mask = collate(history, item_vectors, item_vectors.device)
    if weights is not None:
        weights = torch.as_tensor(weights, device=item_vectors.device)
    return replay(text_history, mask, alpha, weights, every_step)


def make_optimizer(model: nn.Module, training: TrainingSettings) -> torch.optim.Optimizer:
    """Adam over the trainable weights: `learning_rate` for the soft prompt, temperature
    and gate; item tokens take `item_token_lr` (each moves mostly when its item appears,
    and its entries are ~1/sqrt(H) in size), the item bias `item_bias_lr` when set (a
    bias spans a few nats of popularity; at a prompt's safe rate a round barely moves it)
    and LoRA adapters `lora_lr`."""
    own = [(param, lr) for param, lr in ((getattr(model, "item_delta", None),
                                          training.item_token_lr),
                                         (getattr(model, "item_bias", None),
                                          training.item_bias_lr))
           if param is not None and lr]  # an item_bias_lr of 0 shares learning_rate
    adapters = [param for name, param in model.named_parameters()
                if param.requires_grad and name.rpartition(".")[2] in ("lora_a", "lora_b")]
    owned = {id(param) for param in [*adapters, *(param for param, _ in own)]}
    groups: list[dict] = [{"params": [p for p in model.parameters()
                                      if p.requires_grad and id(p) not in owned]}]
    groups += [{"params": [param], "lr": lr} for param, lr in own]
    if adapters:
        groups.append({"params": adapters, "lr": training.lora_lr})
    return torch.optim.Adam(groups, lr=training.learning_rate)


def make_schedule(optimizer: torch.optim.Optimizer, training: TrainingSettings,
                  steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's rate over a run of `steps` steps, stepped once per optimizer step:
    `lr_schedule` 'constant' keeps it; 'cosine' multiplies it by (1 + cos(pi * t / steps)) / 2
    after step t, so a budget in epochs ends at small steps instead of at full rate."""
    cosine = training.lr_schedule == "cosine"
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (
        1.0 + math.cos(math.pi * min(t, steps) / max(1, steps))) if cosine else 1.0)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Examples,
               item_vectors: torch.Tensor, personal_alpha: float | None = DEFAULT_PERSONAL_ALPHA,
               bf16: bool = False, dropout: float = 0.0, text_dropout: float = 0.0,
               rng: np.random.Generator | None = None) -> float:
    """One step of full-softmax cross-entropy over the whole catalog; returns the loss.

    model(history_idx [B,L], mask [B,L], text vectors [N,H], personal [B,H]) -> logits
    [B, N]; item_vectors [N, H] are the frozen text vectors. `bf16`: the forward pass
    under bfloat16 autocast (the matmuls; the loss, weights and Adam stay float32).
    `dropout` > 0 puts the model in train mode: that rate on the history's item vectors,
    the backbone's own rates in its layers (`evaluate` puts it back in eval mode).
    `text_dropout`: that share of rows (drawn by `rng`) reads no user text (nor query),
    so a user_text version also learns users who have none.
    """
    device = item_vectors.device
    batch = batch.trimmed()
    idx = torch.as_tensor(batch.history, dtype=torch.long, device=device)
    mask = idx != PAD
    idx = idx.clamp(min=0)
    target = torch.as_tensor(batch.target, dtype=torch.long, device=device)
    core = getattr(model, "module", model)  # DDP wraps the model
    core.dropout = dropout
    core.train(dropout > 0)
    causal = core.causal
    personal = replay_personal(batch.history, batch.weights, item_vectors, personal_alpha,
                               every_step=causal)
    text, query = batch.text, batch.query
    if text is not None and text_dropout > 0:
        dropped = (rng or np.random.default_rng()).random(len(text)) < text_dropout
        text = without_text(text, dropped)
        query = None if query is None else np.where(dropped[:, None], 0, query)
    text_ids = None if text is None else torch.as_tensor(text, device=device)
    query = None if query is None else torch.as_tensor(query, dtype=torch.float32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(idx, mask, item_vectors, personal, text_ids, query)
    logits = logits.float()
    if logits.ndim == 3:  # a causal model scored the next item after every position
        prompt_target = None if batch.prompt_target is None else \
            torch.as_tensor(batch.prompt_target, dtype=torch.long, device=device)
        targets = next_items(idx, mask, target, prompt_target)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD)
    else:
        loss = F.cross_entropy(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def without_text(text: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """text [B, U] ids, rows [B] bool -> a copy whose chosen rows hold only the end token
    (each row's last id: services/user_text.py), as a user without any text reads."""
    text = text.copy()
    text[rows, :-1] = TEXT_PAD
    return text


def next_items(idx: torch.Tensor, mask: torch.Tensor, target: torch.Tensor,
               prompt_target: torch.Tensor | None = None) -> torch.Tensor:
    """idx [B, L] right-padded histories, mask [B, L], target [B] -> [B, L + 1]: the item
    that follows each prefix: for the prompt alone (so that users without history get a
    trained list) `prompt_target` [B] (PAD: no loss) or by default the first history item,
    then the next history item, the target after the last one, PAD after it."""
    if prompt_target is not None:
        first = prompt_target.to(idx.dtype)
    elif idx.shape[1]:
        first = torch.where(mask[:, 0], idx[:, 0], target.to(idx.dtype))
    else:
        first = target.to(idx.dtype)
    return torch.cat([first[:, None], _after_each(idx, mask, target)], dim=1)


def _after_each(idx: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, L]: the item after each history position (PAD after the target)."""
    shifted = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], PAD)], dim=1)
    shifted = torch.where(torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1),
                          shifted, torch.full_like(shifted, PAD))
    last = mask.long().sum(1) - 1  # [B]; -1 when the history is empty
    rows = torch.arange(idx.shape[0], device=idx.device)[last >= 0]
    shifted[rows, last[last >= 0]] = target[last >= 0].to(shifted.dtype)
    return shifted


@torch.no_grad()
def evaluate(model, examples: Examples, item_vectors: torch.Tensor, k: int = 10,
             batch_size: int = 128, personal_alpha: float | None = DEFAULT_PERSONAL_ALPHA,
             exclude: np.ndarray | None = None, bf16: bool = False) -> dict[str, float]:
    """Full ranking over the catalog, seen items masked -> HR@k, NDCG@k.

    `model` needs item_table(text_vectors), encode_users(history, mask, personal) and
    logits(users, items). exclude [E, S] (PAD-padded) are the items masked per example,
    e.g. every item the user had before the target (the standard protocol); by default
    the example's history window. `bf16` encodes the users under bfloat16 autocast; the
    scores are computed in float32 (bfloat16 scores would tie, and ties flatter the rank).
    """
    if len(examples) == 0:
        return {"hr10": 0.0, "ndcg10": 0.0, "n": 0}
    if isinstance(model, nn.Module):
        model.eval()  # no dropout when scoring
    items = model.item_table(item_vectors)
    hits = ndcg = 0.0
    for start in range(0, len(examples), batch_size):
        rows = np.arange(start, min(start + batch_size, len(examples)))
        chunk = examples.subset(rows).trimmed()
        history, mask = collate(chunk.history, items, item_vectors.device)
        personal = replay_personal(chunk.history, chunk.weights, item_vectors, personal_alpha)
        text_ids = None if chunk.text is None else torch.as_tensor(chunk.text,
                                                                   device=item_vectors.device)
        with torch.autocast(item_vectors.device.type, dtype=torch.bfloat16, enabled=bf16):
            users = model.encode_users(history, mask, personal, text_ids)
        scores = model.logits(users.float(), items)
        if chunk.query is not None:  # rows with a query (a model with a query gate)
            asked = model.query_scores(torch.as_tensor(chunk.query), item_vectors)
            scores = scores if asked is None else scores + asked
        scores = mask_seen(scores, chunk.history if exclude is None else exclude[rows])
        target = torch.as_tensor(chunk.target, dtype=torch.long, device=scores.device)
        target_scores = scores.gather(1, target[:, None])
        rank = (scores > target_scores).sum(1)  # 0-based rank of the target
        hit, gain = hit_ndcg_of_ranks(rank, k)
        hits += float(hit.sum())
        ndcg += float(gain.sum())
    n = len(examples)
    return {"hr10" if k == 10 else f"hr{k}": hits / n,
            "ndcg10" if k == 10 else f"ndcg{k}": ndcg / n, "n": n}


def mask_seen(scores: torch.Tensor, history: np.ndarray) -> torch.Tensor:
    """scores [B, N], history [B, L] (PAD = -1) -> scores with seen items at -inf."""
    n_items = scores.shape[1]
    seen = torch.as_tensor(history, dtype=torch.long, device=scores.device)
    seen = torch.where(seen == PAD, n_items, seen)  # PAD lands in a scratch column
    padded = F.pad(scores, (0, 1))
    padded.scatter_(1, seen, float("-inf"))
    return padded[:, :n_items]
