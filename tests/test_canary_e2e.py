"""The canary on the real stack: a bad version is rolled back and a good one promoted by
what simulated users do, with no manual call.

The population clicks according to a ground truth the versions never see: each
simulated user likes 20 ML-100K items drawn by their popularity in the ratings, clicks
the first liked item of its top-10 when there is one and a liked item found elsewhere
when there is none (a miss). The serving version ranks by popularity (its item bias is
the log of the rating counts), so it often serves a liked item. The bad version is the
same with the item biases shuffled among items: finite weights of the right shapes, so
it passes every check a publish makes, and it serves liked items rarely.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import ray
import torch
from kafka import KafkaProducer

from services.config_sources import load_settings
from services.data import load_interactions
from services.decoded import decode_version
from services.embedded import free_port
from services.health import wait_until
from services.launch.stack import Stack
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.slow
USERS = 400
LIKED = 20


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


def _versions(stack) -> tuple:
    """(popularity-ranked weights, the bad one: its item biases shuffled) as blobs."""
    serving = ray.get(stack.registry.serving.remote())
    base = decode_version(serving["version"], serving["blob"])
    counts = dict(zip(*np.unique(load_interactions("ml-100k").item_ids, return_counts=True),
                      strict=True))
    bias = torch.tensor([10 * np.log1p(counts.get(i, 0)) for i in base.item_ids],
                        dtype=torch.float32)
    good = dataclasses.replace(base, item_bias=bias)
    shuffled = bias[torch.randperm(len(bias), generator=torch.Generator().manual_seed(0))]
    return good, dataclasses.replace(good, item_bias=shuffled)


def _population(stack, seed: int) -> dict[str, set[str]]:
    ids = np.array(stack.catalog.item_ids)
    counts = dict(zip(*np.unique(load_interactions("ml-100k").item_ids, return_counts=True),
                      strict=True))
    p = np.array([counts.get(i, 0) for i in ids], dtype=np.float64)
    rng = np.random.default_rng(seed)
    return {f"sim-{seed}-{u}": set(rng.choice(ids, LIKED, replace=False, p=p / p.sum()))
            for u in range(USERS)}


def _visit(stack, producer, http: httpx.Client, user: str, liked: set[str], rng) -> str:
    """One request and the click that follows it -> the arm that answered."""
    body = http.get("/recommend", params={"user_id": user, "k": 10}).json()
    served = [entry["item_id"] for entry in body["items"]]
    hit = next((i for i in served if i in liked), None)
    item = hit or sorted(liked)[rng.integers(len(liked))]
    event = {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item,
             "ts": time.time(), "type": "click"}
    if rng.random() < 0.5:  # half quote the request, half are attributed by user and time
        event["request_id"] = body["request_id"]
    producer.send(stack.settings.streaming.topic_clicks, key=user.encode(),
                  value=json.dumps(event).encode())
    return body["arm"]


def _simulate_until(stack, producer, population, done, timeout_s: float) -> dict[str, int]:
    """Users visit in turn, 4 at a time, until `done()` -> answers per arm."""
    arms = {"serving": 0, "canary": 0}
    users = list(population.items())
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=stack.base_url, timeout=30) as http, \
            ThreadPoolExecutor(4) as pool:
        turn = 0
        while not done():
            assert time.monotonic() < deadline, f"no verdict in {timeout_s:g} s: {arms}, " \
                f"{_live(stack)}"
            batch = users[turn % len(users):][:16]
            turn += 16
            rngs = [np.random.default_rng(turn + i) for i in range(len(batch))]
            for arm in pool.map(lambda a: _visit(stack, producer, http, *a[0], a[1]),
                                zip(batch, rngs, strict=True)):
                arms[arm] += 1
            producer.flush()
    return arms


def _live(stack) -> dict:
    return httpx.get(f"{stack.base_url}/version", timeout=30).json()["live"]


def _routing(stack) -> dict:
    return ray.get(stack.registry.routing.remote())


def test_a_bad_version_is_rolled_back_and_a_good_one_promoted(canary_stack):
    stack, producer = canary_stack
    good, bad = _versions(stack)
    incumbent = ray.get(stack.registry.publish.remote(good.to_bytes(), {"source": "test"}))
    stack.wait_all_replicas(incumbent)

    # The bad version becomes the canary for half of the users, then is judged.
    bad_version = ray.get(stack.registry.publish.remote(bad.to_bytes(), {"source": "test"},
                                                        stack.settings.live.canary_share))
    wait_until(lambda: _routing(stack)["canary"] == bad_version, 30, "bad canary running")
    population = _population(stack, seed=1)
    arms = _simulate_until(stack, producer, population,
                           lambda: _routing(stack)["canary"] != bad_version, 600)
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
                            timeout=30).json()["arm"] for u in list(population)[:40]}
    assert arms_after == {"serving"}

    # An equivalent version (the soft prompt barely moved) proves itself and is promoted.
    same = dataclasses.replace(good, soft_prompt=good.soft_prompt + 1e-4)
    good_version = ray.get(stack.registry.publish.remote(same.to_bytes(), {"source": "test"},
                                                         stack.settings.live.canary_share))
    wait_until(lambda: _routing(stack)["canary"] == good_version, 30, "good canary running")
    _simulate_until(stack, producer, _population(stack, seed=2),
                    lambda: _routing(stack)["canary"] != good_version, 600)
    routing = _routing(stack)
    assert routing["serving"] == good_version, routing
    assert routing["canary_outcomes"][-1]["outcome"] == "promote"
    stack.wait_all_replicas(good_version)
