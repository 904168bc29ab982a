"""Training replays the personal prompt the shards serve, event types included.

The defect this guards (issue 13): the shards weighted events by type (view 0.5, click 1,
purchase 2) while the training replay moved every event by one rate, so any stream with
more than one event type trained on one rule and served another.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from services.batch import EventBatch
from services.config import StreamingSettings
from services.eventlog import SCHEMA
from services.events import ClickEvent
from streaming.shard import UserStateShard
from training.examples import Examples, build_examples
from training.step import replay_personal

ITEMS = ["a", "b", "c", "d", "e", "f"]
INDEX = {item: i for i, item in enumerate(ITEMS)}
KINDS = ["click", "view", "purchase", "view", "rating", "purchase", "click"]


def test_training_replays_the_personal_prompt_the_shard_serves():
    vectors = np.random.default_rng(0).normal(size=(len(ITEMS), 8)).astype(np.float32)
    events = [ClickEvent(f"e{k}", "u", ITEMS[k % len(ITEMS)], float(k), kind)
              for k, kind in enumerate(KINDS)]
    log = pa.table({**{name: [getattr(e, name) for e in events] for name in SCHEMA.names[:-1]},
                    "ingest_ts": [100.0] * len(events)}, schema=SCHEMA)
    train, _ = build_examples(log, INDEX, history_len=10, val_users=0)
    last = train.subset(np.array([len(train) - 1]))  # history: every event but the last
    replayed = replay_personal(last.history, last.weights, torch.from_numpy(vectors), 0.3)

    shard = UserStateShard(0, StreamingSettings(history_len=10, dedupe_window=100,
                                                personal_alpha=0.3), vectors, ITEMS)
    shard.apply(EventBatch.of(events[:-1]), {0: ("E", 0, len(events) - 1)})
    assert replayed[0].numpy().tolist() == shard.get_user("u")["personal"].tolist()


def test_examples_keep_their_weights_through_subset_save_and_load(tmp_path):
    examples = Examples(np.array([[1, 2], [0, -1]], np.int32), np.array([3, 1], np.int32),
                        np.array([[0.5, 2.0], [1.0, 1.0]], np.float32))
    assert examples.subset(np.array([0])).weights.tolist() == [[0.5, 2.0]]
    examples.save(str(tmp_path / "x.npz"))
    assert Examples.load(str(tmp_path / "x.npz")).weights.tolist() == examples.weights.tolist()
    Examples(examples.history, examples.target).save(str(tmp_path / "y.npz"))
    assert Examples.load(str(tmp_path / "y.npz")).weights is None
