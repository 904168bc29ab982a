"""A shard's profiles (no Ray): set and delete in a batch, replays skipped by offset, gaps
refused with a rewind, a profile before any event, snapshots with and without profiles."""

import json

import pyarrow.parquet as pq

from streaming.shard import UserStateShard
from tests.streaming.test_shard import _ev, _shard


def _profile(offset, user, text, attributes=None, partition=0):
    return (partition, offset, user, text, attributes or {})


def test_profiles_are_set_and_deleted_without_touching_state_version():
    shard = _shard()
    shard.apply([_ev(0, "e1", "u1", "a", 1.0)], {0: ("E", 0, 1)})
    result = shard.apply_profiles([_profile(0, "u1", "A hiker.", {"age": "30"}),
                                   _profile(1, "u2", "New here.")], {0: ("P", 0, 2)})
    assert (result["applied"], result["changed"], result["rewind"]) == (2, 2, {})
    u1, u2 = shard.get_user("u1"), shard.get_user("u2")
    assert (u1["profile"], u1["profile_attributes"], u1["state_version"]) == \
        ("A hiker.", {"age": "30"}, 1)
    # A profile before any event makes the user's state, with no history.
    assert (u2["history"], u2["state_version"], u2["profile_version"]) == ([], 0, 1)
    shard.apply_profiles([_profile(2, "u1", None), _profile(3, "ghost", None)],
                         {0: ("P", 2, 4)})
    u1 = shard.get_user("u1")
    assert (u1["profile"], u1["profile_attributes"], u1["profile_version"]) == (None, {}, 2)
    assert u1["history"] == ["a"] and shard.get_user("ghost") is None
    assert shard.dump()["u2"]["profile"] == "New here."


def test_a_replay_is_skipped_and_a_resend_of_the_same_profile_changes_nothing():
    shard = _shard()
    batch = [_profile(0, "u", "one"), _profile(1, "u", "two")]
    shard.apply_profiles(batch, {0: ("P", 0, 2)})
    again = shard.apply_profiles(batch, {0: ("P", 0, 2)})
    assert (again["applied"], again["replayed"]) == (0, 2)
    same = shard.apply_profiles([_profile(2, "u", "two")], {0: ("P", 2, 3)})
    assert (same["applied"], same["changed"]) == (1, 0)
    assert shard.get_user("u")["profile"] == "two"
    assert shard.get_user("u")["profile_version"] == 2


def test_a_gap_in_profile_offsets_is_refused_with_a_rewind():
    shard = _shard()
    shard.apply_profiles([_profile(0, "u", "one")], {0: ("P", 0, 1)})
    result = shard.apply_profiles([_profile(7, "u", "later")], {0: ("P", 7, 8)})
    assert result["rewind"] == {0: 1} and shard.get_user("u")["profile"] == "one"
    # An empty probe at the consumer's position finds the gap too.
    assert shard.apply_profiles([], {0: ("P", 8, 8)})["rewind"] == {0: 1}
    assert shard.apply_profiles([], {0: ("P", 1, 1)})["rewind"] == {}
    # Click offsets and profile offsets are separate.
    assert shard.covered_offsets() == {}
    assert shard.profile_offsets()["covered"] == {0: ["P", 1]}


def test_profiles_and_their_offsets_survive_a_snapshot(tmp_path):
    shard = _shard(str(tmp_path))
    shard.apply([_ev(0, "e1", "u1", "a", 1.0)], {0: ("E", 0, 1)})
    shard.apply_profiles([_profile(0, "u1", "A hiker.", {"age": "30"}),
                          _profile(1, "u2", "New here."), _profile(2, "u2", None),
                          _profile(3, "u3", "Reads maps.")], {0: ("P", 0, 4)})
    shard.snapshot()
    restored = _shard(str(tmp_path))
    assert restored.dump() == shard.dump()
    assert restored.profile_offsets()["covered"] == {0: ["P", 4]}
    assert restored.profile_offsets()["incarnation"] != shard.profile_offsets()["incarnation"]
    assert restored.apply_profiles([], {0: ("P", 4, 4)})["rewind"] == {}


def test_a_snapshot_from_before_profiles_restores_with_none(tmp_path):
    shard = _shard(str(tmp_path))
    shard.apply([_ev(0, "e1", "u1", "a", 1.0)], {0: ("E", 0, 1)})
    written = shard.snapshot()
    table = pq.read_table(f"{written}/state.parquet")
    pq.write_table(table.drop_columns(["profile", "profile_attributes", "profile_version"]),
                   f"{written}/state.parquet")
    meta = json.loads(open(f"{written}/meta.json").read())
    del meta["profile_covered"]
    open(f"{written}/meta.json", "w").write(json.dumps(meta))
    restored: UserStateShard = _shard(str(tmp_path))
    user = restored.get_user("u1")
    assert (user["history"], user["profile"], user["profile_version"]) == (["a"], None, 0)
    assert restored.profile_offsets()["covered"] == {}
