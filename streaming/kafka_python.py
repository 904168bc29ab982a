"""The kafka-python (pure Python) clients behind `streaming.kafka_client`'s interface."""

from __future__ import annotations

import logging

from streaming.kafka_client import FETCH_WAIT_MS, MAX_DLQ_BYTES, PartitionRecords

log = logging.getLogger(__name__)


def cached_topic_id(consumer, topic: str) -> str:
    """The topic's id (KIP-516) from the consumer's cluster metadata; "" while unknown.

    The one use of a kafka-python private API (`KafkaConsumer._client.cluster`): 3.0.12's
    public consumer API has none for topic ids (`topics`, `partitions_for_topic`,
    `highwater`, `end_offsets` give names, partitions and offsets). The public way,
    `KafkaAdminClient.describe_topics`, is a second connection and a blocking metadata
    request in the ingest loop; this reads what the consumer's own metadata refreshes
    already hold, for free. tests/streaming/test_kafka_python_adapter.py fails as soon
    as a kafka-python release moves it.
    """
    topic_id = consumer._client.cluster.topic_id(topic)
    return str(topic_id) if topic_id else ""


class KafkaPythonConsumer:
    def __init__(self, bootstrap: str, topic: str, group: str, client_id: str,
                 max_records: int, security: dict | None = None):
        from kafka import KafkaConsumer

        self.topic = topic
        # session_timeout_ms ~6 s: the default makes a group join take ~23 s on Tansu.
        self._paused = False
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, client_id=client_id,
            enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=6000,
            heartbeat_interval_ms=1500, max_poll_records=max_records,
            fetch_max_wait_ms=FETCH_WAIT_MS, **(security or {}))
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
        return cached_topic_id(self._consumer, self.topic)

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
    def __init__(self, bootstrap: str, client_id: str, security: dict | None = None):
        from kafka import KafkaProducer

        # enable_idempotence=False: survives a broker restarted with empty storage.
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False,
                                       linger_ms=5, client_id=f"{client_id}-dlq",
                                       max_request_size=MAX_DLQ_BYTES, **(security or {}))

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]]) -> None:
        self._producer.send(topic, key=key, value=value, headers=headers)

    def flush(self) -> None:
        self._producer.flush()

    def close(self) -> None:
        self._producer.close()
