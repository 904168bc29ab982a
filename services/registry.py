"""PromptRegistry: versioned prompt weights, on disk, with a long-poll for replicas.

Plain class (unit-testable with asyncio); `start_registry` runs it as a named
Ray actor. Layout on disk::

    <root>/v000001.safetensors   one file per version
    <root>/index.json            {"serving": n, "versions": [{version, sha256, bytes, meta}]}

"Serving" is the version replicas should use: the newest published one, or an
older one after a rollback. Replicas call `wait_for_change(known, timeout)`,
which returns as soon as serving differs from `known` (a push, not a poll loop).
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

from services.model import BadPromptWeights, prompt_from_bytes

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

    def _write_index(self) -> None:
        index = self.root / "index.json"
        tmp = index.with_suffix(".tmp")
        tmp.write_text(json.dumps({"serving": self._serving,
                                   "versions": [self._versions[v] for v in sorted(self._versions)]},
                                  indent=1))
        tmp.replace(index)

    def _read_checked(self, entry: dict[str, Any]) -> bytes:
        blob = self._path(entry["version"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise BadPromptWeights(f"checksum mismatch for version {entry['version']}")
        prompt_from_bytes(blob, self.hidden_size)
        return blob

    def _set_serving(self, version: int) -> None:
        self._serving = version
        # Replicas time their swap from here: "created" is wrong for a rollback.
        self._serving_since = time.time()
        self._write_index()
        # Wake every waiting replica, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    # --- API ---------------------------------------------------------
    async def publish(self, blob: bytes, meta: dict[str, Any] | None = None) -> int:
        """Store new weights (checked first) and make them the serving version."""
        prompt_from_bytes(blob, self.hidden_size)
        version = max(self._versions, default=0) + 1
        path = self._path(version)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        tmp.replace(path)
        self._versions[version] = {"version": version, "sha256": hashlib.sha256(blob).hexdigest(),
                                   "bytes": len(blob), "created": time.time(),
                                   "meta": dict(meta or {})}
        self._set_serving(version)
        log.info("published prompt version %d (%d bytes)", version, len(blob))
        return version

    async def rollback(self, version: int) -> dict[str, Any]:
        if version not in self._versions:
            raise UnknownVersion(f"no prompt version {version}; kept: {sorted(self._versions)}")
        self._read_checked(self._versions[version])
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

    async def wait_for_change(self, known_version: int, timeout_s: float) -> dict[str, Any]:
        """Long-poll: the serving entry (with blob) once it differs from `known_version`,
        or {} after `timeout_s`."""
        if self._serving == known_version:
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except TimeoutError:
                return {}
        return await self.serving()


def start_registry(settings, hidden_size: int):
    """The registry as a named actor; reuses a running one (e.g. after a driver restart)."""
    import ray

    from services.naming import REGISTRY_ACTOR

    actor_cls = ray.remote(PromptRegistry)
    return actor_cls.options(name=REGISTRY_ACTOR, namespace=settings.infra.namespace, get_if_exists=True,
                             num_cpus=0, max_concurrency=1000).remote(
        str(settings.infra.root / "registry"), hidden_size)
