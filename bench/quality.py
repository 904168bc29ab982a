"""Offline evaluation on the standard protocol, against popularity, in the same run.

    promptrec eval offline --dataset ml-100k [--steps N]

Standard protocol (the one published ML-1M figures use): per user, events in time
order, the last item is the test target, the one before it the validation target, the
rest train; every item is kept; every item of the catalog is ranked; every item the user
had before the target is masked (not only the history window the model reads).
Metrics: HR@10 and NDCG@10 (one relevant item). The weights are chosen on validation.

Cold start is a second run in the same command: a fixed 5% of items (by hash) never
appear in training (as target or in a history); `cold_hr10` / `cold_ndcg10` are over
that run's test events whose target is such an item, and `cold_run` holds its warm
figures. `key_protocols` in the result says which run produced which key.

`promptrec eval offline` writes the result to bench/results/quality_<dataset>.json.
"""

from __future__ import annotations

import functools
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from bench.common import Popularity
from bench.quality_run import personal_rate, score, train_run
from services.catalog import Catalog
from services.config import Settings
from services.data import Interactions
from training.examples import PAD, Examples, steps_for

COLD_SHARE = 20  # 1 item in 20 is held out of training


def is_cold(item_id: str) -> bool:
    return zlib.crc32(f"cold:{item_id}".encode()) % COLD_SHARE == 0


@dataclass
class EvalSet:
    """Events to rank: the examples, and every item each user had before its target."""

    examples: Examples
    exclude: np.ndarray  # [E, S] catalog indices masked when ranking, PAD-padded

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, idx: np.ndarray) -> EvalSet:
        return EvalSet(self.examples.subset(idx), self.exclude[idx])


@dataclass
class Split:
    train: Examples
    val: EvalSet
    test: EvalSet
    val_unseen: EvalSet  # validation events whose target never occurs in training
    test_cold: EvalSet  # test events whose target is a held-out item (empty: none held out)
    train_item_counts: np.ndarray  # [N] popularity from the training portion only
    # the user of each row of train, val, test, val_unseen and test_cold ([E] str), for
    # per-user inputs such as the profile text (bench/user_text.py)
    users: dict[str, np.ndarray] = field(default_factory=dict)


def _row(items: list[int], history_len: int) -> np.ndarray:
    row = np.full(history_len, PAD, np.int32)
    tail = items[-history_len:]
    row[: len(tail)] = tail
    return row


def _eval_set(rows: list[tuple[list[int], int]], history_len: int) -> EvalSet:
    """(items before the target, target) per event -> the history windows, the targets
    and every earlier item to mask."""
    width = max([len(before) for before, _ in rows], default=0) or 1
    exclude = np.full((len(rows), width), PAD, np.int32)
    for r, (before, _) in enumerate(rows):
        exclude[r, :len(before)] = before
    history = np.stack([_row(before, history_len) for before, _ in rows]) if rows \
        else np.zeros((0, history_len), np.int32)
    return EvalSet(Examples(history, np.array([t for _, t in rows], np.int32)), exclude)


