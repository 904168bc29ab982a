"""The prequential evaluation's baseline arms, answered by the evaluator itself (no Serve
app): `popularity` (all-time counts) and `recent_popularity` (counts over the last
`recent_window` learned events). Both keep each user's last `history_len` items, by event
time as the shards keep them, and mask them, as serving masks them; they differ only in
how they count. `Answer` (what every arm returns) lives here so that `bench.prequential`
can import the arms without a cycle.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.common import Popularity
from services.events import ClickEvent

DEFAULT_RECENT_WINDOW = 5000  # events the recent_popularity arm counts


@dataclass(frozen=True)
class Answer:
    items: list[str]  # ranked item ids, best first
    state_version: int  # events of this user the arm had learned when it answered
    prompt_version: int | None = None
    request_id: str = ""  # a Serve app's answer id (events may quote it: live metrics)
    read_profile: bool = False  # the answer read the user's profile text


class CountingArm:
    """What the baseline arms share: per-user history and masking, `learn` and
    `recommend`; a subclass decides how an event is counted (`_count`). Events of items
    outside the catalog are skipped (the pipeline dead-letters them too)."""

    name = ""

    def __init__(self, item_ids: Sequence[str], history_len: int):
        self.item_ids = list(item_ids)
        self.position = {item: i for i, item in enumerate(self.item_ids)}
        self.history_len = history_len
        self.popularity = Popularity(np.zeros(len(self.item_ids), np.int64))
        self.history: dict[str, list[tuple[float, str, str]]] = {}
        self.learned = Counter()
        self._ranked: list[str] | None = None

    def _count(self, index: int) -> None:
        raise NotImplementedError

    def learn(self, batch: Sequence[ClickEvent]) -> None:
        for event in batch:
            index = self.position.get(event.item_id)
            if index is None:
                continue
            self._count(index)
            history = self.history.setdefault(event.user_id, [])
            bisect.insort(history, (event.ts, event.event_id, event.item_id))
            if len(history) > self.history_len:
                del history[0]
            self.learned[event.user_id] += 1
        self._ranked = None

    def ranked(self) -> list[str]:
        """Every item, most counted first; ties in catalog order."""
        if self._ranked is None:
            self._ranked = [self.item_ids[i] for i in self.popularity.ranked()]
        return self._ranked

    def recommend(self, users: list[str], k: int) -> dict[str, Answer]:
        ranked = self.ranked()
        out = {}
        for user in users:
            seen = {item for _, _, item in self.history.get(user, ())}
            top: list[str] = []
            for item in ranked:
                if item not in seen:
                    top.append(item)
                    if len(top) == k:
                        break
            out[user] = Answer(top, self.learned[user])
        return out


class PopularityArm(CountingArm):
    """Running item counts over every event learned so far."""

    name = "popularity"

    def _count(self, index: int) -> None:
        self.popularity.add(index)


class RecentPopularityArm(CountingArm):
    """Item counts over the last `recent_window` learned events only (a sliding window
    by event count, in learning order): the event that leaves the window is uncounted."""

    name = "recent_popularity"

    def __init__(self, item_ids: Sequence[str], history_len: int,
                 recent_window: int = DEFAULT_RECENT_WINDOW):
        if recent_window < 1:
            raise ValueError(f"recent_window must be >= 1 event, not {recent_window}")
        super().__init__(item_ids, history_len)
        self.recent_window = recent_window
        self.window: deque[int] = deque()  # catalog indices of the counted events, oldest first

    def _count(self, index: int) -> None:
        self.popularity.add(index)
        self.window.append(index)
        if len(self.window) > self.recent_window:
            self.popularity.remove(self.window.popleft())
