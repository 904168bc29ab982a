"""The pieces of bench/user_text.py: who is a new user, their first events, the split's
text, and the whole command on a few users of ML-100K."""

import json

import numpy as np
import pytest
import torch

from bench import user_text as bench
from bench.quality import leave_one_out
from services.backbone import default_backbone_path, embed_texts, load_backbone
from services.catalog import Catalog
from services.data import Item
from services.user_text import TEXT_PAD, UserTextTokens
from tests.bench.test_quality import _interactions
from training.examples import PAD


def _catalog(n: int) -> Catalog:
    items = [Item(f"i{k}", f"Movie {k}", categories=("Comedy", "War"))
             for k in range(n)]
    return Catalog(items, torch.nn.functional.normalize(torch.randn(n, 384), dim=1))


def test_about_one_user_in_ten_is_new_and_stably_so():
    users = [f"u{k}" for k in range(2000)]
    new = [u for u in users if bench.is_new_user(u)]
    assert 150 < len(new) < 250 and new == [u for u in users if bench.is_new_user(u)]


def test_new_users_are_ranked_at_their_first_event_with_no_history():
    catalog = _catalog(6)
    rows = [("a", "i3", 5), ("a", "i1", 2), ("b", "i2", 1), ("b", "i4", 1), ("c", "i5", 0)]
    firsts, users = bench.first_events(_interactions(rows), catalog, {"a", "b"}, 4)
    assert users.tolist() == ["a", "b"]
    assert firsts.examples.target.tolist() == [1, 2]  # time order; a tie: the earlier row
    assert (firsts.examples.history == PAD).all()
    assert bench.first_item_counts(_interactions(rows), catalog, {"a", "b", "c"}).tolist() == \
        [0, 1, 1, 0, 0, 1]


def test_without_users_drops_every_event_of_theirs():
    inter = _interactions([("a", "i1", 1), ("b", "i2", 2), ("a", "i3", 3)])
    kept = bench.without_users(inter, np.array([True, False, True]))
    assert kept.user_ids.tolist() == ["b"] and kept.row.tolist() == [1]


def test_every_row_reads_its_own_users_profile_and_some_train_rows_a_query():
    tokenizer, encoder = load_backbone(default_backbone_path())
    tokens = UserTextTokens(tokenizer, 16)
    catalog = _catalog(8)
    rows = [(u, f"i{k}", t) for u in ("a", "b") for t, k in enumerate(range(1, 7))]
    split = leave_one_out(_interactions(rows), catalog, 4, rows="users")
    profiles = {"a": "a woman aged 18-24"}
    text = bench.split_with_text(split, tokens, profiles, catalog, 1.0,
                                 np.random.default_rng(0),
                                 lambda texts: embed_texts(tokenizer, encoder, texts))
    # Each train row's query also as its sentence vector; held-out rows ask for nothing.
    asked = [tokenizer.decode([i for i in row if i != TEXT_PAD]).split("[SEP]")[1].strip()
             for row in text.train.text]
    assert np.allclose(text.train.query, embed_texts(tokenizer, encoder, asked).numpy(),
                       atol=1e-5)
    assert text.val.examples.query is None and text.test.examples.query is None
    for part in ("val", "test"):
        ids = getattr(text, part).examples.text
        for row, user in zip(ids, split.users[part], strict=True):
            assert row.tolist() == tokens.encode([profiles.get(user)])[0].tolist()
    train = text.train.text
    assert (train != TEXT_PAD).sum(1).min() > 2  # each train row asked for a genre
    assert "movie" in tokenizer.decode([i for i in train[1] if i != TEXT_PAD])


@pytest.mark.slow
def test_the_command_writes_every_key_the_issue_names(tmp_path):
    out = tmp_path / "user_text.json"
    assert bench.main(["--dataset", "ml-100k", "--epochs", "0.3", "--max-users", "60",
                       "--query-users", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("cold_user_hr10", "cold_user_pop_hr10", "cold_user_prompt_only_hr10",
                "warm_hr10_with_profiles", "warm_hr10_without", "query_genre_share",
                "query_genre_share_without"):
        assert 0 <= result[key] <= 1, key
    assert result["cold_users"] > 0 and result["query_users"] == 5
    assert isinstance(result["query_gate"], float)  # the trained weight of the query match
