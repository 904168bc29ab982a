"""Per-item weights keyed by item id: on the wire, and carried onto another catalog."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from services.item_weights import aligned_to
from services.weights import BadPromptWeights, PromptStructure, PromptWeights, decode_weights

H = 3


def _weights(item_ids: list[str] | None, n: int | None = None, seed: int = 0,
             bias: bool = True, tokens: bool = True) -> PromptWeights:
    n = len(item_ids) if n is None else n
    g = torch.Generator().manual_seed(seed)
    structure = PromptStructure(prompt_len=2, hidden_size=H, num_items=n, item_bias=bias,
                                item_tokens=tokens)
    return PromptWeights(structure, soft_prompt=torch.randn(2, H, generator=g),
                         logit_scale=torch.tensor(2.5),
                         item_bias=torch.randn(n, generator=g) if bias else None,
                         item_delta=torch.randn(n, H, generator=g) if tokens else None,
                         item_ids=None if item_ids is None else tuple(item_ids))


def _text(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, H, generator=g), dim=1)


def _row(weights: PromptWeights, item_id: str) -> tuple[float, list[float]]:
    i = weights.item_ids.index(item_id)
    return float(weights.item_bias[i]), weights.item_delta[i].tolist()


# --- on the wire --------------------------------------------------------------------

def test_item_ids_travel_with_the_blob():
    weights = _weights(["m1", "m2", "m3"])
    back = decode_weights(weights.to_bytes(), hidden_size=H)
    assert back.item_ids == ("m1", "m2", "m3")
    assert back.structure == weights.structure
    assert torch.equal(back.item_bias, weights.item_bias)
    assert torch.equal(back.item_delta, weights.item_delta)
    assert torch.equal(back.soft_prompt, weights.soft_prompt)
    # Keyed by id, a version is read for a catalog of any size.
    assert decode_weights(weights.to_bytes(), num_items=7).item_ids == back.item_ids
    # Positional weights stay positional.
    assert decode_weights(_weights(None, n=3).to_bytes()).item_ids is None


def test_a_blob_whose_item_ids_do_not_count_its_rows_is_refused():
    bad = dataclasses.replace(_weights(["a", "b", "c"]), item_ids=("a", "b"))
    with pytest.raises(BadPromptWeights, match="2 item ids for 3 rows"):
        decode_weights(bad.to_bytes())
    with pytest.raises(BadPromptWeights, match="item ids"):
        bad.check()


def test_item_ids_must_be_text():
    bad = dataclasses.replace(_weights(["a", "b"]), item_ids=(1, 2))
    with pytest.raises(BadPromptWeights, match="text"):
        decode_weights(bad.to_bytes())


def test_check_fits_takes_id_keyed_weights_for_any_catalog_but_positional_for_one_size():
    keyed = _weights(["a", "b", "c"])
    for size in (1, 3, 50):
        keyed.check_fits(num_items=size)
    positional = _weights(None, n=3)
    positional.check_fits(num_items=3)
    with pytest.raises(BadPromptWeights, match="item_bias has 3 items, the catalog 4"):
        positional.check_fits(num_items=4)
    with pytest.raises(BadPromptWeights, match="catalog 2"):
        decode_weights(positional.to_bytes(), num_items=2)


# --- aligned_to ---------------------------------------------------------------------

def test_the_same_ids_in_another_order_permute_the_rows_exactly():
    weights = _weights(["a", "b", "c", "d"])
    out = aligned_to(weights, ["c", "a", "d", "b"], _text(4, 1))
    assert out.item_ids == ("c", "a", "d", "b")
    order = [2, 0, 3, 1]
    assert torch.equal(out.item_bias, weights.item_bias[order])
    assert torch.equal(out.item_delta, weights.item_delta[order])
    assert out.structure == weights.structure
    assert torch.equal(out.soft_prompt, weights.soft_prompt)
    assert weights.item_ids == ("a", "b", "c", "d")  # the input version is left as it was
    out.check(hidden_size=H, num_items=4)


def test_new_items_start_from_the_mean_of_their_nearest_known_items_by_text():
    known = [f"k{i}" for i in range(14)]
    weights = _weights(known, seed=3)
    # Target: the known items shuffled, two new ones among them.
    target = ["k5", "new1", *known[:5], *known[6:10], "new2", *known[10:]]
    text = _text(len(target), 4)
    out = aligned_to(weights, target, text)
    assert out.item_ids == tuple(target) and out.structure.num_items == 16
    out.check(hidden_size=H, num_items=16)
    for item in known:  # known rows exactly as they were
        assert _row(out, item) == _row(weights, item)
    known_rows = [i for i, item in enumerate(target) if item in known]
    for new in ("new1", "new2"):
        i = target.index(new)
        sims = {j: float(text[i] @ text[j]) for j in known_rows}
        nearest = sorted(sims, key=sims.get, reverse=True)[:10]  # the default 10 neighbours
        ids = [target[j] for j in nearest]
        bias = np.mean([_row(weights, item)[0] for item in ids])
        delta = np.mean([_row(weights, item)[1] for item in ids], axis=0)
        assert np.isclose(float(out.item_bias[i]), bias, atol=1e-6)
        assert np.allclose(out.item_delta[i].numpy(), delta, atol=1e-6)


def test_without_text_vectors_new_items_get_the_mean_bias_and_no_item_token():
    weights = _weights(["a", "b", "c"], seed=5)
    out = aligned_to(weights, ["a", "c", "new"])
    # The mean of the known items of the target: b, gone from it, does not count.
    assert np.isclose(float(out.item_bias[2]), float(weights.item_bias[[0, 2]].mean()))
    assert out.item_delta[2].tolist() == [0.0] * H
    assert _row(out, "a") == _row(weights, "a") and _row(out, "c") == _row(weights, "c")


def test_deleted_items_are_dropped():
    weights = _weights(["a", "b", "c", "d"], seed=6)
    out = aligned_to(weights, ["d", "b"], _text(2, 7))
    assert out.item_ids == ("d", "b") and out.structure.num_items == 2
    assert torch.equal(out.item_bias, weights.item_bias[[3, 1]])
    assert torch.equal(out.item_delta, weights.item_delta[[3, 1]])
    back = decode_weights(out.to_bytes(), hidden_size=H)
    assert back.item_ids == ("d", "b") and torch.equal(back.item_bias, out.item_bias)


def test_an_id_that_came_back_takes_its_live_row_not_its_tombstones():
    # A live catalog keeps a deleted item's row as a tombstone; an id deleted and added
    # again names two rows, the later one live. A catalog that has it once gets that one.
    weights = _weights(["a", "b", "a"], seed=8)
    out = aligned_to(weights, ["b", "a"])
    assert _row(out, "a") == (float(weights.item_bias[2]), weights.item_delta[2].tolist())
    assert _row(out, "b") == (float(weights.item_bias[1]), weights.item_delta[1].tolist())


def test_only_the_tensors_a_version_has_are_aligned():
    weights = _weights(["a", "b"], seed=9, tokens=False)
    out = aligned_to(weights, ["b", "new", "a"], _text(3, 1))
    assert out.item_delta is None and out.structure.item_tokens is False
    assert out.item_bias[[0, 2]].tolist() == weights.item_bias[[1, 0]].tolist()
    assert np.isclose(float(out.item_bias[1]), float(weights.item_bias.mean()))  # k = 2
    out.check(num_items=3)


def test_positional_weights_and_an_unchanged_catalog_are_returned_as_they_are():
    positional = _weights(None, n=3)
    assert aligned_to(positional, ["x", "y", "z"], _text(3, 1)) is positional
    keyed = _weights(["a", "b"])
    assert aligned_to(keyed, ["a", "b"], _text(2, 1)) is keyed
    plain = PromptWeights.plain(torch.ones(2, H), torch.tensor(1.0))
    assert aligned_to(plain, ["a", "b"]) is plain


# --- the fast path: rows kept on a live catalog, change by change ----------------------

def test_rows_kept_on_a_changing_catalog_equal_a_full_alignment_after_every_change():
    from services.catalog import Catalog
    from services.data import Item
    from services.item_weights import CatalogRows

    known = [f"k{i}" for i in range(20)]
    weights = _weights(known, seed=3)
    catalog = Catalog([Item(i, i) for i in known[:15]], _text(15, 1))  # 5 known not here
    rows = CatalogRows(weights)
    g = torch.Generator().manual_seed(9)
    changes = [  # (upserts, deletes): new items, a new item's text changed, deletes,
        ([Item(f"n{i}", "x") for i in range(4)], []),  # a known item arriving late
        ([Item("n1", "y"), Item("n9", "z")], ["k2"]),
        ([Item("k17", "late")], ["n0"]),
        ([], ["k3"]),
        ([Item("n1", "again")], []),
    ]
    for version, (upserts, deletes) in enumerate(changes, start=2):
        vectors = torch.nn.functional.normalize(torch.randn(len(upserts), H, generator=g), dim=1)
        catalog = catalog.changed(upserts, vectors, deletes, version)
        fast = rows.on(catalog)
        full = aligned_to(weights, catalog.item_ids, catalog.vectors)
        assert fast.item_ids == full.item_ids and fast.structure == full.structure
        assert torch.allclose(fast.item_bias, full.item_bias, atol=1e-6), version
        assert torch.allclose(fast.item_delta, full.item_delta, atol=1e-6), version


def test_a_known_items_changed_text_realigns_in_full():
    from services.catalog import Catalog
    from services.data import Item
    from services.item_weights import CatalogRows

    known = [f"k{i}" for i in range(6)]
    weights = _weights(known, seed=4)
    catalog = Catalog([Item(i, i) for i in known], _text(6, 2))
    rows = CatalogRows(weights)
    rows.on(catalog)
    catalog = catalog.changed([Item("new", "n")], _text(1, 5), [], 2)
    rows.on(catalog)
    catalog = catalog.changed([Item("k1", "other text")], _text(1, 6), [], 3)
    fast = rows.on(catalog)  # k1's text moved: the neighbours of "new" may change
    full = aligned_to(weights, catalog.item_ids, catalog.vectors)
    assert torch.allclose(fast.item_bias, full.item_bias) and \
        torch.allclose(fast.item_delta, full.item_delta)


def test_versions_trained_on_the_same_items_share_the_neighbour_search():
    from services import item_weights
    from services.catalog import Catalog
    from services.data import Item
    from services.item_weights import CatalogRows

    item_weights._NEIGHBOURS.clear()
    known = [f"k{i}" for i in range(12)]
    catalog = Catalog([Item(i, i) for i in known] + [Item("new", "n")], _text(13, 7))
    first, second = _weights(known, seed=1), _weights(known, seed=2)
    assert torch.allclose(CatalogRows(first).on(catalog).item_bias,
                          aligned_to(first, catalog.item_ids, catalog.vectors).item_bias)
    [cache] = item_weights._NEIGHBOURS.values()
    vector, rows = cache["new"]
    cache["new"] = (vector, torch.zeros_like(rows))  # a marker: row 0 ten times
    reused = CatalogRows(second).on(catalog)
    assert float(reused.item_bias[12]) == pytest.approx(float(second.item_bias[0]))
    # The same id with another text is searched again.
    moved = catalog.changed([Item("new", "other")], _text(1, 8), [], 2)
    fresh = CatalogRows(second).on(moved)
    assert torch.allclose(fresh.item_bias, aligned_to(second, moved.item_ids,
                                                      moved.vectors).item_bias)
