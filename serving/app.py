"""Ray Serve: HTTP in, ranked items out, prompt weights hot-swapped in place.

The deployment class is thin: each `Recommender` replica holds the frozen backbone
once and puts together the pieces, each in a module of its own:

    serving.api       the FastAPI app, JSON errors, request metrics, the admin token
    serving.query     query and body parsing (strict: 400 with a reason)
    serving.swap      the active prompt version and the registry watcher (hot swap)
    serving.cache     the user-vector LRU cache
    serving.batching  cache misses of concurrent requests encoded together
    serving.ranking   the tensor work: encode, rank, explain
    serving.user_text the profile and query a version reads (tokens, query vector)
    serving.impressions  every answer written to Kafka, off the request path

Routes (docs/api.md): GET /recommend, /similar, /healthz, /version; the admin routes
(rollback, experiments: serving.admin). Every answer names the prompt and catalog
versions it came from, its arm (serving, canary, an experiment's) and a request_id that
events may quote. Overload (past max_ongoing_requests + max_queued_requests) gets Serve's
503 + Retry-After. Batch size and wait, cache size and explained items are runtime knobs
(Serve's `user_config`), applied by `reconfigure` without a restart.
"""

# No `from __future__ import annotations` here: Serve's ingress rebuilds the routes, and
# FastAPI then no longer resolves a string annotation `Request` (a 400 "missing query
# parameter request" on every call).
import asyncio
import time
import uuid

import numpy as np
import ray
import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig

from services.backbone import load_backbone, resolve_backbone_path
from services.canary import SERVING_ARM
from services.config import Settings
from services.config_sources import load_settings
from services.health import wait_until
from services.naming import LIVE_METRICS_ACTOR, REGISTRY_ACTOR, shard_actor, shard_for_user
from services.placement import actor_options
from serving import admin
from serving.api import ApiError, app, retry_later
from serving.batching import EncodeBatcher
from serving.cache import UserVectorCache
from serving.impressions import ImpressionLog
from serving.query import parse_recommend_query, parse_similar_query
from serving.ranking import explain, rank, rank_scores, similar
from serving.status import replica_status
from serving.swap import ActivePrompt, PromptSwap
from serving.user_text import UserTextReader
from serving.warmup import SwapWarmer

RUNTIME_KNOBS = ("batch_max_size", "batch_wait_ms", "user_cache_size", "explain_items")


