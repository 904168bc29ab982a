"""Start the streaming plane: named shard actors, one consumer group of ingest actors, the
item consumer that turns `promptrec.items` into catalog versions, the profile consumer
that brings `promptrec.users` into the shards, and the live metrics (impressions and
events -> live quality, the canary's verdicts)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

from services.catalog_registry import catalog_registry_runs
from services.config import Settings
from services.naming import shard_actor
from services.placement import actor_options
from streaming.consumer import IngestConsumer
from streaming.items import ItemConsumer
from streaming.live_metrics import start_live_metrics
from streaming.profiles import ProfileConsumer
from streaming.shard import UserStateShard


@dataclass
class StreamingPlane:
    shards: list
    consumers: list
    item_consumer: object = None  # None: the catalog is fixed (no catalog registry)
    live_metrics: object = None  # None: not started (benchmarks of ingest alone)
    profile_consumer: object = None  # None: not started (no profile topic read)

    def stats(self) -> dict:
        shard_stats = ray.get([s.stats.remote() for s in self.shards])
        consumer_stats = ray.get([c.stats.remote() for c in self.consumers])
        items = ray.get(self.item_consumer.stats.remote()) if self.item_consumer else None
        profiles = ray.get(self.profile_consumer.stats.remote()) \
            if self.profile_consumer else None
        totals: dict[str, int] = {}
        for c in consumer_stats:
            for key, n in c["counts"].items():
                totals[key] = totals.get(key, 0) + n
        return {"shards": shard_stats, "consumers": consumer_stats, "totals": totals,
                "users": sum(s["users"] for s in shard_stats),
                # A held event is handled once it is applied or dead-lettered.
                "handled": sum(n for k, n in totals.items() if not k.startswith("held:")),
                "applied": sum(s["applied"] for s in shard_stats), "items": items,
                "profiles": profiles}

    def pause(self) -> None:
        ray.get([c.pause.remote() for c in self.consumers])

    def resume(self) -> None:
        ray.get([c.resume.remote() for c in self.consumers])

    def wait_for_assignment(self, partitions: int, timeout_s: float = 120) -> None:
        """Until every consumer holds partitions and together they hold all of them."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assigned = [c["assigned"] for c in ray.get([c.stats.remote()
                                                        for c in self.consumers])]
            if all(assigned) and sorted(p for a in assigned for p in a) == \
                    list(range(partitions)):
                return
            time.sleep(0.1)
        raise TimeoutError(f"consumer group not settled after {timeout_s:g} s: {assigned}")

    def stop(self) -> None:
        consumers = self.consumers + [a for a in (self.item_consumer, self.live_metrics,
                                                  self.profile_consumer) if a]
        ray.get([c.stop.remote() for c in consumers])
        for actor in consumers + self.shards:
            ray.kill(actor)


def start_streaming(settings: Settings, bootstrap: str, item_ids: list[str],
                    item_vectors: np.ndarray | None = None, paused: bool = False,
                    backbone_path: str = "", live_metrics: bool = False,
                    profiles: bool = False) -> StreamingPlane:
    """Shards restore their latest snapshot under data_dir/snapshots, if any.

    `paused`: the consumers join their group but fetch nothing until `resume()` (the
    ingest benchmark times a settled group, not its join). `backbone_path`: where a
    catalog registry runs, start the item consumer, which embeds with that backbone.
    `live_metrics`: start the live-metrics actor (it needs the prompt registry).
    `profiles`: start the profile consumer (`streaming.profiles`: the user topic into the
    shards).

    Both kinds of actor restart after a crash (max_restarts=-1); a shard call in flight
    is retried on the restarted shard, which then asks for a rewind to its snapshot.
    """
    namespace = settings.infra.namespace
    # Where the catalog registry runs, shards fetch the vectors from it: the object store
    # may lose a big constructor argument before a restart (see UserStateShard).
    follow = item_vectors is not None and catalog_registry_runs(namespace)
    # None is passed as itself: a put None's ref can be gone when a shard restarts.
    vectors = None if follow or item_vectors is None else ray.put(item_vectors)
    shard_cls = ray.remote(UserStateShard)
    shards = [shard_cls.options(name=shard_actor(i), namespace=namespace,
                                num_cpus=0.25, max_concurrency=1, max_restarts=-1,
                                max_task_retries=-1, **actor_options(settings, "shards")).remote(
        i, settings.streaming, vectors, None if follow else item_ids,
        str(settings.infra.root / "snapshots"), namespace, follow_catalog=follow)
        for i in range(settings.streaming.num_shards)]
    consumer_cls = ray.remote(IngestConsumer)
    # max_concurrency=4: stats()/stop() must run while the poll loop's thread is busy.
    consumers = [consumer_cls.options(num_cpus=0.25, max_concurrency=4, max_restarts=-1,
                                      max_task_retries=-1,
                                      **actor_options(settings, "consumers")).remote(
        settings, i, item_ids, bootstrap)
        for i in range(settings.streaming.num_consumers)]
    ray.get([c.stats.remote() for c in consumers])  # constructed (and polling)
    item_consumer = None
    if backbone_path:
        item_consumer = ray.remote(ItemConsumer).options(
            num_cpus=0.25, max_concurrency=4, max_restarts=-1, max_task_retries=-1,
            **actor_options(settings, "consumers")).remote(settings, bootstrap, backbone_path)
        ray.get(item_consumer.stats.remote())
    profile_consumer = None
    if profiles:
        profile_consumer = ray.remote(ProfileConsumer).options(
            num_cpus=0.25, max_concurrency=4, max_restarts=-1, max_task_retries=-1,
            **actor_options(settings, "consumers")).remote(settings, bootstrap)
        ray.get(profile_consumer.stats.remote())
    plane = StreamingPlane(shards=shards, consumers=consumers, item_consumer=item_consumer,
                           live_metrics=start_live_metrics(settings, bootstrap)
                           if live_metrics else None, profile_consumer=profile_consumer)
    if paused:
        plane.pause()
    return plane
