"""The per-replica user-vector cache: least recently used first out, bounded by size.

A user's vector depends only on their state and the prompt version, so an entry is
keyed by (state_version, prompt_version): a new event or a swap makes it a miss, never
a stale hit. Each lookup is counted (here, for /version, and as a Ray metric).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from services import metrics

CacheKey = tuple[int, int]  # (state_version, prompt_version)


class UserVectorCache:
    def __init__(self, capacity: int):
        self.capacity = capacity  # 0 = off: every lookup a miss, nothing kept
        # user_id -> (key, [H] user vector), least recent first
        self._entries: OrderedDict[str, tuple[CacheKey, torch.Tensor]] = OrderedDict()
        self.counts = {"hit": 0, "miss": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._evict()

    def get(self, user_id: str, key: CacheKey) -> torch.Tensor | None:
        """The [H] vector cached for this user under `key`, or None (counted either way)."""
        cached = self._entries.get(user_id)
        hit = cached is not None and cached[0] == key
        result = "hit" if hit else "miss"
        self.counts[result] += 1
        metrics.user_cache().inc(1, tags={"result": result})
        if not hit:
            return None
        self._entries.move_to_end(user_id)
        return cached[1]

    def put(self, user_id: str, key: CacheKey, user: torch.Tensor) -> None:
        if not self.capacity:
            return
        self._entries[user_id] = (key, user)
        self._entries.move_to_end(user_id)
        self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
