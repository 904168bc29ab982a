"""The swap warm-up with a real (frozen) backbone and two prompt versions: cached users
are answered by the replaced version until the new one has re-encoded them, the new
vectors are exactly what the new version computes, and a rollback holds nothing."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from services.backbone import default_backbone_path, load_backbone
from services.prompt_model import PromptRecModel
from services.weights import initial_weights
from serving import cache as cache_module
from serving.cache import UserVectorCache
from serving.ranking import encode_histories
from serving.slot import ActivePrompt
from serving.warmup import BATCH, SwapWarmer
from tests.model_configs import plain_config

ITEMS = 30
USERS = 2 * BATCH + 3  # more than one background batch


class _Counter:
    def inc(self, *_, **__):
        pass


@pytest.fixture(scope="module")
def versions():
    tokenizer, encoder = load_backbone(default_backbone_path())
    items = F.normalize(torch.randn(ITEMS, 384, generator=torch.Generator().manual_seed(0)),
                        dim=-1)
    out = {}
    for version in (1, 2):
        weights = initial_weights(tokenizer, encoder, plain_config(
            4, causal=True, readout="last", user_layers=2))
        weights = type(weights)(weights.structure, weights.soft_prompt + 0.1 * version,
                                weights.logit_scale, personal_gate=weights.personal_gate)
        out[version] = ActivePrompt(version, f"sha{version}", PromptRecModel(encoder, weights),
                                    items, None, 0.0, None)
    return out


def histories():
    return {f"u{n}": [(n + j) % ITEMS for j in range(1 + n % 5)] for n in range(USERS)}


def filled_cache(old: ActivePrompt) -> UserVectorCache:
    vectors = UserVectorCache(100)
    for user, history in histories().items():
        vector = encode_histories(old.model, old.items, [history])[0]
        vectors.put(user, (7, old.version), vector, (tuple(history), None, None))
    return vectors


def test_cached_users_are_held_on_the_old_version_then_re_encoded(versions, monkeypatch):
    monkeypatch.setattr(cache_module.metrics, "user_cache", lambda: _Counter())
    old, new = versions[1], versions[2]

    async def scenario():
        vectors = filled_cache(old)
        warmer = SwapWarmer(vectors, ThreadPoolExecutor(1), asyncio.get_running_loop())
        warmer.swapped(old, new)
        held = warmer.answer("u0", 7)
        assert held is not None and held[0] is old  # answered wholly by the old version
        assert warmer.answer("u0", 8) is None  # a newer state: a plain miss
        assert warmer.answer("nobody", 7) is None
        await asyncio.wrap_future(warmer._task)
        return vectors, warmer

    vectors, warmer = asyncio.run(scenario())
    assert warmer.status() == {"warmed": USERS, "held_answers": 1, "swaps": 1, "warming": 0,
                               "held": []}
    for user, history in histories().items():
        expected = encode_histories(new.model, new.items, [history])[0]
        cached = vectors.get(user, (7, new.version))
        assert cached is not None and torch.allclose(cached, expected, atol=1e-5), user
    assert warmer.answer("u0", 7) is None  # nothing held once warm


def test_a_rollback_or_a_catalog_change_holds_nothing(versions, monkeypatch):
    monkeypatch.setattr(cache_module.metrics, "user_cache", lambda: _Counter())
    old, new = versions[1], versions[2]

    async def scenario():
        warmer = SwapWarmer(filled_cache(new), ThreadPoolExecutor(1),
                            asyncio.get_running_loop())
        warmer.swapped(new, old)  # back to an older version: at once, for everyone
        assert warmer.answer("u0", 7) is None and warmer._task is None
        warmer.swapped(old, new)
        assert warmer.answer("u0", 7) is None  # its cache is of version 2: nothing to hold
        warmer.held[1] = old
        warmer.swapped(None, new)  # the catalog changed: held versions are of the old one
        assert warmer.held == {}
    asyncio.run(scenario())
