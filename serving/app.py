"""Ray Serve: HTTP in, ranked items out, prompt weights hot-swapped in place.

Each `Recommender` replica holds the frozen backbone once and an immutable
`ActivePrompt` (version + weights). A background task long-polls the registry;
on a change it builds the new `ActivePrompt` beside the old one and swaps one
reference. A request reads that reference once at its start and passes it down
(to the cache key, the batched encoder and the scorer), so it is served wholly by
one version, and names it.

Cache misses of concurrent requests are encoded together (`serve.batch`), one
backbone pass per prompt version present in the batch.

Routes: GET /recommend?user_id=&k=&explain=, GET /healthz, GET /version,
POST /admin/rollback. Overload (more than max_ongoing_requests per replica plus
max_queued_requests waiting) is answered by Ray Serve's proxy with 503 + Retry-After.
"""


import asyncio
import hmac
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import metrics
from services.catalog import load_catalog
from services.config import Settings
from services.config_sources import load_settings
from services.events import MAX_ID_CHARS
from services.model import (
    PromptRecModel,
    load_backbone,
    prompt_from_bytes,
    resolve_backbone_path,
)
from services.naming import REGISTRY_ACTOR, shard_actor, shard_for_user
from serving.ranking import encode_histories, explain, rank

log = logging.getLogger("ray.serve")

MAX_K = 1000
RECOMMEND_PARAMS = ("user_id", "k", "explain")
_K_PATTERN = re.compile(r"[0-9]{1,4}")  # ASCII digits only: int() also takes "1_0", " 5", "٣"
_TRUE, _FALSE = ("true", "1"), ("false", "0")

app = FastAPI(title="promptrec", description="Recommendations from a hot-swapped soft prompt.")


class ApiError(Exception):
    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None):
        self.status, self.error, self.headers = status, error, headers or {}


