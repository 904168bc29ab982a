"""The personal-prompt rule, in its three forms: per event, batched, and the torch replay.

A user's personal prompt is one vector in item space, [H] float32. The first event sets
it to the item's vector; each later one moves it toward the item:

    p <- p + rate * (v - p),   rate = float32(min(1, alpha * w(type)))

an exponential moving average whose step depends on the event type (`EVENT_WEIGHTS`).

- `update`: one event (the rule itself; the reference the others must equal);
- `move_batch`: many users' events of one batch at once (the shards' fast path);
- `replay`: the rule over history windows in torch (training has no shard state).

All three do the same float32 operations in the same order, so they agree bit for bit
(tests/services/test_personal.py compares them on random event streams).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# How much one event moves a personal prompt, by event type (ratings count as clicks;
# an unknown type counts as a click too).
EVENT_WEIGHTS = {"view": 0.5, "click": 1.0, "rating": 1.0, "purchase": 2.0}
DEFAULT_WEIGHT = 1.0

# One user's events of a batch, for `move_batch`: (their prompt or None, the catalog row
# of each event's item, the rate of each event).
Run = tuple[np.ndarray | None, list[int], list[np.float32]]


def event_rate(event_type: str, alpha: float) -> np.float32:
    """The step of one event: min(1, alpha * w(type)), as the float32 it multiplies by."""
    return np.float32(min(1.0, alpha * EVENT_WEIGHTS.get(event_type, DEFAULT_WEIGHT)))


class EventRates:
    """`event_rate` for one alpha, looked up for whole columns of event types at once."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self._rates = {kind: event_rate(kind, alpha) for kind in EVENT_WEIGHTS}
        self._default = event_rate("", alpha)

    def of(self, types: Iterable[str]) -> list[np.float32]:
        return list(map(self._rates.get, types, repeat(self._default)))  # one C-level map


def event_weights(types: Iterable[str]) -> np.ndarray:
    """[n] float32 weights w(type) of a column of event types (training examples carry
    them per history position, for `replay`)."""
    return np.array([EVENT_WEIGHTS.get(kind, DEFAULT_WEIGHT) for kind in types], np.float32)


# --- per event ----------------------------------------------------------------------------

def update(personal: np.ndarray | None, item_vector: np.ndarray, event_type: str,
           alpha: float) -> np.ndarray:
    """One event: personal [H] float32 or None, item_vector [H] -> the moved prompt [H].

    `personal` is updated in place and returned (this runs once per event).
    """
    if personal is None:
        return item_vector.astype(np.float32, copy=True)
    personal += event_rate(event_type, alpha) * (item_vector - personal)
    return personal


# --- batched ------------------------------------------------------------------------------

def move_batch(vectors: np.ndarray, runs: list[Run]) -> list[np.ndarray | None]:
    """Move each run's prompt over its events, in order; vectors [N, H] float32.

    Returns each run's prompt after its events ([H] float32; the input array itself,
    moved in place, when there was one; None for a run without events and prompt).
    Per user the rule is sequential, so users are moved together instead: at step t
    every run with a t-th event takes it, with the same float32 operations as `update`.
    When one run holds most of the events (a long session), steps ~ events and the
    plain loop is cheaper: each run is then moved in turn.
    """
    out: list[np.ndarray | None] = []
    moving: list[tuple[int, list[int], list[np.float32]]] = []  # (run, items, rates) left
    total = longest = 0
    for personal, items, rates in runs:
        if personal is None and items:  # the first event sets the prompt to the item
            personal = vectors[items[0]].astype(np.float32, copy=True)
            items, rates = items[1:], rates[1:]
        out.append(personal)
        if items:
            moving.append((len(out) - 1, items, rates))
            total += len(items)
            longest = max(longest, len(items))
    if not moving:
        return out
    # A step costs ~6 numpy calls, one event of the plain loop ~3.
    if longest * 2 >= total or len(moving) == 1:
        for run, items, rates in moving:
            personal = out[run]
            for j, rate in zip(items, rates, strict=True):
                personal += rate * (vectors[j] - personal)
        return out
    moving.sort(key=lambda m: -len(m[1]))
    lengths = [len(items) for _, items, _ in moving]
    stacked = np.stack([out[run] for run, _, _ in moving])  # [U, H] float32
    item_grid = np.zeros((len(moving), longest), np.int64)  # [U, T]
    rate_grid = np.zeros((len(moving), longest), np.float32)  # [U, T]
    for row, (_, items, rates) in enumerate(moving):
        item_grid[row, :len(items)] = items
        rate_grid[row, :len(items)] = rates
    active = len(moving)
    for t in range(longest):
        while lengths[active - 1] <= t:  # sorted longest first
            active -= 1
        now = stacked[:active]
        now += rate_grid[:active, t, None] * (vectors[item_grid[:active, t]] - now)
    for row, (run, _, _) in enumerate(moving):
        out[run][...] = stacked[row]  # in place, as the plain loop moves them
    return out


# --- torch replay -------------------------------------------------------------------------

def replay(history: torch.Tensor, mask: torch.Tensor, alpha: float,
           weights: torch.Tensor | None = None, every_step: bool = False) -> torch.Tensor:
    """The rule replayed over history windows (training has no shard state).

    history [B, L, H] item vectors oldest first, mask [B, L], weights [B, L] the event
    weight w(type) of each position (None: every event weighs 1, a click) ->
    personal [B, H] (zeros if no history), or with `every_step` [B, L, H]: the prompt
    after each position.
    """
    import torch

    batch, length, hidden = history.shape
    if weights is None:
        weights = torch.ones(batch, length, device=history.device)
    # min(1, alpha * w) in float64, then rounded once to float32: as `event_rate` does.
    rates = torch.clamp(weights.to(torch.float64) * alpha, max=1.0).to(history.dtype)
    personal = history.new_zeros(batch, hidden)
    started = torch.zeros(batch, dtype=torch.bool, device=history.device)
    steps = []
    for t in range(length):
        valid = mask[:, t].bool()
        step = torch.where(started, rates[:, t], torch.ones_like(rates[:, t]))
        moved = personal + step[:, None] * (history[:, t] - personal)
        personal = torch.where(valid[:, None], moved, personal)
        started = started | valid
        steps.append(personal)
    if every_step:
        return torch.stack(steps, 1) if steps else history.new_zeros(history.shape)
    return personal
