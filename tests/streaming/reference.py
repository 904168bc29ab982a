"""The reference apply: one event at a time, the rule `UserStateShard.apply` must equal.

It drives a real shard's state (its delivery guard, users and latency sample) event by
event with the per-event personal-prompt rule, where `apply` decides, applies and
records whole batches column-wise. tests/streaming/test_shard_batched.py compares the
two on random batches; bench/micro_ingest.py times both.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

from services import personal
from services.batch import EventBatch
from streaming.apply import UserState
from streaming.delivery import Ranges
from streaming.latency import LATENCIES_KEPT, LATENCY_SAMPLE_EVERY
from streaming.shard import UserStateShard


def apply_one_by_one(shard: UserStateShard, events: EventBatch | Sequence[tuple],
                     ranges: Ranges) -> dict:
    """`shard.apply(events, ranges)`, one event at a time."""
    from services import metrics

    rows = events.rows() if isinstance(events, EventBatch) else events
    guard = shard.guard
    expected, rewind = guard.expect(ranges)
    applied = duplicates = replayed = 0
    now_ms = time.time() * 1000
    latency = metrics.event_to_state_seconds()
    for event_id, user_id, item_id, ts, kind, _, partition, offset, kafka_ms in rows:
        if partition in rewind:
            continue
        if offset < expected[partition]:
            replayed += 1
            continue
        if event_id in guard.seen:
            duplicates += 1
            continue
        guard.remember(event_id)
        _apply_one(shard, user_id, item_id, ts, event_id, kind)
        applied += 1
        if kafka_ms > 0:
            if offset % LATENCY_SAMPLE_EVERY == 0:
                latency.observe(max(0.0, now_ms - kafka_ms) / 1000)
            if len(shard.latency.kept_ms) < LATENCIES_KEPT:
                shard.latency.kept_ms.append(now_ms - kafka_ms)
    return shard.finish(ranges, expected, rewind, applied, duplicates, replayed)


def _apply_one(shard: UserStateShard, user_id: str, item_id: str, ts: float, event_id: str,
               kind: str) -> None:
    state = shard.users.setdefault(user_id, UserState())
    bisect.insort(state.history, (ts, event_id, item_id))
    if len(state.history) > shard.history_len:
        del state.history[0]
    state.state_version += 1
    if shard.items is not None and (index := shard.items.index.get(item_id)) is not None:
        state.personal = personal.update(state.personal, shard.items.vectors[index], kind,
                                         shard.personal_alpha)
