import numpy as np
import pytest
import torch

from services.backbone import default_backbone_path, load_backbone
from services.config import ConfigError, Settings, TrainingSettings
from services.prompt_model import PromptRecModel
from services.weights import initial_weights
from tests.model_configs import plain_config
from training.examples import PAD, Examples, round_steps
from training.scheduler import RoundScheduler
from training.step import evaluate, mask_seen, next_items, train_step


class FixedScores:
    """A stand-in model whose users are given directly: row i of history picks user i."""

    def __init__(self, users):
        self.users = users

    def item_table(self, text_vectors):
        return text_vectors

    def encode_users(self, history, mask, personal=None, text_ids=None):
        return self.users[: history.shape[0]]

    def logits(self, users, items):
        return users @ items.T


def test_evaluate_ranks_fully_and_masks_history():
    items = torch.eye(4)
    users = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.8, 0.1, 0.0]])
    # User 0 saw item 0, so target item 1 is ranked first; user 1 saw nothing: rank 2.
    examples = Examples(np.array([[0, PAD], [PAD, PAD]]), np.array([1, 1]))
    result = evaluate(FixedScores(users), examples, items, k=10)
    assert result["hr10"] == 1.0
    assert result["ndcg10"] == pytest.approx((1.0 + 1 / np.log2(3)) / 2)
    assert evaluate(FixedScores(users), examples, items, k=1)["hr1"] == 0.5


def test_mask_seen_ignores_padding():
    masked = mask_seen(torch.zeros(2, 3), np.array([[2, PAD], [PAD, PAD]]))
    assert masked.tolist() == [[0, 0, float("-inf")], [0, 0, 0]]


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    tokenizer, encoder = load_backbone(default_backbone_path())
    model = PromptRecModel(encoder, initial_weights(tokenizer, encoder, plain_config(4)))
    items = torch.nn.functional.normalize(torch.randn(50, 384), dim=1)
    batch = Examples(np.random.default_rng(0).integers(0, 50, (8, 5)).astype(np.int32),
                     np.arange(8, dtype=np.int32))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = [train_step(model, opt, batch, items) for _ in range(8)]
    assert losses[-1] < losses[0]


def test_scheduler_triggers_by_events_or_time():
    training = TrainingSettings(train_every_events=100, train_every_s=60.0)
    scheduler = RoundScheduler(None, training, lambda: 0)
    assert scheduler.due(100, 0) and not scheduler.due(99, 10)
    assert scheduler.due(1, 61) and not scheduler.due(0, 61)  # nothing new: no round


def test_the_first_round_starts_early_and_later_ones_on_the_usual_trigger():
    training = TrainingSettings(train_every_events=100, first_round_events=10)
    scheduler = RoundScheduler(None, training, lambda: 0)
    assert scheduler.due(10, 0, first=True) and not scheduler.due(9, 0, first=True)
    assert not scheduler.due(10, 0) and scheduler.due(100, 0)
    usual = RoundScheduler(None, TrainingSettings(train_every_events=100,
                                                  first_round_events=0), lambda: 0)
    assert not usual.due(99, 0, first=True) and usual.due(100, 0, first=True)
    often = RoundScheduler(None, TrainingSettings(train_every_events=100,
                                                  first_round_events=500), lambda: 0)
    assert often.due(100, 0, first=True)  # never later than any other round


def test_a_causal_step_learns_every_next_item_of_the_history():
    tokenizer, encoder = load_backbone(default_backbone_path())
    model = PromptRecModel(encoder, initial_weights(
        tokenizer, encoder, plain_config(4, item_tokens=True, causal=True), num_items=8))
    text = torch.nn.functional.normalize(torch.randn(8, encoder.config.hidden_size), dim=-1)
    batch = Examples(np.array([[0, 1, 2, -1], [3, -1, -1, -1]], np.int32),
                     np.array([4, 5], np.int32))
    idx = torch.as_tensor(batch.history, dtype=torch.long)
    assert next_items(idx.clamp(min=0), idx >= 0, torch.as_tensor(batch.target)).tolist() == [
        [0, 1, 2, 4, -1], [3, 5, -1, -1, -1]]  # the prompt alone predicts the first item
    empty = torch.full((2, 1), PAD)
    assert next_items(empty.clamp(min=0), empty >= 0, torch.tensor([6, 7])).tolist() == [
        [6, -1], [7, -1]]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = [train_step(model, optimizer, batch, text) for _ in range(15)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] * 0.5


def test_a_batch_is_trimmed_to_its_longest_history():
    batch = Examples(np.array([[3, 4, PAD, PAD], [5, PAD, PAD, PAD]], np.int32),
                     np.array([1, 2], np.int32), np.ones((2, 4), np.float32))
    trimmed = batch.trimmed()
    assert trimmed.history.tolist() == [[3, 4], [5, PAD]] and trimmed.weights.shape == (2, 2)
    empty = Examples(np.full((1, 3), PAD, np.int32), np.array([0], np.int32)).trimmed()
    assert empty.history.shape == (1, 1)  # a cold row keeps one (padding) column


