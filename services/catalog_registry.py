"""CatalogRegistry: the live catalog as numbered versions, with a long-poll for watchers.

Version 1 is the catalog file (or MovieLens import) the stack started with; each batch of
item records from `promptrec.items` that changes something makes the next version. The
item consumer (streaming/items.py) embeds and `apply`s; serving replicas, shards,
ingest consumers and the trainer hold a `Catalog` and follow it with `CatalogFollower`,
which long-polls `wait_for_change(known, timeout)` and gets back only the changes since
the version it holds (or the whole catalog when it is too far behind), never a poll loop.

Plain class (unit-testable with asyncio); `start_catalog_registry` runs it as a named
Ray actor. It keeps nothing on disk: the item topic is the record of changes, and the
item consumer replays it from the beginning at start; the text-vector cache makes that
replay embed nothing it embedded before.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from services.catalog import Catalog
from services.data import Item

log = logging.getLogger(__name__)

CATALOG_ACTOR = "promptrec-catalog"
CHANGES_KEPT = 256  # versions a watcher may be behind and still get changes only


@dataclass(frozen=True)
class CatalogChange:
    """What one version changed: `upserts` with their vectors [U, H] (float32) and the
    Kafka timestamps of their records (ms, 0: none), then `deletes` (ids)."""

    version: int
    upserts: list[Item]
    vectors: np.ndarray
    deletes: list[str]
    record_ms: list[int]
    published: float  # epoch s, when this version became the registry's


def merged(changes: list[CatalogChange]) -> CatalogChange:
    """Several consecutive versions as one change to the last of them (later wins)."""
    if len(changes) == 1:
        return changes[0]
    final: dict[str, tuple[Item, np.ndarray, int] | None] = {}
    for change in changes:
        for item, vector, ms in zip(change.upserts, change.vectors, change.record_ms,
                                    strict=True):
            final[item.item_id] = (item, vector, ms)
        for item_id in change.deletes:
            final[item_id] = None
    kept = [v for v in final.values() if v is not None]
    hidden = changes[-1].vectors.shape[1]
    return CatalogChange(changes[-1].version, [k[0] for k in kept],
                         np.stack([k[1] for k in kept]) if kept else np.zeros((0, hidden),
                                                                             np.float32),
                         [i for i, v in final.items() if v is None], [k[2] for k in kept],
                         changes[-1].published)


def apply_change(catalog: Catalog, change: CatalogChange) -> Catalog:
    # A copy: arrays from Ray's object store are read-only.
    return catalog.changed(change.upserts, torch.from_numpy(np.array(change.vectors)),
                           change.deletes, change.version)


class CatalogRegistry:
    def __init__(self, catalog: Catalog):
        self._catalog = Catalog(catalog.items, catalog.vectors, 1, catalog.deleted)
        self._changes: list[CatalogChange] = []  # the last CHANGES_KEPT versions' changes
        self._changed = asyncio.Event()

    async def apply(self, upserts: list[Item], vectors: np.ndarray, deletes: list[str],
                    record_ms: list[int] | None = None) -> int:
        """Make the next version from embedded `upserts` (vectors [U, H]) and `deletes`;
        -> the version now current (unchanged when the batch was empty)."""
        if not upserts and not deletes:
            return self._catalog.version
        change = CatalogChange(self._catalog.version + 1, list(upserts),
                               np.asarray(vectors, np.float32), list(deletes),
                               list(record_ms or [0] * len(upserts)), time.time())
        self._catalog = apply_change(self._catalog, change)
        self._changes = [*self._changes[-(CHANGES_KEPT - 1):], change]
        # Wake every watcher, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()
        log.info("catalog version %d: %d items (+%d changed, %d deleted)", change.version,
                 len(self._catalog.index), len(upserts), len(deletes))
        return change.version

    async def version(self) -> int:
        return self._catalog.version

    async def snapshot(self) -> Catalog:
        return self._catalog

    async def wait_for_change(self, known: int, timeout_s: float
                              ) -> CatalogChange | Catalog | None:
        """Long-poll: None after `timeout_s` without a version past `known`; else the
        change from `known` to the current version, or the whole catalog when `known` is
        older than the changes kept (or from another registry: a restart)."""
        if self._catalog.version == known:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except TimeoutError:
                return None
        since = [c for c in self._changes if c.version > known]
        if known < 1 or not since or since[0].version != known + 1:
            return self._catalog
        return merged(since)


def start_catalog_registry(settings, catalog: Catalog):
    """The registry as a named actor, holding `catalog` as version 1."""
    import ray

    from services.placement import actor_options

    actor_cls = ray.remote(CatalogRegistry)
    return actor_cls.options(name=CATALOG_ACTOR, namespace=settings.infra.namespace,
                             get_if_exists=True, num_cpus=0, max_concurrency=1000,
                             **actor_options(settings, "registries")).remote(catalog)


LONG_POLL_S = 30.0
RETRY_S = 1.0
STOP_CHECK_S = 0.25


def follow_if_running(namespace: str,
                      on_change: Callable[[Catalog, CatalogChange | None], None]
                      ) -> CatalogFollower | None:
    """A follower of the live catalog, or None where no catalog registry runs (a plane
    started on its own, by a test or a benchmark, keeps the catalog it was given)."""
    return CatalogFollower(namespace, on_change) if catalog_registry_runs(namespace) else None


def catalog_registry_runs(namespace: str) -> bool:
    import ray

    if not ray.is_initialized():
        return False
    try:
        ray.get_actor(CATALOG_ACTOR, namespace=namespace)
    except ValueError:
        return False
    return True


class CatalogFollower:
    """The current catalog version in a process, kept current by a watcher thread.

    `catalog` is replaced whole (one reference, atomic under the GIL), so a reader that
    took it once works on one version. `on_change(catalog, change)` runs on the watcher
    thread after each new version (change None: a whole catalog, after a restart).
    """

    def __init__(self, namespace: str,
                 on_change: Callable[[Catalog, CatalogChange | None], None] | None = None):
        import ray

        self.namespace, self.on_change = namespace, on_change
        self.registry = ray.get_actor(CATALOG_ACTOR, namespace=namespace)
        self.catalog: Catalog = ray.get(self.registry.snapshot.remote())
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="catalog-watcher",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching, and wait for the watcher: no thread of this process may be
        inside a Ray call when Ray shuts down (it can end the process)."""
        self._stopping.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        import ray

        while not self._stopping.is_set():
            try:
                ref = self.registry.wait_for_change.remote(self.catalog.version, LONG_POLL_S)
                # Waiting in short steps, so that stop() ends this thread at once.
                while not ray.wait([ref], timeout=STOP_CHECK_S)[0]:
                    if self._stopping.is_set():
                        return
                got = ray.get(ref)
            except SystemExit:  # Ray shutting down in this process
                return
            except Exception:  # noqa: BLE001 - registry restarting: retry, keep the catalog
                log.exception("catalog long-poll failed; retrying")
                time.sleep(RETRY_S)
                try:
                    self.registry = ray.get_actor(CATALOG_ACTOR, namespace=self.namespace)
                except ValueError:
                    pass
                continue
            if got is None:
                continue
            change = got if isinstance(got, CatalogChange) else None
            self.catalog = apply_change(self.catalog, got) if change else got
            if self.on_change is not None:
                try:
                    self.on_change(self.catalog, change)
                except Exception:  # noqa: BLE001 - a failed follower step must not stop it
                    log.exception("catalog version %d not taken up", self.catalog.version)
