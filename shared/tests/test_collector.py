"""collect_less: what a process built is frozen out of the collector's walks, collections
run less often, and cyclic garbage made later is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from slmops.collector import THRESHOLDS, collect_less


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.mark.usefixtures("restored_collector")
def test_long_lived_objects_are_frozen_and_later_cycles_still_collected() -> None:
    kept = [_Node() for _ in range(100)]
    before = gc.get_freeze_count()

    collect_less()
    later = _Node()
    gone = weakref.ref(later)
    del later
    gc.collect()

    assert gc.get_threshold() == THRESHOLDS
    assert gc.get_freeze_count() >= before + len(kept)
    assert gone() is None  # a cycle made after the freeze is garbage as before
