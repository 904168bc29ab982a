"""Both Kafka clients behind the consumer's interface, against the real (embedded) broker."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from services.embedded import EmbeddedBroker, ensure_topics
from streaming.kafka_client import CLIENTS, open_clients

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def broker():
    broker = EmbeddedBroker().start()
    yield broker
    broker.stop()


def _poll_until(consumer, n: int, timeout_s: float = 60) -> dict:
    """partition -> (keys, values, offsets, timestamps) of the next n records."""
    got: dict = {}
    deadline = time.monotonic() + timeout_s
    while sum(len(v[2]) for v in got.values()) < n and time.monotonic() < deadline:
        for partition, records in consumer.poll(0.2, 500).items():
            assert len(records.keys) == len(records.values) == len(records.offsets) \
                == len(records.timestamps_ms)
            keys, values, offsets, stamps = got.setdefault(partition, ([], [], [], []))
            keys += records.keys
            values += records.values
            offsets += records.offsets
            stamps += records.timestamps_ms
    return got


@pytest.mark.parametrize("client", CLIENTS)
def test_poll_commit_resume_seek_and_lag(broker, client):
    topic, group = f"t-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {topic: 2})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
    sent: dict[int, list] = {0: [], 1: []}
    for i in range(300):
        partition = i % 3 % 2  # 200 records to partition 0, 100 to partition 1
        key = None if i == 7 else f"u{i}".encode()  # a null key travels as None
        value = b"\xff not utf-8" if i == 8 else f'{{"n": {i}}}'.encode()
        producer.send(topic, key=key, value=value, partition=partition,
                      timestamp_ms=1_700_000_000_000 + i)
        sent[partition].append((key, value, 1_700_000_000_000 + i))
    producer.flush()
    producer.close()

    consumer, dlq = open_clients(client, broker.bootstrap, topic, group, "test", 500)
    try:
        got = _poll_until(consumer, 300)
        assert sorted(got) == [0, 1]
        for partition, (keys, values, offsets, stamps) in got.items():
            assert offsets == list(range(len(sent[partition])))
            assert list(zip(keys, values, stamps, strict=True)) == sent[partition]
        assert consumer.assignment() == [0, 1]
        deadline = time.monotonic() + 10
        while (consumer.lag() != {0: 0, 1: 0} or not consumer.topic_id()) \
                and time.monotonic() < deadline:
            consumer.poll(0.1, 10)
        assert consumer.lag() == {0: 0, 1: 0}
        assert consumer.topic_id()
        assert consumer.commit({0: 150, 1: 40})
        consumer.seek(0, 190)
        assert _poll_until(consumer, 10)[0][2] == list(range(190, 200))
    finally:
        consumer.close()
        dlq.close()

    # A new member of the group resumes at the committed offsets.
    consumer, dlq = open_clients(client, broker.bootstrap, topic, group, "test", 500)
    try:
        got = _poll_until(consumer, 50 + 60)
        assert got[0][2] == list(range(150, 200))
        assert got[1][2] == list(range(40, 100))
        assert consumer.lag() == {0: 0, 1: 0}
    finally:
        consumer.close()
        dlq.close()


@pytest.mark.parametrize("client", CLIENTS)
def test_dead_letters_keep_key_value_and_headers(broker, client):
    topic, dlq_topic = f"t-{uuid.uuid4().hex[:8]}", f"dlq-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {topic: 1, dlq_topic: 1})
    consumer, dlq = open_clients(client, broker.bootstrap, topic, "g", "test", 10)
    oversized = b"x" * (1_500_000)  # over 1 MiB: dead-lettered whole
    try:
        dlq.send(dlq_topic, b"u1", b"not json", [("reason", b"not_json")])
        dlq.send(dlq_topic, None, oversized, [("reason", b"too_large"), ("detail", b"1.5 MB")])
        dlq.flush()
    finally:
        consumer.close()
        dlq.close()
    reader = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                           fetch_max_bytes=16 << 20, max_partition_fetch_bytes=16 << 20)
    reader.assign([TopicPartition(dlq_topic, 0)])
    records, deadline = [], time.monotonic() + 30
    while len(records) < 2 and time.monotonic() < deadline:
        for batch in reader.poll(timeout_ms=200).values():
            records += batch
    reader.close()
    assert [(r.key, r.value, dict(r.headers)) for r in records] == [
        (b"u1", b"not json", {"reason": b"not_json"}),
        (None, oversized, {"reason": b"too_large", "detail": b"1.5 MB"})]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_paused_consumer_fetches_nothing_until_resumed(broker, client):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {topic: 1})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, enable_idempotence=False)
    for i in range(20):
        producer.send(topic, value=f"{i}".encode())
    producer.flush()
    producer.close()
    consumer, dlq = open_clients(client, broker.bootstrap, topic, f"g-{uuid.uuid4().hex[:8]}",
                                 "test", 100)
    try:
        consumer.pause()  # before the group is even joined: what the rebalance assigns
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            assert consumer.poll(0.1, 100) == {}
        for _ in range(10):  # ~1 s with the partition assigned and records waiting
            assert consumer.poll(0.1, 100) == {}
        consumer.resume()
        assert _poll_until(consumer, 20)[0][2] == list(range(20))
    finally:
        consumer.close()
        dlq.close()
