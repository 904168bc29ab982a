"""UserStateShard: the per-user prompt state of the users routed to one shard.

State per user: the most recent `history_len` items, ordered by event time
(late events are inserted in place, not appended), and a `state_version` that
grows with every applied event, so caches downstream know when to refresh.
Apply is idempotent: an `event_id` already seen within the dedupe window is
counted as a duplicate and changes nothing.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from dataclasses import dataclass, field

# One event as shipped from a consumer to a shard (a tuple keeps Ray's pickling cheap):
# (event_id, user_id, item_id, ts, kafka_timestamp_ms)
WireEvent = tuple[str, str, str, float, int]


@dataclass
class UserState:
    history: list[tuple[float, str, str]] = field(default_factory=list)  # (ts, event_id, item)
    state_version: int = 0

    def add(self, ts: float, event_id: str, item_id: str, history_len: int) -> None:
        bisect.insort(self.history, (ts, event_id, item_id))
        if len(self.history) > history_len:
            del self.history[0]
        self.state_version += 1


class UserStateShard:
    def __init__(self, shard_index: int, history_len: int, dedupe_window: int):
        self.shard_index = shard_index
        self.history_len = history_len
        self.dedupe_window = dedupe_window
        self.users: dict[str, UserState] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.applied = 0
        self.duplicates = 0

    def apply(self, events: list[WireEvent]) -> dict[str, int]:
        """Apply a batch; returns counts so the consumer can report them."""
        from services import metrics

        applied = duplicates = 0
        now_ms = time.time() * 1000
        latency = metrics.event_to_state_seconds()
        for event_id, user_id, item_id, ts, kafka_ms in events:
            if event_id in self._seen:
                duplicates += 1
                continue
            self._seen[event_id] = None
            if len(self._seen) > self.dedupe_window:
                self._seen.popitem(last=False)
            self.users.setdefault(user_id, UserState()).add(ts, event_id, item_id,
                                                            self.history_len)
            applied += 1
            if kafka_ms > 0:
                latency.observe(max(0.0, now_ms - kafka_ms) / 1000)
        self.applied += applied
        self.duplicates += duplicates
        metrics.users_held().set(len(self.users), tags={"shard": str(self.shard_index)})
        return {"applied": applied, "duplicates": duplicates}

    def get_user(self, user_id: str) -> dict | None:
        """{"history": [item_id, oldest first], "state_version": n} or None if unknown."""
        state = self.users.get(user_id)
        if state is None:
            return None
        return {"history": [item for _, _, item in state.history],
                "state_version": state.state_version}

    def stats(self) -> dict[str, int]:
        return {"shard": self.shard_index, "users": len(self.users), "applied": self.applied,
                "duplicates": self.duplicates}

    def dump(self) -> dict[str, list[str]]:
        """Every user's history (tests compare it across runs)."""
        return {user: [item for _, _, item in s.history] for user, s in self.users.items()}
