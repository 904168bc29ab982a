"""The consumer's Kafka clients behind one small interface: kafka-python or confluent-kafka.

`IngestConsumer` needs little of a Kafka client: poll a batch (as columns per partition),
commit offsets, seek, the assignment, lag from fetch high watermarks, the topic's id (to
notice a recreated topic), and a producer for dead letters. `open_clients` builds both
for the client named by the `kafka_client` setting:

- `kafka-python` (the default, pure Python): record batches are parsed in Python, which
  costs the consumer ~10 µs per event here (bench/ingest, `raw_consume_eps`).
- `confluent-kafka` (optional extra, `pip install -e '.[confluent]'`): librdkafka parses
  and prefetches in C threads, outside the GIL.

Both are run against the real broker by tests/streaming/test_kafka_client.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

CLIENTS = ("kafka-python", "confluent-kafka")


@dataclass
class PartitionRecords:
    """One partition's records of a poll, as columns; row i is at offsets[i]."""

    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    timestamps_ms: list[int] = field(default_factory=list)  # 0: none


class ClickConsumer(Protocol):
    """A group member reading one topic; partitions are ints of that topic."""

    def poll(self, timeout_s: float, max_records: int) -> dict[int, PartitionRecords]: ...
    def commit(self, offsets: dict[int, int]) -> bool: ...  # False: a rebalance refused it
    def seek(self, partition: int, offset: int) -> None: ...
    def seek_to_beginning(self) -> None: ...  # every assigned partition
    def assignment(self) -> list[int]: ...
    def pause(self) -> None: ...  # fetch nothing, now or after a rebalance (still a member)
    def resume(self) -> None: ...
    def lag(self) -> dict[int, int]: ...  # fetch high watermark - position, per partition
    def topic_id(self) -> str: ...  # "" while unknown
    def close(self) -> None: ...


class DeadLetterProducer(Protocol):
    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def open_clients(client: str, bootstrap: str, topic: str, group: str, client_id: str,
                 max_records: int) -> tuple[ClickConsumer, DeadLetterProducer]:
    if client == "kafka-python":
        return (KafkaPythonConsumer(bootstrap, topic, group, client_id, max_records),
                KafkaPythonProducer(bootstrap, client_id))
    if client == "confluent-kafka":
        return (ConfluentConsumer(bootstrap, topic, group, client_id),
                ConfluentProducer(bootstrap, client_id))
    raise ValueError(f"unknown kafka_client {client!r}: one of {CLIENTS}")


# How long the broker may hold a fetch that finds no records. 25 ms gave the same
# event-to-state p50 at 2,000 events/s (35 vs 36 ms, one run each) and more idle polling.
FETCH_WAIT_MS = 100

# Dead letters may be whole oversized events (> 1 MiB, refused by validation).
_MAX_DLQ_BYTES = 16 << 20