def leave_one_out(interactions: Interactions, catalog: Catalog, history_len: int,
                  max_users: int | None = None, held_out: np.ndarray | None = None,
                  rows: str = "targets") -> Split:
    """The standard split; `held_out` [N] bool: items removed from training entirely
    (the cold-start run), None keeps every item. `rows` shapes the training examples:
    "targets" one per training event (its `history_len` items before it), "users" one per
    user (its last `history_len` + 1 training items: a causal model learns the next item
    at every position of it, as SASRec trains)."""
    order = np.lexsort((interactions.ts, interactions.user_ids.astype(str)))
    users = interactions.user_ids[order].astype(str)
    items = np.array([catalog.index.get(str(i), PAD) for i in interactions.item_ids[order]],
                     np.int32)
    cold = np.zeros(len(catalog), bool) if held_out is None else np.asarray(held_out, bool)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    if max_users is not None:
        starts, ends = starts[:max_users], ends[:max_users]
    train_rows: tuple[list, list] = ([], [])
    val: list[tuple[list[int], int]] = []
    test: list[tuple[list[int], int]] = []
    counts = np.zeros(len(catalog), np.int64)
    row_users: dict[str, list] = {"train": [], "val": [], "test": []}
    for start, end in zip(starts, ends, strict=True):
        seq = [int(i) for i in items[start:end] if i != PAD]
        if len(seq) < 3:
            continue
        warm = [i for i in seq[:-2] if not cold[i]]  # training never sees a held-out item
        for i in warm:
            counts[i] += 1
        positions = list(range(1, len(warm)))
        if rows == "users":
            positions = positions[-1:]  # one row: the last target, the window before it
        for pos in positions:
            train_rows[0].append(_row(warm[:pos], history_len))
            train_rows[1].append(warm[pos])
            row_users["train"].append(users[start])
        val.append((seq[:-2], seq[-2]))
        test.append((seq[:-1], seq[-1]))
        row_users["val"].append(users[start])
        row_users["test"].append(users[start])
    train = Examples(np.stack(train_rows[0]) if train_rows[1]
                     else np.zeros((0, history_len), np.int32), np.array(train_rows[1], np.int32))
    unseen = [r for r, (_, t) in enumerate(val) if counts[t] == 0]
    cold_test = [r for r, (_, t) in enumerate(test) if cold[t]]
    row_users["val_unseen"] = [row_users["val"][r] for r in unseen]
    row_users["test_cold"] = [row_users["test"][r] for r in cold_test]
    return Split(train, _eval_set(val, history_len), _eval_set(test, history_len),
                 _eval_set([val[r] for r in unseen], history_len),
                 _eval_set([test[r] for r in cold_test], history_len), counts,
                 {name: np.array(ids, dtype=object) for name, ids in row_users.items()})


def held_out_items(catalog: Catalog) -> np.ndarray:
    """[N] bool: the cold run's items, 1 in COLD_SHARE by a hash of the item id."""
    return np.array([is_cold(item.item_id) for item in catalog.items])


STANDARD_KEYS = ["ndcg10", "hr10", "pop_ndcg10", "pop_hr10", "val_ndcg10", "best_step",
                 "train_examples", "test_users", "unseen_rule", "unseen_rule_val_ndcg10"]
COLD_KEYS = ["cold_hr10", "cold_ndcg10", "pop_cold_hr10", "cold_test_events", "cold_rule",
             "cold_rule_val_hr10", "cold_rule_val_ndcg10", "cold_val_events", "cold_run"]


r4 = functools.partial(round, ndigits=4)


