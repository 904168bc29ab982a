"""Events held for an item not in the catalog yet: the hold itself (HeldEvents), the holes
they leave in a shard's covered offsets (DeliveryGuard), and a shard applying them late."""

from __future__ import annotations

import numpy as np

from services.batch import EventBatch
from services.config import StreamingSettings
from streaming.delivery import DeliveryGuard
from streaming.held import HeldEvent, HeldEvents
from streaming.shard import UserStateShard


def _held(offset: int, item: str = "new", since: float = 0.0, user: str = "u") -> HeldEvent:
    return HeldEvent(b"k", b"v", offset, 1000 + offset, item, user, since)


def _offsets(events: dict[int, list[HeldEvent]]) -> dict[int, list[int]]:
    return {p: [e.offset for e in evs] for p, evs in events.items()}


# --- HeldEvents -----------------------------------------------------------------------

def test_commits_stop_at_the_lowest_held_offset():
    held = HeldEvents(max_per_partition=10, timeout_s=5.0)
    assert held.lowest(0) is None and held.commit_offset(0, 40) == 40
    assert held.hold(0, _held(12)) == [] and held.hold(0, _held(15)) == []
    assert held.lowest(0) == 12 and len(held) == 2
    assert held.commit_offset(0, 40) == 12
    assert held.commit_offset(0, 10) == 10  # never past the offset asked for
    assert held.commit_offset(1, 40) == 40  # another partition is not held up


def test_the_bound_per_partition_pushes_out_the_oldest():
    held = HeldEvents(max_per_partition=2, timeout_s=5.0)
    assert held.hold(0, _held(1)) == [] and held.hold(0, _held(2)) == []
    assert held.hold(1, _held(7)) == []  # another partition has a bound of its own
    out = held.hold(0, _held(3))
    assert [e.offset for e in out] == [1]
    assert len(held) == 3 and held.lowest(0) == 2 and held.lowest(1) == 7
    assert [e.offset for e in held.hold(0, _held(4))] == [2]
    assert held.commit_offset(0, 99) == 3


def test_release_returns_ready_events_in_offset_order_and_expired_ones_past_the_timeout():
    held = HeldEvents(max_per_partition=10, timeout_s=5.0)
    for offset, item, since in [(3, "x", 0.0), (4, "y", 0.0), (5, "x", 2.0), (6, "y", 4.0),
                                (8, "x", 9.0)]:
        held.hold(0, _held(offset, item, since))
    held.hold(1, _held(1, "x", 0.0))
    held.hold(1, _held(2, "z", 0.0))
    # At t=5: the x events are ready (held or not past the timeout), y at 0 and z expired.
    ready, expired = held.release({"x"}, now=5.0)
    assert _offsets(ready) == {0: [3, 5, 8], 1: [1]}
    assert _offsets(expired) == {0: [4], 1: [2]}
    # Both left the hold; y held since 4 waits on.
    assert len(held) == 1 and held.lowest(0) == 6 and held.lowest(1) is None
    assert held.release({"x"}, now=8.99) == ({}, {})
    ready, expired = held.release(set(), now=9.0)  # exactly the timeout: expired
    assert ready == {} and _offsets(expired) == {0: [6]}
    assert len(held) == 0 and held.lowest(0) is None and held.commit_offset(0, 50) == 50


def test_an_event_is_ready_rather_than_expired_when_its_item_arrives_late():
    held = HeldEvents(max_per_partition=10, timeout_s=1.0)
    held.hold(0, _held(3, "x", 0.0))
    ready, expired = held.release({"x"}, now=100.0)
    assert _offsets(ready) == {0: [3]} and expired == {}


def test_clear_drops_every_partition():
    held = HeldEvents(max_per_partition=10, timeout_s=1.0)
    held.hold(0, _held(3))
    held.hold(2, _held(5))
    held.clear()
    assert len(held) == 0 and held.lowest(0) is None and held.lowest(2) is None


# --- DeliveryGuard holes --------------------------------------------------------------

def _row(offset: int, event_id: str | None = None, user: str = "u", item: str = "a",
         partition: int = 0) -> tuple:
    return (event_id or f"e{partition}-{offset}", user, item, float(offset), "click", None,
            partition, offset, 0)


def _batch(offsets, partition: int = 0, **kw) -> EventBatch:
    return EventBatch.from_rows([_row(o, partition=partition, **kw) for o in offsets])


def _apply(guard: DeliveryGuard, events: EventBatch, ranges) -> list[int]:
    """What a shard does with a consumer batch's verdict -> the rows applied."""
    admitted = guard.admit(events, ranges)
    guard.cover(ranges, admitted.expected, admitted.rewind)
    return list(admitted.rows)


