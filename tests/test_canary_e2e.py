"""The canary on the real stack: a bad version is rolled back and a good one promoted by
what simulated users do (bench/canary_sim.py: a held-out ground truth; the bad version
has its item biases shuffled, so it passes every check a publish makes), with no manual
call; and an experiment splits users between a version and the popularity arm until it
is stopped."""

from __future__ import annotations

import math

import httpx
import pytest
import ray
from kafka import KafkaProducer

from bench.canary_sim import equivalent, population, simulate_until, versions
from services.config_sources import load_settings
from services.embedded import free_port
from services.health import wait_until
from services.launch.stack import Stack
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.slow
TOKEN = "canary-test-token"


@pytest.fixture(scope="module")
def canary_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canary")
    settings = load_settings(env={}, overrides={
        "data_dir": str(tmp / "promptrec"), "http_port": free_port(),
        "metrics_port": free_port(), "partitions": 2, "num_consumers": 1, "num_shards": 1,
        "num_replicas": 1, "train_every_events": 0, "namespace": "promptrec-canary",
        "cache_dir": str(TEST_CACHE), "canary_share": 0.5, "canary_min_events": 100,
        "canary_max_events": 3000, "canary_margin": 0.1, "replica_cpus": 0.5,
        "admin_token": TOKEN})
    stack = Stack(settings, progress=False).start(fresh=True)
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5)
    try:
        yield stack, producer
    finally:
        producer.close()
        stack.stop()


def _live(stack) -> dict:
    return httpx.get(f"{stack.base_url}/version", timeout=30).json()["live"]


def _routing(stack) -> dict:
    return ray.get(stack.registry.routing.remote())


def test_a_bad_version_is_rolled_back_and_a_good_one_promoted(canary_stack):
    stack, producer = canary_stack
    good, bad = versions(stack)
    incumbent = ray.get(stack.registry.publish.remote(good.to_bytes(), {"source": "test"}))
    stack.wait_all_replicas(incumbent)

    # The bad version becomes the canary for half of the users, then is judged.
    bad_version = ray.get(stack.registry.publish.remote(bad.to_bytes(), {"source": "test"},
                                                        stack.settings.live.canary_share))
    wait_until(lambda: _routing(stack)["canary"] == bad_version, 30, "bad canary running")
    users = population(stack.catalog.item_ids, seed=1)
    arms = simulate_until(stack, producer, users,
                          lambda: _routing(stack)["canary"] != bad_version, 600,
                          lambda: _live(stack))
    routing = _routing(stack)
    assert routing["serving"] == incumbent, routing  # never promoted
    outcome = routing["canary_outcomes"][-1]
    assert (outcome["version"], outcome["outcome"]) == (bad_version, "rollback"), outcome
    assert arms["canary"] > 0 and arms["serving"] > 0
    # Sticky and split as configured: roughly half the answers from each arm.
    assert 0.3 < arms["canary"] / sum(arms.values()) < 0.7, arms
    live = wait_until(lambda: (v := _live(stack)) and v["verdicts"] and v, 30, "verdict")
    verdict = live["verdicts"][-1]
    assert verdict["outcome"] == "rollback"
    assert verdict["canary"]["hr"] < verdict["serving"]["hr"], verdict
    assert verdict["canary"]["events"] >= stack.settings.live.canary_min_events
    # Everyone is back on the serving version.
    wait_until(lambda: httpx.get(f"{stack.base_url}/version", timeout=30).json()["canary"]
               ["prompt_version"] == 0, 30, "replica drops the canary")
    arms_after = {httpx.get(f"{stack.base_url}/recommend", params={"user_id": u, "k": 5},
                            timeout=30).json()["arm"] for u in list(users)[:40]}
    assert arms_after == {"serving"}

    # An equivalent version (the soft prompt barely moved) proves itself and is promoted.
    same = equivalent(good, seed=1)
    good_version = ray.get(stack.registry.publish.remote(same.to_bytes(), {"source": "test"},
                                                         stack.settings.live.canary_share))
    wait_until(lambda: _routing(stack)["canary"] == good_version, 30, "good canary running")
    simulate_until(stack, producer, population(stack.catalog.item_ids, seed=2),
                   lambda: _routing(stack)["canary"] != good_version, 600, lambda: _live(stack))
    routing = _routing(stack)
    assert routing["serving"] == good_version, routing
    assert routing["canary_outcomes"][-1]["outcome"] == "promote"
    stack.wait_all_replicas(good_version)


