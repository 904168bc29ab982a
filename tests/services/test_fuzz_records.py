"""Kafka record bytes through every decoder, fuzzed (hypothesis): each record is either
accepted or refused with a reason code; nothing else escapes, so no record can stop a
consumer. The batch decoder must give every record the verdict decode_event gives it."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.batch_decode import decode_batch
from services.events import InvalidEvent, decode_event
from services.item_records import InvalidItemRecord, decode_item_record
from streaming.live_tally import read_impression

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.0

# JSON-ish values: what a producer that means well but gets a field wrong sends.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                           max_leaves=12)
FIELDS = ("event_id", "user_id", "item_id", "ts", "type", "value", "request_id")
near_events = st.fixed_dictionaries({}, optional={f: json_values for f in FIELDS}) \
    | st.fixed_dictionaries({"event_id": st.text(max_size=8), "user_id": st.text(max_size=8),
                             "item_id": st.sampled_from(["1", "2", "x"]),
                             "ts": st.floats(0, 2e9) | st.integers(-5, 2_000_000_000),
                             "type": st.sampled_from(["click", "view", "rating", "buy"])})


def as_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


records = st.binary(max_size=300) | near_events.map(as_bytes) | json_values.map(as_bytes)
keys = st.none() | st.binary(max_size=20) | st.text(max_size=12).map(str.encode)


def verdict(key, value):
    try:
        return decode_event(key, value, known_items={"1", "2"}, now=NOW)
    except InvalidEvent as err:
        assert err.reason and isinstance(err.reason, str)
        return err.reason


@FUZZ
@given(keys, st.none() | records)
def test_decode_event_accepts_or_refuses_with_a_reason(key, value):
    verdict(key, value)


@FUZZ
@given(st.lists(st.tuples(keys, st.none() | records), max_size=12))
def test_the_batch_decoder_gives_each_record_decode_events_verdict(pairs):
    keys_, values = [k for k, _ in pairs], [v for _, v in pairs]
    batch = decode_batch(keys_, values, known_items={"1", "2"}, now=NOW)
    expected = [verdict(k, v) for k, v in pairs]
    assert sorted(batch.rows + [i for i, _ in batch.invalid]) == list(range(len(pairs)))
    for i, err in batch.invalid:
        assert err.reason == expected[i]
    for n, i in enumerate(batch.rows):
        assert not isinstance(expected[i], str), (pairs[i], expected[i])
        assert batch.events.item_id[n] == expected[i].item_id


item_fields = ("item_id", "title", "text", "description", "categories", "attributes",
               "available")


@FUZZ
@given(keys, st.none() | st.binary(max_size=300)
       | st.fixed_dictionaries({}, optional={f: json_values for f in item_fields}).map(as_bytes))
def test_item_records_are_accepted_or_refused_with_a_reason(key, value):
    try:
        decode_item_record(key, value)
    except InvalidItemRecord as err:
        assert err.reason


@FUZZ
@given(records)
def test_impressions_are_read_or_skipped(value):
    read_impression(value)  # None when not one: counted and skipped by the live metrics
