"""A user's own words as tokens the user side reads: the profile, and a request's query.

A version trained with `user_text` reads, between its soft prompt and the history,
`user_text_tokens` (U) token ids from the backbone's own tokenizer, left-padded so that
the last position is always the end token:

    [pad ... pad] profile tokens [SEP] [query tokens [SEP]]

The end token makes "no text at all" one real token too, so a user without a profile is
encoded the same way in any batch, and a model trained with some profiles dropped learns
that case. Left padding puts the last text token at one fixed position, where a user
with no history is read (`PromptRecModel.encode_prefixes`). The embeddings of the ids
are the backbone's frozen word embeddings; nothing here trains.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

TEXT_PAD = -1  # a padding id; the model masks it as a key and embeds it as token 0


def query_vectors(queries: Sequence[str | None], embed: Callable[[list[str]], object],
                  hidden: int) -> np.ndarray:
    """Row queries [E] (None or "": none) -> [E, H] float32, each row its query's sentence
    vector (`embed(texts)` -> [Q, H], as the items' text vectors are made), a zero row where
    there is none (`Examples.query`); each distinct query is embedded once."""
    asked = sorted({q for q in queries if q})
    found = dict(zip(asked, np.asarray(embed(asked), np.float32), strict=True)) if asked else {}
    out = np.zeros((len(queries), hidden), np.float32)
    for row, query in enumerate(queries):
        if query:
            out[row] = found[query]
    return out


class UserTextTokens:
    """Turns profile and query texts into the [B, U] id rows a user_text version reads."""

    def __init__(self, tokenizer, max_tokens: int):
        if max_tokens < 2:
            raise ValueError("max_tokens must be >= 2 (the text and its end token)")
        end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None \
            else tokenizer.eos_token_id
        if end is None:
            raise ValueError("the tokenizer has neither a sep nor an eos token to end a text")
        self.tokenizer, self.max_tokens, self.end = tokenizer, max_tokens, int(end)
        # Profiles repeat from request to request; the tokenizer is the slow part.
        self._ids = functools.lru_cache(maxsize=65536)(self._tokenize)

    def _tokenize(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokens(self, profile: str | None, query: str | None = None) -> list[int]:
        """The ids of one user's text, at most U: `profile [SEP] [query [SEP]]`. The query
        keeps up to half the room when there is a profile (it is what the user asks for
        now), the profile the rest."""
        query_ids: list[int] = []
        if query and query.strip():
            room = (self.max_tokens - 2) // 2 if profile else self.max_tokens - 2
            query_ids = [*self._ids(query.strip())[:room], self.end]
        room = self.max_tokens - 1 - len(query_ids)
        profile_ids = list(self._ids(profile.strip())[:room]) if profile else []
        return [*profile_ids, self.end, *query_ids]

    def encode(self, profiles: Sequence[str | None], queries: Sequence[str | None] | None = None
               ) -> np.ndarray:
        """profiles [B] (None or "" = none), queries [B] or None -> ids [B, U] int32,
        left-padded with TEXT_PAD."""
        rows = np.full((len(profiles), self.max_tokens), TEXT_PAD, np.int32)
        for r, profile in enumerate(profiles):
            ids = self.tokens(profile, None if queries is None else queries[r])
            rows[r, self.max_tokens - len(ids):] = ids
        return rows

    def words(self, ids: Sequence[int]) -> list[str]:
        """Ids (one row, pads allowed) -> their tokens as text, for explanations."""
        return self.tokenizer.convert_ids_to_tokens([i for i in ids if i != TEXT_PAD])
