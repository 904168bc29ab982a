"""The consumer's decode and routing, without a broker or Ray: fake records, shards, DLQ."""

from __future__ import annotations

import random
import time
from collections import Counter

from services.batch import EventBatch
from services.config import StreamingSettings
from services.config_sources import load_settings
from services.events import ClickEvent
from services.naming import shard_for_user
from streaming.consumer import IngestConsumer
from streaming.held import ItemHold
from streaming.kafka_client import PartitionRecords
from streaming.shard import UserStateShard
from tests.services.test_events import BAD, ITEMS


class _Shard:
    """Records apply calls, and applies them to a real shard."""

    def __init__(self, index: int):
        self.calls: list[tuple[EventBatch, dict]] = []
        self.real = UserStateShard(index, StreamingSettings(history_len=5, dedupe_window=1000))
        shard = self

        class _Apply:
            @staticmethod
            def remote(events, ranges, held=None):
                shard.calls.append((events, ranges))
                return shard.real.apply(events, ranges, held)

        self.apply = _Apply()


class _DLQ:
    def __init__(self):
        self.sent = []

    def send(self, topic, key, value, headers):
        self.sent.append((key, value, dict(headers)))


def _consumer(n_shards: int) -> IngestConsumer:
    consumer = object.__new__(IngestConsumer)  # no thread, no broker
    consumer.settings = load_settings(env={})
    consumer.shards = [_Shard(i) for i in range(n_shards)]
    consumer.counts = Counter()
    consumer.held = ItemHold(consumer.settings, consumer.shards, frozenset(ITEMS),
                             consumer._count)
    consumer.epoch = "E"
    return consumer


def test_every_valid_event_reaches_its_shard_and_every_bad_one_the_dlq(monkeypatch):
    import streaming.consumer as module

    monkeypatch.setattr(module.metrics, "events_consumed",
                        lambda: type("C", (), {"inc": staticmethod(lambda *a, **k: None)})())
    rng = random.Random(5)
    now = time.time()
    batches, expected_valid, expected_bad = {}, [], []
    for partition in (0, 2):
        records = PartitionRecords()
        for offset in range(0, 60 + partition):
            if rng.random() < 0.2:
                key, value, reason = rng.choice(BAD)
                expected_bad.append((partition, offset, reason))
            else:
                user = f"u{rng.randrange(9)}"
                event = ClickEvent(f"e{partition}-{offset}", user, rng.choice(sorted(ITEMS)),
                                   now - 60, rng.choice(["click", "view"]))
                key, value = user.encode(), event.to_json()
                expected_valid.append((partition, offset, event))
            records.keys.append(key)
            records.values.append(value)
            records.offsets.append(offset)
            records.timestamps_ms.append(1_700_000_000_000)
        batches[partition] = records
    consumer = _consumer(3)
    dlq = _DLQ()
    prepared = consumer._decode(batches, dlq)
    consumer._submit(prepared)

    got_bad = [(int(h["source"].decode().split("/")[1]), int(h["source"].decode().split("/")[2]),
                h["reason"].decode()) for _, _, h in dlq.sent]
    assert got_bad == expected_bad
    assert consumer.counts == Counter(f"invalid:{r}" for _, _, r in expected_bad)
    # Each shard got one call with the whole batch's ranges and exactly its users' events.
    routed = []
    for index, shard in enumerate(consumer.shards):
        (events, ranges), = shard.calls
        assert ranges == {0: ("E", 0, 60), 2: ("E", 0, 62)}
        for event_id, user, item, ts, kind, _, partition, offset, kafka_ms in events.rows():
            assert shard_for_user(user, 3) == index
            assert kafka_ms == 1_700_000_000_000
            routed.append((partition, offset, ClickEvent(event_id, user, item, ts, kind)))
    assert sorted(routed, key=lambda r: r[:2]) == expected_valid
    # The event log gets the same valid events, per partition, in offset order.
    logged = [(partition, offset, event) for partition, part in prepared.items()
              for offset, event in zip(part.events.offset, part.events.events(), strict=True)]
    assert logged == expected_valid
    assert sum(s.real.applied for s in consumer.shards) == len(expected_valid)
