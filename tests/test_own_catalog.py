"""A team's own catalog and events, from files in the generic format, through the real
stack: `--catalog` items are what /recommend returns, `--events` is what the shards learn,
and an item marked unavailable is never returned."""

from __future__ import annotations

import json

import httpx
import pytest

from services.config_sources import load_settings
from services.data import load_interactions
from services.embedded import free_port
from services.launch.stack import Stack
from streaming.replay import replay
from tests.conftest import TEST_CACHE

pytestmark = pytest.mark.slow

KINDS = ["trail shoe", "rain jacket", "wool sock", "tent", "sleeping bag", "head torch",
         "water bottle", "backpack", "camping stove", "compass"]


def _catalog(path):
    rows = [{"item_id": f"sku-{k:03d}", "title": f"{kind.title()} model {k}",
             "description": f"A {kind} for hikers.", "categories": ["outdoor", kind],
             "attributes": {"brand": "Acme"}, **({"available": False} if k == 7 else {})}
            for k, kind in enumerate(KINDS * 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_own_catalog_and_events_flow_to_recommendations(tmp_path):
    rows = _catalog(tmp_path / "items.jsonl")
    events = tmp_path / "clicks.csv"
    events.write_text("user_id,item_id,ts,type\n" + "".join(
        f"hiker-{u},sku-{(u + j) % len(rows):03d},{1_700_000_000 + 10 * u + j},click\n"
        for u in range(20) for j in range(5)))
    settings = load_settings(env={}, overrides={
        "catalog": str(tmp_path / "items.jsonl"), "events": str(events),
        "data_dir": str(tmp_path / "promptrec"), "http_port": free_port(),
        "metrics_port": free_port(), "partitions": 2, "num_consumers": 1, "num_shards": 2,
        "num_replicas": 1, "train_every_events": 0, "namespace": "promptrec-own-catalog",
        "cache_dir": str(TEST_CACHE)})
    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        assert [item.item_id for item in stack.catalog.items] == [r["item_id"] for r in rows]
        interactions = load_interactions(settings.infra.events_source)
        sent = replay(stack.bootstrap, settings.streaming.topic_clicks, interactions,
                      settings.infra.events_source, progress=False)
        assert sent == 100
        assert stack.wait_handled(sent, timeout_s=120)["handled"] == sent
        assert stack.streaming.stats()["totals"]["ok"] == sent  # every event a known item
        ids = {r["item_id"] for r in rows}
        for user in ("hiker-3", "hiker-11", "someone-new"):
            body = httpx.get(f"{stack.base_url}/recommend",
                             params={"user_id": user, "k": len(rows)}, timeout=30).json()
            returned = [entry["item_id"] for entry in body["items"]]
            assert set(returned) <= ids and "sku-007" not in returned
            u = int(user.split("-")[1]) if user.startswith("hiker") else None
            seen = set() if u is None else {f"sku-{(u + j) % len(rows):03d}" for j in range(5)}
            assert body["state_version"] == len(seen) and not seen & set(returned)
            # everything else is returned: the whole catalog less seen and unavailable
            assert len(returned) == len(rows) - len(seen - {"sku-007"}) - 1
        _check_filters_and_similar(stack.base_url, rows)
    finally:
        stack.stop()


def _check_filters_and_similar(base_url: str, rows: list[dict]) -> None:
    def get(path, **params):
        return httpx.get(f"{base_url}{path}", params=params, timeout=30)

    tents = {r["item_id"] for r in rows if "tent" in r["categories"]} - {"sku-007"}
    body = get("/recommend", user_id="hiker-0", k=50, category="tent,compass").json()
    compasses = {r["item_id"] for r in rows if "compass" in r["categories"]}
    assert {e["item_id"] for e in body["items"]} == (tents | compasses) - {"sku-003"}
    plain = [e["item_id"] for e in get("/recommend", user_id="hiker-0", k=5).json()["items"]]
    less = get("/recommend", user_id="hiker-0", k=5, exclude=f"{plain[0]},no-such-item")
    assert [e["item_id"] for e in less.json()["items"]] == plain[1:] + [
        e["item_id"] for e in get("/recommend", user_id="hiker-0", k=6).json()["items"]][5:]
    assert get("/recommend", user_id="hiker-0", category="no-such").json()["items"] == []
    near = get("/similar", item_id="sku-003", k=3).json()
    assert len(near["items"]) == 3 and "sku-003" not in {e["item_id"] for e in near["items"]}
    # the two other tents share the most text with this one
    assert {e["item_id"] for e in near["items"][:2]} == {"sku-013", "sku-023"}
    missing = get("/similar", item_id="no-such-item")
    assert missing.status_code == 404 and "unknown item_id" in missing.json()["error"]
    for path, params in (("/similar", {}), ("/recommend", {"user_id": "u", "exclude": "a,,b"}),
                         ("/recommend", {"user_id": "u", "category": "x" * 200})):
        bad = get(path, **params)
        assert bad.status_code == 400 and bad.json()["error"], (path, params)
