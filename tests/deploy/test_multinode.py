"""The stack on a Ray cluster it did not start: two nodes from `ray start` (a head and a
second node joining it), the driver connecting with `ray_address`, as an operator runs it.
Events -> per-user state -> a training round -> a hot swap, with actors on both nodes;
then with actors placed by node labels, the second node lost mid-stream: its actors come
back on the head, and the per-user state equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray

from services.config_sources import load_settings
from services.data import load_interactions
from services.embedded import free_port
from services.health import wait_until
from services.launch.stack import Stack
from services.naming import shard_actor, shard_for_user
from services.ray_private import actor_nodes
from streaming.replay import replay
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.slow

REPLAYED = 2000
RAY = str(Path(sys.executable).with_name("ray"))
# A joining node and the CLI need the token mode said; the head made ~/.ray/auth_token.
# A lost node is declared dead after ~3 missed 1 s health checks (default ~5 x 3 s).
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_worker_niceness": "0",
           "RAY_worker_maximum_startup_concurrency": "8",  # as the local stack (ray_private)
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
# Serve, once started on the cluster, keeps its HTTP port for every later app: one port
# for the module's stacks.
HTTP_PORT = free_port()
# What each node hosts when prefer_labelled_nodes is on (services/placement.py).
HEAD_LABELS = {"promptrec-registries": "yes", "promptrec-consumers": "yes",
               "promptrec-train": "yes"}
SECOND_LABELS = {"promptrec-shards": "yes", "promptrec-replicas": "yes"}


def ray_cli(*args: str) -> None:
    done = subprocess.run([RAY, *args], env=RAY_ENV, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture(scope="module")
def cluster():
    """-> the head's GCS address; both nodes stopped afterwards. 4 logical CPUs each:
    the 8 of the local stack (`ray_num_cpus`), which the actors and a round's workers fit."""
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    if ray.is_initialized():
        ray.shutdown()
    # A driver given an address must be told the token mode before Ray reads its config
    # (an operator sets RAY_AUTH_MODE=token before starting it); this process imported
    # Ray long ago, so it takes Ray's own refresh, as ray.init does for a local cluster.
    _enable_token_auth()
    if not (Path.home() / ".ray" / "auth_token").exists() and "RAY_AUTH_TOKEN" not in os.environ:
        ray_cli("get-auth-token", "--generate")  # a fresh machine: as a local ray.init does
    port = free_port()
    try:
        ray_cli("start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false",
                "--disable-usage-stats", '--resources={"head_node": 1}',
                f"--labels={json.dumps(HEAD_LABELS)}")
        ray_cli("start", f"--address=127.0.0.1:{port}", "--num-cpus=4",
                "--disable-usage-stats", '--resources={"second_node": 1}',
                f"--labels={json.dumps(SECOND_LABELS)}")
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        ray_cli("stop", "--force")


