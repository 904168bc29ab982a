"""The canary on the real stack: a bad version is rolled back and a good one promoted by
what simulated users do (bench/canary_sim.py: a held-out ground truth; the bad version
has its item biases shuffled, so it passes every check a publish makes), with no manual
call."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def canary_stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canary")
    settings = load_settings(env={}, overrides={
        "data_dir": str(tmp / "promptrec"), "http_port": free_port(),
        "metrics_port": free_port(), "partitions": 2, "num_consumers": 1, "num_shards": 1,
        "num_replicas": 1, "train_every_events": 0, "namespace": "promptrec-canary",
        "cache_dir": str(TEST_CACHE), "canary_share": 0.5, "canary_min_events": 100,
        "canary_max_events": 3000, "canary_margin": 0.1, "replica_cpus": 0.5})
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
