"""The personal-prompt rule's three forms agree bit for bit: per event, batched, torch replay."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from services import personal
from services.personal import EVENT_WEIGHTS

H = 12
N_ITEMS = 30
TYPES = [*EVENT_WEIGHTS, "other"]  # "other": an unknown type weighs as a click


def _streams(rng: random.Random, users: int, skew: float, longest: int
             ) -> list[list[tuple[int, str]]]:
    """Per user, events (catalog row, type) in order; one user may hold most of them."""
    streams = []
    for u in range(users):
        length = rng.randint(0, longest) if u or rng.random() > skew else longest * 4
        streams.append([(rng.randrange(N_ITEMS), rng.choice(TYPES)) for _ in range(length)])
    every_type = [(rng.randrange(N_ITEMS), kind) for kind in TYPES * 2]
    rng.shuffle(every_type)
    return [*streams, every_type]


def _per_event(vectors, stream, alpha) -> np.ndarray | None:
    prompt = None
    for row, kind in stream:
        prompt = personal.update(prompt, vectors[row], kind, alpha)
    return prompt


@pytest.mark.parametrize("seed", range(8))
def test_per_event_batched_and_replay_agree_bit_for_bit(seed):
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed).normal(size=(N_ITEMS, H)).astype(np.float32)
    alpha = rng.choice([0.1, 0.37, 0.6, 0.9])  # 0.6 and 0.9: purchases clamp at rate 1
    streams = _streams(rng, users=rng.choice([1, 7, 40]), skew=rng.choice([0.0, 0.8]),
                       longest=rng.choice([1, 5, 20]))
    want = [_per_event(vectors, stream, alpha) for stream in streams]

    # Batched: some users start from a prompt already moved by earlier events.
    rates = personal.EventRates(alpha)
    split = [rng.randint(0, len(s)) for s in streams]
    before = [_per_event(vectors, s[:k], alpha) for s, k in zip(streams, split, strict=True)]
    runs = [(None if p is None else p.copy(), [row for row, _ in s[k:]],
             rates.of(kind for _, kind in s[k:]))
            for p, s, k in zip(before, streams, split, strict=True)]
    got = personal.move_batch(vectors, runs)
    for user, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), user
        if b is not None:
            assert a.tolist() == b.tolist(), user

    # Replay: the streams as right-padded history windows with their event weights.
    length = max(1, max(len(s) for s in streams))
    history = torch.zeros(len(streams), length, H)
    mask = torch.zeros(len(streams), length, dtype=torch.bool)
    weights = torch.ones(len(streams), length)
    for user, stream in enumerate(streams):
        for t, (row, _) in enumerate(stream):
            history[user, t] = torch.from_numpy(vectors[row])
            mask[user, t] = True
        weights[user, :len(stream)] = torch.from_numpy(
            personal.event_weights(kind for _, kind in stream))
    replayed = personal.replay(history, mask, alpha, weights)
    steps = personal.replay(history, mask, alpha, weights, every_step=True)
    for user, stream in enumerate(streams):
        expected = np.zeros(H, np.float32) if want[user] is None else want[user]
        assert replayed[user].numpy().tolist() == expected.tolist(), user
        if stream:
            assert steps[user, len(stream) - 1].tolist() == expected.tolist(), user


def test_every_event_type_moves_by_its_own_rate():
    vectors = np.eye(2, dtype=np.float32)
    for kind, weight in EVENT_WEIGHTS.items():
        moved = personal.update(vectors[0].copy(), vectors[1], kind, 0.2)
        assert moved.tolist() == pytest.approx([1 - 0.2 * weight, 0.2 * weight]), kind
    assert personal.event_rate("other", 0.2) == personal.event_rate("click", 0.2)
    assert personal.event_rate("purchase", 0.9) == 1.0  # clamped: never past the item
