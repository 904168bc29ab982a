"""The prequential protocol without infrastructure: windows, sampling, metrics, popularity,
and the no-leak property on a hand-made stream whose right answer is known."""

import json
import math

import pytest

from bench.prequential import Answer, PopularityArm, SampleRule, run_windows
from bench.prequential_report import build_result, markdown_table, plot, smoothed_hr
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
    arms = [pop, LastItemArm(system)]
    result = run_windows(events, arms, lambda b: (system.learn(b), pop.learn(b)), window,
                         SampleRule(every=1, warmup=0.0))
    for name in ("popularity", "last_item"):
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
