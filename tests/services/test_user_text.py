"""User text as tokens (services/user_text.py) and the user_text versions that read them."""

import json

import numpy as np
import pytest
import torch

from services.backbone import default_backbone_path, load_backbone
from services.config import ConfigError, ModelConfig
from services.prompt_model import PromptRecModel
from services.user_text import TEXT_PAD, UserTextTokens
from services.weights import METADATA_KEY, PromptStructure, decode_weights, initial_weights
from training.examples import Examples
from training.step import train_step, without_text

H, N, U = 384, 6, 12


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(default_backbone_path())


@pytest.fixture(scope="module")
def tokens(backbone):
    return UserTextTokens(backbone[0], U)


def _model(backbone, user_text: bool) -> PromptRecModel:
    tokenizer, encoder = backbone
    config = ModelConfig(user_text=user_text, user_text_tokens=U, item_bias=False,
                         item_tokens=False)
    torch.manual_seed(0)
    return PromptRecModel(encoder, initial_weights(tokenizer, encoder, config)).eval()


def _history(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(batch, length, H), dim=-1)
    return vectors, torch.ones(batch, length)


def test_rows_are_left_padded_and_always_end_with_the_end_token(tokens):
    rows = tokens.encode(["a man aged 25-34, a programmer", None, "", "word " * 50],
                         [None, "a comedy", None, "a very long query " * 10])
    assert rows.shape == (4, U)
    assert (rows[:, -1] == tokens.end).all()
    assert rows[1].tolist()[-4:] == [tokens.end, *tokens.tokenizer(
        "a comedy", add_special_tokens=False)["input_ids"], tokens.end]
    assert (rows[2, :-1] == TEXT_PAD).all()  # no text: the end token alone
    for row in rows:  # padding only on the left
        real = np.flatnonzero(row != TEXT_PAD)
        assert (np.diff(real) == 1).all() and real[-1] == U - 1
    # With a profile the query keeps at most half the room; the profile the rest.
    both = tokens.tokens("word " * 50, "query " * 50)
    assert len(both) == U and both.count(tokens.end) == 2


def test_blank_query_and_profile_are_no_text(tokens):
    assert tokens.tokens(None, "   ") == tokens.tokens("", None) == [tokens.end]


def test_the_structure_records_user_text_and_refuses_it_without_causal():
    with pytest.raises(ConfigError, match="user_text"):
        ModelConfig(user_text=True, causal=False).check()
    with pytest.raises(ConfigError, match="user_text_tokens"):
        ModelConfig(user_text_tokens=1).check()
    off = PromptStructure.of(ModelConfig(user_text_tokens=20), H, N)
    assert (off.user_text, off.user_text_tokens) == (False, 0)  # the length only with text
    on = PromptStructure.of(ModelConfig(user_text=True, user_text_tokens=20), H, N)
    assert PromptStructure.from_metadata(on.to_metadata()) == on


def test_a_user_text_version_travels_and_reads_text(backbone, tokens):
    model = _model(backbone, user_text=True)
    blob = model.weights().to_bytes()
    assert decode_weights(blob, H).structure.user_text_tokens == U
    history, mask = _history(2, 3)
    plain = model.encode_users(history, mask, text_ids=torch.as_tensor(
        tokens.encode([None, None])))
    read = model.encode_users(history, mask, text_ids=torch.as_tensor(
        tokens.encode(["a woman under 18, a K-12 student", None])))
    assert not torch.allclose(plain[0], read[0], atol=1e-4)  # her text moved her vector
    assert torch.allclose(plain[1], read[1], atol=1e-5)  # and no one else's
    with pytest.raises(ValueError, match="text ids"):
        model.encode_users(history, mask)


def test_a_user_is_encoded_alike_alone_and_in_a_batch_of_other_texts(backbone, tokens):
    model = _model(backbone, user_text=True)
    history, mask = _history(3, 4)
    mask[1, 2:] = 0  # a shorter history, right-padded
    texts = tokens.encode(["a man aged 56 or older, retired", "a long profile " * 9, None],
                          ["a western", None, "science fiction"])
    batch = model.encode_users(history, mask, text_ids=torch.as_tensor(texts))
    for row in range(3):
        alone = model.encode_users(history[row:row + 1, :int(mask[row].sum())],
                                   mask[row:row + 1, :int(mask[row].sum())],
                                   text_ids=torch.as_tensor(texts[row:row + 1]))
        assert torch.allclose(batch[row], alone[0], atol=1e-5)


def test_serving_reads_the_user_where_training_scores_the_next_item(backbone, tokens):
    """encode_users (serving) is the row forward's causal prefixes (training) put after
    the last item; with no history, row 0: the prompt and the text alone."""
    model = _model(backbone, user_text=True)
    text = torch.as_tensor(tokens.encode(["a man aged 25-34, a writer"], ["a comedy"]))
    items = torch.nn.functional.normalize(torch.randn(N, H), dim=-1)
    idx, mask = torch.tensor([[2, 4]]), torch.ones(1, 2)
    logits = model(idx, mask, items, None, text)  # [1, 3, N]
    user = model.encode_users(items[idx], mask, text_ids=text)
    assert torch.allclose(model.logits(user, items), logits[:, 2], atol=1e-4)
    cold = model.encode_users(items[idx][:, :0], mask[:, :0], text_ids=text)
    assert torch.allclose(model.logits(cold, items), logits[:, 0], atol=1e-4)


def test_a_version_without_user_text_ignores_none_and_trains_as_before(backbone):
    model = _model(backbone, user_text=False)
    history, mask = _history(1, 2)
    assert model.encode_users(history, mask).shape == (1, H)


