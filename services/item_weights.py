"""Per-item rows of a prompt version: carried onto a catalog by item id, and what an item
the version never trained on starts from (its text).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from services.weights import PromptWeights


def aligned_to(weights: PromptWeights, item_ids: list[str],
               text_vectors: torch.Tensor | None = None) -> PromptWeights:
    """The version with its per-item rows in the order of `item_ids` (a catalog's rows,
    text_vectors [N, H]): rows of items it has are carried over by id, the others start
    from their text (`unseen_items_fall_back_to_text`). Positional weights (no item ids)
    are taken to be in the catalog's order already."""
    if not weights.has_item_weights or weights.item_ids is None \
            or list(weights.item_ids) == list(item_ids):
        return weights
    row_of = {item: row for row, item in enumerate(weights.item_ids)}
    rows = [row_of.get(item, -1) for item in item_ids]
    known = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
    take = torch.tensor([max(r, 0) for r in rows], dtype=torch.long)
    changes: dict = {"item_ids": tuple(item_ids),
                     "structure": dataclasses.replace(weights.structure,
                                                      num_items=len(item_ids))}
    if weights.item_bias is not None:
        changes["item_bias"] = torch.where(known, weights.item_bias[take], 0.0)
    if weights.item_delta is not None:
        changes["item_delta"] = weights.item_delta[take] * known[:, None]
    return unseen_items_fall_back_to_text(dataclasses.replace(weights, **changes),
                                          known.numpy(), text_vectors)


def unseen_items_fall_back_to_text(weights: PromptWeights, seen: np.ndarray,
                                   text_vectors: torch.Tensor | None = None,
                                   neighbours: int = 10) -> PromptWeights:
    """seen [N] bool: items that appeared in training data -> the version with every unseen
    item's bias and item token replaced by what its text says.

    Full softmax only ever pushed an unseen item down (it was a negative, never a target),
    so what it learned says nothing about it. Without `text_vectors` [N, H] it gets the
    mean bias of the seen items and a zero token (its text vector alone places it); with
    them it gets the mean bias and token of its `neighbours` seen items nearest in text
    space (its text says which trained items it resembles, and they moved).
    """
    seen_t = torch.as_tensor(np.asarray(seen, bool))
    if not weights.has_item_weights or not seen_t.any() or seen_t.all():
        return weights
    if text_vectors is None:
        take = None
    else:
        sims = text_vectors[~seen_t] @ text_vectors[seen_t].T  # [unseen, seen]
        near = sims.topk(min(neighbours, int(seen_t.sum())), dim=1).indices  # [unseen, k]
        take = torch.nonzero(seen_t).squeeze(1)[near]  # catalog indices [unseen, k]
    changes = {}
    if weights.item_bias is not None:
        bias = weights.item_bias.clone()
        bias[~seen_t] = bias[seen_t].mean() if take is None else bias[take].mean(1)
        changes["item_bias"] = bias
    if weights.item_delta is not None:
        delta = weights.item_delta.clone()
        delta[~seen_t] = 0.0 if take is None else delta[take].mean(1)
        changes["item_delta"] = delta
    return dataclasses.replace(weights, **changes)
