"""HR@k and NDCG@k with one relevant item: the one definition that the training gate,
the offline evaluation and the prequential evaluation all use.

A target ranked r-th (0-based) scores hit = [r < k] and NDCG = hit / log2(r + 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

K = 10


def hit_ndcg_of_ranks(rank: torch.Tensor, k: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """rank [B] 0-based ranks of the targets -> (hit [B], ndcg [B]) as floats."""
    hit = (rank < k).float()
    return hit, hit / torch.log2(rank.float() + 2)


def hit_ndcg(ranked: Sequence[str], target: str, k: int = K) -> tuple[float, float]:
    """HR@k and NDCG@k of one ranked list (best first) against its one relevant item."""
    top = list(ranked[:k])
    rank = top.index(target) if target in top else k
    hit, ndcg = hit_ndcg_of_ranks(torch.tensor([rank]), k)
    return float(hit[0]), float(ndcg[0])
