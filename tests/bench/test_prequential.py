"""The prequential protocol without infrastructure: windows, sampling, metrics, popularity
(all-time and recent), and the no-leak property on a hand-made stream whose right answer is
known."""

import json
import math
import random
from collections import Counter

import pytest

from bench.prequential import (
    ALL_ARMS,
    DEFAULT_ARMS,
    MODEL_ARMS,
    Answer,
    PopularityArm,
    RecentPopularityArm,
    SampleRule,
    check_arms,
    run_windows,
)
from bench.prequential_report import block_wins, build_result, markdown_table, plot, smoothed_hr
from services.events import ClickEvent
from services.rank_metrics import hit_ndcg


def _event(k: int, user: str, item: str) -> ClickEvent:
    return ClickEvent(f"e{k}", user, item, float(k), "click")


def test_hit_and_ndcg_at_10():
    ranked = [f"i{r}" for r in range(12)]
    assert hit_ndcg(ranked, "i0") == (1.0, 1.0)
    assert hit_ndcg(ranked, "i2") == (1.0, 1 / math.log2(4))
    assert hit_ndcg(ranked, "i10") == (0.0, 0.0)  # rank 11: outside the top 10
    assert hit_ndcg([], "i0") == (0.0, 0.0)


def test_sample_rule_skips_the_warm_up_then_takes_every_nth():
    rule = SampleRule(every=3, warmup=0.2)
    assert [p for p in range(20) if rule(p, 20)] == [4, 7, 10, 13, 16, 19]
    assert [p for p in range(5) if SampleRule(1, 0.0)(p, 5)] == [0, 1, 2, 3, 4]
    assert "1 event in 3" in rule.describe() and "20%" in rule.describe()


def test_popularity_counts_breaks_ties_by_catalog_order_and_masks_like_serving():
    pop = PopularityArm(["a", "b", "c", "d", "e"], history_len=2)
    assert pop.recommend(["u"], 3)["u"] == Answer(["a", "b", "c"], 0)  # all zero: catalog order
    pop.learn([_event(1, "v", "c"), _event(2, "w", "c"), _event(3, "w", "d"),
               _event(4, "u", "b"), _event(5, "u", "c"), _event(6, "u", "e")])
    # counts c=3, b=d=e=1; u keeps its last 2 items (c, e) masked, like the shard's history
    assert pop.recommend(["u"], 3)["u"] == Answer(["b", "d", "a"], 3)
    assert pop.recommend(["new"], 2)["new"] == Answer(["c", "b"], 0)
    pop.learn([_event(7, "x", "unknown-item")])  # dead-lettered by the pipeline: not counted
    assert pop.learned["x"] == 0 and int(pop.popularity.counts.sum()) == 6


def test_recent_popularity_forgets_what_left_the_window():
    """`a` was popular long ago, `b` recently: over the last 4 events b leads, while the
    all-time counts still put a first. The window spans batch boundaries."""
    catalog = ["a", "b", "c", "d", "e"]
    recent = RecentPopularityArm(catalog, history_len=1, recent_window=4)
    every = PopularityArm(catalog, history_len=1)
    batches = [[_event(1, "v", "a"), _event(2, "w", "a"), _event(3, "x", "a")],
               [_event(4, "y", "b"), _event(5, "z", "b")], [_event(6, "v", "c")]]
    recent.learn(batches[0])
    every.learn(batches[0])
    assert recent.recommend(["new"], 3)["new"] == every.recommend(["new"], 3)["new"] \
        == Answer(["a", "b", "c"], 0)  # the window is not full yet: the same counts
    for batch in batches[1:]:
        recent.learn(batch)
        every.learn(batch)
    # window = the last 4 events: a (event 3), b, b, c -> b=2, a=c=1 (a before c: catalog)
    assert recent.popularity.counts.tolist() == [1, 2, 1, 0, 0]
    assert list(recent.window) == [0, 1, 1, 2]
    assert recent.recommend(["new"], 3)["new"] == Answer(["b", "a", "c"], 0)
    assert every.recommend(["new"], 3)["new"] == Answer(["a", "b", "c"], 0)  # a=3, b=2, c=1
    recent.learn([_event(7, "w", "d"), _event(8, "x", "d"), _event(9, "y", "d")])
    # window: c, d, d, d -> a and the b's are forgotten
    assert recent.recommend(["new"], 3)["new"] == Answer(["d", "c", "a"], 0)