def test_training_with_text_moves_the_prompt_and_drops_text_of_chosen_rows(backbone, tokens):
    model = _model(backbone, user_text=True)
    text = tokens.encode(["a woman aged 18-24, an artist", "a man aged 35-44, a lawyer"])
    dropped = without_text(text, np.array([True, False]))
    assert dropped[0].tolist() == [TEXT_PAD] * (U - 1) + [tokens.end]
    assert (dropped[1] == text[1]).all() and (text[0] != TEXT_PAD).sum() > 1  # a copy
    batch = Examples(np.array([[0, 1], [2, -1]], np.int32), np.array([3, 4], np.int32),
                     text=text)
    before = model.soft_prompt.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    items = torch.nn.functional.normalize(torch.randn(N, H), dim=-1)
    loss = train_step(model, optimizer, batch, items, None, text_dropout=0.5,
                      rng=np.random.default_rng(0))
    assert np.isfinite(loss) and not torch.equal(before, model.soft_prompt.detach())


def _gated(backbone, gate: float) -> PromptRecModel:
    model = _model(backbone, user_text=True)
    with torch.no_grad():
        model.query_gate.fill_(gate)
    return model


def test_a_query_adds_its_gated_text_match_to_the_target_row_only(backbone, tokens):
    """Training's forward adds query_gate x cos(query, item text) to the row after the
    last item (what the user asked for next), and serving's `rank` adds the same."""
    from services.backbone import embed_texts
    from serving.ranking import rank

    tokenizer, encoder = backbone
    model = _gated(backbone, 3.0)
    assert model.structure.query_gate and model.weights().query_gate == 3.0
    query = embed_texts(tokenizer, encoder, ["a comedy"])  # [1, H]
    torch.manual_seed(2)
    items = torch.nn.functional.normalize(torch.randn(N, H), dim=-1)
    text = torch.as_tensor(tokens.encode([None], ["a comedy"]))
    idx, mask = torch.tensor([[2, 4, 0]]), torch.tensor([[1.0, 1.0, 0.0]])  # 2 real items
    with torch.no_grad():
        asked = model(idx, mask, items, None, text, query)
        plain = model(idx, mask, items, None, text)
    added = 3.0 * query @ items.T  # [1, N]
    assert torch.allclose(asked[:, 2] - plain[:, 2], added, atol=1e-5)
    assert torch.equal(asked[:, [0, 1, 3]], plain[:, [0, 1, 3]])
    user = model.encode_users(items[idx[:, :2]], mask[:, :2], text_ids=text)[0]
    indices, scores = rank(model, user, items, N, [], None, model.query_scores(query, items)[0])
    assert torch.allclose(scores, asked[0, 2][indices], atol=1e-4)
    assert model.query_scores(None, items) is None


def test_training_raises_the_gate_when_queries_name_the_targets(backbone, tokens):
    model = _model(backbone, user_text=True)
    torch.manual_seed(3)
    items = torch.nn.functional.normalize(torch.randn(N, H), dim=-1)
    targets = np.array([3, 4, 5, 1], np.int32)
    batch = Examples(np.array([[0, 1], [2, -1], [0, -1], [2, 3]], np.int32), targets,
                     text=tokens.encode([None] * 4), query=items[targets].numpy())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        train_step(model, optimizer, batch, items, None)
    assert float(model.query_gate.detach()) > 0.1  # a query that names the target is worth trusting


def test_a_user_text_version_from_before_the_gate_still_reads_and_serves(backbone):
    old = PromptStructure.of(ModelConfig(user_text=True, user_text_tokens=U), H, N)
    meta = json.loads(old.to_metadata()[METADATA_KEY])
    del meta["query_gate"]
    legacy = PromptStructure.from_metadata({METADATA_KEY: json.dumps(meta)})
    assert legacy.user_text and not legacy.query_gate
    assert "query_gate" not in legacy.tensor_shapes()


def test_a_reader_told_not_to_read_profiles_reads_a_user_as_one_without(backbone):
    """The prequential evaluation's no_profiles arm: the same version, the profile unread,
    so the text (and the cache slot) is exactly that of a user who has none."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from serving.user_text import UserTextReader

    model = _model(backbone, user_text=True)
    state = {"profile": "a 25-year-old writer", "profile_version": 3}
    with ThreadPoolExecutor(1) as executor:
        reading = UserTextReader(*backbone, executor)
        blind = UserTextReader(*backbone, executor, read_profiles=False)
        read = asyncio.run(reading.of(model, state, None))
        unread = asyncio.run(blind.of(model, state, None))
        nobody = asyncio.run(reading.of(model, {"profile": None}, None))
        asked = asyncio.run(blind.of(model, state, "a comedy"))
    assert read.used == {"profile": True, "query": False}
    assert unread.used == {"profile": False, "query": False}
    assert unread.ids == nobody.ids != read.ids
    assert UserTextReader.slot("u", unread, state) == "u" != UserTextReader.slot("u", read, state)
    assert asked.used == {"profile": False, "query": True}  # a query is still read


def test_query_vectors_embed_each_distinct_query_once_and_leave_the_rest_zero():
    from services.user_text import query_vectors

    asked = []

    def embed(texts):
        asked.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts])

    out = query_vectors(["a war film", None, "", "a war film", "comedy"], embed, 2)
    assert asked == [["a war film", "comedy"]]
    assert out.dtype == np.float32 and out.tolist() == [[10, 1], [0, 0], [0, 0], [10, 1],
                                                        [6, 1]]
    assert query_vectors([None, ""], embed, 2).tolist() == [[0, 0], [0, 0]]
    assert len(asked) == 1  # nothing asked: nothing embedded
