import numpy as np
import pytest

from services.config import StreamingSettings
from services.personal import update
from streaming.shard import UserStateShard

VECTORS = np.eye(4, dtype=np.float32)
ITEMS = ["a", "b", "c", "d"]


def _ev(offset, event_id, user, item, ts, partition=0, kind="click"):
    return (event_id, user, item, ts, kind, None, partition, offset, 0)


def _shard(snapshot_dir: str | None = None, **config):
    """A shard over the small catalog; `config` changes its StreamingSettings."""
    streaming = StreamingSettings(**{"history_len": 3, "dedupe_window": 100, **config})
    return UserStateShard(0, streaming, VECTORS, ITEMS, snapshot_dir)


def test_apply_is_idempotent_by_offset_and_by_event_id():
    shard = _shard()
    batch = [_ev(0, "e1", "u1", "a", 1.0), _ev(1, "e2", "u1", "b", 2.0)]
    assert shard.apply(batch, {0: ("E", 0, 2)})["applied"] == 2
    # The same records again (Kafka redelivery): skipped by offset.
    again = shard.apply(batch, {0: ("E", 0, 2)})
    assert (again["applied"], again["replayed"]) == (0, 2)
    # The same event produced twice (a new record, new offset): skipped by event_id.
    assert shard.apply([_ev(2, "e2", "u1", "b", 2.0)], {0: ("E", 2, 3)})["duplicates"] == 1
    user = shard.get_user("u1")
    assert user["history"] == ["a", "b"] and user["state_version"] == 2
    assert shard.get_user("nobody") is None


def test_a_gap_is_refused_with_a_rewind():
    shard = _shard()
    shard.apply([_ev(0, "e1", "u", "a", 1.0)], {0: ("E", 0, 1)})
    result = shard.apply([_ev(5, "e5", "u", "b", 2.0)], {0: ("E", 5, 6), 1: ("E", 0, 3)})
    assert result["rewind"] == {0: 1} and result["applied"] == 0
    assert shard.covered_offsets() == {0: 1, 1: 3}  # partition 1 moved on, 0 did not
    # A shard that gets no events still records the batch's ranges.
    assert shard.apply([], {0: ("E", 1, 4)}) == {"applied": 0, "duplicates": 0, "replayed": 0,
                                             "rewind": {}}
    assert shard.covered_offsets()[0] == 4


def test_a_new_topic_epoch_starts_offsets_from_zero_again():
    shard = _shard()
    shard.apply([_ev(0, "e1", "u", "a", 1.0)], {0: ("E", 0, 1)})
    assert shard.apply([_ev(0, "n1", "u", "b", 2.0)], {0: ("E", 0, 1)})["replayed"] == 1
    assert shard.apply([_ev(0, "n1", "u", "b", 2.0)], {0: ("F", 0, 1)})["applied"] == 1
    assert shard.covered_offsets() == {0: 1}


def test_late_events_are_placed_by_time_and_history_is_bounded():
    shard = _shard()
    shard.apply([_ev(0, "e1", "u", "a", 10.0), _ev(1, "e2", "u", "c", 30.0)], {0: ("E", 0, 2)})
    shard.apply([_ev(2, "e3", "u", "b", 20.0)], {0: ("E", 2, 3)})  # arrives late
    assert shard.get_user("u")["history"] == ["a", "b", "c"]
    shard.apply([_ev(3, "e4", "u", "d", 40.0)], {0: ("E", 3, 4)})
    assert shard.get_user("u")["history"] == ["b", "c", "d"]
    assert shard.get_user("u")["state_version"] == 4


def test_personal_prompt_follows_the_update_rule():
    shard = _shard(personal_alpha=0.5)
    shard.apply([_ev(0, "e1", "u", "a", 1.0), _ev(1, "e2", "u", "b", 2.0, kind="view")],
                {0: ("E", 0, 2)})
    expected = update(update(None, VECTORS[0], "click", 0.5), VECTORS[1], "view", 0.5)
    assert np.allclose(shard.get_user("u")["personal"], expected)
    assert np.allclose(expected, [0.75, 0.25, 0, 0])  # view weight 0.5 -> rate 0.25


def test_dedupe_window_is_bounded():
    shard = _shard(dedupe_window=2)
    shard.apply([_ev(i, f"e{i}", "u", "a", float(i)) for i in range(3)], {0: ("E", 0, 3)})
    assert len(shard.guard.seen) == 2


