"""Per-item rows of a prompt version: carried onto a catalog by item id, and what an item
the version never trained on starts from (its text).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import numpy as np
import torch

from services.row_buffer import RowBuffer, with_rows
from services.weights import PromptWeights


def aligned_to(weights: PromptWeights, item_ids: list[str],
               text_vectors: torch.Tensor | None = None) -> PromptWeights:
    """The version with its per-item rows in the order of `item_ids` (a catalog's rows,
    text_vectors [N, H]): rows of items it has are carried over by id, the others start
    from their text (`unseen_items_fall_back_to_text`). Positional weights (no item ids)
    are taken to be in the catalog's order already. `CatalogRows` is the fast path for a
    catalog that keeps changing."""
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
                                   neighbours: int = 10, bias_quantile: float | None = None
                                   ) -> PromptWeights:
    """seen [N] bool: items that appeared in training data -> the version with every unseen
    item's bias and item token replaced by what its text says.

    Full softmax only ever pushed an unseen item down (it was a negative, never a target),
    so what it learned says nothing about it. Without `text_vectors` [N, H] it gets the
    mean bias of the seen items and a zero token (its text vector alone places it); with
    them it gets the mean bias and token of its `neighbours` seen items nearest in text
    space (its text says which trained items it resembles, and they moved). With
    `bias_quantile` q its bias is instead the q-quantile of the seen items' biases: an
    item no one has chosen yet starts less popular than the average one.
    """
    seen_t = torch.as_tensor(np.asarray(seen, bool))
    fill = ~seen_t
    if not weights.has_item_weights or not seen_t.any() or not fill.any():
        return weights
    if text_vectors is None:
        take = None
    else:
        sims = text_vectors[fill] @ text_vectors[seen_t].T  # [filled, seen]
        near = sims.topk(min(neighbours, int(seen_t.sum())), dim=1).indices  # [filled, k]
        take = torch.nonzero(seen_t).squeeze(1)[near]  # catalog indices [filled, k]
    changes = {}
    if weights.item_bias is not None:
        bias = weights.item_bias.clone()
        if bias_quantile is not None:
            bias[fill] = torch.quantile(bias[seen_t], bias_quantile)
        else:
            bias[fill] = bias[seen_t].mean() if take is None else bias[take].mean(1)
        changes["item_bias"] = bias
    if weights.item_delta is not None:
        delta = weights.item_delta.clone()
        delta[fill] = 0.0 if take is None else delta[take].mean(1)
        changes["item_delta"] = delta
    return dataclasses.replace(weights, **changes)


class CatalogRows:
    """One prompt version's per-item rows, kept on a live catalog as it changes.

    `on(catalog)` -> the version aligned to `catalog`, as `aligned_to` aligns it (a parity
    test checks). The first call aligns in full; a call for a catalog `changed` from the
    last one computes only the
    rows the change added or replaced (by id from the version, or from their text's
    nearest known items), and appends them into spare rows (services.row_buffer): at
    100,000 items a full alignment took ~0.7 s, a change of ten items a few ms.
    """

    def __init__(self, weights: PromptWeights, neighbours: int = 10):
        self.weights, self.neighbours = weights, neighbours
        self.by_id = None if weights.item_ids is None or not weights.has_item_weights else \
            {item: row for row, item in enumerate(weights.item_ids)}
        self.aligned: PromptWeights | None = None
        self._version, self._size = -2, 0  # the catalog aligned to last
        self._buffers: dict[str, RowBuffer | None] = {}
        self._known_vectors = self._known_rows = None  # text vectors / weight rows of known
        self._basis: tuple = ()

    def on(self, catalog) -> PromptWeights:
        if self.by_id is None:
            return self.weights  # positional weights, or none per item
        incremental = self.aligned is not None and catalog.parent_version == self._version \
            and catalog.parent_size == self._size and not any(
                catalog.items[r].item_id in self.by_id
                for r in (*catalog.replaced, *range(self._size, len(catalog))))
        if incremental:
            self.aligned = self._changed(catalog)
        else:  # or a known item came or changed: the neighbours' basis moved, start over
            ids = catalog.item_ids
            self._buffers = {}
            known = [(row, self.by_id[i]) for row, i in enumerate(ids) if i in self.by_id]
            self._known_vectors = catalog.vectors[[row for row, _ in known]]
            self._known_rows = torch.tensor([r for _, r in known], dtype=torch.long)
            # The neighbours of an unknown item depend on its text and on the known items
            # only: versions trained on the same items share them (cached, see _near).
            self._basis = (hash(self.weights.item_ids), hash(tuple(known)),
                           self._known_vectors.sum(0).numpy().tobytes())
            if list(self.weights.item_ids) == ids:
                self.aligned = self.weights
            else:
                self.aligned = dataclasses.replace(
                    self.weights, item_ids=tuple(ids), **self._rows_for(ids, catalog.vectors),
                    structure=dataclasses.replace(self.weights.structure, num_items=len(ids)))
        self._version, self._size = catalog.version, len(catalog)
        return self.aligned

    def _changed(self, catalog) -> PromptWeights:
        rows = [*catalog.replaced, *range(self._size, len(catalog))]
        ids = [catalog.items[r].item_id for r in rows]
        values = self._rows_for(ids, catalog.vectors[rows]) if rows else {}
        changes: dict = {"item_ids": tuple(catalog.item_ids),
                         "structure": dataclasses.replace(self.weights.structure,
                                                          num_items=len(catalog))}
        n_replaced = len(catalog.replaced)
        for name, fresh in values.items():
            old = getattr(self.aligned, name)
            changes[name], self._buffers[name] = with_rows(
                old, list(catalog.replaced), fresh[:n_replaced], fresh[n_replaced:],
                self._buffers.get(name))
        return dataclasses.replace(self.aligned, **changes)

    def _rows_for(self, ids: list[str], vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows for these items: the version's own, or their text neighbours' mean."""
        w = self.weights
        mine = torch.tensor([self.by_id.get(i, -1) for i in ids], dtype=torch.long)
        known = mine >= 0
        near = None
        if (~known).any() and len(self._known_rows):
            unknown = torch.nonzero(~known).squeeze(1).tolist()
            near = self._near([ids[i] for i in unknown], vectors[~known])
        out = {}
        for name in ("item_bias", "item_delta"):
            table = getattr(w, name)
            if table is None:
                continue
            rows = table[mine.clamp(min=0)].clone()
            if near is not None:
                rows[~known] = table[near].mean(1)
            elif (~known).any():  # nothing known: what the untrained version would hold
                rows[~known] = 0.0
            out[name] = rows
        return out

    def _near(self, ids: list[str], vectors: torch.Tensor) -> torch.Tensor:
        """Weight rows [U, k] of the k known items nearest each of these unknown items by
        text (vectors [U, H]); computed once per (basis, item, text) in this process."""
        cache = _NEIGHBOURS.setdefault(self._basis, {})
        _NEIGHBOURS.move_to_end(self._basis)
        while len(_NEIGHBOURS) > NEIGHBOUR_BASES_KEPT:
            _NEIGHBOURS.popitem(last=False)
        hit = [(i, cache[item][1]) for i, item in enumerate(ids)
               if item in cache and torch.equal(cache[item][0], vectors[i])]
        near = torch.empty(len(ids), min(self.neighbours, len(self._known_rows)),
                           dtype=torch.long)
        for i, rows in hit:
            near[i] = rows
        todo = sorted(set(range(len(ids))) - {i for i, _ in hit})
        if todo:
            sims = vectors[todo] @ self._known_vectors.T  # [todo, known]: the costly part
            found = self._known_rows[sims.topk(near.shape[1], dim=1).indices]
            near[todo] = found
            for i, rows in zip(todo, found, strict=True):
                cache[ids[i]] = (vectors[i].clone(), rows)
        return near


# Unknown items' nearest known items, per basis (the known items and their texts): a
# swap to a version trained on the same items reuses them; a full search over 100,000
# known items cost ~5 s for 1,500 new items.
_NEIGHBOURS: OrderedDict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
NEIGHBOUR_BASES_KEPT = 2
