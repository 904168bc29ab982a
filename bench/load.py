"""HTTP load for benchmarks and load tests: open loop at a fixed rate, or closed loop.

Open loop sends request i at start + i / rps whatever earlier requests are doing (each
is its own task), so a slow server cannot slow the offered load down and hide its own
latency. Always bounded: by a request count, a duration, and a stop flag.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

Request = tuple[str, dict[str, str]]  # (path, query params)


@dataclass
class Result:
    index: int
    request: Request
    status: int  # 0: no HTTP answer (connection error, client timeout)
    latency_s: float  # from this request's send to its full response
    lag_s: float  # how late the client sent it against its schedule (client overload)
    body: dict | None
    retry_after: str | None
    cache: str | None = None  # the recommender's X-User-Cache header: hit or miss
    error: str = ""


async def _one(client: httpx.AsyncClient, index: int, request: Request,
               scheduled: float) -> Result:
    path, params = request
    started = time.perf_counter()
    try:
        response = await client.get(path, params=params)
    except httpx.HTTPError as err:
        return Result(index, request, 0, time.perf_counter() - started, started - scheduled,
                      None, None, f"{type(err).__name__}: {err}"[:200])
    latency = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = None
    return Result(index, request, response.status_code, latency, started - scheduled,
                  body if isinstance(body, dict) else None,
                  response.headers.get("retry-after"), response.headers.get("x-user-cache"))


def _client(base_url: str, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=timeout_s,
                             limits=httpx.Limits(max_connections=1000,
                                                 max_keepalive_connections=1000))


async def open_loop(base_url: str, make: Callable[[int], Request], rps: float,
                    max_requests: int, max_seconds: float,
                    stop: threading.Event | None = None, timeout_s: float = 30.0,
                    into: list[Result] | None = None) -> list[Result]:
    """Request i = make(i) at rate `rps`, until max_requests, max_seconds or `stop`.
    Results are appended to `into` (if given) as they complete, in completion order."""
    results = into if into is not None else []
    tasks: list[asyncio.Task] = []

    async def send(index: int, scheduled: float) -> None:
        results.append(await _one(client, index, make(index), scheduled))

    async with _client(base_url, timeout_s) as client:
        start = time.perf_counter()
        for index in range(max_requests):
            scheduled = start + index / rps
            if scheduled - start > max_seconds or (stop is not None and stop.is_set()):
                break
            # Always yield, even when behind schedule, so sent requests make progress.
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            tasks.append(asyncio.create_task(send(index, scheduled)))
        await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.index)


async def closed_loop(base_url: str, make: Callable[[int], Request], concurrency: int,
                      seconds: float, timeout_s: float = 30.0) -> tuple[list[Result], float]:
    """`concurrency` clients, each sending its next request when the last one answered,
    for `seconds`. -> (results, elapsed seconds)."""
    results: list[Result] = []
    counter = iter(range(10**9))
    async with _client(base_url, timeout_s) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                index = next(counter)
                results.append(await _one(client, index, make(index), time.perf_counter()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


class Background:
    """Runs `open_loop` on its own thread and event loop; `results` fills as answers
    arrive; `stop()` ends the load and returns every result."""

    def __init__(self, base_url: str, make: Callable[[int], Request], rps: float,
                 max_requests: int, max_seconds: float):
        self._stop = threading.Event()
        self.results: list[Result] = []
        self._thread = threading.Thread(target=self._run, daemon=True, args=(
            base_url, make, rps, max_requests, max_seconds))
        self._thread.start()

    def _run(self, *args) -> None:
        asyncio.run(open_loop(*args, stop=self._stop, into=self.results))

    def stop(self, timeout_s: float = 180.0) -> list[Result]:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"load still running {timeout_s} s after stop")
        return sorted(self.results, key=lambda r: r.index)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]
