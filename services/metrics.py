"""Every Prometheus metric of the service, in one place.

They are `ray.util.metrics` objects so that Ray actors and Serve replicas export
them through Ray's metrics endpoint (`--metrics-port`); a module-level
prometheus_client registry inside a replica would never be scraped. Ray prefixes
each name with `ray_`: the scrape config in deploy/ strips it, so Prometheus
stores `promptrec_*`.

Objects are created lazily, once per process, because they must be created
inside the actor or replica that records them.
"""

from __future__ import annotations

import functools
import re
import threading
import time

_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
_KEEP_EVERY_S = 5.0


class KeptGauge:
    """A Ray gauge whose last value per tag set is recorded again every few seconds.

    Ray 2.60 drops a gauge series from its export some 20-30 s after the series' last
    set() (measured here: a gauge set once in an actor was gone from the metrics
    endpoint within 30 s, a counter stayed). Values that change rarely (users held, the
    prompt version a replica serves, the last round's loss) would otherwise be missing
    from Prometheus most of the time. The re-recording thread lives in the recording process,
    so the series of a dead actor or replica still ages out.
    """

    _all: list[KeptGauge] = []
    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    def __init__(self, gauge):
        self._gauge = gauge
        self._last: dict[tuple, tuple[float, dict[str, str] | None]] = {}
        with KeptGauge._lock:
            KeptGauge._all.append(self)
            if KeptGauge._thread is None:
                KeptGauge._thread = threading.Thread(target=KeptGauge._keep, daemon=True,
                                                     name="promptrec-kept-gauges")
                KeptGauge._thread.start()

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._gauge.set(value, tags=tags)
        with KeptGauge._lock:
            self._last[tuple(sorted((tags or {}).items()))] = (value, tags)

    @classmethod
    def _keep(cls) -> None:
        while True:
            time.sleep(_KEEP_EVERY_S)
            with cls._lock:
                pending = [(g._gauge, v, t) for g in cls._all for v, t in g._last.values()]
            for gauge, value, tags in pending:
                try:
                    gauge.set(value, tags=tags)
                except Exception:  # noqa: BLE001 - e.g. Ray shut down in this process
                    pass


def _counter(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Counter

    return Counter(name, description=description, tag_keys=tag_keys)


def _gauge(name: str, description: str, tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys)


def _histogram(name: str, description: str, boundaries: list[float] = _LATENCY_BUCKETS,
               tag_keys: tuple[str, ...] = ()):
    from ray.util.metrics import Histogram

    return Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)


def observe_all(histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for each value (Ray has no public batched observe).

    The public observe() costs ~0.6 us a value here (0.2 us through the Cython metric
    that it wraps, a private attribute); with one event in LATENCY_SAMPLE_EVERY observed,
    that difference is ~0.05 us an applied event: not worth a private API.
    """
    for value in values:
        histogram.observe(value)


@functools.cache
def events_consumed():
    return _counter("promptrec_events_consumed_total",
                    "Kafka click events consumed, by result (ok, invalid, duplicate) and "
                    "invalid reason", ("result", "reason"))


@functools.cache
def consumer_lag():
    return _gauge("promptrec_consumer_lag", "Records behind the high watermark, per partition",
                  ("partition",))


@functools.cache
def event_to_state_seconds():
    return _histogram("promptrec_event_to_state_seconds",
                      "From Kafka record timestamp to applied in the user's shard")


@functools.cache
def users_held():
    return KeptGauge(_gauge("promptrec_users_held", "Users with state, per shard", ("shard",)))


@functools.cache
def training_rounds():
    return _counter("promptrec_training_rounds_total",
                    "Training rounds by outcome (published, rejected, failed, skipped)",
                    ("outcome",))


@functools.cache
def training_loss():
    return KeptGauge(_gauge("promptrec_training_loss", "Mean training loss of the last round"))


@functools.cache
def serving_prompt_version():
    return KeptGauge(_gauge("promptrec_serving_prompt_version",
                            "Prompt version each replica serves", ("replica",)))


@functools.cache
def swap_seconds():
    return _histogram("promptrec_swap_seconds",
                      "Replica swap: from registry push received to new version live")


@functools.cache
def item_records():
    return _counter("promptrec_item_records_total",
                    "Item-topic records by result (upsert, delete, invalid, truncated) and "
                    "invalid reason", ("result", "reason"))


@functools.cache
def user_records():
    return _counter("promptrec_user_records_total",
                    "Profile-topic records by result (upsert, delete, invalid, truncated, "
                    "replayed) and invalid reason", ("result", "reason"))


@functools.cache
def serving_catalog_version():
    return KeptGauge(_gauge("promptrec_serving_catalog_version",
                            "Catalog version each replica serves", ("replica",)))


@functools.cache
def item_live_seconds():
    return _histogram("promptrec_item_live_seconds",
                      "From an item record's Kafka timestamp to rankable in a replica")


@functools.cache
def held_events():
    return _counter("promptrec_held_events_total",
                    "Events held for an item not yet in the catalog, by outcome (held, "
                    "applied, expired)", ("outcome",))


@functools.cache
def request_seconds():
    return _histogram("promptrec_request_seconds", "HTTP request latency by route",
                      tag_keys=("route",))


@functools.cache
def requests():
    return _counter("promptrec_requests_total", "HTTP requests by route and status",
                    ("route", "status"))


@functools.cache
def user_cache():
    return _counter("promptrec_user_cache_total",
                    "User-vector cache lookups by result (hit, miss); hit rate = "
                    "hit / (hit + miss)", ("result",))


@functools.cache
def encode_batch_users():
    return _histogram("promptrec_encode_batch_users",
                      "Users encoded per backbone pass (serve.batch of cache misses)",
                      boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32])


@functools.cache
def impressions():
    return _counter("promptrec_impressions_total",
                    "Impressions by result (sent, dropped: writer queue full, failed: not "
                    "written to Kafka)", ("result",))


@functools.cache
def live_events():
    return _counter("promptrec_live_events_total",
                    "Events attributed to an impression, by prompt version, arm and result "
                    "(hit: item in the served top-k, miss)", ("version", "arm", "result"))


@functools.cache
def live_hr():
    return KeptGauge(_gauge("promptrec_live_hr",
                            "Live HR@k per prompt version and arm: attributed events whose "
                            "item was in the served top-k", ("version", "arm")))


@functools.cache
def live_ndcg():
    return KeptGauge(_gauge("promptrec_live_ndcg",
                            "Live NDCG@k per prompt version and arm (the position the "
                            "event's item had in the served top-k)", ("version", "arm")))


@functools.cache
def canary_outcomes():
    return _counter("promptrec_canary_total",
                    "Canary versions by outcome (promote, rollback)", ("outcome",))


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{[^}]*\})?\s+(?P<value>\S+)")


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Exposition text -> {metric name: [(labels, value)]}; `ray_` prefixes removed."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        name = match["name"].removeprefix("ray_")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        out.setdefault(name, []).append((labels, float(match["value"])))
    return out
