"""LiveMetrics: impressions and click events in, live quality per prompt version and arm
out, and the canary's promotion or rollback.

One actor (named `promptrec-live-metrics`) reads `promptrec.impressions` and the click
topic with a consumer group of its own, from the end at its start (it counts what
happens while it runs; a restart starts the counts again):

1. **attribution**: an event that quotes a `request_id` is credited to that impression
   (when it is the same user's); an event without one to its user's latest impression at
   most `attribution_window_s` older than the event. An event waits `HOLD_S` after it is
   read, so that the impression it answers, written at the same moment by a replica, is
   read first. Events with nothing to credit are counted as `unattributed`.
2. **live metrics**: an attributed event is a hit when its item was in the impression's
   top `live_k`; NDCG from its position. Per (prompt version, arm):
   `promptrec_live_events_total`, `promptrec_live_hr`, `promptrec_live_ndcg`, and `report()`
   (on every replica's /version).
3. **canary**: while the registry runs a canary, the two arms' events on impressions made
   since it started are counted apart and judged by `services.canary.judge` after each
   batch; a verdict is applied through `PromptRegistry.end_canary` and counted in
   `promptrec_canary_total{outcome}`.
4. **experiments**: events on an experiment's impressions are also counted per
   (experiment, arm) for `GET /admin/experiments/{id}`; and every click counts for its
   item in the popularity arm's counts (`popular`), which start from the event log;
5. **queries**: an attributed event whose impression answered a query remembers it
   (`asked_queries`): a round trains the query gate on "asked q, then clicked i".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, OrderedDict, deque

from services import metrics
from services.canary import ArmCounts, CanaryRule, judge
from services.config import Settings
from services.events import InvalidEvent, decode_event
from services.naming import REGISTRY_ACTOR
from streaming.live_tally import Impression, Tally, read_impression

log = logging.getLogger(__name__)

HOLD_S = 1.0  # an event waits this long for the impression it answers
USERS_KEPT = 200_000  # latest impression per user, least recently served dropped first
REQUESTS_KEPT = 200_000  # impressions findable by request_id
QUERIES_KEPT = 200_000  # attributed clicks whose impression answered a query (for rounds)
JUDGE_EVERY_S = 0.5
CLOCK_SLACK_S = 1.0  # an event may carry a time this much before its impression's


class LiveMetrics:
    def __init__(self, settings: Settings, bootstrap: str):
        self._init_state(settings, bootstrap)
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-metrics")
        self._thread.start()

    def _init_state(self, settings: Settings, bootstrap: str) -> None:
        self.settings = settings.validate()
        live = self.settings.live
        self.rule = CanaryRule(live.canary_min_events, live.canary_max_events,
                               live.canary_margin, live.canary_alpha)
        self.bootstrap = bootstrap
        self._latest: OrderedDict[str, Impression] = OrderedDict()  # by user
        self._by_request: OrderedDict[str, Impression] = OrderedDict()
        self._pending: deque[tuple[float, bytes | None, bytes]] = deque()
        self._asked: OrderedDict[str, str] = OrderedDict()  # event_id -> query it followed
        self._asked_lock = threading.Lock()  # written by the loop, copied by a round's call
        self.tallies: dict[tuple[int, str], Tally] = {}
        self.experiment_tallies: dict[tuple[str, str], Tally] = {}
        self.item_clicks: Counter[str] = Counter()
        self.counts = {"impressions": 0, "events": 0, "attributed": 0, "unattributed": 0,
                       "invalid": 0}
        self.trial: dict | None = None  # the running canary and its two arms' counts
        self.verdicts: list[dict] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self.error: str | None = None

    def ready(self, timeout_s: float = 60.0) -> bool:
        """True once it reads both topics from their ends (what comes next is counted)."""
        return self._ready.wait(timeout_s)

    def report(self) -> dict:
        return {"counts": dict(self.counts),
                "arms": [{"prompt_version": v, "arm": a, **t.summary()}
                         for (v, a), t in sorted(self.tallies.items())],
                "canary": None if self.trial is None else {
                    "prompt_version": self.trial["canary"],
                    "serving_version": self.trial["serving"],
                    "since": self.trial["since"],
                    **{arm: t.summary() for arm, t in self.trial["arms"].items()}},
                "verdicts": self.verdicts[-10:], "error": self.error}

    def popular(self, limit: int) -> list[tuple[str, int]]:
        """The `limit` most clicked items (the event log at start, then live) and counts."""
        return self.item_clicks.most_common(limit)

    def asked_queries(self) -> dict[str, str]:
        """event_id -> the query its click followed, for the last `QUERIES_KEPT` clicks
        credited to an answer that read one (a round trains the query gate on them)."""
        with self._asked_lock:
            return dict(self._asked)

    def experiment_arms(self, experiment_id: str) -> dict[str, dict]:
        """Per arm of one experiment: events, hits, ndcg sum and sum of squares."""
        return {arm: vars(t).copy() for (exp, arm), t in self.experiment_tallies.items()
                if exp == experiment_id}

    def _count_logged_clicks(self) -> None:
        import pyarrow.compute as pc

        from services.eventlog import read_event_log

        try:
            column = read_event_log(str(self.settings.infra.root / "eventlog"))["item_id"]
            counts = pc.value_counts(column).to_pylist()
        except Exception as err:  # noqa: BLE001 - a bad log must not stop live metrics
            log.warning("event log not counted for popularity: %s", err)
            return
        self.item_clicks.update({c["values"]: c["counts"] for c in counts})

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.report()

    # --- the loop ---------------------------------------------------------------
    def _run(self) -> None:
        import ray
        from kafka import KafkaConsumer

        live, streaming = self.settings.live, self.settings.streaming
        registry = ray.get_actor(REGISTRY_ACTOR, namespace=self.settings.infra.namespace)
        self._count_logged_clicks()
        consumer = KafkaConsumer(
            live.topic_impressions, streaming.topic_clicks, bootstrap_servers=self.bootstrap,
            group_id=f"promptrec-live-{time.time_ns()}", enable_auto_commit=False,
            auto_offset_reset="latest", session_timeout_ms=6000, heartbeat_interval_ms=1500,
            fetch_max_wait_ms=100, client_id="promptrec-live-metrics",
            **self.settings.kafka.kafka_python())
        last_judged = 0.0
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=100, max_records=2000)
                if not self._ready.is_set() and consumer.assignment():
                    for tp in consumer.assignment():
                        consumer.position(tp)  # resolves "latest" now, not at the next fetch
                    self._ready.set()
                now = time.monotonic()
                for tp, records in polled.items():
                    for record in records:
                        if tp.topic == live.topic_impressions:
                            self._impression(record.value)
                        else:
                            self._pending.append((now, record.key, record.value))
                self._attribute_due(now)
                if now - last_judged >= JUDGE_EVERY_S:
                    last_judged = now
                    self._follow_canary(ray.get(registry.routing.remote()), registry)
        except Exception as err:  # noqa: BLE001 - reported on /version, not a crash loop
            self.error = f"{type(err).__name__}: {err}"
            log.exception("live metrics stopped")
        finally:
            consumer.close()

    def _impression(self, value: bytes | None) -> None:
        impression = read_impression(value) if value is not None else None
        if impression is None:
            self.counts["invalid"] += 1
            return
        self.counts["impressions"] += 1
        for table, key, kept in ((self._latest, impression.user_id, USERS_KEPT),
                                 (self._by_request, impression.request_id, REQUESTS_KEPT)):
            table[key] = impression
            table.move_to_end(key)
            if len(table) > kept:
                table.popitem(last=False)

    def _attribute_due(self, now: float) -> None:
        touched: set[tuple[int, str]] = set()
        while self._pending and now - self._pending[0][0] >= HOLD_S:
            _, key, value = self._pending.popleft()
            if (done := self._attribute(key, value)) is not None:
                touched.add(done)
        for version, arm in touched:
            summary = self.tallies[(version, arm)].summary()
            tags = {"version": str(version), "arm": arm}
            metrics.live_hr().set(summary["hr"], tags=tags)
            metrics.live_ndcg().set(summary["ndcg"], tags=tags)

    def _attribute(self, key: bytes | None, value: bytes | None) -> tuple[int, str] | None:
        """Credit one click event -> the (version, arm) it counted for, if any."""
        if key is not None and value is not None and b'"request_id"' not in value and \
                key.decode("utf-8", "replace") not in self._latest:
            # Never served and quoting nothing (a replay, a bulk import): no validation.
            self.counts["events"] += 1
            self.counts["unattributed"] += 1
            self._count_click(value)
            return None
        try:
            event = decode_event(key, value)
        except InvalidEvent:
            self.counts["invalid"] += 1  # the ingest consumers dead-letter it
            return None
        self.counts["events"] += 1
        self.item_clicks[event.item_id] += 1
        request_id = json.loads(value).get("request_id")
        impression = self._by_request.get(request_id) if request_id else \
            self._latest.get(event.user_id)
        window = self.settings.live.attribution_window_s
        if impression is None or impression.user_id != event.user_id or \
                (not request_id and not -CLOCK_SLACK_S <= event.ts - impression.ts <= window):
            self.counts["unattributed"] += 1
            return None
        self.counts["attributed"] += 1
        if impression.query:
            with self._asked_lock:
                self._asked[event.event_id] = impression.query
                if len(self._asked) > QUERIES_KEPT:
                    self._asked.popitem(last=False)
        top = impression.items[:self.settings.live.live_k]
        position = top.index(event.item_id) if event.item_id in top else None
        cell = (impression.version, impression.arm)
        self.tallies.setdefault(cell, Tally()).add(position)
        if impression.experiment:
            self.experiment_tallies.setdefault((impression.experiment, impression.arm),
                                               Tally()).add(position)
        metrics.live_events().inc(1, tags={"version": str(impression.version),
                                           "arm": impression.arm,
                                           "result": "hit" if position is not None else "miss"})
        trial = self.trial
        if trial is not None and impression.ts >= trial["since"]:
            expected = trial["canary"] if impression.arm == "canary" else trial["serving"]
            if impression.version == expected and impression.arm in trial["arms"]:
                trial["arms"][impression.arm].add(position)
        return cell

    def _count_click(self, value: bytes) -> None:
        try:
            item = json.loads(value).get("item_id")
        except (ValueError, AttributeError, RecursionError):
            return  # not an event: the ingest consumers dead-letter it
        if isinstance(item, str):
            self.item_clicks[item] += 1

    def _follow_canary(self, routing: dict, registry) -> None:
        import ray

        canary = routing.get("canary", 0)
        if not canary:
            self.trial = None
            return
        if self.trial is None or self.trial["canary"] != canary:
            self.trial = {"canary": canary, "serving": routing["serving"],
                          "since": routing["canary_since"],
                          "arms": {"canary": Tally(), "serving": Tally()}}
            log.info("judging canary version %d against %d", canary, routing["serving"])
        arms = self.trial["arms"]
        verdict = judge(ArmCounts(arms["canary"].events, arms["canary"].hits),
                        ArmCounts(arms["serving"].events, arms["serving"].hits), self.rule)
        if verdict.outcome == "wait":
            return
        if ray.get(registry.end_canary.remote(canary, verdict.outcome, verdict.reason)):
            metrics.canary_outcomes().inc(1, tags={"outcome": verdict.outcome})
            self.verdicts.append({"prompt_version": canary, "outcome": verdict.outcome,
                                  "reason": verdict.reason, "at": time.time(),
                                  **{arm: t.summary() for arm, t in arms.items()}})
            log.warning("canary version %d: %s (%s)", canary, verdict.outcome, verdict.reason)
        self.trial = None


def start_live_metrics(settings: Settings, bootstrap: str):
    """The actor, named; returns once it reads both topics."""
    import ray

    from services.naming import LIVE_METRICS_ACTOR
    from services.placement import actor_options

    actor = ray.remote(LiveMetrics).options(
        name=LIVE_METRICS_ACTOR, namespace=settings.infra.namespace, num_cpus=0.25,
        max_concurrency=4, max_restarts=-1, max_task_retries=-1,
        **actor_options(settings, "consumers")).remote(settings, bootstrap)
    if not ray.get(actor.ready.remote()):
        raise TimeoutError("live metrics did not join its topics within 60 s")
    return actor