# --- kafka-python ---------------------------------------------------------------------
class KafkaPythonConsumer:
    def __init__(self, bootstrap: str, topic: str, group: str, client_id: str,
                 max_records: int):
        from kafka import KafkaConsumer

        self.topic = topic
        # session_timeout_ms ~6 s: the default makes a group join take ~23 s on Tansu.
        self._paused = False
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, client_id=client_id,
            enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=6000,
            heartbeat_interval_ms=1500, max_poll_records=max_records,
            fetch_max_wait_ms=FETCH_WAIT_MS)
        self._consumer.subscribe([topic], listener=_pause_new_partitions(self))

    def poll(self, timeout_s: float, max_records: int) -> dict[int, PartitionRecords]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        return {tp.partition: PartitionRecords(
            keys=[r.key for r in records], values=[r.value for r in records],
            offsets=[r.offset for r in records],
            timestamps_ms=[r.timestamp or 0 for r in records])
            for tp, records in batches.items() if records}

    def commit(self, offsets: dict[int, int]) -> bool:
        from kafka import TopicPartition
        from kafka.errors import CommitFailedError
        from kafka.structs import OffsetAndMetadata

        try:
            self._consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1)
                                   for p, o in offsets.items()})
        except CommitFailedError as err:
            log.warning("commit failed after a rebalance: %s", err)
            return False
        return True

    def seek(self, partition: int, offset: int) -> None:
        from kafka import TopicPartition

        self._consumer.seek(TopicPartition(self.topic, partition), offset)

    def seek_to_beginning(self) -> None:
        assigned = list(self._consumer.assignment())
        if assigned:
            self._consumer.seek_to_beginning(*assigned)

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def pause(self) -> None:
        self._paused = True
        self._consumer.pause(*self._consumer.assignment())

    def resume(self) -> None:
        self._paused = False
        self._consumer.resume(*self._consumer.paused())

    def lag(self) -> dict[int, int]:
        # Tansu's end_offsets count batches, not records: use fetch high watermarks.
        lags = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is not None:
                lags[tp.partition] = max(0, high - self._consumer.position(tp))
        return lags

    def topic_id(self) -> str:
        # kafka-python 3 has no public accessor for topic ids (KIP-516); the cluster
        # metadata of the consumer's client holds them, refreshed as the client goes.
        topic_id = self._consumer._client.cluster.topic_id(self.topic)
        return str(topic_id) if topic_id else ""

    def close(self) -> None:
        self._consumer.close()


def _pause_new_partitions(owner: KafkaPythonConsumer):
    """A rebalance inside poll() assigns partitions and fetches them in that same call: a
    paused consumer pauses them as they are assigned."""
    from kafka import ConsumerRebalanceListener

    class PauseNewPartitions(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked) -> None:
            pass

        def on_partitions_assigned(self, assigned) -> None:
            if owner._paused and assigned:
                owner._consumer.pause(*assigned)

    return PauseNewPartitions()


class KafkaPythonProducer:
    def __init__(self, bootstrap: str, client_id: str):
        from kafka import KafkaProducer

        # enable_idempotence=False: survives a broker restarted with empty storage.
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False,
                                       linger_ms=5, client_id=f"{client_id}-dlq",
                                       max_request_size=_MAX_DLQ_BYTES)

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> None:
        self._producer.send(topic, key=key, value=value, headers=headers)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()


# --- confluent-kafka (librdkafka) -------------------------------------------------------
def _confluent():
    try:
        import confluent_kafka
    except ImportError:
        raise ValueError("kafka_client 'confluent-kafka' needs the optional extra: "
                         "pip install -e '.[confluent]'") from None
    return confluent_kafka