def test_recent_popularity_counts_stay_exact_on_a_long_random_stream():
    """Against a brute-force count of the last W known events, after every batch: counts,
    the full ranking (ties in catalog order) and a masked top-k."""
    rng = random.Random(7)
    catalog = [f"i{j}" for j in range(20)]
    window, history_len = 37, 3
    recent = RecentPopularityArm(catalog, history_len, recent_window=window)
    known: list[tuple[str, str]] = []  # (user, item) of every event the arm can count
    k = 0
    for _ in range(120):
        batch = []
        for _ in range(rng.randint(1, 25)):
            k += 1
            # skewed item choice (so counts differ) and a few items outside the catalog
            item = "unknown" if rng.random() < 0.05 else catalog[min(rng.randint(0, 19),
                                                                      rng.randint(0, 19))]
            batch.append(_event(k, f"u{rng.randint(0, 9)}", item))
            if item != "unknown":
                known.append((batch[-1].user_id, item))
        recent.learn(batch)
        counts = Counter(item for _, item in known[-window:])
        assert recent.popularity.counts.tolist() == [counts[i] for i in catalog]
        expected = sorted(catalog, key=lambda i: (-counts[i], catalog.index(i)))
        assert recent.ranked() == expected
        user = f"u{rng.randint(0, 9)}"
        masked = {item for u, item in [e for e in known if e[0] == user][-history_len:]}
        assert recent.recommend([user], 5)[user] == Answer(
            [i for i in expected if i not in masked][:5], sum(u == user for u, _ in known))
    assert k > 1000 and len(recent.window) == window


def test_recent_popularity_masks_exactly_the_users_last_history_len_items():
    catalog = ["a", "b", "c", "d", "e", "f"]
    recent = RecentPopularityArm(catalog, history_len=2, recent_window=3)
    recent.learn([_event(1, "u", "a"), _event(2, "v", "b"), _event(3, "u", "c"),
                  _event(4, "w", "c"), _event(5, "u", "d")])
    # window: c, c, d -> c=2, d=1; ranked c, d, a, b, e, f. u's last 2 items c, d are
    # masked; its older a is not (it fell out of the history, as on a shard).
    assert recent.recommend(["u"], 3)["u"] == Answer(["a", "b", "e"], 3)
    assert recent.recommend(["new"], 3)["new"] == Answer(["c", "d", "a"], 0)
    # the history is by event time, not learning order: a late event older than u's last
    # two does not displace them (f is counted: window c, d, f -> ranked c, d, f, a, ...)
    recent.learn([_event(0, "u", "f")])
    assert recent.recommend(["u"], 3)["u"] == Answer(["f", "a", "b"], 4)


def test_recent_popularity_breaks_ties_by_catalog_order_not_learning_order():
    catalog = ["a", "b", "c", "d"]
    recent = RecentPopularityArm(catalog, history_len=1, recent_window=10)
    assert recent.recommend(["u"], 4)["u"] == Answer(["a", "b", "c", "d"], 0)  # all zero
    recent.learn([_event(1, "x", "d"), _event(2, "y", "c"), _event(3, "z", "b")])
    assert recent.recommend(["u"], 4)["u"] == Answer(["b", "c", "d", "a"], 0)


