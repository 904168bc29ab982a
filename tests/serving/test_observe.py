"""ObserveMiddleware on its own (metrics replaced by recorders: Ray is not running here)."""

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving import api as serving_api


class Recorder:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags):
        self.calls.append(tags)

    def observe(self, value, tags):
        self.calls.append(tags)


def test_counts_by_route_and_status_and_turns_errors_into_json(monkeypatch):
    counted, timed = Recorder(), Recorder()
    monkeypatch.setattr(serving_api.metrics, "requests", lambda: counted)
    monkeypatch.setattr(serving_api.metrics, "request_seconds", lambda: timed)
    api = FastAPI()

    @api.get("/healthz")
    async def ok():
        return {"status": "ok"}

    @api.get("/version")
    async def broken():
        raise RuntimeError("boom")

    api.add_middleware(serving_api.ObserveMiddleware)
    client = TestClient(api, raise_server_exceptions=False)
    assert client.get("/healthz").status_code == 200
    response = client.get("/version")
    assert response.status_code == 500 and response.json() == {"error": "internal error"}
    assert client.get("/elsewhere").status_code == 404
    assert counted.calls == [{"route": "/healthz", "status": "200"},
                             {"route": "/version", "status": "500"},
                             {"route": "other", "status": "404"}]
    assert [t["route"] for t in timed.calls] == ["/healthz", "/version", "other"]
