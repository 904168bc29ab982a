"""No latency storm at a swap: cached users re-encoded in the background by a new version.

The user-vector cache keys on the prompt version, so a publish would make every cached
user a miss at once, and the encoder, sized for the steady trickle of misses, would
queue requests for seconds. Instead, when the serving version moves *forward* (a
publish or a promotion; never a rollback, which must act at once):

- the replaced version is *held*: a serving-arm request whose user has no vector under
  the new version yet, but a cached one under a held version for the same user state,
  is answered wholly by that held version (and names it);
- a background task re-encodes the cached users, most recently seen first, with the
  new version, in batches on the replica's encoder thread (live misses wait behind at
  most one batch), and caches each vector under the new version;
- the background work yields to live misses: a batch starts only while no live miss
  waits for the encoder, and then takes at most half of its time (after each batch it
  waits as long as the batch took);
- once every such user is done the held versions are let go; when publishes come faster
  than warm-ups finish, each held version answers at most `HOLD_S` after it was
  replaced, and at most `MAX_HELD` are held (the oldest go first).

A user whose state changed since (a new event) is a plain miss, encoded by the new
version: no answer ever comes from a state older than the one the request read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from serving.cache import UserVectorCache
from serving.ranking import encode_histories
from serving.slot import ActivePrompt

log = logging.getLogger("ray.serve")

BATCH = 8  # users per background pass: a live miss waits behind at most one
IDLE_POLL_S = 0.01  # how often a waiting background batch looks for a free encoder
HOLD_S = 300.0  # a held version answers at most this long after it was replaced (a warm-up
# of a full cache, 10,000 users, takes minutes on a fraction of a core)
MAX_HELD = 32  # versions held at once when swaps outpace warm-ups (the oldest go); each
# costs its item table and per-item weights (~5 MB on ML-100K, ~12 MB on ML-1M)


class SwapWarmer:
    def __init__(self, cache: UserVectorCache, executor: Executor,
                 loop: asyncio.AbstractEventLoop, live_waiting: Callable[[], int] = lambda: 0):
        self.cache, self.executor, self.loop = cache, executor, loop
        self.live_waiting = live_waiting  # live misses waiting for the encoder now
        self.held: dict[int, ActivePrompt] = {}  # replaced versions still answering
        self._replaced_at: dict[int, float] = {}  # version -> when it was replaced
        self.target = 0  # the version being warmed (0: none)
        self.counts = {"warmed": 0, "held_answers": 0, "swaps": 0}
        self._task: asyncio.Future | None = None

    def swapped(self, before: ActivePrompt | None, after: ActivePrompt) -> None:
        """The serving slot moved from `before` to `after` (any thread)."""
        if before is None or after.version <= before.version:
            self.held.clear()  # a rollback or a rebuild: nothing older may answer
            self._replaced_at.clear()
            self.target = 0
            return
        self.held[before.version] = before
        self._replaced_at[before.version] = time.monotonic()
        while len(self.held) > MAX_HELD:
            self._let_go(min(self.held))
        self.target = after.version
        self.counts["swaps"] += 1
        self._task = asyncio.run_coroutine_threadsafe(self._warm(after), self.loop)

    def answer(self, user_id: str, state_version: int):
        """(held version, its cached [H] vector of this user state) or None."""
        entry = self.cache.peek(user_id)
        if entry is None or entry.key[0] != state_version:
            return None
        held = self.held.get(entry.key[1])
        if held is None:
            return None
        if time.monotonic() - self._replaced_at.get(held.version, 0.0) > HOLD_S:
            self._let_go(held.version)
            return None
        self.counts["held_answers"] += 1
        self.cache.touch(user_id)  # re-encoded sooner: it is being asked for
        return held, entry.vector

    def status(self) -> dict:
        return {**self.counts, "warming": self.target, "held": sorted(self.held)}

    def _let_go(self, version: int) -> None:
        self.held.pop(version, None)
        self._replaced_at.pop(version, None)

    async def _warm(self, new: ActivePrompt) -> None:
        started = time.monotonic()
        todo = [(user, entry) for user, entry in self.cache.most_recent()
                if entry.inputs is not None and entry.key[1] in self.held
                and _fits(entry.inputs, new)]
        for first in range(0, len(todo), BATCH):
            if self.target != new.version:
                break  # a newer swap warms from here on
            while self.live_waiting() and self.target == new.version:
                await asyncio.sleep(IDLE_POLL_S)
            chunk = todo[first:first + BATCH]
            took = time.monotonic()
            vectors = await self.loop.run_in_executor(self.executor, self._encode, new, chunk)
            await asyncio.sleep(time.monotonic() - took)  # half the encoder for live misses
            for (user, entry), vector in zip(chunk, vectors, strict=True):
                if self.cache.peek(user) is entry:  # not re-encoded or evicted meanwhile
                    self.cache.put(user, (entry.key[0], new.version), vector, entry.inputs,
                                   recent=False)
                    self.counts["warmed"] += 1
        if self.target == new.version:
            log.info("re-encoded %d cached users with prompt version %d in %.1f s",
                     len(todo), new.version, time.monotonic() - started)
            self.held.clear()
            self._replaced_at.clear()
            self.target = 0

    @staticmethod
    def _encode(new: ActivePrompt, chunk: list) -> list:
        histories = [list(entry.inputs[0]) for _, entry in chunk]
        personals = [None if entry.inputs[1] is None else np.frombuffer(entry.inputs[1],
                                                                        np.float32)
                     for _, entry in chunk]
        return list(encode_histories(new.model, new.items, histories, personals,
                                     [entry.inputs[2] for _, entry in chunk]))


def _fits(inputs, new: ActivePrompt) -> bool:
    """Whether a cached entry's inputs are enough to encode it under `new`: a version that
    reads user text needs the text ids, of its length (other entries re-encode when next
    asked for)."""
    if not new.model.structure.user_text:
        return True
    return inputs[2] is not None and len(inputs[2]) == new.model.structure.user_text_tokens
