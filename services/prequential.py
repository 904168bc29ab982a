"""Prequential evaluation (test-then-learn) of the running system.

    promptrec eval prequential --dataset ml-100k [--window 1000] [--sample-every 10]

The data set is replayed in timestamp order through Kafka into the running pipeline,
one window of `window` events at a time:

1. **test**: for every sampled event of the window, each arm is asked for the top-10 of
   the event's user; HR@10 and NDCG@10 against the event's item;
2. **learn**: the window's events are produced to Kafka and the evaluator waits until
   the shards applied all of them (user history and personal prompts change); the
   popularity counts take them; a training round runs once `train_every_events` new
   events arrived since the last one, and the next window is tested only after every
   replica that follows the registry serves what the round published.

So a query sees every event before its window and nothing from its window or later:
state is at most one window stale. Every answer names the `state_version` it used
(events applied for that user); the evaluator checks it against the number of the
user's events produced before the window (`leak_check`: `ahead` must be 0).

Arms, all answering over the same replay in the same run:

- `popularity`: running counts of every event learned so far, ties broken by catalog
  order; the user's last `history_len` items are masked, as serving masks them;
- `static`: a second Serve app pinned to the initial prompt version, personal prompts
  off (it still reads the user's history from the shards: the model is static, its
  input is not);
- `online`: the main app: follows every published version, personal prompts on;
- optional ablations: `rounds_only` (follows rounds, no personal prompts) and
  `personal_only` (initial prompt, personal prompts on).

Training rounds run between windows, paused replay, on the event-count trigger
(`train_every_events`; `train_every_s` means nothing for a replay faster than real
time): in production a round runs beside the stream and its version goes live some
events later; here it goes live at the window boundary, which keeps the result
independent of the machine's speed.

Writes bench/results/prequential_<dataset>.json and a PNG of HR@10 per window.
This module is an entry point like `stack`: it imports the planes (lazily).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import platform
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from services.events import ClickEvent

log = logging.getLogger("promptrec")

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
K = 10

# name -> settings of its Serve app; None = the main app (everything on).
# "pin_version" True is replaced by the initial prompt version at run time.
MODEL_ARMS: dict[str, dict | None] = {
    "static": {"pin_version": True, "personal_prompts": False},
    "online": None,
    "rounds_only": {"personal_prompts": False},
    "personal_only": {"pin_version": True},
}
ALL_ARMS = ("popularity", *MODEL_ARMS)
DEFAULT_ARMS = ("popularity", "static", "online")


# --- the protocol (pure: tested without any infrastructure) ------------------------------
@dataclass(frozen=True)
class Answer:
    items: list[str]  # ranked item ids, best first
    state_version: int  # events of this user the arm had learned when it answered
    prompt_version: int | None = None


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


def hit_ndcg(ranked: Sequence[str], target: str, k: int = K) -> tuple[float, float]:
    """HR@k and NDCG@k of one event (one relevant item)."""
    top = list(ranked[:k])
    if target not in top:
        return 0.0, 0.0
    return 1.0, 1.0 / math.log2(top.index(target) + 2)


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


@dataclass
class Evaluation:
    totals: dict[str, Tally]
    leaks: dict[str, LeakCheck]
    windows: list[dict] = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)  # "test:<arm>" and "learn"


def run_windows(events: Sequence[ClickEvent], arms: Sequence[Arm],
                learn: Callable[[Sequence[ClickEvent]], None], window: int,
                sample: SampleRule, k: int = K, learn_first: bool = False,
                on_window: Callable[[dict], None] | None = None) -> Evaluation:
    """The prequential loop: per window, test every arm on the sampled events, then
    `learn(window events)` (the system, and every arm, takes them).

    `learn_first=True` is the wrong order (learn, then test): it exists so a test can
    show that the leak check and the scores catch it. Never use it for a result.
    """
    n = len(events)
    totals = {arm.name: Tally() for arm in arms}
    leaks = {arm.name: LeakCheck() for arm in arms}
    learned = Counter()  # user -> events learned before the current window
    evaluation = Evaluation(totals, leaks)
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
                tally = Tally()
                for event in targets:
                    tally.add(*hit_ndcg(answers[event.user_id].items, event.item_id, k))
                for user in users:
                    leaks[arm.name].check(answers[user].state_version, learned[user])
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


class PopularityArm:
    """Running item counts over every event learned so far; each user's last
    `history_len` items (by event time, as the shards keep them) are masked."""

    name = "popularity"

    def __init__(self, item_ids: Sequence[str], history_len: int):
        self.item_ids = list(item_ids)
        self.position = {item: i for i, item in enumerate(self.item_ids)}
        self.history_len = history_len
        self.counts = np.zeros(len(self.item_ids), np.int64)
        self.history: dict[str, list[tuple[float, str, str]]] = {}
        self.learned = Counter()
        self._ranked: list[str] | None = None

    def learn(self, batch: Sequence[ClickEvent]) -> None:
        for event in batch:
            index = self.position.get(event.item_id)
            if index is None:  # unknown items are dead-lettered by the pipeline too
                continue
            self.counts[index] += 1
            history = self.history.setdefault(event.user_id, [])
            bisect.insort(history, (event.ts, event.event_id, event.item_id))
            if len(history) > self.history_len:
                del history[0]
            self.learned[event.user_id] += 1
        self._ranked = None

    def ranked(self) -> list[str]:
        """Every item, most counted first; ties in catalog order."""
        if self._ranked is None:
            order = np.lexsort((np.arange(len(self.counts)), -self.counts))
            self._ranked = [self.item_ids[i] for i in order]
        return self._ranked

    def recommend(self, users: list[str], k: int) -> dict[str, Answer]:
        ranked = self.ranked()
        out = {}
        for user in users:
            seen = {item for _, _, item in self.history.get(user, ())}
            top: list[str] = []
            for item in ranked:
                if item not in seen:
                    top.append(item)
                    if len(top) == k:
                        break
            out[user] = Answer(top, self.learned[user])
        return out


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
                                            body["state_version"], body["prompt_version"])
                raise RuntimeError(f"{self.name}: no answer for {user!r} in {self.attempts} tries")

            return dict(await asyncio.gather(*(one(u) for u in users)))


# --- the result file, the plot, the README table --------------------------------------------
def build_result(evaluation: Evaluation, **meta) -> dict:
    return {**meta,
            "arms": {name: t.summary() for name, t in evaluation.totals.items()},
            "leak_check": {name: c.to_dict() for name, c in evaluation.leaks.items()},
            "phase_seconds": {name: round(v, 1) for name, v in evaluation.seconds.items()},
            "windows": evaluation.windows}


def markdown_table(result: dict) -> str:
    lines = ["| arm | HR@10 | NDCG@10 | events evaluated |", "|---|---|---|---|"]
    for name, arm in result["arms"].items():
        lines.append(f"| {name} | {arm['hr10']} | {arm['ndcg10']} | {arm['events_evaluated']:,} |")
    return "\n".join(lines)


def smoothed_hr(windows: list[dict], arm: str, span: int) -> list[float]:
    """HR@10 over the last `span` windows that had sampled events (hits / evaluated),
    one value per such window."""
    hits = [w["arms"][arm]["hr10"] * w["arms"][arm]["events_evaluated"] for w in windows]
    counts = [w["arms"][arm]["events_evaluated"] for w in windows]
    out = []
    for i in range(len(windows)):
        lo = max(0, i - span + 1)
        out.append(sum(hits[lo:i + 1]) / max(1, sum(counts[lo:i + 1])))
    return out


def plot(result: dict, path: Path, span: int = 10) -> Path:
    """HR@10 per arm over the replay (mean over the last `span` windows: one window alone
    holds few sampled events); dotted lines where a round published a version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = [w for w in result["windows"] if w["arms"]]
    x = [(w["first_event"] + w["events"]) / 1000 for w in windows]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    styles = {"rounds_only": "--", "personal_only": "--"}  # ablations: dashed
    for name, total in result["arms"].items():
        ax.plot(x, smoothed_hr(windows, name, span), linestyle=styles.get(name, "-"),
                linewidth=1.6, label=f"{name} (total HR@10 {total['hr10']})")
    for i, r in enumerate(r for r in result["rounds"] if r["outcome"] == "published"):
        ax.axvline(r["after_events"] / 1000, color="grey", linestyle=":", linewidth=1,
                   label="round published" if i == 0 else None)
    ax.set_xlabel("events replayed (thousands)")
    ax.set_ylabel(f"HR@10, last {span} windows ({span * result['window_events']:,} events)")
    sample = result["sample"]
    ax.set_title(f"Prequential HR@10, {result['dataset']}, {result['events_replayed']:,} events "
                 f"in windows of {result['window_events']:,}; 1 event in {sample.get('every')} "
                 f"tested after a {sample.get('warmup', 0):.0%} warm-up", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --- the run on the real system ----------------------------------------------------------------
def run_prequential(settings, window: int = 1000, sample: SampleRule | None = None,
                    arms: Sequence[str] = DEFAULT_ARMS, max_events: int | None = None,
                    out: Path | None = None, plot_path: Path | None = None,
                    concurrency: int = 8, command: str = "", progress: bool = True) -> dict:
    """Start the stack (embedded defaults, or the given Kafka/Ray), deploy one Serve app
    per model arm, replay, evaluate; write the result file and the plot."""
    import ray

    from services.data import load_interactions
    from services.stack import Stack
    from streaming.replay import make_producer, send_events
    from training.scheduler import RoundScheduler

    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ALL_ARMS)}")
    sample = sample or SampleRule()
    started = time.monotonic()
    dataset = settings.infra.dataset
    interactions = load_interactions(dataset, limit=max_events)
    events = [interactions.event(i, dataset) for i in range(len(interactions))]
    stack = Stack(settings, progress=progress)
    try:
        stack.start(fresh=True)
        initial = ray.get(stack.registry.serving_version.remote())
        popularity = PopularityArm([item.item_id for item in stack.catalog.items],
                                   settings.streaming.history_len)
        arm_objects, arm_apps, follow_prefixes = _deploy_arms(stack, arms, popularity,
                                                              initial, concurrency)
        producer = make_producer(stack.bootstrap)
        scheduler = RoundScheduler(stack.runner, settings, lambda: 0)  # for its due() rule
        baseline = stack.streaming.stats()["handled"]
        state = {"produced": 0, "since_round": 0}
        rounds: list[dict] = []

        def run_round() -> None:
            _wait_logged(settings, stack.streaming.stats()["totals"].get("ok", 0))
            done = stack.runner.run()
            live = {}  # route -> {replica: publish -> live ms}
            if done.version:
                for prefix in follow_prefixes:
                    live[prefix or "/"] = stack.wait_all_replicas(done.version, prefix=prefix)
            rounds.append({"after_events": state["produced"], "outcome": done.outcome,
                           "reason": done.reason, "version": done.version, "loss": done.loss,
                           "train_examples": done.train_examples,
                           "candidate_ndcg10": done.candidate_ndcg10,
                           "serving_ndcg10": done.serving_ndcg10,
                           "seconds": round(done.seconds, 1), "publish_to_live_ms": live})
            log.info("round %d after %d events: %s %s (%.0f s)", done.round,
                     state["produced"], done.outcome, done.reason, done.seconds)

        def learn(batch: Sequence[ClickEvent]) -> None:
            send_events(producer, settings.streaming.topic_clicks, batch)
            state["produced"] += len(batch)
            expected = baseline + state["produced"]
            handled = stack.wait_handled(expected, timeout_s=600)["handled"]
            if handled < expected:
                raise TimeoutError(f"the pipeline handled {handled} of {expected} records")
            popularity.learn(batch)
            state["since_round"] += len(batch)
            if (state["produced"] < len(events) and follow_prefixes
                    and scheduler.due(state["since_round"], 0.0)):
                run_round()
                state["since_round"] = 0

        replay_started = time.monotonic()

        def on_window(row: dict) -> None:
            if row["window"] % 10 == 0 or row["first_event"] + row["events"] >= len(events):
                scores = ", ".join(f"{name} {arm['hr10']}" for name, arm in row["arms"].items())
                log.info("window %d: %d/%d events, HR@10 %s (%.0f s)", row["window"],
                         row["first_event"] + row["events"], len(events), scores or "-",
                         time.monotonic() - replay_started)

        evaluation = run_windows(events, arm_objects, learn, window, sample, on_window=on_window)
        producer.close()
        result = build_result(
            evaluation, dataset=dataset, events_replayed=len(events),
            events_in_dataset=len(load_interactions(dataset)) if max_events else len(events),
            window_events=window, k=K,
            sample={"rule": sample.describe(), "every": sample.every, "warmup": sample.warmup,
                    "first_evaluated_event": sample.first(len(events))},
            initial_prompt_version=initial,
            arm_apps=arm_apps,
            rounds=rounds,
            rounds_published=sum(r["outcome"] == "published" for r in rounds),
            settings={name: getattr(settings, name) for name in (
                "train_every_events", "train_steps", "train_workers", "batch_size",
                "learning_rate", "gate_margin", "val_users", "history_len", "personal_alpha",
                "num_replicas", "num_shards", "num_consumers", "partitions")},
            protocol=("test-then-learn per window: every arm answers the sampled events of a "
                      "window from state built on the events before it; then the window is "
                      "produced to Kafka and applied (and counted by popularity); rounds run "
                      "between windows on the train_every_events trigger"),
            wall_seconds=round(time.monotonic() - started, 1),
            machine=f"{platform.machine()}, {_cpu_count()} cores",
            command=command,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    finally:
        stack.stop()
    out = out or RESULTS_DIR / f"prequential_{dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_path = plot_path or out.with_suffix(".png")
    result["plot"] = plot_path.name
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, plot_path)
    return result


