"""UserStateShard: the per-user prompt state of the users routed to one shard.

State per user:
- `history`: the most recent `history_len` items, ordered by event time (late events
  are inserted in place, not appended);
- `personal`: a personal prompt vector [H], moved toward each event's item by the rule
  in `services.model.personal_prompt_update` (online, no training round needed);
- `state_version`: +1 per applied event, so caches downstream know when to refresh.

Exactly-once apply, two guards:
- offsets: the shard records, per partition, the next offset it expects (`covered`),
  with the topic's id as the epoch (a recreated topic restarts offsets at 0).
  Every consumer batch states the offset range it spans for each partition, and every
  shard is called for every batch (with or without events for it). A replay (range
  starts below `covered`) skips what was applied; a gap (range starts above
  `covered`: this shard restarted from an older snapshot) is refused with a rewind
  request, and the consumer seeks back.
- event ids: an `event_id` seen within the dedupe window (a producer's duplicate sent
  as a new record) is counted as a duplicate and changes nothing.

`apply` takes a whole consumer batch as columns (`ShardEvents`) and applies it per batch:
offsets are checked per partition range, event ids with set operations, and each user's
events at once (history merged and trimmed once; the personal prompts of all users moved
together, step by step). The result is exactly that of applying the events one by one
in batch order (`apply_one_by_one`, kept as the reference and for the rare batch that
holds an event id already seen): same histories, state versions, dedupe window, and
bit-identical float32 personal prompts.

Snapshots (parquet) hold the state with the `covered` offsets it reflects; a restarted
shard restores the latest one and asks consumers to rewind to it. `apply` only copies
the state (a few ms) and a writer thread writes the copy, so a snapshot never holds up
the events behind it.
"""

from __future__ import annotations

import bisect
import gc
import json
import logging
import operator
import shutil
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.model import EVENT_WEIGHTS, personal_prompt_update

log = logging.getLogger(__name__)

# One event as a row: (partition, offset, event_id, user_id, item_id, ts, type,
# kafka_timestamp_ms). Tests and the reference path use rows; consumers send columns.
WireEvent = tuple[int, int, str, str, str, float, str, int]
KEEP_SNAPSHOTS = 2
# The event-to-state histogram observes one applied event in this many (those whose Kafka
# offset is a multiple of it: an unbiased sample, bursts weighted like steady traffic).
# Ray's metrics agent re-records every histogram observation one by one, in Python, at
# each export; observing every event cost the agent more CPU than the shards' own work
# (README, Benchmarks). The bench's latency figures use every event.
LATENCY_SAMPLE_EVERY = 8
LATENCIES_KEPT = 200_000  # event-to-state latencies kept for `latency_sample` (benchmarks)


class ShardEvents(NamedTuple):
    """One consumer batch's events for one shard, column-wise: row i of each list is one
    event. Eight flat lists pickle far cheaper than one tuple per event (Ray pickles every
    call's arguments), and the shard works on them column by column.

    Rows of one partition are in offset order; kafka_ms is the record's Kafka timestamp
    (0: unknown, not counted in the latency metric).
    """

    partition: list[int]
    offset: list[int]
    event_id: list[str]
    user_id: list[str]
    item_id: list[str]
    ts: list[float]
    type: list[str]
    kafka_ms: list[int]

    @classmethod
    def from_rows(cls, rows: list[WireEvent]) -> ShardEvents:
        if not rows:
            return cls([], [], [], [], [], [], [], [])
        return cls(*map(list, zip(*rows, strict=True)))

    def rows(self) -> list[WireEvent]:
        return list(zip(*self, strict=True))


@dataclass
class _Captured:
    """A consistent copy of a shard's state, written by the snapshot thread."""

    users: list[str]
    histories: list[list[tuple[float, str, str]]]
    state_versions: list[int]
    personal: np.ndarray | None  # [U, H] float32, rows of users without one are zeros
    has_personal: np.ndarray  # [U] bool
    seen: list[str]
    meta: dict


@dataclass
class UserState:
    history: list[tuple[float, str, str]] = field(default_factory=list)  # (ts, event_id, item)
    state_version: int = 0
    personal: np.ndarray | None = None  # [H] float32

    def add(self, ts: float, event_id: str, item_id: str, history_len: int) -> None:
        bisect.insort(self.history, (ts, event_id, item_id))
        if len(self.history) > history_len:
            del self.history[0]
        self.state_version += 1


