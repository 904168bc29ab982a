"""Profile records against the real broker and real Ray actors: they flow through Kafka
into the shards (get_user shows them), malformed ones arrive on the dead-letter topic with
their reasons and are counted, a delete removes the profile, and after a shard is killed
mid-stream the final profiles equal an uninterrupted run, also when no profile follows
the kill."""

from __future__ import annotations

import time
import uuid

import pytest
import ray

from services.config_sources import load_settings
from services.embedded import EmbeddedBroker, ensure_topics
from services.item_fields import UserProfile
from services.movielens import user_table
from services.naming import shard_for_user
from services.user_records import encode_profile
from streaming.plane import start_streaming
from streaming.replay import make_producer
from streaming.shard import UserStateShard

pytestmark = pytest.mark.slow

PROFILE_KEYS = ("profile", "profile_attributes", "profile_version")
BAD = [  # (key, value, reason): one of each class the consumer must refuse, not stop on
    (b"u1", b"not json", "not_json"),
    (b"u1", b"[1, 2]", "not_object"),
    (b"u1", b'{"text": "no id"}', "missing_id"),
    (b"u1", b'{"user_id": "u2", "text": "someone else"}', "key_mismatch"),
    (b"u1", b'{"user_id": "u1", "text": 5}', "wrong_type"),
    (b"u1", b'{"user_id": "u1", "text": "x", "age": 3}', "unknown_field"),
    (b"u1", b'{"user_id": "u1", "text": "  "}', "empty_text"),
    (b" u1", None, "bad_id"),  # a delete whose key is no id
]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log").start()
    yield broker
    broker.stop()


def _settings(tmp_path, snapshot_every_s: float = 0.3):
    run = uuid.uuid4().hex[:8]
    return load_settings(env={}, overrides={
        "data_dir": str(tmp_path), "topic_clicks": f"clicks-{run}", "topic_dlq": f"dlq-{run}",
        "topic_users": f"users-{run}", "topic_users_dlq": f"users-dlq-{run}",
        "consumer_group": f"group-{run}", "namespace": f"profiles-{run}", "partitions": 1,
        "num_consumers": 1, "num_shards": 2, "snapshot_every_s": snapshot_every_s,
        "log_flush_s": 0.2, "poll_max_records": 50, "max_user_text_chars": 40})


def _start(settings, broker):
    ensure_topics(broker.bootstrap, {settings.streaming.topic_clicks: 1,
                                     settings.streaming.topic_dlq: 1,
                                     settings.profiles.topic_users: 2,
                                     settings.profiles.topic_users_dlq: 1})
    return start_streaming(settings, broker.bootstrap, [], profiles=True)


def _send(broker, topic, records) -> None:
    producer = make_producer(broker.bootstrap)
    for key, value in records:
        producer.send(topic, key=key, value=value)
    producer.close()


def _records(profiles, deletes=()):
    return [(p.user_id.encode(), encode_profile(p)) for p in profiles] + \
        [(user.encode(), None) for user in deletes]


def _wait(plane, done, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done(stats := plane.stats()):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"{what}: {plane.stats()}")


def _profiles(plane) -> dict:
    merged = {}
    for dump in ray.get([s.dump.remote() for s in plane.shards]):
        merged.update({u: {k: state[k] for k in PROFILE_KEYS} for u, state in dump.items()})
    return merged


def _reference(settings, records) -> dict:
    """The profiles one uninterrupted shard reaches from the valid records, in order."""
    from services.user_records import InvalidUserRecord, ProfileDelete, decode_user_record

    shard = UserStateShard(0, settings.streaming)
    rows = []
    for offset, (key, value) in enumerate(records):
        try:
            got = decode_user_record(key, value, settings.profiles.max_user_text_chars)
        except InvalidUserRecord:
            continue
        rows.append((0, offset, got.user_id, None, {}) if isinstance(got, ProfileDelete)
                    else (0, offset, got.profile.user_id, got.profile.text,
                          got.profile.attributes))
    shard.apply_profiles(rows, {0: ("R", 0, len(records))})
    return {u: {k: state[k] for k in PROFILE_KEYS} for u, state in shard.dump().items()}


