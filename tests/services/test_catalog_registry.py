"""CatalogRegistry's versions and long-poll, merged changes, and Catalog.changed details.

No Ray: the registry is a plain class with async methods, driven with asyncio.run.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from services.catalog import Catalog
from services.catalog_registry import (
    CHANGES_KEPT,
    CatalogChange,
    CatalogRegistry,
    apply_change,
    merged,
)
from services.data import Item
from serving.ranking import _top

H = 4


def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, H)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _base() -> Catalog:
    items = [Item("a", "A", categories=("x",)), Item("b", "B", categories=("x", "y")),
             Item("c", "C", categories=("y",))]
    return Catalog(items, torch.from_numpy(_vectors(3, 0)))


def _same(left: Catalog, right: Catalog) -> None:
    """Row for row the same catalog."""
    assert left.version == right.version
    assert left.item_ids == right.item_ids
    assert left.items == right.items
    assert left.index == right.index
    assert sorted(left.unavailable) == sorted(right.unavailable)
    assert left.deleted == right.deleted
    assert torch.equal(left.vectors, right.vectors)


def _live(catalog: Catalog) -> dict:
    """What a catalog serves, by item id: the live items, their vectors, availability."""
    unavailable = set(catalog.unavailable)
    return {item_id: (catalog.items[row], tuple(catalog.vectors[row].tolist()),
                      row in unavailable)
            for item_id, row in catalog.index.items()}


def _change(version: int, upserts: list[Item], deletes: list[str], seed: int,
            ms: int = 0) -> CatalogChange:
    return CatalogChange(version, upserts, _vectors(len(upserts), seed), deletes,
                         [ms] * len(upserts), float(version))


# --- the registry -------------------------------------------------------------------

def test_the_start_catalog_is_version_1_and_an_empty_apply_makes_no_version():
    async def go():
        base = _base()
        registry = CatalogRegistry(base)
        assert await registry.version() == 1
        assert base.version == 0  # the catalog handed in is not changed
        assert await registry.apply([], np.zeros((0, H), np.float32), []) == 1
        assert await registry.version() == 1
        # ... and wakes nobody: a watcher at version 1 still times out.
        assert await registry.wait_for_change(1, 0.05) is None
        assert await registry.apply([Item("d", "D")], _vectors(1, 1), []) == 2
        assert await registry.apply([], np.zeros((0, H), np.float32), ["a"]) == 3
        snap = await registry.snapshot()
        assert snap.version == 3 and set(snap.index) == {"b", "c", "d"}

    asyncio.run(go())


def test_the_long_poll_returns_none_after_its_timeout():
    async def go():
        registry = CatalogRegistry(_base())
        start = time.monotonic()
        assert await registry.wait_for_change(1, 0.1) is None
        assert time.monotonic() - start >= 0.09

    asyncio.run(go())


def test_a_blocked_watcher_wakes_as_soon_as_a_version_is_applied():
    async def go():
        registry = CatalogRegistry(_base())
        watchers = [asyncio.create_task(registry.wait_for_change(1, 30.0)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in watchers)  # they wait: nothing changed yet
        start = time.monotonic()
        await registry.apply([Item("d", "D")], _vectors(1, 1), [], [1234])
        got = await asyncio.wait_for(asyncio.gather(*watchers), 2.0)
        assert time.monotonic() - start < 1.0
        for change in got:
            assert isinstance(change, CatalogChange)
            assert change.version == 2 and [i.item_id for i in change.upserts] == ["d"]
            assert change.record_ms == [1234] and change.deletes == []
        # A later watcher at version 2 waits for the next change, not the one it has.
        late = asyncio.create_task(registry.wait_for_change(2, 30.0))
        await asyncio.sleep(0.05)
        assert not late.done()
        await registry.apply([], np.zeros((0, H), np.float32), ["a"])
        change = await asyncio.wait_for(late, 2.0)
        assert change.version == 3 and change.deletes == ["a"] and change.upserts == []

    asyncio.run(go())


def test_a_watcher_one_version_behind_gets_that_change_only():
    async def go():
        registry = CatalogRegistry(_base())
        await registry.apply([Item("d", "D")], _vectors(1, 1), [])
        held = await registry.snapshot()  # what the watcher holds: version 2
        await registry.apply([Item("a", "A2"), Item("e", "E")], _vectors(2, 2), ["b"])
        got = await asyncio.wait_for(registry.wait_for_change(2, 30.0), 2.0)
        assert isinstance(got, CatalogChange) and got.version == 3
        assert [i.item_id for i in got.upserts] == ["a", "e"] and got.deletes == ["b"]
        assert got.record_ms == [0, 0]  # no Kafka timestamps given
        _same(apply_change(held, got), await registry.snapshot())

    asyncio.run(go())


def test_several_versions_behind_gets_one_change_equal_to_applying_each_in_turn():
    async def go():
        registry = CatalogRegistry(_base())
        start = await registry.snapshot()
        await registry.apply([Item("d", "D", categories=("x",)), Item("a", "A2")],
                             _vectors(2, 1), [])
        await registry.apply([Item("e", "E")], _vectors(1, 2), ["b"])
        await registry.apply([Item("d", "D2", available=False), Item("c", "C2")],
                             _vectors(2, 3), ["zzz"])  # an unknown delete: ignored
        got = await asyncio.wait_for(registry.wait_for_change(1, 30.0), 2.0)
        assert isinstance(got, CatalogChange) and got.version == 4
        current = await registry.snapshot()
        following = apply_change(start, got)
        _same(following, current)
        assert following.items[following.index["d"]].title == "D2"
        assert following.index["d"] in following.unavailable
        # Two behind: the last two versions merged, onto what that watcher holds.
        two = await registry.wait_for_change(2, 30.0)
        assert two.version == 4 and set(two.deletes) == {"b", "zzz"}
        assert {i.item_id for i in two.upserts} == {"e", "d", "c"}

    asyncio.run(go())


def test_a_delete_and_a_comeback_merged_serve_the_same_items_as_in_turn():
    # Merged, "delete b, then upsert b" is one upsert of b (b keeps its row), and "add f,
    # then delete f" one delete of an unknown id; applied in turn, b gets a new row beside
    # its tombstone and f leaves one. Rows may differ, what is served by id may not.
    async def go():
        registry = CatalogRegistry(_base())
        start = await registry.snapshot()
        await registry.apply([Item("f", "F")], _vectors(1, 1), ["b"])
        await registry.apply([Item("b", "B2", categories=("z",))], _vectors(1, 2), ["f"])
        got = await registry.wait_for_change(1, 30.0)
        assert [i.item_id for i in got.upserts] == ["b"] and got.deletes == ["f"]
        current = await registry.snapshot()
        following = apply_change(start, got)
        assert following.version == current.version == 3
        assert _live(following) == _live(current)
        assert set(following.index) == {"a", "b", "c"}
        assert following.items[following.index["b"]].title == "B2"
        # A category filter finds b's live row in both, never a tombstone.
        for catalog in (following, current):
            allowed = catalog.in_categories(("z",))
            rows, _ = _top(torch.ones(len(catalog)), 5, catalog.unavailable, allowed)
            assert rows.tolist() == [catalog.index["b"]]

    asyncio.run(go())


def test_a_watcher_too_far_behind_gets_the_whole_catalog():
    async def go():
        registry = CatalogRegistry(_base())
        for i in range(CHANGES_KEPT + 1):
            await registry.apply([Item("a", f"A{i}")], _vectors(1, i), [])
        current = await registry.snapshot()
        assert current.version == CHANGES_KEPT + 2
        # Version 2's change is no longer kept: a watcher at version 1 gets the catalog.
        whole = await registry.wait_for_change(1, 30.0)
        assert isinstance(whole, Catalog) and whole.version == current.version
        _same(whole, current)
        # A watcher exactly CHANGES_KEPT versions behind still gets changes only.
        edge = await registry.wait_for_change(current.version - CHANGES_KEPT, 30.0)
        assert isinstance(edge, CatalogChange) and edge.version == current.version
        assert [i.title for i in edge.upserts] == [f"A{CHANGES_KEPT}"]

    asyncio.run(go())


@pytest.mark.parametrize("known", [0, -1, 7])
def test_a_watcher_with_no_version_or_one_from_a_restarted_registry_gets_the_catalog(known):
    async def go():
        registry = CatalogRegistry(_base())
        await registry.apply([Item("d", "D")], _vectors(1, 1), [])
        await registry.apply([Item("e", "E")], _vectors(1, 2), [])
        # Known 7 > current 3: another registry's version (a restart). No waiting.
        got = await asyncio.wait_for(registry.wait_for_change(known, 30.0), 2.0)
        assert isinstance(got, Catalog)
        _same(got, await registry.snapshot())

    asyncio.run(go())


def test_a_watcher_from_a_restarted_registry_with_no_changes_yet_gets_the_catalog():
    async def go():
        registry = CatalogRegistry(_base())
        got = await asyncio.wait_for(registry.wait_for_change(5, 30.0), 2.0)
        assert isinstance(got, Catalog) and got.version == 1

    asyncio.run(go())


# --- merged -------------------------------------------------------------------------

def test_merged_lets_later_records_win():
    first = _change(2, [Item("a", "A1"), Item("b", "B1")], [], seed=1, ms=10)
    second = _change(3, [Item("a", "A2")], ["b"], seed=2, ms=20)
    third = _change(4, [Item("b", "B3")], ["c"], seed=3, ms=30)
    # upsert then delete: deleted.
    out = merged([first, second])
    assert out.version == 3 and out.published == second.published
    assert [i.title for i in out.upserts] == ["A2"] and out.deletes == ["b"]
    assert np.array_equal(out.vectors, second.vectors) and out.record_ms == [20]
    # delete then upsert: present, with the last record's item, vector and timestamp.
    out = merged([first, second, third])
    assert out.version == 4
    titles = {i.item_id: i.title for i in out.upserts}
    assert titles == {"a": "A2", "b": "B3"} and out.deletes == ["c"]
    rows = {i.item_id: k for k, i in enumerate(out.upserts)}
    assert np.array_equal(out.vectors[rows["a"]], second.vectors[0])
    assert np.array_equal(out.vectors[rows["b"]], third.vectors[0])
    assert out.record_ms[rows["a"]] == 20 and out.record_ms[rows["b"]] == 30
    assert out.vectors.shape == (2, H)


def test_merged_of_deletes_only_has_no_vectors_and_one_change_is_itself():
    only = _change(2, [], ["a"], seed=1)
    assert merged([only]) is only
    out = merged([_change(2, [Item("d", "D")], [], seed=1), _change(3, [], ["d", "a"], 2)])
    assert out.upserts == [] and out.record_ms == [] and set(out.deletes) == {"d", "a"}
    assert out.vectors.shape == (0, H) and out.vectors.dtype == np.float32
    after = apply_change(_base(), out)
    assert set(after.index) == {"b", "c"}


# --- Catalog.changed ----------------------------------------------------------------

def test_a_changed_items_categories_move_with_it():
    base = _base()
    after = base.changed([Item("a", "A", categories=("y",))], torch.from_numpy(_vectors(1, 5)),
                         [], 2)
    assert after.by_category == {"x": [1], "y": [0, 1, 2]}
    assert after.in_categories(("x",)).tolist() == [False, True, False]
    assert after.in_categories(("y",)).tolist() == [True, True, True]
    assert after.in_categories(("nope",)).tolist() == [False, False, False]
    assert base.by_category == {"x": [0, 1], "y": [1, 2]}  # the old version keeps its own


def test_a_tombstone_still_matches_its_category_and_is_masked_at_ranking():
    base = _base()
    after = base.changed([], torch.zeros(0, H), ["b"], 2)
    # The category index keeps the tombstone's row; `unavailable` is what masks it.
    assert after.in_categories(("x",)).tolist() == [True, True, False]
    assert after.unavailable == [1]
    scores = torch.tensor([1.0, 9.0, 2.0])  # the tombstone would score best
    rows, _ = _top(scores.clone(), 3, after.unavailable, after.in_categories(("x",)))
    assert rows.tolist() == [0]
    rows, _ = _top(scores.clone(), 3, after.unavailable, None)
    assert rows.tolist() == [2, 0]


def test_a_change_that_only_replaces_leaves_the_old_version_untouched():
    base = _base()
    before = base.vectors.clone()
    new = torch.from_numpy(_vectors(1, 6))
    after = base.changed([Item("b", "B2")], new, [], 2)
    assert torch.equal(after.vectors[1], new[0])
    assert torch.equal(base.vectors, before)  # replaced in a copy, not in place
    assert after.item_ids == ["a", "b", "c"] and base.items[1].title == "B"


def test_hiding_and_showing_an_item_keeps_its_row():
    base = _base()
    hidden = base.changed([Item("c", "C", available=False)], torch.from_numpy(_vectors(1, 7)),
                          [], 2)
    assert hidden.index["c"] == 2 and hidden.unavailable == [2]
    shown = hidden.changed([Item("c", "C")], torch.from_numpy(_vectors(1, 8)), [], 3)
    assert shown.index["c"] == 2 and shown.unavailable == []


def test_an_upsert_and_a_delete_of_one_id_in_one_change_delete_it():
    base = _base()
    after = base.changed([Item("d", "D"), Item("a", "A2")], torch.from_numpy(_vectors(2, 9)),
                         ["d", "a", "a"], 2)
    assert set(after.index) == {"b", "c"}
    assert after.item_ids == ["a", "b", "c", "d"]  # d got a row, then became a tombstone
    assert sorted(after.unavailable) == [0, 3]
    # The registry's merge reads one change the same way.
    change = CatalogChange(2, [Item("d", "D"), Item("a", "A2")], _vectors(2, 9), ["d", "a"],
                           [0, 0], 0.0)
    assert _live(apply_change(base, merged([change, _change(3, [], [], 1)]))) == _live(after)