class UserStateShard:
    def __init__(self, shard_index: int, history_len: int, dedupe_window: int,
                 item_vectors: np.ndarray | None = None, item_ids: list[str] | None = None,
                 personal_alpha: float = 0.1, snapshot_dir: str | None = None,
                 snapshot_every_s: float = 10.0):
        self.shard_index = shard_index
        self.history_len = history_len
        self.dedupe_window = dedupe_window
        self.item_vectors = item_vectors  # [N, H] frozen catalog vectors, or None
        self.item_index = {item: i for i, item in enumerate(item_ids or [])}
        self.personal_alpha = personal_alpha
        # personal_prompt_update's rate per event type, as the float32 it multiplies by.
        self._rates = {kind: np.float32(min(1.0, personal_alpha * weight))
                       for kind, weight in EVENT_WEIGHTS.items()}
        self._default_rate = np.float32(min(1.0, personal_alpha * 1.0))
        self.snapshot_dir = Path(snapshot_dir) / f"shard-{shard_index}" if snapshot_dir else None
        self.snapshot_every_s = snapshot_every_s
        self.users: dict[str, UserState] = {}
        self.covered: dict[int, tuple[str, int]] = {}  # partition -> (epoch, next offset)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.applied = self.duplicates = self.replayed = 0
        self.latencies_ms: list[float] = []  # bounded sample for benchmarks
        self._last_snapshot = time.monotonic()
        self._snapshot_seq = 0
        self._writer: threading.Thread | None = None
        self.restored_from: str | None = self._restore()
        gc.freeze()  # see _housekeeping

    # --- applying events -------------------------------------------------
    def _next_offset(self, partition: int, epoch: str) -> int:
        known_epoch, offset = self.covered.get(partition, (epoch, 0))
        return offset if known_epoch == epoch else 0  # a new topic epoch starts at 0

    def apply(self, events: ShardEvents | list[WireEvent],
              ranges: dict[int, tuple[str, int, int]]) -> dict:
        """Apply one consumer batch.

        events: this shard's events of the batch (`ShardEvents`, or a list of `WireEvent`
        rows); ranges: partition -> (topic epoch, first offset, last offset + 1) of the
        whole batch (every shard gets every batch's ranges, events or not).
        Returns counts and `rewind` {partition: offset} for ranges this shard cannot take.
        """
        if not isinstance(events, ShardEvents):
            events = ShardEvents.from_rows(events)
        expected = {p: self._next_offset(p, epoch) for p, (epoch, _, _) in ranges.items()}
        rewind = {p: expected[p] for p, (_, low, _) in ranges.items() if low > expected[p]}
        n = len(events.event_id)
        if not rewind and all(low >= expected[p] for p, (_, low, _) in ranges.items()):
            # The usual case: each range starts where this shard stopped, so every row is
            # new by offset (a batch's rows lie inside its ranges).
            rows: list[int] | range = range(n)
            replayed = 0
        else:
            part, offset = events.partition, events.offset
            rows = [i for i in range(n) if part[i] not in rewind]
            kept = [i for i in rows if offset[i] >= expected[part[i]]]
            replayed, rows = len(rows) - len(kept), kept
        ids = events.event_id if len(rows) == n else [events.event_id[i] for i in rows]
        if self._seen.keys().isdisjoint(ids) and len(set(ids)) == len(ids):
            # No id seen before, none twice: all are applied, and the window ends up as
            # if each had been remembered in turn (evictions only remove ids).
            new = rows
            self._seen.update(dict.fromkeys(ids))
            excess = len(self._seen) - self.dedupe_window
            if excess > 0:
                deque(map(self._seen.popitem, repeat(False, excess)), maxlen=0)
        else:
            # A producer's duplicate: decide id by id, in order, as one by one would
            # (an id evicted by an earlier row of this batch counts as new again).
            new = []
            for i in rows:
                if events.event_id[i] not in self._seen:
                    self._remember(events.event_id[i])
                    new.append(i)
        self._apply_rows(events, new)
        self._record_latency(events, new)
        return self._finish(ranges, expected, rewind, len(new), len(rows) - len(new),
                            replayed)

    def apply_one_by_one(self, events: ShardEvents | list[WireEvent],
                         ranges: dict[int, tuple[str, int, int]]) -> dict:
        """`apply`, one event at a time: the rule that `apply` must equal (tests compare
        them on random batches; benchmarks time both)."""
        from services import metrics

        rows = events.rows() if isinstance(events, ShardEvents) else events
        expected = {p: self._next_offset(p, epoch) for p, (epoch, _, _) in ranges.items()}
        rewind = {p: expected[p] for p, (_, low, _) in ranges.items() if low > expected[p]}
        applied = duplicates = replayed = 0
        now_ms = time.time() * 1000
        latency = metrics.event_to_state_seconds()
        for partition, offset, event_id, user_id, item_id, ts, kind, kafka_ms in rows:
            if partition in rewind:
                continue
            if offset < expected[partition]:
                replayed += 1
                continue
            if event_id in self._seen:
                duplicates += 1
                continue
            self._remember(event_id)
            self._apply_one(user_id, item_id, ts, event_id, kind)
            applied += 1
            if kafka_ms > 0:
                if offset % LATENCY_SAMPLE_EVERY == 0:
                    latency.observe(max(0.0, now_ms - kafka_ms) / 1000)
                if len(self.latencies_ms) < LATENCIES_KEPT:
                    self.latencies_ms.append(now_ms - kafka_ms)
        return self._finish(ranges, expected, rewind, applied, duplicates, replayed)

    def _finish(self, ranges: dict[int, tuple[str, int, int]], expected: dict[int, int],
                rewind: dict[int, int], applied: int, duplicates: int, replayed: int) -> dict:
        from services import metrics

        for partition, (epoch, _, high) in ranges.items():
            if partition not in rewind:
                self.covered[partition] = (epoch, max(expected[partition], high))
        self.applied += applied
        self.duplicates += duplicates
        self.replayed += replayed
        metrics.users_held().set(len(self.users), tags={"shard": str(self.shard_index)})
        if time.monotonic() - self._last_snapshot >= self.snapshot_every_s:
            self._housekeeping()
        return {"applied": applied, "duplicates": duplicates, "replayed": replayed,
                "rewind": rewind}

    def _apply_rows(self, events: ShardEvents, rows: list[int] | range) -> None:
        """Apply the given rows (new, deduplicated), grouped by user, in batch order."""
        by_user: dict[str, list[int]] = {}
        user_col = events.user_id
        for i in rows:
            if (mine := by_user.get(user_col[i])) is None:
                by_user[user_col[i]] = [i]
            else:
                mine.append(i)
        ts, event_id, item_id = events.ts, events.event_id, events.item_id
        limit = self.history_len
        moves: list[tuple[UserState, list[int]]] = []
        for user_id, mine in by_user.items():
            state = self.users.get(user_id)
            if state is None:
                state = self.users[user_id] = UserState()
            history = state.history
            if len(mine) == 1:
                bisect.insort(history, (ts[mine[0]], event_id[mine[0]], item_id[mine[0]]))
            else:
                # Inserting one by one and dropping the oldest past the limit keeps the
                # `limit` largest (ts, event_id, item) tuples; so does one sort and trim.
                take = operator.itemgetter(*mine)  # len(mine) >= 2: returns tuples
                history.extend(zip(take(ts), take(event_id), take(item_id), strict=True))
                history.sort()
            if len(history) > limit:
                del history[:len(history) - limit]
            state.state_version += len(mine)
            if self.item_vectors is not None:
                moves.append((state, mine))
        if moves:
            self._move_personal(events, moves)

    def _move_personal(self, events: ShardEvents, moves: list[tuple[UserState, list[int]]]
                       ) -> None:
        """Move each user's personal prompt over their events, in order.

        Per user the rule is sequential (float32, rounded after each step), so users are
        moved together instead: at step t every user with a t-th event takes it, with
        the same float32 operations as `personal_prompt_update`, so each prompt is
        bit-identical to the one-by-one result. When one user holds most of the batch
        (a long session), steps ~ events and the plain loop is cheaper: each user's events
        are then applied in turn.
        """
        vectors = self.item_vectors
        # Vector row and rate of every event of the batch, column-wise (C-level maps).
        item_rows = list(map(self.item_index.get, events.item_id))
        rate_rows = list(map(self._rates.get, events.type, repeat(self._default_rate)))
        runs: list[tuple[UserState, list[int], list[np.float32]]] = []
        total = longest = 0
        for state, mine in moves:
            if len(mine) == 1:
                items, steps = [item_rows[mine[0]]], [rate_rows[mine[0]]]
            else:
                take = operator.itemgetter(*mine)
                items, steps = list(take(item_rows)), list(take(rate_rows))
            if None in items:  # items without a vector leave the prompt as it is
                steps = [r for r, j in zip(steps, items, strict=True) if j is not None]
                items = [j for j in items if j is not None]
                if not items:
                    continue
            if state.personal is None:  # the first event sets the prompt to the item
                state.personal = vectors[items[0]].astype(np.float32, copy=True)
                if len(items) == 1:
                    continue
                items, steps = items[1:], steps[1:]
            runs.append((state, items, steps))
            total += len(items)
            longest = max(longest, len(items))
        if not runs:
            return
        # A step costs ~6 numpy calls, one event of the plain loop ~3.
        if longest * 2 >= total or len(runs) == 1:
            for state, items, steps in runs:
                personal = state.personal
                for j, rate in zip(items, steps, strict=True):
                    personal += rate * (vectors[j] - personal)
            return
        runs.sort(key=lambda run: -len(run[1]))
        lengths = [len(items) for _, items, _ in runs]
        stacked = np.stack([state.personal for state, _, _ in runs])  # [U, H] float32
        item_grid = np.zeros((len(runs), longest), np.int64)
        rate_grid = np.zeros((len(runs), longest), np.float32)
        for row, (_, items, steps) in enumerate(runs):
            item_grid[row, :len(items)] = items
            rate_grid[row, :len(items)] = steps
        active = len(runs)
        for t in range(longest):
            while lengths[active - 1] <= t:  # runs are sorted longest first
                active -= 1
            moving = stacked[:active]
            moving += rate_grid[:active, t, None] * (vectors[item_grid[:active, t]] - moving)
        for row, (state, _, _) in enumerate(runs):
            state.personal[...] = stacked[row]

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > self.dedupe_window:
            self._seen.popitem(last=False)

    def _apply_one(self, user_id: str, item_id: str, ts: float, event_id: str,
                   kind: str) -> None:
        state = self.users.setdefault(user_id, UserState())
        state.add(ts, event_id, item_id, self.history_len)
        index = self.item_index.get(item_id)
        if self.item_vectors is not None and index is not None:
            state.personal = personal_prompt_update(state.personal, self.item_vectors[index],
                                                    kind, self.personal_alpha)

    def _record_latency(self, events: ShardEvents, rows: list[int] | range) -> None:
        from services import metrics

        now_ms = time.time() * 1000
        kafka_ms, offset = events.kafka_ms, events.offset
        timed = [i for i in rows if kafka_ms[i] > 0]
        sampled = [max(0.0, now_ms - kafka_ms[i]) / 1000 for i in timed
                   if offset[i] % LATENCY_SAMPLE_EVERY == 0]
        if sampled:
            metrics.observe_all(metrics.event_to_state_seconds(), sampled)
        room = LATENCIES_KEPT - len(self.latencies_ms)
        if room > 0:
            self.latencies_ms.extend(now_ms - kafka_ms[i] for i in timed[:room])

    # --- reads --------------------------------------------------------------
    def get_user(self, user_id: str) -> dict | None:
        """{"history": [item_id, oldest first], "state_version": n, "personal": [H] or None}."""
        state = self.users.get(user_id)
        if state is None:
            return None
        return {"history": [item for _, _, item in state.history],
                "state_version": state.state_version, "personal": state.personal}

    def applied_count(self) -> int:
        return self.applied

    def covered_offsets(self) -> dict[int, int]:
        return {p: offset for p, (_, offset) in self.covered.items()}

    def stats(self) -> dict:
        return {"shard": self.shard_index, "users": len(self.users), "applied": self.applied,
                "duplicates": self.duplicates, "replayed": self.replayed,
                "covered": self.covered_offsets(), "restored_from": self.restored_from}

    def latency_sample(self, clear: bool = False) -> list[float]:
        sample = list(self.latencies_ms)
        if clear:
            self.latencies_ms.clear()
        return sample

    def dump(self) -> dict[str, dict]:
        """Every user's state (tests compare it across runs)."""
        return {user: {"history": [item for _, _, item in s.history],
                       "state_version": s.state_version,
                       "personal": None if s.personal is None else s.personal.tolist()}
                for user, s in self.users.items()}

    # --- snapshots ------------------------------------------------------------
    def snapshot(self) -> str | None:
        """Write state + covered offsets now and wait for it (tests, shutdown)."""
        if not self.snapshot_dir:
            return None
        if self._writer is not None:
            self._writer.join()
        self._last_snapshot = time.monotonic()
        return self._write(self._capture())

    def _housekeeping(self) -> None:
        if self.snapshot_dir:
            self._snapshot_in_background()
        else:
            self._last_snapshot = time.monotonic()
        # A full collection walks every live object: with a few hundred thousand user-state
        # objects it froze the shard for 150-260 ms (measured in bench.ingest). The state
        # has no reference cycles, so what lives now leaves the collector's sight;
        # refcounting still frees it.
        gc.freeze()

    def _snapshot_in_background(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            return  # one write at a time; a later batch tries again
        captured = self._capture()
        self._last_snapshot = time.monotonic()
        self._writer = threading.Thread(target=self._write, args=(captured,), daemon=True,
                                        name=f"snapshot-{self.shard_index}")
        self._writer.start()

    def _capture(self) -> _Captured:
        users = list(self.users)
        states = [self.users[u] for u in users]
        dim = self.item_vectors.shape[1] if self.item_vectors is not None else 0
        has_personal = np.array([s.personal is not None for s in states], bool)
        personal = np.zeros((len(states), dim), np.float32) if dim else None
        if personal is not None:
            for row, state in enumerate(states):
                if state.personal is not None:
                    personal[row] = state.personal
        return _Captured(
            users=users, histories=[list(s.history) for s in states],
            state_versions=[s.state_version for s in states], personal=personal,
            has_personal=has_personal, seen=list(self._seen),
            meta={"covered": {str(p): list(c) for p, c in self.covered.items()},
                  "applied": self.applied, "duplicates": self.duplicates,
                  "users": len(users), "created": time.time()})

    def _write(self, captured: _Captured) -> str:
        """Write a captured state atomically (a temp dir renamed into place)."""
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        if captured.personal is not None and len(captured.users):
            personal = pa.FixedSizeListArray.from_arrays(
                pa.array(captured.personal.reshape(-1)), captured.personal.shape[1],
                mask=pa.array(~captured.has_personal))
        else:
            personal = pa.nulls(len(captured.users), pa.list_(pa.float32()))
        table = pa.table({
            "user_id": captured.users,
            "hist_ts": [[h[0] for h in hist] for hist in captured.histories],
            "hist_event": [[h[1] for h in hist] for hist in captured.histories],
            "hist_item": [[h[2] for h in hist] for hist in captured.histories],
            "state_version": pa.array(captured.state_versions, pa.int64()),
            "personal": personal,
        })
        self._snapshot_seq += 1
        name = f"snap-{time.time_ns():020d}-{self._snapshot_seq:06d}"
        tmp = self.snapshot_dir / f"tmp-{name}"
        tmp.mkdir()
        pq.write_table(table, tmp / "state.parquet")
        pq.write_table(pa.table({"event_id": pa.array(captured.seen, pa.string())}),
                       tmp / "seen.parquet")
        (tmp / "meta.json").write_text(json.dumps(captured.meta))
        final = self.snapshot_dir / name
        tmp.rename(final)
        for old in sorted(self.snapshot_dir.glob("snap-*"))[:-KEEP_SNAPSHOTS]:
            shutil.rmtree(old, ignore_errors=True)
        return str(final)

    def _restore(self) -> str | None:
        if not self.snapshot_dir or not self.snapshot_dir.exists():
            return None
        for tmp in self.snapshot_dir.glob("tmp-*"):  # a crash mid-write leaves these
            shutil.rmtree(tmp, ignore_errors=True)
        complete = [d for d in sorted(self.snapshot_dir.glob("snap-*"))
                    if (d / "meta.json").exists()]
        if not complete:
            return None
        latest = complete[-1]
        meta = json.loads((latest / "meta.json").read_text())
        self.covered = {int(p): (c[0], c[1]) for p, c in meta["covered"].items()}
        self.applied, self.duplicates = meta["applied"], meta["duplicates"]
        for row in pq.read_table(latest / "state.parquet").to_pylist():
            state = UserState(history=list(zip(row["hist_ts"], row["hist_event"],
                                               row["hist_item"], strict=True)),
                              state_version=row["state_version"],
                              personal=None if row["personal"] is None
                              else np.asarray(row["personal"], np.float32))
            self.users[row["user_id"]] = state
        for event_id in pq.read_table(latest / "seen.parquet")["event_id"].to_pylist():
            self._seen[event_id] = None
        log.info("shard %d restored %d users from %s (covered %s)", self.shard_index,
                 len(self.users), latest.name, self.covered)
        return latest.name
