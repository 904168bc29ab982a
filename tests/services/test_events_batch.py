"""decode_batch must give exactly decode_event's verdicts: same events, same reason codes."""

from __future__ import annotations

import json
import math
import random

import pytest

from services.batch_decode import decode_batch
from services.events import INVALID_REASONS, ClickEvent, InvalidEvent, decode_event
from tests.services.test_events import BAD, ITEMS, NOW, _record

KNOWN = frozenset(ITEMS | {str(i) for i in range(1, 60)} | {"é-item", "x y"})


def _reference(keys, values, known=KNOWN, now=NOW) -> list[tuple[str, object]]:
    """decode_event record by record -> [("ok", ClickEvent) | ("invalid", reason)]."""
    out = []
    for key, value in zip(keys, values, strict=True):
        try:
            out.append(("ok", decode_event(key, value, known, now)))
        except InvalidEvent as bad:
            out.append(("invalid", bad.reason))
    return out


def _batched(keys, values, known=KNOWN, now=NOW) -> list[tuple[str, object]]:
    result = decode_batch(keys, values, known, now)
    assert result.rows == sorted(result.rows)
    assert [i for i, _ in result.invalid] == sorted(i for i, _ in result.invalid)
    out: list[tuple[str, object] | None] = [None] * len(values)
    for row, event in zip(result.rows, result.events.events(), strict=True):
        out[row] = ("ok", event)
    for row, bad in result.invalid:
        assert out[row] is None, "a record is both valid and invalid"
        out[row] = ("invalid", bad.reason)
    assert None not in out, "a record got no verdict"
    return out


def _same(a, b) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x == y, (i, x, y)
        if x[0] == "ok":  # == on floats hides -0.0 vs 0.0; the event log would not
            assert repr(x[1]) == repr(y[1]), (i, x, y)


def _random_event(rng: random.Random) -> tuple[bytes | None, bytes]:
    """A valid event in one of the shapes producers write (canonical or not)."""
    alphabet = "abcXYZ019-_.:/ " + "é漢" * rng.randint(0, 1) + '"\\' * (rng.random() < 0.1)
    user = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))).strip() or "u"
    event = {"event_id": f"ev-{rng.getrandbits(40):x}" + rng.choice(["", "é", " x", "\\n"]),
             "user_id": user, "item_id": rng.choice(sorted(KNOWN)),
             "ts": rng.choice([NOW - rng.random() * 1e6, int(NOW) - rng.randint(0, 10 ** 6),
                               0, 0.0, 1.5e9, NOW + 3600]),
             "type": rng.choice(["click", "view", "purchase", "rating"])}
    if rng.random() < 0.6:
        event["value"] = rng.choice([4.0, 3, -2, 0, -0.0, 1e-7, 2.5e10, rng.random()])
    if rng.random() < 0.1:
        event["value"] = None  # explicit null: valid, means no value
    style = rng.random()
    if style < 0.6:
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=rng.random() < 0.5)
    elif style < 0.8:
        text = json.dumps(event)
    else:
        text = json.dumps(dict(sorted(event.items())), indent=rng.choice([None, 1]))
    return user.encode(), text.encode()


def _mutate(rng: random.Random, value: bytes) -> bytes:
    """A few random edits, biased toward the bytes that matter to the fast path."""
    data = bytearray(value)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(data) + 1)
        op = rng.random()
        char = (rng.choice(b'"\\:,{}[] \n\t0123456789-.eE+xu\x00\x7f\xc3\xa9')
                if rng.random() < 0.8 else rng.randrange(256))
        if op < 0.4 and pos < len(data):
            data[pos] = char
        elif op < 0.7:
            data.insert(pos, char)
        elif pos < len(data):
            del data[pos]
    return bytes(data)


def test_the_bad_corpus_gets_the_same_reasons_alone_and_among_valid_records():
    keys = [k for k, _, _ in BAD]
    values = [v for _, v, _ in BAD]
    expected = [("invalid", reason) for _, _, reason in BAD]
    assert _reference(keys, values, ITEMS) == expected
    _same(_batched(keys, values, ITEMS), expected)
    for key, value, reason in BAD:
        assert _batched([key], [value], ITEMS) == [("invalid", reason)]
    # Each bad record at a random place in a batch of canonical valid records.
    rng = random.Random(3)
    for key, value, _ in BAD:
        batch = [(b"u1", ClickEvent(f"e{i}", "u1", "10", NOW - i, "click").to_json())
                 for i in range(rng.randint(1, 300))]
        batch.insert(rng.randrange(len(batch) + 1), (key, value))
        keys, values = [k for k, _ in batch], [v for _, v in batch]
        _same(_batched(keys, values, ITEMS), _reference(keys, values, ITEMS))


