"""The settings: one section per component, each passed whole to what it configures.

    Settings
      infra      InfraSettings      Kafka, Ray, data set, where files live
      streaming  StreamingSettings  topics, consumers, shards, per-user state
      items      ItemSettings       the live item topic, held events
      profiles   ProfileSettings    the user profile topic, profile and query text limits
      model      ModelConfig        the prompt's structure (recorded in every weights blob)
      training   TrainingSettings   Ray Train rounds, optimiser, gate
      serving    ServingSettings    Serve replicas, HTTP, cache, batching
      live       LiveSettings       impressions, live metrics, the canary
      kafka      KafkaSecurity      TLS and SASL of every Kafka client

Every setting has one flat name, unique across sections, used three ways (later ones
winning): the default below, a `PROMPTREC_<NAME>` environment variable, a `--name` CLI
flag (`services/config_sources.py`). `validate()` checks each field's rule
(`services/config_rules.py`) at start-up, naming the setting; rules that tie two
settings together live in their section's `check`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from services.config_infra import InfraSettings

# Re-exported: their home is config_rules, their users import them from here.
from services.config_rules import ENV_PREFIX, ConfigError, Rule, env_name, flag_name  # noqa: F401
from services.config_rules import opt as _opt
from services.config_sections import ItemSettings, KafkaSecurity, LiveSettings, ProfileSettings


@dataclass(frozen=True)
class StreamingSettings:
    topic_clicks: str = _opt("promptrec.clicks", "click-event topic")
    topic_dlq: str = _opt("promptrec.clicks.dlq", "dead-letter topic")
    partitions: int = _opt(4, "partitions of the click topic", ">=1")
    consumer_group: str = _opt("promptrec-ingest", "Kafka consumer group")
    kafka_client: str = _opt("kafka-python", "the consumers' Kafka client: kafka-python, or "
                             "confluent-kafka (optional extra `.[confluent]`: librdkafka parses "
                             "records in C)", "in:kafka-python,confluent-kafka")
    num_consumers: int = _opt(2, "IngestConsumer actors", ">=1")
    num_shards: int = _opt(2, "UserStateShard actors", ">=1")
    history_len: int = _opt(30, "recent items kept per user", ">=1")
    dedupe_window: int = _opt(200_000, "event_ids remembered per shard for idempotent apply",
                              ">=1")
    personal_alpha: float = _opt(0.1, "how far one event moves a user's personal prompt toward "
                                 "the item (EMA rate)", "rate")
    snapshot_every_s: float = _opt(10.0, "seconds between shard snapshots (parquet, with the "
                                   "offsets they cover)", ">0")
    poll_max_records: int = _opt(10_000, "records per consumer poll (one Ray call per shard "
                                 "for each: larger polls, fewer calls)", ">=1")
    log_flush_s: float = _opt(1.0, "seconds between event-log flushes (offsets are committed "
                              "after each flush); a consumer that has caught up flushes after a "
                              "fifth of it", ">0")

    def check(self) -> None:
        if self.num_consumers > self.partitions:
            raise ConfigError("num_consumers", f"{self.num_consumers} consumers for "
                              f"{self.partitions} partitions would leave consumers idle")
        if self.kafka_client == "confluent-kafka" and find_spec("confluent_kafka") is None:
            raise ConfigError("kafka_client", "confluent-kafka is not installed: "
                              "pip install -e '.[confluent]' (or make setup)")
        if self.topic_clicks == self.topic_dlq:
            raise ConfigError("topic_dlq", "must differ from topic_clicks")


@dataclass(frozen=True)
class ModelConfig:
    """The structure of the trainable prompt; every weights blob records the one that
    trained it (`services/weights.py`)."""

    backbone_path: str = _opt("", "local Hugging Face model dir; empty uses the packaged "
                              "all-MiniLM-L6-v2")
    prompt_len: int = _opt(16, "shared soft-prompt tokens", ">=1")
    prompt_init_text: str = _opt("Given the movies this user watched, recommend the next "
                                 "movie.", "text whose token embeddings initialise the soft "
                                 "prompt")
    item_bias: bool = _opt(True, "train a bias per catalog item beside the soft prompt (lets "
                           "scores carry popularity)")
    item_tokens: bool = _opt(True, "train an item token per catalog item: a learned offset "
                             "[hidden] added to its text vector, in histories and when ranked "
                             "(catalog x hidden floats)")
    causal: bool = _opt(True, "causal attention over the history: each training pass learns "
                        "the next item after every position (as SASRec does); the personal "
                        "prompt is added to the user vector by a trained gate")
    readout: str = _opt("last", "causal versions read the user after an item as 'last' (the "
                        "hidden state there) or 'mean' (over the prompt and items so far)",
                        "in:last,mean")
    user_layers: int = _opt(2, "backbone layers the user side runs (its first k; 0 = all); "
                            "item text vectors always come from the whole backbone", ">=0")
    lora_rank: int = _opt(0, "rank of low-rank adapters (LoRA) on the user side's attention "
                          "projections, the pretrained weights kept (0: none)", ">=0")
    user_text: bool = _opt(False, "the user side reads the user's own text (profile, and a "
                           "request's query) as real tokens between the soft prompt and the "
                           "history (causal versions)")
    user_text_tokens: int = _opt(32, "most tokens of user text the user side reads (profile "
                                 "first, then the query; at least 2)", ">=1")

    def check(self) -> None:
        if self.user_text_tokens < 2:
            raise ConfigError("user_text_tokens", "must be >= 2 (the text and its end token)")
        if self.user_text and not self.causal:
            raise ConfigError("user_text", "needs causal (the text is read as a prefix)")
        if self.lora_rank and not self.user_layers:
            raise ConfigError("lora_rank", "needs user_layers >= 1 (the layers it adapts)")
        if self.backbone_path and not (Path(self.backbone_path) / "config.json").is_file():
            raise ConfigError("backbone_path", f"{self.backbone_path} has no config.json")


@dataclass(frozen=True)
class TrainingSettings:
    train_workers: int = _opt(2, "Ray Train workers (DDP)", ">=1")
    use_gpu: bool = _opt(False, "train on GPUs (NCCL)")
    train_steps: int = _opt(40, "optimizer steps per training round", ">=1")
    round_max_epochs: float = _opt(1.0, "most passes a round makes over its examples (fewer "
                                   "steps when it has little data: no overfitting)", ">0")
    batch_size: int = _opt(32, "examples per worker per step", ">=1")
    learning_rate: float = _opt(0.01, "Adam learning rate", ">0")
    item_token_lr: float = _opt(0.003, "Adam learning rate of the item tokens (the soft prompt "
                                "uses learning_rate)", ">0")
    item_bias_lr: float = _opt(0.0, "Adam learning rate of the item bias (0: learning_rate)",
                               ">=0")
    lora_lr: float = _opt(0.001, "Adam learning rate of the LoRA adapters (lora_rank)", ">0")
    lr_schedule: str = _opt("constant", "every rate over a run's steps: 'constant', or "
                            "'cosine' (decays to 0 by the last step)", "in:constant,cosine")
    bf16: bool = _opt(False, "training forward passes under bfloat16 autocast (CPUs with "
                      "avx512_bf16/AMX, GPUs: ~2x faster); weights and Adam stay float32")
    train_rows: str = _opt("targets", "'users': one row per user, its last history_len + 1 "
                           "items, a loss at every position (causal); 'targets': one per "
                           "event with the items before it", "in:targets,users")
    prompt_alone_events: int = _opt(20, "with 'targets' rows the prompt alone (a new user's "
                                    "list) learns users' first N items; 0: each row's first",
                                    ">=0")
    dropout: float = _opt(0.0, "training dropout on the history's item vectors; above 0 the "
                          "user side's backbone layers also drop at their own rates", "share")
    user_text_dropout: float = _opt(0.1, "share of training rows that read no user text "
                                    "(user_text versions), so users without one are learned "
                                    "too", "share")
    replay_share: float = _opt(1.0, "a round also trains on this many rows per new one, "
                               "drawn from events before its window (at most all of them), "
                               "so warm-started rounds do not forget; 0: new events only",
                               ">=0")
    val_users: int = _opt(200, "held-out users for the validation gate", ">=1")
    val_events: int = _opt(1, "the gate tests each held-out user's last this many events "
                           "(none of them trained on): more events, a less noisy gate", ">=1")
    gate_margin: float = _opt(0.005, "publish only if held-out NDCG@10 >= serving NDCG@10 - "
                              "margin", ">=0")
    train_every_events: int = _opt(50_000, "start a training round after this many new events "
                                   "(0: off)", ">=0")
    first_round_events: int = _opt(2_000, "events before the first round, so an untrained "
                                   "prompt serves briefly (0: train_every_events)", ">=0")
    train_every_s: float = _opt(0.0, "start a training round after this many seconds (0: off)",
                                ">=0")

    def check(self) -> None:  # no rule ties two training settings together
        return None


@dataclass(frozen=True)
class ServingSettings:
    http_host: str = _opt("127.0.0.1", "Serve HTTP host")
    http_port: int = _opt(8000, "Serve HTTP port", "port")
    num_replicas: int = _opt(2, "Recommender replicas", ">=1")
    replica_cpus: float = _opt(0.25, "logical CPUs per replica", ">0")
    admin_token: str = _opt("", "bearer token for /admin routes; empty turns admin routes off")
    serve_throughput_optimized: bool = _opt(True, "local Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED"
                                            "=1 (bench/serve.py); a cluster sets its own env")
    max_ongoing_requests: int = _opt(16, "requests one replica works on at once (Ray Serve "
                                     "max_ongoing_requests)", ">=1")
    max_queued_requests: int = _opt(64, "requests the HTTP proxy holds waiting for a free "
                                    "replica slot before answering 503 (Ray Serve "
                                    "max_queued_requests; -1: unbounded)")
    retry_after_s: float = _opt(1.0, "Retry-After seconds sent with an overload 503", ">=0")
    batch_max_size: int = _opt(4, "users encoded in one backbone pass (serve.batch "
                               "max_batch_size; 1: no batching)", ">=1")
    batch_wait_ms: float = _opt(2.0, "how long an encode waits for more cache misses to join "
                                "its batch", ">=0")
    encode_thread: bool = _opt(True, "encode cache misses on a worker thread so the event loop "
                               "keeps answering cache hits (false: on the event loop)")
    user_cache_size: int = _opt(10_000, "user vectors cached per replica, keyed by "
                                "(state_version, prompt_version); 0: off", ">=0")
    explain_items: int = _opt(3, "history items listed per recommended item with explain=true",
                              ">=1")
    pin_version: int = _opt(0, "serve only this prompt version and ignore publishes and "
                            "rollbacks (a frozen baseline beside the live app, e.g. the "
                            "prequential evaluation's static arm); 0 follows the registry",
                            ">=0")
    personal_prompts: bool = _opt(True, "feed each user's personal prompt (updated online by "
                                  "the shards) to the backbone; off: shared prompt + history "
                                  "only")
    profiles: bool = _opt(True, "read the user's profile text (a user_text version); off: "
                          "every user is read as if they had none (e.g. the prequential "
                          "evaluation's no_profiles arm)")

    def check(self) -> None:
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError("max_queued_requests",
                              f"must be >= 1 or -1 (unbounded), got {self.max_queued_requests}")
        if self.batch_max_size > self.max_ongoing_requests:
            # A replica never holds more requests than max_ongoing_requests, so a larger
            # batch could never fill and only the wait would be paid.
            raise ConfigError("batch_max_size", f"{self.batch_max_size} is larger than "
                              f"max_ongoing_requests ({self.max_ongoing_requests})")


@dataclass(frozen=True)
class Settings:
    infra: InfraSettings = field(default_factory=InfraSettings)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    items: ItemSettings = field(default_factory=ItemSettings)
    profiles: ProfileSettings = field(default_factory=ProfileSettings)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    kafka: KafkaSecurity = field(default_factory=KafkaSecurity)

    def validate(self) -> Settings:
        for section_name, f in setting_fields():
            rule = f.metadata["rule"]
            if rule:
                value = getattr(getattr(self, section_name), f.name)
                if not (rule := Rule.named(rule)).allows(value):
                    raise ConfigError(f.name, f"{rule.message}, got {value!r}")
        for section in SECTIONS:
            getattr(self, section).check()
        return self

    def value(self, name: str) -> Any:
        """A setting by its flat name (e.g. "history_len")."""
        return getattr(getattr(self, section_of(name)), name)

    def replace(self, **changes: Any) -> Settings:
        """A validated variant with some settings changed, by flat name."""
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            by_section.setdefault(section_of(name), {})[name] = value
        return dataclasses.replace(self, **{
            section: dataclasses.replace(getattr(self, section), **values)
            for section, values in by_section.items()}).validate()

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name (the shape of a Serve config's `args`)."""
        return {f.name: self.value(f.name) for _, f in setting_fields()}


SECTIONS = tuple(f.name for f in dataclasses.fields(Settings))


def setting_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """(section name, field) for every setting, in declaration order."""
    for section in dataclasses.fields(Settings):
        for f in dataclasses.fields(section.default_factory):
            yield section.name, f


_SECTION_OF = {f.name: section for section, f in setting_fields()}


def section_of(name: str) -> str:
    try:
        return _SECTION_OF[name]
    except KeyError:
        raise ConfigError(name, "unknown setting") from None
