"""Experiments: the arms a request may ask for, the sticky split, the intervals, and the
registry that runs one at a time, keeps them across a restart and wakes the replicas."""

import asyncio
import math

import pytest
import torch

from services.canary import arm_of
from services.experiments import (
    Arm,
    BadExperiment,
    ExperimentRunning,
    UnknownExperiment,
    arm_for,
    mean_interval,
    parse_arms,
    report,
    wilson,
)
from services.registry import PromptRegistry
from services.weights import PromptWeights

KEPT = {1, 2, 3}


def two(a="a", va=1, sa=0.5, b="b", vb="popularity", sb=0.5):
    return [{"name": a, "version": va, "share": sa}, {"name": b, "version": vb, "share": sb}]


def test_arms_parse_and_every_class_of_bad_request_is_refused_with_a_reason():
    arms = parse_arms(two(), KEPT)
    assert arms == (Arm("a", 1, 0.5), Arm("b", 0, 0.5)) and arms[1].popularity
    assert [a.to_dict()["version"] for a in arms] == [1, "popularity"]
    bad = {
        "not a list": ({"a": 1}, "list of 2"),
        "one arm": (two()[:1], "list of 2"),
        "nine arms": ([{"name": f"a{i}", "version": 1, "share": 1 / 9} for i in range(9)],
                      "list of 2"),
        "not an object": (["a", "b"], "object"),
        "extra key": ([{**two()[0], "x": 1}, two()[1]], "object"),
        "bad name": (two(a="A B"), "name"),
        "reserved name": (two(a="canary"), "name"),
        "name not text": (two(a=7), "name"),
        "same names": (two(b="a"), "differ"),
        "unknown version": (two(va=9), "kept prompt version"),
        "version as text": (two(va="1"), "kept prompt version"),
        "version a bool": (two(va=True), "kept prompt version"),
        "share zero": (two(sa=0, sb=1), "share"),
        "share nan": (two(sa=float("nan")), "share"),
        "share text": (two(sa="0.5"), "share"),
        "shares below 1": (two(sa=0.3, sb=0.3), "add up to 1"),
    }
    for case, (raw, reason) in bad.items():
        with pytest.raises(BadExperiment, match=reason):
            parse_arms(raw, KEPT)
        assert case  # each case on its own: a refusal per class of input


def test_the_split_is_sticky_follows_the_shares_and_is_drawn_anew_per_experiment():
    arms = (Arm("a", 1, 0.2), Arm("b", 2, 0.3), Arm("c", 0, 0.5))
    users = [f"user-{i}" for i in range(20_000)]
    first = [arm_for("exp1", u, arms).name for u in users]
    assert first == [arm_for("exp1", u, arms).name for u in users]  # sticky
    for arm in arms:
        assert abs(first.count(arm.name) / len(users) - arm.share) < 0.015, arm
    # Another experiment draws its own split, independent of this one and of the canary.
    second = [arm_for("exp2", u, arms).name for u in users]
    both_a = sum(x == y == "a" for x, y in zip(first, second, strict=True)) / len(users)
    assert abs(both_a - 0.2 * 0.2) < 0.01
    canary_and_a = sum(f == "a" and arm_of(u, 0.2) == "canary"
                       for u, f in zip(users, first, strict=True)) / len(users)
    assert abs(canary_and_a - 0.2 * 0.2) < 0.01


def test_intervals_contain_the_estimate_and_shrink_with_evidence():
    assert wilson(0, 0) is None and mean_interval(0.0, 0.0, 1) is None
    low, high = wilson(30, 100)
    assert low < 0.3 < high and (low, high) == pytest.approx((0.2189, 0.3958), abs=1e-4)
    assert wilson(0, 50)[0] == 0.0 and wilson(50, 50)[1] == 1.0
    wide, narrow = wilson(30, 100), wilson(300, 1000)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    gains = [1.0, 0.5, 0.0, 0.0, 1 / math.log2(3)] * 40
    low, high = mean_interval(sum(gains), sum(g * g for g in gains), len(gains))
    mean = sum(gains) / len(gains)
    assert low < mean < high and high - low < 0.2


def test_the_report_gives_every_arm_its_figures_even_with_no_events():
    experiment = {"id": "exp1", "arms": [a.to_dict() for a in parse_arms(two(), KEPT)]}
    figures = report(experiment, {"a": {"events": 100, "hits": 30, "ndcg": 15.0,
                                        "ndcg_sq": 10.0}})
    a, b = figures["arms"]
    assert (a["events"], a["hr"], a["ndcg"]) == (100, 0.3, 0.15)
    assert a["hr_ci"][0] < 0.3 < a["hr_ci"][1] and a["ndcg_ci"][0] < 0.15 < a["ndcg_ci"][1]
    assert (b["events"], b["hr"], b["hr_ci"], b["ndcg_ci"]) == (0, None, None, None)
    assert report(experiment, None)["live_metrics"] is False


def _blob(fill: float) -> bytes:
    return PromptWeights.plain(torch.full((2, 8), fill), torch.tensor(1.0)).to_bytes()


def test_the_registry_runs_one_experiment_at_a_time_and_keeps_them(tmp_path):
    async def scenario():
        reg = PromptRegistry(str(tmp_path), hidden_size=8)
        for fill in (1.0, 2.0):
            await reg.publish(_blob(fill))
        await reg.publish(_blob(3.0), canary_share=0.5)  # a canary runs
        waiter = asyncio.create_task(reg.wait_for_routing([2, 3, ""], 30))
        await asyncio.sleep(0)
        started = await reg.start_experiment(two(va=1, vb=2))
        assert started["id"] == "exp1" and started["running"]
        woken = await asyncio.wait_for(waiter, 5)  # replicas hear of it at once
        assert woken["experiment"]["id"] == "exp1"
        assert set(woken["experiment"]["entries"]) == {1, 2}
        assert woken["experiment"]["entries"][1]["blob"] == _blob(1.0)
        routing = await reg.routing()
        assert routing["canary"] == 0
        assert routing["canary_outcomes"][-1]["outcome"] == "superseded"
        with pytest.raises(ExperimentRunning):
            await reg.start_experiment(two())
        # While it runs, a round's publish serves after it, with no canary.
        assert await reg.publish(_blob(4.0), canary_share=0.5) == 4
        routing = await reg.routing()
        assert (routing["serving"], routing["canary"]) == (4, 0)
        assert routing["experiment"]["id"] == "exp1"
        with pytest.raises(UnknownExperiment):
            await reg.stop_experiment("exp9")
        stopped = await reg.stop_experiment("exp1", "done")
        assert not stopped["running"] and stopped["reason"] == "done"
        assert (await reg.stop_experiment("exp1"))["stopped"] == stopped["stopped"]  # idempotent
        assert (await reg.wait_for_routing([4, 0, "exp1"], 0))["experiment"] is None
        await reg.start_experiment(two(va=4))
    asyncio.run(scenario())

    async def restarted():
        reg = PromptRegistry(str(tmp_path), hidden_size=8)
        assert [e["id"] for e in await reg.experiments()] == ["exp1", "exp2"]
        assert (await reg.routing())["experiment"]["id"] == "exp2"  # still running
        assert (await reg.experiment("exp1"))["reason"] == "done"
    asyncio.run(restarted())
