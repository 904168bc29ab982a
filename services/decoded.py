"""Decode each prompt version once per process.

A process meets the same version many times: a training round evaluates the serving
version every round, a replica re-reads the version it swaps to, a checker rebuilds it
per response. `decode_version(version, blob)` parses and checks a blob once and hands
back the same `PromptWeights` afterwards (treat it as read-only).

The key is (version, sha256 of the blob): registries restart at version 1 (a fresh
data dir, a test), so a number alone could name other weights. The cache is small and
least-recently-used: a process needs the serving version, a candidate and perhaps the
one it rolls back to, within DECODED_BYTES_KEPT. A refused blob is not cached; each call
refuses it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from services.config import ModelConfig
from services.weights import PromptWeights, decode_weights

DECODED_VERSIONS_KEPT = 8
# ... and at most this many bytes of blobs: at 100,000 items one version is ~150 MB of
# item weights, and eight of them held 1.2 GB in every replica.
DECODED_BYTES_KEPT = 512 << 20


class DecodedVersions:
    """A bounded LRU of decoded versions, safe to share between threads (a replica's
    watcher thread and its request handlers); `hits`/`misses` count look-ups."""

    def __init__(self, maxsize: int = DECODED_VERSIONS_KEPT,
                 max_bytes: int = DECODED_BYTES_KEPT):
        self.maxsize, self.max_bytes = maxsize, max_bytes
        self.hits = self.misses = 0
        self._kept: OrderedDict[tuple[int, str], PromptWeights] = OrderedDict()
        self._bytes: dict[tuple[int, str], int] = {}
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
                self._bytes[key] = len(blob)
                # The newest stays whatever its size; older ones go, oldest first.
                while len(self._kept) > 1 and (len(self._kept) > self.maxsize or
                                               sum(self._bytes.values()) > self.max_bytes):
                    self._bytes.pop(self._kept.popitem(last=False)[0])
        # What the caller expects may differ per call; checking it is cheap (no tensor scan).
        weights.check_fits(hidden_size, num_items, config)
        return weights

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self._bytes.clear()
            self.hits = self.misses = 0


# One per process: every caller in the process shares what was decoded.
PROCESS_VERSIONS = DecodedVersions()


def decode_version(version: int, blob: bytes, hidden_size: int | None = None,
                   num_items: int | None = None, config: ModelConfig | None = None
                   ) -> PromptWeights:
    """`decode_weights` for a registry version, once per process (PROCESS_VERSIONS)."""
    return PROCESS_VERSIONS.get(version, blob, hidden_size, num_items, config)
