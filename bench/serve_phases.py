"""The serving benchmark's phases, one client (httpx, asyncio) for all of them:

  1. latency at a fixed offered load (open loop), apps interleaved in rounds so machine
     noise hits them alike;
  2. throughput, closed loop, per app;
  3. hot swaps under the same open-loop load: publish a new prompt version, wait until
     every replica serves it, repeat;

and the check that every recommend answer is what the version it names computes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import ray

from bench.check import VersionChecker, perturbed_prompt
from bench.load import Background, Request, Result, closed_loop, open_loop
from bench.serve_apps import Scenario, log
from bench.serve_report import cache_counts, hit_rate, summary
from services.backbone import load_backbone, resolve_backbone_path
from services.launch.stack import Stack
from services.weights import decode_weights

LATENCY_APPS = {"noop": "/noop", "recommend": "", "before": "/before", "inline": "/inline"}
THROUGHPUT_APPS = {"noop": "/noop", "recommend": "", "nocache": "/nocache", "before": "/before"}
K = 10  # items per recommend request


def latency(base: str, make: Callable[[int], Request], args, replicas: int,
            apps: dict[str, str] = LATENCY_APPS,
            rounds: int | None = None) -> tuple[dict[str, list[Result]], float | None]:
    """-> ({app: answers}, the recommender's cache hit rate over the phase)."""
    phase: dict[str, list[Result]] = {name: [] for name in apps}
    start = cache_counts(base, replicas)
    count = int(args.rps * args.seconds)
    rounds = args.rounds if rounds is None else rounds
    for round_ in range(rounds):
        for name, prefix in apps.items():
            phase[name] += asyncio.run(open_loop(base + prefix, make, args.rps, count,
                                                 args.seconds + 1))
        log(f"latency round {round_ + 1}/{rounds}: "
            + ", ".join(f"{n} p99 {summary(r).get('p99_ms')} ms" for n, r in phase.items()))
    return phase, hit_rate(start, cache_counts(base, replicas))


def throughput(base: str, make: Callable[[int], Request], args,
               apps: dict[str, str] = THROUGHPUT_APPS) -> dict[str, dict]:
    out = {}
    for name, prefix in apps.items():
        results, elapsed = asyncio.run(closed_loop(base + prefix, make, args.concurrency,
                                                   args.throughput_seconds))
        out[name] = summary(results, elapsed)
        log(f"throughput {name}: {out[name]['ok_per_s']} ok/s")
    return out


def swaps(stack: Stack, make: Callable[[int], Request], rps: float, count: int,
          dwell_s: float, first_seed: int = 0) -> dict:
    """Publish `count` versions under `rps` of load, `dwell_s` apart -> {"results",
    "swap_ms" (publish -> every replica live, as the replicas measured it),
    "client_seen_ms", "cache_hit_rate"}."""
    base, replicas = stack.base_url, stack.settings.serving.num_replicas
    base_prompt = decode_weights(ray.get(stack.registry.serving.remote())["blob"])
    cache_start = cache_counts(base, replicas)
    load = Background(base, make, rps, max_requests=10**6, max_seconds=1800)
    swap_ms, client_seen_ms = [], []
    try:
        time.sleep(dwell_s)
        for published, seed in enumerate(range(first_seed, first_seed + count), 1):
            blob = perturbed_prompt(base_prompt, seed).to_bytes()
            t0 = time.perf_counter()
            version = ray.get(stack.registry.publish.remote(blob, {"source": "bench.serve"}))
            live = stack.wait_all_replicas(version, timeout_s=60, poll_s=0.02)
            client_seen_ms.append((time.perf_counter() - t0) * 1000)
            swap_ms.append(max(live.values()))
            if published % 10 == 0:
                done = list(load.results)
                log(f"swap {published}/{count}: {len(done)} answers so far, "
                    f"{sum(r.status != 200 for r in done)} not 200, last publish -> all "
                    f"replicas {swap_ms[-1]:.0f} ms")
            time.sleep(dwell_s)
    finally:
        results = load.stop()
    return {"results": results, "swap_ms": swap_ms, "client_seen_ms": client_seen_ms,
            "cache_hit_rate": hit_rate(cache_start, cache_counts(base, replicas))}


def check_answers(stack: Stack, scenario: Scenario,
                  answers: list[Result]) -> tuple[list[Result], list[str]]:
    """Every 200 answer recomputed from the weights of the version it names.
    -> (the answers checked, one line per mixed-version answer)."""
    _, encoder = load_backbone(resolve_backbone_path(stack.settings.model.backbone_path))
    checker = VersionChecker(encoder, stack.catalog,
                             lambda v: ray.get(stack.registry.get.remote(v))["blob"])
    answered = [r for r in answers if r.status == 200]
    mixed = [f"user {user} v{version}: {reason}"
             for user, version, reason in checker.mixed(answered, scenario.states, K)]
    log(f"checked {len(answered)} answers against their named versions: {len(mixed)} mixed")
    return answered, mixed
