"""What the live metrics count: an impression as read from its topic, and the tally of
attributed events of one (version, arm) or (experiment, arm)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Impression:
    request_id: str
    user_id: str
    items: tuple[str, ...]
    version: int
    arm: str
    ts: float
    experiment: str = ""  # the experiment the arm belongs to ("": none)
    query: str = ""  # what the request asked for ("": nothing)


def read_impression(value: bytes) -> Impression | None:
    """A record of the impressions topic, or None if it is not one (counted, skipped)."""
    try:
        body = json.loads(value)
        return Impression(str(body["request_id"]), str(body["user_id"]),
                          tuple(str(i) for i in body["items"]), int(body["prompt_version"]),
                          str(body["arm"]), float(body["ts"]), str(body.get("experiment", "")),
                          str(body.get("query") or ""))
    except (ValueError, TypeError, KeyError, RecursionError):
        return None


class Tally:
    """Attributed events of one (version, arm): count, hits, NDCG sum (and of squares)."""

    def __init__(self):
        self.events = self.hits = 0
        self.ndcg = self.ndcg_sq = 0.0

    def add(self, position: int | None) -> None:
        self.events += 1
        if position is not None:
            self.hits += 1
            gain = 1 / math.log2(position + 2)
            self.ndcg += gain
            self.ndcg_sq += gain * gain

    def summary(self) -> dict:
        n = self.events
        return {"events": n, "hits": self.hits, "hr": round(self.hits / n, 4) if n else None,
                "ndcg": round(self.ndcg / n, 4) if n else None}
