"""The hot swap: one immutable `ActivePrompt` reference, replaced whole on a new version.

`PromptSwap` builds the new version beside the old one and then replaces one reference
(atomic under the GIL). A request reads `active` once at its start and passes that
down (cache key, encoder, scorer), so it is served wholly by one version, and names it.
A watcher thread long-polls the registry and swaps on a change.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import ray
import torch

from services import metrics
from services.catalog import Catalog
from services.decoded import decode_version
from services.naming import REGISTRY_ACTOR
from services.prompt_model import PromptRecModel

log = logging.getLogger("ray.serve")

LONG_POLL_S = 30.0  # one registry long-poll; a change answers it at once
RETRY_S = 1.0  # pause after a failed long-poll or a refused version


@dataclass(frozen=True)
class ActivePrompt:
    version: int
    sha256: str
    model: PromptRecModel
    items: torch.Tensor  # [N, H] the item vectors this version reads and ranks
    swap_ms: float  # weights received -> this reference built
    publish_to_live_ms: float | None  # registry made it serving -> live here (None at start-up)


class PromptSwap:
    """The version a replica serves (`active`, None until one is loaded) and its watcher.

    encoder: the frozen backbone, shared by every version; catalog: its item vectors
    [N, H] are turned into each version's item table once, at the swap.
    """

    def __init__(self, encoder, catalog: Catalog, namespace: str, replica: str):
        self.encoder, self.catalog = encoder, catalog
        self.namespace, self.replica = namespace, replica
        self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=namespace)
        self.active: ActivePrompt | None = None
        self._stopping = threading.Event()

    async def start(self, pin_version: int = 0) -> None:
        """Load the serving version (or `pin_version`) and, unless pinned, watch for more."""
        if pin_version:
            # A pinned replica serves that one version for good: no watcher, no swaps.
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

    def swap(self, entry: dict, initial: bool = False) -> None:
        """Build the new version beside the old one, then replace one reference;
        requests that already read the old one finish on it."""
        started = time.perf_counter()
        weights = decode_version(entry["version"], entry["blob"], self.catalog.vectors.shape[1],
                                 len(self.catalog))
        model = PromptRecModel(self.encoder, weights)  # shares the frozen encoder
        with torch.inference_mode():
            items = model.item_table(self.catalog.vectors)  # once per version, not per request
        swap_ms = round((time.perf_counter() - started) * 1000, 2)
        since = entry.get("serving_since", entry["created"])
        # At start-up the version was live long before this replica existed: no swap time.
        live_ms = None if initial else round((time.time() - since) * 1000, 1)
        self.active = ActivePrompt(entry["version"], entry["sha256"], model, items, swap_ms,
                                   live_ms)
        metrics.swap_seconds().observe(swap_ms / 1000)
        metrics.serving_prompt_version().set(entry["version"], tags={"replica": self.replica})
        log.info("replica %s now serves prompt version %d", self.replica, entry["version"])

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
