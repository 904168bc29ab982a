"""Item text vectors cached by text hash: a text is embedded once per backbone, ever.

Every item vector comes through `TextVectors.embed`: the catalog built at start-up, and
each live item a consumer of `promptrec.items` embeds. A text seen before (the same item
after a restart, an unchanged text re-sent, another item with the same text) is read
back, not re-embedded; only misses reach the backbone.

On disk, per backbone fingerprint, one safetensors file per embedded batch::

    <cache>/vectors/<fingerprint>/part-<time>-<pid>-<n>.safetensors
        keys     [B, 16] uint8    first 16 bytes of sha256(text)
        vectors  [B, H]  float32  unit norm

Files are written whole, then renamed (readers never see half a file); several
processes may share a cache directory. A process reads every part once when it opens
the cache, and parts other processes add later on a miss.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from services.backbone import backbone_fingerprint, embed_texts, load_backbone

KEY_BYTES = 16


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:KEY_BYTES]


class TextVectors:
    """The frozen backbone's text vectors for one backbone, with the cache in front.

    The backbone itself is loaded on the first miss only: a replica or a restart whose
    texts are all cached never loads it for embedding.
    """

    def __init__(self, backbone_path: Path, cache_dir: Path, bf16: bool = False):
        self.backbone_path, self.bf16 = Path(backbone_path), bf16
        self.root = Path(cache_dir) / "vectors" / backbone_fingerprint(backbone_path)
        self._rows: dict[bytes, torch.Tensor] = {}
        self._read_parts: set[str] = set()
        self._model = None
        self._counter = itertools.count()
        self.embedded = self.hits = 0  # texts embedded / read back, since start
        self._read_new_parts()

    def _read_parts_on_disk(self) -> list[Path]:
        return sorted(self.root.glob("part-*.safetensors")) if self.root.exists() else []

    def _read_new_parts(self) -> None:
        for part in self._read_parts_on_disk():
            if part.name in self._read_parts:
                continue
            tensors = load_file(str(part))
            for key, vector in zip(tensors["keys"].numpy(), tensors["vectors"], strict=True):
                self._rows[key.tobytes()] = vector
            self._read_parts.add(part.name)

    def embed(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        """texts -> [N, H] unit-norm vectors, embedding only the texts not cached."""
        keys = [text_key(t) for t in texts]
        if any(k not in self._rows for k in keys):
            self._read_new_parts()  # another process may have embedded them
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True)
                                     if k not in self._rows))
        if missing:
            self._add(missing, self._embed(missing, progress))
        self.hits += len(texts) - len(missing)
        if not texts:
            return torch.zeros(0, self.hidden_size)
        return torch.stack([self._rows[k] for k in keys])

    @property
    def hidden_size(self) -> int:
        if self._rows:
            return int(next(iter(self._rows.values())).shape[0])
        return int(self._backbone()[1].config.hidden_size)

    def warm_up(self) -> None:
        """Load the backbone and run it once now, so the first live item does not wait
        for it (~5 s here)."""
        tokenizer, encoder = self._backbone()
        embed_texts(tokenizer, encoder, ["warm up"], bf16=self.bf16)

    def _backbone(self):
        if self._model is None:
            self._model = load_backbone(self.backbone_path)
        return self._model

    def _embed(self, texts: list[str], progress: bool) -> torch.Tensor:
        tokenizer, encoder = self._backbone()
        self.embedded += len(texts)
        return embed_texts(tokenizer, encoder, texts, progress=progress, bf16=self.bf16)

    def _add(self, texts: list[str], vectors: torch.Tensor) -> None:
        keys = np.frombuffer(b"".join(text_key(t) for t in texts), np.uint8)
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns()}-{os.getpid()}-{next(self._counter)}.safetensors"
        tmp = self.root / f".{name}.tmp"
        save_file({"keys": torch.from_numpy(keys.reshape(len(texts), KEY_BYTES).copy()),
                   "vectors": vectors.float().contiguous()}, str(tmp))
        tmp.replace(self.root / name)  # atomic: other readers never see half a file
        self._read_parts.add(name)
        for text, vector in zip(texts, vectors, strict=True):
            self._rows[text_key(text)] = vector
