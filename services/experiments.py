"""Experiments: users split by hash between kept prompt versions, or a version and a
popularity arm, and each arm's live metrics with confidence intervals.

One home for the rules the registry (which stores an experiment), the replicas (which
route by it) and the live-metrics actor (which counts its arms) share:

- **arms**: 2 to MAX_ARMS, each a `name`, a `version` (a kept prompt version, or
  "popularity": the most clicked items, counted live) and a `share`; the shares add up
  to 1, so everyone is in the experiment while it runs.
- **routing**: sticky by a blake2b hash of the experiment id and the user id, so each
  experiment draws its own split (a user's arm in one says nothing about the next) and
  every process agrees on it.
- **intervals**: live HR is a proportion (Wilson score interval); live NDCG a mean of
  per-event gains in [0, 1] (normal interval from their variance).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Any

from services.canary import BUCKETS, CANARY_ARM, SERVING_ARM, user_bucket

POPULARITY = "popularity"
MAX_ARMS = 8
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
RESERVED = (SERVING_ARM, CANARY_ARM)  # the canary's arm names
CONFIDENCE = 0.95


class BadExperiment(ValueError):
    """An experiment request that cannot run; the message says why."""


class ExperimentRunning(BadExperiment):
    """Another experiment runs: one at a time."""


@dataclass(frozen=True)
class Arm:
    name: str
    version: int  # 0: the popularity arm
    share: float

    @property
    def popularity(self) -> bool:
        return self.version == 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": POPULARITY if self.popularity else self.version,
                "share": self.share}


def parse_arms(raw: Any, kept: set[int]) -> tuple[Arm, ...]:
    """The `arms` of a request body -> arms; BadExperiment naming what is wrong.
    `kept`: the registry's versions (an arm's version must be one of them)."""
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_ARMS:
        raise BadExperiment(f"arms must be a list of 2 to {MAX_ARMS} arms")
    arms = []
    for i, arm in enumerate(raw):
        if not isinstance(arm, dict) or set(arm) != {"name", "version", "share"}:
            raise BadExperiment(f"arms[{i}] must be an object with name, version and share")
        name, version, share = arm["name"], arm["version"], arm["share"]
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in RESERVED:
            raise BadExperiment(f"arms[{i}].name must be 1-32 of a-z 0-9 _ - (starting with a "
                                f"letter or digit), not {', '.join(RESERVED)}")
        if version == POPULARITY:
            version = 0
        elif isinstance(version, bool) or not isinstance(version, int) or version not in kept:
            raise BadExperiment(f"arms[{i}].version must be {POPULARITY!r} or a kept prompt "
                                f"version ({sorted(kept)[-20:]})")
        if isinstance(share, bool) or not isinstance(share, int | float) or \
                not 0 < share <= 1 or not math.isfinite(share):
            raise BadExperiment(f"arms[{i}].share must be a number in (0, 1]")
        arms.append(Arm(name, version, float(share)))
    if len({a.name for a in arms}) != len(arms):
        raise BadExperiment("arm names must differ")
    if abs(sum(a.share for a in arms) - 1) > 1e-6:
        raise BadExperiment(f"arm shares must add up to 1, not {sum(a.share for a in arms):g}")
    return tuple(arms)


def arm_for(experiment_id: str, user_id: str, arms: tuple[Arm, ...]) -> Arm:
    """The user's arm: its bucket (of this experiment's own hash) in the arms' cumulative
    shares, in the order the arms were given."""
    point = (user_bucket(f"{experiment_id}\x00{user_id}") + 0.5) / BUCKETS
    upper = 0.0
    for arm in arms:
        upper += arm.share
        if point < upper:
            return arm
    return arms[-1]  # rounding of the shares' sum


@dataclass(frozen=True)
class Experiment:
    id: str
    arms: tuple[Arm, ...]
    started: float
    stopped: float | None = None
    reason: str = ""  # why it stopped

    @property
    def running(self) -> bool:
        return self.stopped is None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "arms": [a.to_dict() for a in self.arms],
                "running": self.running}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Experiment:
        arms = tuple(Arm(a["name"], 0 if a["version"] == POPULARITY else int(a["version"]),
                         float(a["share"])) for a in data["arms"])
        return cls(data["id"], arms, data["started"], data.get("stopped"),
                   data.get("reason", ""))


def _z() -> float:
    return NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)


def wilson(hits: int, n: int) -> tuple[float, float] | None:
    """The CONFIDENCE Wilson score interval of a proportion hits / n (None when n = 0)."""
    if n <= 0:
        return None
    z, p = _z(), hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def mean_interval(total: float, total_sq: float, n: int) -> tuple[float, float] | None:
    """The CONFIDENCE normal interval of a mean of values in [0, 1] from their sum and sum
    of squares (None when n < 2: no variance to go on)."""
    if n < 2:
        return None
    mean = total / n
    variance = max(0.0, (total_sq - n * mean * mean) / (n - 1))
    half = _z() * math.sqrt(variance / n)
    return round(max(0.0, mean - half), 4), round(min(1.0, mean + half), 4)


def report(experiment: dict[str, Any], tallies: dict[str, dict] | None) -> dict[str, Any]:
    """An experiment (`Experiment.to_dict`) with each arm's live figures: attributed
    `events`, `hr` and `ndcg` with CONFIDENCE intervals. `tallies`: per arm name the
    live-metrics counts (events, hits, ndcg, ndcg_sq); None when they are unavailable."""
    arms = []
    for arm in experiment["arms"]:
        t = (tallies or {}).get(arm["name"], {})
        n, hits = t.get("events", 0), t.get("hits", 0)
        arms.append({**arm, "events": n, "hits": hits,
                     "hr": round(hits / n, 4) if n else None, "hr_ci": wilson(hits, n),
                     "ndcg": round(t.get("ndcg", 0.0) / n, 4) if n else None,
                     "ndcg_ci": mean_interval(t.get("ndcg", 0.0), t.get("ndcg_sq", 0.0), n)})
    return {**experiment, "arms": arms, "confidence": CONFIDENCE,
            "live_metrics": tallies is not None}


class UnknownExperiment(KeyError):
    pass


class ExperimentBook:
    """The registry's experiments: every one kept, at most one running (`running`)."""

    def __init__(self):
        self.all: dict[str, Experiment] = {}
        self.running: Experiment | None = None

    def load(self, entries: list[dict[str, Any]], kept: set[int]) -> None:
        """From the registry's index; a running one whose version was refused stops."""
        for entry in entries:
            experiment = Experiment.from_dict(entry)
            if experiment.running and not all(a.popularity or a.version in kept
                                              for a in experiment.arms):
                experiment = replace(experiment, stopped=time.time(),
                                     reason="a version of it was refused on load")
            self.all[experiment.id] = experiment
            self.running = experiment if experiment.running else self.running

    def to_list(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.all.values()]

    def start(self, arms: Any, kept: set[int]) -> Experiment:
        if self.running is not None:
            raise ExperimentRunning(f"experiment {self.running.id} is running; stop it first")
        experiment = Experiment(f"exp{len(self.all) + 1}", parse_arms(arms, kept), time.time())
        self.all[experiment.id] = self.running = experiment
        return experiment

    def stop(self, experiment_id: str, reason: str) -> tuple[Experiment, bool]:
        """-> (the experiment, whether it was running until now)."""
        experiment = self.get(experiment_id)
        if not experiment.running:
            return experiment, False
        self.all[experiment_id] = experiment = replace(experiment, stopped=time.time(),
                                                       reason=reason)
        self.running = None
        return experiment, True

    def get(self, experiment_id: str) -> Experiment:
        if experiment_id not in self.all:
            raise UnknownExperiment(f"no experiment {experiment_id[:40]!r}; known: "
                                    f"{sorted(self.all)[-20:]}")
        return self.all[experiment_id]
