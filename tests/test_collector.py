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


async def _sweeps(freezer: Freezer) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not freezer.sweeps:
            await asyncio.sleep(0.01)


async def test_a_cycle_frozen_before_it_became_garbage_is_collected_by_the_sweep() -> None:
    freezer = Freezer(every=0.01, sweep_every=0.3, sweep_growth=0)
    freezer.start()
    try:
        first = _Node()
        first.other = _Node()
        first.other.other = first
        freed = weakref.ref(first)
        await _next_tick(freezer)  # frozen while alive
        del first
        gc.collect()
        assert freed() is not None  # frozen: the collector skips it
        await _sweeps(freezer)
        assert freed() is None
    finally:
        freezer.stop()


async def test_the_sweep_waits_for_the_frozen_objects_to_grow() -> None:
    """Nothing grows: no sweep, however many ticks; a quarter more objects alive: a
    sweep at the next tick past the period."""
    freezer = Freezer(every=0.01, sweep_every=0.01, sweep_growth=0.25)
    freezer.start()
    try:
        for _ in range(5):
            await _next_tick(freezer)
        assert freezer.sweeps == 0
        grown = [_Node() for _ in range(gc.get_freeze_count() // 3 + 1)]
        await _sweeps(freezer)
        assert all(not _tracked(node) for node in grown[:10])  # frozen again after it
    finally:
        freezer.stop()


def test_periods_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Freezer(every=0)
    with pytest.raises(ValueError):
        Freezer(sweep_every=-1)
    with pytest.raises(ValueError):
        Freezer(sweep_growth=-0.1)


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How often the frozen objects are counted (``gc.get_freeze_count()``): one item
    per count."""
    made: list[int] = []
    count = gc.get_freeze_count

    def counting() -> int:
        made.append(count())
        return made[-1]

    monkeypatch.setattr(gc, "get_freeze_count", counting)
    return made


async def test_a_tick_counts_the_frozen_objects_only_when_a_sweep_is_due(
    counts: list[int],
) -> None:
    """Counting the frozen objects walks them all (at 1,000 clients, milliseconds a
    second): a tick that is not due to sweep only freezes."""
    freezer = Freezer(every=0.01, sweep_every=3600)
    freezer.start()
    try:
        at_start = len(counts)
        for _ in range(3):
            await _next_tick(freezer)
        assert len(counts) == at_start
    finally:
        freezer.stop()


async def test_a_sweep_due_without_growth_counts_once_a_period(counts: list[int]) -> None:
    """When a sweep is due but the frozen objects did not grow enough, they are counted
    again only a period later, not at every tick."""
    freezer = Freezer(every=0.01, sweep_every=3600, sweep_growth=1000)
    freezer.start()
    try:
        freezer._sweep_at = 0.0  # due now
        at_start = len(counts)
        for _ in range(3):
            await _next_tick(freezer)
        assert len(counts) == at_start + 1
        assert freezer.sweeps == 0
    finally:
        freezer.stop()
