"""What a replica reports on GET /version: the versions it serves, its swap, cache,
encoder, canary, experiment and impression counters (docs/api.md lists the fields)."""

from __future__ import annotations

from services.health import process_rss_mb


def replica_status(replica) -> dict:
    """`replica`: a serving.app.Recommender (its prompts, cache, batcher, warmer, ...)."""
    prompts = replica.prompts
    active = prompts.active
    live = sorted(prompts.item_live_ms)
    return {"prompt_version": active.version if active else 0,
            "prompt_sha256": active.sha256 if active else None,
            "catalog_version": active.catalog_version if active else 0,
            "catalog_items": len(active.catalog.index) if active else 0,
            "item_live_ms": {"count": len(live),
                             "p50": live[len(live) // 2] if live else None,
                             "p99": live[int(len(live) * 0.99)] if live else None},
            "replica": replica.replica,
            "rss_mb": process_rss_mb(),
            "publish_to_live_ms": active.publish_to_live_ms if active else None,
            "swap_ms": active.swap_ms if active else None,
            "pinned": bool(replica.settings.serving.pin_version),
            "personal_prompts": replica.settings.serving.personal_prompts,
            "profiles": replica.settings.serving.profiles,
            "user_cache": {**replica.cache.counts, "size": len(replica.cache)},
            "encoded": dict(replica.batcher.counts),
            "swap_warmup": replica.warmer.status(),
            "canary": {"prompt_version": prompts.canary_slot.version,
                       "share": prompts.canary_share},
            "experiment": prompts.experiment.id if prompts.experiment else None,
            "impressions": dict(replica.impressions.counts) if replica.impressions else None}
