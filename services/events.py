"""The click-event contract: schema, codec and validation.

An event is a JSON object on Kafka (key = user_id):
`event_id` (str, unique), `user_id` (str), `item_id` (str), `ts` (epoch seconds),
`type` (click | view | purchase | rating), optional `value` (number).
`decode_event` either returns a `ClickEvent` or raises `InvalidEvent` whose
`reason` is a short code: it goes in the dead-letter header and the metric label.

`decode_batch` validates a whole poll at once and returns the valid events as columns.
It is the consumer's hot path and must accept and reject exactly what `decode_event`
does, with the same reason codes and the same field values: it checks the canonical
shape (the one `ClickEvent.to_json` and `json.dumps` write) for many records with a
few C-level calls, and hands every record that does not pass to `decode_event`, which
stays the one authority on reasons.
"""

from __future__ import annotations

import bisect
import json
import math
import operator
import re
import time
from collections.abc import Container, Iterator, Sequence
from dataclasses import asdict, dataclass, field

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
_OPTIONAL = {"value": (int, float)}


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


# --- batch decoding ---------------------------------------------------------------------

@dataclass(slots=True)
class EventColumns:
    """Events column-wise: row i of every list is one event (the fields of `ClickEvent`).

    The consumer keeps valid events this way from decode to the shards and the event
    log, so no per-event object is built on the hot path.
    """

    event_id: list[str] = field(default_factory=list)
    user_id: list[str] = field(default_factory=list)
    item_id: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    type: list[str] = field(default_factory=list)
    value: list[float | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.event_id)

    def __iter__(self) -> Iterator[list]:
        """The columns, in field order."""
        return iter((self.event_id, self.user_id, self.item_id, self.ts, self.type,
                     self.value))

    def append(self, event: ClickEvent) -> None:
        self.event_id.append(event.event_id)
        self.user_id.append(event.user_id)
        self.item_id.append(event.item_id)
        self.ts.append(event.ts)
        self.type.append(event.type)
        self.value.append(event.value)

    def extend(self, other: EventColumns) -> None:
        self.event_id += other.event_id
        self.user_id += other.user_id
        self.item_id += other.item_id
        self.ts += other.ts
        self.type += other.type
        self.value += other.value

    def events(self) -> Iterator[ClickEvent]:
        return (ClickEvent(*row) for row in zip(self.event_id, self.user_id, self.item_id,
                                               self.ts, self.type, self.value, strict=True))

    @classmethod
    def of(cls, events: Sequence[ClickEvent]) -> EventColumns:
        columns = cls()
        for event in events:
            columns.append(event)
        return columns


@dataclass(slots=True)
class DecodedBatch:
    """What `decode_batch` makes of n records.

    rows: the input index of each valid event, ascending; events: those events, in the
    same order; invalid: (input index, error) for every other record, ascending.
    """

    rows: list[int]
    events: EventColumns
    invalid: list[tuple[int, InvalidEvent]]


# The canonical shape: the fields in ClickEvent order, ids of printable ASCII without
# quotes or backslashes (so no JSON escapes), ts a non-negative JSON number, optional
# value; compact separators (what ClickEvent.to_json writes) or json.dumps' default
# ", " and ": " (a second pattern: fixed separators match ~35% faster than optional
# spaces, measured). Anything else is not rejected here, only sent to decode_event.
# Every part is a subset of the JSON grammar, and nothing in it can match a newline.
_ID = rf'"([ !#-\[\]-~]{{1,{MAX_ID_CHARS}}})"'
_NUMBER = r"(?:0|[1-9][0-9]{0,15})(?:\.[0-9]{1,17})?(?:[eE][+-]?[0-9]{1,3})?"


def _shape(comma: str, colon: str) -> re.Pattern[str]:
    return re.compile(
        rf'\{{"event_id"{colon}{_ID}{comma}"user_id"{colon}{_ID}{comma}"item_id"{colon}{_ID}'
        rf'{comma}"ts"{colon}({_NUMBER}){comma}"type"{colon}"(click|view|purchase|rating)"'
        rf'(?:{comma}"value"{colon}(-?{_NUMBER}))?\}}')


_CANONICAL = _shape(",", ":")
_CANONICAL_SPACED = _shape(", ", ": ")


