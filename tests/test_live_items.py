"""Items that change while the service runs, through the real stack: records on
`promptrec.items` become catalog versions that /recommend and /similar serve, hidden and
deleted items stop being returned, events for an item not yet there are held for it,
bad records are dead-lettered with a reason, and a training round trains the new items."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
import ray
from kafka import KafkaConsumer, KafkaProducer

from services.config_sources import load_settings
from services.data import Item
from services.embedded import free_port
from services.eventlog import read_event_log
from services.health import wait_until
from services.item_records import encode_item
from services.launch.stack import Stack
from services.naming import shard_actor, shard_for_user
from services.weights import decode_weights
from tests.conftest import TEST_CACHE
from tests.test_own_catalog import _catalog

pytestmark = pytest.mark.slow
NAMESPACE = "promptrec-live-items"
HOLD_S = 2.0


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live-items")
    rows = _catalog(tmp / "items.jsonl")
    settings = load_settings(env={}, overrides={
        "catalog": str(tmp / "items.jsonl"), "data_dir": str(tmp / "promptrec"),
        "http_port": free_port(), "metrics_port": free_port(), "partitions": 2,
        "num_consumers": 1, "num_shards": 2, "num_replicas": 1, "train_every_events": 0,
        "namespace": NAMESPACE, "cache_dir": str(TEST_CACHE), "hold_unknown_s": HOLD_S,
        "train_steps": 3, "gate_margin": 1.0, "val_users": 5})
    stack = Stack(settings, progress=False).start(fresh=True)
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=0)
    try:
        yield stack, producer, rows
    finally:
        producer.close()
        stack.stop()


def _get(stack, path, **params) -> httpx.Response:
    return httpx.get(f"{stack.base_url}{path}", params=params, timeout=30)


def _publish(stack, producer, item_id: str, value: bytes | None) -> None:
    producer.send(stack.settings.items.topic_items, key=item_id.encode(), value=value)
    producer.flush()


def _recommended(stack, category: str, user: str = "visitor") -> dict:
    return _get(stack, "/recommend", user_id=user, k=50, category=category).json()


def _catalog_where(stack, holds, what: str) -> int:
    """Wait for a catalog version (as the driver follows it) where `holds(catalog)` -> its
    version number."""
    return wait_until(lambda: holds(c := stack.catalogs.catalog) and c.version, 60, what, 0.02)


def _read(stack, topic: str, wanted: int, match) -> list:
    """The first `wanted` records of `topic` that `match` (deadline 60 s)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=stack.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=60_000,
                             enable_auto_commit=False)
    found = []
    try:
        for record in consumer:
            if match(record):
                found.append(record)
                if len(found) >= wanted:
                    break
    finally:
        consumer.close()
    return found


def test_an_item_published_while_serving_is_recommended_from_its_text(live):
    stack, producer, _ = live
    before = _recommended(stack, "ice-gear")
    assert before["items"] == [] and before["catalog_version"] >= 1
    item = Item("axe-1", "Ice axe", description="A steel axe for glacier travel.",
                categories=("ice-gear", "outdoor"))
    _publish(stack, producer, item.item_id, encode_item(item))
    body = wait_until(lambda: (b := _recommended(stack, "ice-gear"))["items"] and b, 60,
                      "the new item recommended", 0.02)
    assert [e["item_id"] for e in body["items"]] == ["axe-1"]
    assert body["catalog_version"] > before["catalog_version"]
    # Rankable from its text: its neighbours are the catalog's nearest texts, and it ranks
    # among the whole catalog for a user with no history.
    near = _get(stack, "/similar", item_id="axe-1", k=3).json()
    assert len(near["items"]) == 3 and near["catalog_version"] == body["catalog_version"]
    everything = _get(stack, "/recommend", user_id="visitor", k=100).json()
    assert "axe-1" in {e["item_id"] for e in everything["items"]}


