"""Fault tests against the real broker and real Ray actors.

After each fault (a consumer actor killed, a shard actor killed, the broker restarted,
with memory storage and with durable S3 storage)
the final per-user state must equal an uninterrupted run over the same events:
nothing lost, nothing applied twice. Each with both Kafka clients of the consumers.
"""

from __future__ import annotations

import time
import uuid

import pytest
import ray

from services.backbone import default_backbone_path
from services.catalog import load_catalog
from services.config import Settings
from services.config_sources import load_settings
from services.data import load_interactions
from services.embedded import EmbeddedBroker, ensure_topics
from streaming.kafka_client import CLIENTS
from streaming.plane import start_streaming
from tests.conftest import TEST_CACHE
from tests.streaming.plane_checks import (
    assert_same_state,
    produce,
    same_state_reference,
    wait_applied,
)

pytestmark = pytest.mark.slow

N_EVENTS = 4000


@pytest.fixture(scope="module")
def catalog():
    return load_catalog("ml-100k", default_backbone_path(), TEST_CACHE)


@pytest.fixture(scope="module")
def events():
    inter = load_interactions("ml-100k", N_EVENTS)
    return [inter.event(i) for i in range(len(inter))]


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


def _run_with_fault(tmp_path, broker, catalog, events, fault, client) -> None:
    settings = _settings(tmp_path, client)
    ensure_topics(broker.bootstrap, {settings.streaming.topic_clicks: settings.streaming.partitions,
                                     settings.streaming.topic_dlq: 1})
    plane = start_streaming(settings, broker.bootstrap, list(catalog.index),
                            catalog.vectors.numpy())
    try:
        half = len(events) // 2
        produce(broker.bootstrap, settings.streaming.topic_clicks, events[:half])
        fault(plane, settings, half)
        produce(broker.bootstrap, settings.streaming.topic_clicks, events[half:])
        wait_applied(plane, len(events))
        assert_same_state(plane, same_state_reference(settings, catalog, events))
        assert plane.stats()["applied"] == len(events)
    finally:
        plane.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_killed_consumer_loses_nothing(tmp_path, ray_session, broker, catalog, events, client):
    def kill_consumer(plane, settings, half):
        wait_applied(plane, half // 3)
        ray.kill(plane.consumers[0], no_restart=False)  # Ray restarts it; it resumes
    _run_with_fault(tmp_path, broker, catalog, events, kill_consumer, client)


@pytest.mark.parametrize("client", CLIENTS)
def test_killed_shard_restores_and_replays(tmp_path, ray_session, broker, catalog, events, client):
    def kill_shard(plane, settings, half):
        wait_applied(plane, 1)
        ray.get(plane.shards[0].snapshot.remote())  # what the shard applies after this is lost
        wait_applied(plane, half)
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
        wait_applied(plane, half)  # memory storage: what is not consumed yet is gone
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


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from tests.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "s3.log").start()
    yield server
    server.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_durable_broker_restart_mid_stream_loses_nothing(tmp_path, ray_session, s3, catalog,
                                                         events, client):
    """broker_storage s3://: events produced but not consumed outlive a broker restart, and
    a restart while the consumers read loses and repeats nothing (committed offsets stay)."""
    storage = s3.create_bucket(f"tansu-{uuid.uuid4().hex[:8]}")
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log", storage=storage, env=s3.env())
    broker.start()
    settings = _settings(tmp_path, client)
    topics = {settings.streaming.topic_clicks: settings.streaming.partitions,
              settings.streaming.topic_dlq: 1}
    try:
        ensure_topics(broker.bootstrap, topics)
        half = len(events) // 2
        produce(broker.bootstrap, settings.streaming.topic_clicks, events[:half])
        broker.restart()  # nothing consumed yet: the first half lives only in the storage
        plane = start_streaming(settings, broker.bootstrap, list(catalog.index),
                                catalog.vectors.numpy())
        try:
            wait_applied(plane, half // 3)
            broker.restart()  # mid-stream
            produce(broker.bootstrap, settings.streaming.topic_clicks, events[half:])
            wait_applied(plane, len(events))
            assert_same_state(plane, same_state_reference(settings, catalog, events))
            assert plane.stats()["applied"] == len(events)
            consumers = ray.get([c.stats.remote() for c in plane.consumers])
            assert all(c["epoch_changes"] == 0 for c in consumers), "the topic was recreated"
        finally:
            plane.stop()
    finally:
        broker.stop()
