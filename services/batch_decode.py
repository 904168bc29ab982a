"""`decode_batch`: a whole poll's records validated at once, the valid ones as an EventBatch.

It is the consumer's hot path and must accept and reject exactly what
`services.events.decode_event` does, with the same reason codes and the same field
values: it checks the canonical shape (the one `ClickEvent.to_json` and `json.dumps`
write) for many records with a few C-level calls, and hands every record that does not
pass to `decode_event`, which stays the one authority on reasons.
"""

from __future__ import annotations

import bisect
import math
import operator
import re
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass

from services.batch import EventBatch, event_row
from services.events import MAX_FUTURE_S, MAX_ID_CHARS, ClickEvent, InvalidEvent, decode_event


@dataclass(slots=True)
class DecodedBatch:
    """What `decode_batch` makes of n records.

    rows: the input index of each valid event, ascending; events: those events, in the
    same order; invalid: (input index, error) for every other record, ascending.
    """

    rows: list[int]
    events: EventBatch
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
                    ) -> tuple[list[int], list[list]]:
    """The records that are canonical and valid: (their indices, their event columns).

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
            return [], [[] for _ in range(6)]
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
    columns = [event_id, user_id, item_id, ts, kind, value]
    if ok is None:
        return rows, columns
    good = [j for j, fine in enumerate(ok) if fine]
    return [rows[j] for j in good], [[column[j] for j in good] for column in columns]


def decode_batch(keys: Sequence[bytes | None], values: Sequence[bytes | None],
                 known_items: Container[str] | None = None, now: float | None = None, *,
                 partition: int = 0, offsets: Sequence[int] | None = None,
                 kafka_ms: Sequence[int] | None = None) -> DecodedBatch:
    """Validate n records (keys[i], values[i]) at once; same verdicts as `decode_event`.

    Canonical valid records are decoded together (one regex match per record, the other
    checks column-wise); every other record goes alone to `decode_event`, which gives
    its reason code (or accepts it: a valid record in another shape). `now` is read once.
    The records were read from `partition` at `offsets` (default: 0..n-1) with Kafka
    timestamps `kafka_ms` (default: none, 0): the events carry those of their record.
    """
    now = time.time() if now is None else now
    keys, values = list(keys), list(values)
    rows, events = _canonical_rows(keys, _texts(values), known_items, now) if values \
        else ([], [[] for _ in range(6)])
    invalid: list[tuple[int, InvalidEvent]] = []
    if len(rows) < len(values):
        rows, events = _merge_others(keys, values, known_items, now, rows, events, invalid)
    n, valid = len(values), len(rows)
    offsets = range(n) if offsets is None else offsets
    kafka_ms = [0] * n if kafka_ms is None else kafka_ms
    return DecodedBatch(rows=rows, invalid=invalid, events=EventBatch(
        *events, partition=[partition] * valid, offset=_pick(offsets, rows, n),
        kafka_ms=_pick(kafka_ms, rows, n)))


def _pick(column: Sequence[int], rows: list[int], n: int) -> list[int]:
    """column[i] for i in rows, ascending indices of n records (C-level where it can)."""
    if len(rows) == n:  # all valid: the record column is the event column
        return column if isinstance(column, list) else list(column)
    if len(rows) < 2:
        return [column[i] for i in rows]
    return list(operator.itemgetter(*rows)(column))


def _merge_others(keys: list[bytes | None], values: list[bytes | None],
                  known_items: Container[str] | None, now: float, rows: list[int],
                  events: list[list], invalid: list[tuple[int, InvalidEvent]]
                  ) -> tuple[list[int], list[list]]:
    """Send the records the fast path did not accept to decode_event; put its valid events
    in their place (few records in a poll, usually: one insert each; many: one pass)."""
    fast = set(rows)
    slow: list[tuple[int, ClickEvent]] = []
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
            for column, field_value in zip(events, event_row(event), strict=True):
                column.insert(at, field_value)
        return rows, events
    fast_events = zip(*events, strict=True)  # one tuple of fields per fast row, in order
    slow_events = dict(slow)
    merged_rows = sorted(fast.union(slow_events))
    merged = [next(fast_events) if i in fast else event_row(slow_events[i])
              for i in merged_rows]
    return merged_rows, [list(column) for column in zip(*merged, strict=True)]
