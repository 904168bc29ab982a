"""The hot swap: one immutable `ActivePrompt` reference, replaced whole on a new version.

An `ActivePrompt` is a prompt version on a catalog version. `PromptSwap` builds the new
one beside the old one and then replaces one reference (atomic under the GIL), when the
prompt registry publishes (or rolls back) and when the catalog changes. A request reads
`active` once at its start and passes that down (cache key, encoder, scorer, item
names), so it is served wholly by one prompt version and one catalog version, and names
both. Two watcher threads long-poll: the prompt registry here, the catalog registry in
`services.catalog_registry.CatalogFollower`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import ray
import torch

from services import metrics
from services.catalog import Catalog
from services.catalog_registry import CatalogChange, CatalogFollower
from services.decoded import decode_version
from services.item_weights import CatalogRows
from services.naming import REGISTRY_ACTOR
from services.prompt_model import PromptRecModel
from services.row_buffer import RowBuffer, with_rows
from services.weights import PromptWeights

log = logging.getLogger("ray.serve")

LONG_POLL_S = 30.0  # one registry long-poll; a change answers it at once
RETRY_S = 1.0  # pause after a failed long-poll or a refused version
ITEM_LIVE_KEPT = 5000  # recent record-to-live latencies a replica reports on /version


@dataclass(frozen=True)
class ActivePrompt:
    version: int
    sha256: str
    model: PromptRecModel
    items: torch.Tensor  # [N, H] the item vectors this version reads and ranks
    catalog: Catalog  # the catalog version they are of (names, filters, masks)
    swap_ms: float  # weights received -> this reference built
    publish_to_live_ms: float | None  # registry made it serving -> live here (None at start-up)

    @property
    def catalog_version(self) -> int:
        return self.catalog.version


class PromptSwap:
    """The version a replica serves (`active`, None until one is loaded) and its watchers.

    encoder: the frozen backbone, shared by every version. The catalog comes from the
    catalog registry; each (prompt version, catalog version) pair gets its item table
    once, when it becomes active.
    """

    def __init__(self, encoder, namespace: str, replica: str):
        self.encoder, self.namespace, self.replica = encoder, namespace, replica
        self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=namespace)
        self.active: ActivePrompt | None = None
        self._prompt: tuple[dict, PromptWeights] | None = None  # entry (no blob), weights
        self._build_lock = threading.Lock()  # two watchers build; the later one wins whole
        self._rows: CatalogRows | None = None  # the serving version's rows on the catalog
        self._table_buffer: RowBuffer | None = None  # spare rows of the active item table
        self.item_live_ms: deque[float] = deque(maxlen=ITEM_LIVE_KEPT)
        self._stopping = threading.Event()
        self.catalogs = CatalogFollower(namespace, on_change=self._catalog_changed)

    @property
    def catalog(self) -> Catalog:
        return self.catalogs.catalog

    async def start(self, pin_version: int = 0) -> None:
        """Load the serving version (or `pin_version`) and, unless pinned, watch for more."""
        if pin_version:
            # A pinned replica serves that one version for good: no prompt watcher (the
            # catalog still follows: a pinned version must not return a deleted item).
            self.swap(await self.registry.get.remote(pin_version), initial=True)
            return
        entry = await self.registry.serving.remote()
        if entry:
            self.swap(entry, initial=True)
        # The watcher has a thread of its own, so a swap never waits for the event loop,
        # which a batch of encodes keeps busy for tens of milliseconds at a time.
        threading.Thread(target=self._watch, name="prompt-watcher", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        self.catalogs.stop()

    def swap(self, entry: dict, initial: bool = False) -> None:
        """Build the new prompt version beside the old one, then replace one reference;
        requests that already read the old one finish on it."""
        started = time.perf_counter()
        weights = decode_version(entry["version"], entry["blob"],
                                 self.catalog.vectors.shape[1])
        since = entry.get("serving_since", entry["created"])
        with self._build_lock:
            self._prompt = ({k: v for k, v in entry.items() if k != "blob"}, weights)
            self._activate(started)
        # At start-up the version was live long before this replica existed: no swap time.
        live_ms = None if initial else round((time.time() - since) * 1000, 1)
        self.active = dataclasses.replace(self.active, publish_to_live_ms=live_ms)
        metrics.swap_seconds().observe(self.active.swap_ms / 1000)
        metrics.serving_prompt_version().set(entry["version"], tags={"replica": self.replica})
        log.info("replica %s now serves prompt version %d", self.replica, entry["version"])

    def _catalog_changed(self, catalog: Catalog, change: CatalogChange | None) -> None:
        """On the catalog watcher's thread: the serving prompt version on the new catalog."""
        with self._build_lock:
            if self._prompt is not None:
                self._activate(time.perf_counter())
        now_ms = time.time() * 1000
        if change is not None:
            live = [(now_ms - ms) for ms in change.record_ms if ms > 0]
            self.item_live_ms.extend(live)
            metrics.observe_all(metrics.item_live_seconds(), [ms / 1000 for ms in live])
        metrics.serving_catalog_version().set(catalog.version, tags={"replica": self.replica})

    def _activate(self, started: float) -> None:
        """Under the build lock: the current prompt version on the current catalog (read
        here, so neither watcher can make an older catalog active), made active. For a
        catalog changed from the active one, only the changed rows are computed."""
        entry, weights = self._prompt
        catalog = self.catalog
        if self._rows is None or self._rows.weights is not weights:
            self._rows = CatalogRows(weights)
        model = PromptRecModel(self.encoder, self._rows.on(catalog))
        with torch.inference_mode():
            items = self._item_table(model, entry, catalog)
        swap_ms = round((time.perf_counter() - started) * 1000, 2)
        publish_ms = self.active.publish_to_live_ms if self.active else None
        self.active = ActivePrompt(entry["version"], entry["sha256"], model, items, catalog,
                                   swap_ms, publish_ms)

    def _item_table(self, model: PromptRecModel, entry: dict, catalog: Catalog
                    ) -> torch.Tensor:
        """[N, H] the item vectors `model` ranks: once per version, never per request; the
        changed rows only when the catalog changed from the active one's."""
        active = self.active
        if model.item_delta is None:
            return catalog.vectors
        if active is None or active.sha256 != entry["sha256"] or \
                catalog.parent_version != active.catalog.version or \
                catalog.parent_size != len(active.catalog):
            self._table_buffer = None
            return model.item_table(catalog.vectors)
        replaced = list(catalog.replaced)
        fresh = model.item_table(catalog.vectors, torch.tensor(
            [*replaced, *range(catalog.parent_size, len(catalog))], dtype=torch.long))
        table, self._table_buffer = with_rows(active.items, replaced, fresh[:len(replaced)],
                                              fresh[len(replaced):], self._table_buffer)
        return table

    def _lookup_registry(self) -> None:
        # When Serve is deployed from a config, the driver that owns the registry can
        # restart on its own; its new registry actor has the same name, the old handle
        # stays dead.
        try:
            self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=self.namespace)
        except ValueError:
            pass

    def _watch(self) -> None:
        """Long-poll the registry (blocking, on the watcher thread) and swap on a change."""
        while not self._stopping.is_set():
            known = self.active.version if self.active else 0
            try:
                entry = ray.get(self.registry.wait_for_change.remote(known, LONG_POLL_S))
            except Exception:  # noqa: BLE001 - registry restarting: retry, keep serving
                log.exception("registry long-poll failed; retrying")
                time.sleep(RETRY_S)
                self._lookup_registry()
                continue
            if entry:
                try:
                    self.swap(entry)
                except Exception:  # noqa: BLE001 - a bad version must not kill the replica
                    log.exception("refused prompt version %s", entry.get("version"))
                    time.sleep(RETRY_S)
