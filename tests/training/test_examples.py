import numpy as np
import pyarrow as pa

from services.eventlog import SCHEMA
from training.examples import PAD, Examples, build_examples


def _log(rows):
    cols = {name: [r.get(name) for r in rows] for name in SCHEMA.names}
    return pa.table(cols, schema=SCHEMA)


def _ev(eid, user, item, ts, ingest=100.0):
    return {"event_id": eid, "user_id": user, "item_id": item, "ts": ts, "type": "click",
            "value": None, "ingest_ts": ingest}


INDEX = {"a": 0, "b": 1, "c": 2, "d": 3}


def test_next_item_examples_use_only_the_past():
    log = _log([_ev("3", "u", "c", 3.0), _ev("1", "u", "a", 1.0), _ev("2", "u", "b", 2.0),
                _ev("2", "u", "b", 2.0)])  # a replayed duplicate
    train, val = build_examples(log, INDEX, history_len=2, val_users=0)
    assert len(val) == 0
    assert train.target.tolist() == [1, 2]
    assert train.history.tolist() == [[0, PAD], [0, 1]]


def test_validation_users_hold_out_their_last_event():
    rows = [_ev(f"{u}-{i}", f"user{u}", "abcd"[i], float(i)) for u in range(50) for i in range(4)]
    train, val = build_examples(_log(rows), INDEX, history_len=3, val_users=10)
    assert 0 < len(val) < 50
    assert (val.target == 3).all()  # the last item of a validation user
    assert len(train) + len(val) == 50 * 3


def test_validation_users_hold_out_their_last_val_events_events_and_train_on_none():
    rows = [_ev(f"{u}-{i}", f"user{u}", "abcd"[i], float(i)) for u in range(50) for i in range(4)]
    one, val_one = build_examples(_log(rows), INDEX, history_len=3, val_users=10)
    train, val = build_examples(_log(rows), INDEX, history_len=3, val_users=10, val_events=2)
    held_users = len(val_one)
    assert len(val) == 2 * held_users  # the same users, two events each
    assert sorted(val.target.tolist()) == [2] * held_users + [3] * held_users
    # the item before the held-out pair ends the history of the first of them
    firsts = val.history[val.target == 2]
    assert {tuple(h) for h in firsts.tolist()} == {(0, 1, PAD)}
    # what the gate tests is not trained on: every other user's three targets, one each
    assert len(train) == len(one) - held_users == 50 * 3 - 2 * held_users


def test_window_filters_targets_but_keeps_history():
    rows = [_ev("1", "u", "a", 1.0, ingest=10), _ev("2", "u", "b", 2.0, ingest=10),
            _ev("3", "u", "c", 3.0, ingest=20)]
    train, _ = build_examples(_log(rows), INDEX, history_len=3, since_ingest_ts=15, val_users=0)
    assert train.target.tolist() == [2]
    assert train.history.tolist() == [[0, 1, PAD]]


def test_examples_save_and_load(tmp_path):
    ex = Examples(np.array([[1, PAD]], np.int32), np.array([2], np.int32))
    ex.save(str(tmp_path / "x.npz"))
    back = Examples.load(str(tmp_path / "x.npz"))
    assert back.history.tolist() == [[1, PAD]] and back.target.tolist() == [2]


def test_user_rows_keep_one_row_per_user_ending_at_its_newest_new_event():
    rows = [_ev("1", "u", "a", 1.0, ingest=10), _ev("2", "u", "b", 2.0, ingest=20),
            _ev("3", "u", "c", 3.0, ingest=20), _ev("4", "v", "a", 1.0, ingest=20),
            _ev("5", "v", "d", 2.0, ingest=20), _ev("6", "w", "b", 1.0, ingest=10),
            _ev("7", "w", "c", 2.0, ingest=10)]
    train, _ = build_examples(_log(rows), INDEX, history_len=3, since_ingest_ts=15,
                              val_users=0, rows="users")
    # u: one row ending at c (b before it is learned on the way); v: a -> d; w: nothing new.
    assert train.target.tolist() == [2, 3]
    assert train.history.tolist() == [[0, 1, PAD], [0, PAD, PAD]]


def test_the_prompt_alone_learns_each_users_first_items_once():
    """User u: a b c d; v: d a. With prompt_alone_events 2 the rows of targets at
    positions 1 and 2 teach the prompt alone u's items 0 and 1 (a, b), the row at 3
    nothing; v's one row teaches d. Only the new rows (since the last round) are built,
    and their prompt targets still name the user's first items."""
    rows = [_ev(str(i), "u", item, float(i)) for i, item in enumerate("abcd")]
    rows += [_ev("v0", "v", "d", 0.0), _ev("v1", "v", "a", 1.0)]
    train, _ = build_examples(_log(rows), INDEX, history_len=2, val_users=0,
                              prompt_alone_events=2)
    assert train.target.tolist() == [1, 2, 3, 0]
    assert train.prompt_target.tolist() == [0, 1, PAD, 3]
    assert train.subset(np.array([3, 1])).prompt_target.tolist() == [3, 1]
    assert train.trimmed().prompt_target.tolist() == [0, 1, PAD, 3]
    late = [dict(r, ingest_ts=20.0 if r["event_id"] in ("2", "3") else 10.0) for r in rows]
    newer, _ = build_examples(_log(late), INDEX, history_len=2, since_ingest_ts=15,
                              val_users=0, prompt_alone_events=2)
    assert newer.target.tolist() == [2, 3] and newer.prompt_target.tolist() == [1, PAD]
    default, _ = build_examples(_log(rows), INDEX, history_len=2, val_users=0)
    assert default.prompt_target is None  # 0: the first item of each row's window
    users, _ = build_examples(_log(rows), INDEX, history_len=2, val_users=0, rows="users",
                              prompt_alone_events=2)
    assert users.prompt_target is None  # user rows keep their window's first item


