"""ItemConsumer: Kafka `promptrec.items` -> validate -> embed -> catalog versions.

Per poll (at most `item_batch_max` records):
1. each record is decoded by `services.item_records`: an upsert, a delete (null value),
   or invalid, which goes to `promptrec.items.dlq` with the reason in a header and is
   counted; over-long text is cut and counted (`truncated`), not refused;
2. the poll's records are merged by item id (the last one wins, as a compacted topic
   keeps it), and records that change nothing (an item re-sent as it is) are dropped;
3. the new and changed texts are embedded by the frozen backbone through the text-vector
   cache (`services.vector_cache`): a text embedded before is read back;
4. one `CatalogRegistry.apply` makes the next catalog version, which serving replicas,
   shards, ingest consumers and the trainer follow.

The topic is the record of catalog changes: the consumer has a group of its own per
start and reads it from the beginning (no offsets are committed), so a restarted stack
rebuilds the live catalog, and the cache makes that replay embed nothing again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from pathlib import Path

import numpy as np
import torch

from services import metrics
from services.catalog_registry import CATALOG_ACTOR
from services.config import Settings
from services.data import Item
from services.item_records import InvalidItemRecord, ItemDelete, decode_item_record
from services.vector_cache import TextVectors
from streaming.kafka_client import PartitionRecords, RestartingThread, dead_letter, open_clients

log = logging.getLogger(__name__)

# How long a batch waits for more records once one has come. 50 ms: at 100 items/s a
# version every ~50 ms instead of every ~10 (one per poll); the wait is part of the
# record-to-live latency bench/catalog.py measures.
LINGER_S = 0.05


class ItemConsumer(RestartingThread):
    def __init__(self, settings: Settings, bootstrap: str, backbone_path: str):
        self.settings = settings.validate()
        self.bootstrap = bootstrap
        self.vectors = TextVectors(Path(backbone_path), settings.infra.cache,
                                   bf16=settings.items.item_embed_bf16)
        self.counts: Tally[str] = Tally()
        self.seconds = {"embed": 0.0, "apply": 0.0}  # where the time of a batch goes
        self.version = 0  # the catalog version this consumer made last
        self._known: dict[str, Item] | None = None  # live items as this consumer left them
        self._start("items", "item consumer")

    def stats(self) -> dict:
        return {"counts": dict(self.counts), "catalog_version": self.version,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
                "embedded": self.vectors.embedded, "cache_hits": self.vectors.hits,
                "alive": self.alive, "error": self.error}

    def _run(self) -> None:
        import ray

        from services.embedded import ensure_topics

        s, i = self.settings.streaming, self.settings.items
        # Embedding is this actor's whole work, in bursts; Ray starts it with one thread.
        torch.set_num_threads(i.item_embed_threads)
        self.vectors.warm_up()
        security = self.settings.kafka
        ensure_topics(self.bootstrap, {i.topic_items: 1, i.topic_items_dlq: 1},
                      security=security.kafka_python())
        registry = ray.get_actor(CATALOG_ACTOR, namespace=self.settings.infra.namespace)
        if self._known is None:  # now, not at the first record: it costs ~0.3 s here
            catalog = ray.get(registry.snapshot.remote())
            self._known = {i: catalog.items[row] for i, row in catalog.index.items()}
        # A group of its own per start: read the topic from the beginning, commit nothing.
        group = f"promptrec-items-{time.time_ns()}"
        consumer, dlq = open_clients(s.kafka_client, self.bootstrap, i.topic_items, group,
                                     "promptrec-items", i.item_batch_max, security)
        try:
            while not self._stop.is_set():
                polled = self._poll_batch(consumer, i.item_batch_max)
                if not polled:
                    continue
                upserts, deletes, record_ms = self._decode(polled, dlq)
                dlq.flush()
                if upserts or deletes:
                    upserts, record_ms = self._changes_only(upserts, record_ms, deletes)
                    started = time.perf_counter()
                    vectors = self.vectors.embed([item.document for item in upserts])
                    embedded = time.perf_counter()
                    self.version = ray.get(registry.apply.remote(
                        upserts, vectors.numpy().astype(np.float32), deletes, record_ms))
                    self.seconds["embed"] += embedded - started
                    self.seconds["apply"] += time.perf_counter() - embedded
        finally:
            consumer.close()
            dlq.close()

    @staticmethod
    def _poll_batch(consumer, max_records: int) -> dict[int, PartitionRecords]:
        """A poll, then more for up to LINGER_S while it has fewer than `max_records`:
        each catalog version costs every follower a rebuild, so a burst becomes one
        version, not one per record."""
        polled = consumer.poll(0.1, max_records)
        deadline = time.monotonic() + LINGER_S
        while polled and (n := sum(len(r.offsets) for r in polled.values())) < max_records \
                and (left := deadline - time.monotonic()) > 0:
            for partition, more in consumer.poll(left, max_records - n).items():
                mine = polled.setdefault(partition, PartitionRecords())
                for name in ("keys", "values", "offsets", "timestamps_ms"):
                    getattr(mine, name).extend(getattr(more, name))
        return polled

    def _decode(self, polled: dict[int, PartitionRecords], dlq
                ) -> tuple[list[Item], list[str], list[int]]:
        """A poll's records -> (upserts, deletes, record ms of each upsert), merged by id."""
        final: dict[str, tuple[Item, int] | None] = {}
        topic = self.settings.items.topic_items
        for partition, records in polled.items():
            for key, value, offset, ms in zip(records.keys, records.values, records.offsets,
                                              records.timestamps_ms, strict=True):
                try:
                    decoded = decode_item_record(key, value,
                                                 self.settings.items.max_item_text_chars)
                except InvalidItemRecord as bad:
                    dead_letter(dlq, self.settings.items.topic_items_dlq, key, value,
                                bad.reason, bad.detail, f"{topic}/{partition}/{offset}")
                    self._count("invalid", bad.reason)
                    continue
                if isinstance(decoded, ItemDelete):
                    final[decoded.item_id] = None
                    self._count("delete")
                    continue
                if decoded.truncated:
                    self._count("truncated")
                final[decoded.item.item_id] = (decoded.item, ms)
                self._count("upsert")
        kept = [v for v in final.values() if v is not None]
        return ([k[0] for k in kept], [i for i, v in final.items() if v is None],
                [k[1] for k in kept])

    def _changes_only(self, upserts: list[Item], record_ms: list[int], deletes: list[str]
                      ) -> tuple[list[Item], list[int]]:
        """Drop upserts equal to the live item (as this consumer last left it)."""
        for item_id in deletes:
            self._known.pop(item_id, None)
        changed = [(item, ms) for item, ms in zip(upserts, record_ms, strict=True)
                   if self._known.get(item.item_id) != item]
        for item, _ in changed:
            self._known[item.item_id] = item
        return [c[0] for c in changed], [c[1] for c in changed]

    def _count(self, result: str, reason: str = "") -> None:
        self.counts[f"{result}:{reason}" if reason else result] += 1
        metrics.item_records().inc(1, tags={"result": result, "reason": reason})
