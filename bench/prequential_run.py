"""The prequential evaluation on the running system (test-then-learn; the protocol is
`bench/prequential.py`).

    promptrec eval prequential --dataset ml-100k [--window 1000] [--sample-every 10]

Starts the stack, deploys one Serve app per model arm, replays the data set through
Kafka window by window and writes the result file and its plot where it is told.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import run_stamp, write_result
from bench.prequential import (
    DEFAULT_ARMS,
    MODEL_ARMS,
    SampleRule,
    ServiceArm,
    check_arms,
    run_windows,
)
from bench.prequential_baselines import (
    DEFAULT_RECENT_WINDOW,
    CountingArm,
    PopularityArm,
    RecentPopularityArm,
)
from bench.prequential_report import build_result, plot
from services.config import Settings
from services.events import ClickEvent
from services.health import wait_until
from services.rank_metrics import K

log = logging.getLogger("promptrec")
CANARY_SETTLE_S = 60.0  # a canary running at the end of the replay waits this for a verdict

# The settings a result records (what shaped the run).
RECORDED_SETTINGS = ("train_every_events", "first_round_events", "train_steps",
                     "round_max_epochs", "replay_share", "train_workers", "batch_size",
                     "learning_rate",
                     "item_token_lr", "item_bias_lr", "bf16", "train_rows", "user_layers",
                     "readout", "gate_margin", "user_text",
                     "val_users", "val_events", "history_len",
                     "personal_alpha", "num_replicas", "num_shards", "num_consumers",
                     "partitions")


def run_prequential(settings: Settings, out: Path, window: int = 1000,
                    sample: SampleRule | None = None, arms: Sequence[str] = DEFAULT_ARMS,
                    max_events: int | None = None, plot_path: Path | None = None,
                    concurrency: int = 8, command: str = "", progress: bool = True,
                    recent_window: int = DEFAULT_RECENT_WINDOW) -> dict:
    """Start the stack (embedded defaults, or the given Kafka/Ray), deploy one Serve app
    per model arm, replay, evaluate; write the result file and the plot. `recent_window`:
    events the recent_popularity arm counts."""
    import ray

    from services.data import load_interactions
    from services.launch.stack import Stack
    from streaming.replay import make_producer, send_events
    from training.scheduler import RoundScheduler

    check_arms(arms, settings.model.user_text)
    if recent_window < 1:
        raise ValueError(f"recent_window must be >= 1 event, not {recent_window}")
    sample = sample or SampleRule()
    started = time.monotonic()
    dataset = settings.infra.dataset
    source = settings.infra.events_source
    interactions = load_interactions(source, limit=max_events)
    events = [interactions.event(i) for i in range(len(interactions))]
    stack = Stack(settings, progress=progress)
    try:
        stack.start(fresh=True)
        profiles = 0
        if settings.model.user_text:  # every profile in the shards before the first test
            profiles = stack.publish_dataset_profiles()
            stats = stack.wait_profiles(profiles, timeout_s=300)
            log.info("profiles before the replay: %s", stats["counts"])
        initial = ray.get(stack.registry.serving_version.remote())
        item_ids = [item.item_id for item in stack.catalog.items]
        history_len = settings.streaming.history_len
        baselines: dict[str, CountingArm] = {  # answered by the evaluator; learn every window
            PopularityArm.name: PopularityArm(item_ids, history_len),
            RecentPopularityArm.name: RecentPopularityArm(item_ids, history_len, recent_window)}
        arm_objects, arm_apps, follow_prefixes = _deploy_arms(stack, arms, baselines,
                                                              initial, concurrency)
        producer = make_producer(stack.bootstrap)
        scheduler = RoundScheduler(stack.runner, settings.training, lambda: 0)  # for its due() rule
        baseline = stack.streaming.stats()["handled"]
        state = {"produced": 0, "since_round": 0}
        rounds: list[dict] = []
        # With a canary share each round's version is first a canary, judged by the live
        # metrics on what the replay's users do next: sampled events quote the online
        # arm's answer (its request_id), so each is credited to the answer it tested.
        canary = settings.live.canary_share > 0
        quotes: dict[str, str] = {}  # event_id -> request_id

        def quote(arm: str, targets: list[ClickEvent], answers: dict) -> None:
            if canary and arm == "online":
                quotes.update((e.event_id, answers[e.user_id].request_id) for e in targets)

        def run_round() -> None:
            _wait_logged(settings, stack.streaming.stats()["totals"].get("ok", 0))
            done = stack.runner.run()
            live = {}  # route -> {replica: publish -> live ms}
            if done.version:
                for prefix in follow_prefixes:
                    live[prefix or "/"] = stack.wait_all_replicas(done.version, prefix=prefix,
                                                                  canary=canary)
            rounds.append({"after_events": state["produced"], "outcome": done.outcome,
                           "reason": done.reason, "version": done.version, "loss": done.loss,
                           "train_examples": done.train_examples,
                           "candidate_ndcg10": done.candidate_ndcg10,
                           "serving_ndcg10": done.serving_ndcg10,
                           "seconds": round(done.seconds, 1), "publish_to_live_ms": live})
            log.info("round %d after %d events: %s %s (%.0f s)", done.round,
                     state["produced"], done.outcome, done.reason, done.seconds)

        def learn(batch: Sequence[ClickEvent]) -> None:
            send_events(producer, settings.streaming.topic_clicks, batch, quotes)
            state["produced"] += len(batch)
            expected = baseline + state["produced"]
            handled = stack.wait_handled(expected, timeout_s=600)["handled"]
            if handled < expected:
                raise TimeoutError(f"the pipeline handled {handled} of {expected} records")
            for baseline_arm in baselines.values():
                baseline_arm.learn(batch)
            state["since_round"] += len(batch)
            if (state["produced"] < len(events) and follow_prefixes
                    and scheduler.due(state["since_round"], 0.0, first=not rounds)):
                run_round()
                state["since_round"] = 0

        replay_started = time.monotonic()

        def on_window(row: dict) -> None:
            if row["window"] % 10 == 0 or row["first_event"] + row["events"] >= len(events):
                scores = ", ".join(f"{name} {arm['hr10']}" for name, arm in row["arms"].items())
                log.info("window %d: %d/%d events, HR@10 %s (%.0f s)", row["window"],
                         row["first_event"] + row["events"], len(events), scores or "-",
                         time.monotonic() - replay_started)

        evaluation = run_windows(events, arm_objects, learn, window, sample, on_window=on_window,
                                 on_answers=quote)
        producer.close()
        canary_record = _canary_record(stack, settings, CANARY_SETTLE_S) if canary else None
        result = build_result(
            evaluation, dataset=dataset, events_replayed=len(events),
            events_in_dataset=len(load_interactions(source)) if max_events else len(events),
            window_events=window, recent_window_events=recent_window, k=K,
            sample={"rule": sample.describe(), "every": sample.every, "warmup": sample.warmup,
                    "first_evaluated_event": sample.first(len(events))},
            initial_prompt_version=initial,
            arm_apps=arm_apps,
            rounds=rounds,
            rounds_published=sum(r["outcome"] == "published" for r in rounds),
            profiles_published=profiles,
            settings={name: settings.value(name) for name in RECORDED_SETTINGS},
            protocol=("test-then-learn per window: every arm answers the sampled events of a "
                      "window from state built on the events before it; then the window is "
                      "produced to Kafka and applied (and counted by the popularity arms); "
                      "rounds run between windows on the train_every_events trigger"),
            canary=canary_record,
            wall_seconds=round(time.monotonic() - started, 1),
            **run_stamp(command))
    finally:
        stack.stop()
    plot_path = plot_path or out.with_suffix(".png")
    result["plot"] = plot_path.name
    write_result(out, result)
    plot(result, plot_path)
    return result


def _deploy_arms(stack, arms: Sequence[str], baselines: dict[str, CountingArm], initial: int,
                 concurrency: int) -> tuple[list, dict[str, dict], list[str]]:
    """One arm object per name; a Serve app beside the main one for each model arm other
    than `online`. -> (arms, {name: what its app runs}, route prefixes that follow rounds)."""
    objects: list = []
    apps: dict[str, dict] = {}
    follow: list[str] = []
    for name in arms:
        if name in baselines:
            objects.append(baselines[name])
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


def _canary_record(stack, settings: Settings, settle_s: float) -> dict:
    """What the canary decided over the replay: the registry's outcomes and the live
    metrics' verdicts (each with the two arms' live figures). A canary still running
    when the replay ends gets up to `settle_s` for its verdict: the live metrics credit
    the last windows' events a moment after they are produced."""
    import httpx
    import ray

    def decided() -> dict | None:
        routing = ray.get(stack.registry.routing.remote())
        return None if routing["canary"] else routing

    try:
        routing = wait_until(decided, settle_s, "the running canary's verdict", 0.5)
    except TimeoutError:
        routing = ray.get(stack.registry.routing.remote())  # recorded undecided
    live = httpx.get(f"{stack.base_url}/version", timeout=30).json().get("live") or {}
    return {"share": settings.live.canary_share, "min_events": settings.live.canary_min_events,
            "margin": settings.live.canary_margin, "serving_at_end": routing["serving"],
            "outcomes": routing["canary_outcomes"], "verdicts": live.get("verdicts", []),
            "live_counts": live.get("counts")}


def _app_version(base_url: str) -> dict:
    import httpx

    body = httpx.get(f"{base_url}/version", timeout=30).raise_for_status().json()
    return {k: body[k] for k in ("prompt_version", "pinned", "personal_prompts", "profiles")}


def _wait_logged(settings: Settings, expected: int, timeout_s: float = 60) -> None:
    """Consumers flush the event log every log_flush_s; a round must see every event."""
    from services.eventlog import read_event_log

    path = str(settings.infra.root / "eventlog")
    wait_until(lambda: read_event_log(path).num_rows >= expected, timeout_s,
               f"event log holds {expected} events", interval_s=0.2)
