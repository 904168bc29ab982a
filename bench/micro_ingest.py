"""Micro-benchmarks of the ingest hot path, old vs new in one run (pure functions, no
broker, no Ray):

    .venv/bin/python -m bench.micro_ingest [--num-events 50000]

- decode: `decode_event` per record vs `decode_batch` per poll of 2,000 records
  (all valid; one invalid record per poll; all valid but in a non-canonical shape);
- shard: the reference apply (one event at a time, tests/streaming/reference.py) vs
  `UserStateShard.apply` on batches of 1,000 events, with
  the real catalog vectors (384 floats) and the latency histogram recorded per event,
  on MovieLens-100K in time order (long runs of one user per batch) and on the same
  events with users shuffled (many users per batch);
- wire: pickling a shard's batch as one tuple per event vs as columns (`EventBatch`).

Prints microseconds per event (best of `--repeat`) and old/new ratios.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import time
from collections.abc import Callable
from pathlib import Path

from services.backbone import resolve_backbone_path
from services.batch import EventBatch
from services.batch_decode import decode_batch
from services.catalog import load_catalog
from services.config import StreamingSettings
from services.data import load_interactions
from services.events import InvalidEvent, decode_event
from streaming.shard import UserStateShard
from tests.streaming.reference import apply_one_by_one  # the reference beside its test


def best_us(fn: Callable[[], object], n: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) / n * 1e6


def report(name: str, old: float, new: float) -> dict:
    print(f"{name:<44} old {old:6.2f} us/ev   new {new:6.2f} us/ev   x{old / new:5.1f}")
    return {"old_us": round(old, 3), "new_us": round(new, 3), "ratio": round(old / new, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    n = args.num_events
    inter = load_interactions("ml-100k", n)
    events = [inter.event(i) for i in range(len(inter))]
    catalog = load_catalog("ml-100k", resolve_backbone_path(""),
                           Path(".promptrec/cache").resolve())
    items = list(catalog.index)
    known = frozenset(items)
    now = time.time()
    results = {}

    # --- decode -------------------------------------------------------------------
    keys = [e.user_id.encode() for e in events]
    values = [e.to_json() for e in events]
    poll = 2000

    def old_decode(vals):
        def run():
            for key, value in zip(keys, vals, strict=True):
                try:
                    decode_event(key, value, known, now)
                except InvalidEvent:
                    pass
        return run

    def new_decode(vals):
        def run():
            for i in range(0, n, poll):
                decode_batch(keys[i:i + poll], vals[i:i + poll], known, now)
        return run

    one_bad = list(values)
    for i in range(0, n, poll):
        one_bad[min(n - 1, i + 777)] = b"{not json"
    sorted_keys = [json.dumps(json.loads(v), sort_keys=True).encode() for v in values]
    for name, vals in [("decode, all valid", values), ("decode, 1 invalid per poll", one_bad),
                       ("decode, all valid, keys sorted (slow path)", sorted_keys)]:
        results[name] = report(name, best_us(old_decode(vals), n, args.repeat),
                               best_us(new_decode(vals), n, args.repeat))

    # --- shard apply ------------------------------------------------------------
    vectors = catalog.vectors.numpy()
    kafka_ms = int(now * 1000)  # every event records its latency, as in the pipeline
    shuffled_users = [e.user_id for e in events]
    random.Random(0).shuffle(shuffled_users)
    for name, users in [("shard apply, ML-100K time order", [e.user_id for e in events]),
                        ("shard apply, users shuffled", shuffled_users)]:
        rows = [(e.event_id, users[i], e.item_id, e.ts, e.type, e.value, 0, i, kafka_ms)
                for i, e in enumerate(events)]
        batches = [(rows[i:i + 1000], {0: ("E", i, min(n, i + 1000))})
                   for i in range(0, n, 1000)]
        columns = [(EventBatch.from_rows(b), r) for b, r in batches]

        def fresh() -> UserStateShard:
            shard = UserStateShard(0, StreamingSettings(), vectors, items)
            shard.apply([], {1: ("E", 0, 0)})  # imports the metrics module
            return shard

        def old_apply(batches=batches):
            shard = fresh()
            for batch, ranges in batches:
                apply_one_by_one(shard, batch, ranges)

        def new_apply(columns=columns):
            shard = fresh()
            for batch, ranges in columns:
                shard.apply(batch, ranges)

        results[name] = report(name, best_us(old_apply, n, args.repeat),
                               best_us(new_apply, n, args.repeat))

    # --- wire format ------------------------------------------------------------
    rows = [(e.event_id, e.user_id, e.item_id, e.ts, e.type, None, i % 4, i,
             1_700_000_000_000 + i) for i, e in enumerate(events)]
    chunks = [rows[i:i + 1000] for i in range(0, n, 1000)]
    as_columns = [EventBatch.from_rows(c) for c in chunks]
    results["pickle dumps+loads, per shard call"] = report(
        "pickle dumps+loads, per shard call",
        best_us(lambda: [pickle.loads(pickle.dumps(c, 5)) for c in chunks], n, args.repeat),
        best_us(lambda: [pickle.loads(pickle.dumps(c, 5)) for c in as_columns], n,
                args.repeat))
    return results


if __name__ == "__main__":
    main()
