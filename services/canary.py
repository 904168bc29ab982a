"""The canary rules: which users a canary version serves, and when its live evidence is
enough to promote it or roll it back.

One home for both, so the replicas (which route requests) and the live-metrics actor
(which judges) can never disagree about them.

- **Arm of a user**: sticky by a hash of the user id (blake2b, the same in every process,
  unlike Python's `hash`): a user whose bucket is below `share` of 10,000 is in the
  canary arm, for as long as that canary runs.
- **Verdict**: the live HR@k of the two arms (attributed events whose item was in the
  user's served top-k, counted since the canary started) compared as two proportions,
  one-sided, at level `alpha` (normal approximation, pooled-free standard error):
  promote when the canary is shown *not worse than the serving version by more than
  `margin`* (non-inferiority); roll back when it is shown *worse* (at all); neither
  before both arms have `min_events`; at `max_events` a canary still undecided is rolled
  back ("inconclusive"): it never proved itself.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist

SERVING_ARM = "serving"
CANARY_ARM = "canary"
BUCKETS = 10_000


def user_bucket(user_id: str) -> int:
    """The user's bucket in [0, BUCKETS), stable across processes and restarts."""
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def arm_of(user_id: str, canary_share: float) -> str:
    return CANARY_ARM if user_bucket(user_id) < canary_share * BUCKETS else SERVING_ARM


@dataclass(frozen=True)
class ArmCounts:
    """Attributed events of one arm, and how many of them were hits (item in top-k)."""

    events: int = 0
    hits: int = 0

    @property
    def rate(self) -> float:
        return self.hits / self.events if self.events else 0.0


@dataclass(frozen=True)
class CanaryRule:
    min_events: int
    max_events: int
    margin: float
    alpha: float


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "promote" | "rollback" | "wait"
    reason: str
    z_not_worse: float | None = None  # statistic of the non-inferiority test
    z_worse: float | None = None  # statistic of the "canary is worse" test


def judge(canary: ArmCounts, serving: ArmCounts, rule: CanaryRule) -> Verdict:
    """Promote, roll back or wait, from the two arms' counts since the canary started."""
    if min(canary.events, serving.events) < rule.min_events:
        return Verdict("wait", f"{canary.events} canary / {serving.events} serving events; "
                               f"{rule.min_events} each needed")
    p_c, p_s = canary.rate, serving.rate
    variance = p_c * (1 - p_c) / canary.events + p_s * (1 - p_s) / serving.events
    # No variance (both arms all hits, or all misses): the difference is what it is.
    se = math.sqrt(variance) if variance > 0 else 1e-12
    critical = NormalDist().inv_cdf(1 - rule.alpha)
    z_not_worse = (p_c - p_s + rule.margin) / se
    z_worse = (p_c - p_s) / se
    figures = (f"live HR canary {p_c:.4f} ({canary.events} events) vs serving {p_s:.4f} "
               f"({serving.events})")
    if z_worse < -critical:
        return Verdict("rollback", f"worse: {figures}, z {z_worse:.2f} < -{critical:.2f}",
                       z_not_worse, z_worse)
    if z_not_worse > critical:
        return Verdict("promote", f"not worse by more than {rule.margin}: {figures}, "
                                  f"z {z_not_worse:.2f} > {critical:.2f}", z_not_worse, z_worse)
    if min(canary.events, serving.events) >= rule.max_events:
        return Verdict("rollback", f"inconclusive after {rule.max_events} events: {figures}",
                       z_not_worse, z_worse)
    return Verdict("wait", f"undecided: {figures}", z_not_worse, z_worse)