def test_a_bf16_step_learns_with_float32_weights():
    torch.manual_seed(0)
    tokenizer, encoder = load_backbone(default_backbone_path())
    config = plain_config(4, item_tokens=True, item_bias=True, causal=True, readout="last",
                          user_layers=2)
    model = PromptRecModel(encoder, initial_weights(tokenizer, encoder, config, num_items=8))
    text = torch.nn.functional.normalize(torch.randn(8, encoder.config.hidden_size), dim=-1)
    batch = Examples(np.array([[0, 1, 2, -1], [3, 6, -1, -1]], np.int32),
                     np.array([4, 5], np.int32))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = [train_step(model, optimizer, batch, text, bf16=True) for _ in range(15)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] * 0.5
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_dropout_trains_in_train_mode_and_evaluation_scores_without_it():
    from training.step import evaluate

    torch.manual_seed(0)
    tokenizer, encoder = load_backbone(default_backbone_path())
    config = plain_config(4, item_tokens=True, causal=True, readout="last", user_layers=1)
    model = PromptRecModel(encoder, initial_weights(tokenizer, encoder, config, num_items=8))
    text = torch.nn.functional.normalize(torch.randn(8, encoder.config.hidden_size), dim=-1)
    batch = Examples(np.array([[0, 1, 2, -1], [3, 6, -1, -1]], np.int32),
                     np.array([4, 5], np.int32))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    train_step(model, optimizer, batch, text, dropout=0.5)
    assert model.training and model.encoder.training and model.dropout == 0.5
    idx = torch.as_tensor(batch.history, dtype=torch.long)
    noisy = [model(idx.clamp(min=0), idx >= 0, text) for _ in range(2)]
    assert not torch.allclose(noisy[0], noisy[1])  # dropout is on
    first = evaluate(model, batch, text)
    assert not model.training and not model.encoder.training
    assert evaluate(model, batch, text) == first  # scoring is deterministic
    train_step(model, optimizer, batch, text)  # dropout 0: the step runs in eval mode
    assert not model.training


def test_a_small_round_takes_fewer_steps_than_train_steps():
    assert round_steps(200, 1.0, 2_000, 32, 2) == 32  # one pass over 2,000 rows, 64 a step
    assert round_steps(200, 2.0, 2_000, 32, 2) == 63
    assert round_steps(40, 1.0, 100_000, 32, 2) == 40  # enough data: train_steps
    assert round_steps(40, 1.0, 1, 32, 2) == 1


def test_training_teaches_the_prompt_alone_what_users_start_with():
    torch.manual_seed(0)  # the random item vectors below
    tokenizer, encoder = load_backbone(default_backbone_path())
    model = PromptRecModel(encoder, initial_weights(
        tokenizer, encoder, plain_config(4, item_tokens=True, causal=True), num_items=8))
    text = torch.nn.functional.normalize(torch.randn(8, encoder.config.hidden_size), dim=-1)
    batch = Examples(np.array([[6, 1, 2], [6, 4, PAD], [6, PAD, PAD]], np.int32),
                     np.array([5, 3, 0], np.int32))

    def first_choice() -> int:  # the top item of a user without history
        with torch.no_grad():
            users = model.encode_users(torch.zeros(1, 0, text.shape[1]), torch.zeros(1, 0))
            return int(model.logits(users, model.item_table(text)).argmax())

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(15):
        train_step(model, optimizer, batch, text, personal_alpha=None)
    assert first_choice() == 6  # every user starts with item 6

    # Given prompt targets, the prompt alone learns them instead of the rows' first items
    # (PAD: no loss for that row's prompt alone).
    batch.prompt_target = np.array([2, 2, PAD], np.int32)
    idx = torch.as_tensor(batch.history, dtype=torch.long)
    assert [row[0] for row in next_items(idx.clamp(min=0), idx >= 0,
                                         torch.as_tensor(batch.target),
                                         torch.as_tensor(batch.prompt_target)).tolist()] == \
        [2, 2, PAD]
    for _ in range(15):
        train_step(model, optimizer, batch, text, personal_alpha=None)
    assert first_choice() == 2


def test_the_optimiser_gives_item_tokens_and_bias_their_own_rates():
    from training.step import make_optimizer

    tokenizer, encoder = load_backbone(default_backbone_path())
    model = PromptRecModel(encoder, initial_weights(
        tokenizer, encoder, plain_config(4, item_bias=True, item_tokens=True, causal=True),
        num_items=8))

    def rates(**changes) -> dict[str, float]:
        optimizer = make_optimizer(model, TrainingSettings(**changes))
        named = {id(p): n for n, p in model.named_parameters()}
        return {named[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}

    shared = rates(learning_rate=0.01, item_token_lr=0.003)
    assert shared["item_bias"] == shared["soft_prompt"] == 0.01
    assert shared["item_delta"] == 0.003
    own = rates(learning_rate=0.001, item_token_lr=0.003, item_bias_lr=0.05)
    assert own["item_bias"] == 0.05 and own["soft_prompt"] == 0.001


def test_the_cosine_schedule_decays_every_rate_to_zero_by_the_last_step():
    from training.step import make_optimizer, make_schedule

    tokenizer, encoder = load_backbone(default_backbone_path())
    model = PromptRecModel(encoder, initial_weights(
        tokenizer, encoder, plain_config(4, item_bias=True, item_tokens=True, causal=True),
        num_items=8))

    def rates_after(schedule_name: str, steps: int, taken: int) -> list[float]:
        training = TrainingSettings(learning_rate=0.01, item_token_lr=0.003,
                                    lr_schedule=schedule_name)
        optimizer = make_optimizer(model, training)
        schedule = make_schedule(optimizer, training, steps)
        for _ in range(taken):
            optimizer.step()
            schedule.step()
        return [g["lr"] for g in optimizer.param_groups]

    full = rates_after("constant", 10, 0)
    assert sorted(full) == [0.003, 0.01]
    assert rates_after("constant", 10, 10) == full
    assert rates_after("cosine", 10, 0) == full
    assert rates_after("cosine", 10, 5) == pytest.approx([r / 2 for r in full])
    assert rates_after("cosine", 10, 10) == pytest.approx([0.0, 0.0])
    with pytest.raises(ConfigError, match="lr_schedule"):
        Settings().replace(lr_schedule="linear")