def test_hidden_and_deleted_items_are_never_returned_once_their_update_is_live(live):
    stack, producer, _ = live
    keep = Item("lamp-1", "Lantern", categories=("hide-test",))
    hide = Item("lamp-2", "Lantern with a hook", categories=("hide-test",))
    gone = Item("lamp-3", "Lantern, folding", categories=("hide-test",))
    for item in (keep, hide, gone):
        _publish(stack, producer, item.item_id, encode_item(item))
    wait_until(lambda: len(_recommended(stack, "hide-test")["items"]) == 3, 60,
               "three lanterns live", 0.05)
    answers: list[dict] = []
    stop = threading.Event()

    def load() -> None:  # requests keep coming while the updates go live
        with httpx.Client(base_url=stack.base_url, timeout=30) as http:
            while not stop.is_set():
                answers.append(http.get("/recommend", params={
                    "user_id": "visitor", "k": 50, "category": "hide-test"}).json())

    thread = threading.Thread(target=load)
    thread.start()
    try:
        hidden = Item(hide.item_id, hide.title, categories=hide.categories, available=False)
        _publish(stack, producer, hide.item_id, encode_item(hidden))
        _publish(stack, producer, gone.item_id, None)  # a null value deletes
        live_from = _catalog_where(
            stack, lambda c: "lamp-3" not in c.index and "lamp-2" in c.index
            and c.index["lamp-2"] in c.unavailable, "both updates in a catalog version")
        wait_until(lambda: answers and answers[-1]["catalog_version"] >= live_from, 60,
                   "answers from the version with both updates", 0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    after = [a for a in answers if a["catalog_version"] >= live_from]
    assert after, "no answer from the updated catalog"
    for answer in after:
        assert [e["item_id"] for e in answer["items"]] == ["lamp-1"], answer
    assert _get(stack, "/similar", item_id="lamp-3").status_code == 404
    assert _get(stack, "/similar", item_id="lamp-2").status_code == 200  # hidden, not gone
    assert "lamp-2" not in {e["item_id"] for e in
                            _get(stack, "/similar", item_id="lamp-1", k=50).json()["items"]}


def test_a_changed_text_is_embedded_again(live):
    stack, producer, _ = live
    item = Item("mystery-1", "Trail shoe", description="A trail shoe for hikers.",
                categories=("changing",))
    _publish(stack, producer, item.item_id, encode_item(item))
    wait_until(lambda: _recommended(stack, "changing")["items"], 60, "item live", 0.05)
    near = {e["item_id"] for e in _get(stack, "/similar", item_id="mystery-1", k=3).json()["items"]}
    changed = Item("mystery-1", "Compass", description="A compass for hikers.",
                   categories=("changing",))
    _publish(stack, producer, item.item_id, encode_item(changed))
    new_version = _catalog_where(
        stack, lambda c: c.items[c.index["mystery-1"]].title == "Compass", "the change")

    def neighbours() -> set[str] | None:
        body = _get(stack, "/similar", item_id="mystery-1", k=3).json()
        return {e["item_id"] for e in body["items"]} \
            if body["catalog_version"] >= new_version else None

    after = wait_until(neighbours, 60, "the changed item served", 0.05)
    shoes = {f"sku-{k:03d}" for k in (0, 10, 20)}
    compasses = {f"sku-{k:03d}" for k in (9, 19, 29)}
    assert near == shoes and after == compasses


def test_an_event_for_an_item_not_yet_in_the_catalog_is_held_until_it_arrives(live):
    stack, producer, _ = live
    user = f"early-{uuid.uuid4().hex[:6]}"
    event = {"event_id": f"{user}-1", "user_id": user, "item_id": "stove-9",
             "ts": time.time(), "type": "click"}
    held_before = stack.streaming.stats()["totals"].get("held:unknown_item", 0)
    producer.send(stack.settings.streaming.topic_clicks, key=user.encode(),
                  value=json.dumps(event).encode())
    producer.flush()
    wait_until(lambda: stack.streaming.stats()["totals"].get("held:unknown_item", 0)
               > held_before, 60, "the event held", 0.05)
    shard = ray.get_actor(shard_actor(shard_for_user(user, 2)), namespace=NAMESPACE)
    assert ray.get(shard.get_user.remote(user)) is None  # held, not applied
    _publish(stack, producer, "stove-9", encode_item(Item("stove-9", "Alcohol stove")))
    state = wait_until(lambda: ray.get(shard.get_user.remote(user)), 60,
                       "the held event applied", 0.05)
    assert state["history"] == ["stove-9"] and state["state_version"] == 1
    # The shards hold no vectors of their own (follow_catalog): the personal prompt moved
    # in the live catalog, which has the new item.
    assert state["personal"] is not None and np.linalg.norm(state["personal"]) > 0


def test_an_event_whose_item_never_arrives_is_dead_lettered_after_the_hold(live):
    stack, producer, _ = live
    event_id = f"lost-{uuid.uuid4().hex[:8]}"
    event = {"event_id": event_id, "user_id": "u-lost", "item_id": "never-there",
             "ts": time.time(), "type": "click"}
    sent = time.monotonic()
    producer.send(stack.settings.streaming.topic_clicks, key=b"u-lost",
                  value=json.dumps(event).encode())
    producer.flush()
    [record] = _read(stack, stack.settings.streaming.topic_dlq, 1,
                     lambda r: json.loads(r.value).get("event_id") == event_id)
    assert time.monotonic() - sent >= HOLD_S * 0.9  # held first, not dead-lettered at once
    headers = dict(record.headers)
    assert headers["reason"] == b"unknown_item" and b"never-there" in headers["detail"]
    # Expiring alone (nothing released with it) did not fail the consumer's loop.
    assert [c["error"] for c in stack.streaming.stats()["consumers"]] == [None]


def test_bad_item_records_go_to_the_item_dead_letter_topic_with_a_reason(live):
    stack, producer, _ = live
    tag = uuid.uuid4().hex[:6]
    bad = {f"bad-{tag}-1": (b"{not json", "not_json"),
           f"bad-{tag}-2": (json.dumps({"title": "No id"}).encode(), "missing_id"),
           f"bad-{tag}-3": (json.dumps({"item_id": f"bad-{tag}-3", "title": " "}).encode(),
                            "empty_title"),
           f"bad-{tag}-4": (json.dumps({"item_id": f"bad-{tag}-4", "title": "T",
                                        "categories": "a|b"}).encode(), "wrong_type"),
           f"bad-{tag}-5": (json.dumps({"item_id": f"bad-{tag}-5", "title": "T",
                                        "colour": "red"}).encode(), "unknown_field"),
           f"bad-{tag}-6": (json.dumps({"item_id": "someone-else", "title": "T"}).encode(),
                            "key_mismatch")}
    for key, (value, _) in bad.items():
        _publish(stack, producer, key, value)
    long_text = Item(f"long-{tag}", "Long read", text="word " * 5000, categories=(f"long-{tag}",))
    _publish(stack, producer, long_text.item_id, encode_item(long_text))
    dead = _read(stack, stack.settings.items.topic_items_dlq, len(bad),
                 lambda r: r.key is not None and r.key.decode() in bad)
    assert {r.key.decode(): dict(r.headers)["reason"].decode() for r in dead} == \
        {key: reason for key, (_, reason) in bad.items()}
    assert all(dict(r.headers)["source"].startswith(b"promptrec.items/") for r in dead)
    # Over-long text is cut and counted, not refused: the item is live.
    wait_until(lambda: _recommended(stack, f"long-{tag}")["items"], 60, "long item live", 0.05)
    assert stack.streaming.stats()["items"]["counts"]["truncated"] >= 1


def test_the_next_training_round_trains_the_new_items(live):
    stack, producer, rows = live
    new = Item("bivy-1", "Bivy sack", description="A bivy sack for hikers.",
               categories=("bivy",))
    _publish(stack, producer, new.item_id, encode_item(new))
    wait_until(lambda: _recommended(stack, "bivy")["items"], 60, "new item live", 0.05)
    ids = [r["item_id"] for r in rows if r["item_id"] != "sku-007"]  # 007 is unavailable
    now = time.time() - 3600
    # Each user's last click is the new item: a target in a fifth of the training rows.
    events = [{"event_id": f"tr-{u}-{j}", "user_id": f"trainee-{u}",
               "item_id": ids[(3 * u + j) % len(ids)] if j < 5 else new.item_id,
               "ts": now + 10 * u + j, "type": "click"} for u in range(30) for j in range(6)]
    handled = stack.streaming.stats()["handled"]
    for e in events:
        producer.send(stack.settings.streaming.topic_clicks, key=e["user_id"].encode(),
                      value=json.dumps(e).encode())
    producer.flush()
    stack.wait_handled(handled + len(events), timeout_s=120)
    # The event log is written at the consumer's next flush: wait for it, not a fixed time.
    wait_until(lambda: len({i for i in read_event_log(str(stack.settings.infra.root /
                                                          "eventlog"))["event_id"].to_pylist()
                            if i.startswith("tr-")}) == len(events), 60, "events logged", 0.2)
    result = stack.runner.run(since_ingest_ts=0.0)
    assert result.outcome == "published", result
    blob = ray.get(stack.registry.serving.remote())["blob"]
    trained = decode_weights(blob)
    assert trained.item_ids is not None and "bivy-1" in trained.item_ids
    row = trained.item_ids.index("bivy-1")
    # Trained as a target in many rows, its bias rose above the catalog's mean.
    assert float(trained.item_bias[row]) > float(trained.item_bias.mean())
    stack.wait_all_replicas(result.version)
    assert _recommended(stack, "bivy")["prompt_version"] == result.version


def test_promptrec_items_publishes_an_item_file_and_deletes(live, tmp_path):
    from services.launch.cli import main

    stack, _, _ = live
    path = tmp_path / "new_items.csv"
    path.write_text("item_id,title,categories\ncli-1,Folding saw,cli-cat\n"
                    "cli-2,Pruning saw,cli-cat\n")
    assert main(["items", str(path), "--kafka-bootstrap", stack.bootstrap]) == 0
    wait_until(lambda: {e["item_id"] for e in _recommended(stack, "cli-cat")["items"]}
               == {"cli-1", "cli-2"}, 60, "both items live", 0.05)
    assert main(["items", "--delete", "cli-1", "--kafka-bootstrap", stack.bootstrap]) == 0
    wait_until(lambda: [e["item_id"] for e in _recommended(stack, "cli-cat")["items"]]
               == ["cli-2"], 60, "cli-1 deleted", 0.05)
