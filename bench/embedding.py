"""Item embedding in float32 against bfloat16 autocast: items/s and how close the vectors
are, on the same texts, one process (bench/catalog.py records it as
`embedding_precision` in catalog.json; the live item consumer embeds in bf16 by default,
setting `item_embed_bf16`).

    .venv/bin/python -m bench.embedding [--items 1024]   # prints the JSON

Batches of 8 are what the item consumer embeds at ~100 items/s (a 50 ms linger); 64 is
its `item_batch_max` and the start-up catalog's batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from services.backbone import default_backbone_path, embed_texts, load_backbone

BATCHES = (8, 64)


def compare(texts: list[str], backbone: Path, threads: int = 2) -> dict:
    """-> per batch size, float32 and bf16 items/s; the cosine of each text's two vectors
    (min, mean) over `texts`."""
    torch.set_num_threads(threads)
    tokenizer, encoder = load_backbone(backbone)
    result: dict = {"items": len(texts), "threads": threads}
    vectors: dict[bool, torch.Tensor] = {}
    for batch in BATCHES:
        for bf16 in (False, True):
            embed_texts(tokenizer, encoder, texts[:batch], batch_size=batch, bf16=bf16)
            started = time.perf_counter()
            vectors[bf16] = embed_texts(tokenizer, encoder, texts, batch_size=batch, bf16=bf16)
            per_s = len(texts) / (time.perf_counter() - started)
            result[f"{'bf16' if bf16 else 'float32'}_items_per_s_batch{batch}"] = round(per_s, 1)
        result[f"bf16_speedup_batch{batch}"] = round(
            result[f"bf16_items_per_s_batch{batch}"] / result[f"float32_items_per_s_batch{batch}"],
            2)
    cosine = (vectors[False] * vectors[True]).sum(-1)
    result["cosine_min"] = round(cosine.min().item(), 6)
    result["cosine_mean"] = round(cosine.mean().item(), 6)
    return result


def main(argv: list[str] | None = None) -> int:
    from bench.catalog_live import live_items

    parser = argparse.ArgumentParser(prog="python -m bench.embedding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1024, help="texts embedded per case")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    texts = [item.document for item in live_items("emb", args.items)]
    print(json.dumps(compare(texts, default_backbone_path(), args.threads), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
