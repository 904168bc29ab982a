import json

import numpy as np
import torch

from bench.common import Popularity
from bench.quality import held_out_items, is_cold, leave_one_out
from services.backbone import default_backbone_path
from services.catalog import Catalog
from services.data import Interactions, Item
from training.examples import PAD, Examples


def _catalog(n: int) -> Catalog:
    items = [Item(f"i{k}", f"Movie {k}", categories=("Drama",)) for k in range(n)]
    return Catalog(items, torch.nn.functional.normalize(torch.randn(n, 384), dim=1))


def _interactions(rows):
    users, items, ts = zip(*rows, strict=True)
    n = len(rows)
    return Interactions(np.array(users, dtype=object), np.array(items, dtype=object),
                        np.array(ts, float), np.ones(n, np.float32),
                        np.full(n, "rating", object), np.array([f"e{k}" for k in range(n)],
                                                               object), np.arange(n))


def _rows(catalog_size: int):
    cold = next(k for k in range(catalog_size) if is_cold(f"i{k}"))
    warm = [k for k in range(catalog_size) if not is_cold(f"i{k}")]
    a, b, c, d = warm[:4]
    rows = [("u", f"i{a}", 1), ("u", f"i{b}", 2), ("u", f"i{cold}", 3), ("u", f"i{c}", 4),
            ("u", f"i{d}", 5), ("v", f"i{a}", 1), ("v", f"i{b}", 2), ("v", f"i{cold}", 3)]
    return rows[::-1], (a, b, c, d, cold)


def test_the_standard_split_keeps_every_item_and_masks_every_earlier_one():
    catalog = _catalog(40)
    rows, (a, b, c, d, cold) = _rows(40)
    split = leave_one_out(_interactions(rows), catalog, history_len=2)
    # u: a, b, cold train; c validates; d tests. v: a trains; b validates; cold tests.
    assert sorted(split.train.target.tolist()) == sorted([b, cold])
    assert split.train_item_counts[cold] == 1 and split.train_item_counts[a] == 2
    u = split.test.examples.target.tolist().index(d)
    # The model reads the last history_len items; ranking masks all four earlier ones.
    assert split.test.examples.history[u].tolist() == [cold, c]
    assert sorted(split.test.exclude[u].tolist()) == sorted([a, b, cold, c])
    assert len(split.test_cold) == 0  # nothing held out
    # Validation events whose target no training event names: u's c.
    assert split.val_unseen.examples.target.tolist() == [c]


def test_the_cold_run_removes_held_out_items_from_training_entirely():
    catalog = _catalog(40)
    rows, (a, b, c, d, cold) = _rows(40)
    split = leave_one_out(_interactions(rows), catalog, history_len=4,
                          held_out=held_out_items(catalog))
    # u: train sees a, b (cold dropped); validation target c; test target d.
    assert split.train.target.tolist() == [b]
    assert split.train.history.tolist() == [[a, PAD, PAD, PAD]]
    assert sorted(split.val.examples.target.tolist()) == sorted([c, b])
    assert sorted(split.test.examples.target.tolist()) == sorted([d, cold])
    assert split.test_cold.examples.target.tolist() == [cold]
    assert split.train_item_counts[cold] == 0 and split.train_item_counts[a] == 2


def test_every_earlier_item_is_masked_not_only_the_history_window():
    from training.step import evaluate

    # Popularity ranks item 0 first; the user had item 0 long before (outside the window).
    pop = Popularity(np.array([9, 1, 5, 0]))
    examples = Examples(np.array([[1, PAD]]), np.array([2]))
    items = torch.eye(4)
    assert evaluate(pop, examples, items, k=1)["hr1"] == 0.0  # item 0 still ranked first
    exclude = np.array([[0, 1]])
    assert evaluate(pop, examples, items, k=1, exclude=exclude)["hr1"] == 1.0


def test_popularity_scores_are_the_same_for_everyone():
    pop = Popularity(np.array([3, 0, 9]))
    scores = pop.logits(pop.encode_users(torch.zeros(2, 1, 384), None), None)
    assert scores.shape == (2, 3) and scores[0].argmax() == 2 and torch.equal(scores[0], scores[1])


def test_offline_eval_writes_the_result_contract(tmp_path):
    from services.catalog import load_catalog
    from services.launch.cli import main
    from tests.conftest import TEST_CACHE

    catalog = load_catalog("ml-100k", default_backbone_path(), TEST_CACHE)
    out = tmp_path / "quality_ml-100k.json"
    assert main(["eval", "offline", "--steps", "2", "--batch-size", "8", "--max-users", "60",
                 "--out", str(out), "--cache-dir", str(TEST_CACHE)]) == 0
    result = json.loads(out.read_text())
    for key in ("ndcg10", "hr10", "pop_ndcg10", "pop_hr10", "trainable_params",
                "backbone_params", "per_user_state_floats", "train_seconds", "protocol",
                "cold_hr10"):
        assert key in result
    assert 0 <= result["ndcg10"] <= result["hr10"] <= 1
    assert 0 < result["pop_hr10"] <= 1  # popularity finds some test items among 60 users
    # The default model: soft prompt, item bias, item tokens, causal + personal gate.
    assert result["item_tokens"] and result["causal"] and result["item_bias"]
    assert result["lora_rank"] == 0 and result["dropout"] == 0.0  # the recipe is recorded
    assert result["trainable_params"] == 16 * 384 + 2 + len(catalog) * (1 + 384)
    assert result["trainable_params"] < 0.10 * result["backbone_params"]
    assert result["cold_rule"] in result["cold_rule_val_hr10"]
    assert result["test_users"] == 60