def test_recent_popularity_with_a_window_longer_than_the_stream_is_popularity():
    rng = random.Random(3)
    catalog = [f"i{j}" for j in range(8)]
    recent = RecentPopularityArm(catalog, history_len=2, recent_window=500)
    every = PopularityArm(catalog, history_len=2)
    events = [_event(k, f"u{rng.randint(0, 4)}", rng.choice(catalog)) for k in range(300)]
    for start in range(0, 300, 50):
        recent.learn(events[start:start + 50])
        every.learn(events[start:start + 50])
        users = [f"u{j}" for j in range(6)]
        assert recent.recommend(users, 4) == every.recommend(users, 4)


def test_recent_popularity_needs_a_window_of_at_least_one_event():
    with pytest.raises(ValueError, match="recent_window"):
        RecentPopularityArm(["a"], history_len=1, recent_window=0)
    one = RecentPopularityArm(["a", "b"], history_len=0, recent_window=1)
    one.learn([_event(1, "u", "a"), _event(2, "u", "b")])
    assert one.popularity.counts.tolist() == [0, 1]


def test_the_default_run_has_the_recent_popularity_arm():
    assert "recent_popularity" in ALL_ARMS and "recent_popularity" in DEFAULT_ARMS
    assert DEFAULT_ARMS[:2] == ("popularity", "recent_popularity")


class RememberingSystem:
    """A stand-in for the pipeline: per-user history of everything learned."""

    def __init__(self):
        self.history: dict[str, list[str]] = {}

    def learn(self, batch):
        for e in batch:
            self.history.setdefault(e.user_id, []).append(e.item_id)


class LastItemArm:
    """Recommends the user's latest item, unmasked (a repeat-consumption recommender): it
    hits an event exactly when the event itself is already in the state it answers from."""

    name = "last_item"

    def __init__(self, system: RememberingSystem):
        self.system = system

    def recommend(self, users, k):
        return {u: Answer(self.system.history.get(u, [])[-1:], len(self.system.history.get(u, [])))
                for u in users}


def _hand_made_stream():
    """Users a, b, c in turn; every event's item is new: nothing before an event can know
    its item, so the right HR@10 of every arm is 0. The catalog puts 10 never-used items
    first so that popularity's ties (count 0) cannot rank a new item by luck."""
    events = [_event(k, "abc"[k % 3], f"x{k}") for k in range(30)]
    catalog = [f"filler{j}" for j in range(10)] + [f"x{k}" for k in range(30)]
    return events, catalog


@pytest.mark.parametrize("window", [1, 3, 7])
def test_test_then_learn_never_sees_the_event_it_predicts(window):
    events, catalog = _hand_made_stream()
    system, pop = RememberingSystem(), PopularityArm(catalog, history_len=30)
    recent = RecentPopularityArm(catalog, history_len=30, recent_window=5)
    arms = [pop, recent, LastItemArm(system)]
    result = run_windows(events, arms,
                         lambda b: (system.learn(b), pop.learn(b), recent.learn(b)), window,
                         SampleRule(every=1, warmup=0.0))
    for name in ("popularity", "recent_popularity", "last_item"):
        assert result.totals[name].n == 30
        assert result.totals[name].hits == 0  # the known right answer
        assert result.leaks[name].ahead == 0
    # window 1: state is exactly the past (no staleness); larger windows: a user's second
    # event in a window is answered from the state at the window's start, never later.
    assert result.leaks["last_item"].behind == 0


def test_the_wrong_order_learn_then_test_is_caught():
    """The same stream with learn-first: the state includes the predicted event. The leak
    check flags every answer, and the unmasked arm 'predicts' every item it was just told."""
    events, catalog = _hand_made_stream()
    system, pop = RememberingSystem(), PopularityArm(catalog, history_len=30)
    arms = [pop, LastItemArm(system)]
    result = run_windows(events, arms, lambda b: (system.learn(b), pop.learn(b)), 3,
                         SampleRule(every=1, warmup=0.0), learn_first=True)
    assert result.totals["last_item"].hits == 30
    assert result.leaks["last_item"].ahead == result.leaks["last_item"].answers == 30
    assert result.leaks["popularity"].ahead == 30


