"""IngestConsumer: Kafka -> validate -> route by user -> shards, then commit.

Delivery: at-least-once from Kafka; the shards apply exactly once (by offset, then by
event_id), so per-user state is effectively-once. The loop, per poll:

1. decode each partition's records at once (`services.events.decode_batch`, the same
   verdicts as `decode_event` record by record); invalid ones go to the dead-letter topic
   with the reason in a header (and are counted), they never stop the consumer;
2. every shard gets one call for the batch: its events as columns (`ShardEvents`: a few
   flat lists pickle far cheaper than a tuple per event) plus the offset range the batch
   spans per partition; a shard that restarted from an older snapshot answers with a
   rewind offset and the consumer seeks back there (other shards skip the replay).
   One batch is in flight while the next is fetched and decoded;
3. valid events are buffered for the event log;
4. every `log_flush_s` (or after a fifth of it once the consumer has caught up) the log
   buffer is written, the DLQ producer flushed, and only then offsets committed
   (commit = last handled offset + 1).

Offsets are qualified by the topic's id (its epoch): a topic recreated under the same
name (the embedded broker keeps data in memory; a restart empties it) restarts offsets
at 0. A consumer that sees the id change seeks to the beginning, and shards treat the
new epoch's offsets as new.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from collections import Counter as Tally
from dataclasses import dataclass, field

from services import metrics
from services.config import Settings
from services.eventlog import EventLogWriter
from services.events import EventColumns, decode_batch
from services.naming import shard_for_user
from streaming.shard import ShardEvents

log = logging.getLogger(__name__)


@dataclass
class _Part:
    """One partition's share of a poll: its valid events, row i at offsets[i]."""

    low: int  # first offset
    high: int  # last offset + 1
    valid: EventColumns = field(default_factory=EventColumns)  # for shards and the log
    offsets: list[int] = field(default_factory=list)
    kafka_ms: list[int] = field(default_factory=list)  # record timestamps (0: none)


