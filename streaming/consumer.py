"""IngestConsumer: Kafka -> validate -> route by user -> shards, then commit.

Delivery: at-least-once from Kafka; the shards apply exactly once (by offset, then by
event_id), so per-user state is effectively-once. The loop, per poll:

1. decode each partition's records at once (`services.batch_decode.decode_batch`, the
   same verdicts as `decode_event` record by record) into an `EventBatch`; invalid ones
   go to the dead-letter topic with the reason in a header (and are counted), they never
   stop the consumer;
2. every shard gets one call for the batch: its rows of the `EventBatch` (a few flat
   lists pickle far cheaper than a tuple per event) plus the offset range the batch
   spans per partition; a shard that restarted from an older snapshot answers with a
   rewind offset and the consumer seeks back there (other shards skip the replay).
   One batch is in flight while the next is fetched and decoded;
3. valid events are buffered for the event log;
4. every `log_flush_s` (or after a fifth of it once the consumer has caught up) the log
   buffer is written, the DLQ producer flushed, and only then offsets committed
   (commit = last handled offset + 1, never past an event still held).

Where a live catalog runs, the known items follow its versions, and an event naming an
item not there yet is held for it (`streaming.held`), not dead-lettered at once.

Offsets are qualified by the topic's id (its epoch): a topic recreated under the same
name (an in-memory broker's restart) restarts at 0; a consumer that sees the id change
seeks to the beginning, and shards treat the new epoch's offsets as new.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass
from typing import NamedTuple

import ray

from services import metrics
from services.batch import EventBatch
from services.batch_decode import decode_batch
from services.config import Settings
from services.eventlog import EventLogWriter
from services.gc_policy import freeze_and_relax
from services.naming import shard_actor, shard_for_user
from streaming.held import ItemHold
from streaming.kafka_client import PartitionRecords, dead_letter, open_clients, run_restarting

log = logging.getLogger(__name__)


class _Part(NamedTuple):
    """One partition's share of a poll: the offsets it spans and its valid events."""

    low: int  # first offset
    high: int  # last offset + 1
    events: EventBatch  # for the shards and the log
    held: list[tuple[int, int]]  # (shard, offset) of the events held back


@dataclass
class _InFlight:
    refs: list
    batch: dict[int, _Part]  # by partition


