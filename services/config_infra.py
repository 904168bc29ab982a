"""The infrastructure section of the settings (`services.config` gathers every section):
where the broker, Ray and the data are, and where actors prefer to run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from services.config_rules import ConfigError
from services.config_rules import opt as _opt

DATASETS = ("ml-100k", "ml-1m")
# The engines the shipped Tansu build has (no postgres, sqlite or slatedb feature).
BROKER_STORAGE = re.compile(r"(memory|s3)://[A-Za-z0-9][A-Za-z0-9._-]*/")


@dataclass(frozen=True)
class InfraSettings:
    kafka_bootstrap: str = _opt("", "Kafka bootstrap servers host:port[,host:port]; empty starts "
                                "the embedded Tansu broker")
    broker_storage: str = _opt("memory://tansu/", "the embedded broker's log: memory://tansu/ "
                               "(lost at a stop) or s3://BUCKET/ (durable; AWS_* variables)")
    ray_address: str = _opt("", "Ray cluster address (e.g. ray://head:10001 or auto); empty "
                            "starts a local Ray")
    ray_num_cpus: float = _opt(8.0, "logical CPUs of the local Ray (actors use fractions of "
                               "them)", ">0")
    namespace: str = _opt("promptrec", "Ray namespace of named actors")
    ray_log_to_driver: bool = _opt(False, "stream Ray worker logs to this terminal (they are "
                                   "always in Ray's session logs)")
    deploy_serve: bool = _opt(True, "deploy the Serve app from this process; off when a Serve "
                              "config owns it (deploy/serve.yaml through `serve deploy` or a "
                              "KubeRay RayService)")
    data_dir: str = _opt(".promptrec", "where caches, the event log, prompt versions and Ray "
                         "Train results live")
    cache_dir: str = _opt("", "where frozen item embeddings are cached; empty means "
                          "<data_dir>/cache")
    dataset: str = _opt("ml-100k", "ml-100k or ml-1m: MovieLens, where catalog / events are empty")
    catalog: str = _opt("", "item file: Parquet, JSONL or CSV, path or URI (docs/data.md)", "file")
    events: str = _opt("", "event file, same formats, for replays and evaluations", "file")
    users: str = _opt("", "user profile file (user_id, text, attributes), same formats: "
                      "published to the profile topic at start-up (docs/data.md)", "file")
    metrics_port: int = _opt(8090, "Prometheus export port of Ray", "port")
    prefer_labelled_nodes: bool = _opt(False, "each kind of actor (registries, shards, "
                                       "consumers, replicas, train) asks first for a Ray node "
                                       "labelled promptrec-<kind>=yes, then any node (so it "
                                       "restarts elsewhere when that node is lost)")

    def check(self) -> None:
        if not BROKER_STORAGE.fullmatch(self.broker_storage):
            raise ConfigError("broker_storage",
                              f"must be memory://NAME/ or s3://BUCKET/: {self.broker_storage!r}")
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", f"must be ml-100k or ml-1m, got {self.dataset!r}")
        for hostport in filter(None, self.kafka_bootstrap.split(",")):
            host, _, port = hostport.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError("kafka_bootstrap", f"{hostport!r} is not host:port")

    @property
    def catalog_source(self) -> str:  # the catalog file, or the MovieLens name
        return self.catalog or self.dataset

    @property
    def events_source(self) -> str:
        return self.events or self.dataset

    @property
    def root(self) -> Path:
        return Path(self.data_dir).resolve()

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir).resolve() if self.cache_dir else self.root / "cache"


