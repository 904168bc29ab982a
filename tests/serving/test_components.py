"""The serving pieces apart from Serve: user-vector cache, encode grouping, admin checks.

Metrics are replaced by recorders (Ray is not running here), the backbone pass by a
stand-in that records what it was asked to encode.
"""

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from serving import api as serving_api
from serving import batching, cache
from serving.api import ApiError, check_admin_token
from serving.query import read_rollback_version


class _Recorder:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags=None):
        self.calls.append(tags)

    def observe(self, value, tags=None):
        self.calls.append(value)


@pytest.fixture
def recorded(monkeypatch):
    counted, observed = _Recorder(), _Recorder()
    monkeypatch.setattr(cache.metrics, "user_cache", lambda: counted)
    monkeypatch.setattr(batching.metrics, "encode_batch_users", lambda: observed)
    return counted, observed


def test_cache_hits_only_on_the_same_state_and_prompt_version(recorded):
    vectors = cache.UserVectorCache(capacity=2)
    a = torch.ones(4)
    assert vectors.get("u1", (1, 1)) is None
    vectors.put("u1", (1, 1), a)
    assert vectors.get("u1", (1, 1)) is a
    assert vectors.get("u1", (2, 1)) is None  # a new event
    assert vectors.get("u1", (1, 2)) is None  # a swap
    assert vectors.counts == {"hit": 1, "miss": 3}
    assert recorded[0].calls == [{"result": r} for r in ("miss", "hit", "miss", "miss")]


def test_cache_evicts_the_least_recently_used_and_can_be_off(recorded):
    vectors = cache.UserVectorCache(capacity=2)
    for user in ("u1", "u2"):
        vectors.put(user, (1, 1), torch.zeros(4))
    vectors.get("u1", (1, 1))  # u1 now the most recent
    vectors.put("u3", (1, 1), torch.zeros(4))
    assert len(vectors) == 2 and vectors.get("u2", (1, 1)) is None
    assert vectors.get("u1", (1, 1)) is not None
    vectors.resize(1)
    assert len(vectors) == 1
    off = cache.UserVectorCache(capacity=0)
    off.put("u1", (1, 1), torch.zeros(4))
    assert len(off) == 0 and off.get("u1", (1, 1)) is None


class _Active:
    def __init__(self, version):
        self.version, self.model, self.items = version, f"model-v{version}", None


def test_a_batch_is_encoded_once_per_version_and_distinct_history(recorded, monkeypatch):
    passes = []

    def encode(model, items, histories, personals, texts=None):
        passes.append((model, histories))
        return torch.arange(len(histories), dtype=torch.float32)[:, None].repeat(1, 2)

    monkeypatch.setattr(batching, "encode_histories", encode)
    v1, v2 = _Active(1), _Active(2)
    jobs = [batching.EncodeJob(v1, (1, 2)), batching.EncodeJob(v2, (1, 2)),
            batching.EncodeJob(v1, (1, 2)), batching.EncodeJob(v1, (3,))]
    # serve.batch itself needs a replica; the grouping behind it does not.
    batcher = batching.EncodeBatcher(max_size=4, wait_ms=2.0, in_thread=False)
    out = batcher._encode_now(jobs)
    assert passes == [("model-v1", [[1, 2], [3]]), ("model-v2", [[1, 2]])]
    assert [o.tolist() for o in out] == [[0, 0], [0, 0], [0, 0], [1, 1]]
    assert batcher.counts == {"passes": 2, "users": 3} and recorded[1].calls == [2, 1]


def _admin_app(token: str) -> TestClient:
    api = FastAPI()
    api.add_exception_handler(ApiError, serving_api._api_error)

    @api.post("/admin/rollback")
    async def rollback(request: Request) -> dict:
        check_admin_token(request, token)
        return {"version": await read_rollback_version(request)}

    return TestClient(api)


def test_admin_token_and_rollback_body_are_checked_in_order():
    assert _admin_app("").post("/admin/rollback", json={"version": 1}).status_code == 404
    client = _admin_app("secret")
    assert client.post("/admin/rollback", json={"version": 1}).status_code == 401
    assert client.post("/admin/rollback", json={"version": 1},
                       headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": "Bearer secret"}
    for body in [b"nope", b'{"version": "1"}', b'{"version": true}', b"[1]"]:
        response = client.post("/admin/rollback", content=body, headers=auth)
        assert response.status_code == 400 and response.json()["error"], body
    assert client.post("/admin/rollback", json={"version": 3}, headers=auth).json() == {
        "version": 3}


def test_reconfigure_applies_the_runtime_knobs_without_a_restart(recorded):
    from types import SimpleNamespace

    from services.config import Settings
    from serving.app import RUNTIME_KNOBS, Recommender

    replica = SimpleNamespace(settings=Settings(), cache=cache.UserVectorCache(10),
                              batcher=batching.EncodeBatcher(4, 2.0, in_thread=False))
    knobs = {"batch_max_size": 2, "batch_wait_ms": 5.0, "user_cache_size": 1,
             "explain_items": 5}
    assert set(knobs) == set(RUNTIME_KNOBS)
    Recommender.func_or_class.reconfigure(replica, knobs)
    assert replica.cache.capacity == 1 and replica.settings.serving.explain_items == 5
    assert replica.batcher._idle_wait_s == 0.005
    with pytest.raises(ValueError):  # validated like any settings: batch > ongoing
        Recommender.func_or_class.reconfigure(replica, {**knobs, "batch_max_size": 10_000})


def test_routes_take_the_request_by_type_not_by_a_string_annotation():
    # Serve's ingress rebuilds the routes; a string annotation (`from __future__ import
    # annotations`) then reads as a query parameter named "request": 400 on every call.
    import inspect

    from serving.app import Recommender

    for route in ("recommend", "rollback"):
        method = getattr(Recommender.func_or_class, route)
        assert inspect.signature(method).parameters["request"].annotation is Request, route
