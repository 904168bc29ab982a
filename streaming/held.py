"""Events held for an item the catalog does not have yet.

An event may reach Kafka before the item it names reaches `promptrec.items` (a new item
clicked at once). Instead of dead-lettering it at once as `unknown_item`, the consumer
holds it, per partition, in offset order, and releases it when a catalog version has
its item; after `hold_unknown_s` (or when more than `hold_max_events` wait in its
partition, the oldest first) it is dead-lettered with the reason `unknown_item`. Other
events, the same user's included, are never held up behind it.

Nothing is lost on a crash: the consumer never commits past the lowest held offset of a
partition, and the shards record held offsets as holes (`streaming.delivery`), so a
replay after a restart applies a once-held event even though its offset lies below what
the shard has covered.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from services import metrics
from services.batch import EventBatch
from services.batch_decode import decode_batch
from services.naming import shard_for_user
from streaming.kafka_client import dead_letter


@dataclass(frozen=True, slots=True)
class HeldEvent:
    key: bytes | None
    value: bytes | None
    offset: int
    kafka_ms: int
    item_id: str
    user_id: str
    since: float = field(default_factory=time.monotonic)


class HeldEvents:
    def __init__(self, max_per_partition: int, timeout_s: float):
        self.max_per_partition, self.timeout_s = max_per_partition, timeout_s
        self._held: dict[int, deque[HeldEvent]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._held.values())

    def hold(self, partition: int, event: HeldEvent) -> list[HeldEvent]:
        """Hold `event`; -> the events pushed out (the oldest, past the bound)."""
        queue = self._held.setdefault(partition, deque())
        queue.append(event)
        out = []
        while len(queue) > self.max_per_partition:
            out.append(queue.popleft())
        return out

    def lowest(self, partition: int) -> int | None:
        """The lowest held offset of `partition`: commits stop there."""
        queue = self._held.get(partition)
        return min(e.offset for e in queue) if queue else None

    def commit_offset(self, partition: int, offset: int) -> int:
        lowest = self.lowest(partition)
        return offset if lowest is None else min(offset, lowest)

    def release(self, known: Container[str], now: float | None = None
                ) -> tuple[dict[int, list[HeldEvent]], dict[int, list[HeldEvent]]]:
        """(events whose item is now `known`, events held past the timeout), per
        partition, each in offset order; both leave the hold."""
        now = time.monotonic() if now is None else now
        ready: dict[int, list[HeldEvent]] = {}
        expired: dict[int, list[HeldEvent]] = {}
        for partition, queue in self._held.items():
            kept: deque[HeldEvent] = deque()
            for event in queue:
                if event.item_id in known:
                    ready.setdefault(partition, []).append(event)
                elif now - event.since >= self.timeout_s:
                    expired.setdefault(partition, []).append(event)
                else:
                    kept.append(event)
            self._held[partition] = kept
        return ready, expired

    def clear(self) -> None:
        self._held.clear()


class ItemHold:
    """An ingest consumer's side of holding: which items are known (following the live
    catalog where one runs), hold, release to the shards, expire to the dead-letter topic.

    shards: the shard actors (events are routed by user); count(result, reason, n): the
    consumer's counter.
    """

    def __init__(self, settings, shards: list, known: frozenset[str],
                 count: Callable[[str, str, int], None]):
        from services.catalog_registry import follow_if_running

        self.settings, self.shards, self.known, self._count = settings, shards, known, count
        self.queue = HeldEvents(settings.items.hold_max_events, settings.items.hold_unknown_s)
        self._moved = threading.Event()
        self._last_release = time.monotonic()
        self._dropped: list[dict[int, list[int]]] = [{} for _ in shards]  # holes to forget
        self.catalogs = follow_if_running(settings.infra.namespace, self._catalog_changed)
        if self.catalogs is not None:
            self._catalog_changed(self.catalogs.catalog, None)

    @property
    def following(self) -> bool:
        """A live catalog runs: unknown items may still arrive, so events are held."""
        return self.catalogs is not None

    def _catalog_changed(self, catalog, _change) -> None:
        self.known = frozenset(catalog.index)
        self._moved.set()

    def commit_offset(self, partition: int, offset: int) -> int:
        return self.queue.commit_offset(partition, offset)

    def clear(self) -> None:
        self.queue.clear()

    def due(self) -> bool:
        """Something to release: a new catalog version, or a check for expiry (20 a s)."""
        return bool(self.queue) and (self._moved.is_set()
                                     or time.monotonic() - self._last_release >= 0.05)

    def hold(self, partition: int, records, i: int, dlq) -> tuple[int, int]:
        """Hold record i of `records` (valid but for its item) -> (shard, offset)."""
        event = json.loads(records.values[i])  # valid JSON: only the item was refused
        held = HeldEvent(records.keys[i], records.values[i], records.offsets[i],
                         records.timestamps_ms[i], event["item_id"], event["user_id"])
        self._count("held", "unknown_item", 1)
        metrics.held_events().inc(1, tags={"outcome": "held"})
        for out in self.queue.hold(partition, held):  # past the bound: the oldest goes
            self._expire(partition, [out], dlq,
                         f"more than {self.queue.max_per_partition} held", self._dropped)
        return shard_for_user(held.user_id, len(self.shards)), held.offset

    def release(self, dlq, event_log) -> None:
        """Apply the held events whose item arrived; dead-letter those held too long."""
        import ray

        self._moved.clear()
        self._last_release = time.monotonic()
        ready, expired = self.queue.release(self.known)
        batches = []
        for partition, events in ready.items():
            decoded = decode_batch([e.key for e in events], [e.value for e in events],
                                   self.known, partition=partition,
                                   offsets=[e.offset for e in events],
                                   kafka_ms=[e.kafka_ms for e in events])
            batches.append(decoded.events)
        holes, self._dropped = self._dropped, [{} for _ in self.shards]
        for partition, events in expired.items():
            self._expire(partition, events, dlq,
                         f"not in the catalog after {self.queue.timeout_s:g} s", holes)
        if not batches and not any(holes):
            return
        columns = EventBatch.concat(batches) if batches else EventBatch.from_rows([])
        n = len(self.shards)
        shard_of = [shard_for_user(u, n) for u in columns.user_id]
        refs = [shard.apply_held.remote(
            columns.take([i for i, s in enumerate(shard_of) if s == index]), holes[index])
            for index, shard in enumerate(self.shards)]
        for result in ray.get(refs):
            self._count("ok", "", result["applied"])
            self._count("duplicate", "event_id", result["duplicates"])
        if len(columns):  # Ray's counters refuse an increment of 0
            metrics.held_events().inc(len(columns), tags={"outcome": "applied"})
        event_log.append_columns(columns)

    def _expire(self, partition: int, events: list[HeldEvent], dlq, why: str,
                holes: list[dict[int, list[int]]]) -> None:
        """Dead-letter held events as `unknown_item`; their holes go in `holes`."""
        topic = self.settings.streaming.topic_clicks
        for e in events:
            dead_letter(dlq, self.settings.streaming.topic_dlq, e.key, e.value,
                        "unknown_item", f"{e.item_id[:40]!r} {why}",
                        f"{topic}/{partition}/{e.offset}")
            self._count("invalid", "unknown_item", 1)
            metrics.held_events().inc(1, tags={"outcome": "expired"})
            holes[shard_for_user(e.user_id, len(self.shards))].setdefault(
                partition, []).append(e.offset)
