"""Recompute what a prompt version must answer, to catch mixed-version responses.

A response names its prompt version; this rebuilds that version's model from the
registry's weights and checks the returned items and scores are that version's top-k
for the user's history (serving.ranking.ranking_mismatch). A response built from any
other version's weights fails the check (different soft prompt and temperature).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from services.catalog import Catalog
from services.decoded import decode_version
from services.item_weights import aligned_to
from services.prompt_model import PromptRecModel
from services.weights import PromptWeights
from serving.ranking import encode_histories, ranking_mismatch


class VersionChecker:
    def __init__(self, encoder, catalog: Catalog, fetch_blob: Callable[[int], bytes]):
        self.encoder, self.catalog, self.fetch_blob = encoder, catalog, fetch_blob
        self._models: dict[int, PromptRecModel] = {}
        self._scores: dict[tuple, torch.Tensor] = {}

    def _model(self, version: int) -> PromptRecModel:
        if version not in self._models:
            weights = decode_version(version, self.fetch_blob(version),
                                     self.catalog.vectors.shape[1])
            weights = aligned_to(weights, self.catalog.item_ids, self.catalog.vectors)
            self._models[version] = PromptRecModel(self.encoder, weights)
        return self._models[version]

    def expected_scores(self, version: int, history: list[int], personal=None) -> torch.Tensor:
        """[N] scores this version gives a user with this history and personal prompt [H]
        (nothing masked)."""
        key = (version, tuple(history),
               None if personal is None else np.asarray(personal, np.float32).tobytes())
        if key not in self._scores:
            model = self._model(version)
            with torch.inference_mode():
                items = model.item_table(self.catalog.vectors)
                user = encode_histories(model, items, [history], [personal])
                self._scores[key] = model.logits(user, items)[0]
        return self._scores[key]

    def mismatch(self, body: dict, history_ids: list[str], k: int, personal=None) -> str | None:
        """Why `body` (a /recommend answer for a user with `history_ids` and `personal`
        prompt) is not what its named prompt version gives, or None."""
        history = self.catalog.indices(history_ids)
        try:
            returned = [(self.catalog.index[i["item_id"]], float(i["score"]))
                        for i in body["items"]]
        except KeyError as err:
            return f"unknown item {err}"
        return ranking_mismatch(self.expected_scores(body["prompt_version"], history, personal),
                                history, returned, k)

    def mixed(self, answers: list, states: dict[str, dict | None],
              k: int) -> list[tuple[str, int, str]]:
        """The answers (bench.load Results with status 200 of /recommend, user_id in the
        request) that are not what their named version gives the user in `states`
        ({user: shard state read before the load}), as (user, version, why)."""
        out = []
        for r in answers:
            user = r.request[1]["user_id"]
            state = states[user]
            if r.body["state_version"] != (state["state_version"] if state else 0):
                reason = "state_version changed during the run"
            else:
                reason = self.mismatch(r.body, state["history"] if state else [], k,
                                       state["personal"] if state else None)
            if reason:
                out.append((user, r.body["prompt_version"], reason))
        return out


def perturbed_prompt(base: PromptWeights, seed: int) -> PromptWeights:
    """A distinct, reproducible plain version (soft prompt and temperature only): base
    soft prompt [P, H] plus seeded noise (so rankings change) and a different temperature
    (so every score changes)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = base.soft_prompt
    noise = torch.randn(prompt.shape, generator=gen) * prompt.std() * 0.5
    return PromptWeights.plain(prompt + noise, base.logit_scale + 0.02 * (1 + seed % 50))
