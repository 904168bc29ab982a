"""Prequential evaluation (test-then-learn) of the running system.

    promptrec eval prequential --dataset ml-100k [--window 1000] [--sample-every 10]

The data set is replayed in timestamp order through Kafka into the running pipeline,
one window of `window` events at a time:

1. **test**: for every sampled event of the window, each arm is asked for the top-10 of
   the event's user; HR@10 and NDCG@10 against the event's item;
2. **learn**: the window's events are produced to Kafka and the evaluator waits until
   the shards applied all of them (user history and personal prompts change); the
   popularity arms count them; a training round runs once `train_every_events` new
   events arrived since the last one, and the next window is tested only after every
   replica that follows the registry serves what the round published.

So a query sees every event before its window and nothing from its window or later:
state is at most one window stale. Every answer names the `state_version` it used
(events applied for that user); the evaluator checks it against the number of the
user's events produced before the window (`leak_check`: `ahead` must be 0).

Arms, all answering over the same replay in the same run:

- `popularity`: running counts of every event learned so far, ties broken by catalog
  order; the user's last `history_len` items are masked, as serving masks them;
- `recent_popularity`: the same, but counting only the last `recent_window` learned
  events (a sliding window by event count; `--recent-window`, default 5000);
- `static`: a second Serve app pinned to the initial prompt version, personal prompts
  off (it still reads the user's history from the shards: the model is static, its
  input is not);
- `online`: the main app: follows every published version, personal prompts on;
- optional ablations: `rounds_only` (follows rounds, no personal prompts) and
  `personal_only` (initial prompt, personal prompts on);
- with `--user-text` (a run whose versions read the users' profiles, published before
  the replay): `no_profiles`, the main app's versions reading no profile, so the
  `new_users` segment shows what a profile is worth before a user's first click.

Training rounds run between windows, paused replay, on the event-count trigger
(`train_every_events`; `train_every_s` means nothing for a replay faster than real
time): in production a round runs beside the stream and its version goes live some
events later; here it goes live at the window boundary, which keeps the result
independent of the machine's speed.

This module is the protocol (pure, tested without infrastructure);
`bench/prequential_baselines.py` holds the two popularity arms, `bench/prequential_run.py`
runs it on the real system, `bench/prequential_report.py` builds the result file and its
plot.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bench.prequential_baselines import Answer, PopularityArm, RecentPopularityArm
from services.events import ClickEvent
from services.rank_metrics import K, hit_ndcg

# name -> settings of its Serve app; None = the main app (everything on).
# "pin_version" True is replaced by the initial prompt version at run time.
MODEL_ARMS: dict[str, dict | None] = {
    "static": {"pin_version": True, "personal_prompts": False},
    "online": None,
    "rounds_only": {"personal_prompts": False},
    "personal_only": {"pin_version": True},
    # With --user-text: the main app's versions, every user read as if without a profile.
    "no_profiles": {"profiles": False},
}
PROFILE_ARMS = ("no_profiles",)  # need a user_text run (--user-text), with profiles
BASELINE_ARMS = (PopularityArm.name, RecentPopularityArm.name)  # answered by the evaluator
ALL_ARMS = (*BASELINE_ARMS, *MODEL_ARMS)
DEFAULT_ARMS = (*BASELINE_ARMS, "static", "online")


def check_arms(arms: Sequence[str], user_text: bool) -> None:
    """Raise ValueError, naming them, for arms that do not exist or cannot run here."""
    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown or not arms:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ALL_ARMS)}")
    if not user_text and any(a in PROFILE_ARMS for a in arms):
        raise ValueError(f"arms {list(PROFILE_ARMS)} compare reading profiles or not: they "
                         "need a run whose versions read them (--user-text)")


class Arm(Protocol):
    name: str

    def recommend(self, users: list[str], k: int) -> dict[str, Answer]: ...


@dataclass(frozen=True)
class SampleRule:
    """Which events are evaluated: every `every`-th event (by replay position) after a
    warm-up of the first `warmup` share of the replay, which is learned but not tested."""

    every: int = 10
    warmup: float = 0.1

    def first(self, n_events: int) -> int:
        return int(n_events * self.warmup)

    def __call__(self, position: int, n_events: int) -> bool:
        first = self.first(n_events)
        return position >= first and (position - first) % self.every == 0

    def describe(self) -> str:
        return (f"1 event in {self.every} in replay order (positions w, w+{self.every}, ...) "
                f"after a warm-up w = the first {self.warmup:.0%} of the replay (learned, "
                f"not tested)")


@dataclass
class Tally:
    n: int = 0
    hits: float = 0.0
    ndcg: float = 0.0

    def add(self, hit: float, ndcg: float) -> None:
        self.n += 1
        self.hits += hit
        self.ndcg += ndcg

    def merge(self, other: Tally) -> None:
        self.n += other.n
        self.hits += other.hits
        self.ndcg += other.ndcg

    def summary(self) -> dict:
        return {"hr10": round(self.hits / self.n, 4) if self.n else None,
                "ndcg10": round(self.ndcg / self.n, 4) if self.n else None,
                "events_evaluated": self.n}


@dataclass
class LeakCheck:
    """Per answer: the arm's state_version for the user against the user's events learned
    before the window. `ahead` > 0 means a prediction saw its own window (a leak);
    `behind` > 0 means state older than the window start (stale, not a leak)."""

    answers: int = 0
    ahead: int = 0
    behind: int = 0

    def check(self, state_version: int, learned_before: int) -> None:
        self.answers += 1
        self.ahead += state_version > learned_before
        self.behind += state_version < learned_before

    def to_dict(self) -> dict:
        return {"answers": self.answers, "ahead": self.ahead, "behind": self.behind}


# Sampled events by what the arms knew of their user: nothing ("new_users": the user's
# first events, answered from the shared prompt alone) or at least one earlier event.
SEGMENTS = ("new_users", "returning_users")


@dataclass
class Evaluation:
    totals: dict[str, Tally]
    leaks: dict[str, LeakCheck]
    segments: dict[str, dict[str, Tally]] = field(default_factory=dict)  # arm -> segment
    windows: list[dict] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)  # "test:<arm>" and "learn"
    profile_reads: Counter = field(default_factory=Counter)  # arm -> answers that read one


def run_windows(events: Sequence[ClickEvent], arms: Sequence[Arm],
                learn: Callable[[Sequence[ClickEvent]], None], window: int,
                sample: SampleRule, k: int = K, learn_first: bool = False,
                on_window: Callable[[dict], None] | None = None,
                on_answers: Callable[[str, list[ClickEvent], dict[str, Answer]], None]
                | None = None) -> Evaluation:
    """The prequential loop: per window, test every arm on the sampled events, then
    `learn(window events)` (the system, and every arm, takes them). `on_answers(arm,
    sampled events, answers by user)` sees each arm's answers before the window is
    learned (the canary drive quotes the online arm's request ids in the events).

    `learn_first=True` is the wrong order (learn, then test): it exists so a test can
    show that the leak check and the scores catch it. Never use it for a result.
    """
    n = len(events)
    totals = {arm.name: Tally() for arm in arms}
    leaks = {arm.name: LeakCheck() for arm in arms}
    learned = Counter()  # user -> events learned before the current window
    evaluation = Evaluation(totals, leaks,
                            {arm.name: {seg: Tally() for seg in SEGMENTS} for arm in arms})
    for start in range(0, n, window):
        batch = events[start:start + window]
        targets = [e for j, e in enumerate(batch) if sample(start + j, n)]
        if learn_first:
            learn(batch)
        row = {"window": len(evaluation.windows), "first_event": start, "events": len(batch),
               "ts_start": batch[0].ts, "ts_end": batch[-1].ts, "evaluated": len(targets),
               "arms": {}}
        if targets:
            users = list(dict.fromkeys(e.user_id for e in targets))
            for arm in arms:
                t = time.monotonic()
                answers = arm.recommend(users, k)
                evaluation.seconds[f"test:{arm.name}"] += time.monotonic() - t
                if on_answers:
                    on_answers(arm.name, targets, answers)
                tally = Tally()
                for event in targets:
                    scores = hit_ndcg(answers[event.user_id].items, event.item_id, k)
                    tally.add(*scores)
                    segment = SEGMENTS[learned[event.user_id] > 0]
                    evaluation.segments[arm.name][segment].add(*scores)
                for user in users:
                    leaks[arm.name].check(answers[user].state_version, learned[user])
                    evaluation.profile_reads[arm.name] += answers[user].read_profile
                totals[arm.name].merge(tally)
                versions = sorted({a.prompt_version for a in answers.values()
                                   if a.prompt_version is not None})
                row["arms"][arm.name] = {**tally.summary(), "prompt_versions": versions}
        if not learn_first:
            t = time.monotonic()
            learn(batch)
            evaluation.seconds["learn"] += time.monotonic() - t
        learned.update(e.user_id for e in batch)
        evaluation.windows.append(row)
        if on_window:
            on_window(row)
    return evaluation


class ServiceArm:
    """An arm answered by a Serve app over HTTP: GET <base_url>/recommend, concurrently."""

    def __init__(self, name: str, base_url: str, concurrency: int = 8, timeout_s: float = 120,
                 attempts: int = 10):
        self.name, self.base_url = name, base_url
        self.concurrency, self.timeout_s, self.attempts = concurrency, timeout_s, attempts

    def recommend(self, users: list[str], k: int) -> dict[str, Answer]:
        return asyncio.run(self._recommend(users, k))

    async def _recommend(self, users: list[str], k: int) -> dict[str, Answer]:
        import httpx

        limit = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s) as http:

            async def one(user: str) -> tuple[str, Answer]:
                async with limit:
                    for _ in range(self.attempts):
                        try:
                            response = await http.get("/recommend",
                                                      params={"user_id": user, "k": k})
                        except httpx.TransportError:  # a dropped connection: ask again
                            await asyncio.sleep(1.0)
                            continue
                        if response.status_code == 503:  # overload or a shard restarting
                            await asyncio.sleep(float(response.headers.get("Retry-After", 1)))
                            continue
                        response.raise_for_status()
                        body = response.json()
                        return user, Answer([i["item_id"] for i in body["items"]],
                                            body["state_version"], body["prompt_version"],
                                            body.get("request_id", ""),
                                            body.get("user_text", {}).get("profile", False))
                raise RuntimeError(f"{self.name}: no answer for {user!r} in {self.attempts} tries")

            return dict(await asyncio.gather(*(one(u) for u in users)))