def _with_hole_at_4() -> DeliveryGuard:
    """A guard that applied offsets 0..10 but 4, held back by the consumer."""
    guard = DeliveryGuard(dedupe_window=1000)
    assert _apply(guard, _batch([o for o in range(11) if o != 4]), {0: ("E", 0, 11)}) \
        == list(range(10))
    guard.hold({0: [4]})
    return guard


def test_a_replay_admits_only_the_held_offset_and_applying_it_fills_the_hole():
    guard = _with_hole_at_4()
    assert guard.holes == {0: {4}} and guard.next_offset(0, "E") == 11
    replay = _batch(range(11))  # the consumer crashed: 0..10 again, 4 now decodable
    admitted = guard.admit(replay, {0: ("E", 0, 11)})
    assert list(admitted.rows) == [4] and admitted.replayed == 10
    assert admitted.duplicates == 0 and admitted.rewind == {}
    guard.cover({0: ("E", 0, 11)}, admitted.expected, admitted.rewind)
    assert guard.holes == {}
    again = guard.admit(replay, {0: ("E", 0, 11)})
    assert list(again.rows) == [] and again.replayed == 11


def test_a_replay_that_reaches_past_what_was_covered_admits_the_hole_and_the_new_rows():
    guard = _with_hole_at_4()
    rows = _apply(guard, _batch(range(14)), {0: ("E", 0, 14)})
    assert rows == [4, 11, 12, 13] and guard.holes == {}


def test_holes_are_per_partition():
    guard = _with_hole_at_4()
    ranges = {0: ("E", 0, 11), 1: ("E", 0, 11)}
    _apply(guard, _batch(range(11), partition=1), {1: ("E", 0, 11)})
    assert guard.holes == {0: {4}}
    # A replay of partition 1 at offset 4 is a replay; partition 0's hole is untouched.
    replay = EventBatch.concat([_batch([4], partition=1), _batch([3, 5])])
    assert _apply(guard, replay, ranges) == [] and guard.holes == {0: {4}}


def test_a_late_release_is_deduped_by_event_id_and_fills_its_hole():
    guard = _with_hole_at_4()
    late = _batch([4])
    assert guard.admit_late(late) == [0] and guard.holes == {}
    assert guard.admit_late(late) == []  # released twice: a duplicate
    # Once applied late, a replay of its offset is a replay.
    assert _apply(guard, _batch(range(11)), {0: ("E", 0, 11)}) == []


def test_a_late_release_applies_each_event_id_once_and_fills_a_duplicates_hole():
    guard = _with_hole_at_4()
    guard.hold({0: [6]})  # the same event sent twice, both records held
    late = EventBatch.concat([_batch([4], event_id="twice"), _batch([6], event_id="twice")])
    assert guard.admit_late(late) == [0]
    assert guard.holes == {}


def test_a_held_event_already_applied_under_its_id_is_a_duplicate_on_replay():
    guard = _with_hole_at_4()
    # The id of the held event reached the shard in another record (offset 20).
    assert _apply(guard, _batch([20], event_id="dup"), {0: ("E", 11, 21)}) == [0]
    admitted = guard.admit(_batch([4], event_id="dup"), {0: ("E", 0, 21)})
    assert list(admitted.rows) == [] and admitted.duplicates == 1


def test_forget_drops_holes_that_were_dead_lettered():
    guard = _with_hole_at_4()
    guard.hold({0: [7], 2: [1]})
    guard.forget({0: [4], 3: [9]})  # a partition with no holes: nothing to drop
    assert guard.holes == {0: {7}, 2: {1}}
    guard.forget({0: [7], 2: [1]})
    assert guard.holes == {}
    # A forgotten offset is never admitted again.
    assert _apply(guard, _batch(range(11)), {0: ("E", 0, 11)}) == []


# --- the shard ------------------------------------------------------------------------

VECTORS = np.eye(4, dtype=np.float32)
ITEMS = ["a", "b", "c", "d"]


def _shard(snapshot_dir: str | None = None) -> UserStateShard:
    config = StreamingSettings(history_len=20, dedupe_window=1000, snapshot_every_s=3600)
    return UserStateShard(0, config, VECTORS, ITEMS, snapshot_dir)


def _first_batch(shard: UserStateShard) -> dict:
    """Offsets 0..10 of partition 0, offset 4 (user u, item d) held back."""
    return shard.apply(_batch([o for o in range(11) if o != 4]), {0: ("E", 0, 11)},
                       held={0: [4]})


def _the_held_event() -> EventBatch:
    return EventBatch.from_rows([_row(4, item="d")])