def _deploy_arms(stack, arms: Sequence[str], popularity: PopularityArm, initial: int,
                 concurrency: int) -> tuple[list, dict[str, dict], list[str]]:
    """One arm object per name; a Serve app beside the main one for each model arm other
    than `online`. -> (arms, {name: what its app runs}, route prefixes that follow rounds)."""
    objects: list = []
    apps: dict[str, dict] = {}
    follow: list[str] = []
    for name in arms:
        if name == "popularity":
            objects.append(popularity)
            continue
        changes = MODEL_ARMS[name]
        prefix = "" if changes is None else f"/{name}"
        if changes is not None:
            changes = {k: (initial if k == "pin_version" else v) for k, v in changes.items()}
            stack.deploy_variant(f"promptrec-{name}", prefix, **changes)
        if not (changes or {}).get("pin_version"):
            follow.append(prefix)
        objects.append(ServiceArm(name, stack.base_url + prefix, concurrency))
        # What the arm's app says it runs (one replica's /version), for the record.
        apps[name] = {"route": prefix or "/", **_app_version(stack.base_url + prefix)}
    return objects, apps, follow


def _app_version(base_url: str) -> dict:
    import httpx

    body = httpx.get(f"{base_url}/version", timeout=30).raise_for_status().json()
    return {k: body[k] for k in ("prompt_version", "pinned", "personal_prompts")}


def _wait_logged(settings, expected: int, timeout_s: float = 60) -> None:
    """Consumers flush the event log every log_flush_s; a round must see every event."""
    from services.eventlog import read_event_log

    deadline = time.monotonic() + timeout_s
    while read_event_log(str(settings.infra.root / "eventlog")).num_rows < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"event log holds fewer than {expected} events")
        time.sleep(0.2)


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":  # re-draw a result file's plot: python -m services.prequential FILE
    import sys

    for name in sys.argv[1:]:
        print(plot(json.loads(Path(name).read_text()), Path(name).with_suffix(".png")))
