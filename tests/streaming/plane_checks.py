"""Checks shared by the streaming plane's fault and secured-Kafka tests: the state an
uninterrupted shard reaches, and a running plane's state compared with it."""

from __future__ import annotations

import time

import numpy as np
import ray

from services.batch import EventBatch
from services.config import Settings
from streaming.replay import make_producer, send_events
from streaming.shard import UserStateShard


def same_state_reference(settings: Settings, catalog, events) -> dict:
    """The state of one uninterrupted shard fed every event once, in order."""
    shard = UserStateShard(0, settings.streaming, catalog.vectors.numpy(), list(catalog.index))
    shard.apply(EventBatch.of(events), {0: ("E", 0, len(events))})
    return shard.dump()


def wait_applied(plane, expected: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if plane.stats()["applied"] >= expected:
            return
        time.sleep(0.3)
    raise AssertionError(f"applied {plane.stats()['applied']} of {expected}: {plane.stats()}")


def assert_same_state(plane, reference: dict) -> None:
    time.sleep(1.0)  # anything applied twice would show up now
    merged: dict = {}
    for dump in ray.get([s.dump.remote() for s in plane.shards]):
        assert not set(dump) & set(merged), "a user lives in two shards"
        merged.update(dump)
    assert set(merged) == set(reference)
    for user, state in reference.items():
        got = merged[user]
        assert got["history"] == state["history"], user
        assert got["state_version"] == state["state_version"], user
        assert np.allclose(got["personal"], state["personal"], atol=1e-6), user


def produce(bootstrap, topic, events, security: dict | None = None):
    producer = make_producer(bootstrap, security)
    send_events(producer, topic, events)
    producer.close()
