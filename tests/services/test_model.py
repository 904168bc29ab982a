import dataclasses
import math

import numpy as np
import pytest
import torch

from services.backbone import default_backbone_path, load_backbone
from services.prompt_model import PromptRecModel
from services.weights import (
    BadPromptWeights,
    PromptWeights,
    decode_weights,
    init_soft_prompt,
    initial_weights,
)
from tests.model_configs import plain_config


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N]; exclude: item indices to mask (seen items) -> (indices [k'], scores [k'])."""
    if exclude is not None and exclude.numel():
        scores = scores.clone()
        scores[exclude] = float("-inf")
    k = min(k, int(torch.isfinite(scores).sum()))
    values, indices = torch.topk(scores, k)
    return indices, values


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(default_backbone_path())


def test_backbone_is_frozen(backbone):
    _, encoder = backbone
    assert not any(p.requires_grad for p in encoder.parameters())


def test_soft_prompt_starts_from_task_text(backbone):
    tokenizer, encoder = backbone
    prompt = init_soft_prompt(tokenizer, encoder, plain_config(5, prompt_init_text="movie"))
    movie_id = tokenizer("movie", add_special_tokens=False)["input_ids"][0]
    assert prompt.shape == (5, 384)
    assert torch.equal(prompt[3], encoder.get_input_embeddings().weight[movie_id])


def test_user_encoding_shapes_and_only_the_prompt_trains(backbone):
    tokenizer, encoder = backbone
    model = PromptRecModel(encoder, initial_weights(tokenizer, encoder, plain_config(8)))
    history = torch.randn(3, 4, 384)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    users = model.encode_users(history, mask)
    assert users.shape == (3, 384)
    assert torch.allclose(users.norm(dim=1), torch.ones(3), atol=1e-5)
    # Padding must not change a user's vector.
    alone = model.encode_users(history[1:2, :2], mask[1:2, :2])
    assert torch.allclose(alone[0], users[1], atol=1e-5)
    # A cold-start user (no history at all) is encoded by the prompt alone.
    assert model.encode_users(torch.zeros(1, 0, 384), torch.zeros(1, 0)).shape == (1, 384)
    assert model.trainable_parameters() == 8 * 384 + 1
    logits = model.logits(users, torch.nn.functional.normalize(torch.randn(10, 384), dim=1))
    assert logits.shape == (3, 10)
    assert logits.abs().max() <= math.exp(model.logit_scale.item()) + 1e-4


def test_prompt_bytes_round_trip_and_refusals():
    weights = PromptWeights.plain(torch.randn(4, 384), torch.tensor(2.0))
    back = decode_weights(weights.to_bytes(), hidden_size=384)
    assert torch.equal(back.soft_prompt, weights.soft_prompt)
    with pytest.raises(BadPromptWeights, match="non-finite"):
        decode_weights(PromptWeights.plain(torch.full((4, 384), math.nan),
                                           torch.tensor(2.0)).to_bytes())
    with pytest.raises(BadPromptWeights, match="shape"):
        decode_weights(weights.to_bytes(), hidden_size=768)
    with pytest.raises(BadPromptWeights, match="safetensors"):
        decode_weights(b"garbage")


def test_top_k_masks_seen_items_and_caps_k():
    scores = torch.tensor([0.9, 0.8, 0.1, 0.5])
    idx, _ = top_k(scores, 2, exclude=torch.tensor([0]))
    assert idx.tolist() == [1, 3]
    idx, _ = top_k(scores, 10, exclude=torch.tensor([0, 1]))
    assert idx.tolist() == [3, 2]


def test_item_bias_is_optional_trainable_and_checked(backbone):
    tokenizer, encoder = backbone
    config = plain_config(4, item_bias=True)
    with pytest.raises(ValueError):
        initial_weights(tokenizer, encoder, config)  # needs the catalog size
    model = PromptRecModel(encoder, initial_weights(tokenizer, encoder, config, num_items=5))
    items = torch.nn.functional.normalize(torch.randn(5, encoder.config.hidden_size), dim=-1)
    users = torch.nn.functional.normalize(torch.randn(2, encoder.config.hidden_size), dim=-1)
    with torch.no_grad():
        model.item_bias[3] = 100.0
    assert model.logits(users, items).argmax(1).tolist() == [3, 3]
    with pytest.raises(ValueError):
        model.logits(users, items[:4])  # a bias per item of another catalog
    blob = model.weights().to_bytes()
    assert decode_weights(blob, num_items=5).item_bias[3] == 100.0
    with pytest.raises(BadPromptWeights):
        decode_weights(blob, num_items=6)
    plain = PromptRecModel(encoder, initial_weights(tokenizer, encoder, plain_config(4)))
    with pytest.raises(BadPromptWeights):
        plain.load_weights(model.weights())
    assert model.trainable_parameters() == plain.trainable_parameters() + 5


def test_item_tokens_start_at_the_text_vectors_learn_and_are_checked(backbone):
    from training.examples import Examples
    from training.step import train_step

    tokenizer, encoder = backbone
    hidden = encoder.config.hidden_size
    weights = initial_weights(tokenizer, encoder, plain_config(4, item_tokens=True),
                              num_items=6)
    assert weights.item_delta.shape == (6, hidden)
    model = PromptRecModel(encoder, weights)
    text = torch.nn.functional.normalize(torch.randn(6, hidden), dim=-1)
    assert torch.allclose(model.item_table(text), text, atol=1e-6)  # zero delta: text only
    with pytest.raises(ValueError):
        model.item_table(text[:5])  # tokens of another catalog

    optimizer = torch.optim.Adam([model.item_delta], lr=0.01)
    batch = Examples(np.array([[0, 1, -1]], np.int32), np.array([2], np.int32))
    train_step(model, optimizer, batch, text)
    moved = model.item_delta.detach().abs().sum(1) > 0
    # Full softmax moves every item's output vector; the history items also as inputs.
    assert moved.all()
    table = model.item_table(text)
    assert torch.allclose(table.norm(dim=1), torch.ones(6), atol=1e-5)

    blob = model.weights().to_bytes()
    back = decode_weights(blob, hidden_size=hidden, num_items=6)
    assert torch.equal(back.item_delta, model.item_delta.detach())
    with pytest.raises(BadPromptWeights, match="item_delta"):
        decode_weights(blob, num_items=7)
    plain = PromptRecModel(encoder, initial_weights(tokenizer, encoder, plain_config(4)))
    with pytest.raises(BadPromptWeights, match="item_tokens"):
        plain.load_weights(model.weights())
    assert model.trainable_parameters() == plain.trainable_parameters() + 6 * hidden


def test_causal_prefixes_equal_encoding_each_prefix_alone(backbone):
    """Training reads every prefix of one pass; serving encodes the whole history: both
    must give the same user vector for the same items."""
    tokenizer, encoder = backbone
    hidden = encoder.config.hidden_size
    model = PromptRecModel(encoder, initial_weights(
        tokenizer, encoder, plain_config(4, causal=True)))
    assert model.causal and model.weights().structure.causal
    torch.manual_seed(0)
    history = torch.nn.functional.normalize(torch.randn(2, 5, hidden), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    history = history * mask.unsqueeze(-1)
    with torch.no_grad():
        prefixes = model.encode_prefixes(history, mask, with_prompt_only=True)  # [2, 6, H]
        for t in range(4):
            alone = model.encode_users(history[:1, :t], mask[:1, :t])
            assert torch.allclose(prefixes[0, t], alone[0], atol=1e-5), t
        batched = model.encode_users(history, mask)
        assert torch.allclose(batched[1], model.encode_users(history[1:, :3], mask[1:, :3])[0],
                              atol=1e-5)
        # A later item must not change an earlier prefix (no look-ahead).
        changed = history.clone()
        changed[0, 4] = -changed[0, 4]
        again = model.encode_prefixes(changed, mask, with_prompt_only=True)
        assert torch.allclose(again[0, :5], prefixes[0, :5], atol=1e-5)
        assert not torch.allclose(again[0, 5], prefixes[0, 5], atol=1e-3)
    plain = PromptRecModel(encoder, initial_weights(tokenizer, encoder, plain_config(4)))
    with pytest.raises(BadPromptWeights, match="causal"):
        plain.load_weights(model.weights())
    back = decode_weights(model.weights().to_bytes(), hidden_size=hidden)
    assert PromptRecModel(encoder, back).causal


def test_a_causal_version_adds_the_personal_prompt_by_its_trained_gate(backbone):
    tokenizer, encoder = backbone
    hidden = encoder.config.hidden_size
    model = PromptRecModel(encoder, initial_weights(
        tokenizer, encoder, plain_config(4, causal=True)))
    history = torch.nn.functional.normalize(torch.randn(1, 3, hidden), dim=-1)
    mask = torch.ones(1, 3)
    personal = torch.nn.functional.normalize(torch.randn(1, hidden), dim=-1)
    with torch.no_grad():
        alone = model.encode_users(history, mask)
        assert not torch.allclose(model.encode_users(history, mask, personal), alone)
        model.personal_gate.fill_(0.0)
        assert torch.allclose(model.encode_users(history, mask, personal), alone)
        model.personal_gate.fill_(1.0)
        mixed = model.encode_users(history, mask, personal)
        assert torch.allclose(mixed[0], torch.nn.functional.normalize(alone[0] + personal[0],
                                                                       dim=-1), atol=1e-5)
    without_gate = dataclasses.replace(model.weights(), personal_gate=None)
    with pytest.raises(BadPromptWeights, match="personal_gate"):
        decode_weights(without_gate.to_bytes())


def test_the_last_readout_is_the_hidden_state_at_each_item_and_sees_no_later_item(backbone):
    tokenizer, encoder = backbone
    config = plain_config(4, causal=True, readout="last")
    model = PromptRecModel(encoder, initial_weights(tokenizer, encoder, config))
    history, mask = torch.randn(2, 5, 384), torch.tensor([[1] * 5, [1, 1, 1, 0, 0]]).bool()
    prefixes = model.encode_prefixes(history, mask, with_prompt_only=True)  # [2, 6, 384]
    users = model.encode_users(history, mask)
    assert torch.allclose(users[0], prefixes[0, 5], atol=1e-5)  # after all 5 items
    assert torch.allclose(users[1], prefixes[1, 3], atol=1e-5)  # after its 3
    changed = history.clone()
    changed[:, 4] = torch.randn(2, 384)  # a later item changes no earlier prefix
    again = model.encode_prefixes(changed, mask, with_prompt_only=True)
    assert torch.allclose(again[:, :5], prefixes[:, :5], atol=1e-5)
    assert not torch.allclose(again[0, 5], prefixes[0, 5], atol=1e-3)
    mean = PromptRecModel(encoder, initial_weights(
        tokenizer, encoder, plain_config(4, causal=True, readout="mean")))
    assert not torch.allclose(mean.encode_users(history, mask), users, atol=1e-3)


def test_user_layers_run_the_backbones_first_k_layers_only(backbone):
    import copy

    tokenizer, encoder = backbone
    short = copy.deepcopy(encoder)
    short.encoder.layer = short.encoder.layer[:2]
    history, mask = torch.randn(2, 3, 384), torch.tensor([[1, 1, 1], [1, 0, 0]])
    for causal, readout in ((True, "last"), (False, "mean")):
        two = PromptRecModel(encoder, initial_weights(tokenizer, encoder, plain_config(
            4, causal=causal, readout=readout, user_layers=2)))
        cut = PromptRecModel(short, two.weights())  # the same weights on a 2-layer encoder
        cut.structure = dataclasses.replace(cut.structure, user_layers=0)
        full = PromptRecModel(encoder, initial_weights(tokenizer, encoder, plain_config(
            4, causal=causal, readout=readout, user_layers=0)))
        users = two.encode_users(history, mask)
        assert torch.allclose(users, cut.encode_users(history, mask), atol=1e-5)
        assert not torch.allclose(users, full.encode_users(history, mask), atol=1e-3)
