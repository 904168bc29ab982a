"""The generic catalog, event and profile files: Parquet, JSONL or CSV, by path or URI.

Items, one row each:
    item_id      str, required, unique, at most 128 characters
    title        str, required, not empty
    text         str, optional: what the backbone reads (default: title, description and
                 categories, see `Item.document`)
    description  str, optional
    categories   list of str, optional (in CSV: "a|b|c")
    attributes   str -> str map, optional (in CSV: a JSON object)
    available    bool, optional, default true (false: never recommended)

Events, one row each (the click-event contract of `services.events`):
    user_id, item_id   str (integers are read as their decimal text), required
    ts                 epoch seconds (a number or a timestamp column), required
    event_id           str, optional (default "<file stem>-<row>")
    type               click | view | purchase | rating, optional (default click)
    value              number, optional

User profiles, one row per user (the `promptrec.users` record of `services.user_records`):
    user_id      str (an integer is read as its decimal text), required, unique
    text         str, required, not empty: the user's own words
    attributes   str -> str map, optional (in CSV: a JSON object)

The item and profile rules live in `services.item_fields` (shared with the Kafka codecs,
`services.item_records` and `services.user_records`); files get its leniencies for CSV
and Parquet cells.

A file that breaks these rules fails at start-up with `DataFileError`, which names the
file, the row (0-based, as the file orders them) and the column.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.data import Interactions, Item
from services.events import EVENT_TYPES, MAX_ID_CHARS
from services.item_fields import (
    ITEM_FIELDS,
    PROFILE_FIELDS,
    ItemFieldError,
    UserProfile,
    item_from_record,
    profile_from_record,
)

ITEM_COLUMNS = ITEM_FIELDS
PROFILE_COLUMNS = PROFILE_FIELDS
EVENT_COLUMNS = ("event_id", "user_id", "item_id", "ts", "type", "value")
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".ndjson": "json",
           ".json": "json", ".csv": "csv"}


class DataFileError(ValueError):
    """A catalog or event file the service cannot start with."""

    def __init__(self, path: str, problem: str, row: int | None = None,
                 column: str | None = None):
        where = "".join([f", row {row}" if row is not None else "",
                         f", column {column!r}" if column else ""])
        super().__init__(f"{path}{where}: {problem}")
        self.path, self.row, self.column = path, row, column


def read_table(uri: str) -> pa.Table:
    """The file at `uri` (a local path or any URI pyarrow.fs knows: s3://, gs://, hdfs://,
    file://) as a table; the format comes from the suffix."""
    import pyarrow.csv as pcsv
    import pyarrow.fs as pfs
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    suffix = PurePosixPath(uri.split("?")[0]).suffix.lower()
    kind = FORMATS.get(suffix)
    if kind is None:
        raise DataFileError(uri, f"unknown format {suffix or '(no suffix)'!r}; use one of "
                            f"{', '.join(sorted(FORMATS))}")
    try:
        if "://" in uri:
            fs, path = pfs.FileSystem.from_uri(uri)
        else:
            fs, path = pfs.LocalFileSystem(), str(Path(uri).resolve())
        if kind == "parquet":
            return pq.read_table(path, filesystem=fs)
        with fs.open_input_stream(path) as stream:
            data = stream.read()
        if kind == "json":
            return pjson.read_json(pa.BufferReader(data))
        # Every CSV column as text, so that an id "007" stays "007".
        header = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8-sig")]), [])
        return pcsv.read_csv(pa.BufferReader(data), convert_options=pcsv.ConvertOptions(
            column_types={name: pa.string() for name in header}, strings_can_be_null=True))
    except (OSError, pa.ArrowInvalid) as err:
        raise DataFileError(uri, f"cannot read it as {kind}: {err}") from err


def _unknown_columns(table: pa.Table, known: tuple[str, ...], path: str) -> None:
    extra = [name for name in table.column_names if name not in known]
    if extra:
        raise DataFileError(path, f"unknown column (known: {', '.join(known)})",
                            column=extra[0])


def _validated_rows(table: pa.Table, path: str, known: tuple[str, ...],
                    required: tuple[str, ...], build, id_of, what: str) -> list:
    """`build(record)` of every row, in the file's order; the first broken rule, a
    repeated id (`id_of`) or an empty file raises `DataFileError` (file, row, column)."""
    _unknown_columns(table, known, path)
    for name in required:
        if name not in table.column_names:
            raise DataFileError(path, "required column missing", column=name)
    built: list = []
    seen: dict[str, int] = {}
    id_column = required[0]
    for row, record in enumerate(table.to_pylist()):
        try:
            one = build(record)
        except ItemFieldError as err:
            raise DataFileError(path, err.problem, row, err.column) from err
        if id_of(one) in seen:
            raise DataFileError(path, f"{id_column} {id_of(one)!r} repeats row "
                                f"{seen[id_of(one)]}", row, id_column)
        seen[id_of(one)] = row
        built.append(one)
    if not built:
        raise DataFileError(path, f"no {what}")
    return built


def items_from_table(table: pa.Table, path: str) -> list[Item]:
    """Validated items, in the file's order."""
    return _validated_rows(table, path, ITEM_COLUMNS, ("item_id", "title"),
                           lambda r: item_from_record(r, lenient_csv=True),
                           lambda item: item.item_id, "items")


def profiles_from_table(table: pa.Table, path: str) -> list[UserProfile]:
    """Validated user profiles, in the file's order (one row per user)."""
    return _validated_rows(table, path, PROFILE_COLUMNS, ("user_id", "text"),
                           lambda r: profile_from_record(r, lenient_csv=True),
                           lambda profile: profile.user_id, "profiles")


def interactions_from_table(table: pa.Table, path: str, limit: int | None = None
                            ) -> Interactions:
    """Validated events, sorted by (ts, row): the replay order. Columnar: millions of rows
    take seconds."""
    _unknown_columns(table, EVENT_COLUMNS, path)
    n = table.num_rows
    columns = {}
    for name in ("user_id", "item_id"):
        columns[name] = _id_column(table, name, path)
    columns["ts"] = _ts_column(table, path)
    if "event_id" in table.column_names:
        columns["event_id"] = _id_column(table, "event_id", path)
    else:
        stem = PurePosixPath(path.split("?")[0]).stem
        columns["event_id"] = np.array([f"{stem}-{row}" for row in range(n)], dtype=object)
    types = np.full(n, "click", dtype=object)
    if "type" in table.column_names:
        given = table["type"]
        known = pc.or_(pc.is_null(given), pc.is_in(given, pa.array(sorted(EVENT_TYPES))))
        bad = np.flatnonzero(~known.to_numpy(zero_copy_only=False))
        if len(bad):
            raise DataFileError(path, f"unknown type {given[int(bad[0])].as_py()!r} (known: "
                                f"{', '.join(sorted(EVENT_TYPES))})", int(bad[0]), "type")
        types = pc.fill_null(given, "click").to_numpy(zero_copy_only=False).astype(object)
    values = np.full(n, np.nan, np.float64)
    if "value" in table.column_names:
        column = table["value"]
        try:
            values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise DataFileError(path, f"not a number: {err}", _first_bad(column, float),
                                "value") from err
        values = np.where(np.isfinite(values), values, np.nan)  # null -> NaN: no value
    order = np.lexsort((np.arange(n), columns["ts"]))
    if limit is not None:
        order = order[:limit]
    return Interactions(user_ids=columns["user_id"][order], item_ids=columns["item_id"][order],
                        ts=columns["ts"][order], values=values[order].astype(np.float32),
                        types=types[order], event_ids=columns["event_id"][order],
                        row=order.astype(np.int64))


def _id_column(table: pa.Table, name: str, path: str) -> np.ndarray:
    if name not in table.column_names:
        raise DataFileError(path, "required column missing", column=name)
    column = table[name]
    if pa.types.is_integer(column.type):
        column = pc.cast(column, pa.string())
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataFileError(path, f"expected text, got {column.type}", column=name)
    length = pc.utf8_length(pc.utf8_trim_whitespace(column)).to_numpy(zero_copy_only=False)
    raw = pc.utf8_length(column).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False)
                         | (np.nan_to_num(length) == 0) | (np.nan_to_num(raw) > MAX_ID_CHARS))
    if len(bad):
        raise DataFileError(path, f"empty or longer than {MAX_ID_CHARS} characters",
                            int(bad[0]), name)
    return column.to_numpy(zero_copy_only=False).astype(object)


def _ts_column(table: pa.Table, path: str) -> np.ndarray:
    if "ts" not in table.column_names:
        raise DataFileError(path, "required column missing", column="ts")
    column = table["ts"]
    try:
        if pa.types.is_timestamp(column.type):
            ts = pc.cast(pc.cast(column, pa.timestamp("us")), pa.int64()).to_numpy(
                zero_copy_only=False) / 1e6
        else:
            ts = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as err:
        raise DataFileError(path, f"not epoch seconds: {err}", _first_bad(column, float),
                            "ts") from err
    bad = np.flatnonzero(~np.isfinite(ts) | (ts < 0))
    if len(bad):
        raise DataFileError(path, "missing, negative or not a number", int(bad[0]), "ts")
    return ts.astype(np.float64)


def _first_bad(column: pa.ChunkedArray, convert) -> int | None:
    """The first row `convert` refuses (for an error message)."""
    for row, value in enumerate(column.to_pylist()):
        if value is None:
            continue
        try:
            if not math.isfinite(convert(value)):
                return row
        except (TypeError, ValueError):
            return row
    return None
