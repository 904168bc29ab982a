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
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.model import personal_prompt_update

log = logging.getLogger(__name__)

# One event as shipped from a consumer to a shard (a tuple keeps Ray's pickling cheap):
# (partition, offset, event_id, user_id, item_id, ts, type, kafka_timestamp_ms)
WireEvent = tuple[int, int, str, str, str, float, str, int]
KEEP_SNAPSHOTS = 2


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

    def apply(self, events: list[WireEvent], ranges: dict[int, tuple[str, int, int]]) -> dict:
        """Apply one consumer batch.

        ranges: partition -> (topic epoch, first offset, last offset + 1) of the whole batch.
        Returns counts and `rewind` {partition: offset} for ranges this shard cannot take.
        """
        from services import metrics

        expected = {p: self._next_offset(p, epoch) for p, (epoch, _, _) in ranges.items()}
        rewind = {p: expected[p] for p, (_, low, _) in ranges.items() if low > expected[p]}
        applied = duplicates = replayed = 0
        now_ms = time.time() * 1000
        latency = metrics.event_to_state_seconds()
        for partition, offset, event_id, user_id, item_id, ts, kind, kafka_ms in events:
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
                latency.observe(max(0.0, now_ms - kafka_ms) / 1000)
                if len(self.latencies_ms) < 200_000:
                    self.latencies_ms.append(now_ms - kafka_ms)
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