def run_offline(settings: Settings, catalog: Catalog, interactions: Interactions,
                steps: int | None = None, eval_every: int = 0, max_users: int | None = None,
                seed: int = 0, progress: bool = True, epochs: float | None = None) -> dict:
    """The standard-protocol run and the cold-start run, each against popularity on its
    own split, with `settings` (the model section, training's batch size, rates, rows and
    precision, streaming's history length and personal rate) -> the result. The budget is
    `steps`, or `epochs` over the standard split's training rows (both runs take as many
    steps)."""
    if settings.model.user_text:  # the standard split carries no profile text
        raise ValueError("user_text: the offline evaluation of profiles and queries is "
                         "python -m bench.user_text")
    history_len, alpha = settings.streaming.history_len, personal_rate(settings)
    vectors, model_config, rows = catalog.vectors, settings.model, settings.training.train_rows
    split = leave_one_out(interactions, catalog, history_len, max_users, rows=rows)
    if epochs is not None:
        steps = steps_for(epochs, len(split.train), settings.training.batch_size)
    if not steps:
        raise ValueError("give steps or epochs")
    run = train_run(settings, catalog, split, steps, eval_every, seed, progress, "standard")
    pop = Popularity(split.train_item_counts)
    test, pop_test = (score(m, split.test, vectors, alpha) for m in (run.model, pop))

    held_out = held_out_items(catalog)
    cold_split = leave_one_out(interactions, catalog, history_len, max_users,
                               held_out=held_out, rows=rows)
    cold_run = train_run(settings, catalog, cold_split, steps, eval_every, seed, progress,
                         "cold-start run")
    cold_pop = Popularity(cold_split.train_item_counts)
    cold, pop_cold = (score(m, cold_split.test_cold, vectors, alpha)
                      for m in (cold_run.model, cold_pop))
    cold_warm, cold_pop_warm = (score(m, cold_split.test, vectors, alpha)
                                for m in (cold_run.model, cold_pop))
    model = run.model
    backbone_params = sum(p.numel() for p in model.encoder.parameters())
    return {
        "dataset": settings.infra.dataset, "item_bias": model_config.item_bias,
        "item_tokens": model_config.item_tokens,
        "item_token_lr": settings.training.item_token_lr if model_config.item_tokens else None,
        "causal": model_config.causal, "readout": model_config.readout,
        "user_layers": model_config.user_layers or model.encoder.config.num_hidden_layers,
        "history_len": history_len, "train_rows": rows, "bf16": settings.training.bf16,
        "personal_prompts": settings.serving.personal_prompts,
        "lora_rank": model_config.lora_rank, "dropout": settings.training.dropout,
        "ndcg10": r4(test["ndcg10"]), "hr10": r4(test["hr10"]),
        "pop_ndcg10": r4(pop_test["ndcg10"]), "pop_hr10": r4(pop_test["hr10"]),
        "cold_hr10": r4(cold["hr10"]), "cold_ndcg10": r4(cold["ndcg10"]),
        "pop_cold_hr10": r4(pop_cold["hr10"]),
        "cold_test_events": cold["n"], "cold_rule": cold_run.rule,
        "cold_rule_val_hr10": cold_run.rule_val_hr10,
        "cold_rule_val_ndcg10": cold_run.rule_val_ndcg10,
        "cold_val_events": len(cold_split.val_unseen),
        "cold_run": {"ndcg10": r4(cold_warm["ndcg10"]), "hr10": r4(cold_warm["hr10"]),
                     "pop_ndcg10": r4(cold_pop_warm["ndcg10"]),
                     "pop_hr10": r4(cold_pop_warm["hr10"]),
                     "val_ndcg10": r4(cold_run.val_ndcg10), "best_step": cold_run.best_step,
                     "train_seconds": round(cold_run.train_seconds, 1),
                     "train_examples": len(cold_split.train),
                     "held_out_items": int(held_out.sum())},
        "unseen_rule": run.rule, "unseen_rule_val_hr10": run.rule_val_hr10,
        "unseen_rule_val_ndcg10": run.rule_val_ndcg10,
        "val_ndcg10": r4(run.val_ndcg10),
        "best_step": run.best_step, "steps": steps, "batch_size": settings.training.batch_size,
        "epochs": r4(steps * settings.training.batch_size / max(1, len(split.train))),
        "val_curve": run.curve,
        "final_loss": r4(float(np.mean(run.losses[-20:]))) if run.losses else None,
        "trainable_params": model.trainable_parameters(), "backbone_params": backbone_params,
        "trainable_share": round(model.trainable_parameters() / backbone_params, 6),
        "weights_bytes": len(model.weights().to_bytes()),
        "per_user_state_floats": model.hidden_size,
        "train_seconds": round(run.train_seconds, 1),
        "train_examples": len(split.train), "test_users": test["n"],
        "items": len(catalog),
        "protocol": "standard: leave-one-out per user (last = test, second-last = "
                    "validation, the rest train), every item kept, full ranking over all "
                    "items, every item the user had before the target masked, HR@10/NDCG@10; "
                    "weights chosen on validation NDCG@10; popularity = training counts",
        "cold_protocol": f"the same split with 1/{COLD_SHARE} of items (by hash) removed "
                         "from training entirely, a model trained on it; cold_* over its test "
                         "events whose target is such an item, cold_run its warm figures",
        "key_protocols": {"standard": STANDARD_KEYS, "cold": COLD_KEYS},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
