"""Encode batching: the cache misses of concurrent requests share backbone passes.

`serve.batch` gathers the misses; the batch is grouped by prompt version (a batch can
straddle a swap, and each user must be encoded by the version their request started
with), identical (history, personal prompt) pairs are encoded once, and each group is
one backbone pass (`serving.ranking.encode_histories`).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve

from services import metrics
from serving.ranking import encode_histories
from serving.swap import ActivePrompt

MAX_BUSY_WAIT_S = 0.1  # the longest the next batch waits for more misses


@dataclass(frozen=True)
class EncodeJob:
    active: ActivePrompt
    history: tuple[int, ...]  # catalog indices, oldest first
    personal: bytes | None = None  # the shard's personal prompt, float32 [H] as bytes
    text: tuple[int, ...] | None = None  # user text ids [U] (services.user_text)


class EncodeBatcher:
    """Cache misses -> [H] user vectors, batched.

    in_thread (the `encode_thread` setting): run the backbone on this replica's one
    encoder thread, so the event loop keeps answering cache hits meanwhile; otherwise
    the loop itself computes, and misses that arrive meanwhile queue up behind it.
    """

    def __init__(self, max_size: int, wait_ms: float, in_thread: bool):
        self.in_thread = in_thread
        self.counts = {"passes": 0, "users": 0}  # written by the encoding thread only
        self.waiting = 0  # live misses asked for and not answered yet (serving.warmup yields)
        # One encoder thread (torch: 1 thread); serving.warmup queues its batches on it too.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        self.configure(max_size, wait_ms)

    def configure(self, max_size: int, wait_ms: float) -> None:
        """Batch size and idle wait (the runtime knobs: `Recommender.reconfigure`)."""
        self._idle_wait_s = self._busy_wait_s = wait_ms / 1000
        self._encode.set_max_batch_size(max_size)
        self._encode.set_batch_wait_timeout_s(self._idle_wait_s)

    async def encode(self, active: ActivePrompt, history: list[int],
                     personal: np.ndarray | None, text: tuple[int, ...] | None = None
                     ) -> torch.Tensor:
        """One user's [H] vector under `active`: history = catalog indices, oldest first;
        personal = their personal prompt [H] or None; text = their text ids [U] or None."""
        personal_bytes = None if personal is None else np.asarray(personal, np.float32).tobytes()
        self.waiting += 1
        try:
            return await self._encode(EncodeJob(active, tuple(history), personal_bytes, text))
        finally:
            self.waiting -= 1

    # Batch size and wait are placeholders: configure() sets them from the settings.
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.002, max_concurrent_batches=1)
    async def _encode(self, jobs: list[EncodeJob]) -> list[torch.Tensor]:
        """Ray 2.60's serve.batch forms the next batch as soon as this one starts, which
        would leave batches of one; so while this batch computes, the next is told to
        wait about as long for more misses (it could not start earlier anyway), and
        afterwards the short idle wait applies again."""
        if not self.in_thread:
            return self._encode_now(jobs)
        self._encode.set_batch_wait_timeout_s(max(self._idle_wait_s, self._busy_wait_s))
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, self._encode_now, jobs)
        finally:
            took = time.perf_counter() - started
            self._busy_wait_s = min(MAX_BUSY_WAIT_S, 0.7 * self._busy_wait_s + 0.3 * took)
            self._encode.set_batch_wait_timeout_s(self._idle_wait_s)

    def _encode_now(self, jobs: list[EncodeJob]) -> list[torch.Tensor]:
        """-> one [H] vector per job, in order: one backbone pass per prompt version."""
        out: list[torch.Tensor | None] = [None] * len(jobs)
        # version -> (history, personal, text) -> jobs
        groups: dict[int, dict[tuple, list[int]]] = {}
        for position, job in enumerate(jobs):
            groups.setdefault(job.active.version, {}).setdefault(
                (job.history, job.personal, job.text), []).append(position)
        for by_history in groups.values():
            active = jobs[next(iter(by_history.values()))[0]].active
            histories = list(by_history)
            users = encode_histories(
                active.model, active.items, [list(h) for h, _, _ in histories],
                [None if p is None else np.frombuffer(p, np.float32) for _, p, _ in histories],
                [t for _, _, t in histories])
            metrics.encode_batch_users().observe(len(histories))
            self.counts["passes"] += 1
            self.counts["users"] += len(histories)
            for row, history in enumerate(histories):
                for position in by_history[history]:
                    out[position] = users[row]
        return out