class IngestConsumer:
    def __init__(self, settings: Settings, consumer_index: int, known_items: list[str],
                 bootstrap: str):
        self.settings = settings.validate()  # an actor re-checks what it was handed
        self.index = consumer_index
        # Found by name: handles among a constructor's arguments may be lost before a
        # restart on another node (ray-project/ray#53727).
        self.shards = [ray.get_actor(shard_actor(i), namespace=settings.infra.namespace)
                       for i in range(settings.streaming.num_shards)]
        self.counts: Tally[str] = Tally()
        self.held = ItemHold(settings, self.shards, frozenset(known_items), self._count)
        self.bootstrap = bootstrap
        self.lag: dict[int, int] = {}
        self.error: str | None = None
        self._stop, self._paused = threading.Event(), threading.Event()
        self.assigned: list[int] = []
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

    def pause(self) -> bool:
        """Stop fetching (the consumer stays in its group, so nothing rebalances)."""
        self._paused.set()
        return True

    def resume(self) -> bool:
        self._paused.clear()
        return True

    def stats(self) -> dict:
        return {"consumer": self.index, "counts": dict(self.counts), "lag": dict(self.lag),
                "assigned": list(self.assigned), "paused": self._paused.is_set(),
                "alive": bool(self._thread and self._thread.is_alive()), "error": self.error,
                "rewinds": self.rewinds, "epoch": self.epoch, "epoch_changes": self.epoch_changes}

    # --- the loop ---
    def _run_forever(self) -> None:
        # Resumes from the committed offsets after a client error.
        run_restarting(self._run, self._stop, f"consumer {self.index}",
                       lambda error: setattr(self, "error", error))

    def _run(self) -> None:
        from services.embedded import ensure_topics

        s = self.settings.streaming
        # A broker that restarted empty has no topics: recreate them (idempotent).
        security = self.settings.kafka
        ensure_topics(self.bootstrap, {s.topic_clicks: s.partitions, s.topic_dlq: 1},
                      security=security.kafka_python())
        consumer, dlq = open_clients(s.kafka_client, self.bootstrap, s.topic_clicks,
                                     s.consumer_group, f"promptrec-ingest-{self.index}",
                                     s.poll_max_records, security)
        event_log = EventLogWriter(str(self.settings.infra.root / "eventlog"),
                                   f"consumer{self.index}")
        # Everything alive now (Ray, the Kafka client, pyarrow...) lives as long as the
        # process: out of the collector's sight, a full collection no longer pauses
        # ingestion for 200-300 ms; the young generation goes less often (gc_policy).
        freeze_and_relax()
        pending: dict[int, int] = {}  # partition -> offset to commit
        settled: dict[int, int] = {}  # partition -> end of its last settled batch
        inflight: _InFlight | None = None
        last_flush = time.monotonic()
        paused = False

        def settle() -> dict[int, int]:
            """Wait for the batch in flight; seek back where a shard asked to."""
            nonlocal inflight
            rewind = self._collect(inflight)
            for partition, part in inflight.batch.items():
                if partition in rewind:
                    consumer.seek(partition, rewind[partition])
                    pending.pop(partition, None)
                    settled.pop(partition, None)
                    self.rewinds += 1
                else:
                    event_log.append_columns(part.events)
                    settled[partition] = part.high
                    pending[partition] = self.held.commit_offset(partition, part.high)
            inflight = None
            return rewind

        def commit() -> None:
            event_log.flush()
            dlq.flush()
            consumer.commit(dict(pending))  # refused after a rebalance: the new owner
            pending.clear()                 # replays, and the shards dedupe

        try:
            while not self._stop.is_set():
                new_epoch = self._new_topic_epoch(consumer.topic_id())
                if new_epoch:
                    if inflight:
                        settle()
                    pending.clear()
                    settled.clear()
                    self.held.clear()  # their offsets belong to the old topic
                    consumer.seek_to_beginning()
                    self.epoch = new_epoch
                if self._paused.is_set() != paused:
                    paused = self._paused.is_set()
                    consumer.pause() if paused else consumer.resume()
                batches = consumer.poll(0.1, s.poll_max_records)
                self.assigned = consumer.assignment()
                prepared = self._decode(batches, dlq) if batches else {}
                # One batch in flight: the shards apply batch k while this consumer fetches
                # and decodes batch k+1 (Ray runs one caller's calls to an actor in order).
                if inflight:
                    rewind = settle()
                    for partition in [p for p in prepared if p in rewind]:
                        del prepared[partition]  # fetched past the rewind point: re-read
                if prepared:
                    inflight = self._submit(prepared)
                # `pending` holds settled batches only, so a batch in flight never commits.
                # Caught up (nothing fetched, nothing in flight): commit sooner, so a quiet
                # spell never leaves applied events uncommitted for a whole interval; after
                # a burst (a poll's worth of events or more since the last commit), at once.
                since_flush = time.monotonic() - last_flush
                caught_up = not batches and inflight is None
                if pending and (since_flush >= s.log_flush_s or (caught_up and (
                        since_flush >= s.log_flush_s / 5
                        or len(event_log) >= s.poll_max_records))):
                    commit()
                    last_flush = time.monotonic()
                if self.held.due():
                    self.held.release(dlq, event_log)
                    # Offsets held back for them may be committed now.
                    for partition, high in settled.items():
                        pending[partition] = self.held.commit_offset(partition, high)
                self._update_lag(consumer)
        finally:
            # Stopping cleanly: keep what was applied, logged and committed.
            if inflight:
                settle()
            if pending:
                commit()
            consumer.close()
            dlq.close()

    def _decode(self, batches: dict[int, PartitionRecords], dlq) -> dict[int, _Part]:
        """Validate a poll's records; dead-letter the bad -> {partition: _Part}."""
        parts = {}
        for partition, records in batches.items():
            offsets = records.offsets
            decoded = decode_batch(records.keys, records.values, self.held.known,
                                   partition=partition, offsets=offsets,
                                   kafka_ms=records.timestamps_ms)
            topic = self.settings.streaming.topic_clicks
            held = []
            for i, bad in decoded.invalid:
                if bad.reason == "unknown_item" and self.held.following:
                    held.append(self.held.hold(partition, records, i, dlq))
                    continue
                dead_letter(dlq, self.settings.streaming.topic_dlq, records.keys[i],
                            records.values[i], bad.reason, bad.detail,
                            f"{topic}/{partition}/{offsets[i]}")
                self._count("invalid", bad.reason)
            parts[partition] = _Part(offsets[0], offsets[-1] + 1, decoded.events, held)
        return parts

    def _submit(self, batch: dict) -> _InFlight:
        """One call per shard, events or not: every shard learns every batch's ranges."""
        ranges = {p: (self.epoch, part.low, part.high) for p, part in batch.items()}
        # The batch as one set of columns, partition by partition ...
        columns = EventBatch.concat([part.events for part in batch.values()])
        # ... split by shard: crc32 once per distinct user, not once per event.
        n_shards = len(self.shards)
        if n_shards == 1:
            by_shard = [columns]
        else:
            shard_of = {user: shard_for_user(user, n_shards) for user in set(columns.user_id)}
            rows: list[list[int]] = [[] for _ in range(n_shards)]
            for i, user in enumerate(columns.user_id):
                rows[shard_of[user]].append(i)
            by_shard = [columns.take(mine) for mine in rows]
        held: list[dict[int, list[int]]] = [{} for _ in self.shards]
        for partition, part in batch.items():
            for shard, offset in part.held:
                held[shard].setdefault(partition, []).append(offset)
        refs = [shard.apply.remote(events, ranges, mine)
                for shard, events, mine in zip(self.shards, by_shard, held, strict=True)]
        return _InFlight(refs=refs, batch=batch)

    def _collect(self, inflight: _InFlight) -> dict[int, int]:
        """Results of a submitted batch -> rewind {partition: offset} asked by any shard."""
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

    def _new_topic_epoch(self, current: str) -> str | None:
        """The topic's new id if it was recreated since we last looked, else None."""
        if not current or current == self.epoch:
            return None
        if not self.epoch:
            self.epoch = current  # first sight, not a change
            return None
        log.warning("consumer %d: topic %s was recreated (id %s -> %s); reading it from the "
                    "beginning", self.index, self.settings.streaming.topic_clicks, self.epoch,
                    current)
        self.epoch_changes += 1
        return current

    def _count(self, result: str, reason: str, n: int = 1) -> None:
        if n:
            self.counts[f"{result}:{reason}" if reason else result] += n
            metrics.events_consumed().inc(n, tags={"result": result, "reason": reason})

    def _update_lag(self, consumer) -> None:
        gauge = metrics.consumer_lag()
        for partition, lag in consumer.lag().items():
            self.lag[partition] = lag
            gauge.set(lag, tags={"partition": str(partition)})
