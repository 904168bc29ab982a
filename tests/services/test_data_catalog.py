import torch

from services.backbone import default_backbone_path
from services.catalog import build_catalog
from services.data import Item, load_interactions, load_items


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


def test_catalog_embeddings_are_cached_per_catalog(tmp_path, monkeypatch):
    items = [Item("a", "Alien", categories=("Horror", "Sci-Fi")),
             Item("b", "Babe", description="A pig.", categories=("Children",))]
    first = build_catalog(items, default_backbone_path(), tmp_path)
    assert first.vectors.shape == (2, 384)
    assert abs(float(first.vectors.norm(dim=1).mean()) - 1.0) < 1e-4
    # A second build must come from the cache, not the backbone.
    monkeypatch.setattr("services.catalog.load_backbone",
                        lambda *_: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = build_catalog(items, default_backbone_path(), tmp_path)
    assert (again.vectors == first.vectors).all()
    assert again.indices(["b", "zzz", "a"]) == [1, 0]
    # A changed catalog gets a new cache entry.
    monkeypatch.undo()
    changed = build_catalog(items[:1], default_backbone_path(), tmp_path)
    assert len(list(tmp_path.glob("catalog-*.safetensors"))) == 2
    assert changed.vectors.shape == (1, 384)
    assert torch.allclose(changed.vectors[0], first.vectors[0], atol=1e-4)
