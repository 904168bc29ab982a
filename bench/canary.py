"""The canary, measured: how soon a bad version is rolled back, how often an equivalent
one is rolled back by mistake, the traffic split, and what impression logging costs a
request.

    python -m bench.canary [--bad-trials 10] [--equivalent-trials 20]

One stack (embedded broker, local Ray, ML-100K catalog) with the canary on, driven by
the simulated population of bench/canary_sim.py (users click by a held-out ground truth).
The serving version ranks by popularity; each trial publishes a candidate as the canary
and simulates visits until the judge's verdict:

- bad trials: the item biases shuffled (passes every publish check) -> attributed
  events until it is rolled back (the canary arm's, and both arms');
- equivalent trials: the soft prompt moved by 1e-4 -> promoted or, falsely, rolled back;
- traffic split: the canary's share of the answers while canaries ran, against
  `canary_share`;
- impression cost: /recommend cache hits, 4 closed-loop clients, on the main app (writes
  impressions) and on a second app without a broker address (writes none), alternated,
  same run -> p99 of each.

Writes bench/results/canary.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import ray
from kafka import KafkaProducer
from ray import serve

from bench.canary_sim import equivalent, population, simulate_until, versions
from bench.common import result_path, run_stamp, write_result
from bench.load import closed_loop, percentile
from services.config_sources import add_settings_flags, settings_from_flags
from services.embedded import free_port
from services.health import wait_until
from services.launch.stack import Stack

NO_IMPRESSIONS = "/noimp"


def log(message: str) -> None:
    print(f"[bench.canary] {message}", file=sys.stderr, flush=True)


def trial(stack, producer, blob: bytes, seed: int, timeout_s: float) -> dict:
    """Publish `blob` as the canary, simulate until the verdict -> the verdict's figures."""
    share = stack.settings.live.canary_share
    version = ray.get(stack.registry.publish.remote(blob, {"source": "bench.canary"}, share))
    wait_until(lambda: ray.get(stack.registry.routing.remote())["canary"] == version, 60,
               f"canary {version} running")
    users = population(stack.catalog.item_ids, seed)
    arms = simulate_until(stack, producer, users,
                          lambda: ray.get(stack.registry.routing.remote())["canary"] != version,
                          timeout_s)
    outcome = ray.get(stack.registry.routing.remote())["canary_outcomes"][-1]
    def verdict_of_version() -> dict | None:  # appended just after the registry is told
        live = ray.get(stack.streaming.live_metrics.report.remote())
        return next((v for v in live["verdicts"] if v["prompt_version"] == version), None)

    verdict = wait_until(verdict_of_version, 30, f"verdict on {version}")
    stack.wait_all_replicas(ray.get(stack.registry.serving_version.remote()), timeout_s=120)
    return {"version": version, "outcome": outcome["outcome"], "reason": outcome["reason"],
            "canary_events": verdict["canary"]["events"],
            "events": verdict["canary"]["events"] + verdict["serving"]["events"],
            "canary_hr": verdict["canary"]["hr"], "serving_hr": verdict["serving"]["hr"],
            "answers": arms}


