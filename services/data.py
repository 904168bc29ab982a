"""Items and events in memory, and where they come from: a MovieLens name (imported by
`services.movielens`) or a catalog / event file in the generic format
(`services.item_files`). Both go through the same validating readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.events import ClickEvent


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str
    text: str = ""  # what the backbone reads; empty: composed by `document`
    description: str = ""
    categories: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict, hash=False)
    available: bool = True  # False: never recommended

    @property
    def document(self) -> str:
        """What the frozen backbone reads to embed this item."""
        if self.text:
            return self.text
        parts = [self.title.rstrip(".") + "."]
        if self.description:
            parts.append(self.description)
        if self.categories:
            parts.append(f"Categories: {', '.join(self.categories)}.")
        return " ".join(parts)


@dataclass(frozen=True)
class Interactions:
    """Events as parallel arrays, sorted by (ts, row)."""

    user_ids: np.ndarray  # [E] str
    item_ids: np.ndarray  # [E] str
    ts: np.ndarray  # [E] float64 epoch seconds
    values: np.ndarray  # [E] float32, NaN: no value
    types: np.ndarray  # [E] str event type
    event_ids: np.ndarray  # [E] str
    row: np.ndarray  # [E] int64 row in the source

    def __len__(self) -> int:
        return len(self.ts)

    def event(self, i: int) -> ClickEvent:
        value = float(self.values[i])
        return ClickEvent(event_id=str(self.event_ids[i]), user_id=str(self.user_ids[i]),
                          item_id=str(self.item_ids[i]), ts=float(self.ts[i]),
                          type=str(self.types[i]), value=None if value != value else value)


def is_movielens(source: str) -> bool:
    from services.movielens import DATASETS

    return source in DATASETS


def load_items(source: str) -> list[Item]:
    """The catalog of a MovieLens name or of an item file (path or URI)."""
    from services.item_files import items_from_table, read_table
    from services.movielens import item_table

    if is_movielens(source):
        return items_from_table(item_table(source), source)
    return items_from_table(read_table(source), source)


def load_interactions(source: str, limit: int | None = None) -> Interactions:
    """The events of a MovieLens name or of an event file, in replay order; `limit`: the
    first that many."""
    from services.item_files import interactions_from_table, read_table
    from services.movielens import event_table

    table = event_table(source) if is_movielens(source) else read_table(source)
    return interactions_from_table(table, source, limit)
