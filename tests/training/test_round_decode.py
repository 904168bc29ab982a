"""A training round decodes its candidate once, and the serving version once per process
(it is the same one round after round); the published blob carries the unseen-item rule.
No Ray, no backbone: the gate runs on a tiny random BERT with a stand-in registry."""

from types import SimpleNamespace

import numpy as np
import torch
from transformers import BertConfig, BertModel

import services.decoded
import training.round
from services.config import Settings
from services.decoded import DecodedVersions
from services.prompt_model import PromptRecModel
from services.weights import PromptStructure, PromptWeights, decode_weights
from training.examples import Examples
from training.round import RoundResult, RoundRunner

H, N = 32, 6


def version(seed: int) -> PromptWeights:
    gen = torch.Generator().manual_seed(seed)
    structure = PromptStructure(prompt_len=2, hidden_size=H, num_items=N, item_bias=True,
                                item_tokens=True)
    return PromptWeights(structure, soft_prompt=torch.randn(2, H, generator=gen),
                         logit_scale=torch.tensor(1.0), item_bias=torch.randn(N, generator=gen),
                         item_delta=torch.randn(N, H, generator=gen))


def result() -> RoundResult:
    return RoundResult(round=1, outcome="", reason="", version=None, serving_version=1,
                       train_examples=0, val_examples=0, loss=None, candidate_ndcg10=None,
                       serving_ndcg10=None, candidate_hr10=None, serving_hr10=None,
                       fit_seconds=0, train_seconds=0, started_run=False, seconds=0)


def test_a_round_decodes_its_candidate_once_and_the_serving_version_once(monkeypatch):
    decoded = {"round": 0, "versions": 0}

    def counting(where):
        def decode(blob, *args, **kwargs):
            decoded[where] += 1
            return decode_weights(blob, *args, **kwargs)
        return decode

    monkeypatch.setattr(training.round, "decode_weights", counting("round"))
    monkeypatch.setattr(services.decoded, "decode_weights", counting("versions"))
    monkeypatch.setattr(services.decoded, "PROCESS_VERSIONS", DecodedVersions())
    published = []
    monkeypatch.setattr(training.round, "ray", SimpleNamespace(get=lambda value: value))
    registry = SimpleNamespace(publish=SimpleNamespace(
        remote=lambda blob, meta, canary_share=0.0: published.append(blob) or len(published) + 1))

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=50)).eval()
    vectors = torch.nn.functional.normalize(torch.randn(N, H), dim=-1)
    runner = RoundRunner.__new__(RoundRunner)  # the gate only: no trainer, no Ray
    runner.settings, runner.registry = Settings(), registry
    runner.catalog = SimpleNamespace(vectors=vectors, item_ids=[f"i{n}" for n in range(N)])
    runner._gate_model = PromptRecModel(encoder, version(0))
    serving = {"version": 1, "blob": version(0).to_bytes()}
    no_validation = Examples(np.zeros((0, 4), np.int32), np.zeros(0, np.int32))
    logged = np.array([True, True, True, True, False, False])

    for round_no in (1, 2):
        out = result()
        runner._gate(out, version(round_no).to_bytes(), serving, no_validation, logged)
        assert out.outcome == "published", out.reason
        assert decoded == {"round": round_no, "versions": 1}
    # The candidate that went out is the decoded one with the unseen-item rule applied.
    sent = decode_weights(published[-1])
    assert not torch.equal(sent.item_bias[4:], version(2).item_bias[4:])
    assert torch.equal(sent.item_bias[:4], version(2).item_bias[:4])
    assert sent.item_ids == tuple(runner.catalog.item_ids)  # rows keyed by item id


def test_a_round_builds_its_rows_with_the_replay_share_and_its_own_seed(monkeypatch):
    """The setting reaches the rows a round trains on, drawn anew each round."""
    calls = []

    def building(log, index, history_len, **kwargs):
        calls.append(kwargs)
        empty = Examples(np.zeros((0, history_len), np.int32), np.zeros(0, np.int32))
        return empty, empty

    monkeypatch.setattr(training.round, "build_examples", building)
    monkeypatch.setattr(training.round, "read_event_log", lambda path: None)
    monkeypatch.setattr(training.round, "ray", SimpleNamespace(get=lambda value: value))
    runner = RoundRunner.__new__(RoundRunner)  # no trainer, no Ray: the round is skipped
    runner.settings = Settings().replace(replay_share=1.5)
    catalog = SimpleNamespace(index={})
    runner._catalog_now, runner.catalog = (lambda: catalog), catalog
    runner.registry = SimpleNamespace(serving=SimpleNamespace(remote=lambda: {"version": 1}))
    runner.round, runner.last_ingest_ts = 0, 0.0
    first, second = runner.run(), runner.run()
    assert first.outcome == second.outcome == "skipped"
    assert [(c["replay_share"], c["seed"]) for c in calls] == [(1.5, 1), (1.5, 2)]
