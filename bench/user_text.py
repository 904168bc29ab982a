"""Users described in words: what the profile text and a query are worth, offline.

    python -m bench.user_text --dataset ml-1m [--epochs 3] [--max-users N]

One command, two training runs on the same split from the same seed, the recipe of
`promptrec eval offline` (docs/benchmarks.md) otherwise:
- "with profiles": a `user_text` version, each training row reading its user's profile
  text (services.movielens.user_table) between the soft prompt and the history, and
  `--query-share` of them also a query made from a genre of the row's target ("a comedy
  movie");
- "without": the same recipe, no user text.
1 user in 10 (by hash) is a *new user*: none of their events is trained on. Each new
user's first event is predicted from nothing but what a new user brings: the profile
(the first run), the prompt alone (the second run: today's answer to a new user), the
popularity of the training events, and the popularity of users' first items.
Warm users: the standard leave-one-out split of the others (bench/quality.py); both
runs' weights are chosen on validation NDCG@10, and the profiles' effect on warm users is
read on validation (HR@10), the test figures beside it.
Queries: for genre queries worded otherwise than in training, the share of each test
user's top 10 in that genre with the query and without it, same users, same version (the
first run); and how much of the plain top 10 an unrelated query keeps.
Writes bench/results/user_text.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import zlib
from collections.abc import Callable

import numpy as np
import torch

from bench.common import Popularity, result_path, run_stamp, write_result
from bench.quality import EvalSet, Split, leave_one_out
from bench.quality_run import personal_rate, score, train_run
from bench.user_text_queries import query_effects
from services.backbone import embed_texts, load_backbone, resolve_backbone_path
from services.catalog import load_catalog
from services.config import Settings
from services.config_sources import load_settings
from services.data import Interactions, load_interactions
from services.movielens import user_table
from services.user_text import UserTextTokens, query_vectors
from training.examples import PAD, Examples, steps_for

NEW_USER_SHARE = 10  # 1 user in 10 is new: never trained on
RECIPE = {"train_rows": "users", "history_len": 200, "user_layers": 2, "readout": "last",
          "bf16": True}


def is_new_user(user_id: str) -> bool:
    return zlib.crc32(f"new-user:{user_id}".encode()) % NEW_USER_SHARE == 0


def without_users(interactions: Interactions, drop: np.ndarray) -> Interactions:
    """The events of the users not in `drop` ([E] bool per event)."""
    keep = ~drop
    return Interactions(*(getattr(interactions, f.name)[keep]
                          for f in dataclasses.fields(Interactions)))


def first_events(interactions: Interactions, catalog, users: set[str], history_len: int
                 ) -> tuple[EvalSet, np.ndarray]:
    """Each of `users`' first event (time order; ties by row) as an event to rank with no
    history -> (the events, their users [E])."""
    order = np.lexsort((interactions.row, interactions.ts))
    firsts: dict[str, int] = {}
    for i in order:
        user = str(interactions.user_ids[i])
        if user in users and user not in firsts and \
                (item := catalog.index.get(str(interactions.item_ids[i]))) is not None:
            firsts[user] = item
    ids = np.array(sorted(firsts), dtype=object)
    history = np.full((len(ids), history_len), PAD, np.int32)
    targets = np.array([firsts[u] for u in ids], np.int32)
    return EvalSet(Examples(history, targets), np.full((len(ids), 1), PAD, np.int32)), ids


def with_text(evalset: EvalSet, text: np.ndarray) -> EvalSet:
    return EvalSet(dataclasses.replace(evalset.examples, text=text), evalset.exclude)


def split_with_text(split: Split, tokens: UserTextTokens, profiles: dict[str, str],
                    catalog, query_share: float, rng: np.random.Generator,
                    embed: Callable[[list[str]], torch.Tensor]) -> Split:
    """The split whose every row reads its user's profile (none where there is none).
    `query_share` of the training rows also read a query, "a <genre> movie", the genre
    one of their target's: what a user asking for something now looks like (validation
    and test rows read none); as tokens and as its sentence vector (`embed`: texts [Q]
    -> [Q, H]), which a query-gate version scores at the target's row."""
    def text(name: str) -> np.ndarray:
        return tokens.encode([profiles.get(u) for u in split.users[name]])

    queries: list[str | None] = [None] * len(split.train)
    for r in np.flatnonzero(rng.random(len(split.train)) < query_share):
        if genres := catalog.items[split.train.target[r]].categories:
            queries[r] = f"a {str(rng.choice(genres)).lower()} movie"
    train_text = tokens.encode([profiles.get(u) for u in split.users["train"]], queries)
    query = query_vectors(queries, embed, catalog.vectors.shape[1])
    return dataclasses.replace(
        split, train=dataclasses.replace(split.train, text=train_text, query=query),
        val=with_text(split.val, text("val")), test=with_text(split.test, text("test")),
        val_unseen=with_text(split.val_unseen, text("val_unseen")),
        test_cold=with_text(split.test_cold, text("test_cold")))


