"""Impressions: every /recommend answer written to Kafka (`promptrec.impressions`), off
the request path.

A request only puts its impression on a bounded queue (`put_nowait`: never blocks); a
writer thread sends the queue to Kafka (kafka-python batches them, linger 20 ms). A full
queue, a broker that is down or a failed send drop impressions and count them
(`promptrec_impressions_total{result}`); they never fail or slow a request. Record: key
= user_id, value = JSON {request_id, user_id, items (ids, ranked), prompt_version, arm,
experiment, ts (epoch s), query (the request's, or null)}; `streaming.live_metrics` reads
them.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter as Tally

from services import metrics

log = logging.getLogger("ray.serve")

RETRY_S = 2.0  # between attempts to reach the broker


class ImpressionLog:
    def __init__(self, bootstrap: str, topic: str, queue_max: int, client_id: str,
                 security: dict | None = None):
        self.bootstrap, self.topic, self.client_id = bootstrap, topic, client_id
        self.security = security or {}  # kafka-python options (KafkaSecurity)
        self.counts: Tally[str] = Tally()
        self._queue: queue.Queue[dict] = queue.Queue(maxsize=queue_max)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="impressions")
        self._thread.start()

    def write(self, impression: dict) -> None:
        try:
            self._queue.put_nowait(impression)
        except queue.Full:
            self._count("dropped")

    def stop(self) -> None:
        self._stop.set()

    def _count(self, result: str, n: int = 1) -> None:
        self.counts[result] += n
        metrics.impressions().inc(n, tags={"result": result})

    def _run(self) -> None:
        from kafka import KafkaProducer

        producer = None
        while not self._stop.is_set():
            try:
                impression = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if producer is None:
                    producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=20,
                                             acks=1, client_id=self.client_id, **self.security)
                future = producer.send(self.topic, key=impression["user_id"].encode(),
                                       value=json.dumps(impression,
                                                        separators=(",", ":")).encode())
                future.add_callback(lambda _: self._count("sent"))
                future.add_errback(lambda _: self._count("failed"))
            except Exception as err:  # noqa: BLE001 - a broker problem loses impressions only
                self._count("failed")
                log.warning("impression not written (%s); retrying in %.0f s",
                            type(err).__name__, RETRY_S)
                if producer is not None:
                    producer.close(timeout=1)
                producer = None
                self._stop.wait(RETRY_S)
        if producer is not None:
            producer.close(timeout=2)
