"""PromptRegistry: versioned prompt weights, on disk, with a long-poll for replicas.

Plain class (unit-testable with asyncio); `start_registry` runs it as a named
Ray actor. Layout on disk::

    <root>/v000001.safetensors   one file per version
    <root>/index.json            {"serving": n, "versions": [{version, sha256, bytes, meta}]}

"Serving" is the version replicas should use: the newest published one, or an
older one after a rollback. With a canary share, a newly published version is first the
*canary*: it serves that share of users (services.canary) beside the serving version
until the live-metrics judge promotes it (it becomes serving) or rolls it back; a newer
publish supersedes a running canary. An *experiment* (services.experiments) splits
every user between kept versions or a popularity arm until it is stopped; while it runs
no canary starts (a publish serves, after the experiment, everyone). Replicas call
`wait_for_routing(known, timeout)`, which returns as soon as (serving, canary,
experiment) differs from `known` (a push, not a poll loop).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from services.decoded import decode_version
from services.experiments import ExperimentBook, UnknownExperiment  # noqa: F401 (re-export)
from services.weights import BadPromptWeights, decode_weights

log = logging.getLogger(__name__)


class UnknownVersion(KeyError):
    pass


class PromptRegistry:
    def __init__(self, root: str, hidden_size: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hidden_size = hidden_size
        self._versions: dict[int, dict[str, Any]] = {}
        self._serving: int = 0
        self._serving_since = time.time()
        self._canary: int = 0  # 0: no canary running
        self._canary_share = 0.0
        self._canary_since = 0.0
        self.canary_outcomes: list[dict[str, Any]] = []  # this process's, newest last
        self.experiments_book = ExperimentBook()
        self._changed = asyncio.Event()
        self._load_index()

    # --- persistence -------------------------------------------------
    def _path(self, version: int) -> Path:
        return self.root / f"v{version:06d}.safetensors"

    def _load_index(self) -> None:
        index = self.root / "index.json"
        if not index.exists():
            return
        data = json.loads(index.read_text())
        for entry in data["versions"]:
            try:
                self._read_checked(entry)
            except (BadPromptWeights, OSError) as err:
                log.error("prompt version %s refused on load: %s", entry["version"], err)
                continue
            self._versions[entry["version"]] = entry
        serving = data.get("serving", 0)
        self._serving = serving if serving in self._versions else max(self._versions, default=0)
        canary = data.get("canary", 0)
        if canary in self._versions and canary != self._serving:
            self._canary, self._canary_share = canary, data.get("canary_share", 0.0)
            self._canary_since = data.get("canary_since", time.time())
        self.experiments_book.load(data.get("experiments", []), set(self._versions))

    def _write_index(self) -> None:
        index = self.root / "index.json"
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"serving": self._serving, "canary": self._canary,
                                   "canary_share": self._canary_share,
                                   "canary_since": self._canary_since,
                                   "experiments": self.experiments_book.to_list(),
                                   "versions": [self._versions[v] for v in sorted(self._versions)]},
                                  indent=1))
        tmp.replace(index)

    def _read_checked(self, entry: dict[str, Any]) -> bytes:
        blob = self._path(entry["version"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise BadPromptWeights(f"checksum mismatch for version {entry['version']}")
        decode_version(entry["version"], blob, self.hidden_size)  # every read: parse once
        return blob

    def _set_serving(self, version: int) -> None:
        self._serving = version
        # Replicas time their swap from here: "created" is wrong for a rollback.
        self._serving_since = time.time()
        self._canary = 0
        self._routing_changed()

    def _routing_changed(self) -> None:
        self._write_index()
        # Wake every waiting replica, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    def _end_canary(self, outcome: str, reason: str) -> None:
        self.canary_outcomes.append({"version": self._canary, "outcome": outcome,
                                     "reason": reason, "at": time.time(),
                                     "serving": self._serving})
        del self.canary_outcomes[:-100]
        log.info("canary version %d %s: %s", self._canary, outcome, reason)

    # --- API ---------------------------------------------------------
    async def publish(self, blob: bytes, meta: dict[str, Any] | None = None,
                      canary_share: float = 0.0) -> int:
        """Store new weights (checked first) and make them the serving version, or with
        `canary_share` > 0 (and a serving version to compare with) the canary."""
        decode_weights(blob, self.hidden_size)
        version = max(self._versions, default=0) + 1
        path = self._path(version)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        tmp.replace(path)
        self._versions[version] = {"version": version, "sha256": hashlib.sha256(blob).hexdigest(),
                                   "bytes": len(blob), "created": time.time(),
                                   "meta": dict(meta or {})}
        if self.experiments_book.running and canary_share > 0:
            log.info("an experiment runs: version %d is published without a canary", version)
            canary_share = 0.0
        if canary_share > 0 and self._serving:
            if self._canary:
                self._end_canary("superseded", f"version {version} was published")
            self._canary, self._canary_share = version, canary_share
            self._canary_since = time.time()
            self._routing_changed()
            log.info("published prompt version %d (%d bytes) as the canary for %.0f%% of "
                     "users", version, len(blob), 100 * canary_share)
        else:
            if self._canary:  # published for everyone: a running canary is moot
                self._end_canary("superseded", f"version {version} was published to all")
            self._set_serving(version)
            log.info("published prompt version %d (%d bytes)", version, len(blob))
        return version

    async def end_canary(self, version: int, outcome: str, reason: str) -> bool:
        """The judge's verdict on canary `version`: "promote" makes it the serving
        version, "rollback" stops it (the serving version serves everyone again). False
        when `version` is no longer the canary (superseded, or an operator acted)."""
        if outcome not in ("promote", "rollback"):
            raise ValueError(f"outcome must be promote or rollback, got {outcome!r}")
        if version != self._canary or not version:
            return False
        self._end_canary(outcome, reason)
        if outcome == "promote":
            self._set_serving(version)
        else:
            self._canary = 0
            self._routing_changed()
        return True

    async def routing(self) -> dict[str, Any]:
        """Who serves whom now: versions only (no blobs), and the canary's outcomes."""
        return {"serving": self._serving, "canary": self._canary,
                "canary_share": self._canary_share if self._canary else 0.0,
                "canary_since": self._canary_since if self._canary else None,
                "canary_outcomes": list(self.canary_outcomes[-10:]),
                "experiment": self._running_experiment()}

    def _running_experiment(self) -> dict[str, Any] | None:
        running = self.experiments_book.running
        return running.to_dict() if running else None

    async def start_experiment(self, arms: Any) -> dict[str, Any]:
        """Split every user between the `arms` (services.experiments.parse_arms) until
        `stop_experiment`; a running canary ends (superseded). BadExperiment on bad arms
        or while another experiment runs."""
        experiment = self.experiments_book.start(arms, set(self._versions))
        if self._canary:
            self._end_canary("superseded", "an experiment started")
            self._canary = 0
        self._routing_changed()
        log.info("experiment %s started: %s", experiment.id, experiment.to_dict()["arms"])
        return experiment.to_dict()

    async def stop_experiment(self, experiment_id: str, reason: str = "stopped") -> dict:
        """End an experiment: everyone is served by the serving version again. Stopping
        one that has stopped returns it unchanged."""
        experiment, was_running = self.experiments_book.stop(experiment_id, reason)
        if was_running:
            self._routing_changed()
            log.info("experiment %s stopped: %s", experiment_id, reason)
        return experiment.to_dict()

    async def experiment(self, experiment_id: str) -> dict[str, Any]:
        return self.experiments_book.get(experiment_id).to_dict()

    async def experiments(self) -> list[dict[str, Any]]:
        return self.experiments_book.to_list()

    async def rollback(self, version: int) -> dict[str, Any]:
        """An operator's call: `version` serves everyone; a running canary stops."""
        if version not in self._versions:
            raise UnknownVersion(f"no prompt version {version}; kept: {sorted(self._versions)}")
        self._read_checked(self._versions[version])
        if self._canary:
            self._end_canary("rollback", f"operator rolled back to version {version}")
        self._set_serving(version)
        log.info("rolled back to prompt version %d", version)
        return self._versions[version]

    async def serving(self) -> dict[str, Any]:
        """Serving version's entry plus its weights under "blob" and the time it became
        the serving version under "serving_since" ({} if none yet)."""
        if not self._serving:
            return {}
        entry = self._versions[self._serving]
        return {**entry, "blob": self._read_checked(entry), "serving_since": self._serving_since}

    async def serving_version(self) -> int:
        return self._serving

    async def get(self, version: int) -> dict[str, Any]:
        if version not in self._versions:
            raise UnknownVersion(f"no prompt version {version}")
        entry = self._versions[version]
        return {**entry, "blob": self._read_checked(entry)}

    async def versions(self) -> list[dict[str, Any]]:
        return [self._versions[v] for v in sorted(self._versions)]

    async def wait_for_routing(self, known: list, timeout_s: float) -> dict[str, Any]:
        """Long-poll: once [serving, canary, experiment id] differs from `known`, the
        serving entry and the canary's (with blobs; {} for none), the canary share and
        the running experiment (None) with an entry per version arm under "entries";
        {} after `timeout_s`."""
        running = self.experiments_book.running
        if [self._serving, self._canary, running.id if running else ""] == list(known):
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                return {}
        canary = {}
        if self._canary:
            entry = self._versions[self._canary]
            canary = {**entry, "blob": self._read_checked(entry),
                      "serving_since": self._canary_since}
        running = self.experiments_book.running  # read again: the wait may have ended it
        experiment = running.to_dict() if running else None
        if running:
            experiment["entries"] = {a.version: {**self._versions[a.version], "blob":
                                                 self._read_checked(self._versions[a.version])}
                                     for a in running.arms if not a.popularity}
        return {"serving": await self.serving(), "canary": canary,
                "canary_share": self._canary_share if self._canary else 0.0,
                "experiment": experiment}


def start_registry(settings, hidden_size: int):
    """The registry as a named actor; reuses a running one (e.g. after a driver restart)."""
    import ray

    from services.naming import REGISTRY_ACTOR
    from services.placement import actor_options

    actor_cls = ray.remote(PromptRegistry)
    return actor_cls.options(name=REGISTRY_ACTOR, namespace=settings.infra.namespace,
                             get_if_exists=True, num_cpus=0, max_concurrency=1000,
                             **actor_options(settings, "registries")).remote(
        str(settings.infra.root / "registry"), hidden_size)
