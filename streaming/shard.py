"""UserStateShard: the per-user prompt state of the users routed to one shard (a Ray actor).

The shard owns the state and wires the jobs done elsewhere, per consumer batch:
1. `streaming.delivery`: which events are new (offsets per partition with the topic's
   epoch, then event ids within the dedupe window), or which partitions to rewind;
2. `streaming.apply`: those events applied column-wise (histories, state versions and
   personal prompts by `services.personal`);
3. `streaming.latency`: their event-to-state latency recorded;
4. now and then `streaming.snapshot`: the state and its covered offsets written in the
   background; a restarted shard restores the latest one and asks consumers to rewind to
   it.

Profiles (`promptrec.users`, `streaming.profiles`) come in batches of their own through
`apply_profiles`, with their own covered offsets (a second `DeliveryGuard`, offsets only:
a record is a keyed upsert, so an offset is all it needs). `profile_offsets` tells the
profile consumer this incarnation's id and what it covers, so that after a restart it
replays what the restored snapshot lacks even when no new profile arrives.

The one-event-at-a-time apply that the batched one must equal lives beside its parity
test (tests/streaming/reference.py).
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from services.batch import EventBatch
from services.catalog_registry import follow_if_running
from services.config import StreamingSettings
from services.gc_policy import freeze_and_relax
from services.personal import EventRates
from streaming.apply import ItemSpace, ProfileRecord, UserState, apply_profiles, apply_rows
from streaming.delivery import DeliveryGuard, Ranges
from streaming.latency import LatencySampler
from streaming.snapshot import Captured, SnapshotStore, capture

# The consumer releases a held event once its own catalog follower has the item; this
# shard's follower is a separate long-poll that may be a moment behind. Wait this long
# at most for it, so that the release moves the personal prompt by the item's vector.
CATALOG_CATCH_UP_S = 5.0

log = logging.getLogger(__name__)


class UserStateShard:
    def __init__(self, shard_index: int, config: StreamingSettings,
                 item_vectors: np.ndarray | None = None, item_ids: list[str] | None = None,
                 snapshot_dir: str | None = None, namespace: str | None = None,
                 follow_catalog: bool = False):
        """`config` gives history_len, dedupe_window, personal_alpha and snapshot_every_s;
        item_vectors [N, H] are the frozen catalog vectors the personal prompts move in (None:
        no personal prompts); snapshots go under `snapshot_dir` (None: none). With `namespace`
        the vectors follow the live catalog's versions, where a catalog registry runs.
        `follow_catalog`: take the vectors from that registry only (it must run). The stack
        does so: arguments big enough for Ray's object store may be gone when an actor
        restarts on another node (ray-project/ray#53727), so a shard is built from small
        ones and fetches the rest itself."""
        self.shard_index = shard_index
        self.history_len = config.history_len
        self.personal_alpha = config.personal_alpha
        self.rates = EventRates(config.personal_alpha)
        self.personal = item_vectors is not None or follow_catalog
        self.items: ItemSpace | None = None
        if item_vectors is not None:
            self.set_items(item_vectors, item_ids or [])
        self.guard = DeliveryGuard(config.dedupe_window)
        self.profile_guard = DeliveryGuard(0)  # the profile topic's offsets (no event ids)
        self.incarnation = uuid.uuid4().hex  # a new one per start: consumers notice restarts
        self.profiles_applied = 0
        self.users: dict[str, UserState] = {}
        self.applied = self.duplicates = self.replayed = 0
        self.latency = LatencySampler()
        self.snapshots = SnapshotStore(Path(snapshot_dir) / f"shard-{shard_index}",
                                       shard_index) if snapshot_dir else None
        self.snapshot_every_s = config.snapshot_every_s
        self._last_snapshot = time.monotonic()
        self.restored_from: str | None = self._restore()
        self.catalogs = follow_if_running(namespace, lambda c, _: self.set_items(
            c.vectors.numpy(), c.item_ids)) if namespace and self.personal else None
        if follow_catalog and self.catalogs is None:
            raise RuntimeError(f"follow_catalog: no catalog registry runs in namespace "
                               f"{namespace!r}")
        if self.catalogs is not None:  # the catalog may have moved since we were handed it
            self.set_items(self.catalogs.catalog.vectors.numpy(), self.catalogs.catalog.item_ids)
        freeze_and_relax()  # see _housekeeping and services.gc_policy

    # --- applying events -------------------------------------------------
    def apply(self, events: EventBatch | Sequence[tuple], ranges: Ranges,
              held: dict[int, list[int]] | None = None) -> dict:
        """Apply one consumer batch.

        events: this shard's events of the batch (an `EventBatch`, or its rows); ranges:
        partition -> (topic epoch, first offset, last offset + 1) of the whole batch
        (every shard gets every batch's ranges, events or not); held: offsets of this
        shard's events the consumer held back (`streaming.held`). Returns counts and
        `rewind` {partition: offset} for ranges this shard cannot take.
        """
        if not isinstance(events, EventBatch):
            events = EventBatch.from_rows(events)
        admitted = self.guard.admit(events, ranges)
        apply_rows(self.users, events, admitted.rows, self.history_len, self.items)
        self.latency.record(events, admitted.rows)
        result = self.finish(ranges, admitted.expected, admitted.rewind, len(admitted.rows),
                             admitted.duplicates, admitted.replayed)
        if held:
            self.guard.hold({p: o for p, o in held.items() if p not in admitted.rewind})
        return result

    def apply_held(self, events: EventBatch, expired: dict[int, list[int]]) -> dict:
        """Held events released late (their item arrived), and held offsets dead-lettered
        (`expired`): fill their holes. -> {"applied", "duplicates"}."""
        self._await_items(set(events.item_id))
        rows = self.guard.admit_late(events)
        apply_rows(self.users, events, rows, self.history_len, self.items)
        self.latency.record(events, rows)
        self.guard.forget(expired)
        self.applied += len(rows)
        self.duplicates += len(events) - len(rows)
        return {"applied": len(rows), "duplicates": len(events) - len(rows)}

    def _await_items(self, item_ids: set[str]) -> None:
        """Wait (bounded) until this shard's catalog has `item_ids`, where it follows one."""
        deadline = time.monotonic() + CATALOG_CATCH_UP_S
        while (self.catalogs is not None and self.items is not None
               and not item_ids.issubset(self.items.index) and time.monotonic() < deadline):
            time.sleep(0.02)  # the follower thread replaces self.items meanwhile

    def apply_profiles(self, records: list[ProfileRecord], ranges: Ranges) -> dict:
        """Set or delete profiles: this shard's records of one profile-consumer batch (in
        offset order), and the batch's ranges per partition (every shard gets every
        batch's). Records below the covered offset were applied before and are skipped;
        a range above it (this shard restarted from an older snapshot) is refused with a
        `rewind`. -> {"applied", "replayed", "changed", "rewind"}."""
        expected, rewind = self.profile_guard.expect(ranges)
        fresh = [r for r in records if r[0] not in rewind]
        new = [r for r in fresh if r[1] >= expected[r[0]]]
        changed = apply_profiles(self.users, new)
        self.profile_guard.cover(ranges, expected, rewind)
        self.profiles_applied += len(new)
        self._snapshot_when_due()
        return {"applied": len(new), "replayed": len(fresh) - len(new), "changed": changed,
                "rewind": rewind}

    def profile_offsets(self) -> dict:
        """{"incarnation": id of this start, "covered": {partition: [epoch, next offset]}}."""
        return {"incarnation": self.incarnation,
                "covered": {p: list(c) for p, c in self.profile_guard.covered.items()}}

    def set_items(self, item_vectors, item_ids: list[str]) -> None:
        """A new catalog version's vectors [N, H] for the personal prompts to move in."""
        if self.personal:  # one reference replaced: a batch reads it once
            self.items = ItemSpace(item_vectors, {item: i for i, item in enumerate(item_ids)},
                                   self.rates)

    def finish(self, ranges: Ranges, expected: dict[int, int], rewind: dict[int, int],
               applied: int, duplicates: int, replayed: int) -> dict:
        """Close a batch: record its ranges and counts, snapshot when due -> `apply`'s
        result."""
        from services import metrics

        self.guard.cover(ranges, expected, rewind)
        self.applied += applied
        self.duplicates += duplicates
        self.replayed += replayed
        metrics.users_held().set(len(self.users), tags={"shard": str(self.shard_index)})
        self._snapshot_when_due()
        return {"applied": applied, "duplicates": duplicates, "replayed": replayed,
                "rewind": rewind}

    # --- reads --------------------------------------------------------------
    def get_user(self, user_id: str) -> dict | None:
        """{"history": [item_id, oldest first], "state_version": n, "personal": [H] or None,
        "profile": text or None, "profile_attributes": {str: str}, "profile_version": n}."""
        state = self.users.get(user_id)
        if state is None:
            return None
        return {"history": [item for _, _, item in state.history],
                "state_version": state.state_version, "personal": state.personal,
                **_profile_of(state)}

    def profiles(self) -> dict[str, str]:
        """user_id -> profile text, for every user with one (training rounds read them)."""
        return {user: s.profile for user, s in self.users.items() if s.profile}

    def applied_count(self) -> int:
        return self.applied

    def covered_offsets(self) -> dict[int, int]:
        return {p: offset for p, (_, offset) in self.guard.covered.items()}

    def stats(self) -> dict:
        return {"shard": self.shard_index, "users": len(self.users), "applied": self.applied,
                "duplicates": self.duplicates, "replayed": self.replayed,
                "covered": self.covered_offsets(), "restored_from": self.restored_from,
                "profiles_applied": self.profiles_applied,
                "profiles": sum(s.profile is not None for s in self.users.values())}

    def latency_sample(self, clear: bool = False) -> list[float]:
        return self.latency.sample(clear)

    def dump(self) -> dict[str, dict]:
        """Every user's state (tests compare it across runs)."""
        return {user: {"history": [item for _, _, item in s.history],
                       "state_version": s.state_version,
                       "personal": None if s.personal is None else s.personal.tolist(),
                       **_profile_of(s)}
                for user, s in self.users.items()}

    # --- snapshots ------------------------------------------------------------
    def snapshot(self) -> str | None:
        """Write state + covered offsets now and wait for it (tests, shutdown)."""
        if not self.snapshots:
            return None
        self.snapshots.wait()
        self._last_snapshot = time.monotonic()
        return self.snapshots.write(self._capture())

    def _snapshot_when_due(self) -> None:
        if time.monotonic() - self._last_snapshot >= self.snapshot_every_s:
            self._housekeeping()

    def _housekeeping(self) -> None:
        if self.snapshots and self.snapshots.busy():
            return  # one write at a time; the next batch tries again
        if self.snapshots:
            self.snapshots.write_in_background(self._capture())
        self._last_snapshot = time.monotonic()
        # A full collection walks every live object: with a few hundred thousand user-state
        # objects it froze the shard for 150-260 ms (measured in bench.ingest). The state
        # has no reference cycles, so what lives now leaves the collector's sight;
        # refcounting still frees it.
        gc.freeze()

    def _capture(self) -> Captured:
        dim = self.items.vectors.shape[1] if self.items is not None else 0
        meta = {"covered": {str(p): list(c) for p, c in self.guard.covered.items()},
                "holes": {str(p): sorted(h) for p, h in self.guard.holes.items()},
                "applied": self.applied, "duplicates": self.duplicates,
                "profile_covered": {str(p): list(c)
                                    for p, c in self.profile_guard.covered.items()}}
        return capture(self.users, self.guard.seen, dim, meta)

    def _restore(self) -> str | None:
        restored = self.snapshots.restore() if self.snapshots else None
        if restored is None:
            return None
        meta = restored.meta
        self.guard.covered = {int(p): (c[0], c[1]) for p, c in meta["covered"].items()}
        self.guard.seen = restored.seen
        self.guard.holes = {int(p): set(h) for p, h in meta.get("holes", {}).items()}
        self.applied, self.duplicates = meta["applied"], meta["duplicates"]
        self.profile_guard.covered = {int(p): (c[0], c[1])
                                      for p, c in meta.get("profile_covered", {}).items()}
        self.users = restored.users
        log.info("shard %d restored %d users from %s (covered %s)", self.shard_index,
                 len(self.users), restored.name, self.guard.covered)
        return restored.name


def _profile_of(state: UserState) -> dict:
    return {"profile": state.profile, "profile_attributes": dict(state.profile_attributes),
            "profile_version": state.profile_version}
