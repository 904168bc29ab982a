"""Shard snapshots: the user state with the `covered` offsets it reflects, as parquet.

The state includes each user's profile (text, attributes, profile_version) and the meta
the offsets of the profile topic it covers (`profile_covered`); a snapshot written before
profiles existed restores with none.

A snapshot is a directory <dir>/snap-<time>-<seq>/ holding state.parquet (one row per
user), seen.parquet (the dedupe window) and meta.json (covered offsets, counts), written
to a temp dir and renamed into place, so a crash mid-write leaves no half snapshot. The
last `KEEP_SNAPSHOTS` are kept. The shard only copies its state (`capture`, a few ms);
`write` may then run on a writer thread, so a snapshot never holds up the events behind it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streaming.apply import UserState

KEEP_SNAPSHOTS = 2


@dataclass
class Captured:
    """A consistent copy of a shard's state, written by the snapshot thread."""

    users: list[str]
    histories: list[list[tuple[float, str, str]]]
    state_versions: list[int]
    personal: np.ndarray | None  # [U, H] float32, rows of users without one are zeros
    has_personal: np.ndarray  # [U] bool
    profiles: list[str | None]
    profile_attributes: list[dict[str, str]]
    profile_versions: list[int]
    seen: list[str]
    meta: dict  # covered {partition: [epoch, offset]}, applied, duplicates, users, created


@dataclass
class Restored:
    name: str
    users: dict[str, UserState]
    seen: OrderedDict[str, None]
    meta: dict


def capture(users: dict[str, UserState], seen: OrderedDict[str, None], dim: int,
            meta: dict) -> Captured:
    """Copy the state (dim: the personal prompts' width H, 0 without item vectors)."""
    names = list(users)
    states = [users[u] for u in names]
    has_personal = np.array([s.personal is not None for s in states], bool)
    personal = np.zeros((len(states), dim), np.float32) if dim else None
    if personal is not None:
        for row, state in enumerate(states):
            if state.personal is not None:
                personal[row] = state.personal
    return Captured(users=names, histories=[list(s.history) for s in states],
                    state_versions=[s.state_version for s in states], personal=personal,
                    has_personal=has_personal,
                    profiles=[s.profile for s in states],
                    profile_attributes=[dict(s.profile_attributes) for s in states],
                    profile_versions=[s.profile_version for s in states], seen=list(seen),
                    meta={**meta, "users": len(names), "created": time.time()})


class SnapshotStore:
    """One shard's snapshot directory, with at most one background write at a time."""

    def __init__(self, directory: Path, shard_index: int):
        self.directory = directory
        self.shard_index = shard_index
        self._seq = 0
        self._writer: threading.Thread | None = None

    def busy(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()

    def write_in_background(self, captured: Captured) -> None:
        self._writer = threading.Thread(target=self.write, args=(captured,), daemon=True,
                                        name=f"snapshot-{self.shard_index}")
        self._writer.start()

    def write(self, captured: Captured) -> str:
        """Write a captured state atomically (a temp dir renamed into place)."""
        self.directory.mkdir(parents=True, exist_ok=True)
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
            "profile": pa.array(captured.profiles, pa.string()),
            "profile_attributes": pa.array([list(a.items()) for a in captured.profile_attributes],
                                           pa.map_(pa.string(), pa.string())),
            "profile_version": pa.array(captured.profile_versions, pa.int64()),
        })
        self._seq += 1
        name = f"snap-{time.time_ns():020d}-{self._seq:06d}"
        tmp = self.directory / f"tmp-{name}"
        tmp.mkdir()
        pq.write_table(table, tmp / "state.parquet")
        pq.write_table(pa.table({"event_id": pa.array(captured.seen, pa.string())}),
                       tmp / "seen.parquet")
        (tmp / "meta.json").write_text(json.dumps(captured.meta))
        final = self.directory / name
        tmp.rename(final)
        for old in sorted(self.directory.glob("snap-*"))[:-KEEP_SNAPSHOTS]:
            shutil.rmtree(old, ignore_errors=True)
        return str(final)

    def restore(self) -> Restored | None:
        """The latest complete snapshot, or None."""
        if not self.directory.exists():
            return None
        for tmp in self.directory.glob("tmp-*"):  # a crash mid-write leaves these
            shutil.rmtree(tmp, ignore_errors=True)
        complete = [d for d in sorted(self.directory.glob("snap-*"))
                    if (d / "meta.json").exists()]
        if not complete:
            return None
        latest = complete[-1]
        users = {}
        for row in pq.read_table(latest / "state.parquet").to_pylist():
            users[row["user_id"]] = UserState(
                history=list(zip(row["hist_ts"], row["hist_event"], row["hist_item"],
                                 strict=True)),
                state_version=row["state_version"],
                personal=None if row["personal"] is None
                else np.asarray(row["personal"], np.float32),
                profile=row.get("profile"),  # absent from snapshots older than profiles
                profile_attributes=dict(row.get("profile_attributes") or ()),
                profile_version=row.get("profile_version") or 0)
        seen = OrderedDict.fromkeys(
            pq.read_table(latest / "seen.parquet")["event_id"].to_pylist())
        return Restored(name=latest.name, users=users, seen=seen,
                        meta=json.loads((latest / "meta.json").read_text()))
