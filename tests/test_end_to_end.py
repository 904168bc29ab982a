"""End to end against the real parts: Tansu broker, local Ray, Ray Train, Ray Serve.

One stack for the module (starting it costs ~40 s); tests run in file order.
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import ray
import torch

from services.config_sources import load_settings
from services.data import load_interactions
from services.embedded import free_port
from services.events import ClickEvent
from services.launch.stack import Stack
from services.metrics import parse_prometheus
from services.weights import PromptWeights
from streaming.replay import make_producer, replay, send_events
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
REPLAYED = 3000
ACTIVE_USERS: list[str] = []  # the replay's most active users, filled by the fixture


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    settings = load_settings(env={}, overrides={
        "data_dir": str(tmp_path_factory.mktemp("promptrec")), "http_port": free_port(),
        "metrics_port": free_port(), "partitions": 2, "num_consumers": 2, "num_shards": 2,
        "num_replicas": 2, "train_workers": 2, "train_steps": 4, "batch_size": 16,
        "val_users": 30, "gate_margin": 1.0, "admin_token": TOKEN, "log_flush_s": 0.2,
        "item_bias": True, "item_tokens": True,
        "namespace": "promptrec-e2e", "cache_dir": str(TEST_CACHE)})
    stack = Stack(settings, progress=False).start(fresh=True)
    interactions = load_interactions("ml-100k", REPLAYED)
    sent = replay(stack.bootstrap, settings.streaming.topic_clicks, interactions, "ml-100k",
                  progress=False)
    users, counts = np.unique(interactions.user_ids.astype(str), return_counts=True)
    ACTIVE_USERS[:] = list(users[np.argsort(-counts)][:3])
    assert stack.wait_handled(sent, timeout_s=120)["handled"] == sent
    yield stack
    stack.stop()


def _get(stack, path, **params):
    return httpx.get(f"{stack.base_url}{path}", params=params, timeout=30)


def _produce(stack, events):
    producer = make_producer(stack.bootstrap)
    send_events(producer, stack.settings.streaming.topic_clicks, events)
    producer.close()


def test_replayed_events_reach_user_state(stack):
    stats = stack.streaming.stats()
    assert stats["totals"]["ok"] == REPLAYED
    assert stats["users"] > 10
    body = _get(stack, "/recommend", user_id=ACTIVE_USERS[0], k=5).json()
    assert body["state_version"] > 0 and not body["cold_start"]
    assert len(body["items"]) == 5 and all(i["title"] for i in body["items"])


def test_a_click_changes_state_and_recommendations(stack):
    user = "e2e-user"
    before = _get(stack, "/recommend", user_id=user, k=10).json()
    assert before["cold_start"] and before["state_version"] == 0
    clicked = before["items"][0]["item_id"]
    _produce(stack, [ClickEvent("e2e-1", user, clicked, time.time(), "click")])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = _get(stack, "/recommend", user_id=user, k=10).json()
        if after["state_version"] == 1:
            break
        time.sleep(0.1)
    assert after["state_version"] == 1 and not after["cold_start"]
    assert clicked not in [i["item_id"] for i in after["items"]]  # seen items are masked
    assert after["items"] != before["items"]
    # The same event again (at-least-once redelivery) changes nothing.
    _produce(stack, [ClickEvent("e2e-1", user, clicked, time.time(), "click")])
    time.sleep(1.0)
    assert _get(stack, "/recommend", user_id=user).json()["state_version"] == 1


def test_the_bad_input_corpus_goes_to_the_dead_letter_topic(stack):
    from kafka import KafkaConsumer, KafkaProducer

    from tests.services.test_events import BAD

    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, enable_idempotence=False,
                             max_request_size=8 << 20)
    sendable = [(k, v, r) for k, v, r in BAD if v is not None]
    for key, value, _ in sendable:
        producer.send(stack.settings.streaming.topic_clicks, key=key, value=value)
    producer.close()
    dlq = KafkaConsumer(stack.settings.streaming.topic_dlq, bootstrap_servers=stack.bootstrap,
                        auto_offset_reset="earliest", consumer_timeout_ms=20000,
                        enable_auto_commit=False, fetch_max_bytes=64 << 20,
                        max_partition_fetch_bytes=16 << 20)
    dead = []
    for record in dlq:
        dead.append((record.value, dict(record.headers)))
        if len(dead) >= len(sendable):
            break
    dlq.close()
    assert sorted(h["reason"].decode() for _, h in dead) == sorted(r for _, _, r in sendable)
    topic = stack.settings.streaming.topic_clicks.encode()
    assert all(h["source"].startswith(topic) for _, h in dead)
    # Nothing is lost: the oversized payload is dead-lettered whole.
    assert max(len(v) for v, _ in dead) > 1 << 20
    totals = stack.streaming.stats()["totals"]
    assert totals["invalid:not_json"] == 1 and totals["invalid:unknown_item"] == 1
    assert sum(n for k, n in totals.items() if k.startswith("invalid:")) == len(sendable)


def test_offsets_are_committed_after_apply(stack):
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap)
    deadline = time.monotonic() + 20
    handled = stack.streaming.stats()["handled"]
    committed = 0
    while time.monotonic() < deadline:
        group = stack.settings.streaming.consumer_group
        offsets = admin.list_group_offsets(group)[group]
        committed = sum(o.offset for tp, o in offsets.items()
                        if tp.topic == stack.settings.streaming.topic_clicks)
        if committed == handled:
            break
        time.sleep(0.2)
    admin.close()
    assert committed == handled
    # No consumer failed on the way (a failed loop restarts and rejoins its group).
    assert [c["error"] for c in stack.streaming.stats()["consumers"]] == [None] * len(
        stack.streaming.consumers)


def test_bad_http_input_gets_a_json_4xx(stack):
    cases = [{}, {"user_id": ""}, {"user_id": "x" * 200}, {"user_id": "a\x01b"},
             {"user_id": "1", "k": "0"}, {"user_id": "1", "k": "5000"},
             {"user_id": "1", "k": "many"}, {"user_id": "1", "k": "2.5"}]
    for params in cases:
        response = httpx.get(f"{stack.base_url}/recommend", params=params, timeout=30)
        assert response.status_code == 400, params
        assert "error" in response.json()
    assert _get(stack, "/nope").status_code == 404


def test_training_round_hot_swaps_while_serving(stack):
    old = _get(stack, "/version").json()["prompt_version"]
    results: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=30) as http:
            for n in range(5000):  # bounded in count and time
                if stop.is_set():
                    break
                try:
                    r = http.get(f"{stack.base_url}/recommend",
                                 params={"user_id": ACTIVE_USERS[n % 3], "k": 10})
                    version = r.json().get("prompt_version") if r.status_code == 200 else None
                    results.append((r.status_code, version))
                except httpx.HTTPError:
                    results.append((0, None))
                time.sleep(0.02)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        result = stack.runner.run()
        assert result.outcome == "published", result
        live_ms = stack.wait_all_replicas(result.version)
        time.sleep(1.0)  # some requests after the swap
    finally:
        stop.set()
        thread.join(timeout=60)
    print(f"\npublish -> live per replica: {sorted(live_ms.values())} ms; round "
          f"{result.seconds:.1f} s, fit {result.fit_seconds:.1f} s, {len(results)} requests")
    assert len(live_ms) == stack.settings.serving.num_replicas
    statuses = {status for status, _ in results}
    versions = [v for _, v in results]
    assert statuses == {200}, f"failed requests: {[r for r in results if r[0] != 200][:5]}"
    assert old in versions and result.version in versions
    # Once a replica moved on, nothing older comes back after the all-replicas point.
    assert versions[-1] == result.version
    assert result.version > old
    assert result.candidate_ndcg10 is not None and result.train_examples > 0
    _unlogged_items_take_their_text_neighbours_weights(stack, result.version)


def _unlogged_items_take_their_text_neighbours_weights(stack, version: int) -> None:
    """The round trained item tokens and biases (DDP over 2 workers) and gave every item
    that no logged event names the mean weights of its 10 nearest logged items by text."""
    from services.eventlog import read_event_log
    from services.weights import decode_weights

    weights = decode_weights(ray.get(stack.registry.get.remote(version))["blob"])
    state = weights.tensors()
    logged = sorted({stack.catalog.index[i] for i in read_event_log(
        str(stack.settings.infra.root / "eventlog"))["item_id"].to_pylist()})
    unlogged = sorted(set(range(len(stack.catalog))) - set(logged))
    assert unlogged and (state["item_delta"][logged].abs().sum(1) > 0).all()
    text = stack.catalog.vectors
    near = torch.tensor(logged)[(text[unlogged] @ text[logged].T).topk(10, dim=1).indices]
    for name in ("item_delta", "item_bias"):
        assert torch.allclose(state[name][unlogged], state[name][near].mean(1), atol=1e-6)


def test_a_round_after_its_board_was_lost_starts_a_new_run(stack):
    """The board lives on one node (prefer_labelled_nodes places it); when that node is
    lost, the run's workers lose it too: the next round makes both anew."""
    from training.examples import Examples

    runner, trainer = stack.runner, stack.runner.trainer
    runs, lost = trainer.runs_started, trainer.board
    ray.kill(lost, no_restart=True)
    rng = np.random.default_rng(0)
    n_items = len(stack.catalog)
    rows = Examples(rng.integers(0, n_items, (64, 30), dtype=np.int32),
                    rng.integers(0, n_items, 64, dtype=np.int32))
    serving = ray.get(stack.registry.serving.remote())
    out = trainer.train(rows, stack.catalog.vectors.numpy(),
                        runner._serving_on_catalog(serving).to_bytes(), seed=7,
                        warm_version=serving["version"])
    assert out.started_run and trainer.runs_started == runs + 1
    assert out.blob and np.isfinite(out.loss)
    assert trainer.board != lost


