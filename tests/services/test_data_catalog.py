import torch

from services.backbone import default_backbone_path
from services.catalog import Catalog, build_catalog
from services.data import Item, load_interactions, load_items
from services.vector_cache import TextVectors


def test_movielens_100k_is_read_from_its_package():
    items = load_items("ml-100k")
    inter = load_interactions("ml-100k")
    assert len(items) == 1682 and len(inter) == 100_000
    assert items[0].title == "Toy Story" and items[0].attributes == {"year": "1995"}
    assert items[0].categories == ("Animation", "Children's", "Comedy")
    # The text the backbone has always read for a movie (cached embeddings stay valid).
    assert items[0].document == "Toy Story (1995). Genres: Animation Children's Comedy."
    assert (inter.ts[1:] >= inter.ts[:-1]).all()  # timestamp order for replay
    event = inter.event(0)
    assert event.event_id == f"ml-100k-{inter.row[0]}" and event.type == "rating"


def test_movielens_1m_items_use_title_year_keys():
    items = load_items("ml-1m")
    assert len(items) > 3000
    assert items[0].item_id == "Toy Story (1995)" and items[0].attributes["year"] == "1995"


def test_item_vectors_are_cached_by_text_so_no_text_is_embedded_twice(tmp_path, monkeypatch):
    items = [Item("a", "Alien", categories=("Horror", "Sci-Fi")),
             Item("b", "Babe", description="A pig.", categories=("Children",))]
    first = build_catalog(items, default_backbone_path(), tmp_path)
    assert first.vectors.shape == (2, 384)
    assert abs(float(first.vectors.norm(dim=1).mean()) - 1.0) < 1e-4
    # A second build (a restart) must come from the cache, not the backbone.
    monkeypatch.setattr("services.vector_cache.load_backbone",
                        lambda *_: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = build_catalog(items, default_backbone_path(), tmp_path)
    assert (again.vectors == first.vectors).all()
    assert again.indices(["b", "zzz", "a"]) == [1, 0]
    # Another catalog sharing a text reads that text back; only the new text is embedded.
    monkeypatch.undo()
    cache = TextVectors(default_backbone_path(), tmp_path)
    vectors = cache.embed([items[1].document, "Casablanca."])
    assert (cache.embedded, cache.hits) == (1, 1)
    assert torch.equal(vectors[0], first.vectors[1])


def _vectors(n: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 8, generator=torch.Generator()
                                                     .manual_seed(seed)), dim=1)


def test_a_catalog_change_appends_new_items_replaces_changed_ones_and_keeps_rows():
    base = Catalog([Item("a", "A", categories=("x",)), Item("b", "B")], _vectors(2))
    new = _vectors(2, seed=1)
    after = base.changed([Item("c", "C", categories=("x",)), Item("a", "A2")], new, ["b"], 7)
    assert after.version == 7 and after.item_ids == ["a", "b", "c"]
    assert after.index == {"a": 0, "c": 2}  # b deleted: a tombstone, out of the index
    assert sorted(after.unavailable) == [1]
    assert torch.equal(after.vectors[0], new[1]) and torch.equal(after.vectors[2], new[0])
    assert after.items[0].title == "A2" and after.by_category == {"x": [2]}
    # The old version is untouched: requests that read it finish on it.
    assert base.items[0].title == "A" and torch.equal(base.vectors, _vectors(2))
    assert base.index == {"a": 0, "b": 1}
    # A hidden item keeps its row and is masked; a deleted id that comes back is appended.
    again = after.changed([Item("c", "C", available=False), Item("b", "B")], _vectors(2, 2),
                          [], 8)
    assert again.index == {"a": 0, "c": 2, "b": 3} and sorted(again.unavailable) == [1, 2]


def test_bf16_embedding_keeps_float32_vectors_within_rounding_of_the_float32_ones(tmp_path):
    texts = ["Alien (1979). Genres: Horror Sci-Fi.", "New lamp 3. A tent made for map users.",
             "Babe (1995). A pig."]
    exact = TextVectors(default_backbone_path(), tmp_path / "f32").embed(texts)
    rounded = TextVectors(default_backbone_path(), tmp_path / "bf16", bf16=True).embed(texts)
    assert rounded.dtype == torch.float32 and rounded.shape == (3, 384)
    assert not torch.equal(rounded, exact)  # the autocast did run
    assert float((rounded * exact).sum(-1).min()) > 0.999
    assert torch.allclose(rounded.norm(dim=1), torch.ones(3), atol=1e-4)
