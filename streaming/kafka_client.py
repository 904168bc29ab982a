"""The consumer's Kafka clients behind one small interface: kafka-python or confluent-kafka.

`IngestConsumer` needs little of a Kafka client: poll a batch (as columns per partition),
commit offsets, seek, the assignment, lag from fetch high watermarks, the topic's id (to
notice a recreated topic), and a producer for dead letters. `open_clients` builds both
for the client named by the `kafka_client` setting:

- `kafka-python` (the default, pure Python): record batches are parsed in Python, which
  costs the consumer ~10 µs per event here (bench/ingest, `raw_consume_eps`).
- `confluent-kafka` (optional extra, `pip install -e '.[confluent]'`): librdkafka parses
  and prefetches in C threads, outside the GIL.

Each lives in its own module (`streaming.kafka_python`, `streaming.confluent`); both are
run against the real broker by tests/streaming/test_kafka_client.py.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.config import KafkaSecurity

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


def run_restarting(run: Callable[[], None], stop: threading.Event, what: str,
                   on_error: Callable[[str], None]) -> None:
    """Call `run` until `stop` is set; when it raises (broker gone, rebalance storms),
    log it, hand the traceback to `on_error`, wait 1 s and call it again: a client error
    must never end a consumer, which rebuilds its clients and resumes."""
    while not stop.is_set():
        try:
            run()
        except Exception:  # noqa: BLE001 - logged and retried by design
            on_error(traceback.format_exc(limit=3))
            log.exception("%s failed; restarting in 1 s", what)
            stop.wait(1.0)


class RestartingThread:
    """Base of a consumer whose work, `_run`, runs on a daemon thread under
    `run_restarting` until `stop`; `error` is the last failure's traceback. A subclass
    sets its state, then calls `_start`, and reports `alive` and `error` in `stats`."""

    error: str | None = None

    def _start(self, name: str, what: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=run_restarting, daemon=True, name=name, args=(
            self._run, self._stop, what, lambda error: setattr(self, "error", error)))
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.stats()


def dead_letter(dlq: DeadLetterProducer, topic: str, key: bytes | None, value: bytes | None,
                reason: str, detail: str, source: str) -> None:
    """Send a refused record to `topic` as it came, with why and whence in headers."""
    dlq.send(topic, key, value, [("reason", reason.encode()),
                                 ("detail", detail[:512].encode("utf-8", "replace")),
                                 ("source", source.encode())])


def open_clients(client: str, bootstrap: str, topic: str, group: str, client_id: str,
                 max_records: int, security: KafkaSecurity | None = None
                 ) -> tuple[ClickConsumer, DeadLetterProducer]:
    """The consumer and the dead-letter producer of `client`, connected as `security`
    says (TLS, SASL; default plaintext)."""
    security = security or KafkaSecurity()
    if client == "kafka-python":
        from streaming.kafka_python import KafkaPythonConsumer, KafkaPythonProducer

        options = security.kafka_python()
        return (KafkaPythonConsumer(bootstrap, topic, group, client_id, max_records, options),
                KafkaPythonProducer(bootstrap, client_id, options))
    if client == "confluent-kafka":
        from streaming.confluent import ConfluentConsumer, ConfluentProducer

        options = security.confluent()
        return (ConfluentConsumer(bootstrap, topic, group, client_id, options),
                ConfluentProducer(bootstrap, client_id, options))
    raise ValueError(f"unknown kafka_client {client!r}: one of {CLIENTS}")


# How long the broker may hold a fetch that finds no records. 25 ms gave the same
# event-to-state p50 at 2,000 events/s (35 vs 36 ms, one run each) and more idle polling.
FETCH_WAIT_MS = 100

# Dead letters may be whole oversized events (> 1 MiB, refused by validation).
MAX_DLQ_BYTES = 16 << 20