def test_gate_rejects_non_finite_weights(stack):
    import torch

    from training.examples import Examples
    from training.round import RoundResult

    before = ray.get(stack.registry.serving_version.remote())
    bad = PromptWeights.plain(torch.full((16, 384), float("nan")), torch.tensor(1.0)).to_bytes()
    result = RoundResult(round=99, outcome="", reason="", version=None, serving_version=before,
                         train_examples=0, val_examples=0, loss=None, candidate_ndcg10=None,
                         serving_ndcg10=None, candidate_hr10=None, serving_hr10=None,
                         fit_seconds=0, train_seconds=0, started_run=False,
                         seconds=0)
    serving = ray.get(stack.registry.serving.remote())
    no_validation = Examples(np.zeros((0, 30), np.int32), np.zeros(0, np.int32))
    stack.runner._gate(result, bad, serving, no_validation)
    assert result.outcome == "rejected" and "non-finite" in result.reason
    assert ray.get(stack.registry.serving_version.remote()) == before


def test_metrics_endpoint_exports_the_service_metrics(stack):
    wanted = {"promptrec_events_consumed_total", "promptrec_serving_prompt_version",
              "promptrec_request_seconds_bucket"}
    serving = ray.get(stack.registry.serving_version.remote())

    def replica_versions(scraped):
        return {v for _, v in scraped.get("promptrec_serving_prompt_version", [])}

    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while time.monotonic() < deadline:
        scraped = parse_prometheus(httpx.get(stack.metrics_url, timeout=10).text)
        if wanted <= set(scraped) and replica_versions(scraped) == {float(serving)}:
            break
        time.sleep(1)
    assert wanted <= set(scraped), sorted(k for k in scraped if k.startswith("promptrec"))
    assert replica_versions(scraped) == {float(serving)}
    ok = sum(v for labels, v in scraped["promptrec_events_consumed_total"]
             if labels.get("result") == "ok")
    assert ok >= REPLAYED
    replicas = {labels.get("replica") for labels, _ in scraped["promptrec_serving_prompt_version"]}
    assert replicas and all(replicas)  # labelled by replica


def test_rounds_reuse_one_long_lived_training_run(stack):
    runner = stack.runner
    if not runner.trainer.running:  # run alone: the first round starts the run
        runner.run(since_ingest_ts=0.0)
    runs = runner.trainer.runs_started
    result = runner.run(since_ingest_ts=0.0)
    assert result.outcome in ("published", "rejected"), result
    assert not result.started_run and runner.trainer.runs_started == runs
    assert 0 < result.train_seconds <= result.fit_seconds <= result.seconds


def test_the_encoder_alone_encodes_the_pool_users_in_batches(stack):
    from bench.encoder_only import encoder_only

    out = encoder_only(stack, ACTIVE_USERS, encoders=2, batch_size=3, seconds=1.0)
    assert out["users"] == len(ACTIVE_USERS)  # every pool user's state was read
    assert out["encoder_only_rps"] > 0 and out["encoders"] == 2 and out["batch_size"] == 3
