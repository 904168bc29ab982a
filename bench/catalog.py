"""Catalog benchmark: new items live over Kafka, and the service at 100,000 items.

    make bench-catalog          # = .venv/bin/python -m bench.catalog [--rates ... ]

One run, one machine, two stacks (embedded broker, local Ray, Serve, shards):

1. ML-1M's catalog (3,883 items). New items are offered on `promptrec.items` at 100/s,
   each item in a category of its own, and a probe times sampled items from the record
   being sent to the first /recommend that returns it (bench.catalog_live); replicas
   report the same from their side (record timestamp -> rankable, every item, every
   replica). Then higher rates while p99 holds `--target-ms` (or lower ones until one
   does): the highest rate that held. Then /recommend latency for cache hits and misses,
   replica memory, and the swap time of a new prompt version.
2. A synthetic catalog of `--synthetic-items` generated texts: embedding throughput
   (a cold text-vector cache), then a stack on it and the same measurements, with new
   items offered at 100/s.

Writes bench/results/catalog.json. Timings are this machine's (2 shared cores here).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import ray
import torch

from bench.catalog_live import sweep
from bench.common import result_path, run_stamp, write_result
from bench.load import closed_loop, percentile
from services.backbone import resolve_backbone_path
from services.config import Settings
from services.config_sources import add_settings_flags, settings_from_flags
from services.decoded import decode_version
from services.embedded import free_port
from services.launch.stack import Stack
from services.vector_cache import TextVectors

# The live runs start this long after the stack is up: items reach a running service, not
# one in its first seconds (right after start-up the first items took up to ~0.9 s here,
# against ~0.3 s once it had run a while).
SETTLE_S = 10.0

WORDS = ["alpine", "amber", "brisk", "canvas", "cedar", "coastal", "copper", "desert",
         "ember", "fern", "granite", "harbor", "indigo", "juniper", "lunar", "maple",
         "meadow", "misty", "nordic", "ochre", "prairie", "quartz", "river", "sage",
         "slate", "solar", "spruce", "tidal", "tundra", "velvet", "willow", "zephyr"]
GOODS = ["jacket", "boot", "lamp", "kettle", "tent", "rope", "glove", "map", "mug", "saw",
         "stove", "pack", "bottle", "compass", "scarf", "hat", "sock", "chair", "cot", "net"]


def run_tag() -> str:
    """4 characters that differ between runs: every run's items are new texts (embedded,
    not read from the cache), and short, so an item stays ~20 tokens, as catalog items
    are (ML-1M's median is 14), rather than the 34 a nanosecond stamp made."""
    n, digits = int(time.time()) % 36**4, "0123456789abcdefghijklmnopqrstuvwxyz"
    return "".join(digits[n // 36**i % 36] for i in range(4))


def log(message: str) -> None:
    print(f"[bench.catalog] {message}", flush=True)


def synthetic_catalog(n: int, path: Path) -> list[str]:
    """Write `n` generated items as JSONL -> their documents (what the backbone reads)."""
    rows, texts = [], []
    for i in range(n):
        a, b, g = WORDS[i % 32], WORDS[(i // 32) % 32], GOODS[(i // 1024) % 20]
        title = f"{a.title()} {b} {g} no. {i}"
        description = f"A {a} {g} in {b} tones, series {i % 97}, for {GOODS[i % 20]} fans."
        rows.append({"item_id": f"syn-{i}", "title": title, "description": description,
                     "categories": [g, f"{a}-line"]})
        texts.append(f"{title}. {description} Categories: {g}, {a}-line.")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return texts


def embedding_throughput(texts: list[str], cache_dir: Path, backbone: Path) -> dict:
    shutil.rmtree(cache_dir, ignore_errors=True)  # cold: every text is embedded
    vectors = TextVectors(backbone, cache_dir)
    vectors.warm_up()
    started = time.perf_counter()
    vectors.embed(texts, progress=True)
    seconds = time.perf_counter() - started
    return {"items": len(texts), "seconds": round(seconds, 1),
            "items_embedded_per_s": round(len(texts) / seconds, 1)}


def replicas_version(stack: Stack) -> dict[str, dict]:
    """/version of every replica (polled until each has answered)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=stack.base_url, timeout=30) as http:
        while len(seen) < stack.settings.serving.num_replicas and time.monotonic() < deadline:
            body = http.get("/version").json()
            seen[body["replica"]] = body
    return seen


def request_latency(stack: Stack, seconds: float, concurrency: int) -> dict:
    """/recommend p50/p99: cache hits (a few users asked again and again) and misses
    (a new user each request: one backbone pass each)."""
    def hit(i: int):
        return "/recommend", {"user_id": f"regular-{i % 8}", "k": "10"}

    def miss(i: int):
        return "/recommend", {"user_id": f"newcomer-{time.time_ns()}-{i}", "k": "10"}

    out = {}
    for name, make in (("hit", hit), ("miss", miss)):
        results, elapsed = asyncio.run(closed_loop(stack.base_url, make, concurrency, seconds))
        ok = [r.latency_s * 1000 for r in results if r.status == 200]
        out[name] = {"requests": len(results), "ok": len(ok),
                     "ok_per_s": round(len(ok) / elapsed, 1),
                     "p50_ms": round(percentile(ok, 50), 1),
                     "p99_ms": round(percentile(ok, 99), 1)}
    return out


def swap_times(stack: Stack, swaps: int) -> dict:
    """Publish `swaps` new prompt versions (the soft prompt moved, every item row kept)
    -> publish-to-live on every replica and the replicas' own swap times."""
    serving = ray.get(stack.registry.serving.remote())
    base = decode_version(serving["version"], serving["blob"])
    live_ms, swap_ms = [], []
    for seed in range(swaps):
        noise = torch.randn(base.soft_prompt.shape,
                            generator=torch.Generator().manual_seed(seed)) * 0.01
        blob = dataclasses.replace(base, soft_prompt=base.soft_prompt + noise).to_bytes()
        version = ray.get(stack.registry.publish.remote(blob, {"source": "bench.catalog"}))
        live_ms += list(stack.wait_all_replicas(version, timeout_s=300).values())
        swap_ms += [v["swap_ms"] for v in replicas_version(stack).values()]
    return {"swaps": swaps, "blob_mb": round(len(blob) / 2**20, 1),
            "publish_to_all_live_p50_ms": round(percentile(live_ms, 50), 1),
            "publish_to_all_live_max_ms": round(max(live_ms), 1),
            "replica_swap_p50_ms": round(percentile(swap_ms, 50), 1)}


def measure(stack: Stack, args, rates: list[float], tag: str) -> dict:
    """Everything measured on one running stack."""
    items = stack.settings.items
    time.sleep(SETTLE_S)
    before = stack.streaming.stats()["items"]
    live = sweep(stack.base_url, stack.bootstrap, items.topic_items, args.rate, rates,
                 args.rate_seconds, args.probes_per_s, args.target_ms,
                 f"{tag[0]}{run_tag()}", log)
    live["item_consumer"] = consumer_work(before, stack.streaming.stats()["items"])
    log(f"{tag}: item consumer {live['item_consumer']}")
    versions = replicas_version(stack)
    replica_live = {r: v["item_live_ms"] for r, v in versions.items()}
    latency = request_latency(stack, args.latency_seconds, args.concurrency)
    log(f"{tag}: /recommend {latency}")
    swaps = swap_times(stack, args.swaps)
    log(f"{tag}: swaps {swaps}")
    versions = replicas_version(stack)
    return {"catalog_items": max(v["catalog_items"] for v in versions.values()),
            "live_items": live, "replica_item_live_ms": replica_live,
            "recommend": latency, "swap": swaps,
            "replica_memory_mb": max(v["rss_mb"] for v in versions.values())}


def consumer_work(before: dict, after: dict) -> dict:
    """Where the item consumer's time went over the live runs (its stats() twice)."""
    embedded = after["embedded"] - before["embedded"]
    embed_s = after["seconds"]["embed"] - before["seconds"]["embed"]
    return {"embedded": embedded, "embed_s": round(embed_s, 2),
            "apply_s": round(after["seconds"]["apply"] - before["seconds"]["apply"], 2),
            "catalog_versions": after["catalog_version"] - before["catalog_version"],
            "items_per_embed_s": round(embedded / embed_s, 1) if embed_s else None}


def run_stack(settings: Settings, args, rates: list[float], tag: str) -> dict:
    settings = settings.replace(http_port=free_port(), metrics_port=free_port())
    started = time.monotonic()
    stack = Stack(settings, progress=False).start(fresh=True)
    try:
        log(f"{tag}: stack up in {time.monotonic() - started:.0f} s")
        return measure(stack, args, rates, tag)
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catalog", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0,
                        help="new items/s offered first (the headline figure)")
    parser.add_argument("--rates", default="25,50,200,400",
                        help="other rates: higher ones while the target holds, else lower")
    parser.add_argument("--rate-seconds", type=float, default=15.0, help="seconds per rate")
    parser.add_argument("--probes-per-s", type=float, default=5.0,
                        help="offered items probed a second (one /recommend every 50 ms "
                             "asks for all of them)")
    parser.add_argument("--target-ms", type=float, default=1000.0,
                        help="p99 from record to recommendable that a rate must hold")
    parser.add_argument("--synthetic-items", type=int, default=100_000,
                        help="size of the generated catalog (0: skip that part)")
    parser.add_argument("--latency-seconds", type=float, default=15.0,
                        help="closed-loop /recommend seconds per case (hits, misses)")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    parser.add_argument("--swaps", type=int, default=3, help="prompt versions published")
    parser.add_argument("--out", default=str(result_path("catalog.json")))
    add_settings_flags(parser)
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    root = Path(".promptrec/bench-catalog").resolve()
    settings = settings_from_flags(args, env=os.environ, base={
        "data_dir": str(root), "namespace": "promptrec-bench-catalog", "dataset": "ml-1m",
        "train_every_events": 0, "num_consumers": 1})
    backbone = resolve_backbone_path(settings.model.backbone_path)

    sizes = {"ml-1m": run_stack(settings, args, rates, "ml1m")}
    embedding = None
    if args.synthetic_items:
        path = root / "synthetic" / "items.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        texts = synthetic_catalog(args.synthetic_items, path)
        cache = root / "synthetic" / "cache"
        embedding = embedding_throughput(texts, cache, backbone)
        log(f"embedding: {embedding}")
        synthetic = settings.replace(catalog=str(path), cache_dir=str(cache))
        sizes["synthetic"] = run_stack(synthetic, args, [], "syn")

    ml1m = sizes["ml-1m"]
    first = ml1m["live_items"]["runs"][0]  # at --rate
    big = sizes.get("synthetic", ml1m)
    result = {
        "new_item_live_p99_ms": first["p99_ms"],
        "new_item_live_p50_ms": first["p50_ms"],
        "new_item_live_offered_per_s": first["rate_items_per_s"],
        "new_item_live_max_rate_within_target": ml1m["live_items"]["max_rate_within_target"],
        "target_ms": args.target_ms,
        "items_embedded_per_s": embedding["items_embedded_per_s"] if embedding else None,
        "catalog_items": big["catalog_items"],
        "replica_memory_mb": big["replica_memory_mb"],
        "recommend_p99_ms": {name: {"hit": size["recommend"]["hit"]["p99_ms"],
                                    "miss": size["recommend"]["miss"]["p99_ms"]}
                             for name, size in sizes.items()},
        "embedding": embedding,
        "sizes": sizes,
        "settings": {k: settings.value(k) for k in ("num_replicas", "replica_cpus",
                                                    "item_batch_max", "num_shards")},
        **run_stamp("python -m bench.catalog " + " ".join(argv or sys.argv[1:]), load=True),
    }
    log(f"wrote {write_result(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