@serve.deployment
@serve.ingress(app)
class Recommender:
    async def __init__(self, settings: Settings):
        self.settings = settings.validate()  # a replica re-checks what it was handed
        torch.set_num_threads(1)  # replicas share cores; one thread each scales better
        tokenizer, encoder = load_backbone(resolve_backbone_path(
            self.settings.model.backbone_path))
        infra = self.settings.infra
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._shards: dict[int, object] = {}
        self.cache = UserVectorCache(self.settings.serving.user_cache_size)
        serving = self.settings.serving
        self.batcher = EncodeBatcher(serving.batch_max_size, serving.batch_wait_ms,
                                     serving.encode_thread)
        self.user_text = UserTextReader(tokenizer, encoder, self.batcher.executor, serving.profiles)
        self.prompts = PromptSwap(encoder, infra.namespace, self.replica)
        self.warmer = SwapWarmer(self.cache, self.batcher.executor, asyncio.get_running_loop(),
                                 lambda: self.batcher.waiting)
        self.prompts.on_serving_swap = self.warmer.swapped
        await self.prompts.start(self.settings.serving.pin_version)
        live = self.settings.live
        # Without a broker address (a Serve config that names none) nothing is written.
        self.impressions = ImpressionLog(infra.kafka_bootstrap, live.topic_impressions,
                                         live.impression_queue_max,
                                         f"promptrec-impressions-{self.replica}",
                                         self.settings.kafka.kafka_python()) \
            if infra.kafka_bootstrap else None

    def reconfigure(self, knobs: dict) -> None:
        """Serve's user_config (RUNTIME_KNOBS), at start and whenever it changes."""
        self.settings = self.settings.replace(**knobs)  # validated: a bad knob is refused
        serving = self.settings.serving
        self.cache.resize(serving.user_cache_size)
        self.batcher.configure(serving.batch_max_size, serving.batch_wait_ms)

    def __del__(self):
        for part in (getattr(self, "prompts", None), getattr(self, "impressions", None)):
            if part is not None:
                part.stop()

    async def _user_state(self, user_id: str) -> dict | None:
        index = shard_for_user(user_id, self.settings.streaming.num_shards)
        try:
            if index not in self._shards:
                self._shards[index] = ray.get_actor(shard_actor(index),
                                                    namespace=self.settings.infra.namespace)
            return await self._shards[index].get_user.remote(user_id)
        except (ValueError, ray.exceptions.RayActorError) as err:
            self._shards.clear()  # a restarted shard is a new actor: look it up again
            raise retry_later(f"user state unavailable: {type(err).__name__}",
                              self.settings.serving.retry_after_s) from None

    async def _user_vector(self, slot: str, state_version: int, history: list[int],
                           personal: np.ndarray | None, text: tuple[int, ...] | None,
                           active: ActivePrompt, may_hold: bool
                           ) -> tuple[torch.Tensor, bool, ActivePrompt]:
        """([H] user vector for this state_version, cache hit?, the version it is of):
        `active`'s, or with `may_hold` (the serving arm) a version replaced moments ago
        whose vector of this state is cached while `active` re-encodes (serving.warmup);
        `slot`: the cache entry (`UserTextReader.slot`)."""
        key = (state_version, active.version)
        if (user := self.cache.get(slot, key)) is not None:
            return user, True, active
        if may_hold and (held := self.warmer.answer(slot, state_version)) is not None:
            return held[1], True, held[0]
        user = await self.batcher.encode(active, history, personal, text)
        inputs = (tuple(history), None if personal is None
                  else np.asarray(personal, np.float32).tobytes(), text)
        self.cache.put(slot, key, user, inputs)
        return user, False, active

    @app.get("/recommend")
    async def recommend(self, request: Request) -> JSONResponse:
        query = parse_recommend_query(request.query_params.multi_items(),
                                      self.settings.profiles.max_query_chars)
        # Read once: this request is served wholly by it.
        route = self.prompts.active_for(query.user_id)
        active, arm = route.active, route.arm
        if active is None:
            raise retry_later("no prompt version published yet", 1)
        state = await self._user_state(query.user_id)
        state_version = state["state_version"] if state else 0
        catalog = active.catalog
        history = catalog.indices(state["history"]) if state else []
        use_personal = state and self.settings.serving.personal_prompts
        personal = state.get("personal") if use_personal else None
        masked = history + catalog.unavailable + catalog.indices(list(query.exclude))
        allowed = catalog.in_categories(query.categories) if query.categories else None
        text = await self.user_text.of(active.model, state, query.query, route.popularity)
        if route.popularity:  # an experiment's popularity arm: no user vector
            hit = False
            indices, values = rank_scores(self.prompts.popularity.scores(catalog), query.k,
                                          masked, allowed)
        else:
            user, hit, served = await self._user_vector(
                self.user_text.slot(query.user_id, text, state), state_version, history,
                personal, text.ids, active, may_hold=route.arm == SERVING_ARM)
            if served is not active:  # a version held over a swap answered
                active, text = served, await self.user_text.of(served.model, state, query.query)
            indices, values = rank(active.model, user, active.items, query.k, masked, allowed,
                                   text.asked(active))
        version = 0 if route.popularity else active.version
        items = catalog.items
        ranked = [{"item_id": items[i].item_id, "title": items[i].title, "score": round(
            float(v), 4)} for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        if query.explain:
            reasons = explain(catalog.vectors, history, indices.tolist(),
                              self.settings.serving.explain_items)
            for entry, because in zip(ranked, reasons, strict=True):
                entry["because"] = [{"item_id": items[h].item_id, "title": items[h].title,
                                     "similarity": sim} for h, sim in because]
            if text.query_words:  # the words that raised each item, off the event loop
                words = await asyncio.get_running_loop().run_in_executor(
                    self.batcher.executor, self.user_text.explain, active, history, personal,
                    text, indices.tolist(), self.settings.serving.explain_items)
                for entry, because in zip(ranked, words, strict=True):
                    entry["because_query"] = because
        request_id = uuid.uuid4().hex
        if self.impressions is not None:
            self.impressions.write({"request_id": request_id, "user_id": query.user_id,
                                    "items": [e["item_id"] for e in ranked], "arm": arm,
                                    "prompt_version": version, "experiment": route.experiment,
                                    "ts": time.time(), "query": query.query})
        return JSONResponse({  # already JSON types: no recursive jsonable_encoder
            "user_id": query.user_id, "items": ranked, "request_id": request_id,
            "prompt_version": version, "arm": arm,
            **({"experiment": route.experiment} if route.experiment else {}),
            "catalog_version": active.catalog_version, "state_version": state_version,
            "cold_start": not history, "user_text": text.used,
        }, headers={"X-User-Cache": "hit" if hit else "miss"})

    @app.get("/similar")
    async def similar_items(self, request: Request) -> JSONResponse:
        """The items nearest one item in the serving version's item space."""
        query = parse_similar_query(request.query_params.multi_items())
        active = self.prompts.active
        if active is None:
            raise retry_later("no prompt version published yet", 1)
        catalog = active.catalog
        index = catalog.index.get(query.item_id)
        if index is None:
            raise ApiError(404, f"unknown item_id {query.item_id[:40]!r}")
        indices, values = similar(active.items, index, query.k, catalog.unavailable)
        items = catalog.items
        return JSONResponse({
            "item_id": query.item_id,
            "items": [{"item_id": items[i].item_id, "title": items[i].title,
                       "similarity": round(float(v), 4)}
                      for i, v in zip(indices.tolist(), values.tolist(), strict=True)],
            "prompt_version": active.version, "catalog_version": active.catalog_version})

    @app.get("/healthz")
    async def healthz(self) -> dict:
        active = self.prompts.active
        if active is None:
            raise retry_later("no prompt version loaded", 1)
        return {"status": "ok", "prompt_version": active.version}

    @app.get("/version")
    async def version(self) -> dict:
        return {**replica_status(self), "live": await self.live_metrics()}

    async def live_metrics(self, method: str = "report", *args) -> dict | None:
        """The live-metrics actor's `method` (default its report: per version and arm,
        the canary's verdicts); None when it does not run or answer within a second."""
        try:
            actor = ray.get_actor(LIVE_METRICS_ACTOR, namespace=self.settings.infra.namespace)
            return await asyncio.wait_for(getattr(actor, method).remote(*args), 1.0)
        except (ValueError, TimeoutError, ray.exceptions.RayError):
            return None

    @app.post("/admin/rollback")
    async def rollback(self, request: Request) -> dict:
        return await admin.rollback(self, request)

    @app.post("/admin/experiments")
    async def start_experiment(self, request: Request) -> dict:
        return await admin.start_experiment(self, request)

    @app.get("/admin/experiments")
    async def list_experiments(self, request: Request) -> dict:
        return await admin.list_experiments(self, request)

    @app.get("/admin/experiments/{experiment_id}")
    async def experiment(self, experiment_id: str, request: Request) -> dict:
        return await admin.experiment(self, request, experiment_id, stop=False)

    @app.post("/admin/experiments/{experiment_id}/stop")
    async def stop_experiment(self, experiment_id: str, request: Request) -> dict:
        return await admin.experiment(self, request, experiment_id, stop=True)


def build_app(settings: Settings, name: str = "Recommender"):
    """The Serve application for `serve.run` (and `serve deploy` through `app_builder`).

    Overload is bounded here: a replica takes at most max_ongoing_requests, the proxy
    queues at most max_queued_requests more, and rejects the rest with 503 and
    Retry-After (Ray Serve's BackpressureConfig) instead of letting latency grow.
    """
    return Recommender.options(
        name=name,
        num_replicas=settings.serving.num_replicas,
        max_ongoing_requests=settings.serving.max_ongoing_requests,
        max_queued_requests=settings.serving.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503,
                                               retry_after_s=settings.serving.retry_after_s),
        ray_actor_options={"num_cpus": settings.serving.replica_cpus,
                           **actor_options(settings, "replicas")},
        user_config={knob: settings.value(knob) for knob in RUNTIME_KNOBS},
        # One access-log line per request costs CPU on the hot path; the request metrics
        # carry the same counts and latencies.
        logging_config={"enable_access_log": False},
    ).bind(settings)


REGISTRY_WAIT_S = 600.0


def app_builder(args: dict):
    """Import path for a Serve config file: `serving.app:app_builder` (args = settings).

    Waits for the registry actor, which the driver (`promptrec serve --no-deploy-serve`)
    creates: a RayService applies its Serve config as soon as the cluster is up, and
    replicas that fail to start because the registry is missing would mark the
    deployment failed for good.
    """
    settings = load_settings(overrides={k: str(v) for k, v in args.items()})

    def registry_exists() -> bool:
        try:
            ray.get_actor(REGISTRY_ACTOR, namespace=settings.infra.namespace)
        except ValueError:
            return False
        return True

    wait_until(registry_exists, REGISTRY_WAIT_S,
               f"registry actor {REGISTRY_ACTOR!r} in namespace {settings.infra.namespace!r} "
               f"(start the driver, `promptrec serve --no-deploy-serve`, against this cluster with "
               f"the same namespace)", interval_s=2.0)
    return build_app(settings)
