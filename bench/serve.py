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
from services.data import load_interactions
from services.embedded import free_port
from services.metrics import parse_prometheus
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


def _deploy(settings: Settings, name: str, prefix: str, **changes) -> None:
    variant = Settings(**{**settings.to_dict(), **changes}).validate()
    if name == "noop":
        app = Noop.options(num_replicas=variant.num_replicas,
                           max_ongoing_requests=variant.max_ongoing_requests,
                           max_queued_requests=variant.max_queued_requests,
                           ray_actor_options={"num_cpus": variant.replica_cpus}).bind()
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


def _cache_counts(base_url: str, replicas: int) -> dict[str, int]:
    stats = _replica_stats(base_url, replicas).values()
    return {r: sum(s["user_cache"][r] for s in stats) for r in ("hit", "miss")}


def _summary(results: list[Result], seconds: float | None = None) -> dict:
    ok = [r.latency_s * 1000 for r in results if r.status == 200]
    out = {"requests": len(results), "ok": len(ok),
           "non_200": {str(s): sum(1 for r in results if r.status == s)
                       for s in sorted({r.status for r in results} - {200})}}
    if ok:
        out.update(p50_ms=round(percentile(ok, 50), 2), p99_ms=round(percentile(ok, 99), 2),
                   max_ms=round(max(ok), 2))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rps", type=float, default=50.0, help="offered load, requests/s")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds per app per latency round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved latency rounds")
    parser.add_argument("--swaps", type=int, default=40, help="prompt versions published")
    parser.add_argument("--users", type=int, default=200, help="user pool size")
    parser.add_argument("--events", type=int, default=100_000, help="events replayed")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--throughput-seconds", type=float, default=10.0)
    parser.add_argument("--out", default="bench/results/serve.json")
    Settings.add_arguments(parser)
    args = parser.parse_args(argv)
    overrides = {"data_dir": ".promptrec/bench", "http_port": free_port(),
                 "metrics_port": free_port(), "namespace": "promptrec-bench",
                 "num_consumers": 1}
    names = set(Settings.__dataclass_fields__)
    overrides.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    settings = Settings.from_sources(env=os.environ, overrides=overrides)
    started = time.time()
    load_before = os.getloadavg()

    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        report = _run(stack, settings, args)
    finally:
        stack.stop()
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