def _version_arm_report(http, experiment_id):
    return http.get(f"/admin/experiments/{experiment_id}").json()


def test_an_experiment_splits_users_reports_each_arm_and_stops(canary_stack):
    stack, producer = canary_stack
    serving = _routing(stack)["serving"]
    arms = [{"name": "model", "version": serving, "share": 0.5},
            {"name": "pop", "version": "popularity", "share": 0.5}]
    with httpx.Client(base_url=stack.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        refused = {
            "no token": httpx.post(f"{stack.base_url}/admin/experiments", json={"arms": arms},
                                   timeout=30).status_code,
            "not json": http.post("/admin/experiments", content=b"{arms").status_code,
            "deep json": http.post("/admin/experiments", content=b"[" * 100_000).status_code,
            "no arms": http.post("/admin/experiments", json={"arms": []}).status_code,
            "unknown version": http.post("/admin/experiments", json={"arms": [
                {**arms[0], "version": 999}, arms[1]]}).status_code,
            "unknown id": http.get("/admin/experiments/exp999").status_code,
        }
        assert refused == {"no token": 401, "not json": 400, "deep json": 400, "no arms": 400,
                           "unknown version": 400, "unknown id": 404}, refused
        started = http.post("/admin/experiments", json={"arms": arms})
        assert started.status_code == 200, started.text
        experiment_id = started.json()["id"]
        assert http.post("/admin/experiments", json={"arms": arms}).status_code == 409
        wait_until(lambda: http.get("/version").json()["experiment"] == experiment_id, 30,
                   "replica routes by the experiment")

        def enough() -> bool:
            report = _version_arm_report(http, experiment_id)
            return all(arm["events"] >= 60 for arm in report["arms"])
        served = simulate_until(stack, producer, population(stack.catalog.item_ids, seed=3),
                                enough, 600, lambda: _version_arm_report(http, experiment_id))
        assert set(served) == {"model", "pop"}, served
        assert 0.3 < served["pop"] / sum(served.values()) < 0.7, served
        for user in ("sim-3-1", "sim-3-2", "sim-3-3", "sim-3-4", "sim-3-5", "sim-3-6"):
            body = http.get("/recommend", params={"user_id": user, "k": 5}).json()
            assert body["experiment"] == experiment_id and body["arm"] in ("model", "pop")
            if body["arm"] == "pop":  # ranked by click counts: log(1 + n), n whole
                assert body["prompt_version"] == 0
                counts = [math.expm1(item["score"]) for item in body["items"]]
                assert counts == sorted(counts, reverse=True) and counts[0] >= 1
                assert all(abs(c - round(c)) < 0.01 * max(1, c) for c in counts), counts
            else:
                assert body["prompt_version"] == serving
        report = _version_arm_report(http, experiment_id)
        for arm in report["arms"]:
            low, high = arm["hr_ci"]
            assert arm["events"] >= 60 and low <= arm["hr"] <= high, arm
            assert arm["ndcg_ci"][0] <= arm["ndcg"] <= arm["ndcg_ci"][1], arm

        stopped = http.post(f"/admin/experiments/{experiment_id}/stop").json()
        assert stopped["running"] is False and stopped["arms"][0]["events"] >= 60
        wait_until(lambda: http.get("/version").json()["experiment"] is None, 30,
                   "replica ends the experiment")
        after = [http.get("/recommend", params={"user_id": f"sim-3-{u}", "k": 5}).json()
                 for u in range(30)]
        assert {(b["arm"], b["prompt_version"], "experiment" in b) for b in after} == \
            {("serving", serving, False)}
