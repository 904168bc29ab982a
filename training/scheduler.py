"""Trigger training rounds by time or by number of new events."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.config import TrainingSettings

log = logging.getLogger(__name__)


class RoundScheduler:
    """Background thread: a round when `train_every_events` new events arrived or
    `train_every_s` passed since the last one (whichever comes first; 0 turns a trigger off).
    The first round waits for `first_round_events` only: until it, an untrained prompt
    serves."""

    def __init__(self, runner, training: TrainingSettings, events_applied: Callable[[], int],
                 check_every_s: float = 2.0):
        self.runner = runner
        self.every_events = training.train_every_events
        # The first round never waits longer than any other would.
        first = training.first_round_events or self.every_events
        self.first_events = min(first, self.every_events) if self.every_events else first
        self.every_s = training.train_every_s
        self.events_applied = events_applied
        self.check_every_s = check_every_s
        self.results: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="round-scheduler")

    def due(self, new_events: int, elapsed_s: float, first: bool = False) -> bool:
        """`first`: no round has run yet (it waits for `first_round_events`)."""
        every = self.first_events if first else self.every_events
        by_events = every > 0 and new_events >= every
        by_time = self.every_s > 0 and elapsed_s >= self.every_s and new_events > 0
        return by_events or by_time

    def _loop(self) -> None:
        last_count, last_time = self.events_applied(), time.monotonic()
        while not self._stop.wait(self.check_every_s):
            count = self.events_applied()
            if self.due(count - last_count, time.monotonic() - last_time,
                        first=not self.results):
                self.results.append(self.runner.run())
                last_count, last_time = count, time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
