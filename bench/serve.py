"""Serving benchmark: latency next to a no-op Serve deployment, throughput, hot swaps.

    make bench-serve            # = .venv/bin/python -m bench.serve [--rps 50 --swaps 12 ...]

Starts the real stack (embedded broker, local Ray, registry, shards, Serve), replays
MovieLens-100K so users have histories, and deploys beside the recommender, on the same
Serve proxy with the same replica count, CPUs and limits (bench.serve_apps):

  /noop/      a no-op FastAPI deployment (the floor: proxy + routing + HTTP, no work)
  /before/    the recommender without its two optimisations (no user cache, no batching)
  /nocache/   the recommender with batching but no user cache

Phases, one client (httpx, asyncio) for all of them (bench.serve_phases):

  1. latency at a fixed offered load (open loop), noop / recommend / before interleaved
     in rounds so machine noise hits them alike; users drawn from a pool whose vectors
     the recommender has cached (steady state; the hit rate is reported);
  2. throughput, closed loop, per app;
  3. hot swaps under the same open-loop load, the side apps taken down first: publish a
     new prompt version, wait until every replica serves it, keep the load on it for
     `--dwell` s, repeat; then a stress run of `--stress-swaps` publishes
     `--stress-dwell` s apart, faster than a replica re-encodes its cached users.
     Every recommend answer of phases 1 and 3 is then recomputed from the weights of
     the version it names (bench.check).

Writes bench/results/serve.json (bench.serve_report). Numbers are from whatever machine
runs it; the JSON records its CPU count and load average, since a shared machine shifts
every timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ray import serve

from bench import serve_phases as phases
from bench.encoder_only import encoder_only
from bench.load import percentile
from bench.serve_apps import SIDE_APPS, fresh_ports, log, prepare
from bench.serve_report import batch_sizes, summary, write
from services.config import Settings
from services.config_sources import add_settings_flags, settings_from_flags
from services.launch.stack import Stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rps", type=float, default=25.0,
                        help="offered load, requests/s (the swap phase makes nearly every "
                             "request a cache miss: keep it under the all-miss throughput)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds per app per latency round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved latency rounds")
    parser.add_argument("--swaps", type=int, default=12, help="prompt versions published")
    parser.add_argument("--dwell", type=float, default=10.0,
                        help="seconds of load on each version once all replicas serve it "
                             "(a later training round takes ~66 s here: bench/results/"
                             "rounds.json)")
    parser.add_argument("--stress-swaps", type=int, default=40,
                        help="then this many publishes --stress-dwell apart (0: none)")
    parser.add_argument("--stress-dwell", type=float, default=1.0,
                        help="seconds between the stress publishes (faster than a warm-up)")
    parser.add_argument("--user-pool", type=int, default=200, help="user pool size")
    parser.add_argument("--num-events", type=int, default=100_000,
                        help="events replayed")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--throughput-seconds", type=float, default=10.0)
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the second stack with serve_throughput_optimized off")
    parser.add_argument("--out", default="bench/results/serve.json")
    add_settings_flags(parser)
    args = parser.parse_args(argv)
    if args.swaps < 1 or args.stress_swaps < 0 or args.dwell <= 0 or args.stress_dwell <= 0:
        parser.error("--swaps must be >= 1, --stress-swaps >= 0, --dwell and --stress-dwell > 0")
    started = time.time()
    load_before = os.getloadavg()

    settings = fresh_ports(settings_from_flags(args, env=os.environ, base={
        "data_dir": ".promptrec/bench", "namespace": "promptrec-bench", "num_consumers": 1}))
    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        report = _run(stack, settings, args)
    finally:
        stack.stop()
    if not args.no_compare:
        # Serve's flag is read when Ray starts: the "before" needs a stack of its own.
        log("second stack, same apps: serve_throughput_optimized off")
        plain = fresh_ports(settings.replace(serve_throughput_optimized=False))
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
    write(report, Path(args.out), argv, started, load_before)
    return 0


def _run_latency_throughput(stack: Stack, settings: Settings, args) -> dict:
    """The short comparison run: noop and recommend latency (one round), throughput."""
    scenario = prepare(stack, settings, args, SIDE_APPS)
    base = stack.base_url
    answers, _ = phases.latency(base, scenario.make, args, settings.serving.num_replicas,
                                {"noop": "/noop", "recommend": ""}, rounds=1)
    out = {name: summary(results) for name, results in answers.items()}
    out["throughput_recommend"] = phases.throughput(base, scenario.make, args,
                                                    {"recommend": ""})["recommend"]
    log(f"optimisation off: {out}")
    return out


def _stress_report(stress: dict, args, steady_p99_ms: float) -> dict:
    """The publishes faster than a warm-up finishes: each version held is let go sooner."""
    over = summary(stress["results"])
    failed = sum(1 for r in stress["results"] if r.status != 200)
    return {**over, "swaps": len(stress["swap_ms"]), "dwell_s": args.stress_dwell,
            "p99_over_steady_p99": round(over["p99_ms"] / steady_p99_ms, 2)
            if "p99_ms" in over else None,  # None: not one answer came back
            "failed_requests": failed, "cache_hit_rate": stress["cache_hit_rate"],
            "publish_to_all_replicas_p99_ms": round(percentile(stress["swap_ms"], 99), 1)}


def _run(stack: Stack, settings: Settings, args) -> dict:
    base = stack.base_url
    replicas = settings.serving.num_replicas
    scenario = prepare(stack, settings, args, SIDE_APPS)
    phase, recommend_hit_rate = phases.latency(base, scenario.make, args, replicas)
    throughput = phases.throughput(base, scenario.make, args)
    batch_users = batch_sizes(base, {"recommend": "", "nocache": "/nocache",
                                     "before": "/before", "inline": "/inline"}, replicas)
    # The ceiling of /nocache: the same encoder and batch sizes alone, in this process,
    # right after /nocache's closed loop (the same apps deployed, idle).
    batch = max(1, round(batch_users["nocache"] or 1))
    alone = encoder_only(stack, scenario.pool, replicas, batch, args.throughput_seconds)
    # The swaps meet the recommender alone, as deployed: an idle side app with a cache
    # (/inline) would re-encode its cached users at every publish too (~7 s of a replica
    # per publish here), on the same two cores.
    for name, _, _ in SIDE_APPS:
        serve.delete(name)
    swapped = phases.swaps(stack, scenario.make, args.rps, args.swaps, args.dwell)
    swap_results, swap_ms = swapped["results"], swapped["swap_ms"]
    client_seen_ms = swapped["client_seen_ms"]
    stress = phases.swaps(stack, scenario.make, args.rps, args.stress_swaps, args.stress_dwell,
                          first_seed=args.swaps) if args.stress_swaps else None
    answers = phase["recommend"] + swap_results + (stress["results"] if stress else [])
    answered, mixed = phases.check_answers(stack, scenario, answers)
    nocache_rps = throughput["nocache"]["ok_per_s"]
    summaries = {name: summary(results) for name, results in phase.items()}
    failed = sum(1 for r in answers if r.status != 200)
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
        # Requests during the publishes against steady state (target <= 2: no storm).
        "swap_phase_p99_ms": summary(swap_results)["p99_ms"],
        "swap_phase_p99_over_steady_p99": round(
            summary(swap_results)["p99_ms"] / rec["p99_ms"], 2),
        "failed_requests": failed,
        "mixed_version_responses": len(mixed),
        # Serving overhead: misses through HTTP against the encoder alone (target >= 0.8).
        "encoder_only_rps": alone["encoder_only_rps"], "nocache_rps": nocache_rps,
        "nocache_over_encoder_only": round(nocache_rps / alone["encoder_only_rps"], 2),
        "details": {
            "encoder_only": alone,
            "latency_phase": {**summaries, "rounds": args.rounds,
                              "seconds_per_app_per_round": args.seconds,
                              "user_pool": len(scenario.pool),
                              "recommend_cache_hit_rate": recommend_hit_rate},
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
            "swap_phase": {**summary(swap_results), "dwell_s": args.dwell,
                           "cache_hit_rate": swapped["cache_hit_rate"],
                           "publish_to_all_replicas_ms": [round(x, 1) for x in swap_ms],
                           "client_observed_all_replicas_p50_ms": round(
                               percentile(client_seen_ms, 50), 1),
                           "client_observed_all_replicas_p99_ms": round(
                               percentile(client_seen_ms, 99), 1)},
            "swap_stress": stress and _stress_report(stress, args, rec["p99_ms"]),
            "answers_checked": len(answered),
            "mixed_examples": mixed[:5],
            "settings": {k: settings.value(k) for k in (
                "num_replicas", "replica_cpus", "max_ongoing_requests", "max_queued_requests",
                "batch_max_size", "batch_wait_ms", "user_cache_size",
                "serve_throughput_optimized", "dataset")},
            "events_replayed": args.num_events,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