def test_the_stack_runs_on_a_two_node_cluster_it_did_not_start(cluster, tmp_path):
    settings = load_settings(env={}, overrides={
        "ray_address": cluster, "data_dir": str(tmp_path / "promptrec"),
        "http_port": HTTP_PORT, "metrics_port": free_port(), "partitions": 2,
        "num_consumers": 2, "num_shards": 2, "num_replicas": 2, "train_workers": 2,
        "train_steps": 4, "batch_size": 16, "val_users": 30, "gate_margin": 1.0,
        "log_flush_s": 0.2, "namespace": "promptrec-multinode", "cache_dir": str(TEST_CACHE)})
    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        nodes = {n["NodeID"]: "head" if n["Resources"].get("head_node") else "second"
                 for n in ray.nodes() if n["Alive"]}
        assert sorted(nodes.values()) == ["head", "second"]
        placed = {(cls, nodes.get(node)) for cls, _, node in actor_nodes()}
        # Ray spreads the stack: some of its actors run on the node that joined.
        ours = {cls for cls, where in placed if where == "second"}
        assert ours, f"nothing on the second node: {sorted(placed)}"

        interactions = load_interactions("ml-100k", REPLAYED)
        sent = replay(stack.bootstrap, settings.streaming.topic_clicks, interactions,
                      "ml-100k", progress=False)
        assert stack.wait_handled(sent, timeout_s=180)["handled"] == sent
        users, counts = np.unique(interactions.user_ids.astype(str), return_counts=True)
        user = str(users[np.argmax(counts)])
        shard = ray.get_actor(shard_actor(shard_for_user(user, 2)),
                              namespace=settings.infra.namespace)
        state = ray.get(shard.get_user.remote(user))
        expected = min(int(counts.max()), settings.streaming.history_len)
        assert state is not None and len(state["history"]) == expected

        result = stack.runner.run()
        assert result.outcome == "published", result
        # The head's proxy routes to the replica on its own node (Serve prefers it), so
        # this checks the swap there; each replica's swap is its own long-poll either way.
        def recommend() -> dict | None:
            answer = httpx.get(f"{stack.base_url}/recommend",
                               params={"user_id": user, "k": 5}, timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json() if answer.json()["prompt_version"] == result.version else None

        body = wait_until(recommend, 120, f"an answer from version {result.version}", 0.5)
        assert len(body["items"]) == 5 and body["state_version"] == state["state_version"]
    finally:
        stack.stop()


def _node_names() -> dict[str, str]:
    return {n["NodeID"]: "head" if n["Resources"].get("head_node") else "second"
            for n in ray.nodes() if n["Alive"]}


def _kill_second_raylet() -> None:
    """SIGKILL the second node's raylet, as a machine lost: its workers go with it."""
    node_id = next(n["NodeID"] for n in ray.nodes()
                   if n["Alive"] and n["Resources"].get("second_node"))
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[0].endswith(b"/raylet") and f"--node_id={node_id}".encode() in args:
            pids.append(int(proc.name))
    assert pids, "no raylet of the second node"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_a_lost_node_s_actors_come_back_on_the_head_with_their_state(cluster, tmp_path):
    from tests.streaming.plane_checks import assert_same_state, same_state_reference

    settings = load_settings(env={}, overrides={
        "ray_address": cluster, "data_dir": str(tmp_path / "promptrec"),
        "http_port": HTTP_PORT, "metrics_port": free_port(), "partitions": 2,
        "num_consumers": 2, "num_shards": 2, "num_replicas": 1, "snapshot_every_s": 0.3,
        "log_flush_s": 0.2, "prefer_labelled_nodes": True, "train_workers": 2,
        "train_steps": 4, "batch_size": 16, "val_users": 30, "gate_margin": 1.0,
        "namespace": "promptrec-node-loss", "cache_dir": str(TEST_CACHE)})
    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        nodes = _node_names()
        placed = {(cls, nodes.get(node)) for cls, _, node in actor_nodes()}
        for cls, where in [("UserStateShard", "second"), ("IngestConsumer", "head"),
                           ("PromptRegistry", "head"), ("CatalogRegistry", "head")]:
            assert (cls, where) in placed and (cls, {"head": "second", "second": "head"}[where]
                                               ) not in placed, sorted(placed)
        assert any("Recommender" in cls and where == "second" for cls, where in placed), placed

        interactions = load_interactions("ml-100k", REPLAYED)
        events = [interactions.event(i) for i in range(len(interactions))]
        half = REPLAYED // 2
        replay(stack.bootstrap, settings.streaming.topic_clicks, interactions, "ml-100k",
               stop=half, progress=False)
        wait_until(lambda: stack.streaming.stats()["applied"] >= half // 2, 120,
                   "a quarter of the events applied", 0.2)
        _kill_second_raylet()  # mid-stream
        wait_until(lambda: "second" not in _node_names().values(), 60,
                   "the second node declared dead", 0.5)
        replay(stack.bootstrap, settings.streaming.topic_clicks, interactions, "ml-100k",
               start=half, progress=False)
        wait_until(lambda: stack.streaming.stats()["applied"] >= REPLAYED, 240,
                   f"{REPLAYED} events applied", 0.5)
        assert_same_state(stack.streaming, same_state_reference(settings, stack.catalog, events))
        shards = ray.get([s.stats.remote() for s in stack.streaming.shards])
        assert all(s["restored_from"] is not None for s in shards), shards

        placed = {(cls, _node_names().get(node)) for cls, _, node in actor_nodes()}
        assert ("UserStateShard", "head") in placed, sorted(placed)
        user = events[0].user_id

        def recommend() -> dict | None:
            try:
                answer = httpx.get(f"{stack.base_url}/recommend",
                                   params={"user_id": user, "k": 5}, timeout=10)
            except httpx.HTTPError:
                return None
            return answer.json() if answer.status_code == 200 else None

        body = wait_until(recommend, 180, "/recommend answered by a replica on the head", 1.0)
        assert len(body["items"]) == 5
        # A round after the loss: its Train workers ask for the head (promptrec-train).
        assert stack.runner.run().outcome == "published"
        placed = {(cls, _node_names().get(node)) for cls, _, node in actor_nodes()}
        assert {where for cls, where in placed if "TrainWorker" in cls} == {"head"}, placed
    finally:
        stack.stop()
