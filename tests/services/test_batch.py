"""EventBatch: the one columnar event type, its fields declared once."""

from __future__ import annotations

from dataclasses import fields

import pyarrow as pa

from services.batch import EVENT_FIELDS, FIELDS, EventBatch, arrow_fields
from services.eventlog import SCHEMA
from services.events import ClickEvent

EVENTS = [ClickEvent("e1", "u", "i1", 1.5, "click"), ClickEvent("e2", "v", "i2", 2.0, "view", 3.0),
          ClickEvent("e3", "u", "i3", 2.5, "purchase")]


def test_the_event_columns_are_click_events_fields_and_the_log_schema_derives_from_them():
    assert EVENT_FIELDS == tuple(f.name for f in fields(ClickEvent))
    assert SCHEMA.names == [*EVENT_FIELDS, "ingest_ts"]
    assert list(SCHEMA)[:len(EVENT_FIELDS)] == arrow_fields(EVENT_FIELDS)
    assert SCHEMA.field("ts").type == pa.float64()
    assert FIELDS[len(EVENT_FIELDS):] == ("partition", "offset", "kafka_ms")


def test_events_rows_take_and_concat_keep_rows_whole():
    batch = EventBatch.of(EVENTS, partition=2, offsets=[7, 8, 9], kafka_ms=[1, 0, 3])
    assert len(batch) == 3 and list(batch.events()) == EVENTS
    assert batch.rows()[1] == ("e2", "v", "i2", 2.0, "view", 3.0, 2, 8, 0)
    assert EventBatch.from_rows(batch.rows()) == batch
    assert batch.take([2, 0]).rows() == [batch.rows()[2], batch.rows()[0]]
    assert batch.take([1]).rows() == [batch.rows()[1]] and len(batch.take([])) == 0
    other = EventBatch.of(EVENTS[:1], partition=0)
    assert EventBatch.concat([batch, other]).rows() == batch.rows() + other.rows()
    assert EventBatch.concat([batch]) is batch
    grown = EventBatch()
    grown.extend(batch)
    grown.extend(other)
    assert grown.rows() == batch.rows() + other.rows()
    assert len(EventBatch.of([])) == 0
