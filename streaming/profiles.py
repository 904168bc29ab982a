"""ProfileConsumer: Kafka `promptrec.users` -> validate -> route by user -> shards, then commit.

A user's own words (`services.user_records`) reach the shard that holds the user's state,
so a user who has not clicked yet can still be described to the model. Per poll:
1. each record is decoded: an upsert, a delete (null value), or invalid, which goes to
   `promptrec.users.dlq` with the reason in a header and is counted; over-long text is
   cut and counted (`truncated`), not refused;
2. every shard gets one `apply_profiles` call for the poll: its records (routed by
   `services.naming.shard_for_user`, in offset order) and the offset range of every
   partition, so every shard knows what it covers;
3. only after every shard has answered are the offsets committed. A shard that asks for
   a `rewind` (it restarted from an older snapshot) has its partitions re-read from there.

Durability across a shard restart. A shard snapshots its profiles with the profile
offsets they cover, and each start of a shard has a new incarnation id. This consumer
reads every shard's (incarnation, covered offsets) at its own start and every
`PROBE_S` after; when an incarnation is new it seeks each partition back to the lowest
offset any shard covers (0 for a shard with no snapshot). The records are keyed upserts
applied in offset order, and a shard skips offsets it covers, so the replay restores
exactly the profiles the restarted shard lost, even when no new profile arrives.
Committed offsets are where monitoring sees lag; where reading resumes is what the
shards cover, so a fresh shard (no snapshot) gets every profile the topic still holds.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally

import ray

from services import metrics
from services.config import Settings
from services.naming import shard_actor, shard_for_user
from services.user_records import InvalidUserRecord, ProfileDelete, decode_user_record
from streaming.kafka_client import PartitionRecords, RestartingThread, dead_letter, open_clients

log = logging.getLogger(__name__)

# How often the shards' incarnations are read: the longest a restarted shard goes without
# the profiles its snapshot lacked, when no new profile record arrives.
PROBE_S = 1.0


class ProfileConsumer(RestartingThread):
    def __init__(self, settings: Settings, bootstrap: str):
        self.settings = settings.validate()
        self.bootstrap = bootstrap
        # Found by name, as the ingest consumers find them (ray-project/ray#53727).
        self.shards = [ray.get_actor(shard_actor(i), namespace=settings.infra.namespace)
                       for i in range(settings.streaming.num_shards)]
        self.counts: Tally[str] = Tally()
        self.lag: dict[int, int] = {}
        self.epoch = ""  # the topic id seen last
        self.rewinds = self.syncs = 0
        self._handled: dict[int, int] = {}  # partition -> end of what was counted
        self._start("profiles", "profile consumer")

    def stats(self) -> dict:
        return {"counts": dict(self.counts), "lag": dict(self.lag), "epoch": self.epoch,
                "rewinds": self.rewinds, "syncs": self.syncs,
                "alive": self.alive, "error": self.error}

    def _run(self) -> None:
        from services.embedded import ensure_topics

        s, p = self.settings.streaming, self.settings.profiles
        security = self.settings.kafka
        ensure_topics(self.bootstrap, {p.topic_users: 1, p.topic_users_dlq: 1},
                      security=security.kafka_python())
        consumer, dlq = open_clients(s.kafka_client, self.bootstrap, p.topic_users,
                                     f"{s.consumer_group}-profiles", "promptrec-profiles",
                                     s.poll_max_records, security)
        incarnations: dict[int, str] = {}  # none known: the first probe seeks
        synced: set[int] = set()  # partitions sought since the last new incarnation
        last_probe = 0.0
        try:
            while not self._stop.is_set():
                polled = consumer.poll(0.1, s.poll_max_records)
                epoch = consumer.topic_id()
                if not epoch:  # offsets mean nothing without the topic's id: read again
                    for partition, records in polled.items():
                        consumer.seek(partition, records.offsets[0])
                    continue
                if epoch != self.epoch:
                    if self.epoch:
                        log.warning("profile topic recreated (id %s -> %s)", self.epoch, epoch)
                    self.epoch, incarnations, self._handled = epoch, {}, {}
                assigned = set(consumer.assignment())
                if time.monotonic() - last_probe >= PROBE_S or not assigned <= synced:
                    last_probe = time.monotonic()
                    if self._probe(consumer, assigned, incarnations, synced):
                        continue  # sought: what this poll fetched is read again
                if polled:
                    self._apply(consumer, dlq, polled)
                self._update_lag(consumer)
        finally:
            consumer.close()
            dlq.close()

    def _probe(self, consumer, assigned: set[int], incarnations: dict[int, str],
               synced: set[int]) -> bool:
        """Seek back to what the shards cover when one of them is new (or a partition is
        new to this consumer) -> whether it sought."""
        offsets = ray.get([shard.profile_offsets.remote() for shard in self.shards])
        now = {i: o["incarnation"] for i, o in enumerate(offsets)}
        if now != incarnations:
            synced.clear()
        targets = {partition: min(c[1] if c and c[0] == self.epoch else 0
                                  for c in (o["covered"].get(partition) for o in offsets))
                   for partition in sorted(assigned - synced)}
        for partition, target in targets.items():
            consumer.seek(partition, target)
            synced.add(partition)
        incarnations.clear()
        incarnations.update(now)
        if targets:
            self.syncs += 1
            log.info("profile consumer: shards %s; reading from %s", now, targets)
        return bool(targets)

    def _apply(self, consumer, dlq, polled: dict[int, PartitionRecords]) -> None:
        p = self.settings.profiles
        n_shards = len(self.shards)
        mine: list[list[tuple]] = [[] for _ in range(n_shards)]
        ranges = {}
        for partition, records in polled.items():
            ranges[partition] = (self.epoch, records.offsets[0], records.offsets[-1] + 1)
            counted = self._handled.get(partition, 0)
            for key, value, offset in zip(records.keys, records.values, records.offsets,
                                          strict=True):
                first_time = offset >= counted  # a replay is neither counted nor re-sent
                try:
                    decoded = decode_user_record(key, value, p.max_user_text_chars)
                except InvalidUserRecord as bad:
                    if first_time:
                        dead_letter(dlq, p.topic_users_dlq, key, value, bad.reason,
                                    bad.detail, f"{p.topic_users}/{partition}/{offset}")
                        self._count("invalid", bad.reason)
                    continue
                if isinstance(decoded, ProfileDelete):
                    record = (partition, offset, decoded.user_id, None, {})
                else:
                    profile = decoded.profile
                    record = (partition, offset, profile.user_id, profile.text,
                              profile.attributes)
                    if first_time and decoded.truncated:
                        self._count("truncated")
                if first_time:
                    self._count("delete" if record[3] is None else "upsert")
                mine[shard_for_user(record[2], n_shards)].append(record)
        dlq.flush()  # dead letters are sent before their offsets are committed
        results = ray.get([shard.apply_profiles.remote(records, ranges)
                           for shard, records in zip(self.shards, mine, strict=True)])
        rewind: dict[int, int] = {}
        for result in results:
            self._count("replayed", "", result["replayed"])
            for partition, offset in result["rewind"].items():
                rewind[partition] = min(offset, rewind.get(partition, offset))
        commit = {}
        for partition, (_, _, high) in ranges.items():
            self._handled[partition] = max(self._handled.get(partition, 0), high)
            if partition in rewind:
                consumer.seek(partition, rewind[partition])
                self.rewinds += 1
            else:
                commit[partition] = high
        if rewind:
            log.warning("profile consumer: shards asked to rewind %s", rewind)
        if commit:
            consumer.commit(commit)  # refused after a rebalance: the next owner re-reads

    def _count(self, result: str, reason: str = "", n: int = 1) -> None:
        if n:
            self.counts[f"{result}:{reason}" if reason else result] += n
            metrics.user_records().inc(n, tags={"result": result, "reason": reason})

    def _update_lag(self, consumer) -> None:
        self.lag.update(consumer.lag())
