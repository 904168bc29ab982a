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

import collections
import functools
import itertools
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


@functools.cache
def events_consumed():
    from ray.util.metrics import Counter

    return Counter("promptrec_events_consumed_total",
                   description="Kafka click events consumed, by result (ok, invalid, duplicate) "
                               "and invalid reason",
                   tag_keys=("result", "reason"))


@functools.cache
def consumer_lag():
    from ray.util.metrics import Gauge

    return Gauge("promptrec_consumer_lag",
                 description="Records behind the high watermark, per partition",
                 tag_keys=("partition",))


@functools.cache
def event_to_state_seconds():
    from ray.util.metrics import Histogram

    return Histogram("promptrec_event_to_state_seconds",
                     description="From Kafka record timestamp to applied in the user's shard",
                     boundaries=_LATENCY_BUCKETS, tag_keys=())


def observe_all(histogram, values: list[float]) -> None:
    """`histogram.observe(v)` for each value: the same records, one per value.

    The public observe() re-checks the value's type and the tags in Python on every
    call; a shard observes every event it applies, and that wrapper was ~40% of its
    latency-recording time (cProfile, 30,000 events). With the tags checked once, the
    values go straight to the Cython metric's record(). Ray 2.60's attribute names;
    anything else falls back to observe().
    """
    metric = getattr(histogram, "_metric", None)
    if metric is None or getattr(histogram, "_discard_metric", True) \
            or not hasattr(histogram, "_get_final_tags"):
        for value in values:
            histogram.observe(value)
        return
    tags = histogram._get_final_tags(None)
    histogram._validate_tags(tags)
    collections.deque(map(metric.record, values, itertools.repeat(tags)), maxlen=0)


@functools.cache
def users_held():
    from ray.util.metrics import Gauge

    return KeptGauge(Gauge("promptrec_users_held", description="Users with state, per shard",
                           tag_keys=("shard",)))


@functools.cache
def training_rounds():
    from ray.util.metrics import Counter

    return Counter("promptrec_training_rounds_total",
                   description="Training rounds by outcome (published, rejected, failed, skipped)",
                   tag_keys=("outcome",))


@functools.cache
def training_loss():
    from ray.util.metrics import Gauge

    return KeptGauge(Gauge("promptrec_training_loss",
                           description="Mean training loss of the last round", tag_keys=()))


@functools.cache
def serving_prompt_version():
    from ray.util.metrics import Gauge

    return KeptGauge(Gauge("promptrec_serving_prompt_version",
                           description="Prompt version each replica serves",
                           tag_keys=("replica",)))


@functools.cache
def swap_seconds():
    from ray.util.metrics import Histogram

    return Histogram("promptrec_swap_seconds",
                     description="Replica swap: from registry push received to new version live",
                     boundaries=_LATENCY_BUCKETS, tag_keys=())


@functools.cache
def request_seconds():
    from ray.util.metrics import Histogram

    return Histogram("promptrec_request_seconds", description="HTTP request latency by route",
                     boundaries=_LATENCY_BUCKETS, tag_keys=("route",))


@functools.cache
def requests():
    from ray.util.metrics import Counter

    return Counter("promptrec_requests_total", description="HTTP requests by route and status",
                   tag_keys=("route", "status"))


@functools.cache
def user_cache():
    from ray.util.metrics import Counter

    return Counter("promptrec_user_cache_total",
                   description="User-vector cache lookups by result (hit, miss); hit rate = "
                               "hit / (hit + miss)",
                   tag_keys=("result",))


@functools.cache
def encode_batch_users():
    from ray.util.metrics import Histogram

    return Histogram("promptrec_encode_batch_users",
                     description="Users encoded per backbone pass (serve.batch of cache misses)",
                     boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32], tag_keys=())


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