def test_items_never_trained_get_the_mean_bias_and_no_item_token():
    import numpy as np
    import torch

    from services.item_weights import unseen_items_fall_back_to_text
    from services.weights import PromptStructure, PromptWeights

    structure = PromptStructure(prompt_len=2, hidden_size=2, num_items=4, item_bias=True,
                                item_tokens=True)
    weights = PromptWeights(structure, soft_prompt=torch.ones(2, 2),
                            logit_scale=torch.tensor(1.0),
                            item_bias=torch.tensor([1.0, 3.0, -9.0, -9.0]),
                            item_delta=torch.ones(4, 2))
    out = unseen_items_fall_back_to_text(weights, np.array([5, 2, 0, 0]) > 0)
    assert out.item_bias.tolist() == [1.0, 3.0, 2.0, 2.0]
    assert out.item_delta.tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert weights.item_bias[2] == -9.0  # the input version is left as it was
    assert out.structure == weights.structure


def test_unseen_items_can_take_the_weights_of_their_nearest_seen_items_by_text():
    import numpy as np
    import torch

    from services.item_weights import unseen_items_fall_back_to_text
    from services.weights import PromptStructure, PromptWeights

    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    structure = PromptStructure(prompt_len=1, hidden_size=2, num_items=4, item_bias=True,
                                item_tokens=True)
    weights = PromptWeights(structure, soft_prompt=torch.ones(1, 2),
                            logit_scale=torch.tensor(1.0),
                            item_bias=torch.tensor([1.0, 5.0, -9.0, -9.0]),
                            item_delta=torch.tensor([[1.0, 1.0], [2.0, 2.0], [7.0, 7.0],
                                                     [7.0, 7.0]]))
    out = unseen_items_fall_back_to_text(weights, np.array([True, True, False, False]), text,
                                         neighbours=1)
    assert out.item_bias.tolist() == [1.0, 5.0, 1.0, 5.0]
    assert out.item_delta[2:].tolist() == [[1.0, 1.0], [2.0, 2.0]]


def test_unseen_items_may_start_at_a_low_quantile_of_the_seen_biases():
    import numpy as np
    import torch

    from services.item_weights import unseen_items_fall_back_to_text
    from services.weights import PromptStructure, PromptWeights

    structure = PromptStructure(prompt_len=1, hidden_size=2, num_items=6, item_bias=True,
                                item_tokens=True)
    weights = PromptWeights(structure, soft_prompt=torch.ones(1, 2),
                            logit_scale=torch.tensor(1.0),
                            item_bias=torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, -9.0]),
                            item_delta=torch.ones(6, 2))
    seen = np.array([True] * 5 + [False])
    assert unseen_items_fall_back_to_text(weights, seen, bias_quantile=0.25).item_bias[5] == 1.0
    low = unseen_items_fall_back_to_text(weights, seen, torch.eye(2)[[0, 1, 0, 1, 0, 0]],
                                         neighbours=1, bias_quantile=0.0)
    assert low.item_bias[5] == 0.0 and low.item_delta[5].tolist() == [1.0, 1.0]


def test_user_rows_are_one_per_user_ending_at_its_last_training_item():
    catalog = _catalog(40)
    rows, (a, b, c, d, cold) = _rows(40)
    split = leave_one_out(_interactions(rows), catalog, history_len=2, rows="users")
    # u trains on a, b, cold: one row, the window before cold, target cold (the causal
    # model learns b after a on the way). v trains on a alone: no target, no row.
    assert split.train.history.tolist() == [[a, b]] and split.train.target.tolist() == [cold]
    # Evaluation does not depend on how training rows are cut.
    targets = leave_one_out(_interactions(rows), catalog, history_len=2)
    assert split.test.exclude.tolist() == targets.test.exclude.tolist()


def test_batches_cover_every_example_once_per_epoch():
    from training.examples import batches, steps_for

    steps = steps_for(2, n_examples=10, batch_size=4)
    assert steps == 5
    seen = np.concatenate(list(batches(10, 4, steps, np.random.default_rng(0))))
    assert len(seen) == 20
    assert sorted(seen[:10].tolist()) == list(range(10))  # the first epoch, whole
    assert np.bincount(seen, minlength=10).tolist() == [2] * 10


def test_personal_prompts_off_trains_and_scores_without_them():
    from bench.quality_run import personal_rate
    from services.config_sources import load_settings
    from training.step import replay_personal

    assert personal_rate(load_settings(env={})) == 0.1
    assert personal_rate(load_settings(env={}, overrides={"personal_prompts": False})) is None
    history = np.array([[0, 1, PAD]])
    assert replay_personal(history, None, torch.eye(3), None) is None
    assert replay_personal(history, None, torch.eye(3), 0.5).tolist() == [[0.5, 0.5, 0.0]]
