"""Training-round benchmark: how much of a round is fixed overhead.

    make bench-rounds           # = .venv/bin/python -m bench.rounds [--rounds 3 ...]

Starts the real stack without Serve (embedded broker, local Ray, registry, shards),
replays `--num-events` MovieLens-100K events so the event log has data, then runs `--rounds`
training rounds back to back, each on the whole log (warm start from the serving
version, Ray Train DDP over `train_workers`, validation gate, publish). The first round
starts the long-lived Ray Train run (training/trainer.py); the later ones reuse it.

Per round: wall time, time in training steps, and the rest (start-up, moving data,
the gate's evaluation) as a share of the round. Writes bench/results/rounds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from bench.common import run_stamp, write_result
from services.config_sources import add_settings_flags, settings_from_flags
from services.data import load_interactions
from services.embedded import free_port
from services.launch.stack import Stack
from streaming.replay import replay

RESULTS = Path(__file__).resolve().parent / "results" / "rounds.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.rounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds run back to back")
    parser.add_argument("--num-events", type=int, default=20_000,
                        help="events replayed first")
    parser.add_argument("--out", default=str(RESULTS))
    add_settings_flags(parser)
    args = parser.parse_args(argv)
    settings = settings_from_flags(args, env=os.environ, base={
        "data_dir": ".promptrec/bench-rounds", "namespace": "promptrec-rounds",
        "deploy_serve": False, "metrics_port": free_port()})

    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        interactions = load_interactions(settings.infra.events_source, args.num_events)
        sent = replay(stack.bootstrap, settings.streaming.topic_clicks, interactions,
                      settings.infra.dataset, progress=False)
        stack.wait_handled(sent, timeout_s=600)
        time.sleep(settings.streaming.log_flush_s * 2)  # the consumers' last event-log flush
        rounds = []
        for _ in range(args.rounds):
            result = stack.runner.run(since_ingest_ts=0.0)
            row = result.to_dict()
            rounds.append(row)
            print(f"round {result.round}: {result.outcome}, {result.seconds:.1f} s, "
                  f"training steps {result.train_seconds:.1f} s, overhead "
                  f"{row['overhead_share']:.0%}"
                  f"{' (started the Ray Train run)' if result.started_run else ''}")
        runs_started = stack.runner.trainer.runs_started
    finally:
        stack.stop()

    later = [r for r in rounds if not r["started_run"]]
    result = {
        "rounds": len(rounds),
        "first_round_s": round(rounds[0]["seconds"], 1),
        "first_round_overhead_share": round(rounds[0]["overhead_share"], 3),
        "later_round_s_median": round(float(np.median([r["seconds"] for r in later])), 1)
        if later else None,
        "later_round_overhead_share_median": round(float(np.median(
            [r["overhead_share"] for r in later])), 3) if later else None,
        "ray_train_runs_started": runs_started,
        "train_workers": settings.training.train_workers,
        "train_steps": settings.training.train_steps,
        "batch_size": settings.training.batch_size, "use_gpu": settings.training.use_gpu,
        "events": sent,
        "per_round": rounds,
        **run_stamp("python -m bench.rounds " + " ".join(argv or []), load=True),
    }
    write_result(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "per_round"}, indent=2))
    return result


if __name__ == "__main__":
    main()
