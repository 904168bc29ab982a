"""TextVectors: text vectors cached by text hash, shared by every process on a cache dir.

A counting fake stands in for the backbone (a backbone dir is only read for its
fingerprint until a text misses); the real MiniLM path is tested in test_data_catalog.py.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from services.vector_cache import TextVectors

H = 4


def _never(*_):
    raise AssertionError("the backbone was loaded: a cached text was embedded again")


@pytest.fixture
def fake_backbone(tmp_path, monkeypatch):
    """A backbone dir and a fake embedder -> (path, list of the text lists it embedded)."""
    path = tmp_path / "backbone"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"hidden_size": H}))
    calls: list[list[str]] = []

    def embed(_tokenizer, _encoder, texts, progress=False, bf16=False):
        calls.append(list(texts))
        rows = [torch.tensor(list(hashlib.sha256(t.encode()).digest()[:H]), dtype=torch.float32)
                + 1.0 for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    config = type("Config", (), {"hidden_size": H})()
    monkeypatch.setattr("services.vector_cache.load_backbone",
                        lambda _path: (object(), type("Encoder", (), {"config": config})()))
    monkeypatch.setattr("services.vector_cache.embed_texts", embed)
    return path, calls


def _parts(cache: TextVectors) -> list:
    return sorted(cache.root.glob("part-*.safetensors"))


def test_duplicate_texts_in_one_call_are_embedded_once(fake_backbone, tmp_path):
    path, calls = fake_backbone
    cache = TextVectors(path, tmp_path / "cache")
    out = cache.embed(["x", "y", "x", "x"])
    assert calls == [["x", "y"]] and cache.embedded == 2
    assert out.shape == (4, H)
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[3])
    assert not torch.equal(out[0], out[1])
    assert len(_parts(cache)) == 1
    # Asked again, nothing reaches the backbone.
    assert torch.equal(cache.embed(["y", "x"]), out[[1, 0]])
    assert len(calls) == 1 and len(_parts(cache)) == 1


def test_a_second_cache_on_the_same_dir_reads_the_first_ones_vectors(fake_backbone, tmp_path,
                                                                     monkeypatch):
    path, calls = fake_backbone
    first = TextVectors(path, tmp_path / "cache")
    vectors = first.embed(["x", "y"])
    monkeypatch.setattr("services.vector_cache.load_backbone", _never)
    second = TextVectors(path, tmp_path / "cache")
    assert torch.equal(second.embed(["y", "x"]), vectors[[1, 0]])
    assert (second.embedded, second.hits) == (0, 2)
    assert second.hidden_size == H  # known from the cached rows, no backbone
    assert second.embed([]).shape == (0, H)
    assert calls == [["x", "y"]]


def test_vectors_another_process_wrote_after_this_one_opened_are_read_on_a_miss(
        fake_backbone, tmp_path):
    path, calls = fake_backbone
    mine = TextVectors(path, tmp_path / "cache")  # opened on an empty cache
    other = TextVectors(path, tmp_path / "cache")
    theirs = other.embed(["z", "w"])
    calls.clear()
    # z and w miss in memory: the part `other` wrote is read, nothing is embedded.
    assert torch.equal(mine.embed(["w", "z"]), theirs[[1, 0]])
    assert calls == [] and mine.embedded == 0
    # Only what no process has embedded reaches the backbone.
    out = mine.embed(["z", "v"])
    assert calls == [["v"]] and mine.embedded == 1
    assert torch.equal(out[0], theirs[0])
    # ... and `other` reads that back in turn.
    calls.clear()
    assert torch.equal(other.embed(["v"])[0], out[1]) and calls == []


def test_half_written_parts_are_not_read_and_another_backbone_has_its_own_vectors(
        fake_backbone, tmp_path):
    path, calls = fake_backbone
    cache = TextVectors(path, tmp_path / "cache")
    cache.embed(["x"])
    (cache.root / ".part-crashed.safetensors.tmp").write_bytes(b"half a file")
    assert TextVectors(path, tmp_path / "cache").embed(["x"]).shape == (1, H)
    assert len(calls) == 1
    other_path = tmp_path / "other-backbone"
    other_path.mkdir()
    (other_path / "config.json").write_text(json.dumps({"hidden_size": H, "layers": 3}))
    other = TextVectors(other_path, tmp_path / "cache")
    assert other.root != cache.root
    other.embed(["x"])
    assert other.embedded == 1 and len(calls) == 2