class ConfluentConsumer:
    # The topic id comes from an admin request (librdkafka's consumer metadata has none):
    # asked at most this often.
    TOPIC_ID_EVERY_S = 1.0

    def __init__(self, bootstrap: str, topic: str, group: str, client_id: str):
        ck = _confluent()
        from confluent_kafka.admin import AdminClient

        self.topic = topic
        self._ck = ck
        # The 20 ms backoffs (librdkafka's defaults: 1,000 and 500 ms) were set while chasing
        # a 0.5 s stall mid-drain and a slow first fetch after resume(); that first fetch
        # still takes 0.6-0.9 s, and their own effect was not measured apart.
        self._consumer = ck.Consumer({
            "bootstrap.servers": bootstrap, "group.id": group, "client.id": client_id,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000, "heartbeat.interval.ms": 1500,
            "fetch.wait.max.ms": FETCH_WAIT_MS, "fetch.queue.backoff.ms": 20,
            "fetch.error.backoff.ms": 20, "error_cb": self._on_error})
        self._paused = False
        self._consumer.subscribe([topic], on_assign=self._on_assign)
        self._admin = AdminClient({"bootstrap.servers": bootstrap,
                                   "client.id": f"{client_id}-admin", "error_cb": self._on_error})
        self._topic_id = ""
        self._topic_id_at = 0.0
        self._pending_id = None  # a describe_topics future not yet answered

    @staticmethod
    def _on_error(err) -> None:
        # Broker gone, all brokers down...: librdkafka reconnects by itself.
        log.warning("librdkafka: %s", err)

    def poll(self, timeout_s: float, max_records: int) -> dict[int, PartitionRecords]:
        # consume() returns only when it has max_records or the timeout passed: at a low
        # rate every batch would wait the whole timeout. So wait for one message, then
        # take what else is already queued without waiting.
        first = self._consumer.poll(timeout_s)
        if first is None:
            return {}
        messages = [first]
        if max_records > 1:
            messages += self._consumer.consume(num_messages=max_records - 1, timeout=0)
        parts: dict[int, PartitionRecords] = {}
        for message in messages:
            err = message.error()
            if err is not None:
                if err.fatal():
                    raise self._ck.KafkaException(err)
                log.warning("consumer: %s", err)  # e.g. a topic not (yet) recreated
                continue
            part = parts.get(message.partition())
            if part is None:
                part = parts[message.partition()] = PartitionRecords()
            part.keys.append(message.key())
            part.values.append(message.value())
            part.offsets.append(message.offset())
            kind, ms = message.timestamp()
            part.timestamps_ms.append(ms if kind != self._ck.TIMESTAMP_NOT_AVAILABLE else 0)
        return parts

    def commit(self, offsets: dict[int, int]) -> bool:
        tps = [self._ck.TopicPartition(self.topic, p, o) for p, o in offsets.items()]
        try:
            self._consumer.commit(offsets=tps, asynchronous=False)
        except self._ck.KafkaException as err:
            log.warning("commit failed (after a rebalance?): %s", err)
            return False
        return True

    def seek(self, partition: int, offset: int) -> None:
        self._consumer.seek(self._ck.TopicPartition(self.topic, partition, offset))

    def seek_to_beginning(self) -> None:
        for partition in self.assignment():
            self.seek(partition, self._ck.OFFSET_BEGINNING)

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def _on_assign(self, consumer, partitions) -> None:
        # Assigned and paused before the first fetch, when the consumer is paused.
        consumer.assign(partitions)
        if self._paused and partitions:
            consumer.pause(partitions)

    def pause(self) -> None:
        self._paused = True
        self._consumer.pause(self._consumer.assignment())

    def resume(self) -> None:
        self._paused = False
        self._consumer.resume(self._consumer.assignment())

    def lag(self) -> dict[int, int]:
        # cached=True: the high watermark of the last fetch response, no request.
        lags = {}
        assigned = self._consumer.assignment()
        for tp in self._consumer.position(assigned) if assigned else []:
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0 and tp.offset >= 0:
                lags[tp.partition] = max(0, high - tp.offset)
        return lags

    def topic_id(self) -> str:
        if self._pending_id is not None and self._pending_id.done():
            try:
                self._topic_id = str(self._pending_id.result().topic_id or "")
            except Exception as err:  # noqa: BLE001 - topic gone (broker restart): retry
                log.debug("describe_topics: %s", err)
            self._pending_id = None
        now = time.monotonic()
        if self._pending_id is None and now - self._topic_id_at >= self.TOPIC_ID_EVERY_S:
            self._topic_id_at = now
            futures = self._admin.describe_topics(self._ck.TopicCollection([self.topic]),
                                                  request_timeout=5)
            self._pending_id = futures[self.topic]
        return self._topic_id

    def close(self) -> None:
        self._consumer.close()
        # AdminClient has no close(): dropping the last reference destroys it (otherwise
        # it keeps reconnecting, and logging so, to a broker that may be gone).
        self._admin = self._pending_id = None


class ConfluentProducer:
    def __init__(self, bootstrap: str, client_id: str):
        ck = _confluent()
        self._producer = ck.Producer({
            "bootstrap.servers": bootstrap, "client.id": f"{client_id}-dlq", "linger.ms": 5,
            "enable.idempotence": False, "message.max.bytes": _MAX_DLQ_BYTES,
            "error_cb": ConfluentConsumer._on_error})

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self) -> None:
        left = self._producer.flush(30)
        if left:
            raise RuntimeError(f"{left} dead letters not delivered within 30 s")

    def close(self) -> None:
        self.flush()
