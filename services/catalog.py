"""The item catalog: text and frozen embeddings, computed once and cached.

The cache file is keyed by backbone fingerprint + catalog text hash, so a new
backbone or a changed catalog never reads stale vectors.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from services.backbone import backbone_fingerprint, embed_texts, load_backbone
from services.data import Item, load_items


@dataclass
class Catalog:
    items: list[Item]
    vectors: torch.Tensor  # [N, H] unit-norm frozen text embeddings
    index: dict[str, int] = field(init=False)
    unavailable: list[int] = field(init=False)  # items never recommended (available false)
    by_category: dict[str, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.items) != self.vectors.shape[0]:
            raise ValueError("one vector per item")
        self.index = {item.item_id: i for i, item in enumerate(self.items)}
        self.unavailable = [i for i, item in enumerate(self.items) if not item.available]
        self.by_category = {}
        for i, item in enumerate(self.items):
            for category in item.categories:
                self.by_category.setdefault(category, []).append(i)

    def in_categories(self, categories: tuple[str, ...]) -> torch.Tensor:
        """[N] bool: the items in at least one of `categories` (unknown ones match none)."""
        mask = torch.zeros(len(self.items), dtype=torch.bool)
        for category in categories:
            mask[self.by_category.get(category, [])] = True
        return mask

    def __len__(self) -> int:
        return len(self.items)

    def indices(self, item_ids: list[str]) -> list[int]:
        """Known items only, order kept."""
        return [self.index[i] for i in item_ids if i in self.index]


def catalog_key(items: list[Item], backbone_path: Path) -> str:
    text_hash = hashlib.sha256("\n".join(f"{i.item_id}\t{i.document}" for i in items).encode())
    return f"{backbone_fingerprint(backbone_path)}-{text_hash.hexdigest()[:16]}"


def build_catalog(items: list[Item], backbone_path: Path, cache_dir: Path,
                  progress: bool = False) -> Catalog:
    """Embed `items` with the frozen backbone, or read them from the cache."""
    cache = cache_dir / f"catalog-{catalog_key(items, backbone_path)}.safetensors"
    if cache.exists():
        return Catalog(items, load_file(str(cache))["vectors"])
    tokenizer, encoder = load_backbone(backbone_path)
    vectors = embed_texts(tokenizer, encoder, [i.document for i in items], progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    save_file({"vectors": vectors.contiguous()}, str(tmp))
    tmp.replace(cache)  # atomic: concurrent builders never see half a file
    return Catalog(items, vectors)


def load_catalog(source: str, backbone_path: Path, cache_dir: Path,
                 progress: bool = False) -> Catalog:
    """The catalog of a MovieLens name or an item file (`InfraSettings.catalog_source`)."""
    return build_catalog(load_items(source), backbone_path, cache_dir, progress)