def test_a_shard_records_what_was_held_as_a_hole():
    shard = _shard()
    result = _first_batch(shard)
    assert result["applied"] == 10 and result["rewind"] == {}
    assert shard.guard.holes == {0: {4}} and shard.covered_offsets() == {0: 11}


def test_a_shard_applies_a_released_event_once():
    shard = _shard()
    _first_batch(shard)
    assert shard.apply_held(_the_held_event(), {}) == {"applied": 1, "duplicates": 0}
    user = shard.get_user("u")
    assert user["history"] == ["a"] * 4 + ["d"] + ["a"] * 6  # placed by its event time
    assert user["state_version"] == 11 and shard.guard.holes == {}
    # Released again (the consumer restarted before it committed): a duplicate.
    assert shard.apply_held(_the_held_event(), {}) == {"applied": 0, "duplicates": 1}
    assert shard.get_user("u")["state_version"] == 11
    assert shard.stats()["applied"] == 11 and shard.stats()["duplicates"] == 1
    # And a replay of the batch, 4 included, applies nothing.
    replay = EventBatch.concat([_batch(range(4)), _the_held_event(), _batch(range(5, 11))])
    assert shard.apply(replay, {0: ("E", 0, 11)})["applied"] == 0


def test_a_shard_forgets_a_hole_whose_event_was_dead_lettered():
    shard = _shard()
    _first_batch(shard)
    assert shard.apply_held(EventBatch(), {0: [4]}) == {"applied": 0, "duplicates": 0}
    assert shard.guard.holes == {}
    replay = EventBatch.concat([_batch(range(4)), _the_held_event(), _batch(range(5, 11))])
    assert shard.apply(replay, {0: ("E", 0, 11)})["applied"] == 0
    assert "d" not in shard.get_user("u")["history"]


def test_after_a_crash_the_replay_applies_the_once_held_event():
    shard = _shard()
    _first_batch(shard)
    replay = EventBatch.concat([_batch(range(4)), _the_held_event(), _batch(range(5, 11))])
    result = shard.apply(replay, {0: ("E", 0, 11)})
    assert (result["applied"], result["replayed"]) == (1, 10)
    assert shard.get_user("u")["history"].count("d") == 1 and shard.guard.holes == {}
    assert shard.apply(replay, {0: ("E", 0, 11)})["applied"] == 0


def test_holes_of_a_partition_sent_back_are_not_recorded():
    shard = _shard()
    shard.apply(_batch(range(3)), {0: ("E", 0, 3)})
    # A gap on partition 0 (it expects 3): rewound, so its held offset is no hole yet.
    result = shard.apply(_batch([5, 6]), {0: ("E", 5, 8), 1: ("E", 0, 2)},
                         held={0: [7], 1: [1]})
    assert result["rewind"] == {0: 3}
    assert shard.guard.holes == {1: {1}}


def test_holes_survive_a_snapshot_and_a_restore(tmp_path):
    shard = _shard(str(tmp_path))
    _first_batch(shard)
    shard.guard.hold({2: [0, 3]})
    assert shard.snapshot() is not None
    restored = _shard(str(tmp_path))
    assert restored.restored_from is not None
    assert restored.guard.holes == {0: {4}, 2: {0, 3}}
    assert restored.covered_offsets() == {0: 11}
    # The restored shard still takes the held event, from a replay or a late release.
    replay = EventBatch.concat([_batch(range(4)), _the_held_event(), _batch(range(5, 11))])
    assert restored.apply(replay, {0: ("E", 0, 11)})["applied"] == 1
    assert restored.guard.holes == {2: {0, 3}}
    assert restored.apply_held(_the_held_event(), {2: [0, 3]})["duplicates"] == 1
    assert restored.guard.holes == {}


def test_a_released_event_waits_for_the_shards_own_catalog_to_have_its_item():
    """The consumer releases an event once its catalog follower has the item; the shard's
    follower may lag a moment: the shard waits for it, so the personal prompt moves by
    the item's vector (a CI run once applied it before, leaving no personal prompt)."""
    import threading

    config = StreamingSettings(history_len=20, dedupe_window=1000, snapshot_every_s=3600)
    shard = UserStateShard(0, config, VECTORS[:3], ITEMS[:3])  # "d" not known yet
    shard.catalogs = object()  # stands in for a follower: the shard follows a catalog
    _first_batch(shard)
    late = threading.Timer(0.3, shard.set_items, (VECTORS, ITEMS))  # the follower catches up
    late.start()
    assert shard.apply_held(_the_held_event(), {})["applied"] == 1
    late.join()
    personal = np.asarray(shard.get_user("u")["personal"])
    assert personal[ITEMS.index("d")] > 0  # moved by d's vector
