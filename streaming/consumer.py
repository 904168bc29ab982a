"""IngestConsumer: Kafka -> validate -> route by user -> shards, then commit.

Delivery: at-least-once from Kafka, idempotent apply in the shards by event_id,
so the per-user state is effectively-once. The loop, per poll:

1. decode each record; invalid ones go to the dead-letter topic with the reason
   in a header (and are counted), they never stop the consumer;
2. valid events, grouped by shard: one actor call per shard, all awaited;
3. valid events are buffered for the event log;
4. every `log_flush_s` the log buffer is written, the DLQ producer flushed, and
   only then offsets committed (commit = last handled offset + 1).

A crash between 2 and 4 replays those records: the shards drop them as
duplicates and the log gets them again (readers dedupe by event_id).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import Counter as Tally

from services import metrics
from services.config import Settings
from services.eventlog import EventLogWriter
from services.events import InvalidEvent, decode_event
from services.naming import shard_for_user

log = logging.getLogger(__name__)


class IngestConsumer:
    def __init__(self, settings: dict, consumer_index: int, shards: list, known_items: list[str],
                 bootstrap: str):
        self.settings = Settings(**settings)
        self.index = consumer_index
        self.shards = shards
        self.known_items = frozenset(known_items)
        self.bootstrap = bootstrap
        self.counts: Tally[str] = Tally()
        self.lag: dict[int, int] = {}
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- control (called as actor methods while the loop runs in its thread) ---
    def start(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run_forever, daemon=True,
                                            name=f"ingest-{self.index}")
            self._thread.start()
        return True

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        return self.stats()

    def stats(self) -> dict:
        return {"consumer": self.index, "counts": dict(self.counts), "lag": dict(self.lag),
                "alive": bool(self._thread and self._thread.is_alive()), "error": self.error}

    # --- the loop ---
    def _run_forever(self) -> None:
        # Errors of the client (broker gone, rebalance storms) must not end ingestion:
        # rebuild the clients and resume from the committed offsets.
        while not self._stop.is_set():
            try:
                self._run()
            except Exception:  # noqa: BLE001 - logged and retried by design
                self.error = traceback.format_exc(limit=3)
                log.exception("consumer %d failed; restarting in 1 s", self.index)
                self._stop.wait(1.0)

    def _run(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition
        from kafka.structs import OffsetAndMetadata

        s = self.settings
        consumer = KafkaConsumer(
            s.topic_clicks, bootstrap_servers=self.bootstrap, group_id=s.consumer_group,
            client_id=f"promptrec-ingest-{self.index}", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1500,
            max_poll_records=s.poll_max_records, fetch_max_wait_ms=100)
        dlq = KafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=False,
                            linger_ms=5, client_id=f"promptrec-dlq-{self.index}")
        event_log = EventLogWriter(str(s.root / "eventlog"), f"consumer{self.index}")
        pending: dict[TopicPartition, int] = {}
        last_flush = time.monotonic()
        try:
            while not self._stop.is_set():
                batches = consumer.poll(timeout_ms=100, max_records=s.poll_max_records)
                for tp, records in batches.items():
                    valid = self._handle(records, dlq, tp)
                    event_log.append(valid)
                    pending[tp] = records[-1].offset + 1
                if pending and (time.monotonic() - last_flush >= s.log_flush_s
                                or len(event_log) >= 50_000):
                    event_log.flush()
                    dlq.flush()
                    self._commit(consumer, {tp: OffsetAndMetadata(off, "", -1)
                                            for tp, off in pending.items()})
                    pending.clear()
                    last_flush = time.monotonic()
                self._update_lag(consumer)
        finally:
            # Stopping cleanly: keep what was applied, logged and committed.
            if pending:
                event_log.flush()
                dlq.flush()
                self._commit(consumer, {tp: OffsetAndMetadata(off, "", -1)
                                        for tp, off in pending.items()})
            consumer.close()
            dlq.close()

    def _handle(self, records: list, dlq, tp) -> list:
        """Validate, dead-letter the bad, apply the good to shards; returns the good."""
        import ray

        valid, by_shard = [], {}
        for record in records:
            try:
                event = decode_event(record.key, record.value, self.known_items)
            except InvalidEvent as bad:
                dlq.send(self.settings.topic_dlq, key=record.key, value=record.value,
                         headers=[("reason", bad.reason.encode()),
                                  ("detail", bad.detail[:512].encode("utf-8", "replace")),
                                  ("source", f"{tp.topic}/{tp.partition}/{record.offset}"
                                   .encode())])
                self._count("invalid", bad.reason)
                continue
            valid.append(event)
            shard = shard_for_user(event.user_id, len(self.shards))
            by_shard.setdefault(shard, []).append(
                (event.event_id, event.user_id, event.item_id, event.ts, record.timestamp or 0))
        refs = [self.shards[i].apply.remote(batch) for i, batch in by_shard.items()]
        for result in ray.get(refs):
            self._count("ok", "", result["applied"])
            self._count("duplicate", "", result["duplicates"])
        return valid

    def _count(self, result: str, reason: str, n: int = 1) -> None:
        if n:
            self.counts[f"{result}:{reason}" if reason else result] += n
            metrics.events_consumed().inc(n, tags={"result": result, "reason": reason})

    def _commit(self, consumer, offsets: dict) -> None:
        from kafka.errors import CommitFailedError

        try:
            consumer.commit(offsets)
        except CommitFailedError as err:
            # Partitions moved to another consumer: it replays them, shards dedupe.
            log.warning("consumer %d: commit failed after rebalance: %s", self.index, err)

    def _update_lag(self, consumer) -> None:
        # Tansu's end_offsets count batches, not records: use fetch high watermarks.
        gauge = metrics.consumer_lag()
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None:
                continue
            lag = max(0, high - consumer.position(tp))
            self.lag[tp.partition] = lag
            gauge.set(lag, tags={"partition": str(tp.partition)})
