"""Next-item examples from the event log.

An example is (history, target): the user's items before an event, and the
event's item, with the weight of each history event's type (the personal-prompt rule
moves by it: `services.personal`). Validation users are a stable hash-chosen subset;
their last event is held out from training and is the gate's test.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.personal import event_weights

PAD = -1
OPTIONAL_COLUMNS = ("weights", "prompt_target", "text", "query")  # columns that may be None


@dataclass
class Examples:
    history: np.ndarray  # [E, L] int32 catalog indices, oldest first, right-padded with PAD
    target: np.ndarray  # [E] int32 catalog index
    # [E, L] float32 event weight w(type) of each history position (1 at PAD); None:
    # every event weighs 1, a click (data without event types, e.g. MovieLens ratings)
    weights: np.ndarray | None = None
    # [E] int32: the item the prompt alone (a user with no known event) learns to score in
    # this row, PAD for none; None: the row's first history item (its target if empty)
    prompt_target: np.ndarray | None = None
    # [E, U] int32 token ids of the user's own text (services/user_text.py), for versions
    # with user_text; None: no text
    text: np.ndarray | None = None
    # [E, H] float32 sentence vector of what the user asked for before the target (an
    # all-zero row: nothing), scored by a query_gate version; None: no query
    query: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, idx: np.ndarray) -> Examples:
        def rows(column: np.ndarray | None) -> np.ndarray | None:
            return None if column is None else column[idx]

        return Examples(self.history[idx], self.target[idx], rows(self.weights),
                        rows(self.prompt_target), rows(self.text), rows(self.query))

    def trimmed(self) -> Examples:
        """The same examples without the columns past the longest history (rows are
        right-padded), so a batch of short histories costs what they need."""
        width = max(1, int((self.history != PAD).sum(1).max(initial=0)))
        return Examples(self.history[:, :width], self.target,
                        None if self.weights is None else self.weights[:, :width],
                        self.prompt_target, self.text, self.query)

    def save(self, path: str) -> None:
        extra = {name: getattr(self, name) for name in OPTIONAL_COLUMNS
                 if getattr(self, name) is not None}
        np.savez(path, history=self.history, target=self.target, **extra)

    @classmethod
    def load(cls, path: str) -> Examples:
        data = np.load(path)
        return cls(data["history"], data["target"],
                   *(data[name] if name in data.files else None
                     for name in OPTIONAL_COLUMNS))


def _is_validation_user(user_id: str, fraction_per_mille: int) -> bool:
    return zlib.crc32(f"val:{user_id}".encode()) % 1000 < fraction_per_mille


def build_examples(log: pa.Table, item_index: dict[str, int], history_len: int,
                   since_ingest_ts: float = 0.0, val_users: int = 200,
                   rows: str = "targets", prompt_alone_events: int = 0,
                   user_text: Callable[[list[str], list[str]], tuple[np.ndarray, np.ndarray
                                                                     | None]] | None = None,
                   replay_share: float = 0.0, seed: int = 0,
                   val_events: int = 1) -> tuple[Examples, Examples]:
    """(train, validation) examples from a logged events table.

    Targets of training examples are events ingested after `since_ingest_ts`
    (the window since the last round); histories use everything before them. `rows`
    "users" keeps one training row per user, the one ending at its newest such event (a
    causal model learns every next item of its window from it: TrainingSettings.train_rows).
    `prompt_alone_events` > 0 (with "targets" rows): the prompt alone learns each user's
    first that many items, each once (the row of target `pos` teaches item `pos - 1`),
    instead of the first item of every row's window (TrainingSettings.prompt_alone_events).
    `user_text`: (row users [E], the rows' target event ids [E]) -> (text ids [E, U],
    query vectors [E, H] or None) (user_text versions), set as the examples' `text` and
    `query`. `replay_share` > 0 adds that many training rows per new one (at most all of
    them), drawn by `seed` from targets before the window, so that a warm-started round
    does not learn the newest events alone (TrainingSettings.replay_share). A validation
    user's last `val_events` events are held out (TrainingSettings.val_events).
    """
    if log.num_rows == 0:
        return _pack([], [], [], history_len), _pack([], [], [], history_len)
    # A replayed batch is logged twice: keep the first copy of each event_id.
    _, first = np.unique(log["event_id"].to_numpy(zero_copy_only=False), return_index=True)
    log = log.take(pa.array(np.sort(first)))
    order = pc.sort_indices(log, [("user_id", "ascending"), ("ts", "ascending"),
                                  ("event_id", "ascending")])
    log = log.take(order)
    users = log["user_id"].to_numpy(zero_copy_only=False)
    event_ids = log["event_id"].to_numpy(zero_copy_only=False)
    items = np.array([item_index.get(i, PAD) for i in log["item_id"].to_pylist()], np.int32)
    weights = event_weights(log["type"].to_pylist())
    ingest = log["ingest_ts"].to_numpy()

    n_users = len(np.unique(users))
    per_mille = max(1, min(1000, round(1000 * val_users / max(n_users, 1))))
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    fresh: list[tuple[int, int, int]] = []  # (row start, row end, target position)
    older: list[tuple[int, int, int]] = []  # training targets from before the window
    val_at: list[tuple[int, int, int]] = []
    for start, end in zip(starts, ends, strict=True):
        seq = items[start:end]
        is_val = _is_validation_user(users[start], per_mille)
        # "users": newest first, and the first training row ends the user.
        positions = range(1, len(seq)) if rows == "targets" else range(len(seq) - 1, 0, -1)
        newest_older = None  # "users": the row a user with nothing new may replay
        for pos in positions:
            if seq[pos] == PAD:
                continue
            if is_val and pos >= len(seq) - val_events:
                val_at.append((start, end, pos))
            elif ingest[start + pos] > since_ingest_ts:
                fresh.append((start, end, pos))
                if rows == "users":
                    newest_older = None
                    break
            elif replay_share and rows == "targets":
                older.append((start, end, pos))
            elif replay_share and newest_older is None:
                newest_older = (start, end, pos)
        if newest_older is not None:
            older.append(newest_older)
    n_replay = min(len(older), round(replay_share * len(fresh)))
    if n_replay:
        picked = np.sort(np.random.default_rng(seed).choice(len(older), n_replay, replace=False))
        fresh += [older[i] for i in picked]

    def rows_at(at: list[tuple[int, int, int]]) -> tuple[Examples, list[str], list[str], list]:
        """The examples whose targets sit at `at` -> (examples, users, event ids,
        prompt-alone targets)."""
        hist_rows, weight_rows, targets, prompt_targets = [], [], [], []
        for start, end, pos in at:
            seq, seq_w = items[start:end], weights[start:end]
            window = slice(max(0, pos - history_len), pos)
            known = seq[window] != PAD
            hist, hist_w = seq[window][known], seq_w[window][known]
            row = np.full(history_len, PAD, np.int32)
            row[: len(hist)] = hist
            row_w = np.ones(history_len, np.float32)
            row_w[: len(hist)] = hist_w
            hist_rows.append(row)
            weight_rows.append(row_w)
            targets.append(seq[pos])
            prompt_targets.append(seq[pos - 1] if pos - 1 < prompt_alone_events else PAD)
        return (_pack(hist_rows, weight_rows, targets, history_len),
                [users[first] for first, _, _ in at],
                [event_ids[first + pos] for first, _, pos in at],
                prompt_targets)

    train, train_u, train_e, train_p = rows_at(fresh)
    val, val_u, val_e, _ = rows_at(val_at)
    if prompt_alone_events > 0 and rows == "targets":
        train.prompt_target = np.array(train_p, np.int32)
    if user_text is not None:
        train.text, train.query = user_text(train_u, train_e)
        val.text, val.query = user_text(val_u, val_e)
    return train, val


def _pack(history: list, weights: list, target: list, history_len: int) -> Examples:
    if not target:
        return Examples(np.zeros((0, history_len), np.int32), np.zeros(0, np.int32),
                        np.ones((0, history_len), np.float32))
    return Examples(np.stack(history), np.array(target, np.int32), np.stack(weights))


def batches(n_examples: int, batch_size: int, steps: int, rng: np.random.Generator):
    """`steps` batches of example indices, each epoch a fresh permutation (every example
    once per epoch, as the epoch-budgeted published set-ups train)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.permutation(n_examples).tolist()
        yield np.array(order[:batch_size])
        del order[:batch_size]


def steps_for(epochs: float, n_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * n_examples / batch_size))


def round_steps(train_steps: int, max_epochs: float, n_examples: int, batch_size: int,
                workers: int) -> int:
    """A round's steps: `train_steps`, or fewer when that many would take more than
    `max_epochs` passes over its `n_examples` (each step reads batch_size per worker)."""
    return min(train_steps, steps_for(max_epochs, n_examples, batch_size * workers))
