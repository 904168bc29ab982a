"""One typed settings object for every plane.

Each field can be set three ways, later ones winning: the default below, a
`PROMPTREC_<FIELD>` environment variable, a `--field-name` CLI flag.
`Settings.validate()` runs at start-up and names the offending setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from importlib.util import find_spec
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "PROMPTREC_"


class ConfigError(ValueError):
    """A setting has a value the service cannot start with."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"invalid setting {setting!r} ({ENV_PREFIX}{setting.upper()}): {message}")
        self.setting = setting


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class Settings:
    # --- infrastructure ---
    kafka_bootstrap: str = field(default="", metadata=_help(
        "Kafka bootstrap servers host:port[,host:port]; empty starts the embedded Tansu broker"))
    ray_address: str = field(default="", metadata=_help(
        "Ray cluster address (e.g. ray://head:10001 or auto); empty starts a local Ray"))
    ray_num_cpus: float = field(default=8.0, metadata=_help(
        "logical CPUs of the local Ray (actors use fractions of them)"))
    namespace: str = field(default="promptrec", metadata=_help("Ray namespace of named actors"))
    ray_log_to_driver: bool = field(default=False, metadata=_help(
        "stream Ray worker logs to this terminal (they are always in Ray's session logs)"))
    deploy_serve: bool = field(default=True, metadata=_help(
        "deploy the Serve app from this process; off when a Serve config owns it "
        "(deploy/serve.yaml through `serve deploy` or a KubeRay RayService)"))
    data_dir: str = field(default=".promptrec", metadata=_help(
        "where caches, the event log, prompt versions and Ray Train results live"))

    cache_dir: str = field(default="", metadata=_help(
        "where frozen item embeddings are cached; empty means <data_dir>/cache"))

    # --- streaming ---
    topic_clicks: str = field(default="promptrec.clicks", metadata=_help("click-event topic"))
    topic_dlq: str = field(default="promptrec.clicks.dlq", metadata=_help("dead-letter topic"))
    partitions: int = field(default=4, metadata=_help("partitions of the click topic"))
    consumer_group: str = field(default="promptrec-ingest", metadata=_help("Kafka consumer group"))
    kafka_client: str = field(default="kafka-python", metadata=_help(
        "the consumers' Kafka client: kafka-python, or confluent-kafka (optional extra "
        "`.[confluent]`: librdkafka parses records in C)"))
    num_consumers: int = field(default=2, metadata=_help("IngestConsumer actors"))
    num_shards: int = field(default=2, metadata=_help("UserStateShard actors"))
    history_len: int = field(default=30, metadata=_help("recent items kept per user"))
    dedupe_window: int = field(default=200_000, metadata=_help(
        "event_ids remembered per shard for idempotent apply"))
    personal_alpha: float = field(default=0.1, metadata=_help(
        "how far one event moves a user's personal prompt toward the item (EMA rate)"))
    snapshot_every_s: float = field(default=10.0, metadata=_help(
        "seconds between shard snapshots (parquet, with the offsets they cover)"))
    poll_max_records: int = field(default=2000, metadata=_help("records per consumer poll"))
    log_flush_s: float = field(default=1.0, metadata=_help(
        "seconds between event-log flushes (offsets are committed after each flush); "
        "a consumer that has caught up flushes after a fifth of it"))

    # --- model ---
    dataset: str = field(default="ml-100k", metadata=_help("ml-100k or ml-1m"))
    backbone_path: str = field(default="", metadata=_help(
        "local Hugging Face model dir; empty uses the packaged all-MiniLM-L6-v2"))
    prompt_len: int = field(default=16, metadata=_help("shared soft-prompt tokens"))
    prompt_init_text: str = field(
        default="Given the movies this user watched, recommend the next movie.",
        metadata=_help("text whose token embeddings initialise the soft prompt"))
    item_bias: bool = field(default=True, metadata=_help(
        "train a bias per catalog item beside the soft prompt (lets scores carry popularity)"))
    item_tokens: bool = field(default=True, metadata=_help(
        "train an item token per catalog item: a learned offset [hidden] added to its text "
        "vector, in histories and when ranked (catalog x hidden floats)"))
    causal: bool = field(default=True, metadata=_help(
        "causal attention over the history: each training pass learns the next item after "
        "every position (as SASRec does); the personal prompt is added to the user vector by a "
        "trained gate"))
    item_token_lr: float = field(default=0.003, metadata=_help(
        "Adam learning rate of the item tokens (the soft prompt uses learning_rate)"))

    # --- training ---
    train_workers: int = field(default=2, metadata=_help("Ray Train workers (DDP)"))
    use_gpu: bool = field(default=False, metadata=_help("train on GPUs (NCCL)"))
    train_steps: int = field(default=40, metadata=_help("optimizer steps per training round"))
    batch_size: int = field(default=32, metadata=_help("examples per worker per step"))
    learning_rate: float = field(default=0.01, metadata=_help("Adam learning rate"))
    val_users: int = field(default=200, metadata=_help("held-out users for the validation gate"))
    gate_margin: float = field(default=0.005, metadata=_help(
        "publish only if held-out NDCG@10 >= serving NDCG@10 - margin"))
    train_every_events: int = field(default=50_000, metadata=_help(
        "start a training round after this many new events (0: off)"))
    train_every_s: float = field(default=0.0, metadata=_help(
        "start a training round after this many seconds (0: off)"))

    # --- serving ---
    http_host: str = field(default="127.0.0.1", metadata=_help("Serve HTTP host"))
    http_port: int = field(default=8000, metadata=_help("Serve HTTP port"))
    num_replicas: int = field(default=2, metadata=_help("Recommender replicas"))
    replica_cpus: float = field(default=0.25, metadata=_help("logical CPUs per replica"))
    metrics_port: int = field(default=8090, metadata=_help("Prometheus export port of Ray"))
    admin_token: str = field(default="", metadata=_help(
        "bearer token for /admin routes; empty turns admin routes off"))
    serve_throughput_optimized: bool = field(default=True, metadata=_help(
        "start a local Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (fewer thread hops per "
        "request; measured in bench/serve.py); a remote cluster sets it in its own env"))
    max_ongoing_requests: int = field(default=16, metadata=_help(
        "requests one replica works on at once (Ray Serve max_ongoing_requests)"))
    max_queued_requests: int = field(default=64, metadata=_help(
        "requests the HTTP proxy holds waiting for a free replica slot before answering 503 "
        "(Ray Serve max_queued_requests; -1: unbounded)"))
    retry_after_s: float = field(default=1.0, metadata=_help(
        "Retry-After seconds sent with an overload 503"))
    batch_max_size: int = field(default=4, metadata=_help(
        "users encoded in one backbone pass (serve.batch max_batch_size; 1: no batching)"))
    batch_wait_ms: float = field(default=2.0, metadata=_help(
        "how long an encode waits for more cache misses to join its batch"))
    encode_thread: bool = field(default=True, metadata=_help(
        "encode cache misses on a worker thread so the event loop keeps answering cache "
        "hits (false: on the event loop)"))
    user_cache_size: int = field(default=10_000, metadata=_help(
        "user vectors cached per replica, keyed by (state_version, prompt_version); 0: off"))
    explain_items: int = field(default=3, metadata=_help(
        "history items listed per recommended item with explain=true"))
    pin_version: int = field(default=0, metadata=_help(
        "serve only this prompt version and ignore publishes and rollbacks (a frozen "
        "baseline beside the live app, e.g. the prequential evaluation's static arm); "
        "0 follows the registry"))
    personal_prompts: bool = field(default=True, metadata=_help(
        "feed each user's personal prompt (updated online by the shards) to the backbone; "
        "off: shared prompt + history only"))

    # ------------------------------------------------------------------
    def validate(self) -> Settings:
        positive_ints = ["partitions", "num_consumers", "num_shards", "history_len",
                         "dedupe_window", "poll_max_records", "prompt_len", "train_workers",
                         "train_steps", "batch_size", "val_users", "num_replicas",
                         "max_ongoing_requests", "batch_max_size", "explain_items"]
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ["learning_rate", "item_token_lr", "replica_cpus", "ray_num_cpus",
                     "log_flush_s", "personal_alpha", "snapshot_every_s"]:
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ["gate_margin", "train_every_events", "train_every_s", "retry_after_s",
                     "batch_wait_ms", "user_cache_size", "pin_version"]:
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ["http_port", "metrics_port"]:
            if not 0 < getattr(self, name) < 65536:
                raise ConfigError(name, f"must be a TCP port, got {getattr(self, name)}")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError("max_queued_requests",
                              f"must be >= 1 or -1 (unbounded), got {self.max_queued_requests}")
        if self.batch_max_size > self.max_ongoing_requests:
            # A replica never holds more requests than max_ongoing_requests, so a larger
            # batch could never fill and only the wait would be paid.
            raise ConfigError("batch_max_size", f"{self.batch_max_size} is larger than "
                              f"max_ongoing_requests ({self.max_ongoing_requests})")
        if self.num_consumers > self.partitions:
            raise ConfigError("num_consumers", f"{self.num_consumers} consumers for "
                              f"{self.partitions} partitions would leave consumers idle")
        if self.personal_alpha > 1:
            raise ConfigError("personal_alpha", f"must be in (0, 1], got {self.personal_alpha}")
        if self.dataset not in ("ml-100k", "ml-1m"):
            raise ConfigError("dataset", f"must be ml-100k or ml-1m, got {self.dataset!r}")
        if self.backbone_path and not (Path(self.backbone_path) / "config.json").is_file():
            raise ConfigError("backbone_path", f"{self.backbone_path} has no config.json")
        if self.kafka_client not in ("kafka-python", "confluent-kafka"):
            raise ConfigError("kafka_client", "must be kafka-python or confluent-kafka, got "
                              f"{self.kafka_client!r}")
        if self.kafka_client == "confluent-kafka" and find_spec("confluent_kafka") is None:
            raise ConfigError("kafka_client", "confluent-kafka is not installed: "
                              "pip install -e '.[confluent]' (or make setup)")
        if self.topic_clicks == self.topic_dlq:
            raise ConfigError("topic_dlq", "must differ from topic_clicks")
        for hostport in filter(None, self.kafka_bootstrap.split(",")):
            host, _, port = hostport.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("kafka_bootstrap", f"{hostport!r} is not host:port")
        return self

    @property
    def root(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir).resolve() if self.cache_dir else self.root / "cache"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------
    @classmethod
    def from_sources(cls, env: Mapping[str, str] | None = None,
                     overrides: Mapping[str, Any] | None = None) -> Settings:
        """Defaults, then `PROMPTREC_*` env vars, then explicit overrides (e.g. CLI flags)."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, hints[f.name], raw)
        for name, value in (overrides or {}).items():
            if name not in hints:
                raise ConfigError(name, "unknown setting")
            if value is not None:
                values[name] = _parse(name, hints[name], value) if isinstance(value, str) \
                    else value
        return cls(**values).validate()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One `--field-name` flag per setting; the default shown is the built-in one."""
        hints = get_type_hints(cls)
        group = parser.add_argument_group("settings (each also PROMPTREC_<NAME> in the env)")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f"{f.metadata.get('help', '')} [default: {f.default!r}]"
            if hints[f.name] is bool:
                group.add_argument(flag, dest=f.name, default=None,
                                   action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag, dest=f.name, default=None, type=str, help=help_text)

    @classmethod
    def from_args(cls, namespace: argparse.Namespace,
                  env: Mapping[str, str] | None = None) -> Settings:
        names = {f.name for f in fields(cls)}
        overrides = {k: v for k, v in vars(namespace).items() if k in names}
        return cls.from_sources(env=env, overrides=overrides)


def _parse(name: str, kind: Any, raw: str) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw.replace("_", ""))
        if kind is float:
            return float(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(name, f"cannot parse {raw!r} as {kind.__name__}") from None


def cli_settings(argv: Sequence[str]) -> Settings:
    """Parse settings flags alone (used by tests and small tools)."""
    parser = argparse.ArgumentParser()
    Settings.add_arguments(parser)
    return Settings.from_args(parser.parse_args(list(argv)), env={})
