"""The garbage-collector policy of the ingest hot loops (consumers and shards).

Both run in processes of their own that allocate a few objects per event and keep
almost none of them in reference cycles. With CPython's default generation-0 threshold
(700 allocations) a collection runs every ~100 events of a poll and walks the poll's
young objects each time: in `python -m bench.ingest` that was a quarter to a third of a
consumer's decode time. Freezing what lives at start-up and collecting generation 0
every 100,000 allocations instead keeps cycles bounded (they are still collected) and
takes the collector out of the per-event cost.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 100_000


def freeze_and_relax() -> None:
    """Move every live object out of the collector's sight (refcounting still frees them)
    and collect generation 0 every GEN0_THRESHOLD allocations (never more often than the
    process already does)."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GEN0_THRESHOLD), gen1, gen2)
