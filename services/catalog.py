"""The item catalog: items, their frozen text vectors, and how a catalog version changes.

A catalog version is immutable: a change (items added, changed, hidden or deleted, from
the `promptrec.items` topic) makes a new `Catalog` beside the old one, so a request that
read the old one finishes on it. Positions never move: a new item is appended, a changed
one keeps its row, a deleted one stays as a tombstone (masked, out of `index`). Users'
histories and trained weights name items by id, never by row.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.data import Item, load_items
from services.row_buffer import RowBuffer, with_rows
from services.vector_cache import TextVectors


@dataclass
class Catalog:
    items: list[Item]  # by row; a deleted item's row stays (a tombstone)
    vectors: torch.Tensor  # [N, H] unit-norm frozen text embeddings
    version: int = 0  # the catalog version (0: a file, no live changes yet)
    deleted: frozenset[int] = frozenset()  # rows of deleted items
    # What `changed` made this version from: the parent's version and size, and the rows
    # below that size whose item changed (rows past it are new). Followers use it to
    # update what they derive from a catalog by the change only.
    parent_version: int = -1
    parent_size: int = 0
    replaced: tuple[int, ...] = ()
    index: dict[str, int] = field(init=False)  # item_id -> row, live items only
    unavailable: list[int] = field(init=False)  # rows never recommended (hidden or deleted)
    by_category: dict[str, list[int]] = field(init=False)
    _rows: RowBuffer | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.items) != self.vectors.shape[0]:
            raise ValueError("one vector per item")
        self.index = {item.item_id: i for i, item in enumerate(self.items)
                      if i not in self.deleted}
        self.unavailable = [i for i, item in enumerate(self.items)
                            if not item.available or i in self.deleted]
        self.by_category = {}
        for i, item in enumerate(self.items):
            for category in item.categories:
                self.by_category.setdefault(category, []).append(i)

    def __getstate__(self) -> dict:
        # To another process: the rows themselves, not the spare capacity behind them.
        state = dict(self.__dict__)
        if state.pop("_rows", None) is not None:
            state["vectors"] = self.vectors.clone()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _rows=None)

    def in_categories(self, categories: tuple[str, ...]) -> torch.Tensor:
        """[N] bool: the items in at least one of `categories` (unknown ones match none)."""
        mask = torch.zeros(len(self.items), dtype=torch.bool)
        for category in categories:
            mask[self.by_category.get(category, [])] = True
        return mask

    def __len__(self) -> int:
        return len(self.items)

    def indices(self, item_ids: list[str]) -> list[int]:
        """Known items only, order kept."""
        return [self.index[i] for i in item_ids if i in self.index]

    @property
    def item_ids(self) -> list[str]:
        """Every row's item id, tombstones included (the rows trained weights align to)."""
        return [item.item_id for item in self.items]

    def changed(self, upserts: list[Item], vectors: torch.Tensor, deletes: list[str],
                version: int) -> Catalog:
        """The next version: `upserts` (vectors [U, H], one row each) added or replaced in
        place, `deletes` (ids; unknown ones ignored) turned into tombstones. Costs the
        change, not the catalog: new rows go into spare rows of the vector buffer."""
        items, index = list(self.items), dict(self.index)
        by_category = dict(self.by_category)
        unavailable, deleted = set(self.unavailable), set(self.deleted)
        copied: set[str] = set()  # category lists copied for this version

        def rows_of(category: str) -> list[int]:
            if category not in copied:
                by_category[category] = list(by_category.get(category, ()))
                copied.add(category)
            return by_category[category]

        replaced: dict[int, torch.Tensor] = {}
        new_rows: list[torch.Tensor] = []
        for item, vector in zip(upserts, vectors, strict=True):
            row = index.get(item.item_id)
            if row is None:
                row = index[item.item_id] = len(items)
                items.append(item)
                new_rows.append(vector)
            else:
                for category in items[row].categories:
                    rows_of(category).remove(row)
                items[row] = item
                replaced[row] = vector
            for category in item.categories:
                bisect.insort(rows_of(category), row)  # ascending, as a fresh build has it
            (unavailable.discard if item.available else unavailable.add)(row)
        for category in [c for c in copied if not by_category[c]]:
            del by_category[category]
        for item_id in deletes:
            if (row := index.pop(item_id, None)) is not None:
                deleted.add(row)
                unavailable.add(row)
        appended_rows = torch.stack(new_rows) if new_rows else self.vectors[:0]
        table, buffer = with_rows(self.vectors, sorted(replaced),
                                  torch.stack([replaced[r] for r in sorted(replaced)])
                                  if replaced else self.vectors[:0], appended_rows,
                                  self._rows)
        out = Catalog.__new__(Catalog)
        out.__dict__.update(items=items, vectors=table, version=version,
                            deleted=frozenset(deleted), parent_version=self.version,
                            parent_size=len(self.items), replaced=tuple(sorted(replaced)),
                            index=index, unavailable=sorted(unavailable),
                            by_category=by_category, _rows=buffer)
        return out


def build_catalog(items: list[Item], backbone_path: Path, cache_dir: Path,
                  progress: bool = False) -> Catalog:
    """Embed `items` with the frozen backbone; texts embedded before are read back from
    the text-vector cache (services.vector_cache)."""
    vectors = TextVectors(backbone_path, cache_dir).embed([i.document for i in items],
                                                          progress=progress)
    return Catalog(items, vectors)


def load_catalog(source: str, backbone_path: Path, cache_dir: Path,
                 progress: bool = False) -> Catalog:
    """The catalog of a MovieLens name or an item file (`InfraSettings.catalog_source`)."""
    return build_catalog(load_items(source), backbone_path, cache_dir, progress)
