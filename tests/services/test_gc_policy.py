"""The collector policy of the ingest processes: objects alive at start-up leave the
collector's sight, generation 0 is collected far less often, and cycles still go."""

from __future__ import annotations

import gc
import weakref

import pytest

from services.gc_policy import GEN0_THRESHOLD, freeze_and_relax


@pytest.fixture
def restore_collector():
    threshold = gc.get_threshold()
    yield
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_freeze_and_relax_freezes_the_living_and_raises_only_generation_0(restore_collector):
    gc.set_threshold(700, 11, 12)
    freeze_and_relax()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GEN0_THRESHOLD, 11, 12)


def test_a_higher_threshold_is_kept(restore_collector):
    gc.set_threshold(GEN0_THRESHOLD * 3, 10, 10)
    freeze_and_relax()
    assert gc.get_threshold()[0] == GEN0_THRESHOLD * 3


def test_cycles_made_afterwards_are_still_collected(restore_collector):
    freeze_and_relax()

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