def first_item_counts(interactions: Interactions, catalog, users: set[str]) -> np.ndarray:
    """[N] how often each item was the first event of one of `users` (training users)."""
    firsts, _ = first_events(interactions, catalog, users, 1)
    return np.bincount(firsts.examples.target, minlength=len(catalog)).astype(np.int64)


def r4(value: float) -> float:
    return round(float(value), 4)


def run(settings: Settings, epochs: float, max_users: int | None, seed: int = 0,
        queries_users: int = 300, query_share: float = 0.3) -> dict:
    dataset = settings.infra.dataset
    backbone = resolve_backbone_path(settings.model.backbone_path)
    catalog = load_catalog(dataset, backbone, settings.infra.cache, progress=True)
    interactions = load_interactions(dataset)
    tokenizer, encoder = load_backbone(backbone)

    def embed(texts: list[str]) -> torch.Tensor:
        return embed_texts(tokenizer, encoder, texts)

    tokens = UserTextTokens(tokenizer, settings.model.user_text_tokens)
    profiles = {row["user_id"]: row["text"] for row in
                user_table(dataset).select(["user_id", "text"]).to_pylist()}
    all_users = sorted({str(u) for u in interactions.user_ids})[:max_users]
    new_users = {u for u in all_users if is_new_user(u)}
    kept = set(all_users) - new_users
    is_out = np.array([str(u) not in kept for u in interactions.user_ids])
    warm = without_users(interactions, is_out)
    history_len, alpha = settings.streaming.history_len, personal_rate(settings)
    split = leave_one_out(warm, catalog, history_len, rows=settings.training.train_rows)
    steps = steps_for(epochs, len(split.train), settings.training.batch_size)
    eval_every = steps_for(1, len(split.train), settings.training.batch_size)
    plain = settings.replace(user_text=False)
    text_split = split_with_text(split, tokens, profiles, catalog, query_share,
                                 np.random.default_rng(seed), embed)
    with_profiles = train_run(settings, catalog, text_split, steps, eval_every, seed, True,
                              "with profiles")
    without = train_run(plain, catalog, split, steps, eval_every, seed, True, "without")
    vectors = catalog.vectors

    firsts, first_users = first_events(interactions, catalog, new_users, history_len)
    profile_text = tokens.encode([profiles.get(u) for u in first_users])
    no_text = tokens.encode([None] * len(first_users))
    new = {
        "profile": score(with_profiles.model, with_text(firsts, profile_text), vectors, alpha),
        "profile_model_no_text": score(with_profiles.model, with_text(firsts, no_text),
                                       vectors, alpha),
        "prompt_only": score(without.model, firsts, vectors, alpha),
        "pop": score(Popularity(split.train_item_counts), firsts, vectors, alpha),
        "first_pop": score(Popularity(first_item_counts(warm, catalog, kept)), firsts,
                           vectors, alpha)}
    warm_scores = {
        name: {part: score(r.model, getattr(s, part), vectors, alpha) for part in ("val", "test")}
        for name, r, s in (("with", with_profiles, text_split), ("without", without, split))}
    queries = query_effects(with_profiles.model, text_split.test, text_split.users["test"],
                            profiles, tokens, catalog, alpha, queries_users, embed, seed)
    return {
        "dataset": dataset, "epochs": epochs, "steps": steps,
        "cold_user_hr10": r4(new["profile"]["hr10"]),
        "cold_user_ndcg10": r4(new["profile"]["ndcg10"]),
        "cold_user_pop_hr10": r4(new["pop"]["hr10"]),
        "cold_user_first_item_pop_hr10": r4(new["first_pop"]["hr10"]),
        "cold_user_prompt_only_hr10": r4(new["prompt_only"]["hr10"]),
        "cold_user_prompt_only_ndcg10": r4(new["prompt_only"]["ndcg10"]),
        "cold_user_profile_model_no_text_hr10": r4(new["profile_model_no_text"]["hr10"]),
        "cold_users": int(new["profile"]["n"]),
        "warm_hr10_with_profiles": r4(warm_scores["with"]["val"]["hr10"]),
        "warm_hr10_without": r4(warm_scores["without"]["val"]["hr10"]),
        "warm_ndcg10_with_profiles": r4(warm_scores["with"]["val"]["ndcg10"]),
        "warm_ndcg10_without": r4(warm_scores["without"]["val"]["ndcg10"]),
        "warm_test": {name: {k: r4(v) for k, v in parts["test"].items() if k != "n"}
                      for name, parts in warm_scores.items()},
        "warm_users": int(warm_scores["with"]["val"]["n"]),
        **queries,
        "best_steps": {"with": with_profiles.best_step, "without": without.best_step},
        "unseen_rules": {"with": with_profiles.rule, "without": without.rule},
        "val_curves": {"with": with_profiles.curve, "without": without.curve},
        "train_seconds": {"with": round(with_profiles.train_seconds, 1),
                          "without": round(without.train_seconds, 1)},
        "user_text_tokens": settings.model.user_text_tokens,
        "user_text_dropout": settings.training.user_text_dropout,
        "query_gate": None if with_profiles.model.query_gate is None
        else r4(with_profiles.model.query_gate.detach()),
        "query_share": query_share,
        "profile_example": profiles.get(str(first_users[0])) if len(first_users) else None,
        "protocol": "1 user in 10 (by hash) never trained on: their first event ranked over "
                    "the whole catalog with no history (cold_user_*); the others: leave-one-"
                    "out, every earlier item masked, weights chosen on validation NDCG@10, "
                    "warm_* on validation; both runs the same split, seed and steps",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.user_text", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-1m", choices=("ml-100k", "ml-1m"))
    parser.add_argument("--epochs", type=float, default=3.0, help="budget of each run")
    parser.add_argument("--max-users", type=int, default=None,
                        help="the first N users only (a quick look)")
    parser.add_argument("--query-users", type=int, default=300,
                        help="test users the query measures ask for")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="LoRA adapters of this rank in both runs (0: none)")
    parser.add_argument("--query-share", type=float, default=0.3,
                        help="share of training rows that read a genre query")
    parser.add_argument("--out", default=None, help="result file (default "
                        "bench/results/user_text.json)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.epochs <= 0 or (args.max_users is not None and args.max_users < 20) \
            or args.query_users < 1 or not 0 <= args.query_share <= 1:
        parser.error("--epochs must be > 0, --max-users >= 20, --query-users >= 1, "
                     "--query-share in [0, 1]")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = load_settings(overrides={"dataset": args.dataset, **RECIPE, "user_text": True,
                                        "lora_rank": args.lora_rank})
    started = time.monotonic()
    result = run(settings, args.epochs, args.max_users, queries_users=args.query_users,
                 query_share=args.query_share)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result.update(run_stamp(" ".join(["python -m bench.user_text",
                                      *(sys.argv[1:] if argv is None else argv)])))
    out = write_result(args.out or result_path("user_text.json"), result)
    print({k: v for k, v in result.items() if k.startswith(("cold_user", "warm_", "query"))})
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
