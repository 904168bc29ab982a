"""The user's own words in a request: the profile the shard keeps, and the query asked.

A version trained with `user_text` reads them as tokens (services/user_text.py); a version
without reads neither, whatever the request says. A user's cached vector depends on their
text, so the cache entry (`slot`) is the user's own only while they have no text, and
one per (profile version, query) otherwise: a new profile or another query is a miss,
never a stale hit. A version with a query gate also scores the query's sentence vector
against the items' texts (`PromptRecModel.query_scores`); that vector is made off the
event loop, once per distinct query (an LRU), as the items' text vectors are made.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
import torch

from services.backbone import embed_texts
from services.prompt_model import PromptRecModel
from services.user_text import UserTextTokens
from serving.ranking import query_word_effects
from serving.slot import ActivePrompt

MAX_EXPLAINED_WORDS = 16  # query words explain=true weighs (one backbone row each)


@dataclass(frozen=True)
class UserText:
    ids: tuple[int, ...] | None  # the ids the version reads [U]; None: it reads no text
    profile: str | None
    query: str | None
    query_words: list[str] = field(default_factory=list)  # what explain=true weighs
    query_vector: torch.Tensor | None = None  # [H] for a version with a query gate

    def asked(self, active: ActivePrompt) -> torch.Tensor | None:
        """What the query adds to each item's score in `active`'s catalog [N], or None."""
        if self.query_vector is None:
            return None
        return active.model.query_scores(self.query_vector[None], active.catalog.vectors)[0]

    @property
    def used(self) -> dict[str, bool]:
        """What of the user's text the answer read (the response's `user_text`)."""
        return {"profile": self.ids is not None and bool(self.profile),
                "query": self.ids is not None and bool(self.query)}


class UserTextReader:
    def __init__(self, tokenizer, encoder, executor: Executor, read_profiles: bool = True):
        """`read_profiles` off: every user is read as if they had no profile."""
        self.tokenizer, self.encoder, self.executor = tokenizer, encoder, executor
        self.read_profiles = read_profiles
        self._tokens: dict[int, UserTextTokens] = {}  # by the version's text length
        self.query_vector = functools.lru_cache(maxsize=4096)(self._query_vector)

    def _query_vector(self, query: str) -> torch.Tensor:
        """The query's unit sentence vector [H], made as the items' text vectors are."""
        return embed_texts(self.tokenizer, self.encoder, [query])[0]

    def tokens(self, length: int) -> UserTextTokens:
        if length not in self._tokens:
            self._tokens[length] = UserTextTokens(self.tokenizer, length)
        return self._tokens[length]

    async def of(self, model: PromptRecModel, state: dict | None, query: str | None,
                 no_model: bool = False) -> UserText:
        """The text `model`'s version reads for this user's shard `state` and `query`
        (`no_model`: none, e.g. for a popularity arm)."""
        profile = (state or {}).get("profile") if self.read_profiles else None
        if no_model or not model.structure.user_text:
            return UserText(None, profile, query)
        tokens = self.tokens(model.structure.user_text_tokens)
        ids = tuple(int(i) for i in tokens.encode([profile], [query])[0])
        words = query.split()[:MAX_EXPLAINED_WORDS] if query else []
        vector = None
        if query and model.structure.query_gate:
            vector = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.query_vector, query.strip())
        return UserText(ids, profile, query, words, vector)

    @staticmethod
    def slot(user_id: str, text: UserText, state: dict | None) -> str:
        """The cache entry of this user with this text."""
        if text.ids is None or not (text.profile or text.query):
            return user_id  # the same vector as a user without any text
        return f"{user_id}\x1f{(state or {}).get('profile_version', 0)}\x1f{text.query or ''}"

    def explain(self, active: ActivePrompt, history: list[int], personal: np.ndarray | None,
                text: UserText, recommended: list[int], per_item: int) -> list[list[dict]]:
        """Per recommended item, the query words that raised it most (each left out in
        turn: `serving.ranking.query_word_effects`) -> [{"word", "score_added"}] each."""
        tokens = self.tokens(active.model.structure.user_text_tokens)
        words = text.query_words
        # The whole (first MAX_EXPLAINED_WORDS words of the) query, then each word left out.
        variants = [" ".join(words)] + [" ".join(words[:i] + words[i + 1:]) or None
                                        for i in range(len(words))]
        rows = [tuple(int(i) for i in tokens.encode([text.profile], [q])[0]) for q in variants]
        asked = None
        if text.query_vector is not None:  # each variant's own query vector
            query = torch.stack([self.query_vector(q) if q else torch.zeros_like(
                text.query_vector) for q in variants])
            asked = active.model.query_scores(query, active.catalog.vectors)
        effects = query_word_effects(active.model, active.items, history, personal, rows,
                                     words, recommended, per_item, asked)
        return [[{"word": w, "score_added": v} for w, v in item] for item in effects]
