"""`promptrec eval offline|prequential`: run an evaluation, write its result file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.common import result_path, write_result
from services.config import Settings


def run_offline_eval(settings: Settings, args: argparse.Namespace) -> int:
    import torch

    from bench.quality import run_offline
    from services.backbone import resolve_backbone_path
    from services.catalog import load_catalog
    from services.data import load_interactions

    if settings.model.user_text:
        print("promptrec: eval offline ranks without profile text; for user_text versions "
              "run python -m bench.user_text", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = resolve_backbone_path(settings.model.backbone_path)
    catalog = load_catalog(settings.infra.catalog_source, backbone, settings.infra.cache,
                           progress=True)
    result = run_offline(settings, catalog, load_interactions(settings.infra.events_source),
                         steps=args.steps or (None if args.epochs else 300), epochs=args.epochs,
                         eval_every=args.eval_every, max_users=args.max_users)
    out = write_result(args.out or result_path(f"quality_{settings.infra.dataset}.json"), result)
    print(json.dumps(result, indent=2))
    print(f"written to {out}")
    return 0


def run_prequential_eval(settings: Settings, args: argparse.Namespace, argv: list[str]) -> int:
    from bench.prequential import SampleRule, check_arms
    from bench.prequential_report import markdown_table
    from bench.prequential_run import run_prequential

    if args.window < 1 or args.sample_every < 1 or not 0 <= args.warmup < 1:
        print("promptrec: --window and --sample-every must be >= 1, --warmup in [0, 1)",
              file=sys.stderr)
        return 2
    if args.recent_window < 1:
        print(f"promptrec: --recent-window must be >= 1 (events), not {args.recent_window}",
              file=sys.stderr)
        return 2
    arms = [a for a in args.arms.split(",") if a]
    try:
        check_arms(arms, settings.model.user_text)
    except ValueError as e:
        print(f"promptrec: --arms: {e}", file=sys.stderr)
        return 2
    # A run that reads profiles is its own result, beside the headline replay.
    name = "prequential_profiles" if settings.model.user_text else "prequential"
    out = Path(args.out) if args.out else result_path(f"{name}_{settings.infra.dataset}.json")
    result = run_prequential(
        settings, out, window=args.window, sample=SampleRule(args.sample_every, args.warmup),
        arms=arms, max_events=args.max_events,
        concurrency=args.concurrency, recent_window=args.recent_window,
        command="promptrec " + " ".join(argv))
    print(json.dumps({k: result[k] for k in ("arms", "leak_check", "rounds_published",
                                             "wall_seconds", "plot")}, indent=2))
    print(markdown_table(result))
    return 0


