"""The model ablation: which parts of the recipe earn their place, on validation only.

    python -m bench.ablation --dataset ml-100k [--epochs 4] [--only NAME ...]

Each variant trains on the standard split (bench/quality.py) from the same seed and is
judged by validation NDCG@10 at checkpoints (the test split is never read here); the
table reports its best checkpoint, where it was, and the seconds per optimizer step, all
in one run on one machine. Variants change one thing at a time against the one above
them, from the earlier recipe (one example per event, a 30-item window, the whole
backbone, the mean readout) to the current one. Writes bench/results/ablation_<dataset>.json;
with --only, the rows of the variants not run are kept from that file (each row names
its own epochs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import result_path, run_stamp, write_result
from bench.quality import leave_one_out
from bench.quality_run import train_run
from services.backbone import resolve_backbone_path
from services.catalog import load_catalog
from services.config import Settings
from services.config_sources import load_settings
from services.data import load_interactions
from training.examples import steps_for


@dataclass(frozen=True)
class Variant:
    name: str
    change: str  # what differs from the variant above it
    overrides: dict
    steps: int | None = None  # a fixed budget (the earlier recipe's); None: --epochs


EARLIER = {"train_rows": "targets", "history_len": 30, "user_layers": 0, "readout": "mean",
           "bf16": False}
VARIANTS = (
    Variant("earlier", "one example per event, 30-item window, 6 layers, mean readout, "
            "float32, 300 steps (the earlier published recipe)", EARLIER, steps=300),
    Variant("user_rows", "one row per user, 200 items, a loss at every position",
            {**EARLIER, "train_rows": "users", "history_len": 200}),
    Variant("last_readout", "the user read at its last item, not the mean",
            {**EARLIER, "train_rows": "users", "history_len": 200, "readout": "last"}),
    Variant("bf16", "bfloat16 autocast",
            {**EARLIER, "train_rows": "users", "history_len": 200, "readout": "last",
             "bf16": True}),
    Variant("two_layers", "the user side on the backbone's first 2 layers",
            {"train_rows": "users", "history_len": 200, "readout": "last", "bf16": True,
             "user_layers": 2}),
    Variant("one_layer", "the first layer only",
            {"train_rows": "users", "history_len": 200, "readout": "last", "bf16": True,
             "user_layers": 1}),
    Variant("dropout", "two_layers with dropout 0.2 on the history and the layers' own",
            {"train_rows": "users", "history_len": 200, "readout": "last", "bf16": True,
             "user_layers": 2, "dropout": 0.2}),
    Variant("lora", "two_layers with rank-8 LoRA adapters on their attention projections",
            {"train_rows": "users", "history_len": 200, "readout": "last", "bf16": True,
             "user_layers": 2, "lora_rank": 8}),
    Variant("lora_dropout", "lora with dropout 0.2 on the history and the layers' own",
            {"train_rows": "users", "history_len": 200, "readout": "last", "bf16": True,
             "user_layers": 2, "lora_rank": 8, "dropout": 0.2}),
    Variant("cosine", "lora_dropout with every rate decayed to 0 by a cosine over the budget",
            {"train_rows": "users", "history_len": 200, "readout": "last", "bf16": True,
             "user_layers": 2, "lora_rank": 8, "dropout": 0.2, "lr_schedule": "cosine"}),
    Variant("no_personal", "two_layers without the personal prompt (the per-user state)",
            {"train_rows": "users", "history_len": 200, "readout": "last", "bf16": True,
             "user_layers": 2, "personal_prompts": False}),
)


def run_variant(base: Settings, variant: Variant, epochs: float, evals_per_epoch: int,
                catalog, interactions) -> dict:
    settings = base.replace(**variant.overrides)
    split = leave_one_out(interactions, catalog, settings.streaming.history_len,
                          rows=settings.training.train_rows)
    batch = settings.training.batch_size
    steps = variant.steps or steps_for(epochs, len(split.train), batch)
    per_epoch = steps_for(1, len(split.train), batch)
    eval_every = variant.steps // 3 if variant.steps else max(1, per_epoch // evals_per_epoch)
    run = train_run(settings, catalog, split, steps, eval_every, seed=0, progress=True,
                    label=variant.name)
    return {"variant": variant.name, "change": variant.change, "settings": variant.overrides,
            "val_ndcg10": round(run.val_ndcg10, 4), "best_step": run.best_step,
            "best_epoch": round(run.best_step / per_epoch, 2), "steps": steps,
            "train_rows": len(split.train),
            "seconds_per_step": round(run.train_seconds / steps, 3),
            "epochs": epochs if variant.steps is None else None, "val_curve": run.curve}


def merged(path: Path, rows: list[dict]) -> list[dict]:
    """The rows of this run, beside the rows of the variants it did not run kept from
    the result file at `path` (each row says its own epochs), in VARIANTS order."""
    kept = {}
    if path.exists():
        kept = {r["variant"]: r for r in json.loads(path.read_text()).get("variants", [])}
    kept.update({r["variant"]: r for r in rows})
    order = [v.name for v in VARIANTS]
    return sorted(kept.values(), key=lambda r: order.index(r["variant"])
                  if r["variant"] in order else len(order))


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | change | val NDCG@10 | best epoch | s/step |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['change']} | {r['val_ndcg10']:.4f} | {r['best_epoch']} "
              f"| {r['seconds_per_step']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", choices=("ml-100k", "ml-1m"))
    parser.add_argument("--epochs", type=float, default=4.0,
                        help="budget of each epoch-budgeted variant")
    parser.add_argument("--evals-per-epoch", type=int, default=2,
                        help="validation checkpoints per epoch")
    parser.add_argument("--only", nargs="*", default=None,
                        help=f"run these variants only ({', '.join(v.name for v in VARIANTS)})")
    parser.add_argument("--out", default=None, help="result file (default bench/results/…)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - {v.name for v in VARIANTS}
    if unknown or args.epochs <= 0 or args.evals_per_epoch < 1:
        parser.error(f"unknown variants {sorted(unknown)}" if unknown
                     else "--epochs must be > 0 and --evals-per-epoch >= 1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = load_settings(overrides={"dataset": args.dataset})
    catalog = load_catalog(args.dataset, resolve_backbone_path(base.model.backbone_path),
                           base.infra.cache, progress=True)
    interactions = load_interactions(args.dataset)
    started = time.monotonic()
    rows = [run_variant(base, v, args.epochs, args.evals_per_epoch, catalog, interactions)
            for v in VARIANTS if args.only is None or v.name in args.only]
    path = Path(args.out or result_path(f"ablation_{args.dataset}.json"))
    result = {"dataset": args.dataset, "epochs": args.epochs,
              "variants": merged(path, rows) if args.only else rows,
              "protocol": "standard split (bench/quality.py); validation NDCG@10 only, the "
                          "test split is not read",
              "wall_seconds": round(time.monotonic() - started),
              **run_stamp(" ".join(["python -m bench.ablation", *argv]), load=True)}
    out = write_result(path, result)
    print(markdown(rows))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
