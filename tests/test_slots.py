"""The upstream's slots: shared fairly between clients on an instance, and no slot or
cluster permit kept by a waiter that was cancelled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import TIMEOUT, eventually
from tests.redis_server import RedisServer
from ttsstream.config import Config, load_config
from ttsstream.core.slots import FairSlots
from ttsstream.exceptions import ConfigError


async def settled() -> None:
    """Let every task that can run do so (callbacks and wake-ups included)."""
    for _ in range(5):
        await asyncio.sleep(0)


def taker(slots: FairSlots, client: str, got: list[str], name: str) -> asyncio.Task[None]:
    """A task that takes a slot for ``client`` and notes ``name`` once it has it."""

    async def take() -> None:
        await slots.take(client)
        got.append(name)

    return asyncio.create_task(take())


def test_bad_sizes_are_refused_and_a_cap_above_capacity_is_capacity() -> None:
    """A capacity or cap below 1 is a ValueError; a cap above the capacity, or none, is it."""
    with pytest.raises(ValueError):
        FairSlots(0)
    with pytest.raises(ValueError):
        FairSlots(4, per_client=0)
    assert FairSlots(4, per_client=9).per_client == 4
    assert FairSlots(4).per_client == 4


def test_the_share_per_ip_is_a_quarter_at_least_two_unless_set() -> None:
    """UPSTREAM_CONCURRENCY_PER_IP=0 is a quarter of UPSTREAM_CONCURRENCY but at least 2
    and at most all of it; a value set is taken as it is, up to all; below 0 is refused."""
    shares = {
        concurrency: Config(upstream_concurrency=concurrency).upstream_slots_per_ip
        for concurrency in (1, 2, 4, 8, 9, 16, 100)
    }
    assert shares == {1: 1, 2: 2, 4: 2, 8: 2, 9: 2, 16: 4, 100: 25}
    assert Config(upstream_concurrency_per_ip=1).upstream_slots_per_ip == 1
    assert Config(upstream_concurrency_per_ip=1000).upstream_slots_per_ip == 16
    with pytest.raises(ConfigError) as raised:
        load_config({"UPSTREAM_CONCURRENCY_PER_IP": "-1"}, env_file=None)
    assert raised.value.variable == "UPSTREAM_CONCURRENCY_PER_IP"


async def test_a_client_at_its_cap_waits_while_others_take_free_slots() -> None:
    """A client holds at most its cap even with slots free; another client takes one at once."""
    slots = FairSlots(4, per_client=2)
    await slots.take("a")
    await slots.take("a")
    got: list[str] = []
    third = taker(slots, "a", got, "a3")
    await settled()
    assert got == [] and slots.free == 2 and slots.waiting == 1
    await asyncio.wait_for(slots.take("b"), TIMEOUT)  # at once, although "a" waits
    assert (slots.held_by("a"), slots.held_by("b"), slots.free) == (2, 1, 1)
    slots.give_back("a")
    await asyncio.wait_for(third, TIMEOUT)
    assert got == ["a3"] and slots.held_by("a") == 2


async def test_a_freed_slot_goes_to_the_client_served_least_recently() -> None:
    """With one slot, a backlog of three from one client and one waiter each from two
    others: the others are served before the backlog's second, in turn."""
    slots = FairSlots(1)
    await slots.take("a")
    got: list[str] = []
    tasks = [taker(slots, "a", got, f"a{n}") for n in (2, 3, 4)]
    await settled()
    tasks += [taker(slots, "b", got, "b1"), taker(slots, "c", got, "c1")]
    await settled()
    holder = "a"
    for expected in ("b1", "c1", "a2", "a3", "a4"):
        slots.give_back(holder)
        await settled()
        assert got[-1] == expected, got
        holder = expected[0]
    slots.give_back(holder)
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert slots.free == 1 and slots.waiting == 0


