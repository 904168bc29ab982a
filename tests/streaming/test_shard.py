from streaming.shard import UserStateShard


def test_apply_is_idempotent_by_event_id():
    shard = UserStateShard(0, history_len=3, dedupe_window=100)
    batch = [("e1", "u1", "a", 1.0, 0), ("e2", "u1", "b", 2.0, 0)]
    assert shard.apply(batch) == {"applied": 2, "duplicates": 0}
    assert shard.apply(batch) == {"applied": 0, "duplicates": 2}
    assert shard.get_user("u1") == {"history": ["a", "b"], "state_version": 2}
    assert shard.get_user("nobody") is None


def test_late_events_are_placed_by_time_and_history_is_bounded():
    shard = UserStateShard(0, history_len=3, dedupe_window=100)
    shard.apply([("e1", "u", "a", 10.0, 0), ("e2", "u", "c", 30.0, 0)])
    shard.apply([("e3", "u", "b", 20.0, 0)])  # arrives late
    assert shard.get_user("u")["history"] == ["a", "b", "c"]
    shard.apply([("e4", "u", "d", 40.0, 0)])
    assert shard.get_user("u")["history"] == ["b", "c", "d"]
    assert shard.get_user("u")["state_version"] == 4


def test_dedupe_window_is_bounded():
    shard = UserStateShard(0, history_len=10, dedupe_window=2)
    shard.apply([("e1", "u", "a", 1.0, 0), ("e2", "u", "b", 2.0, 0), ("e3", "u", "c", 3.0, 0)])
    assert len(shard._seen) == 2
    # e1 fell out of the window, so it would apply again: the documented trade-off.
    assert shard.apply([("e1", "u", "a", 1.0, 0)])["applied"] == 1
    assert shard.stats() == {"shard": 0, "users": 1, "applied": 4, "duplicates": 0}
