"""The event log: every valid event, as a parquet dataset partitioned by ingest hour.

The streaming plane writes it (`EventLogWriter`), the training plane reads it
(`read_event_log`). `root` is a local path or any pyarrow filesystem URI
(file://, s3://, gs://, hdfs://...).

Layout: <root>/hour=YYYYMMDDHH/<writer>-<seq>.parquet
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from services.batch import EVENT_FIELDS, EventBatch, arrow_fields
from services.events import ClickEvent

# The events' own columns (not where they were read: a replay may read them elsewhere),
# and when they were logged.
SCHEMA = pa.schema([*arrow_fields(EVENT_FIELDS), ("ingest_ts", pa.float64())])


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), root


class EventLogWriter:
    """Buffers events (as columns) and writes one parquet file per flush."""

    def __init__(self, root: str, writer_id: str):
        self.fs, self.root = _filesystem(root)
        self.writer_id = writer_id
        self._rows = EventBatch()
        self._ingest: list[float] = []
        self._seq = 0

    def append(self, events: Iterable[ClickEvent], ingest_ts: float | None = None) -> None:
        self.append_columns(EventBatch.of(list(events)), ingest_ts)

    def append_columns(self, events: EventBatch, ingest_ts: float | None = None) -> None:
        """The consumer's path: a batch's valid events, column-wise (no per-event object)."""
        now = time.time() if ingest_ts is None else ingest_ts
        self._rows.extend(events)
        self._ingest += [now] * len(events)

    def __len__(self) -> int:
        return len(self._rows)

    def flush(self) -> str | None:
        """Write the buffer as one file; returns its path (None when empty)."""
        if not len(self._rows):
            return None
        table = pa.table({**{name: getattr(self._rows, name) for name in EVENT_FIELDS},
                          "ingest_ts": self._ingest}, schema=SCHEMA)
        hour = time.strftime("%Y%m%d%H", time.gmtime(self._ingest[0]))
        directory = f"{self.root}/hour={hour}"
        self.fs.create_dir(directory, recursive=True)
        path = f"{directory}/{self.writer_id}-{time.time_ns()}-{self._seq:06d}.parquet"
        pq.write_table(table, path, filesystem=self.fs)
        self._seq += 1
        self._rows = EventBatch()
        self._ingest = []
        return path


def read_event_log(root: str) -> pa.Table:
    """All logged events (may hold duplicates after a replay: dedupe by event_id)."""
    fs, path = _filesystem(root)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return SCHEMA.empty_table()
    dataset = ds.dataset(path, format="parquet", filesystem=fs, schema=SCHEMA,
                         partitioning=ds.partitioning(pa.schema([("hour", pa.string())]),
                                                      flavor="hive"))
    return dataset.to_table(columns=SCHEMA.names)
