"""The tensor work behind /recommend, on a tiny randomly initialised BERT (real code,
no weights needed)."""

import pytest
import torch
from transformers import BertConfig, BertModel

from services.prompt_model import PromptRecModel
from services.weights import PromptWeights
from serving.ranking import encode_histories, explain, rank, ranking_mismatch, similar

H = 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = BertConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, vocab_size=50, max_position_embeddings=64)
    encoder = BertModel(config).eval()
    items = torch.nn.functional.normalize(torch.randn(40, H), dim=-1)  # [N, H]

    def model(seed: int) -> PromptRecModel:
        gen = torch.Generator().manual_seed(seed)
        return PromptRecModel(encoder, PromptWeights.plain(
            torch.randn(4, H, generator=gen), torch.tensor(2.0 + seed / 10)))
    return model, items


def test_batched_encoding_equals_one_at_a_time(setup):
    model, items = setup
    m = model(1)
    histories = [[3, 5, 7, 9, 11], [], [2], [8, 8, 1]]
    batched = encode_histories(m, items, histories)
    assert batched.shape == (4, H)
    for row, history in enumerate(histories):
        alone = encode_histories(m, items, [history])[0]
        assert torch.allclose(batched[row], alone, atol=1e-5), row


def test_rank_masks_seen_items_and_returns_k(setup):
    model, items = setup
    m = model(1)
    user = encode_histories(m, items, [[1, 2, 3]])[0]
    indices, scores = rank(m, user, items, 5, seen=[1, 2, 3])
    assert len(indices) == 5 and not {1, 2, 3} & set(indices.tolist())
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)
    all_but_three, _ = rank(m, user, items, 1000, seen=[1, 2, 3])
    assert len(all_but_three) == 37


def test_rank_keeps_only_allowed_items_and_the_same_order(setup):
    model, items = setup
    m = model(1)
    user = encode_histories(m, items, [[1, 2, 3]])[0]
    everything, _ = rank(m, user, items, 40, seen=[1, 2, 3])
    allowed = torch.zeros(40, dtype=torch.bool)
    allowed[[0, 1, 5, 9, 30]] = True
    picked, _ = rank(m, user, items, 10, seen=[1, 2, 3], allowed=allowed)
    # the allowed unseen items (1 is seen), in the order the full ranking gives them
    assert picked.tolist() == [i for i in everything.tolist() if i in {0, 5, 9, 30}]
    none, _ = rank(m, user, items, 10, seen=[], allowed=torch.zeros(40, dtype=torch.bool))
    assert len(none) == 0


def test_similar_items_are_the_nearest_by_cosine_without_the_item_itself(setup):
    _, items = setup
    indices, sims = similar(items, 4, 5, masked=[7])
    expected = [int(i) for i in (items @ items[4]).argsort(descending=True)
                if int(i) not in (4, 7)][:5]
    assert indices.tolist() == expected
    assert sims.tolist() == sorted(sims.tolist(), reverse=True) and float(sims[0]) <= 1.0
    assert len(similar(items, 4, 1000, masked=[])[0]) == 39


def test_explain_lists_most_similar_history_items(setup):
    _, items = setup
    history = [4, 9, 4, 17]
    reasons = explain(items, history, recommended=[9, 30], per_item=2)
    assert len(reasons) == 2 and all(len(r) == 2 for r in reasons)
    assert reasons[0][0][0] == 9 and reasons[0][0][1] == pytest.approx(1.0, abs=1e-3)
    sims = {h: float(items[30] @ items[h]) for h in (4, 9, 17)}
    assert [h for h, _ in reasons[1]] == sorted(sims, key=sims.get, reverse=True)[:2]
    assert explain(items, [], [1, 2], 3) == [[], []]


def test_ranking_check_accepts_its_version_and_catches_another(setup):
    model, items = setup
    history = [5, 6, 7]
    answers = {}
    expected = {}
    for version in (1, 2):
        m = model(version)
        user = encode_histories(m, items, [history])[0]
        indices, scores = rank(m, user, items, 10, history)
        answers[version] = list(zip(indices.tolist(), [round(s, 4) for s in scores.tolist()],
                                    strict=True))
        with torch.inference_mode():
            expected[version] = m.logits(user[None], items)[0]
    assert ranking_mismatch(expected[1], history, answers[1], 10) is None
    assert ranking_mismatch(expected[2], history, answers[2], 10) is None
    # The same user answered by the other version is caught, both ways round.
    assert ranking_mismatch(expected[1], history, answers[2], 10) is not None
    assert ranking_mismatch(expected[2], history, answers[1], 10) is not None
    # Tampering with one answer is caught: a seen item, a dropped item, a wrong order.
    first, *rest = answers[1]
    assert ranking_mismatch(expected[1], history, [(5, first[1])] + rest, 10)
    assert ranking_mismatch(expected[1], history, rest, 10)
    assert ranking_mismatch(expected[1], history, rest + [first], 10)
