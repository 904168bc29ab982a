"""A simulated user population for the canary (bench/canary.py and the end-to-end test).

Users click according to a ground truth the prompt versions never see: each simulated
user likes `LIKED` ML-100K items drawn by their popularity in the ratings, clicks the
first liked item of its top-10 when there is one and a liked item found elsewhere when
there is none (a live miss). The *good* version ranks by popularity (its item bias is
10 log(1 + rating count)), so it often serves a liked item; the *bad* one is the same
with the item biases shuffled among items: finite weights of the right shapes, so it
passes every check a publish makes, and it serves liked items rarely.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import ray
import torch

from services.data import load_interactions
from services.decoded import decode_version
from services.weights import PromptWeights

LIKED = 20
USERS = 400


def rating_counts() -> dict[str, int]:
    ids, counts = np.unique(load_interactions("ml-100k").item_ids, return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))


def versions(stack, seed: int = 0) -> tuple[PromptWeights, PromptWeights]:
    """(the good weights: popularity-ranked, the bad ones: their item biases shuffled)."""
    serving = ray.get(stack.registry.serving.remote())
    base = decode_version(serving["version"], serving["blob"])
    counts = rating_counts()
    bias = torch.tensor([10 * np.log1p(counts.get(i, 0)) for i in base.item_ids],
                        dtype=torch.float32)
    good = dataclasses.replace(base, item_bias=bias)
    order = torch.randperm(len(bias), generator=torch.Generator().manual_seed(seed))
    return good, dataclasses.replace(good, item_bias=bias[order])


def equivalent(weights: PromptWeights, seed: int) -> PromptWeights:
    """The same version but for a soft prompt moved by 1e-4 (a new sha256, same ranking)."""
    noise = torch.randn(weights.soft_prompt.shape,
                        generator=torch.Generator().manual_seed(seed)) * 1e-4
    return dataclasses.replace(weights, soft_prompt=weights.soft_prompt + noise)


def population(item_ids: list[str], seed: int, users: int = USERS) -> dict[str, set[str]]:
    ids = np.array(item_ids)
    counts = rating_counts()
    p = np.array([counts.get(i, 0) for i in ids], dtype=np.float64)
    rng = np.random.default_rng(seed)
    return {f"sim-{seed}-{u}": set(rng.choice(ids, LIKED, replace=False, p=p / p.sum()))
            for u in range(users)}


def visit(topic: str, producer, http: httpx.Client, user: str, liked: set[str], rng) -> str:
    """One /recommend and the click that follows it -> the arm that answered."""
    body = http.get("/recommend", params={"user_id": user, "k": 10}).json()
    served = [entry["item_id"] for entry in body["items"]]
    hit = next((i for i in served if i in liked), None)
    item = hit or sorted(liked)[rng.integers(len(liked))]
    event = {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item,
             "ts": time.time(), "type": "click"}
    if rng.random() < 0.5:  # half quote the request, half are attributed by user and time
        event["request_id"] = body["request_id"]
    producer.send(topic, key=user.encode(), value=json.dumps(event).encode())
    return body["arm"]


def simulate_until(stack, producer, users: dict[str, set[str]], done: Callable[[], bool],
                   timeout_s: float, why: Callable[[], object] = lambda: "") -> Counter[str]:
    """Users visit in turn, 4 at a time, until `done()` -> answers per arm."""
    arms: Counter[str] = Counter()  # serving / canary, or an experiment's arm names
    order = list(users.items())
    deadline = time.monotonic() + timeout_s
    topic = stack.settings.streaming.topic_clicks
    with httpx.Client(base_url=stack.base_url, timeout=30) as http, \
            ThreadPoolExecutor(4) as pool:
        turn = 0
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no verdict in {timeout_s:g} s: {arms}, {why()}")
            batch = [order[(turn + i) % len(order)] for i in range(16)]
            rngs = [np.random.default_rng(turn + i) for i in range(16)]
            turn += 16
            for arm in pool.map(lambda a: visit(topic, producer, http, *a[0], a[1]),
                                zip(batch, rngs, strict=True)):
                arms[arm] += 1
            producer.flush()
    return arms
