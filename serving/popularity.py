"""The popularity arm of an experiment: items ranked by how often they were clicked.

The counts are the live-metrics actor's (the event log when it started, then every
click event it reads; streaming/live_metrics.py). A replica follows them only while an
experiment with a popularity arm runs: a thread asks for the top `TOP` items every
`REFRESH_S`, and `scores(catalog)` turns the latest answer into one score per catalog
item, log(1 + clicks), zero for items with none; the request masks them as it masks a
model's scores.
"""

from __future__ import annotations

import logging
import math
import threading

import ray
import torch

from services.catalog import Catalog
from services.naming import LIVE_METRICS_ACTOR

log = logging.getLogger("ray.serve")

REFRESH_S = 2.0
TOP = 2000  # items with counts a replica holds; the rest score 0


class LivePopularity:
    def __init__(self, namespace: str):
        self.namespace = namespace
        self.counts: dict[str, int] = {}
        self._scores: tuple[tuple[int, int], torch.Tensor] | None = None  # (catalog, gen)
        self._generation = 0
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def follow(self, wanted: bool) -> None:
        """Follow the counts (a popularity arm runs) or stop asking for them."""
        if not wanted:
            self._wanted.clear()
            return
        self._wanted.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="popularity", daemon=True)
            self._thread.start()
        self.refresh()  # the arm's first requests should not wait for the thread

    def stop(self) -> None:
        self._stopping.set()
        self._wanted.set()  # wake the thread so that it sees the stop

    def refresh(self) -> bool:
        try:
            actor = ray.get_actor(LIVE_METRICS_ACTOR, namespace=self.namespace)
            top = ray.get(actor.popular.remote(TOP), timeout=5)
        except (ValueError, ray.exceptions.RayError) as err:  # not running: keep the last
            log.warning("popularity counts unavailable: %s", type(err).__name__)
            return False
        self.counts = dict(top)
        self._generation += 1
        return True

    def scores(self, catalog: Catalog) -> torch.Tensor:
        """[N] log(1 + clicks) per item of `catalog` (a fresh tensor: mask it in place)."""
        key = (catalog.version, self._generation)
        cached = self._scores
        if cached is None or cached[0] != key:
            table = torch.zeros(len(catalog))
            for item_id, count in self.counts.items():
                if (index := catalog.index.get(item_id)) is not None:
                    table[index] = math.log1p(count)
            self._scores = cached = (key, table)
        return cached[1].clone()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wanted.wait()
            if self._stopping.wait(REFRESH_S):
                return
            if self._wanted.is_set():
                self.refresh()
