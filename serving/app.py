"""Ray Serve: HTTP in, ranked items out, prompt weights hot-swapped in place.

Each `Recommender` replica holds the frozen backbone once and an immutable
`ActivePrompt` (version + weights). A background task long-polls the registry;
on a change it builds the new `ActivePrompt` beside the old one and swaps one
reference. A request reads that reference once at its start, so it is served
wholly by one version, and names it.

Routes: GET /recommend?user_id=&k=, GET /healthz, GET /version, POST /admin/rollback.
"""


import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from services import metrics
from services.catalog import load_catalog
from services.config import Settings
from services.events import MAX_ID_CHARS
from services.model import (
    PromptRecModel,
    load_backbone,
    prompt_from_bytes,
    resolve_backbone_path,
    top_k,
)
from services.naming import REGISTRY_ACTOR, shard_actor, shard_for_user

log = logging.getLogger("ray.serve")

MAX_K = 1000
USER_CACHE_SIZE = 10_000

app = FastAPI(title="promptrec", description="Recommendations from a hot-swapped soft prompt.")


class ApiError(Exception):
    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None):
        self.status, self.error, self.headers = status, error, headers or {}


@app.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse({"error": err.error}, status_code=err.status, headers=err.headers)


@app.middleware("http")
async def _observe(request: Request, call_next):
    started = time.perf_counter()
    route = request.url.path if request.url.path in _ROUTES else "other"
    try:
        response = await call_next(request)
        status = response.status_code
    except Exception:  # noqa: BLE001 - answer with JSON, never a bare 500 page
        log.exception("unhandled error on %s", route)
        response, status = JSONResponse({"error": "internal error"}, status_code=500), 500
    metrics.requests().inc(1, tags={"route": route, "status": str(status)})
    metrics.request_seconds().observe(time.perf_counter() - started, tags={"route": route})
    return response


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
    try:
        value = int(k)
    except ValueError:
        raise ApiError(400, f"k must be an integer, got {k[:20]!r}") from None
    if not 1 <= value <= MAX_K:
        raise ApiError(400, f"k must be in 1..{MAX_K}, got {value}")
    return value


@dataclass(frozen=True)
class ActivePrompt:
    version: int
    model: PromptRecModel
    published_at: float


