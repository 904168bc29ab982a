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

from services.model import personal_from_history
from training.examples import PAD, Examples

# The personal-prompt rate of the shards (settings.personal_alpha); examples carry no shard
# state, so training replays the rule over each example's history window.
DEFAULT_PERSONAL_ALPHA = 0.1


def collate(history: np.ndarray, item_vectors: torch.Tensor, device: torch.device | str = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """history [B, L] catalog indices (PAD = -1) -> (vectors [B, L, H], mask [B, L])."""
    idx = torch.as_tensor(history, dtype=torch.long, device=device)
    mask = idx != PAD
    vectors = item_vectors[idx.clamp(min=0)] * mask.unsqueeze(-1)
    return vectors, mask


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Examples,
               item_vectors: torch.Tensor, personal_alpha: float = DEFAULT_PERSONAL_ALPHA
               ) -> float:
    """One step of full-softmax cross-entropy over the whole catalog; returns the loss.

    model(history [B,L,H], mask [B,L], items [N,H]) -> logits [B, N].
    """
    device = item_vectors.device
    history, mask = collate(batch.history, item_vectors, device)
    target = torch.as_tensor(batch.target, dtype=torch.long, device=device)
    personal = personal_from_history(history, mask, personal_alpha)
    logits = model(history, mask, item_vectors, personal)
    loss = F.cross_entropy(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model, examples: Examples, item_vectors: torch.Tensor, k: int = 10,
             batch_size: int = 128, personal_alpha: float = DEFAULT_PERSONAL_ALPHA
             ) -> dict[str, float]:
    """Full ranking over the catalog, history items masked -> HR@k, NDCG@k.

    `model` needs encode_users(history, mask) and logits(users, items).
    """
    if len(examples) == 0:
        return {"hr10": 0.0, "ndcg10": 0.0, "n": 0}
    hits = ndcg = 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples.subset(np.arange(start, min(start + batch_size, len(examples))))
        history, mask = collate(chunk.history, item_vectors, item_vectors.device)
        personal = personal_from_history(history, mask, personal_alpha)
        scores = model.logits(model.encode_users(history, mask, personal), item_vectors)
        scores = mask_seen(scores, chunk.history)
        target = torch.as_tensor(chunk.target, dtype=torch.long, device=scores.device)
        target_scores = scores.gather(1, target[:, None])
        rank = (scores > target_scores).sum(1)  # 0-based rank of the target
        hit = rank < k
        hits += float(hit.sum())
        ndcg += float((hit / torch.log2(rank.float() + 2)).sum())
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


def ndcg_at(rank: int, k: int = 10) -> float:
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0
