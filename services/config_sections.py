"""Settings sections of the live parts (`services.config` gathers every section): the
item topic and held events, user profiles and query text, and impressions, live metrics
and the canary."""

from __future__ import annotations

from dataclasses import dataclass

from services.config_rules import ConfigError
from services.config_rules import opt as _opt


@dataclass(frozen=True)
class ItemSettings:
    topic_items: str = _opt("promptrec.items", "item topic (key item_id, JSON item; a null "
                            "value deletes): live catalog changes")
    topic_items_dlq: str = _opt("promptrec.items.dlq", "dead-letter topic of item records")
    item_batch_max: int = _opt(64, "most item records in one catalog version", ">=1")
    item_embed_threads: int = _opt(2, "torch threads the item consumer embeds with", ">=1")
    item_embed_bf16: bool = _opt(True, "the item consumer embeds under bfloat16 autocast "
                                 "(~1.5x the items/s here, cosine to float32 > 0.9999)")
    max_item_text_chars: int = _opt(4000, "longer item text / description is cut to this "
                                    "(and counted): the backbone reads 64 tokens", ">=1")
    hold_unknown_s: float = _opt(5.0, "how long an event naming an item not yet in the catalog "
                                 "is held for it before it is dead-lettered", ">=0")
    hold_max_events: int = _opt(10_000, "most events held per partition (then the oldest)", ">=1")

    def check(self) -> None:
        if self.topic_items == self.topic_items_dlq:
            raise ConfigError("topic_items_dlq", "must differ from topic_items")


@dataclass(frozen=True)
class ProfileSettings:
    topic_users: str = _opt("promptrec.users", "user profile topic (key user_id, JSON user "
                            "record; a null value deletes the profile)")
    topic_users_dlq: str = _opt("promptrec.users.dlq", "dead-letter topic of user records")
    max_user_text_chars: int = _opt(1000, "longer profile text is cut to this (and counted)",
                                    ">=1")
    max_query_chars: int = _opt(200, "longest /recommend query text; longer is refused (400)",
                                ">=1")

    def check(self) -> None:
        if self.topic_users == self.topic_users_dlq:
            raise ConfigError("topic_users_dlq", "must differ from topic_users")


@dataclass(frozen=True)
class LiveSettings:
    topic_impressions: str = _opt("promptrec.impressions", "topic the replicas write every "
                                  "/recommend answer to (request id, user, items, version, arm)")
    impression_queue_max: int = _opt(10_000, "impressions a replica holds for its writer; "
                                     "beyond it they are dropped and counted, never the request",
                                     ">=1")
    attribution_window_s: float = _opt(1800.0, "an event without a request_id is credited to "
                                       "its user's latest impression at most this old", ">0")
    live_k: int = _opt(10, "an attributed event is a live hit when its item was in the top "
                       "live_k of the impression", ">=1")
    canary_share: float = _opt(0.0, "share of users a newly published version serves first "
                               "(sticky by user-id hash); 0 serves it to everyone at once",
                               "share")
    canary_min_events: int = _opt(300, "attributed events each arm needs before the canary is "
                                  "promoted or rolled back", ">=1")
    canary_max_events: int = _opt(5000, "events per arm after which a canary still undecided "
                                  "is rolled back", ">=1")
    canary_margin: float = _opt(0.02, "how much lower the canary's live HR may be and still "
                                "be promoted (non-inferiority margin)", ">=0")
    canary_alpha: float = _opt(0.05, "level of the one-sided tests that promote or roll back",
                               "level")

    def check(self) -> None:
        if self.canary_max_events < self.canary_min_events:
            raise ConfigError("canary_max_events", f"{self.canary_max_events} is below "
                              f"canary_min_events ({self.canary_min_events})")


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
PASSWORD_ENV = "PROMPTREC_KAFKA_SASL_PASSWORD"  # never a flag: it would show in `ps`


@dataclass(frozen=True)
class KafkaSecurity:
    """How every Kafka client of the service connects (managed Kafka needs TLS and SASL).
    `kafka_python()` and `confluent()` turn it into each client library's options."""

    kafka_security_protocol: str = _opt("PLAINTEXT", "how Kafka clients connect: PLAINTEXT, "
                                        "SSL (TLS), SASL_PLAINTEXT or SASL_SSL",
                                        "in:" + ",".join(SECURITY_PROTOCOLS))
    kafka_ssl_cafile: str = _opt("", "CA certificate(s) the broker's certificate must chain "
                                 "to (SSL, SASL_SSL); empty: the system's", "file")
    kafka_ssl_certfile: str = _opt("", "client certificate for mutual TLS (empty: none)", "file")
    kafka_ssl_keyfile: str = _opt("", "the client certificate's private key", "file")
    kafka_sasl_mechanism: str = _opt("PLAIN", "SASL mechanism: PLAIN, SCRAM-SHA-256 or "
                                     "SCRAM-SHA-512", "in:" + ",".join(SASL_MECHANISMS))
    kafka_sasl_username: str = _opt("", "SASL user name")
    kafka_sasl_password_file: str = _opt("", f"file holding the SASL password (else the "
                                         f"{PASSWORD_ENV} environment variable)", "file")

    @property
    def sasl(self) -> bool:
        return self.kafka_security_protocol.startswith("SASL")

    @property
    def tls(self) -> bool:
        return self.kafka_security_protocol.endswith("SSL")

    def check(self) -> None:
        if self.sasl and not self.kafka_sasl_username:
            raise ConfigError("kafka_sasl_username",
                              f"{self.kafka_security_protocol} needs a user name")
        if self.sasl and not self.password():
            raise ConfigError("kafka_sasl_password_file", f"{self.kafka_security_protocol} "
                              f"needs a password: a file here or {PASSWORD_ENV}")
        if bool(self.kafka_ssl_certfile) != bool(self.kafka_ssl_keyfile):
            raise ConfigError("kafka_ssl_keyfile", "mutual TLS needs both kafka_ssl_certfile "
                              "and kafka_ssl_keyfile")

    def password(self) -> str:
        import os
        from pathlib import Path

        if self.kafka_sasl_password_file:
            return Path(self.kafka_sasl_password_file).read_text().strip()
        return os.environ.get(PASSWORD_ENV, "")

    def kafka_python(self) -> dict:
        """Keyword arguments for kafka-python's KafkaConsumer / KafkaProducer / admin."""
        options: dict = {"security_protocol": self.kafka_security_protocol}
        if self.tls:
            options |= {"ssl_cafile": self.kafka_ssl_cafile or None,
                        "ssl_certfile": self.kafka_ssl_certfile or None,
                        "ssl_keyfile": self.kafka_ssl_keyfile or None}
        if self.sasl:
            options |= {"sasl_mechanism": self.kafka_sasl_mechanism,
                        "sasl_plain_username": self.kafka_sasl_username,
                        "sasl_plain_password": self.password()}
        return options

    def confluent(self) -> dict:
        """The same for confluent-kafka (librdkafka's configuration names)."""
        options = {"security.protocol": self.kafka_security_protocol.lower()}
        if self.tls:
            options |= {k: v for k, v in (("ssl.ca.location", self.kafka_ssl_cafile),
                                          ("ssl.certificate.location", self.kafka_ssl_certfile),
                                          ("ssl.key.location", self.kafka_ssl_keyfile)) if v}
        if self.sasl:
            options |= {"sasl.mechanism": self.kafka_sasl_mechanism,
                        "sasl.username": self.kafka_sasl_username,
                        "sasl.password": self.password()}
        return options
