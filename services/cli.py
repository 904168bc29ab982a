"""The `promptrec` command.

    promptrec demo      the whole pipeline on the embedded defaults, then stop
    promptrec serve     start the stack and keep serving (training rounds on a schedule)
    promptrec replay    push a MovieLens data set into a Kafka topic
    promptrec eval offline   leave-one-out quality against popularity
    promptrec eval prequential   test-then-learn on the running system: popularity,
                             static and online arms over the same replay
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from services.config import ConfigError, Settings
from services.config_sources import add_settings_flags, settings_from_flags
from services.embedded import InfrastructureError

log = logging.getLogger("promptrec")

BAD_EVENTS = [  # shown in the demo: each lands in the dead-letter topic with its reason
    (b"1", b"not json at all"),
    (b"1", b'{"event_id": "x", "user_id": "1", "item_id": "1", "ts": 1, "type": "teleport"}'),
    (None, b'{"event_id": "y", "user_id": "1", "item_id": "1", "ts": 1, "type": "click"}'),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptrec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline once on the embedded defaults",
                          description="Start broker, Ray, Serve; replay MovieLens into Kafka; run "
                          "a training round; show recommendations before and after; stop.")
    demo.add_argument("--max-events", type=int, default=None,
                      help="replay only the first N events (default: all)")
    demo.add_argument("--users", default="1,7,42", help="users whose recommendations to show")
    demo.add_argument("--keep-state", action="store_true",
                      help="keep prompt versions and event log of earlier runs in data_dir")
    demo.add_argument("--serve-forever", action="store_true",
                      help="keep serving (with scheduled rounds) after the demo, until Ctrl-C")
    add_settings_flags(demo)

    serve = sub.add_parser("serve", help="start the stack and serve until Ctrl-C",
                           description="Start (or connect to) Kafka and Ray, deploy Serve, consume "
                           "events and run training rounds by the train_every_* settings.")
    add_settings_flags(serve)

    replay = sub.add_parser("replay", help="produce a MovieLens data set into Kafka",
                            description="Produce events in timestamp order (key = user_id).")
    replay.add_argument("--start", type=int, default=0, help="first event index")
    replay.add_argument("--stop", type=int, default=None, help="stop before this event index")
    add_settings_flags(replay)

    evaluate = sub.add_parser("eval", help="measure recommendation quality")
    kinds = evaluate.add_subparsers(dest="eval_kind", required=True)
    offline = kinds.add_parser(
        "offline", help="leave-one-out, full ranking, vs popularity in the same run",
        description="Train the prompt on the training portion, pick weights on validation, "
        "report test HR@10/NDCG@10, popularity and cold-start HR@10; writes "
        "bench/results/quality_<dataset>.json.")
    offline.add_argument("--steps", type=int, default=300, help="training steps")
    offline.add_argument("--eval-every", type=int, default=100,
                         help="validation checkpoints (the best one is kept)")
    offline.add_argument("--max-users", type=int, default=None,
                         help="evaluate the first N users only (quick runs)")
    offline.add_argument("--out", default=None, help="result file (default bench/results/…)")
    add_settings_flags(offline)

    from services.prequential import ALL_ARMS, DEFAULT_ARMS

    prequential = kinds.add_parser(
        "prequential", help="test-then-learn on the running system: popularity vs static vs "
        "online, same replay",
        description="Replay the data set in timestamp order through Kafka into the running "
        "pipeline, one window at a time: first every arm recommends for the window's sampled "
        "events (HR@10, NDCG@10), then the window is produced and applied, and training rounds "
        "run on the train_every_events trigger. Writes bench/results/prequential_<dataset>.json "
        "and a PNG of HR@10 per window.")
    prequential.add_argument("--window", type=int, default=1000,
                             help="events per window (state is at most one window stale)")
    prequential.add_argument("--sample-every", type=int, default=10,
                             help="evaluate every N-th event (1: all)")
    prequential.add_argument("--warmup", type=float, default=0.1,
                             help="share of the replay learned but not evaluated at the start")
    prequential.add_argument("--max-events", type=int, default=None,
                             help="replay only the first N events in timestamp order")
    prequential.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                             help=f"comma-separated, from {','.join(ALL_ARMS)}")
    prequential.add_argument("--concurrency", type=int, default=8,
                             help="requests in flight per arm")
    prequential.add_argument("--out", default=None, help="result file (default bench/results/…)")
    add_settings_flags(prequential)
    return parser


def _show(stack, user_id: str, label: str) -> None:
    import httpx

    body = httpx.get(f"{stack.base_url}/recommend", params={"user_id": user_id, "k": 5},
                     timeout=30).json()
    titles = "; ".join(item["title"] for item in body["items"])
    flag = " (cold start)" if body.get("cold_start") else ""
    print(f"  user {user_id:>4} | {label:<22} | prompt v{body['prompt_version']} | "
          f"state v{body['state_version']}{flag}: {titles}")


def _serve_forever(stack) -> None:
    from training.scheduler import RoundScheduler

    scheduler = RoundScheduler(stack.runner, stack.settings,
                               lambda: stack.streaming.stats()["totals"].get("ok", 0))
    scheduler.start()
    print(f"serving at {stack.base_url} (metrics {stack.metrics_url}); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        scheduler.stop()


def run_demo(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    from services.data import load_interactions
    from services.stack import Stack
    from streaming.replay import make_producer, replay

    started = time.monotonic()
    users = [u for u in args.users.split(",") if u]
    stack = Stack(settings)
    try:
        print("== starting the stack")
        stack.start(fresh=not args.keep_state)
        print("\n== recommendations before any event (prompt only)")
        for user in users:
            _show(stack, user, "no history yet")

        interactions = load_interactions(settings.infra.dataset, limit=args.max_events)
        print(f"\n== replaying {len(interactions):,} {settings.infra.dataset} events into Kafka "
              f"(+{len(BAD_EVENTS)} malformed ones)")
        t = time.monotonic()
        sent = replay(stack.bootstrap, settings.streaming.topic_clicks, interactions, settings.infra.dataset)
        producer = make_producer(stack.bootstrap)
        for key, value in BAD_EVENTS:
            producer.send(settings.streaming.topic_clicks, key=key, value=value)
        producer.close()
        stats = stack.wait_handled(sent + len(BAD_EVENTS))
        print(f"   consumed {stats['handled']:,} records in {time.monotonic() - t:.1f} s: "
              f"{stats['totals']}; {stats['users']} users held")

        print("\n== recommendations after the events (history in state, same prompt)")
        for user in users:
            _show(stack, user, "after events")

        print(f"\n== training round ({settings.training.train_workers} Ray Train workers, "
              f"{settings.training.train_steps} steps)")
        result = stack.runner.run()
        print(f"   {result.outcome}: {result.reason} (loss {result.loss}, "
              f"fit {result.fit_seconds:.1f} s of which training steps "
              f"{result.train_seconds:.1f} s, round {result.seconds:.1f} s)")
        if result.version:
            live = stack.wait_all_replicas(result.version)
            print(f"   all {len(live)} replicas serve v{result.version}; publish -> live per "
                  f"replica: {', '.join(f'{ms:.0f} ms' for ms in live.values())}")
            print("\n== recommendations after the training round (new prompt version)")
            for user in users:
                _show(stack, user, "after training round")

        metrics_text = httpx.get(stack.metrics_url, timeout=10).text
        from services.metrics import parse_prometheus

        scraped = parse_prometheus(metrics_text)
        requests = sum(v for _, v in scraped.get("promptrec_requests_total", []))
        print(f"\n== totals: events {stats['totals']}, HTTP requests {requests:.0f}, "
              f"prompt version serving {httpx.get(stack.base_url + '/version').json()}")
        print(f"   metrics: {stack.metrics_url} "
              f"({sum(1 for k in scraped if k.startswith('promptrec_'))} promptrec_ metrics)")
        print(f"   wall time {time.monotonic() - started:.0f} s")
        if args.serve_forever:
            _serve_forever(stack)
        return 0
    finally:
        print("== stopping")
        stack.stop()


def run_offline_eval(settings: Settings, args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from services.catalog import load_catalog
    from services.data import load_interactions
    from services.model import resolve_backbone_path
    from training.offline import run_offline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = resolve_backbone_path(settings.model.backbone_path)
    catalog = load_catalog(settings.infra.dataset, backbone, settings.infra.cache, progress=True)
    result = run_offline(settings.infra.dataset, catalog, load_interactions(settings.infra.dataset),
                         str(backbone), steps=args.steps, batch_size=settings.training.batch_size,
                         learning_rate=settings.training.learning_rate,
                         history_len=settings.streaming.history_len, prompt_len=settings.model.prompt_len,
                         personal_alpha=settings.streaming.personal_alpha, item_bias=settings.model.item_bias,
                         item_tokens=settings.model.item_tokens, causal=settings.model.causal,
                         item_token_lr=settings.training.item_token_lr, eval_every=args.eval_every,
                         max_users=args.max_users, out=Path(args.out) if args.out else None)
    print(json.dumps(result, indent=2))
    return 0


def run_prequential_eval(settings: Settings, args: argparse.Namespace, argv: list[str]) -> int:
    import json
    from pathlib import Path

    from services.prequential import SampleRule, markdown_table, run_prequential

    if args.window < 1 or args.sample_every < 1 or not 0 <= args.warmup < 1:
        print("promptrec: --window and --sample-every must be >= 1, --warmup in [0, 1)",
              file=sys.stderr)
        return 2
    result = run_prequential(
        settings, window=args.window, sample=SampleRule(args.sample_every, args.warmup),
        arms=[a for a in args.arms.split(",") if a], max_events=args.max_events,
        out=Path(args.out) if args.out else None, concurrency=args.concurrency,
        command="promptrec " + " ".join(argv))
    print(json.dumps({k: result[k] for k in ("arms", "leak_check", "rounds_published",
                                             "wall_seconds", "plot")}, indent=2))
    print(markdown_table(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("kafka", "httpx", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_flags(args)
    except ConfigError as err:
        print(f"promptrec: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "demo":
            return run_demo(settings, args)
        if args.command == "serve":
            from services.stack import Stack

            stack = Stack(settings).start()
            try:
                _serve_forever(stack)
            finally:
                stack.stop()
            return 0
        if args.command == "eval" and args.eval_kind == "prequential":
            return run_prequential_eval(settings, args, argv)
        if args.command == "eval":
            return run_offline_eval(settings, args)
        if args.command == "replay":
            from services.data import load_interactions
            from services.embedded import check_kafka
            from streaming.replay import replay

            bootstrap = settings.infra.kafka_bootstrap
            if not bootstrap:
                print("promptrec replay: set --kafka-bootstrap", file=sys.stderr)
                return 2
            check_kafka(bootstrap)
            sent = replay(bootstrap, settings.streaming.topic_clicks,
                          load_interactions(settings.infra.dataset), settings.infra.dataset,
                          args.start, args.stop)
            print(f"sent {sent} events to {settings.streaming.topic_clicks}")
            return 0
    except InfrastructureError as err:
        print(f"promptrec: {err}", file=sys.stderr)
        return 3
    return 1


if __name__ == "__main__":
    sys.exit(main())
