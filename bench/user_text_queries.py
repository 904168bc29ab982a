"""What a query in the prompt does to a user's list (bench/user_text.py's query part).

For each genre query, the share of a user's top 10 (earlier items masked) that is in the
genre, with the query and without it, for the same users and version; and, for queries
unrelated to films, how much of the plain top 10 they keep. A query is read as serving
reads it: its tokens in the prompt and, for a version with a query gate, its sentence
vector against the items' texts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bench.quality import EvalSet
from services.user_text import UserTextTokens
from training.step import collate, mask_seen, replay_personal

GENRE_QUERIES = {"a comedy": "Comedy", "something with war": "War",
                 "a horror movie": "Horror", "a romantic film": "Romance",
                 "science fiction": "Sci-Fi", "a documentary": "Documentary",
                 "a western": "Western", "an animated movie for children": "Animation"}
UNRELATED_QUERIES = ("the weather is nice today", "my phone needs charging")


@torch.no_grad()
def top_items(model, evalset: EvalSet, text: np.ndarray, vectors: torch.Tensor,
              alpha: float | None, query: torch.Tensor | None = None, k: int = 10,
              batch_size: int = 64) -> np.ndarray:
    """The top k per event (its earlier items masked) when each reads `text` [E, U] and,
    given, the one `query` sentence vector [H] -> catalog indices [E, k]."""
    model.eval()
    items = model.item_table(vectors)
    out = []
    for start in range(0, len(evalset), batch_size):
        rows = np.arange(start, min(start + batch_size, len(evalset)))
        chunk = evalset.examples.subset(rows).trimmed()
        history, mask = collate(chunk.history, items)
        personal = replay_personal(chunk.history, chunk.weights, vectors, alpha)
        users = model.encode_users(history, mask, personal, torch.as_tensor(text[rows]))
        asked = None if query is None else model.query_scores(
            query.expand(len(rows), -1), vectors)
        scores = mask_seen(model.logits(users, items, asked), evalset.exclude[rows])
        out.append(scores.topk(k, dim=1).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def query_effects(model, test: EvalSet, users: np.ndarray, profiles: dict[str, str],
                  tokens: UserTextTokens, catalog, alpha: float | None, n_users: int,
                  embed: Callable[[list[str]], torch.Tensor], seed: int = 0) -> dict:
    """`embed`: texts [Q] -> their sentence vectors [Q, H] (services.backbone.embed_texts)
    -> query_genre_share, query_genre_share_without (means over GENRE_QUERIES),
    query_per_genre, query_unrelated_overlap10, query_users."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(test), size=min(n_users, len(test)), replace=False))
    sample = test.subset(pick)
    user_profiles = [profiles.get(u) for u in users[pick]]
    plain = top_items(model, sample, tokens.encode(user_profiles), catalog.vectors, alpha)
    per_genre = {}
    for query, genre in GENRE_QUERIES.items():
        in_genre = np.array([genre in item.categories for item in catalog.items])
        asked = top_items(model, sample, tokens.encode(user_profiles, [query] * len(pick)),
                          catalog.vectors, alpha, embed([query])[0])
        per_genre[query] = {"genre": genre, "with": round(float(in_genre[asked].mean()), 4),
                            "without": round(float(in_genre[plain].mean()), 4)}
    overlaps = [np.mean([len(set(a) & set(b)) / plain.shape[1] for a, b in zip(
        top_items(model, sample, tokens.encode(user_profiles, [q] * len(pick)),
                  catalog.vectors, alpha, embed([q])[0]), plain, strict=True)])
        for q in UNRELATED_QUERIES]
    return {"query_genre_share": round(float(np.mean([g["with"] for g in per_genre.values()])), 4),
            "query_genre_share_without": round(float(np.mean(
                [g["without"] for g in per_genre.values()])), 4),
            "query_per_genre": per_genre,
            "query_unrelated_overlap10": round(float(np.mean(overlaps)), 4),
            "query_users": len(pick)}
