from pathlib import Path

# Frozen item embeddings are cached here across test runs (same key rules as production),
# so each end-to-end stack does not re-embed the catalog.
TEST_CACHE = Path(__file__).resolve().parent.parent / ".promptrec" / "cache"
