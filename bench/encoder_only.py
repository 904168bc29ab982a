"""The replicas' batched user encoder alone, without Serve, HTTP, shards or ranking: the
ceiling that `/nocache` (every request a cache miss) is measured against in serve.json.

The serving version is built as a replica builds it (`serving.slot.PromptSlot` on the
stack's catalog), the pool users' histories and personal prompts are read once from
their shards, and `encoders` threads (one per replica, torch on one thread as in a
replica; its ops release the GIL) each encode batches of `batch_size` users, the
batch size the replicas formed under the closed loop, for `seconds`.
"""

from __future__ import annotations

import threading
import time

import ray
import torch

from services.backbone import load_backbone, resolve_backbone_path
from services.decoded import decode_version
from services.naming import shard_actor, shard_for_user
from serving.ranking import encode_histories
from serving.slot import PromptSlot


def encoder_only(stack, pool: list[str], encoders: int, batch_size: int,
                 seconds: float) -> dict:
    """-> {"encoder_only_rps": users encoded per second over all encoders, ...}."""
    settings, catalog = stack.settings, stack.catalogs.catalog
    _, encoder = load_backbone(resolve_backbone_path(settings.model.backbone_path))
    entry = ray.get(stack.registry.serving.remote())
    slot = PromptSlot(encoder)
    slot.load(entry, decode_version(entry["version"], entry["blob"], catalog.vectors.shape[1]),
              catalog, time.perf_counter(), None)
    active, shards = slot.active, settings.streaming.num_shards
    states = ray.get([ray.get_actor(shard_actor(shard_for_user(user, shards)),
                                    namespace=settings.infra.namespace).get_user.remote(user)
                      for user in pool])
    users = [(catalog.indices(s["history"]), s.get("personal")
              if settings.serving.personal_prompts else None) for s in states if s]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    counts = [0] * encoders
    deadline = time.perf_counter() + seconds

    def run(worker: int) -> None:
        at = worker * batch_size
        while time.perf_counter() < deadline:
            batch = [users[(at + i) % len(users)] for i in range(batch_size)]
            at += batch_size * encoders
            encode_histories(active.model, active.items, [h for h, _ in batch],
                             [p for _, p in batch])
            counts[worker] += batch_size

    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(w,)) for w in range(encoders)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - started
    return {"encoder_only_rps": round(sum(counts) / elapsed, 1), "encoders": encoders,
            "batch_size": batch_size, "seconds": round(elapsed, 1), "users": len(users)}
