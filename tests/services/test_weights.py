"""The weights container: its structure travels in the safetensors metadata and is checked
on the way in; each version is decoded once per process. No backbone needed."""

import dataclasses
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

import services.decoded
from services.decoded import DecodedVersions
from services.weights import (
    FORMAT,
    METADATA_KEY,
    BadPromptWeights,
    PromptStructure,
    PromptWeights,
    decode_weights,
)
from tests.model_configs import plain_config

H, N = 8, 5


def full_weights(prompt_len: int = 3) -> PromptWeights:
    """A version with every optional part: item bias, item tokens, causal (gate)."""
    structure = PromptStructure(prompt_len=prompt_len, hidden_size=H, num_items=N,
                                item_bias=True, item_tokens=True, causal=True)
    return PromptWeights(structure, soft_prompt=torch.randn(prompt_len, H),
                         logit_scale=torch.tensor(2.0), item_bias=torch.randn(N),
                         item_delta=torch.randn(N, H), personal_gate=torch.tensor(0.5))


def test_the_structure_travels_in_the_metadata_and_comes_back(tmp_path):
    weights = full_weights()
    blob = weights.to_bytes()
    assert blob == weights.to_bytes()  # equal weights, equal bytes (registry checksums)
    back = decode_weights(blob, hidden_size=H, num_items=N)
    assert back.structure == weights.structure and back.structure.causal
    for name, tensor in weights.tensors().items():
        assert torch.equal(back.tensors()[name], tensor), name
    # Causal is a field of the structure, not a tensor.
    assert set(back.tensors()) == {"soft_prompt", "logit_scale", "item_bias", "item_delta",
                                   "personal_gate"}
    # Any safetensors reader sees the structure: one JSON string under one key.
    (tmp_path / "v.safetensors").write_bytes(blob)
    with safe_open(str(tmp_path / "v.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    assert meta == {"format": FORMAT, "prompt_len": 3, "hidden_size": H, "num_items": N,
                    "item_bias": True, "item_tokens": True, "causal": True, "readout": "mean",
                    "user_layers": 0, "lora_rank": 0, "user_text": False,
                    "user_text_tokens": 0, "query_gate": False}


def test_blobs_from_before_readout_and_user_layers_read_as_the_full_mean_model():
    weights = full_weights()
    tensors = {k: v.contiguous() for k, v in weights.tensors().items()}
    old = json.loads(weights.structure.to_metadata()[METADATA_KEY])
    del old["readout"], old["user_layers"]
    back = decode_weights(st_save(tensors, metadata={METADATA_KEY: json.dumps(old)}))
    assert (back.structure.readout, back.structure.user_layers) == ("mean", 0)
    newer = dataclasses.replace(weights.structure, readout="last", user_layers=2)
    blob = dataclasses.replace(weights, structure=newer).to_bytes()
    assert decode_weights(blob).structure == newer
    config = plain_config(3, item_bias=True, item_tokens=True, causal=True)
    with pytest.raises(BadPromptWeights, match="user_layers 2 vs 0"):
        decode_weights(blob, config=dataclasses.replace(config, readout="last"))


def test_a_plain_version_fits_any_catalog():
    plain = PromptWeights.plain(torch.randn(2, H), torch.tensor(1.0))
    assert plain.structure.num_items == 0
    assert PromptStructure(prompt_len=2, hidden_size=H, num_items=9) == plain.structure
    assert decode_weights(plain.to_bytes(), num_items=1234).structure == plain.structure


def test_weights_of_another_model_config_are_refused():
    blob = full_weights(prompt_len=3).to_bytes()
    same = plain_config(3, item_bias=True, item_tokens=True, causal=True)
    assert decode_weights(blob, config=same).structure.prompt_len == 3
    with pytest.raises(BadPromptWeights, match="prompt_len 3 vs 4"):
        decode_weights(blob, config=dataclasses.replace(same, prompt_len=4))
    with pytest.raises(BadPromptWeights, match="causal True vs False"):
        decode_weights(blob, config=dataclasses.replace(same, causal=False))
    with pytest.raises(BadPromptWeights, match="hidden size"):
        decode_weights(blob, hidden_size=2 * H)
    with pytest.raises(BadPromptWeights, match="catalog"):
        decode_weights(blob, num_items=N + 1)


def test_tensors_that_contradict_their_metadata_are_refused():
    weights = full_weights()
    meta = weights.structure.to_metadata()
    tensors = {k: v.contiguous() for k, v in weights.tensors().items()}
    with pytest.raises(BadPromptWeights, match="soft_prompt shape"):
        decode_weights(st_save({**tensors, "soft_prompt": torch.randn(4, H)}, metadata=meta))
    with pytest.raises(BadPromptWeights, match="personal_gate"):
        decode_weights(st_save({k: v for k, v in tensors.items() if k != "personal_gate"},
                               metadata=meta))
    with pytest.raises(BadPromptWeights, match=r"tensors \[.*'causal'"):  # the old marker
        decode_weights(st_save({**tensors, "causal": torch.tensor(1.0)}, metadata=meta))
    with pytest.raises(BadPromptWeights, match="logit_scale shape"):
        decode_weights(st_save({**tensors, "logit_scale": torch.ones(2)}, metadata=meta))
    with pytest.raises(BadPromptWeights, match="non-finite"):
        decode_weights(st_save({**tensors, "item_bias": torch.full((N,), float("inf"))},
                               metadata=meta))


def test_blobs_without_current_metadata_are_refused_with_a_reason():
    plain = {"soft_prompt": torch.randn(2, H), "logit_scale": torch.tensor(1.0)}
    with pytest.raises(BadPromptWeights, match="before versions recorded their structure"):
        decode_weights(st_save(plain))  # as written before this format
    fields = json.loads(PromptWeights.plain(plain["soft_prompt"], plain["logit_scale"])
                        .structure.to_metadata()[METADATA_KEY])
    for bad in ({**fields, "format": "promptrec.prompt/0"}, {**fields, "causal": "false"},
                {k: v for k, v in fields.items() if k != "prompt_len"}):
        with pytest.raises(BadPromptWeights, match="metadata"):
            decode_weights(st_save(plain, metadata={METADATA_KEY: json.dumps(bad)}))


def test_a_version_is_decoded_once_then_served_from_the_cache(monkeypatch):
    decodes = []

    def counting(blob, *args, **kwargs):
        decodes.append(blob)
        return decode_weights(blob, *args, **kwargs)

    monkeypatch.setattr(services.decoded, "decode_weights", counting)
    cache = DecodedVersions(maxsize=2)
    first, second = full_weights().to_bytes(), full_weights().to_bytes()
    a = cache.get(1, first, hidden_size=H, num_items=N)
    assert cache.get(1, first, hidden_size=H) is a and len(decodes) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    # What the caller expects is checked on a hit too.
    with pytest.raises(BadPromptWeights, match="catalog"):
        cache.get(1, first, num_items=N + 1)
    # Version numbers restart with a fresh registry: other bytes, decoded again.
    assert cache.get(1, second) is not a and len(decodes) == 2
    cache.get(2, first)
    cache.get(1, first)  # evicted by the bound of 2: decoded again
    assert len(decodes) == 4 and cache.misses == 4
    # A refused blob is not kept: refused again each time.
    bad = PromptWeights.plain(torch.full((2, H), float("nan")), torch.tensor(1.0)).to_bytes()
    for _ in range(2):
        with pytest.raises(BadPromptWeights, match="non-finite"):
            cache.get(3, bad)
    assert len(decodes) == 6
    # A byte budget too: versions past it go, oldest first, but the newest always stays.
    small = DecodedVersions(maxsize=8, max_bytes=len(first) + len(second) // 2)
    small.get(1, first)
    small.get(2, second)
    assert len(small._kept) == 1 and (2, hashlib.sha256(second).hexdigest()) in small._kept
    tiny = DecodedVersions(maxsize=8, max_bytes=1)
    assert tiny.get(3, first) is tiny.get(3, first)  # kept although over the budget


def test_decode_version_shares_one_cache_per_process(monkeypatch):
    monkeypatch.setattr(services.decoded, "PROCESS_VERSIONS", DecodedVersions())
    blob = full_weights().to_bytes()
    assert services.decoded.decode_version(5, blob) is services.decoded.decode_version(5, blob)
    assert services.decoded.PROCESS_VERSIONS.hits == 1
