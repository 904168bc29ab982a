"""Settings sections of the live parts (`services.config` gathers every section): the
item topic and held events, and impressions, live metrics and the canary."""

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
    max_item_text_chars: int = _opt(4000, "longer item text / description is cut to this "
                                    "(and counted): the backbone reads 64 tokens", ">=1")
    hold_unknown_s: float = _opt(5.0, "how long an event naming an item not yet in the catalog "
                                 "is held for it before it is dead-lettered", ">=0")
    hold_max_events: int = _opt(10_000, "most events held per partition (then the oldest)", ">=1")

    def check(self) -> None:
        if self.topic_items == self.topic_items_dlq:
            raise ConfigError("topic_items_dlq", "must differ from topic_items")


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