def test_snapshot_restores_state_and_offsets(tmp_path):
    shard = _shard(snapshot_dir=str(tmp_path), snapshot_every_s=3600)
    shard.apply([_ev(0, "e1", "u", "a", 1.0), _ev(1, "e2", "v", "b", 2.0)], {0: ("E", 0, 2)})
    shard.snapshot()
    shard.apply([_ev(2, "e3", "u", "c", 3.0)], {0: ("E", 2, 3)})  # after the snapshot: lost
    restored = _shard(snapshot_dir=str(tmp_path))
    assert restored.restored_from is not None
    assert restored.covered_offsets() == {0: 2}
    assert restored.get_user("u")["history"] == ["a"]
    assert np.allclose(restored.get_user("v")["personal"], VECTORS[1])
    # The consumer moved on; the restored shard asks for what it lost.
    assert restored.apply([_ev(3, "e4", "u", "d", 4.0)], {0: ("E", 3, 4)})["rewind"] == {0: 2}
    replay = [_ev(2, "e3", "u", "c", 3.0), _ev(3, "e4", "u", "d", 4.0)]
    assert restored.apply(replay, {0: ("E", 2, 4)})["applied"] == 2
    assert restored.dump() == _replayed_reference()


def _replayed_reference():
    ref = _shard()
    ref.apply([_ev(0, "e1", "u", "a", 1.0), _ev(1, "e2", "v", "b", 2.0),
               _ev(2, "e3", "u", "c", 3.0), _ev(3, "e4", "u", "d", 4.0)], {0: ("E", 0, 4)})
    return ref.dump()


def test_snapshots_are_pruned_and_half_written_ones_ignored(tmp_path):
    shard = _shard(snapshot_dir=str(tmp_path))
    for i in range(4):
        shard.apply([_ev(i, f"e{i}", "u", "a", float(i))], {0: ("E", i, i + 1)})
        shard.snapshot()
    assert len(list((tmp_path / "shard-0").glob("snap-*"))) == 2
    (tmp_path / "shard-0" / "tmp-snap-crashed").mkdir()
    assert _shard(snapshot_dir=str(tmp_path)).covered_offsets() == {0: 4}
    assert not list((tmp_path / "shard-0").glob("tmp-*"))


def test_apply_snapshots_a_copy_in_the_background(tmp_path):
    # snapshot_every_s=0: the first apply starts a background write of the state as it
    # was then; events applied while it writes must not leak into that snapshot.
    shard = _shard(snapshot_dir=str(tmp_path), snapshot_every_s=0.0)
    shard.apply([_ev(0, "e1", "u", "a", 1.0), _ev(1, "e2", "v", "b", 2.0)], {0: ("E", 0, 2)})
    shard.apply([_ev(2, "e3", "u", "c", 3.0)], {0: ("E", 2, 3)})
    shard.snapshots.wait()
    restored = _shard(snapshot_dir=str(tmp_path))
    assert restored.covered_offsets() in ({0: 2}, {0: 3})  # one of the two captures
    reference = _shard()
    reference.apply([_ev(0, "e1", "u", "a", 1.0), _ev(1, "e2", "v", "b", 2.0)],
                    {0: ("E", 0, 2)})
    if restored.covered_offsets() == {0: 3}:
        reference.apply([_ev(2, "e3", "u", "c", 3.0)], {0: ("E", 2, 3)})
    assert restored.dump() == reference.dump()
    assert restored.apply([_ev(1, "e2", "v", "b", 2.0)], {0: ("E", 1, 2)})["applied"] == 0


def test_snapshot_keeps_users_without_a_personal_prompt(tmp_path):
    shard = _shard(snapshot_dir=str(tmp_path), snapshot_every_s=3600)
    shard.apply([_ev(0, "e1", "u", "a", 1.0), _ev(1, "e2", "w", "zz-unknown", 2.0)],
                {0: ("E", 0, 2)})
    shard.snapshot()
    restored = _shard(snapshot_dir=str(tmp_path))
    assert restored.get_user("w")["personal"] is None
    assert np.allclose(restored.get_user("u")["personal"], VECTORS[0])
    assert restored.dump() == shard.dump()


def test_a_shard_told_to_follow_the_catalog_refuses_to_start_without_a_registry():
    with pytest.raises(RuntimeError, match="no catalog registry runs in namespace 'nowhere'"):
        UserStateShard(0, StreamingSettings(), namespace="nowhere", follow_catalog=True)
