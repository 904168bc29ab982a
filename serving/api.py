"""The HTTP layer: the FastAPI app, its errors, request metrics, the admin token check.

Every refusal is an `ApiError` answered as `{"error": reason}` with its 4xx (or 503)
status; unknown paths, wrong methods and validation failures answer in the same shape,
and an unhandled error becomes a JSON 500 (never an HTML page). The routes themselves
sit on the deployment class (`serving.app.Recommender`), as Ray Serve's ingress wants.
"""

from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services import metrics

log = logging.getLogger("ray.serve")

ROUTES = {"/recommend", "/similar", "/healthz", "/version", "/admin/rollback",
          "/admin/experiments"}
EXPERIMENT_ROUTE = "/admin/experiments/{id}"  # one label for every experiment id

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
        route = path if path in ROUTES else \
            EXPERIMENT_ROUTE if path.startswith("/admin/experiments/") else "other"
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


def check_admin_token(request: Request, token: str) -> None:
    """Refuse an admin request: 404 when admin routes are off (no token configured),
    401 without a bearer token, 403 with a wrong one (compared in constant time)."""
    if not token:
        raise ApiError(404, "admin routes are off (no admin_token configured)")
    auth = request.headers.get("authorization", "")
    if not auth.startswith("Bearer "):
        raise ApiError(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(auth.removeprefix("Bearer ").encode(), token.encode()):
        raise ApiError(403, "wrong bearer token")


def retry_later(error: str, retry_after_s: float) -> ApiError:
    """A 503 that tells the client when to come back (whole seconds, at least 1)."""
    return ApiError(503, error, {"Retry-After": str(max(1, round(retry_after_s)))})