@serve.deployment
@serve.ingress(app)
class Recommender:
    async def __init__(self, settings: dict):
        self.settings = Settings(**settings)
        torch.set_num_threads(1)  # replicas share cores; one thread each scales better
        backbone = resolve_backbone_path(self.settings.backbone_path)
        _, self.encoder = load_backbone(backbone)
        self.catalog = load_catalog(self.settings.dataset, backbone, self.settings.cache)
        self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=self.settings.namespace)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._shards: dict[int, object] = {}
        self._user_cache: OrderedDict[str, tuple[int, int, torch.Tensor]] = OrderedDict()
        self.active: ActivePrompt | None = None
        self.last_publish_to_live_ms: float | None = None
        entry = await self.registry.serving.remote()
        if entry:
            self._swap(entry)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    # --- hot swap -------------------------------------------------------
    def _swap(self, entry: dict) -> None:
        started = time.perf_counter()
        state = prompt_from_bytes(entry["blob"], self.catalog.vectors.shape[1])
        model = PromptRecModel(self.encoder, state)  # shares the frozen encoder
        self.active = ActivePrompt(entry["version"], model, entry["created"])  # the one swap
        metrics.swap_seconds().observe(time.perf_counter() - started)
        metrics.serving_prompt_version().set(entry["version"], tags={"replica": self.replica})
        self.last_publish_to_live_ms = (time.time() - entry["created"]) * 1000
        log.info("replica %s now serves prompt version %d", self.replica, entry["version"])

    def _lookup_registry(self) -> None:
        # When Serve is deployed from a config, the driver that owns the registry can
        # restart on its own; its new registry actor has the same name, the old handle
        # stays dead.
        try:
            self.registry = ray.get_actor(REGISTRY_ACTOR, namespace=self.settings.namespace)
        except ValueError:
            pass

    async def _watch(self) -> None:
        while True:
            known = self.active.version if self.active else 0
            try:
                entry = await self.registry.wait_for_change.remote(known, 30.0)
            except Exception:  # noqa: BLE001 - registry restarting: retry, keep serving
                log.exception("registry long-poll failed; retrying")
                await asyncio.sleep(1.0)
                self._lookup_registry()
                continue
            if entry:
                try:
                    self._swap(entry)
                except Exception:  # noqa: BLE001 - a bad version must not kill the replica
                    log.exception("refused prompt version %s", entry.get("version"))
                    await asyncio.sleep(1.0)

    # --- user state -----------------------------------------------------
    def _shard(self, user_id: str):
        index = shard_for_user(user_id, self.settings.num_shards)
        if index not in self._shards:
            self._shards[index] = ray.get_actor(shard_actor(index),
                                                namespace=self.settings.namespace)
        return self._shards[index]

    async def _user_state(self, user_id: str) -> dict | None:
        try:
            return await self._shard(user_id).get_user.remote(user_id)
        except (ValueError, ray.exceptions.RayActorError) as err:
            self._shards.clear()
            raise ApiError(503, f"user state unavailable: {type(err).__name__}",
                           {"Retry-After": "1"}) from None

    def _user_vector(self, user_id: str, state: dict | None, active: ActivePrompt
                     ) -> torch.Tensor:
        """[H] user vector, cached by (state_version, prompt_version)."""
        state_version = state["state_version"] if state else 0
        cached = self._user_cache.get(user_id)
        if cached and cached[0] == state_version and cached[1] == active.version:
            self._user_cache.move_to_end(user_id)
            return cached[2]
        history = self.catalog.indices(state["history"]) if state else []
        vectors = self.catalog.vectors[history].unsqueeze(0)  # [1, L, H]
        personal = state.get("personal") if state else None
        personal = None if personal is None else torch.as_tensor(personal)[None]  # [1, H]
        with torch.no_grad():
            user = active.model.encode_users(vectors, torch.ones(1, len(history)), personal)[0]
        self._user_cache[user_id] = (state_version, active.version, user)
        if len(self._user_cache) > USER_CACHE_SIZE:
            self._user_cache.popitem(last=False)
        return user

    # --- routes -----------------------------------------------------------
    @app.get("/recommend")
    async def recommend(self, user_id: str | None = None, k: str | None = None) -> dict:
        user_id, k = parse_user_id(user_id), parse_k(k)
        active = self.active  # read once: this request is served wholly by this version
        if active is None:
            raise ApiError(503, "no prompt version published yet", {"Retry-After": "1"})
        state = await self._user_state(user_id)
        user = self._user_vector(user_id, state, active)
        with torch.no_grad():
            scores = active.model.logits(user[None], self.catalog.vectors)[0]
        seen = torch.tensor(self.catalog.indices(state["history"]) if state else [],
                            dtype=torch.long)
        indices, values = top_k(scores, k, exclude=seen)
        return {
            "user_id": user_id,
            "items": [{"item_id": self.catalog.items[i].item_id,
                       "title": self.catalog.items[i].title, "score": round(float(v), 4)}
                      for i, v in zip(indices.tolist(), values.tolist(), strict=True)],
            "prompt_version": active.version,
            "state_version": state["state_version"] if state else 0,
            "cold_start": state is None,
        }

    @app.get("/healthz")
    async def healthz(self) -> dict:
        if self.active is None:
            raise ApiError(503, "no prompt version loaded", {"Retry-After": "1"})
        return {"status": "ok", "prompt_version": self.active.version}

    @app.get("/version")
    async def version(self) -> dict:
        return {"prompt_version": self.active.version if self.active else 0,
                "replica": self.replica,
                "publish_to_live_ms": self.last_publish_to_live_ms}

    @app.post("/admin/rollback")
    async def rollback(self, request: Request) -> dict:
        token = self.settings.admin_token
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


def build_app(settings: Settings):
    """The Serve application for `serve.run` (and `serve deploy` through `app_builder`)."""
    return Recommender.options(
        num_replicas=settings.num_replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
    ).bind(settings.to_dict())


REGISTRY_WAIT_S = 600.0


def app_builder(args: dict):
    """Import path for a Serve config file: `serving.app:app_builder` (args = settings).

    Waits for the registry actor, which the driver (`promptrec serve --no-deploy-serve`)
    creates: a RayService applies its Serve config as soon as the cluster is up, and
    replicas that fail to start because the registry is missing would mark the
    deployment failed for good.
    """
    settings = Settings.from_sources(overrides={k: str(v) for k, v in args.items()})
    deadline = time.monotonic() + REGISTRY_WAIT_S
    while True:
        try:
            ray.get_actor(REGISTRY_ACTOR, namespace=settings.namespace)
            break
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no registry actor {REGISTRY_ACTOR!r} in namespace {settings.namespace!r} "
                    f"after {REGISTRY_WAIT_S:.0f} s: start the driver (`promptrec serve "
                    f"--no-deploy-serve`) against this cluster with the same namespace") from None
            time.sleep(2.0)
    return build_app(settings)