def _run(stack: Stack, settings: Settings, args) -> dict:
    base = stack.base_url
    replicas = settings.num_replicas
    log = lambda msg: print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)  # noqa: E731

    interactions = load_interactions(settings.dataset, args.events)
    sent = replay(stack.bootstrap, settings.topic_clicks, interactions, settings.dataset,
                  progress=False)
    stack.wait_handled(sent, timeout_s=600)
    log(f"replayed {sent} events")

    _deploy(settings, "noop", "/noop")
    _deploy(settings, "before", "/before", user_cache_size=0, batch_max_size=1)
    _deploy(settings, "nocache", "/nocache", user_cache_size=0)
    for prefix in ("/noop", "/before", "/nocache"):
        _wait_healthy(base + prefix)
    log("apps deployed")

    pool = _pool(interactions, args.users, seed=1)
    histories = {}
    for user in pool:
        shard = ray.get_actor(shard_actor(shard_for_user(user, settings.num_shards)),
                              namespace=settings.namespace)
        histories[user] = ray.get(shard.get_user.remote(user))
    make = _requests(pool, seed=2)

    # Warm every app (first requests pay lazy imports), and fill the main app's cache.
    warm = [("/recommend", {"user_id": u, "k": "10"}) for u in pool]
    asyncio.run(open_loop(base, lambda i: warm[i], 50, len(warm), 60))
    for prefix in ("/noop", "/before", "/nocache"):
        asyncio.run(open_loop(base + prefix, make, 20, 40, 10))
    log("warm")

    # 1. Latency at the offered load, apps interleaved.
    phase: dict[str, list[Result]] = {"noop": [], "recommend": [], "before": []}
    prefixes = {"noop": "/noop", "recommend": "", "before": "/before"}
    cache_start = _cache_counts(base, replicas)
    count = int(args.rps * args.seconds)
    for round_ in range(args.rounds):
        for name, prefix in prefixes.items():
            phase[name] += asyncio.run(open_loop(base + prefix, make, args.rps, count,
                                                 args.seconds + 1))
        log(f"latency round {round_ + 1}/{args.rounds}")
    cache_end = _cache_counts(base, replicas)
    hits = cache_end["hit"] - cache_start["hit"]
    lookups = hits + cache_end["miss"] - cache_start["miss"]

    # 2. Throughput, closed loop.
    throughput = {}
    for name, prefix in [("noop", "/noop"), ("recommend", ""), ("nocache", "/nocache"),
                         ("before", "/before")]:
        results, elapsed = asyncio.run(closed_loop(base + prefix, make, args.concurrency,
                                                   args.throughput_seconds))
        throughput[name] = _summary(results, elapsed)
        log(f"throughput {name}: {throughput[name]['ok_per_s']} ok/s")

    # 3. Hot swaps under the offered load.
    serving = ray.get(stack.registry.serving.remote())
    base_prompt = prompt_from_bytes(serving["blob"])
    load = Background(base, make, args.rps, max_requests=10**6, max_seconds=600)
    swap_ms, client_seen_ms = [], []
    try:
        time.sleep(1.0)
        for seed in range(args.swaps):
            blob = prompt_to_bytes(perturbed_prompt(base_prompt, seed))
            t0 = time.perf_counter()
            version = ray.get(stack.registry.publish.remote(blob, {"source": "bench.serve"}))
            live = stack.wait_all_replicas(version, timeout_s=60, poll_s=0.02)
            client_seen_ms.append((time.perf_counter() - t0) * 1000)
            swap_ms.append(max(live.values()))
            time.sleep(0.3)
    finally:
        swap_results = load.stop()
    log(f"{args.swaps} swaps, {len(swap_results)} requests under load")

    # Every recommend answer must be what the version it names computes.
    _, encoder = load_backbone(resolve_backbone_path(settings.backbone_path))
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
    log(f"checked {len(answered)} answers against their named versions: {mixed} mixed")

    batch_users = _batch_sizes(stack)
    summaries = {name: _summary(results) for name, results in phase.items()}
    swap_summary = _summary(swap_results)
    failed = sum(1 for r in phase["recommend"] + swap_results if r.status != 200)
    noop, rec, before = summaries["noop"], summaries["recommend"], summaries["before"]
    report = {
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
                              "recommend_cache_hit_rate": round(hits / max(lookups, 1), 4)},
            "before_after_at_offered_load": {
                "before": "no user cache, no batching (/before)",
                "after": "user cache + batching (the recommender)",
                "p50_before_over_after": round(before["p50_ms"] / rec["p50_ms"], 2),
                "p99_before_over_after": round(before["p99_ms"] / rec["p99_ms"], 2)},
            "throughput_closed_loop": {
                **throughput, "concurrency": args.concurrency,
                "seconds": args.throughput_seconds,
                "batching_gain_nocache_over_before": round(
                    throughput["nocache"]["ok_per_s"] / throughput["before"]["ok_per_s"], 2),
                "cache_gain_recommend_over_nocache": round(
                    throughput["recommend"]["ok_per_s"] / throughput["nocache"]["ok_per_s"], 2),
                "mean_users_per_encode_pass": batch_users},
            "swap_phase": {**swap_summary,
                           "publish_to_all_replicas_ms": [round(x, 1) for x in swap_ms],
                           "client_observed_all_replicas_p50_ms": round(
                               percentile(client_seen_ms, 50), 1),
                           "client_observed_all_replicas_p99_ms": round(
                               percentile(client_seen_ms, 99), 1)},
            "answers_checked": len(answered),
            "mixed_examples": examples[:5],
            "settings": {k: getattr(settings, k) for k in (
                "num_replicas", "replica_cpus", "max_ongoing_requests", "max_queued_requests",
                "batch_max_size", "batch_wait_ms", "user_cache_size", "dataset")},
            "events_replayed": sent,
        },
    }
    return report


def _batch_sizes(stack: Stack) -> dict[str, float]:
    """Mean users per backbone pass per app, from the exported histogram (Ray exports
    every few seconds: wait for the counts to settle)."""
    previous, sizes = None, {}
    for _ in range(30):
        scraped = parse_prometheus(httpx.get(stack.metrics_url, timeout=10).text)
        sums, counts = {}, {}
        for name, into in (("promptrec_encode_batch_users_sum", sums),
                           ("promptrec_encode_batch_users_count", counts)):
            for labels, value in scraped.get(name, []):
                app = labels.get("application", "all")
                into[app] = into.get(app, 0) + value
        sizes = {app: round(sums[app] / counts[app], 2) for app in counts if counts[app]}
        if sizes and sizes == previous:
            break
        previous = sizes
        time.sleep(2)
    return sizes


if __name__ == "__main__":
    sys.exit(main())
