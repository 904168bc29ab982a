"""The hot swap: immutable `ActivePrompt` references, replaced whole on a new version.

An `ActivePrompt` (serving.slot) is a prompt version on a catalog version. `PromptSwap`
keeps two slots, the serving version's and a canary's (empty unless the registry runs
one, services.canary), builds a slot's new reference beside the old one and then
replaces one reference (atomic under the GIL), when the prompt registry's routing
changes (publish, canary, promotion, rollback) and when the catalog changes. A request
reads `active_for(user)` once at its start and passes that down (cache key, encoder,
scorer, item names), so it is served wholly by one prompt version and one catalog
version, and names both and its arm. While an experiment runs (services.experiments)
every user is routed to one of its arms instead: a version's slot of its own, or the
popularity arm (the serving version's catalog, ranked by live click counts,
serving.popularity). Two watcher threads long-poll: the prompt registry here, the
catalog registry in `services.catalog_registry.CatalogFollower`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from services import metrics
from services.canary import CANARY_ARM, SERVING_ARM, arm_of
from services.catalog import Catalog
from services.catalog_registry import CatalogChange, CatalogFollower
from services.decoded import decode_version
from services.experiments import Arm, Experiment, arm_for
from services.naming import REGISTRY_ACTOR
from serving.popularity import LivePopularity
from serving.slot import ActivePrompt, PromptSlot

log = logging.getLogger("ray.serve")

LONG_POLL_S = 30.0  # one registry long-poll; a change answers it at once
RETRY_S = 1.0  # pause after a failed long-poll or a refused version
ITEM_LIVE_KEPT = 5000  # recent record-to-live latencies a replica reports on /version

__all__ = ["ActivePrompt", "PromptSwap", "Route"]


@dataclass(frozen=True)
class Route:
    """Who answers one request: `active` (for a popularity arm the serving version, whose
    catalog it ranks), the arm's name, its experiment ("" outside one), and whether the
    popularity arm ranks."""

    active: ActivePrompt | None
    arm: str
    experiment: str = ""
    popularity: bool = False


@dataclass(frozen=True)
class ExperimentSlots:
    """A running experiment as a replica holds it: its arms and a slot per version arm."""

    id: str
    arms: tuple[Arm, ...]
    slots: dict[int, PromptSlot] = field(default_factory=dict)


class PromptSwap:
    """The versions a replica serves (`active`: the serving one, None until one is
    loaded; `canary_slot` beside it) and its watchers.

    encoder: the frozen backbone, shared by every version. The catalog comes from the
    catalog registry; each (prompt version, catalog version) pair gets its item table
    once, when it becomes active.
    """

    def __init__(self, encoder, namespace: str, replica: str):
        self.encoder, self.namespace, self.replica = encoder, namespace, replica
        self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=namespace)
        self.serving_slot, self.canary_slot = PromptSlot(encoder), PromptSlot(encoder)
        self.canary_share = 0.0
        self.experiment: ExperimentSlots | None = None  # replaced whole, read once
        self.popularity = LivePopularity(namespace)
        # Called (before, after) when the serving slot's version changes, and (None, active)
        # when the catalog does: serving.warmup holds replaced versions for cached users.
        self.on_serving_swap: Callable[[ActivePrompt | None, ActivePrompt], None] | None = None
        self._build_lock = threading.Lock()  # two watchers build; the later one wins whole
        self.item_live_ms: deque[float] = deque(maxlen=ITEM_LIVE_KEPT)
        self._stopping = threading.Event()
        self.catalogs = CatalogFollower(namespace, on_change=self._catalog_changed)

    @property
    def active(self) -> ActivePrompt | None:
        return self.serving_slot.active

    @property
    def catalog(self) -> Catalog:
        return self.catalogs.catalog

    def active_for(self, user_id: str) -> Route:
        """Who serves this user: an experiment's arm while one runs, else the canary or
        serving arm (sticky by user id in both)."""
        experiment = self.experiment
        if experiment is not None:
            arm = arm_for(experiment.id, user_id, experiment.arms)
            if arm.popularity:
                return Route(self.serving_slot.active, arm.name, experiment.id, True)
            return Route(experiment.slots[arm.version].active, arm.name, experiment.id)
        canary, share = self.canary_slot.active, self.canary_share
        if canary is not None and share > 0 and arm_of(user_id, share) == CANARY_ARM:
            return Route(canary, CANARY_ARM)
        return Route(self.serving_slot.active, SERVING_ARM)

    async def start(self, pin_version: int = 0) -> None:
        """Load the serving version (or `pin_version`) and, unless pinned, watch for more."""
        if pin_version:
            # A pinned replica serves that one version for good: no prompt watcher and no
            # canary (the catalog still follows: a pinned version must not return a
            # deleted item).
            self.swap(await self.registry.get.remote(pin_version), initial=True)
            return
        routing = await self.registry.wait_for_routing.remote([-1, -1, None], 0)
        self.route(routing, initial=True)
        # The watcher has a thread of its own, so a swap never waits for the event loop,
        # which a batch of encodes keeps busy for tens of milliseconds at a time.
        threading.Thread(target=self._watch, name="prompt-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self.catalogs.stop()
        self.popularity.stop()

    def route(self, routing: dict, initial: bool = False) -> None:
        """The registry's routing (serving entry, canary entry or {}, canary share)."""
        serving, canary = routing.get("serving") or {}, routing.get("canary") or {}
        with self._build_lock:
            if canary.get("version", 0) != self.canary_slot.version:
                self.canary_share = 0.0  # nobody is routed to a slot being rebuilt
            if serving and serving["version"] == self.canary_slot.version \
                    and serving["version"] != self.serving_slot.version:
                # Promoted: the canary's slot, item table and all, becomes the serving one.
                before = self.serving_slot.active
                self.serving_slot, self.canary_slot = self.canary_slot, PromptSlot(self.encoder)
                self._swapped(serving, self.serving_slot, initial, "serves", before)
        if serving and serving["version"] != self.serving_slot.version:
            self.swap(serving, initial)
        if canary and canary["version"] != self.canary_slot.version:
            self.swap(canary, initial, self.canary_slot)
        elif not canary and self.canary_slot.active is not None:
            with self._build_lock:
                log.info("replica %s stops canary version %d", self.replica,
                         self.canary_slot.version)
                self.canary_slot.clear()
        self.canary_share = routing.get("canary_share", 0.0) if canary else 0.0
        self._follow_experiment(routing.get("experiment"))

    def _follow_experiment(self, running: dict | None) -> None:
        """Build a new experiment's version slots, then route by it (one reference); an
        experiment that stopped hands everyone back to the serving arm."""
        if running is None:
            if self.experiment is not None:
                log.info("replica %s ends experiment %s", self.replica, self.experiment.id)
            self.experiment = None
            self.popularity.follow(False)
            return
        if self.experiment is not None and self.experiment.id == running["id"]:
            return
        experiment = Experiment.from_dict(running)
        decoded = {int(version): (entry, decode_version(entry["version"], entry["blob"],
                                                        self.catalog.vectors.shape[1]))
                   for version, entry in running["entries"].items()}
        self.popularity.follow(any(arm.popularity for arm in experiment.arms))
        with self._build_lock:  # on the catalog a catalog change cannot overtake
            slots = {version: PromptSlot(self.encoder) for version in decoded}
            for version, (entry, weights) in decoded.items():
                slots[version].load(entry, weights, self.catalog, time.perf_counter(), None)
            self.experiment = ExperimentSlots(experiment.id, experiment.arms, slots)
        log.info("replica %s routes experiment %s (%s)", self.replica, experiment.id,
                 ", ".join(arm.name for arm in experiment.arms))

    def swap(self, entry: dict, initial: bool = False, slot: PromptSlot | None = None) -> None:
        """Build the new prompt version beside the old one, then replace one reference;
        requests that already read the old one finish on it."""
        slot = slot or self.serving_slot
        started = time.perf_counter()
        weights = decode_version(entry["version"], entry["blob"],
                                 self.catalog.vectors.shape[1])
        since = entry.get("serving_since", entry["created"])
        # At start-up the version was live long before this replica existed: no swap time.
        live_ms = None if initial else round((time.time() - since) * 1000, 1)
        with self._build_lock:
            before = slot.active
            slot.load(entry, weights, self.catalog, started, live_ms)
        metrics.swap_seconds().observe(slot.active.swap_ms / 1000)
        self._swapped(entry, slot, initial, "serves" if slot is self.serving_slot
                      else "runs the canary", before)

    def _swapped(self, entry: dict, slot: PromptSlot, initial: bool, what: str,
                 before: ActivePrompt | None) -> None:
        if slot is self.serving_slot:
            metrics.serving_prompt_version().set(entry["version"],
                                                 tags={"replica": self.replica})
            if self.on_serving_swap is not None and not initial:
                self.on_serving_swap(before, slot.active)
        log.info("replica %s now %s prompt version %d", self.replica, what, entry["version"])

    def _catalog_changed(self, catalog: Catalog, change: CatalogChange | None) -> None:
        """On the catalog watcher's thread: the active versions on the new catalog. Read
        here, under the lock, so neither watcher can make an older catalog active."""
        with self._build_lock:
            extra = self.experiment.slots.values() if self.experiment is not None else ()
            for slot in (self.serving_slot, self.canary_slot, *extra):
                slot.build(self.catalog, time.perf_counter())
        if self.on_serving_swap is not None and self.serving_slot.active is not None:
            self.on_serving_swap(None, self.serving_slot.active)  # held versions: old catalog
        now_ms = time.time() * 1000
        if change is not None:
            live = [(now_ms - ms) for ms in change.record_ms if ms > 0]
            self.item_live_ms.extend(live)
            metrics.observe_all(metrics.item_live_seconds(), [ms / 1000 for ms in live])
        metrics.serving_catalog_version().set(catalog.version, tags={"replica": self.replica})

    def _lookup_registry(self) -> None:
        # When Serve is deployed from a config, the driver that owns the registry can
        # restart on its own; its new registry actor has the same name, the old handle
        # stays dead.
        try:
            self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=self.namespace)
        except ValueError:
            pass

    def _watch(self) -> None:
        """Long-poll the registry (blocking, on the watcher thread) and route on a change."""
        while not self._stopping.is_set():
            known = [self.serving_slot.version, self.canary_slot.version,
                     self.experiment.id if self.experiment is not None else ""]
            try:
                routing = ray.get(self.registry.wait_for_routing.remote(known, LONG_POLL_S))
            except Exception:  # noqa: BLE001 - registry restarting: retry, keep serving
                log.exception("registry long-poll failed; retrying")
                time.sleep(RETRY_S)
                self._lookup_registry()
                continue
            if routing:
                try:
                    self.route(routing)
                except Exception:  # noqa: BLE001 - a bad version must not kill the replica
                    log.exception("refused prompt routing %s",
                                  {k: (v.get("version") if isinstance(v, dict) else v)
                                   for k, v in routing.items()})
                    time.sleep(RETRY_S)
