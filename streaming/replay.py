"""Replay events (a MovieLens set or an event file) into Kafka as click events, in
timestamp order; publish items (an item file) and deletes to the item topic, and user
profiles and their deletes to the profile topic."""

from __future__ import annotations

import json
from collections.abc import Iterable

from services.data import Interactions, Item
from services.events import ClickEvent
from services.item_fields import UserProfile
from services.item_records import encode_item
from services.user_records import encode_profile


def make_producer(bootstrap: str, security: dict | None = None):
    """A producer for replays; `security`: kafka-python options (KafkaSecurity)."""
    from kafka import KafkaProducer

    # enable_idempotence=False: an idempotent producer cannot survive a broker that
    # restarts with empty (memory) storage, which the embedded broker does.
    return KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False, acks=1,
                         linger_ms=10, batch_size=256 * 1024, client_id="promptrec-replay",
                         **(security or {}))


def send_events(producer, topic: str, events: Iterable[ClickEvent],
                quotes: dict[str, str] | None = None) -> int:
    """Produce `events` (key user_id) and flush. `quotes`: event_id -> the request_id an
    event answers (the optional field the live metrics credit it by); used ones are
    removed from it."""
    sent = 0
    for event in events:
        value = event.to_json()
        if quotes and (request_id := quotes.pop(event.event_id, None)):
            value = json.dumps({**event.to_dict(), "request_id": request_id},
                               separators=(",", ":")).encode()
        producer.send(topic, key=event.user_id.encode(), value=value)
        sent += 1
    producer.flush()
    return sent


def replay(bootstrap: str, topic: str, interactions: Interactions, label: str,
           start: int = 0, stop: int | None = None, progress: bool = True,
           security: dict | None = None) -> int:
    """Produce events [start, stop) of `interactions` (`label`: where they come from, for
    the progress bar; `security`: kafka-python options); returns how many were sent."""
    stop = len(interactions) if stop is None else min(stop, len(interactions))
    indices: Iterable[int] = range(start, stop)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"replaying {label} into {topic}", unit="ev",
                       unit_scale=True, mininterval=0.5)
    producer = make_producer(bootstrap, security)
    try:
        return send_events(producer, topic, (interactions.event(i) for i in indices))
    finally:
        producer.close()


def publish_items(bootstrap: str, topic: str, items: list[Item], deletes: list[str],
                  security: dict | None = None) -> int:
    """Each item as a record of the item topic (key = item_id), then a null-value record
    (a delete) for each id in `deletes`; returns how many were sent."""
    return _publish(bootstrap, topic, [(i.item_id, encode_item(i)) for i in items], deletes,
                    security)


def publish_profiles(bootstrap: str, topic: str, profiles: list[UserProfile],
                     deletes: list[str], security: dict | None = None) -> int:
    """Each profile as a record of the profile topic (key = user_id), then a null-value
    record (a delete of that user's profile) for each id in `deletes` -> how many sent."""
    return _publish(bootstrap, topic, [(p.user_id, encode_profile(p)) for p in profiles],
                    deletes, security)


def _publish(bootstrap: str, topic: str, upserts: list[tuple[str, bytes]], deletes: list[str],
             security: dict | None) -> int:
    producer = make_producer(bootstrap, security)
    try:
        for key, value in upserts:
            producer.send(topic, key=key.encode(), value=value)
        for key in deletes:
            producer.send(topic, key=key.encode(), value=None)
        producer.flush()
    finally:
        producer.close()
    return len(upserts) + len(deletes)
