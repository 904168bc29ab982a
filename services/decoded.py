"""Decode each prompt version once per process.

A process meets the same version many times: a training round evaluates the serving
version every round, a replica re-reads the version it swaps to, a checker rebuilds it
per response. `decode_version(version, blob)` parses and checks a blob once and hands
back the same `PromptWeights` afterwards (treat it as read-only).

The key is (version, sha256 of the blob): registries restart at version 1 (a fresh
data dir, a test), so a number alone could name other weights. The cache is small and
least-recently-used: a process needs the serving version, a candidate and perhaps the
one it rolls back to. A refused blob is not cached; each call refuses it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from services.config import ModelConfig
from services.weights import PromptWeights, decode_weights

DECODED_VERSIONS_KEPT = 8


class DecodedVersions:
    """A bounded LRU of decoded versions, safe to share between threads (a replica's
    watcher thread and its request handlers); `hits`/`misses` count look-ups."""

    def __init__(self, maxsize: int = DECODED_VERSIONS_KEPT):
        self.maxsize = maxsize
        self.hits = self.misses = 0
        self._kept: OrderedDict[tuple[int, str], PromptWeights] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: int, blob: bytes, hidden_size: int | None = None,
            num_items: int | None = None, config: ModelConfig | None = None) -> PromptWeights:
        """The checked weights of `version` (see `decode_weights`; raises
        `BadPromptWeights`), decoded only the first time this blob is seen."""
        key = (version, hashlib.sha256(blob).hexdigest())
        with self._lock:
            weights = self._kept.get(key)
            if weights is not None:
                self._kept.move_to_end(key)
                self.hits += 1
        if weights is None:
            weights = decode_weights(blob)  # outside the lock: ~ms for a full catalog
            with self._lock:
                self.misses += 1
                self._kept[key] = weights
                while len(self._kept) > self.maxsize:
                    self._kept.popitem(last=False)
        # What the caller expects may differ per call; checking it is cheap (no tensor scan).
        weights.check_fits(hidden_size, num_items, config)
        return weights

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self.hits = self.misses = 0


# One per process: every caller in the process shares what was decoded.
PROCESS_VERSIONS = DecodedVersions()


def decode_version(version: int, blob: bytes, hidden_size: int | None = None,
                   num_items: int | None = None, config: ModelConfig | None = None
                   ) -> PromptWeights:
    """`decode_weights` for a registry version, once per process (PROCESS_VERSIONS)."""
    return PROCESS_VERSIONS.get(version, blob, hidden_size, num_items, config)