@dataclass
class _InFlight:
    refs: list
    batch: dict  # TopicPartition -> _Part


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
        self.epoch = ""  # the topic id seen last
        self.rewinds = self.epoch_changes = 0
        self.start()  # also on an actor restart after a crash: ingestion resumes by itself

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
                "alive": bool(self._thread and self._thread.is_alive()), "error": self.error,
                "rewinds": self.rewinds, "epoch": self.epoch,
                "epoch_changes": self.epoch_changes}

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

        from services.embedded import ensure_topics

        s = self.settings
        # A broker that restarted empty has no topics: recreate them (idempotent).
        ensure_topics(self.bootstrap, {s.topic_clicks: s.partitions, s.topic_dlq: 1})
        consumer = KafkaConsumer(
            s.topic_clicks, bootstrap_servers=self.bootstrap, group_id=s.consumer_group,
            client_id=f"promptrec-ingest-{self.index}", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1500,
            max_poll_records=s.poll_max_records, fetch_max_wait_ms=100)
        # Oversized events (> 1 MiB, refused by validation) still go to the DLQ whole.
        dlq = KafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=False,
                            linger_ms=5, client_id=f"promptrec-dlq-{self.index}",
                            max_request_size=16 << 20)
        event_log = EventLogWriter(str(s.root / "eventlog"), f"consumer{self.index}")
        # Everything alive now (Ray, kafka-python, pyarrow and their modules) lives as long
        # as the process: out of the collector's sight, a full collection no longer pauses
        # ingestion for 200-300 ms (measured in bench.ingest).
        gc.freeze()
        pending: dict[TopicPartition, int] = {}
        inflight: _InFlight | None = None
        last_flush = time.monotonic()

        def settle() -> dict[int, int]:
            """Wait for the batch in flight; seek back where a shard asked to."""
            nonlocal inflight
            rewind = self._collect(inflight)
            for tp, part in inflight.batch.items():
                if tp.partition in rewind:
                    consumer.seek(tp, rewind[tp.partition])
                    pending.pop(tp, None)
                    self.rewinds += 1
                else:
                    event_log.append_columns(part.valid)
                    pending[tp] = part.high
            inflight = None
            return rewind

        def commit() -> None:
            event_log.flush()
            dlq.flush()
            self._commit(consumer, {tp: OffsetAndMetadata(off, "", -1)
                                    for tp, off in pending.items()})
            pending.clear()

        try:
            while not self._stop.is_set():
                new_epoch = self._new_topic_epoch(consumer)
                if new_epoch:
                    if inflight:
                        settle()
                    pending.clear()
                    assigned = list(consumer.assignment())
                    if assigned:
                        consumer.seek_to_beginning(*assigned)
                    self.epoch = new_epoch
                batches = consumer.poll(timeout_ms=100, max_records=s.poll_max_records)
                prepared = self._decode(batches, dlq) if batches else {}
                # One batch in flight: the shards apply batch k while this consumer fetches
                # and decodes batch k+1 (Ray runs one caller's calls to an actor in order).
                if inflight:
                    rewind = settle()
                    for tp in [tp for tp in prepared if tp.partition in rewind]:
                        del prepared[tp]  # fetched past the rewind point: it is re-read
                if prepared:
                    inflight = self._submit(prepared)
                # `pending` holds settled batches only, so a batch in flight never commits.
                # Caught up (nothing fetched, nothing in flight): commit sooner, so a quiet
                # spell never leaves applied events uncommitted for a whole interval.
                since_flush = time.monotonic() - last_flush
                caught_up = not batches and inflight is None
                if pending and (since_flush >= s.log_flush_s
                                or (caught_up and since_flush >= s.log_flush_s / 5)):
                    commit()
                    last_flush = time.monotonic()
                self._update_lag(consumer)
        finally:
            # Stopping cleanly: keep what was applied, logged and committed.
            if inflight:
                settle()
            if pending:
                commit()
            consumer.close()
            dlq.close()

    def _decode(self, batches: dict, dlq) -> dict:
        """Validate a poll's records; dead-letter the bad -> {tp: _Part}."""
        parts = {}
        for tp, records in batches.items():
            part = _Part(low=records[0].offset, high=records[-1].offset + 1)
            decoded = decode_batch([r.key for r in records], [r.value for r in records],
                                   self.known_items)
            for i, bad in decoded.invalid:
                record = records[i]
                dlq.send(self.settings.topic_dlq, key=record.key, value=record.value,
                         headers=[("reason", bad.reason.encode()),
                                  ("detail", bad.detail[:512].encode("utf-8", "replace")),
                                  ("source", f"{tp.topic}/{tp.partition}/{record.offset}"
                                   .encode())])
                self._count("invalid", bad.reason)
            part.valid = decoded.events
            valid = [records[i] for i in decoded.rows]
            part.offsets = [r.offset for r in valid]
            part.kafka_ms = [r.timestamp or 0 for r in valid]
            parts[tp] = part
        return parts

    def _submit(self, batch: dict) -> _InFlight:
        """One call per shard, events or not: every shard learns every batch's ranges."""
        ranges = {tp.partition: (self.epoch, part.low, part.high) for tp, part in batch.items()}
        # The batch as one set of columns, partition by partition ...
        parts = list(batch.items())
        columns = ShardEvents(
            partition=[p for tp, part in parts for p in [tp.partition] * len(part.offsets)],
            offset=[o for _, part in parts for o in part.offsets],
            event_id=[x for _, part in parts for x in part.valid.event_id],
            user_id=[x for _, part in parts for x in part.valid.user_id],
            item_id=[x for _, part in parts for x in part.valid.item_id],
            ts=[x for _, part in parts for x in part.valid.ts],
            type=[x for _, part in parts for x in part.valid.type],
            kafka_ms=[x for _, part in parts for x in part.kafka_ms])
        # ... split by shard: crc32 once per distinct user, not once per event.
        n_shards = len(self.shards)
        if n_shards == 1:
            by_shard = [columns]
        else:
            shard_of = {user: shard_for_user(user, n_shards) for user in set(columns.user_id)}
            rows: list[list[int]] = [[] for _ in range(n_shards)]
            for i, user in enumerate(columns.user_id):
                rows[shard_of[user]].append(i)
            by_shard = [ShardEvents(*([column[i] for i in mine] for column in columns))
                        for mine in rows]
        refs = [shard.apply.remote(events, ranges)
                for shard, events in zip(self.shards, by_shard, strict=True)]
        return _InFlight(refs=refs, batch=batch)

    def _collect(self, inflight: _InFlight) -> dict[int, int]:
        """Results of a submitted batch -> rewind {partition: offset} asked by any shard."""
        import ray

        rewind: dict[int, int] = {}
        for result in ray.get(inflight.refs):
            self._count("ok", "", result["applied"])
            self._count("duplicate", "event_id", result["duplicates"])
            self._count("duplicate", "redelivery", result["replayed"])
            for partition, offset in result["rewind"].items():
                rewind[partition] = min(offset, rewind.get(partition, offset))
        if rewind:
            log.warning("consumer %d: shards asked to rewind %s", self.index, rewind)
        return rewind

    def _new_topic_epoch(self, consumer) -> str | None:
        """The topic's new id if it was recreated since we last looked, else None."""
        # kafka-python 3 has no public accessor for topic ids (KIP-516); the cluster
        # metadata of the consumer's client holds them.
        topic_id = consumer._client.cluster.topic_id(self.settings.topic_clicks)
        current = str(topic_id) if topic_id else ""
        if not current or current == self.epoch:
            return None
        if not self.epoch:
            self.epoch = current  # first sight, not a change
            return None
        log.warning("consumer %d: topic %s was recreated (id %s -> %s); reading it from the "
                    "beginning", self.index, self.settings.topic_clicks, self.epoch, current)
        self.epoch_changes += 1
        return current

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
