"""Event-to-state latency of the applied events: a sampled metric and a bounded bench sample.

Latency = now - the record's Kafka timestamp (events without one, kafka_ms 0, are not
counted).
"""

from __future__ import annotations

import time

from services.batch import EventBatch

# The event-to-state histogram observes one applied event in this many (those whose Kafka
# offset is a multiple of it: an unbiased sample, bursts weighted like steady traffic).
# Ray's metrics agent re-records every histogram observation one by one, in Python, at
# each export; observing every event cost the agent more CPU than the shards' own work
# (README, Benchmarks). The bench's latency figures use every event.
LATENCY_SAMPLE_EVERY = 8
LATENCIES_KEPT = 200_000  # event-to-state latencies kept for `latency_sample` (benchmarks)


class LatencySampler:
    def __init__(self):
        self.kept_ms: list[float] = []  # every applied event's, up to LATENCIES_KEPT

    def record(self, events: EventBatch, rows: list[int] | range) -> None:
        """The given rows were applied just now."""
        from services import metrics

        now_ms = time.time() * 1000
        kafka_ms, offset = events.kafka_ms, events.offset
        timed = [i for i in rows if kafka_ms[i] > 0]
        sampled = [max(0.0, now_ms - kafka_ms[i]) / 1000 for i in timed
                   if offset[i] % LATENCY_SAMPLE_EVERY == 0]
        if sampled:
            metrics.observe_all(metrics.event_to_state_seconds(), sampled)
        room = LATENCIES_KEPT - len(self.kept_ms)
        if room > 0:
            self.kept_ms.extend(now_ms - kafka_ms[i] for i in timed[:room])

    def sample(self, clear: bool = False) -> list[float]:
        sample = list(self.kept_ms)
        if clear:
            self.kept_ms.clear()
        return sample
