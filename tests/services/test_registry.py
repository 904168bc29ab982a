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


def test_wait_for_change_is_a_push(tmp_path):
    async def scenario():
        reg = PromptRegistry(str(tmp_path))
        await reg.publish(_blob(1.0))
        assert await reg.wait_for_change(1, timeout_s=0.05) == {}
        assert (await reg.wait_for_change(0, timeout_s=0.05))["version"] == 1
        waiter = asyncio.create_task(reg.wait_for_change(1, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await reg.publish(_blob(2.0))
        entry = await waiter
        assert entry["version"] == 2 and loop.time() - started < 1.0
    asyncio.run(scenario())
