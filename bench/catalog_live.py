"""New items offered on `promptrec.items` at a fixed rate, and how soon /recommend returns
them (bench/catalog.py's live phase).

Each offered item has a category of its own, so `/recommend?category=<it>` returns it
exactly when the replica that answers has its catalog version. `probes_per_s` of the
offered items a second are probed from the moment each record is sent: one request
every 50 ms asks for all probed items not seen yet (their categories together), so
the probe load does not grow when items are late. The probe user has no history, so
every probe request after the first is a user-cache hit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import httpx

from bench.common import cpu_times, steal_pct
from bench.load import percentile
from services.data import Item
from services.item_records import encode_item

PROBE_USER = "catalog-probe"
PROBE_INTERVAL_S = 0.05
PROBE_GIVE_UP_S = 30.0
MAX_CATEGORIES = 1000  # the most categories one /recommend takes


@dataclass
class LiveRun:
    rate: float  # items/s offered
    offered: int
    probed: list[float]  # ms from send to the first /recommend that returned the item
    lost: int  # probes that never saw their item within PROBE_GIVE_UP_S
    send_lag_ms: float  # how far the producer fell behind its schedule, at most
    steal_pct: float | None  # CPU time the host took from this machine during the run

    def summary(self) -> dict:
        ok = self.probed
        return {"rate_items_per_s": self.rate, "offered": self.offered, "probed": len(ok),
                "not_seen_in_30s": self.lost,
                "p50_ms": round(percentile(ok, 50), 1) if ok else None,
                "p99_ms": round(percentile(ok, 99), 1) if ok else None,
                "max_ms": round(max(ok), 1) if ok else None,
                "producer_lag_ms": round(self.send_lag_ms, 1), "cpu_steal_pct": self.steal_pct}


def live_items(tag: str, n: int) -> list[Item]:
    kinds = ["lamp", "tent", "kettle", "map", "rope", "glove", "boot", "hat", "mug", "saw"]
    return [Item(f"{tag}-{i}", f"New {kinds[i % 10]} {i}",
                 description=f"A {kinds[(i * 7) % 10]} made for {kinds[(i * 3) % 10]} users.",
                 categories=(f"{tag}-{i}",)) for i in range(n)]


def offer(base_url: str, bootstrap: str, topic: str, rate: float, seconds: float,
          probes_per_s: float, tag: str) -> LiveRun:
    """Send `rate * seconds` new items at `rate`/s; probe `probes_per_s` of them a second."""
    from kafka import KafkaProducer

    probe_every = max(1, round(rate / probes_per_s))
    items = live_items(tag, max(1, int(rate * seconds)))
    probes: list[tuple[Item, float]] = []
    lag = 0.0
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)

    def send_all() -> None:
        nonlocal lag
        start = time.perf_counter()
        for i, item in enumerate(items):
            due = start + i / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            lag = max(lag, time.perf_counter() - due)
            sent = time.time()
            producer.send(topic, key=item.item_id.encode(), value=encode_item(item))
            if i % probe_every == 0:
                producer.flush()  # a probed record is on the broker when its clock starts
                probes.append((item, sent))
        producer.flush()

    sender = threading.Thread(target=send_all)
    cpu = cpu_times()
    sender.start()
    found = asyncio.run(_probe_all(base_url, probes, sender))
    sender.join()
    producer.close()
    seen = [ms for ms in found if ms is not None]
    return LiveRun(rate, len(items), seen, len(found) - len(seen), lag * 1000, steal_pct(cpu))


async def _probe_all(base_url: str, probes: list, sender: threading.Thread
                     ) -> list[float | None]:
    """One request at a time asks for every probed item not seen yet (their categories
    at once), every PROBE_INTERVAL_S: the probe load stays the same however far behind
    the catalog is (a request per item per interval saturated the replicas here)."""
    found: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        while True:
            now = time.time()
            waiting = [(item, sent) for item, sent in list(probes)
                       if item.item_id not in found and now - sent < PROBE_GIVE_UP_S]
            if not waiting and not sender.is_alive():
                break
            for start in range(0, len(waiting), MAX_CATEGORIES):
                chunk = waiting[start:start + MAX_CATEGORIES]
                params = {"user_id": PROBE_USER, "k": str(len(chunk)),
                          "category": ",".join(item.categories[0] for item, _ in chunk)}
                try:
                    body = (await http.get("/recommend", params=params)).json()
                except (httpx.HTTPError, ValueError):
                    continue
                seen_at = time.time()
                sent_at = {item.item_id: sent for item, sent in chunk}
                for entry in body.get("items", []):
                    if entry["item_id"] in sent_at:
                        found[entry["item_id"]] = (seen_at - sent_at[entry["item_id"]]) * 1000
            await asyncio.sleep(PROBE_INTERVAL_S)
    return [found.get(item.item_id) for item, _ in probes]


def sweep(base_url: str, bootstrap: str, topic: str, first: float, rates: list[float],
          seconds: float, probes_per_s: float, target_ms: float, tag: str, log) -> dict:
    """Offer `first` items/s, then the higher `rates` in turn while p99 holds `target_ms`
    (or the lower ones, from the top, until one holds) -> the runs and the highest rate
    that held (None: not even the lowest)."""
    def run(rate: float) -> bool:
        result = offer(base_url, bootstrap, topic, rate, seconds, probes_per_s,
                       f"{tag}{len(runs)}")
        summary = result.summary()
        runs.append(summary)
        log(f"live items at {rate:g}/s: {summary}")
        time.sleep(3)  # the last versions settle before the next rate
        return summary["p99_ms"] is not None and summary["p99_ms"] <= target_ms \
            and not result.lost

    runs: list[dict] = []
    held = first if run(first) else None
    for rate in sorted(r for r in rates if r > first) if held else \
            sorted((r for r in rates if r < first), reverse=True):
        if run(rate):
            held = max(rate, held or 0)
            if rate < first:
                break  # the highest of the lower rates that holds
        elif held:
            break  # the first higher rate that misses
    return {"runs": runs, "max_rate_within_target": held}
