"""Serving benchmark: latency next to a no-op Serve deployment, throughput, hot swaps.

    make bench-serve            # = .venv/bin/python -m bench.serve [--rps 50 --swaps 40 ...]

Starts the real stack (embedded broker, local Ray, registry, shards, Serve), replays
MovieLens-100K so users have histories, and deploys beside the recommender, on the same
Serve proxy with the same replica count, CPUs and limits:

  /noop/      a no-op FastAPI deployment (the floor: proxy + routing + HTTP, no work)
  /before/    the recommender without its two optimisations (no user cache, no batching)
  /nocache/   the recommender with batching but no user cache

Phases, one client (httpx, asyncio) for all of them:

  1. latency at a fixed offered load (open loop), noop / recommend / before interleaved
     in rounds so machine noise hits them alike; users drawn from a pool whose vectors
     the recommender has cached (steady state; the hit rate is reported);
  2. throughput, closed loop, per app;
  3. hot swaps under the same open-loop load: publish a new prompt version, wait until
     every replica serves it, repeat. Every recommend answer of phases 1 and 3 is then
     recomputed from the weights of the version it names (bench.check).

Writes bench/results/serve.json. Numbers are from whatever machine runs it; the JSON
records its CPU count and load average, since a shared machine shifts every timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import ray
from fastapi import FastAPI
from ray import serve

from bench.check import VersionChecker, perturbed_prompt
from bench.load import Background, Result, closed_loop, open_loop, percentile
from services.config import Settings
from services.config_sources import add_settings_flags, load_settings
from services.data import load_interactions
from services.embedded import free_port
from services.model import (
    load_backbone,
    prompt_from_bytes,
    prompt_to_bytes,
    resolve_backbone_path,
)
from services.naming import shard_actor, shard_for_user
from services.stack import Stack
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


def _deploy(settings: Settings, name: str, prefix: str, **changes) -> None:
    variant = Settings(**{**settings.to_dict(), **changes}).validate()
    if name == "noop":
        app = Noop.options(num_replicas=variant.serving.num_replicas,
                           max_ongoing_requests=variant.serving.max_ongoing_requests,
                           max_queued_requests=variant.serving.max_queued_requests,
                           ray_actor_options={"num_cpus": variant.serving.replica_cpus},
                           logging_config={"enable_access_log": False}).bind()
    else:
        app = build_app(variant)
    serve.run(app, name=name, route_prefix=prefix, blocking=False)


def _wait_healthy(base_url: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/version", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base_url} not up")


def _replica_stats(base_url: str, replicas: int) -> dict[str, dict]:
    """/version of every replica (routing is random: poll until each has answered)."""
    seen: dict[str, dict] = {}
    with httpx.Client(base_url=base_url, timeout=10) as http:
        for _ in range(200):
            body = http.get("/version").json()
            seen[body["replica"]] = body
            if len(seen) >= replicas:
                break
    return seen


def _cache_counts(base_url: str, replicas: int) -> dict[str, dict[str, int]]:
    """{replica: {"hit": n, "miss": n}} (cumulative since each replica started)."""
    return {r: s["user_cache"] for r, s in _replica_stats(base_url, replicas).items()}


def _hit_rate(start: dict, end: dict) -> float | None:
    """Hits / lookups between two _cache_counts snapshots, over replicas in both."""
    hits = lookups = 0
    for replica in start.keys() & end.keys():
        h = end[replica]["hit"] - start[replica]["hit"]
        hits, lookups = hits + h, lookups + h + end[replica]["miss"] - start[replica]["miss"]
    return round(hits / lookups, 4) if lookups > 0 else None


def _summary(results: list[Result], seconds: float | None = None) -> dict:
    ok = [r.latency_s * 1000 for r in results if r.status == 200]
    out = {"requests": len(results), "ok": len(ok),
           "non_200": {str(s): sum(1 for r in results if r.status == s)
                       for s in sorted({r.status for r in results} - {200})}}
    if ok:
        out.update(p50_ms=round(percentile(ok, 50), 2), p99_ms=round(percentile(ok, 99), 2),
                   max_ms=round(max(ok), 2))
    for kind in ("hit", "miss"):
        split = [r.latency_s * 1000 for r in results if r.status == 200 and r.cache == kind]
        if split:
            out[f"cache_{kind}"] = {"ok": len(split), "p50_ms": round(percentile(split, 50), 2),
                                    "p99_ms": round(percentile(split, 99), 2)}
    if results:
        out["client_lag_p99_ms"] = round(percentile([r.lag_s * 1000 for r in results], 99), 2)
    if seconds:
        out["ok_per_s"] = round(len(ok) / seconds, 1)
    return out


def _pool(interactions, size: int, seed: int) -> list[str]:
    users = np.unique(interactions.user_ids.astype(str))
    return sorted(np.random.default_rng(seed).choice(users, min(size, len(users)),
                                                     replace=False).tolist())


def _requests(pool: list[str], seed: int, k: int = 10):
    order = np.random.default_rng(seed).choice(len(pool), 200_000).tolist()
    return lambda i: ("/recommend", {"user_id": pool[order[i % len(order)]], "k": str(k)})


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rps", type=float, default=25.0,
                        help="offered load, requests/s (the swap phase makes nearly every "
                             "request a cache miss: keep it under the all-miss throughput)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds per app per latency round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved latency rounds")
    parser.add_argument("--swaps", type=int, default=40, help="prompt versions published")
    parser.add_argument("--dwell", type=float, default=1.0,
                        help="seconds of load on each version once all replicas serve it")
    parser.add_argument("--users", type=int, default=200, help="user pool size")
    parser.add_argument("--events", type=int, default=100_000, help="events replayed")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--throughput-seconds", type=float, default=10.0)
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the second stack with serve_throughput_optimized off")
    parser.add_argument("--out", default="bench/results/serve.json")
    add_settings_flags(parser)
    args = parser.parse_args(argv)
    names = set(Settings.__dataclass_fields__)
    overrides = {"data_dir": ".promptrec/bench", "namespace": "promptrec-bench",
                 "num_consumers": 1}
    overrides.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    started = time.time()
    load_before = os.getloadavg()

    settings = _fresh_ports(load_settings(env=os.environ, overrides=overrides))
    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        report = _run(stack, settings, args)
    finally:
        stack.stop()
    if not args.no_compare:
        # Serve's flag is read when Ray starts: the "before" needs a stack of its own.
        _log("second stack, same apps: serve_throughput_optimized off")
        plain = _fresh_ports(Settings(**{**settings.to_dict(),
                                         "serve_throughput_optimized": False}))
        stack = Stack(plain, progress=False).start(fresh=True)
        try:
            off = _run_latency_throughput(stack, plain, args)
        finally:
            stack.stop()
        on = report["details"]
        report["details"]["serve_throughput_optimized_before_after"] = {
            "before": "serve_throughput_optimized off (a second stack with the same apps, "
                      "run after the first)",
            "off": off,
            "noop_p99_off_over_on": round(off["noop"]["p99_ms"]
                                          / on["latency_phase"]["noop"]["p99_ms"], 2),
            "recommend_p99_off_over_on": round(off["recommend"]["p99_ms"]
                                               / on["latency_phase"]["recommend"]["p99_ms"], 2),
            "recommend_throughput_on_over_off": round(
                on["throughput_closed_loop"]["recommend"]["ok_per_s"]
                / off["throughput_recommend"]["ok_per_s"], 2)}
    report["details"]["machine"] = {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_average_1m_before": round(load_before[0], 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2)}
    report["details"]["run"] = {
        "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": _git_commit(), "wall_s": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))
    print(f"written to {out}")
    return 0


def _fresh_ports(settings: Settings) -> Settings:
    return Settings(**{**settings.to_dict(), "http_port": free_port(),
                       "metrics_port": free_port()}).validate()


def _prepare(stack: Stack, settings: Settings, args, apps: list[tuple[str, str, dict]]):
    """Replay events, deploy the side apps, pick the user pool, warm everything.
    -> (pool, {user: state}, request maker)."""
    interactions = load_interactions(settings.infra.dataset, args.events)
    sent = replay(stack.bootstrap, settings.streaming.topic_clicks, interactions, settings.infra.dataset,
                  progress=False)
    stack.wait_handled(sent, timeout_s=600)
    _log(f"replayed {sent} events")
    for name, prefix, changes in apps:
        _deploy(settings, name, prefix, **changes)
    for _, prefix, _ in apps:
        _wait_healthy(stack.base_url + prefix)
    _log("apps deployed")
    pool = _pool(interactions, args.users, seed=1)
    histories = {}
    for user in pool:
        shard = ray.get_actor(shard_actor(shard_for_user(user, settings.streaming.num_shards)),
                              namespace=settings.infra.namespace)
        histories[user] = ray.get(shard.get_user.remote(user))
    # Each replica caches on its own and routing is random: after 8 passes a user is
    # uncached on a given replica with probability 1/256.
    warm = [("/recommend", {"user_id": u, "k": "10"}) for u in pool] * 8
    asyncio.run(open_loop(stack.base_url, lambda i: warm[i], 40, len(warm), 300))
    make = _requests(pool, seed=2)
    for _, prefix, _ in apps:
        asyncio.run(open_loop(stack.base_url + prefix, make, 20, 40, 10))
    _log("warm")
    return pool, histories, make


def _run_latency_throughput(stack: Stack, settings: Settings, args) -> dict:
    """The short comparison run: noop and recommend latency (one round), throughput."""
    _, _, make = _prepare(stack, settings, args, SIDE_APPS)
    base, count = stack.base_url, int(args.rps * args.seconds)
    out = {}
    for name, prefix in (("noop", "/noop"), ("recommend", "")):
        out[name] = _summary(asyncio.run(open_loop(base + prefix, make, args.rps, count,
                                                   args.seconds + 1)))
    results, elapsed = asyncio.run(closed_loop(base, make, args.concurrency,
                                               args.throughput_seconds))
    out["throughput_recommend"] = _summary(results, elapsed)
    _log(f"optimisation off: {out}")
    return out


def _run(stack: Stack, settings: Settings, args) -> dict:
    base = stack.base_url
    replicas = settings.serving.num_replicas
    pool, histories, make = _prepare(stack, settings, args, SIDE_APPS)

    # 1. Latency at the offered load, apps interleaved.
    phase: dict[str, list[Result]] = {"noop": [], "recommend": [], "before": [], "inline": []}
    prefixes = {"noop": "/noop", "recommend": "", "before": "/before", "inline": "/inline"}
    cache_start = _cache_counts(base, replicas)
    count = int(args.rps * args.seconds)
    for round_ in range(args.rounds):
        for name, prefix in prefixes.items():
            phase[name] += asyncio.run(open_loop(base + prefix, make, args.rps, count,
                                                 args.seconds + 1))
        _log(f"latency round {round_ + 1}/{args.rounds}: "
             + ", ".join(f"{n} p99 {_summary(r).get('p99_ms')} ms" for n, r in phase.items()))
    cache_end = _cache_counts(base, replicas)

    # 2. Throughput, closed loop.
    throughput = {}
    for name, prefix in [("noop", "/noop"), ("recommend", ""), ("nocache", "/nocache"),
                         ("before", "/before")]:
        results, elapsed = asyncio.run(closed_loop(base + prefix, make, args.concurrency,
                                                   args.throughput_seconds))
        throughput[name] = _summary(results, elapsed)
        _log(f"throughput {name}: {throughput[name]['ok_per_s']} ok/s")

    # 3. Hot swaps under the offered load.
    base_prompt = prompt_from_bytes(ray.get(stack.registry.serving.remote())["blob"])
    swap_cache_start = _cache_counts(base, replicas)
    load = Background(base, make, args.rps, max_requests=10**6, max_seconds=1800)
    swap_ms, client_seen_ms = [], []
    try:
        time.sleep(args.dwell)
        for seed in range(args.swaps):
            blob = prompt_to_bytes(perturbed_prompt(base_prompt, seed))
            t0 = time.perf_counter()
            version = ray.get(stack.registry.publish.remote(blob, {"source": "bench.serve"}))
            live = stack.wait_all_replicas(version, timeout_s=60, poll_s=0.02)
            client_seen_ms.append((time.perf_counter() - t0) * 1000)
            swap_ms.append(max(live.values()))
            if (seed + 1) % 10 == 0:
                done = list(load.results)
                _log(f"swap {seed + 1}/{args.swaps}: {len(done)} answers so far, "
                     f"{sum(r.status != 200 for r in done)} not 200, last publish -> all "
                     f"replicas {swap_ms[-1]:.0f} ms")
            time.sleep(args.dwell)
    finally:
        swap_results = load.stop()
    swap_cache_end = _cache_counts(base, replicas)

    # Every recommend answer must be what the version it names computes.
    _, encoder = load_backbone(resolve_backbone_path(settings.model.backbone_path))
    checker = VersionChecker(encoder, stack.catalog,
                             lambda v: ray.get(stack.registry.get.remote(v))["blob"])
    answered = [r for r in phase["recommend"] + swap_results if r.status == 200]
    mixed, examples = 0, []
    for r in answered:
        user = r.request[1]["user_id"]
        state = histories[user]
        if r.body["state_version"] != (state["state_version"] if state else 0):
            reason = "state_version changed during the run"
        else:
            reason = checker.mismatch(r.body, state["history"] if state else [], 10,
                                          state["personal"] if state else None)
        if reason:
            mixed += 1
            examples.append(f"user {user} v{r.body['prompt_version']}: {reason}")
    _log(f"checked {len(answered)} answers against their named versions: {mixed} mixed")

    batch_users = _batch_sizes(base, {"recommend": "", "nocache": "/nocache",
                                      "before": "/before", "inline": "/inline"}, replicas)
    summaries = {name: _summary(results) for name, results in phase.items()}
    failed = sum(1 for r in phase["recommend"] + swap_results if r.status != 200)
    noop, rec, before = summaries["noop"], summaries["recommend"], summaries["before"]
    return {
        "noop_p50_ms": noop["p50_ms"], "noop_p99_ms": noop["p99_ms"],
        "recommend_p50_ms": rec["p50_ms"], "recommend_p99_ms": rec["p99_ms"],
        "p99_ratio": round(rec["p99_ms"] / noop["p99_ms"], 2),
        "rps_offered": args.rps,
        "max_rps": throughput["recommend"]["ok_per_s"],
        "swap_p50_ms": round(percentile(swap_ms, 50), 1),
        "swap_p99_ms": round(percentile(swap_ms, 99), 1),
        "swaps": len(swap_ms),
        "failed_requests": failed,
        "mixed_version_responses": mixed,
        "details": {
            "latency_phase": {**summaries, "rounds": args.rounds,
                              "seconds_per_app_per_round": args.seconds,
                              "user_pool": len(pool),
                              "recommend_cache_hit_rate": _hit_rate(cache_start, cache_end)},
            "before_after_at_offered_load": {
                "before": "no user cache, no batching (/before)",
                "after": "user cache + batching (the recommender)",
                "p50_before_over_after": round(before["p50_ms"] / rec["p50_ms"], 2),
                "p99_before_over_after": round(before["p99_ms"] / rec["p99_ms"], 2),
                "encode_thread_before": "misses encoded on the event loop (/inline)",
                "p50_inline_over_thread": round(
                    summaries["inline"]["p50_ms"] / rec["p50_ms"], 2),
                "p99_inline_over_thread": round(
                    summaries["inline"]["p99_ms"] / rec["p99_ms"], 2)},
            "throughput_closed_loop": {
                **throughput, "concurrency": args.concurrency,
                "seconds": args.throughput_seconds,
                "batching_gain_nocache_over_before": round(
                    throughput["nocache"]["ok_per_s"] / throughput["before"]["ok_per_s"], 2),
                "cache_gain_recommend_over_nocache": round(
                    throughput["recommend"]["ok_per_s"] / throughput["nocache"]["ok_per_s"], 2),
                "mean_users_per_encode_pass": batch_users},
            "swap_phase": {**_summary(swap_results), "dwell_s": args.dwell,
                           "cache_hit_rate": _hit_rate(swap_cache_start, swap_cache_end),
                           "publish_to_all_replicas_ms": [round(x, 1) for x in swap_ms],
                           "client_observed_all_replicas_p50_ms": round(
                               percentile(client_seen_ms, 50), 1),
                           "client_observed_all_replicas_p99_ms": round(
                               percentile(client_seen_ms, 99), 1)},
            "answers_checked": len(answered),
            "mixed_examples": examples[:5],
            "settings": {k: getattr(settings, k) for k in (
                "num_replicas", "replica_cpus", "max_ongoing_requests", "max_queued_requests",
                "batch_max_size", "batch_wait_ms", "user_cache_size",
                "serve_throughput_optimized", "dataset")},
            "events_replayed": args.events,
        },
    }


def _batch_sizes(base_url: str, prefixes: dict[str, str], replicas: int) -> dict[str, float]:
    """Mean users per backbone pass per app since start, from each replica's /version
    (Ray 2.60 exports a histogram's _sum from bucket midpoints, so not from metrics)."""
    out = {}
    for name, prefix in prefixes.items():
        stats = _replica_stats(base_url + prefix, replicas).values()
        passes = sum(s["encoded"]["passes"] for s in stats)
        out[name] = round(sum(s["encoded"]["users"] for s in stats) / passes, 2) if passes \
            else None
    return out


if __name__ == "__main__":
    sys.exit(main())
