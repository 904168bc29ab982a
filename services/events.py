"""The click-event contract: schema, codec and validation.

An event is a JSON object on Kafka (key = user_id):
`event_id` (str, unique), `user_id` (str), `item_id` (str), `ts` (epoch seconds),
`type` (click | view | purchase | rating), optional `value` (number), optional
`request_id` (str: the /recommend answer the event came from; the live metrics credit it
to that impression, `streaming.live_metrics`; the state keeps no request ids).
`decode_event` either returns a `ClickEvent` or raises `InvalidEvent` whose
`reason` is a short code: it goes in the dead-letter header and the metric label.
It is the one authority on reasons: the consumer's fast path
(`services.batch_decode.decode_batch`) must give exactly its verdicts.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Container
from dataclasses import asdict, dataclass

EVENT_TYPES = frozenset({"click", "view", "purchase", "rating"})
MAX_EVENT_BYTES = 1 << 20
MAX_ID_CHARS = 128
MAX_FUTURE_S = 24 * 3600  # clock skew we tolerate on producers

# Every reason code decode_event can raise, so metrics and docs can list them.
INVALID_REASONS = (
    "too_large", "not_utf8", "not_json", "not_object", "missing_field", "unknown_field",
    "wrong_type", "unknown_type", "unknown_item", "missing_key", "key_mismatch",
    "bad_id", "bad_timestamp", "bad_value",
)


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str):
        assert reason in INVALID_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ClickEvent:
    event_id: str
    user_id: str
    item_id: str
    ts: float
    type: str
    value: float | None = None

    def to_json(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(body, separators=(",", ":")).encode()

    def to_dict(self) -> dict:
        return asdict(self)


_REQUIRED = {"event_id": str, "user_id": str, "item_id": str, "ts": (int, float), "type": str}
_OPTIONAL = {"value": (int, float), "request_id": str}


def _finite(number: int | float) -> bool:
    """math.isfinite without its OverflowError on integers beyond float range."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 40 else "<huge int>"
    return text[:80]


def _check_id(name: str, value: str) -> None:
    if not value or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidEvent("bad_id", f"{name} must be 1..{MAX_ID_CHARS} printable characters")


def decode_event(key: bytes | None, value: bytes | None,
                 known_items: Container[str] | None = None,
                 now: float | None = None) -> ClickEvent:
    """Validate one Kafka record; raise `InvalidEvent` with a reason code."""
    if value is None:
        raise InvalidEvent("not_json", "empty value")
    if len(value) > MAX_EVENT_BYTES:
        raise InvalidEvent("too_large", f"{len(value)} bytes > {MAX_EVENT_BYTES}")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidEvent("not_utf8", str(err)) from None
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        # RecursionError: deeply nested arrays; ValueError: an integer of more than 4,300
        # digits (Python's int conversion limit). Both would otherwise escape as crashes
        # and the consumer would re-read the same record after every restart.
        raise InvalidEvent("not_json", str(err)[:200]) from None
    if not isinstance(body, dict):
        raise InvalidEvent("not_object", f"got {type(body).__name__}")
    for name, kind in _REQUIRED.items():
        if name not in body or body[name] is None:
            raise InvalidEvent("missing_field", name)
        # bool is an int subclass; a boolean timestamp is a bug, not a time.
        if not isinstance(body[name], kind) or isinstance(body[name], bool):
            raise InvalidEvent("wrong_type", f"{name} is {type(body[name]).__name__}")
    extra = set(body) - set(_REQUIRED) - set(_OPTIONAL)
    if extra:
        raise InvalidEvent("unknown_field", ",".join(sorted(extra)))
    event_value = body.get("value")
    if event_value is not None and (not isinstance(event_value, (int, float))
                                    or isinstance(event_value, bool)
                                    or not _finite(event_value)):
        raise InvalidEvent("bad_value", f"value {_short(event_value)}")
    for name in ("event_id", "user_id", "item_id"):
        _check_id(name, body[name])
    request_id = body.get("request_id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise InvalidEvent("wrong_type", f"request_id is {type(request_id).__name__}")
        _check_id("request_id", request_id)
    if body["type"] not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", body["type"][:40])
    try:
        ts = float(body["ts"])
    except OverflowError:  # an integer beyond float range
        ts = math.inf
    now = time.time() if now is None else now
    if not math.isfinite(ts) or ts < 0 or ts > now + MAX_FUTURE_S:
        raise InvalidEvent("bad_timestamp", f"ts {_short(body['ts'])}")
    if not key:
        raise InvalidEvent("missing_key", "records must be keyed by user_id")
    if key.decode("utf-8", "replace") != body["user_id"]:
        raise InvalidEvent("key_mismatch", "key differs from user_id")
    if known_items is not None and body["item_id"] not in known_items:
        raise InvalidEvent("unknown_item", body["item_id"][:40])
    return ClickEvent(event_id=body["event_id"], user_id=body["user_id"],
                      item_id=body["item_id"], ts=ts, type=body["type"],
                      value=None if event_value is None else float(event_value))
