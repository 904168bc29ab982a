"""/recommend throughput when every request is a cache miss, for the user encoder before
and after it was shortened, on the same machine in one run.

    python -m bench.miss_throughput [--throughput-seconds 10] [--concurrency 16]

Each variant gets a stack of its own (embedded broker, local Ray, shards, Serve: the
model section is fixed when a stack starts, and its first version is built for it),
replays the same MovieLens-100K events so users have histories, and deploys the
recommender with its user cache off at /nocache, so every request runs the encoder.
A closed loop of `--concurrency` clients then measures answers per second. Variants:

  before        all 6 backbone layers, the mean readout (the model as it served before)
  after         the defaults: the first 2 layers, the last-item readout
  after_h200    the defaults with 200-item histories, as the offline recipe reads them

Writes bench/results/miss_throughput.json with each variant's figures and the ratios to
`before`. A shared machine shifts every timing: the file records the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import serve_phases as phases
from bench.common import result_path, run_stamp, write_result
from bench.serve_apps import fresh_ports, log, prepare
from services.config_sources import add_settings_flags, settings_from_flags
from services.launch.stack import Stack

VARIANTS = {
    "before": {"user_layers": 0, "readout": "mean"},
    "after": {},
    "after_h200": {"history_len": 200},
}
NOCACHE = [("nocache", "/nocache", {"user_cache_size": 0})]


def measure(settings, args) -> dict:
    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        scenario = prepare(stack, settings, args, NOCACHE)
        return phases.throughput(stack.base_url, scenario.make, args,
                                 {"nocache": "/nocache"})["nocache"]
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.miss_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--user-pool", type=int, default=200, help="user pool size")
    parser.add_argument("--num-events", type=int, default=100_000,
                        help="events replayed")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--throughput-seconds", type=float, default=10.0)
    parser.add_argument("--only", nargs="*", default=None, choices=list(VARIANTS))
    parser.add_argument("--out", default=None, help="result file (default bench/results/…)")
    add_settings_flags(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.throughput_seconds <= 0 or args.concurrency < 1 or args.user_pool < 1:
        parser.error("--throughput-seconds must be > 0, --concurrency and --user-pool >= 1")
    base = settings_from_flags(args, env=os.environ, base={
        "data_dir": ".promptrec/bench", "namespace": "promptrec-bench", "num_consumers": 1})
    started, variants = time.monotonic(), {}
    for name, changes in VARIANTS.items():
        if args.only is None or name in args.only:
            log(f"variant {name}: {changes or 'defaults'}")
            variants[name] = {"settings": changes, **measure(fresh_ports(base.replace(
                **changes)), args)}
    if "before" in variants:
        before = variants["before"]["ok_per_s"]
        for row in variants.values():
            row["ok_per_s_over_before"] = round(row["ok_per_s"] / before, 2) if before else None
    result = {"variants": variants, "concurrency": args.concurrency,
              "throughput_seconds": args.throughput_seconds, "events": args.num_events,
              "wall_seconds": round(time.monotonic() - started),
              **run_stamp(" ".join(["python -m bench.miss_throughput", *argv]), load=True)}
    out = write_result(args.out or result_path("miss_throughput.json"), result)
    for name, row in variants.items():
        print(f"{name}: {row['ok_per_s']} ok/s, p50 {row.get('p50_ms')} ms, "
              f"x{row.get('ok_per_s_over_before')}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
