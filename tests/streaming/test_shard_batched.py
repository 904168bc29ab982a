"""The batched `apply` must leave exactly the state that one-by-one application leaves."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.batch import EventBatch
from services.config import StreamingSettings
from streaming.shard import UserStateShard
from tests.streaming.reference import apply_one_by_one

H = 16
ITEMS = [f"i{k}" for k in range(40)]
TYPES = ["click", "view", "purchase", "rating", "other"]  # "other": the default weight


def _pair(rng: random.Random, **changes):
    vectors = np.asarray([[rng.gauss(0, 1) for _ in range(H)] for _ in ITEMS], np.float32)
    config = StreamingSettings(**{"history_len": rng.choice([1, 3, 30]),
                                  "dedupe_window": rng.choice([5, 50, 10_000]),
                                  "personal_alpha": rng.choice([0.1, 0.37, 0.9]), **changes})
    return (UserStateShard(0, config, vectors, ITEMS),
            UserStateShard(0, config, vectors, ITEMS))


def _state(shard: UserStateShard) -> tuple:
    return (shard.dump(), list(shard.guard.seen), dict(shard.guard.covered), shard.applied,
            shard.duplicates, shard.replayed, len(shard.latency.kept_ms))


def _assert_same(batched: UserStateShard, reference: UserStateShard) -> None:
    got, want = _state(batched), _state(reference)
    assert got[1:] == want[1:]
    assert got[0].keys() == want[0].keys()
    for user, state in want[0].items():
        assert got[0][user]["history"] == state["history"], user
        assert got[0][user]["state_version"] == state["state_version"], user
        # Bit for bit: tolist() gives the exact float32 values as Python floats.
        assert got[0][user]["personal"] == state["personal"], user


def _random_batches(rng: random.Random, n_batches: int, users: int, skew: float):
    """Consumer batches over 3 partitions, with producer duplicates, replays, late events,
    unknown items, equal timestamps, a gap (rewind) and a new topic epoch."""
    next_offset = {0: 0, 1: 0, 2: 0}
    epoch = "E1"
    recent_ids: list[str] = []
    serial = 0
    for b in range(n_batches):
        if b == n_batches // 2 and rng.random() < 0.5:
            epoch, next_offset = "E2", {0: 0, 1: 0, 2: 0}  # the topic was recreated
        rows, ranges = [], {}
        for partition in rng.sample([0, 1, 2], rng.randint(1, 3)):
            low = next_offset[partition]
            if rng.random() < 0.15:
                low = max(0, low - rng.randint(1, 30))  # a redelivery (replay)
            elif rng.random() < 0.05:
                low += rng.randint(1, 5)  # a gap: the shard asks for a rewind
            count = rng.randint(0, 60)
            for offset in range(low, low + count):
                if recent_ids and rng.random() < 0.08:
                    event_id = rng.choice(recent_ids)  # a producer's duplicate
                else:
                    serial += 1
                    event_id = f"e{serial}"
                    recent_ids = (recent_ids + [event_id])[-80:]
                if rng.random() < skew:
                    user = "heavy"
                else:
                    user = f"u{rng.randrange(users)}"
                item = rng.choice(ITEMS) if rng.random() < 0.9 else f"unknown{rng.randrange(3)}"
                ts = float(rng.choice([serial, serial - rng.randint(0, 50), 7]))  # late, ties
                rows.append((event_id, user, item, ts, rng.choice(TYPES), None, partition,
                             offset, rng.choice([0, 1_700_000_000_000 + serial])))
            ranges[partition] = (epoch, low, low + count)
            next_offset[partition] = max(next_offset[partition], low + count)
        yield rows, ranges


@pytest.mark.parametrize("seed", range(12))
def test_batched_apply_equals_one_by_one(seed):
    rng = random.Random(seed)
    batched, reference = _pair(rng)
    users = rng.choice([2, 10, 300])
    skew = rng.choice([0.0, 0.5, 0.9])
    for rows, ranges in _random_batches(rng, 30, users, skew):
        as_columns = EventBatch.from_rows(rows)
        got = batched.apply(as_columns, ranges)
        want = apply_one_by_one(reference, rows, ranges)
        assert got == want
        _assert_same(batched, reference)
    assert batched.applied > 0


def test_both_personal_prompt_paths_are_exercised_and_exact():
    # Many users with one or two events each takes the step-by-step path; one user with
    # all the events takes the plain loop. Both must match the rule bit for bit.
    rng = random.Random(99)
    for users, skew in [(500, 0.0), (3, 0.95)]:
        batched, reference = _pair(rng, history_len=30, dedupe_window=10_000)
        rows = [(f"e{k}", "heavy" if rng.random() < skew else f"u{rng.randrange(users)}",
                 rng.choice(ITEMS), float(k), rng.choice(TYPES), None, 0, k, 0)
                for k in range(1000)]
        batched.apply(EventBatch.from_rows(rows), {0: ("E", 0, 1000)})
        apply_one_by_one(reference, rows, {0: ("E", 0, 1000)})
        _assert_same(batched, reference)


def test_rows_and_columns_round_trip():
    rows = [("e", "u", "i0", 1.5, "click", None, 0, 5, 0),
            ("f", "v", "i1", 2.0, "view", 3.0, 2, 9, 7)]
    assert EventBatch.from_rows(rows).rows() == rows
    assert EventBatch.from_rows([]).rows() == []
