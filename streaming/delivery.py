"""The shards' exactly-once protocol: which events of a consumer batch are new.

Two guards:
- offsets: a shard records, per partition, the next offset it expects (`covered`), with
  the topic's id as the epoch (a recreated topic restarts offsets at 0). Every consumer
  batch states the offset range it spans for each partition, and every shard is called
  for every batch (with or without events for it). A replay (range starts below
  `covered`) skips what was applied; a gap (range starts above `covered`: the shard
  restarted from an older snapshot) is refused with a rewind request, and the consumer
  seeks back.
- event ids: an `event_id` seen within the dedupe window (a producer's duplicate sent as
  a new record) is counted as a duplicate and changes nothing.
- holes: offsets inside a covered range whose event the consumer held back (its item was
  not in the catalog yet, `streaming.held`). A replay admits them although they lie
  below `covered`; applying one (released late, or replayed) fills its hole.

`DeliveryGuard.admit` decides a whole batch with set operations; the result is exactly
that of deciding event by event in batch order (`expect` + `remember`, as the reference
apply in tests/streaming/reference.py does).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from itertools import repeat

from services.batch import EventBatch

# partition -> (topic epoch, first offset, last offset + 1) of a whole consumer batch
Ranges = dict[int, tuple[str, int, int]]


@dataclass
class Admitted:
    """A batch's verdict: the rows to apply and what the others were."""

    rows: list[int] | range  # new rows (not replayed, not duplicates), in batch order
    duplicates: int
    replayed: int
    expected: dict[int, int]  # partition -> the offset the shard expected
    rewind: dict[int, int]  # partition -> offset to seek back to (a gap: nothing applied)


class DeliveryGuard:
    def __init__(self, dedupe_window: int):
        self.dedupe_window = dedupe_window
        self.covered: dict[int, tuple[str, int]] = {}  # partition -> (epoch, next offset)
        self.seen: OrderedDict[str, None] = OrderedDict()  # the dedupe window, oldest first
        self.holes: dict[int, set[int]] = {}  # partition -> held offsets not yet applied

    def next_offset(self, partition: int, epoch: str) -> int:
        known_epoch, offset = self.covered.get(partition, (epoch, 0))
        return offset if known_epoch == epoch else 0  # a new topic epoch starts at 0

    def expect(self, ranges: Ranges) -> tuple[dict[int, int], dict[int, int]]:
        """(expected next offset, rewind offset for a gap) per partition of the batch."""
        expected = {p: self.next_offset(p, epoch) for p, (epoch, _, _) in ranges.items()}
        rewind = {p: expected[p] for p, (_, low, _) in ranges.items() if low > expected[p]}
        return expected, rewind

    def remember(self, event_id: str) -> None:
        self.seen[event_id] = None
        if len(self.seen) > self.dedupe_window:
            self.seen.popitem(last=False)

    def admit(self, events: EventBatch, ranges: Ranges) -> Admitted:
        """Decide which rows of `events` are new, and remember their ids."""
        expected, rewind = self.expect(ranges)
        n = len(events)
        if not rewind and all(low >= expected[p] for p, (_, low, _) in ranges.items()):
            # The usual case: each range starts where this shard stopped, so every row is
            # new by offset (a batch's rows lie inside its ranges).
            rows: list[int] | range = range(n)
            replayed = 0
        else:
            part, offset = events.partition, events.offset
            rows = [i for i in range(n) if part[i] not in rewind]
            holes = self.holes
            kept = [i for i in rows if offset[i] >= expected[part[i]]
                    or offset[i] in holes.get(part[i], ())]
            replayed, rows = len(rows) - len(kept), kept
        ids = events.event_id if len(rows) == n else [events.event_id[i] for i in rows]
        if self.seen.keys().isdisjoint(ids) and len(set(ids)) == len(ids):
            # No id seen before, none twice: all are new, and the window ends up as if
            # each had been remembered in turn (evictions only remove ids).
            new = rows
            self.seen.update(dict.fromkeys(ids))
            excess = len(self.seen) - self.dedupe_window
            if excess > 0:
                deque(map(self.seen.popitem, repeat(False, excess)), maxlen=0)
        else:
            # A producer's duplicate: decide id by id, in order, as one by one would
            # (an id evicted by an earlier row of this batch counts as new again).
            new = []
            for i in rows:
                if events.event_id[i] not in self.seen:
                    self.remember(events.event_id[i])
                    new.append(i)
        if self.holes:
            self.fill(events, rows)  # a hole replayed as an event_id duplicate is filled too
        return Admitted(new, len(rows) - len(new), replayed, expected, rewind)

    def hold(self, holes: dict[int, list[int]]) -> None:
        """Record offsets the consumer held back from a batch (call after `cover`)."""
        for partition, offsets in holes.items():
            self.holes.setdefault(partition, set()).update(offsets)

    def fill(self, events: EventBatch, rows: list[int] | range) -> None:
        """The holes of `rows` (applied) are no longer holes."""
        for i in rows:
            if (holes := self.holes.get(events.partition[i])) is not None:
                holes.discard(events.offset[i])
                if not holes:
                    del self.holes[events.partition[i]]

    def admit_late(self, events: EventBatch) -> list[int]:
        """Rows of held events released late: new unless their event_id was seen."""
        new = []
        for i in range(len(events)):
            if events.event_id[i] not in self.seen:
                self.remember(events.event_id[i])
                new.append(i)
        self.fill(events, range(len(events)))  # a duplicate's hole is filled as well
        return new

    def forget(self, holes: dict[int, list[int]]) -> None:
        """Held offsets that were dead-lettered: never to be applied."""
        for partition, offsets in holes.items():
            left = self.holes.get(partition, set()) - set(offsets)
            if left:
                self.holes[partition] = left
            else:
                self.holes.pop(partition, None)

    def cover(self, ranges: Ranges, expected: dict[int, int], rewind: dict[int, int]) -> None:
        """Record the batch's ranges as applied (all but the partitions sent back)."""
        for partition, (epoch, _, high) in ranges.items():
            if partition not in rewind:
                self.covered[partition] = (epoch, max(expected[partition], high))
