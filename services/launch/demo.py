"""`promptrec demo` and `promptrec serve`'s loop: the whole pipeline, shown step by step."""

from __future__ import annotations

import argparse
import time

from services.config import Settings

BAD_EVENTS = [  # shown in the demo: each lands in the dead-letter topic with its reason
    (b"1", b"not json at all"),
    (b"1", b'{"event_id": "x", "user_id": "1", "item_id": "1", "ts": 1, "type": "teleport"}'),
    (None, b'{"event_id": "y", "user_id": "1", "item_id": "1", "ts": 1, "type": "click"}'),
]


BAD_PROFILES = [  # shown in the demo: each lands in the profile dead-letter topic
    (b"1", b"{not json"),
    (b"1", b'{"user_id": "2", "text": "a record keyed for another user"}'),
]


def _publish_profiles(stack, settings: Settings, users: list[str]) -> None:
    """The data set's MovieLens profiles (unless a --users file was published at start)
    and two malformed records, through the profile topic into the shards."""
    from services.naming import shard_for_user
    from streaming.replay import make_producer

    published = stack.publish_dataset_profiles()
    source = settings.infra.users or settings.infra.events_source
    print(f"\n== user profiles: {published:,} {source} profiles "
          f"into Kafka (+{len(BAD_PROFILES)} malformed ones)")
    producer = make_producer(stack.bootstrap)
    for key, value in BAD_PROFILES:
        producer.send(settings.profiles.topic_users, key=key, value=value)
    producer.close()
    stats = stack.wait_profiles(published + len(BAD_PROFILES))
    print(f"   profile records: {stats['counts']}")
    import ray

    from services.health import WaitTimeout, wait_until

    if not users:
        return
    user, shards = users[0], stack.streaming.shards
    shard = shards[shard_for_user(user, len(shards))]
    try:  # counted as it is read; applied a moment later
        state = wait_until(lambda: ray.get(shard.get_user.remote(user)), 10,
                           f"user {user}'s profile", 0.2)
    except WaitTimeout:
        state = None
    print(f"  user {user:>4} | profile: {state['profile'] if state else None}")


def _show(stack, user_id: str, label: str) -> None:
    import httpx

    body = httpx.get(f"{stack.base_url}/recommend", params={"user_id": user_id, "k": 5},
                     timeout=30).json()
    titles = "; ".join(item["title"] for item in body["items"])
    flag = " (cold start)" if body.get("cold_start") else ""
    print(f"  user {user_id:>4} | {label:<22} | prompt v{body['prompt_version']} | "
          f"state v{body['state_version']}{flag}: {titles}")


def serve_forever(stack) -> None:
    from training.scheduler import RoundScheduler

    scheduler = RoundScheduler(stack.runner, stack.settings.training,
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
    from services.launch.stack import Stack
    from streaming.replay import make_producer, replay

    started = time.monotonic()
    users = [u for u in args.show_users.split(",") if u]
    stack = Stack(settings)
    try:
        print("== starting the stack")
        stack.start(fresh=not args.keep_state)
        _publish_profiles(stack, settings, users)
        print("\n== recommendations before any event (prompt only)")
        for user in users:
            _show(stack, user, "no history yet")

        interactions = load_interactions(settings.infra.events_source, limit=args.max_events)
        print(f"\n== replaying {len(interactions):,} {settings.infra.events_source} events "
              f"into Kafka (+{len(BAD_EVENTS)} malformed ones)")
        t = time.monotonic()
        sent = replay(stack.bootstrap, settings.streaming.topic_clicks, interactions,
                      settings.infra.events_source)
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
            serve_forever(stack)
        return 0
    finally:
        print("== stopping")
        stack.stop()


