"""The serving benchmark's scenario: the apps beside the recommender, users, warm-up.

Every app runs on the same Serve proxy with the same replica count, CPUs and limits:

  /noop/      a no-op FastAPI deployment (the floor: proxy + routing + HTTP, no work)
  /before/    the recommender without its two optimisations (no user cache, no batching)
  /nocache/   the recommender with batching but no user cache
  /inline/    the recommender encoding cache misses on its event loop (no encoder thread)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import ray
from fastapi import FastAPI
from ray import serve

from bench.load import Request, open_loop
from services.config import Settings
from services.data import load_interactions
from services.embedded import free_port
from services.health import wait_answers
from services.launch.stack import Stack
from services.naming import shard_actor, shard_for_user
from serving.app import build_app
from streaming.replay import replay

noop_api = FastAPI()


@serve.deployment
@serve.ingress(noop_api)
class Noop:
    """The floor: same proxy, routing and HTTP handling as the recommender, no work."""

    @noop_api.get("/recommend")
    async def recommend(self, user_id: str = "", k: str = "10") -> dict:
        return {"user_id": user_id, "items": [], "prompt_version": 0}

    @noop_api.get("/version")
    async def version(self) -> dict:
        return {"prompt_version": 0, "replica": serve.get_replica_context().replica_id.unique_id}


# (name, route prefix, settings changed) of the apps deployed beside the recommender.
SIDE_APPS = [
    ("noop", "/noop", {}),
    ("before", "/before", {"user_cache_size": 0, "batch_max_size": 1}),
    ("nocache", "/nocache", {"user_cache_size": 0}),
    ("inline", "/inline", {"encode_thread": False}),
]
APP_READY_S = 300.0


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def fresh_ports(settings: Settings) -> Settings:
    return settings.replace(http_port=free_port(), metrics_port=free_port())


def deploy(settings: Settings, name: str, prefix: str, **changes) -> None:
    variant = settings.replace(**changes)
    if name == "noop":
        app = Noop.options(num_replicas=variant.serving.num_replicas,
                           max_ongoing_requests=variant.serving.max_ongoing_requests,
                           max_queued_requests=variant.serving.max_queued_requests,
                           ray_actor_options={"num_cpus": variant.serving.replica_cpus},
                           logging_config={"enable_access_log": False}).bind()
    else:
        app = build_app(variant)
    serve.run(app, name=name, route_prefix=prefix, blocking=False)


def _pool(interactions, size: int, seed: int) -> list[str]:
    users = np.unique(interactions.user_ids.astype(str))
    return sorted(np.random.default_rng(seed).choice(users, min(size, len(users)),
                                                     replace=False).tolist())


def _requests(pool: list[str], seed: int, k: int = 10):
    order = np.random.default_rng(seed).choice(len(pool), 200_000).tolist()
    return lambda i: ("/recommend", {"user_id": pool[order[i % len(order)]], "k": str(k)})


@dataclass
class Scenario:
    pool: list[str]  # the users the load draws from
    states: dict[str, dict | None]  # {user: shard state before the load}
    make: Callable[[int], Request]  # request index -> (path, params)


def prepare(stack: Stack, settings: Settings, args,
            apps: list[tuple[str, str, dict]]) -> Scenario:
    """Replay events, deploy the side apps, pick the user pool, warm everything."""
    interactions = load_interactions(settings.infra.events_source, args.num_events)
    sent = replay(stack.bootstrap, settings.streaming.topic_clicks, interactions,
                  settings.infra.dataset, progress=False)
    stack.wait_handled(sent, timeout_s=600)
    log(f"replayed {sent} events")
    for name, prefix, changes in apps:
        deploy(settings, name, prefix, **changes)
    for _, prefix, _ in apps:  # /version: the no-op app has no /healthz
        wait_answers(f"{stack.base_url}{prefix}/version", APP_READY_S)
    log("apps deployed")
    pool = _pool(interactions, args.user_pool, seed=1)
    states = {}
    for user in pool:
        shard = ray.get_actor(shard_actor(shard_for_user(user, settings.streaming.num_shards)),
                              namespace=settings.infra.namespace)
        states[user] = ray.get(shard.get_user.remote(user))
    # Each replica caches on its own and routing is random: after 8 passes a user is
    # uncached on a given replica with probability 1/256.
    warm = [("/recommend", {"user_id": u, "k": "10"}) for u in pool] * 8
    asyncio.run(open_loop(stack.base_url, lambda i: warm[i], 40, len(warm), 300))
    make = _requests(pool, seed=2)
    for _, prefix, _ in apps:
        asyncio.run(open_loop(stack.base_url + prefix, make, 20, 40, 10))
    log("warm")
    return Scenario(pool, states, make)
