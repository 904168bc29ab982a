import asyncio
import json

import pytest
import torch

from services.registry import PromptRegistry, UnknownVersion
from services.weights import BadPromptWeights, PromptWeights


def _blob(fill: float) -> bytes:
    return PromptWeights.plain(torch.full((2, 8), fill), torch.tensor(1.0)).to_bytes()


def test_publish_list_rollback_and_persist(tmp_path):
    async def scenario():
        reg = PromptRegistry(str(tmp_path), hidden_size=8)
        assert await reg.serving() == {}
        v1 = await reg.publish(_blob(1.0), {"source": "initial"})
        v2 = await reg.publish(_blob(2.0))
        assert (v1, v2) == (1, 2)
        assert (await reg.serving())["version"] == 2
        assert [e["version"] for e in await reg.versions()] == [1, 2]
        await reg.rollback(1)
        assert (await reg.serving())["blob"] == _blob(1.0)
        with pytest.raises(UnknownVersion):
            await reg.rollback(7)
        with pytest.raises(BadPromptWeights):
            await reg.publish(PromptWeights.plain(torch.full((2, 8), float("inf")),
                                                  torch.tensor(1.0)).to_bytes())
    asyncio.run(scenario())
    # A new registry on the same directory (a restart) keeps versions and the rollback.
    async def restarted():
        reg = PromptRegistry(str(tmp_path), hidden_size=8)
        assert await reg.serving_version() == 1
        assert len(await reg.versions()) == 2
        assert await reg.publish(_blob(3.0)) == 3
    asyncio.run(restarted())


def test_corrupt_version_is_refused_on_load(tmp_path):
    async def publish_two():
        reg = PromptRegistry(str(tmp_path))
        await reg.publish(_blob(1.0))
        await reg.publish(_blob(2.0))
    asyncio.run(publish_two())
    (tmp_path / "v000002.safetensors").write_bytes(_blob(9.0))  # checksum no longer matches
    reg = PromptRegistry(str(tmp_path))
    assert asyncio.run(reg.serving_version()) == 1
    assert json.loads((tmp_path / "index.json").read_text())["serving"] == 2  # untouched on disk


def test_wait_for_routing_is_a_push(tmp_path):
    async def scenario():
        reg = PromptRegistry(str(tmp_path))
        await reg.publish(_blob(1.0))
        assert await reg.wait_for_routing([1, 0, ""], timeout_s=0.05) == {}
        assert (await reg.wait_for_routing([0, 0, ""], timeout_s=0.05))["serving"]["version"] == 1
        waiter = asyncio.create_task(reg.wait_for_routing([1, 0, ""], timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await reg.publish(_blob(2.0))
        routing = await waiter
        assert routing["serving"]["version"] == 2 and routing["canary"] == {}
        assert loop.time() - started < 1.0
    asyncio.run(scenario())


def test_a_canary_serves_beside_the_serving_version_until_a_verdict(tmp_path):
    async def scenario():
        reg = PromptRegistry(str(tmp_path), hidden_size=8)
        # The first version has nothing to be compared with: it serves at once.
        assert await reg.publish(_blob(1.0), canary_share=0.5) == 1
        assert (await reg.routing())["canary"] == 0
        assert await reg.publish(_blob(2.0), canary_share=0.5) == 2
        routing = await reg.wait_for_routing([1, 0, ""], timeout_s=0.05)
        assert routing["serving"]["version"] == 1 and routing["canary"]["version"] == 2
        assert routing["canary_share"] == 0.5 and routing["canary"]["blob"] == _blob(2.0)
        # A newer publish supersedes the running canary.
        assert await reg.publish(_blob(3.0), canary_share=0.5) == 3
        assert [o["outcome"] for o in (await reg.routing())["canary_outcomes"]] == ["superseded"]
        assert not await reg.end_canary(2, "promote", "late verdict")  # no longer the canary
        assert await reg.end_canary(3, "rollback", "worse")
        routing = await reg.routing()
        assert (routing["serving"], routing["canary"], routing["canary_share"]) == (1, 0, 0.0)
        await reg.publish(_blob(4.0), canary_share=0.25)
        assert await reg.end_canary(4, "promote", "not worse")
        assert (await reg.routing())["serving"] == 4
        assert (await reg.serving())["blob"] == _blob(4.0)
        with pytest.raises(ValueError):
            await reg.end_canary(4, "keep", "no such outcome")
        await reg.publish(_blob(5.0), canary_share=0.25)
    asyncio.run(scenario())
    # A restart keeps the running canary; an operator's rollback ends it.
    async def restarted():
        reg = PromptRegistry(str(tmp_path), hidden_size=8)
        routing = await reg.routing()
        assert (routing["serving"], routing["canary"], routing["canary_share"]) == (4, 5, 0.25)
        await reg.rollback(2)
        routing = await reg.routing()
        assert (routing["serving"], routing["canary"]) == (2, 0)
        assert routing["canary_outcomes"][-1]["outcome"] == "rollback"
    asyncio.run(restarted())


def test_a_publish_to_everyone_ends_a_running_canary_as_superseded(tmp_path):
    async def scenario():
        reg = PromptRegistry(str(tmp_path), hidden_size=8)
        await reg.publish(_blob(1.0))
        await reg.publish(_blob(2.0), canary_share=0.5)
        assert await reg.publish(_blob(3.0)) == 3
        routing = await reg.routing()
        assert (routing["serving"], routing["canary"]) == (3, 0)
        assert routing["canary_outcomes"][-1]["outcome"] == "superseded"
    asyncio.run(scenario())
