"""New items offered on `promptrec.items` at a fixed rate, and how soon /recommend returns
them (bench/catalog.py's live phase).

Each offered item has a category of its own, so `/recommend?category=<it>` returns it
exactly when the replica that answers has its catalog version: a probe asks that every
25 ms for `probes_per_s` of the offered items a second, from the moment each record is
sent. The probe user is one user with no history, so after its first request each
probe is a cache hit. Probes are kept few on purpose: probing every item every few ms
saturated the two cores here and measured the probes, not the catalog.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import httpx

from bench.load import percentile
from services.data import Item
from services.item_records import encode_item

PROBE_USER = "catalog-probe"
PROBE_INTERVAL_S = 0.025
PROBE_GIVE_UP_S = 30.0


@dataclass
class LiveRun:
    rate: float  # items/s offered
    offered: int
    probed: list[float]  # ms from send to the first /recommend that returned the item
    lost: int  # probes that never saw their item within PROBE_GIVE_UP_S
    send_lag_ms: float  # how far the producer fell behind its schedule, at most

    def summary(self) -> dict:
        ok = self.probed
        return {"rate_items_per_s": self.rate, "offered": self.offered, "probed": len(ok),
                "not_seen_in_30s": self.lost,
                "p50_ms": round(percentile(ok, 50), 1) if ok else None,
                "p99_ms": round(percentile(ok, 99), 1) if ok else None,
                "max_ms": round(max(ok), 1) if ok else None,
                "producer_lag_ms": round(self.send_lag_ms, 1)}


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
    sender.start()
    found = asyncio.run(_probe_all(base_url, probes, sender))
    sender.join()
    producer.close()
    seen = [ms for ms in found if ms is not None]
    return LiveRun(rate, len(items), seen, len(found) - len(seen), lag * 1000)


async def _probe_all(base_url: str, probes: list, sender: threading.Thread
                     ) -> list[float | None]:
    """Start a probe for each probed item as soon as the sender has sent it."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        tasks, taken = [], 0
        while sender.is_alive() or taken < len(probes):
            while taken < len(probes):
                tasks.append(asyncio.create_task(_probe(http, *probes[taken])))
                taken += 1
            await asyncio.sleep(0.002)
        return list(await asyncio.gather(*tasks))


async def _probe(http: httpx.AsyncClient, item: Item, sent: float) -> float | None:
    params = {"user_id": PROBE_USER, "k": "1", "category": item.categories[0]}
    while (waited := time.time() - sent) < PROBE_GIVE_UP_S:
        try:
            body = (await http.get("/recommend", params=params)).json()
            if body.get("items"):
                return (time.time() - sent) * 1000
        except (httpx.HTTPError, ValueError):
            pass
        # Past the target, ask less often: probes of late items must not add to the load
        # that makes them late.
        await asyncio.sleep(PROBE_INTERVAL_S if waited < 1.0 else 0.25)
    return None


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