def _texts(values: list[bytes | None]) -> list[str | None]:
    """Each value as text (None where it is None or not UTF-8)."""
    if None not in values:
        # The usual case, in three C calls: join, check that no record holds a newline
        # (so splitting gives the records back), decode.
        blob = b"\n".join(values)  # type: ignore[arg-type]  # None ruled out above
        if blob.count(b"\n") == len(values) - 1:
            try:
                return blob.decode("utf-8").split("\n")
            except UnicodeDecodeError:
                pass
    texts: list[str | None] = []
    for value in values:
        try:
            texts.append(None if value is None else value.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    return texts


def _canonical_rows(keys: list[bytes | None], texts: list[str | None],
                    known_items: Container[str] | None, now: float
                    ) -> tuple[list[int], EventColumns]:
    """The records that are canonical and valid: (their indices, their events).

    Every check runs over whole columns (C-level map/set/max calls); only a column that
    fails is looked at row by row. A record accepted here is one `decode_event` accepts,
    with equal fields. Numbers: JSON reads "12" as int 12 and "1.5" / "1e3" with float();
    float("12") equals float(12) (both correctly rounded, <= 16 digits), except "-0",
    which JSON reads as int 0 (+0.0) and float() as -0.0: a "-0" value is left to
    decode_event.
    """
    fullmatch = _CANONICAL.fullmatch
    matches = [None if t is None else fullmatch(t) for t in texts] if None in texts \
        else list(map(fullmatch, texts))  # type: ignore[arg-type]  # no None here
    if None in matches:
        spaced = _CANONICAL_SPACED.fullmatch
        matches = [m if m is not None or t is None else spaced(t)
                   for m, t in zip(matches, texts, strict=True)]
    if None in matches:
        rows = [i for i, m in enumerate(matches) if m is not None]
        if not rows:
            return [], EventColumns()
        groups = [matches[i].groups() for i in rows]  # type: ignore[union-attr]
        keys = [keys[i] for i in rows]
    else:
        rows = list(range(len(texts)))
        groups = list(map(re.Match.groups, matches))  # type: ignore[arg-type]
    event_id, user_id, item_id, ts_text, kind, value_text = map(list, zip(*groups, strict=True))
    ok: list[bool] | None = None  # row by row, once a column check has failed

    def keep(mask: list[bool]) -> None:
        nonlocal ok
        ok = mask if ok is None else [a and b for a, b in zip(ok, mask, strict=True)]

    # key == user_id: a None or empty key never equals an encoded id of 1+ characters.
    same_key = list(map(operator.eq, keys, map(str.encode, user_id)))
    if False in same_key:
        keep(same_key)
    if known_items is not None:
        if not (known_items.issuperset(item_id) if isinstance(known_items, (set, frozenset))
                else all(item in known_items for item in item_id)):
            keep([item in known_items for item in item_id])
    ts = list(map(float, ts_text))
    limit = now + MAX_FUTURE_S
    if max(ts) > limit:  # also catches inf ("1e999"); no negative number matches
        keep([t <= limit for t in ts])
    if any(value_text):
        value: list[float | None] = list(map(float, value_text)) if None not in value_text \
            else [float(v) if v else None for v in value_text]
        # filter(None, ...) drops None (and zeros, which are finite anyway).
        if "-0" in value_text or math.inf in map(abs, filter(None, value)):
            keep([t != "-0" and (v is None or math.isfinite(v))
                  for t, v in zip(value_text, value, strict=True)])
    else:
        value = [None] * len(rows)
    columns = EventColumns(event_id, user_id, item_id, ts, kind, value)
    if ok is None:
        return rows, columns
    good = [j for j, fine in enumerate(ok) if fine]
    return [rows[j] for j in good], EventColumns(
        *([column[j] for j in good] for column in (event_id, user_id, item_id, ts, kind,
                                                  value)))


def decode_batch(keys: Sequence[bytes | None], values: Sequence[bytes | None],
                 known_items: Container[str] | None = None,
                 now: float | None = None) -> DecodedBatch:
    """Validate n records (keys[i], values[i]) at once; same verdicts as `decode_event`.

    Canonical valid records are decoded together (one regex match per record, the other
    checks column-wise); every other record goes alone to `decode_event`, which gives
    its reason code (or accepts it: a valid record in another shape). `now` is read once.
    """
    now = time.time() if now is None else now
    keys, values = list(keys), list(values)
    rows, events = _canonical_rows(keys, _texts(values), known_items, now) if values \
        else ([], EventColumns())
    if len(rows) == len(values):
        return DecodedBatch(rows=rows, events=events, invalid=[])
    # The others go to decode_event; its valid events are put in their place (few records
    # in a poll, usually: one insert each; many: one pass over the poll).
    fast = set(rows)
    slow: list[tuple[int, ClickEvent]] = []
    invalid: list[tuple[int, InvalidEvent]] = []
    for i in range(len(values)):
        if i not in fast:
            try:
                slow.append((i, decode_event(keys[i], values[i], known_items, now)))
            except InvalidEvent as bad:
                invalid.append((i, bad))
    if len(slow) <= 32:
        for i, event in slow:  # ascending, so each goes after the ones before it
            at = bisect.bisect_left(rows, i)
            rows.insert(at, i)
            for column, field_value in zip(events, _fields(event), strict=True):
                column.insert(at, field_value)
        return DecodedBatch(rows=rows, events=events, invalid=invalid)
    fast_events = zip(*events, strict=True)  # one tuple of fields per fast row, in order
    slow_events = dict(slow)
    merged_rows = sorted(fast.union(slow_events))
    merged = [next(fast_events) if i in fast else _fields(slow_events[i]) for i in merged_rows]
    return DecodedBatch(rows=merged_rows, invalid=invalid,
                        events=EventColumns(*map(list, zip(*merged, strict=True))))


def _fields(event: ClickEvent) -> tuple:
    return (event.event_id, event.user_id, event.item_id, event.ts, event.type, event.value)
