"""Fault tests against the real broker and real Ray actors.

After each fault (a consumer actor killed, a shard actor killed, the broker restarted)
the final per-user state must equal an uninterrupted run over the same events:
nothing lost, nothing applied twice. Each with both Kafka clients of the consumers.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
import ray

from services.backbone import default_backbone_path
from services.batch import EventBatch
from services.catalog import load_catalog
from services.config import Settings
from services.config_sources import load_settings
from services.data import load_interactions
from services.embedded import EmbeddedBroker, ensure_topics, free_port, start_ray
from streaming.kafka_client import CLIENTS
from streaming.plane import start_streaming
from streaming.replay import make_producer, send_events
from streaming.shard import UserStateShard
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.slow

N_EVENTS = 4000


@pytest.fixture(scope="module")
def catalog():
    return load_catalog("ml-100k", default_backbone_path(), TEST_CACHE)


@pytest.fixture(scope="module")
def events():
    inter = load_interactions("ml-100k", N_EVENTS)
    return [inter.event(i) for i in range(len(inter))]


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    settings = load_settings(env={}, overrides={
        "metrics_port": free_port(), "data_dir": str(tmp_path_factory.mktemp("ray"))})
    start_ray(settings)
    yield
    ray.shutdown()


@pytest.fixture
def broker(tmp_path):
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    yield broker
    broker.stop()


def _settings(tmp_path, client: str) -> Settings:
    run = uuid.uuid4().hex[:8]
    return load_settings(env={}, overrides={
        "data_dir": str(tmp_path), "topic_clicks": f"clicks-{run}", "topic_dlq": f"dlq-{run}",
        "consumer_group": f"group-{run}", "namespace": f"faults-{run}", "partitions": 3,
        "num_consumers": 2, "num_shards": 2, "snapshot_every_s": 0.3, "log_flush_s": 0.2,
        "poll_max_records": 200, "cache_dir": str(TEST_CACHE), "kafka_client": client})


def _reference(settings: Settings, catalog, events) -> dict:
    """The state of one uninterrupted shard fed every event once, in order."""
    shard = UserStateShard(0, settings.streaming, catalog.vectors.numpy(), list(catalog.index))
    shard.apply(EventBatch.of(events), {0: ("E", 0, len(events))})
    return shard.dump()


def _wait_applied(plane, expected: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if plane.stats()["applied"] >= expected:
            return
        time.sleep(0.3)
    raise AssertionError(f"applied {plane.stats()['applied']} of {expected}: {plane.stats()}")


def _assert_same_state(plane, reference: dict) -> None:
    time.sleep(1.0)  # anything applied twice would show up now
    merged: dict = {}
    for dump in ray.get([s.dump.remote() for s in plane.shards]):
        assert not set(dump) & set(merged), "a user lives in two shards"
        merged.update(dump)
    assert set(merged) == set(reference)
    for user, state in reference.items():
        got = merged[user]
        assert got["history"] == state["history"], user
        assert got["state_version"] == state["state_version"], user
        assert np.allclose(got["personal"], state["personal"], atol=1e-6), user


def _produce(bootstrap, topic, events):
    producer = make_producer(bootstrap)
    send_events(producer, topic, events)
    producer.close()


def _run_with_fault(tmp_path, broker, catalog, events, fault, client) -> None:
    settings = _settings(tmp_path, client)
    ensure_topics(broker.bootstrap, {settings.streaming.topic_clicks: settings.streaming.partitions,
                                     settings.streaming.topic_dlq: 1})
    plane = start_streaming(settings, broker.bootstrap, list(catalog.index),
                            catalog.vectors.numpy())
    try:
        half = len(events) // 2
        _produce(broker.bootstrap, settings.streaming.topic_clicks, events[:half])
        fault(plane, settings, half)
        _produce(broker.bootstrap, settings.streaming.topic_clicks, events[half:])
        _wait_applied(plane, len(events))
        _assert_same_state(plane, _reference(settings, catalog, events))
        assert plane.stats()["applied"] == len(events)
    finally:
        plane.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_killed_consumer_loses_nothing(tmp_path, ray_session, broker, catalog, events, client):
    def kill_consumer(plane, settings, half):
        _wait_applied(plane, half // 3)
        ray.kill(plane.consumers[0], no_restart=False)  # Ray restarts it; it resumes
    _run_with_fault(tmp_path, broker, catalog, events, kill_consumer, client)


@pytest.mark.parametrize("client", CLIENTS)
def test_killed_shard_restores_and_replays(tmp_path, ray_session, broker, catalog, events, client):
    def kill_shard(plane, settings, half):
        _wait_applied(plane, 1)
        ray.get(plane.shards[0].snapshot.remote())  # what the shard applies after this is lost
        _wait_applied(plane, half)
        ray.kill(plane.shards[0], no_restart=False)
        # ray.kill is asynchronous: the old incarnation may still answer for a moment.
        deadline = time.monotonic() + 60
        while ray.get(plane.shards[0].stats.remote())["restored_from"] is None:
            assert time.monotonic() < deadline, "the shard never restored a snapshot"
            time.sleep(0.2)
    _run_with_fault(tmp_path, broker, catalog, events, kill_shard, client)


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_restart_keeps_consuming(tmp_path, ray_session, broker, catalog, events, client):
    def restart_broker(plane, settings, half):
        _wait_applied(plane, half)  # memory storage: what is not consumed yet is gone
        broker.restart()
        ensure_topics(broker.bootstrap, {
            settings.streaming.topic_clicks: settings.streaming.partitions,
            settings.streaming.topic_dlq: 1})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            consumers = ray.get([c.stats.remote() for c in plane.consumers])
            if all(c["epoch_changes"] >= 1 for c in consumers):
                return
            time.sleep(0.3)
        raise AssertionError(f"consumers did not see the new topic: {consumers}")
    _run_with_fault(tmp_path, broker, catalog, events, restart_broker, client)
