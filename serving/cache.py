"""The per-replica user-vector cache: least recently used first out, bounded by size.

A user's vector depends only on their state and the prompt version, so an entry is
keyed by (state_version, prompt_version): a new event or a swap makes it a miss, never
a stale hit. An entry also keeps the inputs it was encoded from (history indices and
personal prompt, user text ids), so that after a swap the new version can re-encode it in the
background (serving.warmup) without asking the shards again. Each lookup is counted
(here, for /version, and as a Ray metric).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from services import metrics

CacheKey = tuple[int, int]  # (state_version, prompt_version)
# (history indices, personal float32 [H] bytes, user text ids [U] or None)
Inputs = tuple[tuple[int, ...], bytes | None, tuple[int, ...] | None]


@dataclass(frozen=True, slots=True)
class Entry:
    key: CacheKey
    vector: torch.Tensor  # [H]
    inputs: Inputs | None = None


class UserVectorCache:
    def __init__(self, capacity: int):
        self.capacity = capacity  # 0 = off: every lookup a miss, nothing kept
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recent first
        self.counts = {"hit": 0, "miss": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._evict()

    def get(self, user_id: str, key: CacheKey) -> torch.Tensor | None:
        """The [H] vector cached for this user under `key`, or None (counted either way)."""
        cached = self._entries.get(user_id)
        hit = cached is not None and cached.key == key
        result = "hit" if hit else "miss"
        self.counts[result] += 1
        metrics.user_cache().inc(1, tags={"result": result})
        if not hit:
            return None
        self._entries.move_to_end(user_id)
        return cached.vector

    def peek(self, user_id: str) -> Entry | None:
        """The user's entry, whatever its key; not counted, recency unchanged."""
        return self._entries.get(user_id)

    def touch(self, user_id: str) -> None:
        """Count a visit (recency) without a lookup: an answer from a held version."""
        if user_id in self._entries:
            self._entries.move_to_end(user_id)

    def put(self, user_id: str, key: CacheKey, user: torch.Tensor,
            inputs: Inputs | None = None, recent: bool = True) -> None:
        """Cache `user` under `key`; `recent` False keeps the user's place in the LRU order
        (a background re-encode is not a visit)."""
        if not self.capacity:
            return
        self._entries[user_id] = Entry(key, user, inputs)
        if recent:
            self._entries.move_to_end(user_id)
        self._evict()

    def most_recent(self) -> list[tuple[str, Entry]]:
        """Every entry, most recently used first (a snapshot)."""
        return list(reversed(self._entries.items()))

    def _evict(self) -> None:
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
