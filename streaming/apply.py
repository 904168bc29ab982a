"""A user's state in a shard, and the fast apply of a batch's new events to it.

State per user:
- `history`: the most recent `history_len` items, ordered by event time (late events are
  inserted in place, not appended);
- `personal`: a personal prompt vector [H], moved toward each event's item by the rule
  in `services.personal` (online, no training round needed);
- `state_version`: +1 per applied event, so caches downstream know when to refresh;
- `profile` and `profile_attributes`: the user's own words from the `promptrec.users`
  topic (None: none), set or deleted by `apply_profiles`; `profile_version` +1 per
  change, so a cache keyed on it refreshes when the words do (`state_version` counts
  events only). A profile may come before any event: the state then has no history.

`apply_rows` applies a batch's new events column-wise: each user's events at once
(history merged and trimmed once; the personal prompts of all users moved together by
`services.personal.move_batch`). The result is exactly that of applying the events one
by one in batch order (the reference, tests/streaming/reference.py): same histories and
state versions, bit-identical float32 personal prompts.
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field

import numpy as np

from services import personal as rule
from services.batch import EventBatch


@dataclass
class UserState:
    history: list[tuple[float, str, str]] = field(default_factory=list)  # (ts, event_id, item)
    state_version: int = 0
    personal: np.ndarray | None = None  # [H] float32
    profile: str | None = None
    profile_attributes: dict[str, str] = field(default_factory=dict)
    profile_version: int = 0


# One record of the profile topic as a shard gets it: (partition, offset, user_id, text or
# None for a delete, attributes).
ProfileRecord = tuple[int, int, str, str | None, dict[str, str]]


@dataclass
class ItemSpace:
    """The frozen catalog vectors personal prompts move in, and the rates they move by."""

    vectors: np.ndarray  # [N, H] float32
    index: dict[str, int]  # item_id -> row of `vectors`
    rates: rule.EventRates


def apply_rows(users: dict[str, UserState], events: EventBatch, rows: list[int] | range,
               history_len: int, items: ItemSpace | None) -> None:
    """Apply the given rows (new, deduplicated), grouped by user, in batch order."""
    by_user: dict[str, list[int]] = {}
    user_col = events.user_id
    for i in rows:
        if (mine := by_user.get(user_col[i])) is None:
            by_user[user_col[i]] = [i]
        else:
            mine.append(i)
    ts, event_id, item_id = events.ts, events.event_id, events.item_id
    moves: list[tuple[UserState, list[int]]] = []
    for user_id, mine in by_user.items():
        state = users.get(user_id)
        if state is None:
            state = users[user_id] = UserState()
        history = state.history
        if len(mine) == 1:
            bisect.insort(history, (ts[mine[0]], event_id[mine[0]], item_id[mine[0]]))
        else:
            # Inserting one by one and dropping the oldest past the limit keeps the
            # `history_len` largest (ts, event_id, item) tuples; so does one sort and trim.
            take = operator.itemgetter(*mine)  # len(mine) >= 2: returns tuples
            history.extend(zip(take(ts), take(event_id), take(item_id), strict=True))
            history.sort()
        if len(history) > history_len:
            del history[:len(history) - history_len]
        state.state_version += len(mine)
        if items is not None:
            moves.append((state, mine))
    if moves:
        _move_personal(events, moves, items)


def _move_personal(events: EventBatch, moves: list[tuple[UserState, list[int]]],
                   items: ItemSpace) -> None:
    """Gather each user's item rows and rates, then move all their prompts at once."""
    # Vector row and rate of every event of the batch, column-wise (C-level maps).
    item_rows = list(map(items.index.get, events.item_id))
    rate_rows = items.rates.of(events.type)
    runs: list[rule.Run] = []
    states: list[UserState] = []
    for state, mine in moves:
        if len(mine) == 1:
            rows, rates = [item_rows[mine[0]]], [rate_rows[mine[0]]]
        else:
            take = operator.itemgetter(*mine)
            rows, rates = list(take(item_rows)), list(take(rate_rows))
        if None in rows:  # items without a vector leave the prompt as it is
            rates = [r for r, j in zip(rates, rows, strict=True) if j is not None]
            rows = [j for j in rows if j is not None]
            if not rows:
                continue
        runs.append((state.personal, rows, rates))
        states.append(state)
    for state, moved in zip(states, rule.move_batch(items.vectors, runs), strict=True):
        state.personal = moved


def apply_profiles(users: dict[str, UserState], records: list[ProfileRecord]) -> int:
    """Set (text) or delete (None) each record's profile, in order -> how many changed
    one. Keyed upserts: applying a record again leaves the state as it was. A delete
    keeps the user's state (its versions go on counting, so caches never see an old key
    again)."""
    changed = 0
    for _, _, user_id, text, attributes in records:
        state = users.get(user_id)
        if state is None:
            if text is None:
                continue  # nothing to delete
            state = users[user_id] = UserState()
        attributes = attributes if text is not None else {}
        if state.profile == text and state.profile_attributes == attributes:
            continue
        state.profile, state.profile_attributes = text, dict(attributes)
        state.profile_version += 1
        changed += 1
    return changed
