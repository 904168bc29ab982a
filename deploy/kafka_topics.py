#!/usr/bin/env python3
"""Create or update promptrec's Kafka topics with Kafka's admin API.

    python deploy/kafka_topics.py --kafka-bootstrap broker:9092 \\
        [--partitions 4] [--retention-hours 168] [--dlq-retention-hours 720] \\
        [--replication-factor 3]

The click topic gets `partitions` partitions (Settings.partitions: the consumer group can
use at most that many consumers); the dead-letter topic one; the user profile topic one,
compacted (a keyed upsert per user: the latest record of each user is what a restarted
shard replays, so it is kept however old), and its dead-letter topic one. Safe to run again: missing
topics are created, existing ones get the retention given here and keep their
partitions. Topic names, partitions and the bootstrap come from the same settings as the
service (flags or PROMPTREC_* variables).

Exit status: 0 done, 1 an existing click topic has fewer partitions than asked for,
2 bad settings, 3 Kafka unreachable.
"""

from __future__ import annotations

import argparse
import sys

from services.config import ConfigError, Settings
from services.config_sources import add_settings_flags, settings_from_flags
from services.embedded import InfrastructureError, check_kafka, ensure_topics, topic_settings

HOUR_MS = 3_600_000


def topic_plan(settings: Settings, retention_hours: float, dlq_retention_hours: float
               ) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    """({topic: partitions}, {topic: configs}) for the click, profile and dead-letter
    topics."""
    streaming, profiles = settings.streaming, settings.profiles
    partitions = {streaming.topic_clicks: streaming.partitions, streaming.topic_dlq: 1,
                  profiles.topic_users: 1, profiles.topic_users_dlq: 1}
    configs = {
        # Long enough to replay from the oldest shard snapshot after an outage.
        settings.streaming.topic_clicks: {"cleanup.policy": "delete",
                                "retention.ms": str(int(retention_hours * HOUR_MS))},
        # Dead letters are read by people, later: keep them longer.
        settings.streaming.topic_dlq: {"cleanup.policy": "delete",
                             "retention.ms": str(int(dlq_retention_hours * HOUR_MS))},
        # Compacted: each user's latest profile (or its delete) stays for replays.
        profiles.topic_users: {"cleanup.policy": "compact"},
        profiles.topic_users_dlq: {"cleanup.policy": "delete",
                                   "retention.ms": str(int(dlq_retention_hours * HOUR_MS))},
    }
    return partitions, configs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retention-hours", type=float, default=168.0,
                        help="retention of the click topic (default: 7 days)")
    parser.add_argument("--dlq-retention-hours", type=float, default=720.0,
                        help="retention of the dead-letter topic (default: 30 days)")
    parser.add_argument("--replication-factor", type=int, default=3,
                        help="replicas of each partition for new topics (1 for a single broker)")
    add_settings_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_flags(args)
        if not settings.infra.kafka_bootstrap:
            raise ConfigError("kafka_bootstrap", "required here (the Kafka to set up)")
        if args.retention_hours <= 0 or args.dlq_retention_hours <= 0:
            raise ConfigError("retention_hours", "retention must be > 0 hours")
    except ConfigError as err:
        print(f"kafka_topics: {err}", file=sys.stderr)
        return 2
    partitions, configs = topic_plan(settings, args.retention_hours, args.dlq_retention_hours)
    try:
        security = settings.kafka.kafka_python()
        check_kafka(settings.infra.kafka_bootstrap, security=settings.kafka)
        status = ensure_topics(settings.infra.kafka_bootstrap, partitions, configs,
                               replication_factor=args.replication_factor, security=security)
        found = topic_settings(settings.infra.kafka_bootstrap, list(partitions), security)
    except InfrastructureError as err:
        print(f"kafka_topics: {err}", file=sys.stderr)
        return 3
    short = False
    for name, wanted in partitions.items():
        have = found[name]
        print(f"{name}: {status[name]}, {have['partitions']} partitions, "
              f"retention.ms={have['configs'].get('retention.ms', '?')}")
        if have["partitions"] < wanted:
            short = True
            print(f"kafka_topics: {name} has {have['partitions']} partitions, settings ask for "
                  f"{wanted}: add partitions with your Kafka's tools (user state is routed by "
                  f"user, not by partition, so this is safe) or lower --partitions",
                  file=sys.stderr)
    return 1 if short else 0


if __name__ == "__main__":
    sys.exit(main())