def test_windows_report_per_arm_series_and_timestamps():
    events = [_event(k, f"u{k % 4}", f"x{k % 5}") for k in range(25)]
    pop = PopularityArm([f"x{j}" for j in range(5)], history_len=1)
    seen = []
    result = run_windows(events, [pop], pop.learn, 10, SampleRule(every=2, warmup=0.2),
                         on_window=seen.append)
    assert [w["events"] for w in result.windows] == [10, 10, 5]
    assert [w["evaluated"] for w in result.windows] == [3, 5, 2]  # positions 5, 7, ..., 23
    assert result.windows[1]["ts_start"] == 10.0 and result.windows[1]["ts_end"] == 19.0
    assert seen == result.windows
    assert sum(w["arms"]["popularity"]["events_evaluated"] for w in result.windows) == 10
    assert result.totals["popularity"].n == 10
    assert result.leaks["popularity"].ahead == 0


def test_sampled_events_are_split_by_whether_their_user_was_known_before_the_window():
    """Windows of 2: user u's events 0 and 1 fall in window 0 (u unknown to every arm),
    event 2 in window 1 (u known). v's first event (3) is new, its second (4) returning.
    The unmasked last-item arm hits u's and v's repeats only where it knows the user."""
    events = [_event(0, "u", "a"), _event(1, "u", "a"), _event(2, "u", "a"),
              _event(3, "v", "b"), _event(4, "v", "b"), _event(5, "w", "c")]
    system = RememberingSystem()
    evaluation = run_windows(events, [LastItemArm(system)], system.learn, 2, SampleRule(1, 0.0))
    segments = evaluation.segments["last_item"]
    assert segments["new_users"].n == 4  # events 0, 1, 3, 5
    assert segments["returning_users"].n == 2  # events 2 and 4
    assert segments["new_users"].hits == 0 and segments["returning_users"].hits == 2
    result = build_result(evaluation, rounds=[])
    assert result["segments"]["last_item"]["returning_users"]["hr10"] == 1.0
    assert sum(s["events_evaluated"] for s in result["segments"]["last_item"].values()) == \
        result["arms"]["last_item"]["events_evaluated"]


