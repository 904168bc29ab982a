"""The serving benchmark's readings and its result file: summaries of a phase's answers,
per-replica counters from /version, and bench/results/serve.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.load import Result, percentile


def summary(results: list[Result], seconds: float | None = None) -> dict:
    """Counts, latency percentiles (all, cache hits, misses) and, given `seconds`, ok/s."""
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


def replica_stats(base_url: str, replicas: int) -> dict[str, dict]:
    """/version of every replica (routing is random: asks until each has answered)."""
    seen: dict[str, dict] = {}
    with httpx.Client(base_url=base_url, timeout=10) as http:
        for _ in range(200):
            body = http.get("/version").json()
            seen[body["replica"]] = body
            if len(seen) >= replicas:
                break
    return seen


def cache_counts(base_url: str, replicas: int) -> dict[str, dict[str, int]]:
    """{replica: {"hit": n, "miss": n}} (cumulative since each replica started)."""
    return {r: s["user_cache"] for r, s in replica_stats(base_url, replicas).items()}


def hit_rate(start: dict, end: dict) -> float | None:
    """Hits / lookups between two cache_counts snapshots, over replicas in both."""
    hits = lookups = 0
    for replica in start.keys() & end.keys():
        h = end[replica]["hit"] - start[replica]["hit"]
        hits, lookups = hits + h, lookups + h + end[replica]["miss"] - start[replica]["miss"]
    return round(hits / lookups, 4) if lookups > 0 else None


def batch_sizes(base_url: str, prefixes: dict[str, str], replicas: int) -> dict[str, float]:
    """Mean users per backbone pass per app since start, from each replica's /version
    (Ray 2.60 exports a histogram's _sum from bucket midpoints, so not from metrics)."""
    out = {}
    for name, prefix in prefixes.items():
        stats = replica_stats(base_url + prefix, replicas).values()
        passes = sum(s["encoded"]["passes"] for s in stats)
        out[name] = round(sum(s["encoded"]["users"] for s in stats) / passes, 2) if passes \
            else None
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(report: dict, out: Path, argv: list[str] | None, started: float,
          load_before: tuple[float, float, float]) -> None:
    """Add the machine and run records to `report["details"]`, write it, print the top."""
    report["details"]["machine"] = {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_average_1m_before": round(load_before[0], 2),
        "load_average_1m_after": round(os.getloadavg()[0], 2)}
    report["details"]["run"] = {
        "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": _git_commit(), "wall_s": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "details"}, indent=2))
    print(f"written to {out}")
