"""Pure tensor work behind /recommend: encode users in a batch, rank, explain, check.

Kept apart from the Serve deployment so each piece is testable on its own and the
benchmark can recompute, outside Serve, what a given prompt version must answer.
"""

from __future__ import annotations

import numpy as np
import torch

from services.prompt_model import PromptRecModel


def encode_histories(model: PromptRecModel, item_vectors: torch.Tensor,
                     histories: list[list[int]],
                     personals: list[np.ndarray | None] | None = None,
                     texts: list[tuple[int, ...] | None] | None = None) -> torch.Tensor:
    """One backbone pass for several users.

    item_vectors [N, H]; histories: B lists of item indices (oldest first, may be empty);
    personals: B personal prompts [H] from the shard state (None = none); texts: B rows
    of user text ids [U] (services.user_text; read by user_text versions only, which need
    every row) -> user vectors [B, H]. Shorter histories are right-padded and masked, so
    real positions keep their position ids and each row equals encoding that user alone
    (up to float rounding).
    """
    longest = max((len(h) for h in histories), default=0)
    batch = torch.zeros(len(histories), longest, item_vectors.shape[1])
    mask = torch.zeros(len(histories), longest)
    personal = torch.zeros(len(histories), item_vectors.shape[1])
    for row, history in enumerate(histories):
        if history:
            batch[row, : len(history)] = item_vectors[history]
            mask[row, : len(history)] = 1
        if personals is not None and personals[row] is not None:
            # A copy: buffers from Ray's object store are read-only.
            personal[row] = torch.from_numpy(np.array(personals[row], np.float32))
    text_ids = None
    if model.structure.user_text:
        if texts is None or any(t is None for t in texts):
            raise ValueError("a user_text version needs every user's text ids")
        text_ids = torch.tensor(np.array(texts, np.int64))
    with torch.inference_mode():
        return model.encode_users(batch, mask, personal, text_ids)


def rank(model: PromptRecModel, user: torch.Tensor, item_vectors: torch.Tensor, k: int,
         seen: list[int], allowed: torch.Tensor | None = None,
         asked: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """user [H], item_vectors [N, H] -> (item indices [k'], scores [k']), `seen` items
    masked and, given `allowed` [N] bool, only allowed items; k' = k unless fewer are left.
    asked [N]: what the request's query adds to each score (`UserText.asked`)."""
    with torch.inference_mode():
        scores = model.logits(user[None], item_vectors,
                              None if asked is None else asked[None])[0]  # fresh: mask in place
        return _top(scores, k, seen, allowed)


def rank_scores(scores: torch.Tensor, k: int, seen: list[int],
                allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N] (a fresh tensor, masked in place) -> the top k as `rank` gives them."""
    return _top(scores, k, seen, allowed)


def similar(item_vectors: torch.Tensor, item: int, k: int, masked: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k items nearest `item` by cosine similarity of the version's item vectors
    [N, H] (unit norm), the item itself and `masked` left out -> (indices [k'], sims [k'])."""
    with torch.inference_mode():
        sims = item_vectors @ item_vectors[item]  # [N]
        return _top(sims, k, [*masked, item], None)


def _top(scores: torch.Tensor, k: int, masked: list[int], allowed: torch.Tensor | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    if masked:
        scores.index_fill_(0, torch.tensor(masked, dtype=torch.long), float("-inf"))
    left = int(torch.isfinite(scores).sum())
    values, indices = torch.topk(scores, min(k, left))
    return indices, values


def explain(item_vectors: torch.Tensor, history: list[int], recommended: list[int],
            per_item: int) -> list[list[tuple[int, float]]]:
    """For each recommended item, the `per_item` history items most similar to it.

    Cosine similarity of frozen item vectors [N, H] (unit norm): the user vector is a
    transformer over exactly these history vectors, so the history items closest to a
    recommendation are the ones that pulled it up. One [k, L] matmul: cheap.
    -> per recommended item, [(history item index, similarity)], most similar first.
    """
    unique = list(dict.fromkeys(history))
    if not unique or not recommended or per_item < 1:
        return [[] for _ in recommended]
    sims = item_vectors[recommended] @ item_vectors[unique].T  # [k, L]
    values, cols = sims.topk(min(per_item, len(unique)), dim=1)
    return [[(unique[c], round(float(v), 4)) for c, v in zip(row_c, row_v, strict=True)]
            for row_c, row_v in zip(cols.tolist(), values.tolist(), strict=True)]


def query_word_effects(model: PromptRecModel, item_vectors: torch.Tensor, history: list[int],
                       personal: np.ndarray | None, texts: list[tuple[int, ...]],
                       words: list[str], recommended: list[int], per_item: int,
                       asked: torch.Tensor | None = None) -> list[list[tuple[str, float]]]:
    """For each recommended item, the query words that raised its score most.

    texts: the user's text ids with the whole query first, then with each of `words` left
    out in turn (len(words) + 1 rows); asked [len(words) + 1, N]: what each variant's
    query vector adds (a version with a query gate). A word's effect on an item is how
    much its score falls without it: one backbone pass for all the variants.
    -> per recommended item, [(word, score it added)], largest first, positive only.
    """
    if not words or not recommended or per_item < 1:
        return [[] for _ in recommended]
    users = encode_histories(model, item_vectors, [history] * len(texts),
                             [personal] * len(texts), texts)
    with torch.inference_mode():
        scores = model.logits(users, item_vectors, asked)[:, recommended]  # [W + 1, k]
    added = (scores[:1] - scores[1:]).T  # [k, W]
    return [[(words[w], round(float(v), 4)) for v, w in sorted(
        ((v, w) for w, v in enumerate(row.tolist()) if v > 0), reverse=True)[:per_item]]
            for row in added]


def ranking_mismatch(expected_scores: torch.Tensor, seen: list[int],
                     returned: list[tuple[int, float]], k: int, tol: float = 2e-3) -> str | None:
    """Why a returned ranking cannot come from `expected_scores`, or None if it can.

    expected_scores [N]: the scores one prompt version gives this user (unmasked);
    returned: (item index, score) as the service answered. The answer must be that
    version's top-k over unseen items: same length, each score equal within `tol`, in
    order, and nothing left out that scores higher (near-ties within `tol` may swap).
    """
    scores = expected_scores.clone().float()
    if seen:
        scores[torch.tensor(seen, dtype=torch.long)] = float("-inf")
    finite = int(torch.isfinite(scores).sum())
    if len(returned) != min(k, finite):
        return f"{len(returned)} items, expected {min(k, finite)}"
    picked = set()
    for index, score in returned:
        if not 0 <= index < len(scores):
            return f"item index {index} out of range"
        if index in picked:
            return f"item {index} twice"
        picked.add(index)
        if abs(float(scores[index]) - score) > tol:
            return f"item {index} scored {score}, version gives {float(scores[index]):.4f}"
    ordered = [s for _, s in returned]
    if any(b > a + tol for a, b in zip(ordered, ordered[1:], strict=False)):
        return "scores not in descending order"
    if returned:
        rest = scores.clone()
        rest[torch.tensor(sorted(picked), dtype=torch.long)] = float("-inf")
        best_left = float(rest.max())
        if best_left > min(ordered) + tol:
            return f"an item scoring {best_left:.4f} was left out for one scoring {min(ordered)}"
    return None