@app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.error}, status_code=err.status, headers=err.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    # Unknown paths (404) and wrong methods (405) answer in the same {"error"} shape.
    return JSONResponse({"error": str(err.detail)}, status_code=err.status_code,
                        headers=getattr(err, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": str(err.errors())[:300]}, status_code=400)


class ObserveMiddleware:
    """Counts and times every request by route and status, and turns an unhandled error
    into a JSON 500. Plain ASGI: Starlette's BaseHTTPMiddleware (`@app.middleware`) costs
    noticeably more per request, and this runs on every one."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/")) or "/"
        route = path if path in _ROUTES else "other"
        status = 0

        async def send_observed(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        except Exception:  # noqa: BLE001 - answer with JSON, never a bare 500 page
            log.exception("unhandled error on %s", route)
            if not status:
                status = 500
                await JSONResponse({"error": "internal error"}, status_code=500)(
                    scope, receive, send)
        metrics.requests().inc(1, tags={"route": route, "status": str(status)})
        metrics.request_seconds().observe(time.perf_counter() - started, tags={"route": route})


app.add_middleware(ObserveMiddleware)

_ROUTES = {"/recommend", "/healthz", "/version", "/admin/rollback"}


def parse_user_id(user_id: str | None) -> str:
    if user_id is None or user_id == "":
        raise ApiError(400, "user_id is required")
    if len(user_id) > MAX_ID_CHARS:
        raise ApiError(400, f"user_id longer than {MAX_ID_CHARS} characters")
    if not user_id.isprintable():
        raise ApiError(400, "user_id must be printable characters")
    return user_id


def parse_k(k: str | None) -> int:
    if k is None or k == "":
        return 10
    if not _K_PATTERN.fullmatch(k):
        raise ApiError(400, f"k must be an integer in 1..{MAX_K}, got {k[:20]!r}")
    value = int(k)
    if not 1 <= value <= MAX_K:
        raise ApiError(400, f"k must be in 1..{MAX_K}, got {value}")
    return value


def parse_explain(explain_flag: str | None) -> bool:
    if explain_flag is None or explain_flag == "":
        return False
    lowered = explain_flag.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ApiError(400, f"explain must be true or false, got {explain_flag[:20]!r}")


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    k: int
    explain: bool


def parse_recommend_query(params: list[tuple[str, str]]) -> RecommendQuery:
    """Query string pairs -> RecommendQuery; unknown or repeated parameters are refused
    (a typo like `kk=5` must not silently become the default k)."""
    given: dict[str, str] = {}
    for name, value in params:
        if name not in RECOMMEND_PARAMS:
            raise ApiError(400, f"unknown parameter {name[:40]!r}; allowed: "
                           + ", ".join(RECOMMEND_PARAMS))
        if name in given:
            raise ApiError(400, f"parameter {name!r} given more than once")
        given[name] = value
    return RecommendQuery(parse_user_id(given.get("user_id")), parse_k(given.get("k")),
                          parse_explain(given.get("explain")))


@dataclass(frozen=True)
class ActivePrompt:
    version: int
    sha256: str
    model: PromptRecModel
    items: torch.Tensor  # [N, H] the item vectors this version reads and ranks
    swap_ms: float  # weights received -> this reference built
    publish_to_live_ms: float | None  # registry made it serving -> live here (None at start-up)


@dataclass(frozen=True)
class EncodeJob:
    active: ActivePrompt
    history: tuple[int, ...]  # catalog indices, oldest first
    personal: bytes | None = None  # the shard's personal prompt, float32 [H] as bytes


@serve.deployment
@serve.ingress(app)
class Recommender:
    async def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        torch.set_num_threads(1)  # replicas share cores; one thread each scales better
        backbone = resolve_backbone_path(self.settings.model.backbone_path)
        _, self.encoder = load_backbone(backbone)
        self.catalog = load_catalog(self.settings.infra.dataset, backbone, self.settings.infra.cache)
        self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=self.settings.infra.namespace)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._shards: dict[int, object] = {}
        # user_id -> ((state_version, prompt_version), [H] user vector), least recent first
        self._user_cache: OrderedDict[str, tuple[tuple[int, int], torch.Tensor]] = OrderedDict()
        self._cache_counts = {"hit": 0, "miss": 0}
        self._encode_counts = {"passes": 0, "users": 0}  # written by the encoder thread only
        self._idle_wait_s = self._busy_wait_s = self.settings.serving.batch_wait_ms / 1000
        self._encode.set_max_batch_size(self.settings.serving.batch_max_size)
        self._encode.set_batch_wait_timeout_s(self._idle_wait_s)
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder")  # torch: 1 thread
        self.active: ActivePrompt | None = None
        self._stopping = threading.Event()
        if self.settings.serving.pin_version:
            # A pinned replica serves that one version for good: no watcher, no swaps.
            self._swap(await self.registry.get.remote(self.settings.serving.pin_version), initial=True)
            return
        entry = await self.registry.serving.remote()
        if entry:
            self._swap(entry, initial=True)
        # The watcher has a thread of its own, so a swap never waits for the event loop,
        # which a batch of encodes keeps busy for tens of milliseconds at a time.
        threading.Thread(target=self._watch, name="prompt-watcher", daemon=True).start()

    def __del__(self):
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            stopping.set()

    # --- hot swap -------------------------------------------------------
    def _swap(self, entry: dict, initial: bool = False) -> None:
        """Build the new version beside the old one, then replace one reference (atomic
        under the GIL); requests that already read the old one finish on it."""
        started = time.perf_counter()
        state = prompt_from_bytes(entry["blob"], self.catalog.vectors.shape[1],
                                  len(self.catalog))
        model = PromptRecModel(self.encoder, state)  # shares the frozen encoder
        with torch.inference_mode():
            items = model.item_table(self.catalog.vectors)  # once per version, not per request
        swap_ms = round((time.perf_counter() - started) * 1000, 2)
        since = entry.get("serving_since", entry["created"])
        # At start-up the version was live long before this replica existed: no swap time.
        live_ms = None if initial else round((time.time() - since) * 1000, 1)
        self.active = ActivePrompt(entry["version"], entry["sha256"], model, items, swap_ms,
                                   live_ms)
        metrics.swap_seconds().observe(swap_ms / 1000)
        metrics.serving_prompt_version().set(entry["version"], tags={"replica": self.replica})
        log.info("replica %s now serves prompt version %d", self.replica, entry["version"])

    def _lookup_registry(self) -> None:
        # When Serve is deployed from a config, the driver that owns the registry can
        # restart on its own; its new registry actor has the same name, the old handle
        # stays dead.
        try:
            self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=self.settings.infra.namespace)
        except ValueError:
            pass

    def _watch(self) -> None:
        """Long-poll the registry (blocking, on the watcher thread) and swap on a change."""
        while not self._stopping.is_set():
            known = self.active.version if self.active else 0
            try:
                entry = ray.get(self.registry.wait_for_change.remote(known, 30.0))
            except Exception:  # noqa: BLE001 - registry restarting: retry, keep serving
                log.exception("registry long-poll failed; retrying")
                time.sleep(1.0)
                self._lookup_registry()
                continue
            if entry:
                try:
                    self._swap(entry)
                except Exception:  # noqa: BLE001 - a bad version must not kill the replica
                    log.exception("refused prompt version %s", entry.get("version"))
                    time.sleep(1.0)

    # --- user state -----------------------------------------------------
    def _shard(self, user_id: str):
        index = shard_for_user(user_id, self.settings.streaming.num_shards)
        if index not in self._shards:
            self._shards[index] = ray.get_actor(shard_actor(index),
                                                namespace=self.settings.infra.namespace)
        return self._shards[index]

    async def _user_state(self, user_id: str) -> dict | None:
        try:
            return await self._shard(user_id).get_user.remote(user_id)
        except (ValueError, ray.exceptions.RayActorError) as err:
            self._shards.clear()
            raise ApiError(503, f"user state unavailable: {type(err).__name__}",
                           {"Retry-After": str(max(1, round(self.settings.serving.retry_after_s)))}
                           ) from None

    # Batch size and wait are placeholders: __init__ sets them from the settings.
    # Batch size and wait are placeholders: __init__ sets them from the settings.
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.002, max_concurrent_batches=1)
    async def _encode(self, jobs: list[EncodeJob]) -> list[torch.Tensor]:
        """Cache misses of concurrent requests -> one [H] user vector each.

        With `encode_thread` the backbone runs on the replica's one encoder thread, so
        the event loop keeps answering cache hits meanwhile. Ray 2.60's serve.batch
        forms the next batch as soon as this one starts, which would leave batches of
        one; so while this batch computes, the next is told to wait about as long for
        more misses (it could not start earlier anyway), and afterwards the short idle
        wait applies again. Without `encode_thread` the loop itself computes, and
        misses that arrive meanwhile queue up behind it.
        """
        if not self.settings.serving.encode_thread:
            return self._encode_now(jobs)
        self._encode.set_batch_wait_timeout_s(max(self._idle_wait_s, self._busy_wait_s))
        started = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._encoder, self._encode_now, jobs)
        finally:
            took = time.perf_counter() - started
            self._busy_wait_s = min(0.1, 0.7 * self._busy_wait_s + 0.3 * took)
            self._encode.set_batch_wait_timeout_s(self._idle_wait_s)

    def _encode_now(self, jobs: list[EncodeJob]) -> list[torch.Tensor]:
        """Jobs are grouped by prompt version, since a batch can straddle a swap, so each
        user is encoded by the version its request started with; identical histories are
        encoded once. -> one [H] vector per job."""
        out: list[torch.Tensor | None] = [None] * len(jobs)
        groups: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for position, job in enumerate(jobs):
            groups.setdefault(job.active.version, {}).setdefault(
                (job.history, job.personal), []).append(position)
        for by_history in groups.values():
            active = jobs[next(iter(by_history.values()))[0]].active
            histories = list(by_history)
            users = encode_histories(
                active.model, active.items, [list(h) for h, _ in histories],
                [None if p is None else np.frombuffer(p, np.float32) for _, p in histories])
            metrics.encode_batch_users().observe(len(histories))
            self._encode_counts["passes"] += 1
            self._encode_counts["users"] += len(histories)
            for row, history in enumerate(histories):
                for position in by_history[history]:
                    out[position] = users[row]
        return out

    async def _user_vector(self, user_id: str, state_version: int, history: list[int],
                           personal: np.ndarray | None,
                           active: ActivePrompt) -> tuple[torch.Tensor, bool]:
        """([H] user vector for this (state_version, prompt version), cache hit?)."""
        key = (state_version, active.version)
        cached = self._user_cache.get(user_id)
        if cached is not None and cached[0] == key:
            self._user_cache.move_to_end(user_id)
            self._count_cache("hit")
            return cached[1], True
        self._count_cache("miss")
        personal_bytes = None if personal is None else np.asarray(personal, np.float32).tobytes()
        user = await self._encode(EncodeJob(active, tuple(history), personal_bytes))
        if self.settings.serving.user_cache_size:
            self._user_cache[user_id] = (key, user)
            self._user_cache.move_to_end(user_id)
            if len(self._user_cache) > self.settings.serving.user_cache_size:
                self._user_cache.popitem(last=False)
        return user, False

    def _count_cache(self, result: str) -> None:
        self._cache_counts[result] += 1
        metrics.user_cache().inc(1, tags={"result": result})

    # --- routes -----------------------------------------------------------
    @app.get("/recommend")
    async def recommend(self, request: Request) -> JSONResponse:
        query = parse_recommend_query(request.query_params.multi_items())
        active = self.active  # read once: this request is served wholly by this version
        if active is None:
            raise ApiError(503, "no prompt version published yet", {"Retry-After": "1"})
        state = await self._user_state(query.user_id)
        state_version = state["state_version"] if state else 0
        history = self.catalog.indices(state["history"]) if state else []
        personal = state.get("personal") if state and self.settings.serving.personal_prompts else None
        user, hit = await self._user_vector(query.user_id, state_version, history, personal,
                                            active)
        indices, values = rank(active.model, user, active.items, query.k, history)
        items = self.catalog.items
        ranked = [{"item_id": items[i].item_id, "title": items[i].title,
                   "score": round(float(v), 4)}
                  for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        if query.explain:
            reasons = explain(self.catalog.vectors, history, indices.tolist(),
                              self.settings.serving.explain_items)
            for entry, because in zip(ranked, reasons, strict=True):
                entry["because"] = [{"item_id": items[h].item_id, "title": items[h].title,
                                     "similarity": sim} for h, sim in because]
        # Already JSON types: skip FastAPI's recursive jsonable_encoder on every request.
        return JSONResponse({
            "user_id": query.user_id,
            "items": ranked,
            "prompt_version": active.version,
            "state_version": state_version,
            "cold_start": not history,
        }, headers={"X-User-Cache": "hit" if hit else "miss"})

    @app.get("/healthz")
    async def healthz(self) -> dict:
        if self.active is None:
            raise ApiError(503, "no prompt version loaded", {"Retry-After": "1"})
        return {"status": "ok", "prompt_version": self.active.version}

    @app.get("/version")
    async def version(self) -> dict:
        active = self.active
        return {"prompt_version": active.version if active else 0,
                "prompt_sha256": active.sha256 if active else None,
                "replica": self.replica,
                "publish_to_live_ms": active.publish_to_live_ms if active else None,
                "swap_ms": active.swap_ms if active else None,
                "pinned": bool(self.settings.serving.pin_version),
                "personal_prompts": self.settings.serving.personal_prompts,
                "user_cache": {**self._cache_counts, "size": len(self._user_cache)},
                "encoded": dict(self._encode_counts)}

    @app.post("/admin/rollback")
    async def rollback(self, request: Request) -> dict:
        token = self.settings.serving.admin_token
        if not token:
            raise ApiError(404, "admin routes are off (no admin_token configured)")
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise ApiError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(auth.removeprefix("Bearer ").encode(), token.encode()):
            raise ApiError(403, "wrong bearer token")
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "body must be JSON: {\"version\": <int>}") from None
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise ApiError(400, "body must be JSON: {\"version\": <int>}")
        try:
            entry = await self.registry.rollback.remote(version)
        except Exception as err:  # noqa: BLE001 - UnknownVersion arrives wrapped by Ray
            raise ApiError(404, str(err).splitlines()[-1][:300]) from None
        return {"prompt_version": entry["version"], "status": "rolled back"}


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
        ray_actor_options={"num_cpus": settings.serving.replica_cpus},
        # One access-log line per request costs CPU on the hot path; the request metrics
        # carry the same counts and latencies.
        logging_config={"enable_access_log": False},
    ).bind(settings.to_dict())


REGISTRY_WAIT_S = 600.0


def app_builder(args: dict):
    """Import path for a Serve config file: `serving.app:app_builder` (args = settings).

    Waits for the registry actor, which the driver (`promptrec serve --no-deploy-serve`)
    creates: a RayService applies its Serve config as soon as the cluster is up, and
    replicas that fail to start because the registry is missing would mark the
    deployment failed for good.
    """
    settings = load_settings(overrides={k: str(v) for k, v in args.items()})
    deadline = time.monotonic() + REGISTRY_WAIT_S
    while True:
        try:
            ray.get_actor(REGISTRY_ACTOR, namespace=settings.infra.namespace)
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no registry actor {REGISTRY_ACTOR!r} in namespace {settings.infra.namespace!r} "
                    f"after {REGISTRY_WAIT_S:.0f} s: start the driver (`promptrec serve "
                    f"--no-deploy-serve`) against this cluster with the same namespace") from None
            time.sleep(2.0)
    return build_app(settings)
