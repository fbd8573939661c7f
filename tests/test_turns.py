"""First frames first (:mod:`ttsstream.core.turns`): when a replay's second turn comes."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import TIMEOUT
from ttsstream.core import turns as turns_module
from ttsstream.core.turns import Turns


async def _passes(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_replay_started_later_writes_its_first_frame_before_the_others_rest() -> None:
    """A replay that starts two passes after another wrote its first frame, and one
    whose first frame is written later still, both come before the first one's
    second turn."""
    turns = Turns(quiet_s=0)
    order: list[str] = []

    async def replay(name: str, after: int, first_takes: int) -> None:
        await _passes(after)
        token = turns.started()
        await _passes(first_takes)  # a slow first frame: counted as pending meanwhile
        order.append(f"{name} first")
        turns.first_sent(token)
        await turns.second_turn()
        order.append(f"{name} rest")

    await asyncio.wait_for(
        asyncio.gather(replay("a", 0, 0), replay("b", 2, 0), replay("c", 1, 6)), TIMEOUT
    )
    assert order[:3] == ["a first", "b first", "c first"]
    assert sorted(order[3:]) == ["a rest", "b rest", "c rest"]
    assert turns.pending == 0


async def test_a_lone_replay_goes_on_after_a_few_quiet_passes() -> None:
    """With nothing else started, the second turn comes after the quiet passes alone."""
    turns = Turns(quiet_passes=3, quiet_s=0, longest=TIMEOUT * 10)
    turns.first_sent(turns.started())
    waiting = asyncio.create_task(turns.second_turn())
    await _passes(1)
    assert not waiting.done()
    await asyncio.wait_for(waiting, TIMEOUT)


async def test_replays_that_keep_coming_hold_the_early_ones_back_at_most_longest() -> None:
    """A replay whose first frame never comes (a client that does not read) holds the
    others back no longer than ``longest``; nor does a stream of new replays."""
    turns = Turns(quiet_s=0, longest=0.05)
    stuck = turns.started()  # first_sent only at the end: pending meanwhile
    turns.first_sent(turns.started())
    await asyncio.wait_for(turns.second_turn(), TIMEOUT)
    turns.first_sent(stuck)
    assert turns.pending == 0

    stop = asyncio.Event()

    async def keep_starting() -> None:
        while not stop.is_set():
            turns.first_sent(turns.started())
            await asyncio.sleep(0)

    starter = asyncio.create_task(keep_starting())
    try:
        turns.first_sent(turns.started())
        await asyncio.wait_for(turns.second_turn(), TIMEOUT)
    finally:
        stop.set()
        await starter


async def test_a_cancelled_waiter_leaves_the_others_waiting_for_their_turn() -> None:
    """Cancelling one replay waiting for its second turn cancels it alone."""
    turns = Turns(quiet_s=0, longest=TIMEOUT * 10)
    coming = turns.started()  # a replay whose first frame is still to come
    waiters = []
    for _ in range(2):
        turns.first_sent(turns.started())
        waiters.append(asyncio.create_task(turns.second_turn()))
    await _passes(2)
    waiters[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    assert not waiters[1].done()
    turns.first_sent(coming)  # the first frame comes: the turn follows after quiet passes
    await asyncio.wait_for(waiters[1], TIMEOUT)


async def test_the_quiet_time_is_waited_for_on_an_idle_loop() -> None:
    """On a loop with nothing else to do, replays that come together wait for
    ``quiet_s`` after the last one started, so a speak still on its way is not missed."""
    turns = Turns(quiet_passes=1, quiet_s=TIMEOUT, longest=TIMEOUT * 10)
    for _ in range(2):  # two at once
        turns.first_sent(turns.started())
    waiting = asyncio.create_task(turns.second_turn())
    await _passes(5)
    assert not waiting.done()
    turns.first_sent(turns.started())  # one more arrives, before the turn
    await _passes(5)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_lone_replay_does_not_wait_for_the_quiet_time() -> None:
    """A replay with no other started just before or while it waits goes on after the
    quiet passes (its client's last byte is not delayed by ``quiet_s``)."""
    turns = Turns(quiet_passes=2, quiet_s=TIMEOUT * 10, longest=TIMEOUT * 10)
    turns.first_sent(turns.started())
    await asyncio.wait_for(turns.second_turn(), TIMEOUT)


async def test_a_first_frame_stuck_longer_than_longest_holds_no_one_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replay whose first frame waits (its client left audio unread) for longer than
    ``longest`` no longer holds the others' second turns: they go on after the quiet
    passes, not at the bound."""
    now = [1000.0]

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

    monkeypatch.setattr(turns_module, "time", Clock)
    turns = Turns(quiet_passes=2, quiet_s=0, longest=1.0)
    turns.started()  # stuck: never first_sent
    now[0] += 2.0
    turns.first_sent(turns.started())
    waiting = asyncio.create_task(turns.second_turn())
    await _passes(6)
    assert waiting.done()
    assert turns.pending == 1
