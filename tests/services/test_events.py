import json
import time

import pytest

from services.events import MAX_EVENT_BYTES, ClickEvent, InvalidEvent, decode_event

NOW = time.time()  # the corpus is also sent to the real pipeline, which uses the clock
ITEMS = {"10", "20"}  # "10" is also a MovieLens-100K item: the corpus runs end to end too


def _record(**overrides):
    body = {"event_id": "e1", "user_id": "u1", "item_id": "10", "ts": NOW - 5, "type": "click"}
    body.update(overrides)
    body = {k: v for k, v in body.items() if v is not ...}
    return json.dumps(body).encode()


def test_valid_event_round_trips():
    event = decode_event(b"u1", _record(value=4.5, type="rating"), ITEMS, now=NOW)
    assert event == ClickEvent("e1", "u1", "10", NOW - 5, "rating", 4.5)
    assert decode_event(b"u1", event.to_json(), ITEMS, now=NOW) == event


# The bad-input corpus: (key, value, expected reason).
BAD = [
    (b"u1", b"{not json", "not_json"),
    (b"u1", b"\xff\xfe\x00garbage", "not_utf8"),
    (b"u1", b"[1, 2]", "not_object"),
    (b"u1", _record(item_id=...), "missing_field"),
    (b"u1", _record(ts=None), "missing_field"),
    (b"u1", _record(ts="yesterday"), "wrong_type"),
    (b"u1", _record(ts=True), "wrong_type"),
    (b"u1", _record(user_id=7), "wrong_type"),
    (b"u1", _record(type="teleport"), "unknown_type"),
    (b"u1", _record(item_id="99999"), "unknown_item"),
    (None, _record(), "missing_key"),
    (b"", _record(), "missing_key"),
    (b"u2", _record(), "key_mismatch"),
    (b"u1", b'{"pad": "' + b"x" * MAX_EVENT_BYTES + b'"}', "too_large"),
    (b"u1", _record(ts=-1), "bad_timestamp"),
    (b"u1", _record(ts=NOW + 10 * 24 * 3600), "bad_timestamp"),
    (b"u" * 129, _record(user_id="u" * 129), "bad_id"),
    (b"u1", _record(event_id=""), "bad_id"),
    (b"u1", _record(value="high"), "bad_value"),
    (b"u1", _record(extra=1), "unknown_field"),
    (b"u1", None, "not_json"),
]


@pytest.mark.parametrize("key, value, reason", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_rejected_with_reason(key, value, reason):
    with pytest.raises(InvalidEvent) as err:
        decode_event(key, value, ITEMS, now=NOW)
    assert err.value.reason == reason


def test_item_check_is_optional():
    assert decode_event(b"u1", _record(item_id="new"), None, now=NOW).item_id == "new"


def test_an_event_may_quote_the_request_it_answers():
    body = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": 1.0, "type": "click"}
    good = json.dumps({**body, "request_id": "0f3a"}).encode()
    assert decode_event(b"u1", good).item_id == "i1"
    for request_id, reason in ((7, "wrong_type"), ("", "bad_id"), ("x" * 129, "bad_id"),
                               ("a\nb", "bad_id")):
        with pytest.raises(InvalidEvent) as bad:
            decode_event(b"u1", json.dumps({**body, "request_id": request_id}).encode())
        assert bad.value.reason == reason
