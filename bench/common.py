"""Shared by the experiments: the popularity baseline, the result files' home and the
metadata each one records."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Popularity:
    """The popularity baseline of every evaluation: how often each item occurred in the
    events learned so far, the same list for every user.

    counts [N] per catalog item. `ranked()` orders the catalog by count (ties in catalog
    order); `item_table` / `encode_users` / `logits` let the offline evaluator
    (`training.step.evaluate`) score it like a model, by log(1 + count).
    """

    def __init__(self, counts: np.ndarray):
        self.counts = np.asarray(counts, np.int64).copy()

    def add(self, index: int) -> None:
        self.counts[index] += 1

    def remove(self, index: int) -> None:
        """Take back one `add` (an event that left a sliding window)."""
        self.counts[index] -= 1

    def ranked(self) -> np.ndarray:
        """Catalog indices [N], most counted first; ties in catalog order."""
        return np.lexsort((np.arange(len(self.counts)), -self.counts))

    def item_table(self, text_vectors: torch.Tensor) -> torch.Tensor:
        return text_vectors

    def encode_users(self, history: torch.Tensor, mask, personal=None, text_ids=None
                     ) -> torch.Tensor:
        return torch.zeros(history.shape[0], 1)

    def logits(self, users: torch.Tensor, items) -> torch.Tensor:
        """-> [B, N]: log(1 + count) for every user."""
        scores = torch.as_tensor(np.log1p(self.counts), dtype=torch.float32)
        return scores.expand(users.shape[0], -1).clone()


def result_path(name: str) -> Path:
    """The committed result file of an experiment, e.g. `quality_ml-1m.json`."""
    return RESULTS_DIR / name


def cpu_times() -> tuple[int, int]:
    """(all, stolen) CPU ticks since boot, from /proc/stat ((0, 0) where there is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def steal_pct(since: tuple[int, int]) -> float | None:
    """Share of CPU time the host took from this virtual machine since `cpu_times()`
    was `since`, in %: on a shared host, timings with much of it are not comparable."""
    total, stolen = cpu_times()
    return round(100 * (stolen - since[1]) / (total - since[0]), 1) \
        if total > since[0] else None


def run_stamp(command: str, load: bool = False) -> dict:
    """What every result file records about its run: machine, command, time (and the
    1-minute load average at the end, where the figures are timings)."""
    stamp: dict = {"machine": f"{platform.machine()}, {os.cpu_count() or 0} cores"}
    if load:
        stamp["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    stamp["command"] = command
    stamp["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return stamp


def write_result(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
