"""EventBatch: decoded click events, column-wise, from the consumer to the shards and the log.

Row i of every column is one event. The columns are declared once, here: the event's
own fields (`EVENT_FIELDS`, those of `services.events.ClickEvent`, in its order) and
where it was read (`partition`, `offset`, `kafka_ms`). The shards take this type as
their input, and the event log's arrow schema is derived from it (`arrow_fields`).

Columns of flat lists, not one object per event: a batch pickles far cheaper this way
(Ray pickles every call's arguments) and is checked and applied column by column.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from itertools import chain

import pyarrow as pa

from services.events import ClickEvent


def _column(arrow_type: pa.DataType):
    return field(default_factory=list, metadata={"arrow": arrow_type})


@dataclass(slots=True)
class EventBatch:
    """Decoded events as columns; rows of one partition are in offset order."""

    event_id: list[str] = _column(pa.string())
    user_id: list[str] = _column(pa.string())
    item_id: list[str] = _column(pa.string())
    ts: list[float] = _column(pa.float64())  # event time, epoch seconds
    type: list[str] = _column(pa.string())
    value: list[float | None] = _column(pa.float64())
    partition: list[int] = _column(pa.int32())
    offset: list[int] = _column(pa.int64())
    kafka_ms: list[int] = _column(pa.int64())  # the record's Kafka timestamp (0: none)

    def __len__(self) -> int:
        return len(self.event_id)

    def columns(self) -> tuple[list, ...]:
        """The columns, in field order."""
        return _COLUMNS(self)

    def rows(self) -> list[tuple]:
        """One tuple per event, in field order (tests and the reference apply use rows)."""
        return list(zip(*self.columns(), strict=True))

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence]) -> EventBatch:
        rows = list(rows)
        if not rows:
            return cls()
        return cls(*map(list, zip(*rows, strict=True)))

    @classmethod
    def of(cls, events: Sequence[ClickEvent], partition: int = 0,
           offsets: Sequence[int] | None = None, kafka_ms: Sequence[int] | None = None
           ) -> EventBatch:
        """Events read from one partition (offsets default to 0, 1, ...; no timestamps)."""
        n = len(events)
        return cls(*map(list, zip(*map(event_row, events), strict=True)) if n
                   else ([] for _ in EVENT_FIELDS),
                   partition=[partition] * n,
                   offset=list(range(n) if offsets is None else offsets),
                   kafka_ms=[0] * n if kafka_ms is None else list(kafka_ms))

    def events(self) -> Iterator[ClickEvent]:
        return (ClickEvent(*row) for row in zip(*self.columns()[:len(EVENT_FIELDS)],
                                                 strict=True))

    def take(self, rows: Sequence[int]) -> EventBatch:
        """The given rows, in the given order."""
        if len(rows) < 2:
            return EventBatch(*([column[i] for i in rows] for column in self.columns()))
        pick = operator.itemgetter(*rows)  # one C-level gather per column
        return EventBatch(*(list(pick(column)) for column in self.columns()))

    def extend(self, other: EventBatch) -> None:
        for mine, theirs in zip(self.columns(), other.columns(), strict=True):
            mine += theirs

    def insert(self, at: int, row: Sequence) -> None:
        for column, value in zip(self.columns(), row, strict=True):
            column.insert(at, value)

    @classmethod
    def concat(cls, batches: Sequence[EventBatch]) -> EventBatch:
        """The batches one after the other (the batch itself when there is one)."""
        if len(batches) == 1:
            return batches[0]
        return cls(*(list(chain.from_iterable(columns))
                     for columns in zip(*(b.columns() for b in batches), strict=True)))


FIELDS = tuple(f.name for f in fields(EventBatch))
EVENT_FIELDS = FIELDS[:6]  # the event itself; the rest says where it was read
_COLUMNS = operator.attrgetter(*FIELDS)
event_row = operator.attrgetter(*EVENT_FIELDS)  # a ClickEvent -> its row of fields
# ClickEvent is the same event as a row: its fields must stay these, in this order.
if EVENT_FIELDS != tuple(f.name for f in fields(ClickEvent)):
    raise TypeError(f"EventBatch's event columns {EVENT_FIELDS} differ from ClickEvent's")


def arrow_fields(names: Sequence[str] = FIELDS) -> list[pa.Field]:
    """The arrow type of each named column (the event log's schema is derived from it)."""
    types = {f.name: f.metadata["arrow"] for f in fields(EventBatch)}
    return [pa.field(name, types[name]) for name in names]
