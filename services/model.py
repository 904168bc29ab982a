"""The personal-prompt rule (moving to services/personal.py in another branch of issue 13).

The rest of what this module held now lives one job per module:
    services/backbone.py      Hugging Face loading (offline), fingerprint, text embedding
    services/weights.py       the prompt weights: structure, container, codec, checks,
                              initial weights, the unseen-item rule
    services/decoded.py       decode each version once per process
    services/prompt_model.py  the nn.Module (encode users, prefixes, logits, forward)
"""

from __future__ import annotations

import numpy as np
import torch

# How much one event moves a user's personal prompt, by event type (ratings count as clicks).
EVENT_WEIGHTS = {"view": 0.5, "click": 1.0, "rating": 1.0, "purchase": 2.0}


def personal_prompt_update(personal: np.ndarray | None, item_vector: np.ndarray, event_type: str,
                           alpha: float) -> np.ndarray:
    """The online update rule of a user's personal prompt (one vector in item space, [H]).

    `personal` (float32) is updated in place and returned.

    The first event sets it to the item's vector; each later one moves it toward the
    item: p <- p + min(1, alpha * w(type)) * (v - p), an exponential moving average.
    """
    if personal is None:
        return item_vector.astype(np.float32, copy=True)
    rate = np.float32(min(1.0, alpha * EVENT_WEIGHTS.get(event_type, 1.0)))
    personal += rate * (item_vector - personal)  # in place: this runs once per event
    return personal


def personal_from_history(history: torch.Tensor, mask: torch.Tensor, alpha: float,
                          every_step: bool = False) -> torch.Tensor:
    """The same rule replayed over a history window (training has no shard state).

    history [B, L, H] oldest first, mask [B, L] -> personal [B, H] (zeros if no history),
    or with `every_step` [B, L, H]: the personal prompt after each position.
    """
    personal = torch.zeros(history.shape[0], history.shape[2], dtype=history.dtype,
                           device=history.device)
    started = torch.zeros(history.shape[0], dtype=torch.bool, device=history.device)
    steps = []
    for t in range(history.shape[1]):
        valid = mask[:, t].bool()
        step = torch.where(started, torch.full_like(personal[:, 0], min(1.0, alpha)),
                           torch.ones_like(personal[:, 0]))
        moved = personal + step[:, None] * (history[:, t] - personal)
        personal = torch.where(valid[:, None], moved, personal)
        started = started | valid
        steps.append(personal)
    if every_step:
        return torch.stack(steps, 1) if steps else history.new_zeros(history.shape)
    return personal
