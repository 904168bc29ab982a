"""LoRA adapters on the user side: a no-op until trained, trained without touching the
pretrained weights, carried whole in a version's blob, and refused when they do not fit."""

import pytest
import torch
import torch.nn.functional as F

from services.backbone import default_backbone_path, embed_texts, load_backbone
from services.config import ConfigError, Settings, TrainingSettings
from services.lora import TARGETS
from services.prompt_model import PromptRecModel
from services.weights import BadPromptWeights, PromptStructure, decode_weights, initial_weights
from tests.model_configs import plain_config
from training.step import make_optimizer

ITEMS = 12


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(default_backbone_path())


def lora_model(backbone, rank=4, **parts):
    tokenizer, encoder = backbone
    config = plain_config(4, causal=True, readout="last", user_layers=2, lora_rank=rank,
                          **parts)
    return PromptRecModel(encoder, initial_weights(tokenizer, encoder, config, ITEMS))


def batch():
    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(ITEMS, 384), dim=-1)
    idx = torch.randint(0, ITEMS, (3, 5))
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return idx, mask, vectors


def test_untrained_adapters_change_nothing_and_only_they_and_the_prompt_train(backbone):
    tokenizer, encoder = backbone
    with_lora = lora_model(backbone)
    without = PromptRecModel(encoder, initial_weights(
        tokenizer, encoder, plain_config(4, causal=True, readout="last", user_layers=2)))
    idx, mask, vectors = batch()
    with torch.no_grad():
        assert torch.allclose(with_lora(idx, mask, vectors), without(idx, mask, vectors),
                              atol=1e-5)
    per_layer = len(TARGETS) * 2 * 4 * 384  # A [4, 384] and B [384, 4] per projection
    assert with_lora.trainable_parameters() == without.trainable_parameters() + 2 * per_layer


def test_training_moves_the_adapters_never_the_shared_encoder(backbone):
    _, encoder = backbone
    before = {n: p.clone() for n, p in encoder.named_parameters()}
    model = lora_model(backbone)
    optimizer = make_optimizer(model, TrainingSettings(lora_lr=0.01))
    assert [g["lr"] for g in optimizer.param_groups][-1] == 0.01
    idx, mask, vectors = batch()
    for _ in range(3):
        loss = F.cross_entropy(model(idx, mask, vectors)[:, -1], idx[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = model.weights()
    assert trained.lora_b.abs().sum() > 0  # B starts at zeros
    assert all(torch.equal(p, before[n]) for n, p in encoder.named_parameters())
    # Item text vectors come from the shared encoder: still the pretrained ones.
    tokenizer, _ = backbone
    text = embed_texts(tokenizer, encoder, ["Toy Story (1995)"])
    fresh_tokenizer, fresh = load_backbone(default_backbone_path())
    assert torch.allclose(text, embed_texts(fresh_tokenizer, fresh, ["Toy Story (1995)"]))


def test_a_version_with_adapters_round_trips_through_its_blob(backbone):
    _, encoder = backbone
    model = lora_model(backbone)
    with torch.no_grad():
        for layer in model.adapted:
            layer.attention.self.value.lora_b.normal_()
    blob = model.weights().to_bytes()
    config = plain_config(4, causal=True, readout="last", user_layers=2, lora_rank=4)
    decoded = decode_weights(blob, 384, ITEMS, config)
    assert decoded.lora_a.shape == (2, len(TARGETS), 4, 384)
    assert decoded.lora_b.shape == (2, len(TARGETS), 384, 4)
    again = PromptRecModel(encoder, decoded)
    idx, mask, vectors = batch()
    with torch.no_grad():
        assert torch.allclose(model(idx, mask, vectors), again(idx, mask, vectors), atol=1e-6)
    # The structure is checked: a config without adapters refuses the blob.
    with pytest.raises(BadPromptWeights, match="lora_rank"):
        decode_weights(blob, 384, ITEMS, plain_config(4, causal=True, readout="last",
                                                      user_layers=2))


def test_adapters_need_the_layers_they_adapt():
    with pytest.raises(ValueError, match="user_layers"):
        PromptStructure(prompt_len=4, hidden_size=384, lora_rank=4, user_layers=0)
    with pytest.raises(ConfigError, match="lora_rank"):
        Settings().replace(lora_rank=4, user_layers=0).validate()