def test_profiles_flow_into_the_shards_and_bad_records_are_dead_lettered(
        tmp_path, ray_session, broker):
    from kafka import KafkaConsumer

    settings = _settings(tmp_path)
    plane = _start(settings, broker)
    try:
        topic = settings.profiles.topic_users
        good = [UserProfile("u1", "A hiker who likes wet rock.", {"age": "25-34"}),
                UserProfile("u2", "Long " * 20), UserProfile("u3", "Reads old maps.")]
        _send(broker, topic, _records(good) + [(k, v) for k, v, _ in BAD]
              + _records([], deletes=["u3"]))
        n = len(good) + len(BAD) + 1
        stats = _wait(plane, lambda s: sum(v for k, v in s["profiles"]["counts"].items()
                                           if k.split(":")[0] in ("upsert", "delete",
                                                                  "invalid")) >= n,
                      "every record handled")
        counts = stats["profiles"]["counts"]
        assert counts["upsert"] == 3 and counts["delete"] == 1 and counts["truncated"] == 1
        assert {k.split(":")[1] for k in counts if k.startswith("invalid:")} == \
            {r for _, _, r in BAD}
        shard = plane.shards[shard_for_user("u1", 2)]
        _wait(plane, lambda s: ray.get(shard.get_user.remote("u1")) is not None, "u1 applied")
        u1 = ray.get(shard.get_user.remote("u1"))
        assert (u1["profile"], u1["profile_attributes"], u1["history"]) == \
            ("A hiker who likes wet rock.", {"age": "25-34"}, [])
        u2 = ray.get(plane.shards[shard_for_user("u2", 2)].get_user.remote("u2"))
        assert u2["profile"] == ("Long " * 20).strip()[:40]
        u3 = ray.get(plane.shards[shard_for_user("u3", 2)].get_user.remote("u3"))
        assert u3["profile"] is None and u3["profile_version"] == 2  # set, then deleted

        dlq = KafkaConsumer(settings.profiles.topic_users_dlq, bootstrap_servers=broker.bootstrap,
                            auto_offset_reset="earliest", consumer_timeout_ms=20000,
                            enable_auto_commit=False)
        dead = []
        for record in dlq:
            dead.append(dict(record.headers))
            if len(dead) >= len(BAD):
                break
        dlq.close()
        assert sorted(h["reason"].decode() for h in dead) == sorted(r for _, _, r in BAD)
        assert all(h["source"].startswith(topic.encode()) for h in dead)
    finally:
        plane.stop()


def test_a_killed_shard_gets_back_the_profiles_its_snapshot_lacked(
        tmp_path, ray_session, broker):
    settings = _settings(tmp_path, snapshot_every_s=3600)  # only the snapshot taken below
    plane = _start(settings, broker)
    try:
        topic = settings.profiles.topic_users
        profiles = [UserProfile(p["user_id"], p["text"], dict(p["attributes"]))
                    for p in user_table("ml-100k").slice(0, 300).to_pylist()]
        first = _records(profiles[:150])
        # The second half rewrites some profiles and deletes others: order matters.
        second = _records([UserProfile(p.user_id, p.text + " Likes westerns.")
                           for p in profiles[:40]] + profiles[150:],
                          deletes=[p.user_id for p in profiles[40:60]])
        _send(broker, topic, first)
        _wait(plane, lambda s: sum(x["profiles_applied"] for x in s["shards"]) >= 150,
              "first half applied")
        ray.get(plane.shards[0].snapshot.remote())  # what shard 0 applies after this is lost
        _send(broker, topic, second)
        everything = first + second
        _wait(plane, lambda s: sum(x["profiles_applied"] for x in s["shards"])
              >= len(everything), "second half applied")
        ray.kill(plane.shards[0], no_restart=False)
        deadline = time.monotonic() + 60  # ray.kill is asynchronous
        while ray.get(plane.shards[0].stats.remote())["restored_from"] is None:
            assert time.monotonic() < deadline, "the shard never restored a snapshot"
            time.sleep(0.2)
        reference = _reference(settings, everything)
        # No profile follows the kill: the consumer notices the new incarnation itself.
        _wait(plane, lambda s: _profiles(plane) == reference, "profiles back after the kill")
        assert plane.stats()["profiles"]["syncs"] >= 2  # at start, and after the kill
    finally:
        plane.stop()
