"""Names and routing that several planes must agree on."""

from __future__ import annotations

import zlib

REGISTRY_ACTOR = "promptrec-registry"
LIVE_METRICS_ACTOR = "promptrec-live-metrics"
SERVE_APP = "promptrec"


def shard_actor(index: int) -> str:
    return f"promptrec-shard-{index}"


def shard_for_user(user_id: str, num_shards: int) -> int:
    """Stable across processes and restarts (unlike Python's salted hash())."""
    return zlib.crc32(user_id.encode("utf-8")) % num_shards