async def test_a_freed_slot_goes_to_the_waiting_client_holding_the_fewest() -> None:
    """A client holding one slot is served before a client holding two that waited longer."""
    slots = FairSlots(3)
    await slots.take("a")
    await slots.take("a")
    await slots.take("b")
    got: list[str] = []
    tasks = [taker(slots, "a", got, "a3")]
    await settled()
    tasks.append(taker(slots, "b", got, "b2"))
    await settled()
    slots.give_back("b")  # b then holds none, a two: b's waiter first, though a's came first
    await settled()
    assert got == ["b2"]
    slots.give_back("b")
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert got == ["b2", "a3"]


async def test_a_cancelled_waiter_takes_nothing_and_leaves_no_state() -> None:
    """A waiter cancelled (or timed out) before its turn holds nothing, and the client's
    state is dropped once it holds and waits for nothing."""
    slots = FairSlots(1)
    await slots.take("a")
    waiting = asyncio.create_task(slots.take("b"))
    await settled()
    assert slots.waiting == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await slots.take("c")
    assert slots.waiting == 0 and slots.held_by("b") == 0 and slots.held_by("c") == 0
    with pytest.raises(ValueError):
        slots.give_back("b")  # it has nothing to give back
    slots.give_back("a")
    assert slots.free == 1
    assert slots._clients == {}


async def test_a_waiter_cancelled_as_it_is_given_a_slot_passes_it_on() -> None:
    """A slot given to a waiter whose task is cancelled before it resumes goes to the
    next waiter."""
    slots = FairSlots(1)
    await slots.take("a")
    got: list[str] = []
    given = taker(slots, "b", got, "b")
    next_one = taker(slots, "c", got, "c")
    await settled()
    slots.give_back("a")  # to b, whose task has not run yet
    given.cancel()
    with pytest.raises(asyncio.CancelledError):
        await given
    await asyncio.wait_for(next_one, TIMEOUT)
    assert got == ["c"] and slots.held_by("b") == 0 and slots.held_by("c") == 1


async def test_a_waiter_whose_cancel_is_pending_is_passed_over() -> None:
    """A waiter cancelled, its task not yet resumed, when a slot frees is skipped: the
    slot goes to the next one."""
    slots = FairSlots(1)
    await slots.take("a")
    got: list[str] = []
    cancelled = taker(slots, "b", got, "b")
    after = taker(slots, "c", got, "c")
    await settled()
    cancelled.cancel()  # its waiter is cancelled now; its task resumes later
    slots.give_back("a")
    await asyncio.wait_for(after, TIMEOUT)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert got == ["c"] and slots.held_by("b") == 0 and slots.held_by("c") == 1
    slots.give_back("c")
    assert slots.free == 1 and slots._clients == {}


async def test_hold_gives_the_slot_back_whatever_happens() -> None:
    """The slot a ``hold`` took goes back when its block raises."""
    slots = FairSlots(1)
    with pytest.raises(RuntimeError):
        async with slots.hold("a"):
            assert slots.free == 0
            raise RuntimeError("boom")
    assert slots.free == 1 and slots._clients == {}


async def test_a_cluster_permit_taken_as_its_waiter_is_cancelled_goes_back(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A take cancelled after its script ran in Redis, before its answer was read (an
    utterance cancelled, or its UPSTREAM_TIMEOUT), leaves no permit in the cluster."""
    from ttsstream.cluster.link import RedisLink
    from ttsstream.cluster.slots import SharedSlots

    link = RedisLink(redis.url, prefix="cancelled:", lease_seconds=TIMEOUT * 4)
    slots = SharedSlots(link, 4)
    await link.start()
    client = aioredis.from_url(redis.url)
    ran = asyncio.Event()
    script = link.script

    async def answered_late(*args: Any, **kwargs: Any) -> Any:
        await script(*args, **kwargs)
        ran.set()
        await asyncio.Event().wait()  # the answer never comes in time

    try:
        monkeypatch.setattr(link, "script", answered_late)
        taking = asyncio.create_task(slots.take())
        await asyncio.wait_for(ran.wait(), TIMEOUT)
        assert await client.zcard("cancelled:upstream") == 1
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        monkeypatch.setattr(link, "script", script)

        async def given_back() -> bool:
            return not await client.zcard("cancelled:upstream")

        await eventually(given_back)  # well within the lease it would have had
    finally:
        await client.aclose()
        await link.aclose()
