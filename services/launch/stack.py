"""The whole service in one process's hands: start, use, stop.

The only module of `services` besides `cli` that imports the planes (the entry
point). Start order: the user profile file checked whole (`users`) -> broker -> topics
(+ the profiles published) -> Ray -> catalog (+ its registry) -> prompt registry
(+ initial prompt) -> shards + consumers + item and profile consumers -> Serve ->
training runner.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field

import httpx
import ray

from services.backbone import load_backbone, resolve_backbone_path
from services.catalog import Catalog, load_catalog
from services.catalog_registry import CatalogFollower, start_catalog_registry
from services.config import Settings
from services.embedded import EmbeddedBroker, check_kafka, ensure_topics, start_ray
from services.health import WaitTimeout, answers, wait_answers, wait_until
from services.naming import SERVE_APP
from services.registry import start_registry
from services.user_records import load_profiles
from services.weights import initial_weights

log = logging.getLogger("promptrec")


@dataclass
class Stack:
    settings: Settings
    progress: bool = True
    broker: EmbeddedBroker | None = None
    bootstrap: str = ""
    catalog: Catalog | None = None
    registry: object = None
    catalog_registry: object = None
    catalogs: CatalogFollower | None = None  # the live catalog, as this driver sees it
    streaming: object = None
    runner: object = None
    profiles_at_start: int = 0  # the `users` file's profiles, published by start()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.serving.http_host}:{self.settings.serving.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.infra.metrics_port}/metrics"

    def _step(self, name: str, started: float) -> None:
        self.timings[name] = time.monotonic() - started
        log.info("%-28s %.1f s", name, self.timings[name])

    def start(self, fresh: bool = False) -> Stack:
        """Start everything; `fresh` first deletes prompt versions, event log and train runs
        under data_dir (the embedded broker starts empty, so old state would not match it)."""
        from serving.app import build_app
        from streaming.plane import start_streaming
        from training.round import RoundRunner

        s = self.settings
        if fresh:
            for name in ("registry", "eventlog", "train", "snapshots"):
                shutil.rmtree(s.infra.root / name, ignore_errors=True)
        s.infra.root.mkdir(parents=True, exist_ok=True)
        # A bad profile file fails here, naming file, row and column, before anything runs.
        profiles = load_profiles(s.infra.users) if s.infra.users else []
        t = time.monotonic()
        if s.infra.kafka_bootstrap:
            check_kafka(s.infra.kafka_bootstrap, security=s.kafka)
            self.bootstrap = s.infra.kafka_bootstrap
        else:
            self.broker = EmbeddedBroker(log_path=s.infra.root / "broker.log",
                                         storage=s.infra.broker_storage).start()
            self.bootstrap = self.broker.bootstrap
        ensure_topics(self.bootstrap, {s.streaming.topic_clicks: s.streaming.partitions,
                                       s.streaming.topic_dlq: 1, s.items.topic_items: 1,
                                       s.items.topic_items_dlq: 1,
                                       s.profiles.topic_users: 1, s.profiles.topic_users_dlq: 1,
                                       s.live.topic_impressions: s.streaming.partitions},
                      security=s.kafka.kafka_python())
        self._step(f"kafka ready ({self.bootstrap})", t)
        self.profiles_at_start = len(profiles)
        if profiles:  # through the topic, so that the one consumer path brings them in
            self.publish_profiles(profiles)

        t = time.monotonic()
        start_ray(s)
        self._step("ray ready", t)

        t = time.monotonic()
        backbone = resolve_backbone_path(s.model.backbone_path)
        self.catalog = load_catalog(s.infra.catalog_source, backbone, s.infra.cache,
                                    progress=self.progress)
        self.catalog_registry = start_catalog_registry(s, self.catalog)
        self._step(f"catalog ready ({len(self.catalog)} items)", t)

        t = time.monotonic()
        self.registry = start_registry(s, hidden_size=self.catalog.vectors.shape[1])
        if ray.get(self.registry.serving_version.remote()) == 0:
            tokenizer, encoder = load_backbone(backbone)
            weights = initial_weights(tokenizer, encoder, s.model,
                                      item_ids=self.catalog.item_ids)
            ray.get(self.registry.publish.remote(
                weights.to_bytes(), {"source": "initial", "text": s.model.prompt_init_text}))
        self.streaming = start_streaming(s, self.bootstrap, list(self.catalog.index),
                                         self.catalog.vectors.numpy(),
                                         backbone_path=str(backbone), live_metrics=True,
                                         profiles=True)
        self.catalogs = CatalogFollower(s.infra.namespace)
        self._step("registry, shards, consumers", t)

        if s.infra.deploy_serve:
            t = time.monotonic()
            from ray import serve

            serve.start(http_options={"host": s.serving.http_host, "port": s.serving.http_port},
                        logging_config={"log_level": "WARNING", "enable_access_log": False})
            # The replicas write impressions to the broker this stack uses.
            serve.run(build_app(s.replace(kafka_bootstrap=self.bootstrap)), name=SERVE_APP,
                      route_prefix="/", blocking=False)
            self.wait_healthy()
            self._step(f"serve ready ({s.serving.num_replicas} replicas)", t)
        else:
            log.info("Serve left to its config (deploy_serve off)")
        self.runner = RoundRunner(s, lambda: self.catalogs.catalog, self.registry)
        return self

    def publish_profiles(self, profiles: list, deletes: tuple[str, ...] = ()) -> int:
        """Send user profiles (and deletes) to the profile topic -> records sent."""
        from streaming.replay import publish_profiles

        t = time.monotonic()
        sent = publish_profiles(self.bootstrap, self.settings.profiles.topic_users, profiles,
                                list(deletes), security=self.settings.kafka.kafka_python())
        self._step(f"{sent} profiles published", t)
        return sent

    def publish_dataset_profiles(self) -> int:
        """The profiles a run reads: the `users` file's (published at start) or, for a
        MovieLens data set without one, the data set's own -> how many were published."""
        from services.data import is_movielens

        source = self.settings.infra.events_source
        if self.settings.infra.users:
            return self.profiles_at_start
        return self.publish_profiles(load_profiles(source)) if is_movielens(source) else 0

    def wait_profiles(self, expected: int, timeout_s: float = 120) -> dict:
        """Block until the profile consumer has handled `expected` records for the first
        time (upserts, deletes, invalid) -> its stats (as they are at the deadline)."""
        def handled() -> dict | None:
            stats = self.streaming.stats()["profiles"]
            n = sum(v for k, v in stats["counts"].items()
                    if k.split(":")[0] in ("upsert", "delete", "invalid"))
            return stats if n >= expected else None
        try:
            return wait_until(handled, timeout_s, f"{expected} profile records handled", 0.2)
        except WaitTimeout:
            return self.streaming.stats()["profiles"]

    def wait_healthy(self, timeout_s: float = 180, prefix: str = "") -> None:
        url = self.base_url + prefix
        wait_answers(f"{url}/healthz", timeout_s, f"Serve healthy at {url}")

    def deploy_variant(self, name: str, route_prefix: str, **changes) -> str:
        """A second Serve application beside the main one, on the same registry and user
        state, with some settings changed (e.g. `pin_version`, `personal_prompts`).
        Returns its base URL once it answers."""
        from ray import serve

        from serving.app import build_app

        variant = self.settings.replace(**{"kafka_bootstrap": self.bootstrap, **changes})
        t = time.monotonic()
        serve.run(build_app(variant), name=name, route_prefix=route_prefix, blocking=False)
        self.wait_healthy(prefix=route_prefix)
        self._step(f"serve app {name} ready ({route_prefix})", t)
        return self.base_url + route_prefix

    def wait_handled(self, expected: int, timeout_s: float = 300) -> dict:
        """Block until consumers have handled `expected` records (ok+invalid+duplicate);
        -> the consumers' stats (as they are at the deadline if it passes first)."""
        try:
            return wait_until(lambda: (s := self.streaming.stats())["handled"] >= expected
                              and s, timeout_s, f"{expected} records handled", 0.2)
        except WaitTimeout:
            return self.streaming.stats()

    def wait_all_replicas(self, version: int, timeout_s: float = 60, poll_s: float = 0.02,
                          prefix: str = "", canary: bool = False) -> dict[str, float]:
        """Poll /version until every replica serves `version` (with `canary`: holds it as
        its canary; it may be promoted meanwhile, which counts too).

        Returns {replica: ms from publish to that replica serving it}, as each replica
        measured it (registry made it the serving version -> its swap done; None for a
        canary). `prefix` is the route prefix of an app other than the main one.
        """
        seen: dict[str, dict] = {}

        def all_on_version() -> dict[str, float] | None:
            response = answers("/version", http, 10)  # a slow poll or a 503 is retried
            if response is not None:
                body = response.json()
                seen[body["replica"]] = body
            if len(seen) >= self.settings.serving.num_replicas and all(
                    version in (b["prompt_version"],
                                b["canary"]["prompt_version"] if canary else None)
                    for b in seen.values()):
                return {r: b["publish_to_live_ms"] for r, b in seen.items()}
            return None

        with httpx.Client(base_url=self.base_url + prefix, timeout=10) as http:
            return wait_until(all_on_version, timeout_s,
                              lambda: f"replicas {seen} all on version {version}", poll_s)

    def stop(self) -> None:
        from ray import serve

        if self.catalogs:
            self.catalogs.stop()
        if ray.is_initialized():
            if self.runner:
                self.runner.close()
            # A Serve app that a config deployed belongs to that config (its replicas find
            # the registry of the next driver by name), not to this process.
            # Only this app: on a shared cluster Serve's other apps are not ours to stop,
            # and on a local one ray.shutdown() ends Serve itself (serve.shutdown() raced
            # its controller's own graceful shutdown, which the raylet then reported).
            if self.settings.infra.deploy_serve:
                try:
                    serve.delete(SERVE_APP)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    log.exception("deleting the Serve app")
            if self.streaming:
                self.streaming.stop()
            ray.shutdown()
        if self.broker:
            self.broker.stop()
