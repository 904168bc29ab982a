"""The confluent-kafka (librdkafka) clients behind `streaming.kafka_client`'s interface.

librdkafka parses and prefetches in C threads, outside the GIL; an optional extra
(`pip install -e '.[confluent]'`).
"""

from __future__ import annotations

import logging
import time

from streaming.kafka_client import FETCH_WAIT_MS, MAX_DLQ_BYTES, PartitionRecords

log = logging.getLogger(__name__)


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

    def __init__(self, bootstrap: str, topic: str, group: str, client_id: str,
                 security: dict | None = None):
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
            "fetch.error.backoff.ms": 20, "error_cb": self._on_error, **(security or {})})
        self._paused = False
        self._consumer.subscribe([topic], on_assign=self._on_assign)
        self._admin = AdminClient({"bootstrap.servers": bootstrap,
                                   "client.id": f"{client_id}-admin", "error_cb": self._on_error,
                                   **(security or {})})
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
    def __init__(self, bootstrap: str, client_id: str, security: dict | None = None):
        ck = _confluent()
        self._producer = ck.Producer({
            "bootstrap.servers": bootstrap, "client.id": f"{client_id}-dlq", "linger.ms": 5,
            "enable.idempotence": False, "message.max.bytes": MAX_DLQ_BYTES,
            "error_cb": ConfluentConsumer._on_error, **(security or {})})

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