def impression_cost(stack, seconds: float, rounds: int) -> dict:
    def hit(i: int):
        return "/recommend", {"user_id": f"regular-{i % 8}", "k": "10"}

    latencies: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(rounds):
        for name, prefix in (("with", ""), ("without", NO_IMPRESSIONS)):
            results, _ = asyncio.run(closed_loop(stack.base_url + prefix, hit, 4, seconds))
            latencies[name] += [r.latency_s * 1000 for r in results if r.status == 200]
    return {name: {"requests": len(v), "p50_ms": round(percentile(v, 50), 1),
                   "p99_ms": round(percentile(v, 99), 1)} for name, v in latencies.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.canary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bad-trials", type=int, default=10, help="bad versions published")
    parser.add_argument("--equivalent-trials", type=int, default=20,
                        help="equivalent versions published")
    parser.add_argument("--latency-seconds", type=float, default=10.0,
                        help="closed-loop seconds per app and round (impression cost)")
    parser.add_argument("--trial-timeout", type=float, default=600.0,
                        help="seconds a trial may take to reach a verdict")
    parser.add_argument("--out", default=str(result_path("canary.json")))
    add_settings_flags(parser)
    args = parser.parse_args(argv)
    if args.bad_trials < 1 or args.equivalent_trials < 1 or args.latency_seconds <= 0:
        parser.error("--bad-trials and --equivalent-trials must be >= 1, "
                     "--latency-seconds > 0")
    root = Path(".promptrec/bench-canary").resolve()
    settings = settings_from_flags(args, env=os.environ, base={
        "data_dir": str(root), "namespace": "promptrec-bench-canary", "dataset": "ml-100k",
        "train_every_events": 0, "num_consumers": 1, "num_shards": 1, "num_replicas": 1,
        "replica_cpus": 0.5, "canary_share": 0.5, "canary_min_events": 100,
        "canary_margin": 0.1, "http_port": free_port(), "metrics_port": free_port()})
    if settings.live.canary_share <= 0:
        parser.error("--canary-share must be > 0")
    stack = Stack(settings, progress=False).start(fresh=True)
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5)
    try:
        good, bad = versions(stack)
        serving = ray.get(stack.registry.publish.remote(good.to_bytes(), {"source": "bench"}))
        stack.wait_all_replicas(serving)
        stack.deploy_variant("noimp", NO_IMPRESSIONS, kafka_bootstrap="")
        cost = impression_cost(stack, args.latency_seconds, 2)
        serve.delete("noimp")  # its replica would follow every canary too
        log(f"impression cost: {cost}")
        bad_runs = []
        for i in range(args.bad_trials):
            _, shuffled = versions(stack, seed=100 + i)
            bad_runs.append(trial(stack, producer, shuffled.to_bytes(), 1000 + i,
                                  args.trial_timeout))
            log(f"bad trial {i + 1}: {bad_runs[-1]}")
        same_runs = []
        for i in range(args.equivalent_trials):
            same_runs.append(trial(stack, producer, equivalent(good, i).to_bytes(), 2000 + i,
                                   args.trial_timeout))
            log(f"equivalent trial {i + 1}: {same_runs[-1]}")
    finally:
        producer.close()
        stack.stop()
    runs = bad_runs + same_runs
    answers = {arm: sum(r["answers"][arm] for r in runs) for arm in ("canary", "serving")}
    result = {
        "events_to_rollback_median": statistics.median(r["events"] for r in bad_runs
                                                       if r["outcome"] == "rollback"),
        "canary_events_to_rollback_median": statistics.median(
            r["canary_events"] for r in bad_runs if r["outcome"] == "rollback"),
        "bad_rolled_back": sum(r["outcome"] == "rollback" for r in bad_runs),
        "bad_trials": len(bad_runs),
        "false_rollbacks": sum(r["outcome"] == "rollback" for r in same_runs),
        "equivalent_publishes": len(same_runs),
        "traffic_split_measured": round(answers["canary"] / sum(answers.values()), 4),
        "traffic_split_configured": settings.live.canary_share,
        "recommend_p99_ms_with_impressions": cost["with"]["p99_ms"],
        "recommend_p99_ms_without_impressions": cost["without"]["p99_ms"],
        "impression_cost": cost,
        "trials": {"bad": bad_runs, "equivalent": same_runs},
        "settings": {k: settings.value(k) for k in (
            "canary_share", "canary_min_events", "canary_max_events", "canary_margin",
            "canary_alpha", "live_k", "num_replicas", "replica_cpus")},
        **run_stamp("python -m bench.canary " + " ".join(argv or sys.argv[1:]), load=True),
    }
    log(f"wrote {write_result(args.out, result)}")
    return 0


if __name__ == "__main__":
    start = time.monotonic()
    code = main()
    log(f"done in {time.monotonic() - start:.0f} s")
    sys.exit(code)