def test_random_valid_events_decode_to_the_same_events():
    rng = random.Random(7)
    for size in [1, 2, 7, 100, 2000]:
        records = [_random_event(rng) for _ in range(size)]
        keys, values = [k for k, _ in records], [v for _, v in records]
        _same(_batched(keys, values), _reference(keys, values))


def test_canonical_batches_take_the_fast_path_and_agree():
    events = [ClickEvent(f"ml-{i}", str(i % 37), str(1 + i % 50), 8.7e8 + i,
                         ["click", "view", "purchase", "rating"][i % 4],
                         None if i % 3 else float(i % 5)) for i in range(3000)]
    keys = [e.user_id.encode() for e in events]
    values = [e.to_json() for e in events]
    result = decode_batch(keys, values, KNOWN, NOW)
    assert result.rows == list(range(3000)) and not result.invalid
    assert list(result.events.events()) == events


def test_mutated_records_get_the_same_verdicts():
    rng = random.Random(11)
    reasons = set()
    for _ in range(60):
        records = [_random_event(rng) for _ in range(rng.randint(1, 80))]
        keys = [k for k, _ in records]
        values = [_mutate(rng, v) if rng.random() < 0.3 else v for _, v in records]
        if rng.random() < 0.2:
            keys[rng.randrange(len(keys))] = rng.choice([None, b"", b"other", b"\xff"])
        expected = _reference(keys, values)
        _same(_batched(keys, values), expected)
        reasons |= {r for kind, r in expected if kind == "invalid"}
    assert {"not_json", "key_mismatch", "unknown_field"} <= reasons


def test_numbers_at_the_edges():
    def record(ts="1.5", value=None):
        tail = "" if value is None else f',"value":{value}'
        return f'{{"event_id":"e","user_id":"u","item_id":"10","ts":{ts},"type":"view"{tail}}}'

    texts = [record(ts) for ts in ["0", "0.0", "1e3", "1E+3", "12345678901234567", "9" * 16,
                                   "1.00000000000000000001", "1e999", "-0", "-1", "01", "1.",
                                   ".5", "1e-400", str(int(NOW) + 10 ** 6), "NaN", "Infinity"]]
    texts += [record(value=v) for v in ["-0", "-0.0", "0", "-1", "1e308", "1e309", "-1e309",
                                        "4", "4.0", "NaN", "-Infinity", "true", "null"]]
    valid = [ClickEvent(f"e{i}", "u", "10", 1.0, "view").to_json() for i in range(20)]
    for text in texts:  # alone, and among valid records (so the fast path sees it)
        values = [text.encode()]
        _same(_batched([b"u"], values), _reference([b"u"], values))
        values = valid[:10] + [text.encode()] + valid[10:]
        _same(_batched([b"u"] * 21, values), _reference([b"u"] * 21, values))


def test_records_cannot_borrow_each_others_lines_or_keys():
    a, b = (ClickEvent(e, "u", "10", 1.0, "view").to_json() for e in ("a", "b"))
    cases = [
        ([b"u", b"u"], [a + b"\n" + b, b"garbage"]),  # two lines in one record, none in one
        ([b"u", b"u"], [b"garbage", a + b"\n" + b]),
        ([b"u", b"u", b"u"], [a + b"\n" + b, b"", a]),
        ([b"u\nu", b""], [a, b]),  # keys joined equal, pairs not
        ([b"u", b"u\nu"], [a, b]),
    ]
    for keys, values in cases:
        _same(_batched(keys, values), _reference(keys, values))


# Records that made decode_event raise something other than InvalidEvent: the consumer
# crashed on them, restarted and read the same record again, forever.
POISON = [
    (b"u1", b"[" * 100_000 + b"]" * 100_000, "not_json"),
    (b"u1", _record(ts=...)[:-1] + b', "ts": ' + b"1" * 5000 + b"}", "not_json"),
    (b"u1", _record(ts=10 ** 400), "bad_timestamp"),
    (b"u1", _record(value=10 ** 400), "bad_value"),
    (b"u1", _record(value=-(10 ** 400)), "bad_value"),
]


@pytest.mark.parametrize("key, value, reason", POISON, ids=[p[2] for p in POISON])
def test_poison_records_are_invalid_not_crashes(key, value, reason):
    with pytest.raises(InvalidEvent) as err:
        decode_event(key, value, ITEMS, now=NOW)
    assert err.value.reason == reason and reason in INVALID_REASONS
    assert _batched([key, b"u1"], [value, _record()], ITEMS)[0] == ("invalid", reason)


def test_item_check_may_be_any_container():
    keys = [b"u1", b"u1"]
    values = [_record(item_id="10"), _record(item_id="11")]
    _same(_batched(keys, values, known=["10"]), _reference(keys, values, known=["10"]))
    _same(_batched(keys, values, known=None), _reference(keys, values, known=None))
    assert math.isclose(decode_batch(keys, values, None, NOW).events.ts[0], NOW - 5)