def test_result_table_and_plot(tmp_path):
    events, catalog = _hand_made_stream()
    system, pop = RememberingSystem(), PopularityArm(catalog, history_len=30)
    evaluation = run_windows(events, [pop, LastItemArm(system)],
                             lambda b: (system.learn(b), pop.learn(b)), 5, SampleRule(1, 0.0))
    result = build_result(evaluation, dataset="hand-made", events_replayed=30, window_events=5,
                          sample={"rule": SampleRule(1, 0.0).describe(), "every": 1},
                          rounds=[{"after_events": 10, "outcome": "published"}])
    assert set(result["arms"]["popularity"]) == {"hr10", "ndcg10", "events_evaluated"}
    assert json.loads(json.dumps(result)) == result
    table = markdown_table(result)
    assert "| popularity | 0.0 | 0.0 | 30 |" in table and "| last_item |" in table
    png = plot(result, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    windows = [{"arms": {"a": {"hr10": h, "events_evaluated": n}}}
               for h, n in [(1.0, 1), (0.0, 3), (0.5, 4)]]
    assert smoothed_hr(windows, "a", 2) == [1.0, 0.25, 2 / 7]


def test_the_cli_takes_the_prequential_options():
    from services.launch.cli import _parser

    args = _parser().parse_args(["eval", "prequential", "--dataset", "ml-100k", "--window",
                                 "500", "--sample-every", "5", "--arms",
                                 "popularity,static,online,rounds_only", "--pin-version", "0"])
    assert (args.eval_kind, args.window, args.sample_every) == ("prequential", 500, 5)
    assert args.warmup == 0.1 and args.arms.endswith("rounds_only")
    assert args.recent_window == 5000  # the default
    assert _parser().parse_args(["eval", "prequential", "--recent-window", "200"]).recent_window \
        == 200


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_recent_window_below_one_event_exits_2(value, capsys):
    from services.launch.cli import main

    assert main(["eval", "prequential", "--recent-window", value]) == 2
    assert f"--recent-window must be >= 1 (events), not {value}" in capsys.readouterr().err


@pytest.mark.parametrize(("arms", "user_text", "named"), [
    ("popularity,nonsense", False, "unknown arms ['nonsense']"),
    (",", False, "unknown arms []"),
    ("popularity,no_profiles", False, "need a run whose versions read them (--user-text)"),
])
def test_arms_that_do_not_exist_or_cannot_run_exit_2_naming_them(arms, user_text, named,
                                                                    capsys):
    from services.launch.cli import main

    flags = ["--user-text"] if user_text else []
    assert main(["eval", "prequential", "--arms", arms, *flags]) == 2
    assert named in capsys.readouterr().err


def test_the_no_profiles_arm_runs_with_user_text_only():
    check_arms(["popularity", "online", "no_profiles"], user_text=True)
    with pytest.raises(ValueError, match="no_profiles"):
        check_arms(["online", "no_profiles"], user_text=False)
    assert MODEL_ARMS["no_profiles"] == {"profiles": False}  # the main app's versions


class ProfileArm:
    """Answers from nothing, reading the profile of the users in `described`."""

    name = "profiled"

    def __init__(self, described: set[str], system: RememberingSystem):
        self.described, self.system = described, system

    def recommend(self, users, k):
        return {u: Answer([], len(self.system.history.get(u, [])), read_profile=u in self.described)
                for u in users}


def test_answers_that_read_a_profile_are_counted_per_arm():
    """One count per (user, window) answer: u is asked in windows 0 and 1, v in window 1."""
    events = [_event(0, "u", "a"), _event(1, "u", "b"), _event(2, "u", "c"),
              _event(3, "v", "d")]
    system = RememberingSystem()
    arms = [ProfileArm({"u", "v"}, system), LastItemArm(system)]
    result = build_result(run_windows(events, arms, system.learn, 2, SampleRule(1, 0.0)),
                          rounds=[])
    assert result["profile_reads"] == {"profiled": 3, "last_item": 0}


def _window(first: int, evaluated: int, online: float, pop: float) -> dict:
    arms = {"online": {"hr10": online, "events_evaluated": evaluated},
            "popularity": {"hr10": pop, "events_evaluated": evaluated}}
    return {"first_event": first, "events": 100, "evaluated": evaluated, "arms": arms}


def test_blocks_start_at_the_first_published_round_and_hold_enough_sampled_events():
    windows = [_window(0, 600, 0.0, 0.9),  # before the first round: never counted
               _window(100, 600, 0.2, 0.1), _window(200, 600, 0.0, 0.1),  # one block
               _window(300, 1000, 0.1, 0.1),  # a tie is no win
               _window(400, 700, 0.5, 0.0), _window(500, 300, 0.5, 0.0),  # a win
               _window(600, 999, 0.9, 0.0)]  # a rest below the minimum: left out
    rounds = [{"after_events": 50, "outcome": "rejected"},
              {"after_events": 100, "outcome": "published"}]
    blocks = block_wins(windows, rounds, min_events=1000)
    assert blocks["from_event"] == 100 and blocks["count"] == 3
    assert [b["events_evaluated"] for b in blocks["series"]] == [1200, 1000, 1000]
    assert blocks["series"][0]["hr10"] == {"online": 0.1, "popularity": 0.1}
    assert blocks["series"][0]["end_event"] == 300
    assert blocks["wins"] == {"online": {"popularity": 1}}
    assert block_wins(windows, rounds[:1])["count"] == 0  # nothing published: no blocks
