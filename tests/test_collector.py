"""The periodic freeze of what is alive (ttsstream/collector.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from tests.conftest import TIMEOUT
from ttsstream.collector import Freezer


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    return weakref.ref(first)


@pytest.fixture(autouse=True)
def _unfrozen_after() -> object:
    yield
    gc.unfreeze()


def _tracked(node: _Node) -> bool:
    """Whether the collector walks ``node`` (a frozen object is in no generation)."""
    return any(tracked is node for tracked in gc.get_objects())


async def _next_tick(freezer: Freezer) -> None:
    ticks = freezer.ticks
    async with asyncio.timeout(TIMEOUT):
        while freezer.ticks == ticks:
            await asyncio.sleep(0.01)


async def test_what_is_alive_is_frozen_at_every_tick() -> None:
    freezer = Freezer(every=0.01, sweep_every=3600)
    freezer.start()
    try:
        made_later = _Node()
        assert _tracked(made_later)  # made since the last freeze: walked
        await _next_tick(freezer)
        assert not _tracked(made_later)
    finally:
        freezer.stop()


async def test_a_frozen_object_is_still_freed_by_reference_counting() -> None:
    freezer = Freezer(every=0.01, sweep_every=3600)
    freezer.start()
    try:
        node = _Node()
        freed = weakref.ref(node)
        await _next_tick(freezer)
        assert not _tracked(node)  # frozen
        del node
        assert freed() is None
    finally:
        freezer.stop()


async def test_a_cycle_frozen_before_it_became_garbage_is_collected_by_the_sweep() -> None:
    freezer = Freezer(every=0.01, sweep_every=0.3)
    freezer.start()
    try:
        freed = _cycle()
        gc.freeze()  # as a tick would, while it was alive
        gc.collect()
        assert freed() is not None  # frozen: the collector skips it
        async with asyncio.timeout(TIMEOUT):
            while not freezer.sweeps:
                await asyncio.sleep(0.01)
        assert freed() is None
    finally:
        freezer.stop()


def test_periods_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Freezer(every=0)
    with pytest.raises(ValueError):
        Freezer(sweep_every=-1)