def test_examples_save_and_load_keep_the_prompt_targets(tmp_path):
    ex = Examples(np.array([[1, PAD]], np.int32), np.array([2], np.int32),
                  np.ones((1, 2), np.float32), np.array([PAD], np.int32))
    ex.save(str(tmp_path / "x.npz"))
    back = Examples.load(str(tmp_path / "x.npz"))
    assert back.prompt_target.tolist() == [PAD] and back.weights.shape == (1, 2)


def test_user_text_reads_each_row_s_user_and_target_event():
    """A round's text for a row: its user's profile, and the query its target click
    followed (found by the target's event id)."""
    rows = [_ev("a1", "u", "a", 1.0), _ev("a2", "u", "b", 2.0), _ev("a3", "u", "c", 3.0),
            _ev("b1", "v", "a", 1.0), _ev("b2", "v", "d", 2.0)]
    seen = {}

    def user_text(users, event_ids):
        seen.setdefault("calls", []).append((list(users), list(event_ids)))
        query = np.array([[float(e == "a3")] for e in event_ids], np.float32)
        return np.zeros((len(users), 2), np.int32), query

    train, _ = build_examples(_log(rows), INDEX, history_len=2, val_users=0,
                              user_text=user_text)
    assert seen["calls"][0] == (["u", "u", "v"], ["a2", "a3", "b2"])  # row order
    assert train.target.tolist() == [1, 2, 3] and train.query[:, 0].tolist() == [0, 1, 0]
    newest, _ = build_examples(_log(rows), INDEX, history_len=2, val_users=0, rows="users",
                               user_text=user_text)
    assert seen["calls"][2] == (["u", "v"], ["a3", "b2"])  # a user's row ends at its newest


def _older_and_newer(n_old: int, n_new: int) -> list[dict]:
    """One user per event pair: each user's first event ingested at 10 (before the round's
    window), the second at 20 (in it); the first n_old users only have the old one."""
    rows = [_ev(f"o{u}", f"user{u}", "a", 1.0, ingest=10) for u in range(n_old)]
    rows += [_ev(f"o{u}b", f"user{u}", "b", 2.0, ingest=10) for u in range(n_old)]
    rows += [_ev(f"n{u}", f"user{u}", "c", 3.0, ingest=20) for u in range(n_new)]
    return rows


def test_replay_adds_older_targets_in_proportion_to_the_new_ones():
    log = _log(_older_and_newer(n_old=40, n_new=10))
    new_only, _ = build_examples(log, INDEX, history_len=3, since_ingest_ts=15, val_users=0)
    assert new_only.target.tolist() == [2] * 10
    replayed, _ = build_examples(log, INDEX, history_len=3, since_ingest_ts=15, val_users=0,
                                 replay_share=2.0, seed=1)
    targets = replayed.target.tolist()
    assert targets.count(2) == 10 and targets.count(1) == 20  # 2 older rows per new one
    old_rows = replayed.history[replayed.target == 1]
    assert (old_rows == [0, PAD, PAD]).all()  # each older row reads only its own past
    # capped at every older target, and the draw depends on the seed only
    everything, _ = build_examples(log, INDEX, history_len=3, since_ingest_ts=15,
                                   val_users=0, replay_share=100.0)
    assert everything.target.tolist().count(1) == 40
    again, _ = build_examples(log, INDEX, history_len=3, since_ingest_ts=15, val_users=0,
                              replay_share=0.5, seed=3)
    same, _ = build_examples(log, INDEX, history_len=3, since_ingest_ts=15, val_users=0,
                             replay_share=0.5, seed=3)
    assert (again.history == same.history).all() and len(again) == 15


def test_replay_with_user_rows_takes_the_newest_older_row_of_users_without_new_events():
    rows = [_ev("1", "u", "a", 1.0, ingest=10), _ev("2", "u", "b", 2.0, ingest=10),
            _ev("3", "u", "c", 3.0, ingest=10), _ev("4", "v", "a", 1.0, ingest=20),
            _ev("5", "v", "d", 2.0, ingest=20)]
    train, _ = build_examples(_log(rows), INDEX, history_len=3, since_ingest_ts=15,
                              val_users=0, rows="users", replay_share=1.0)
    # v: its new row a -> d; u has nothing new: its newest row (a, b -> c) is replayed.
    assert sorted(train.target.tolist()) == [2, 3]
    assert train.history[train.target == 2].tolist() == [[0, 1, PAD]]
