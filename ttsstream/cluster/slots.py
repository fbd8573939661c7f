"""The cluster's upstream cap: at most ``UPSTREAM_CONCURRENCY`` Edge syntheses at once,
over every instance.

Microsoft throttles per egress address, which a cluster usually shares. A
permit is a member of a sorted set scored by when it lapses; taking one is one
Lua script (drop the lapsed, count, add if there is room). The permits an
instance holds are renewed together every third of ``REDIS_LEASE_SECONDS``,
so the permits of an instance that died lapse with its lease. While Redis is
down, each instance is held to its own cap alone.

While the cluster is full, a synthesis waits in its instance's queue, in the
order they came (the order in which the instance's own slots, shared fairly
between its clients, were given: :mod:`ttsstream.core.slots`; the fairness
between clients is the instance's, the cap is the cluster's). A waiter that is
cancelled (its utterance, or its ``UPSTREAM_TIMEOUT``) takes no permit: one
that was being taken is given back. Giving a permit back is one script that also announces it on
the ``upstream-freed`` channel; each instance then lets its first waiter ask
again (and the giver does so at once), so a freed permit is taken within a
round trip or two, as a local semaphore would hand it on. A waiter also asks
again every :data:`RECHECK` seconds, for permits that lapse without a word
(their instance died) and announcements lost while Redis was away.

While the cluster is far from its cap, an instance keeps a few permits it gave
back as spares (still members of the set, renewed with its lease), so its next
synthesis starts without a round trip to Redis: each one is a wait for the
event loop, about 10 ms on a busy instance (bench/NOTES.md). Spares never raise
the cap (they are counted like any permit), lapse with the instance, and go
back as soon as any instance finds the cluster full (it announces it on
``upstream-wanted``), after :data:`SPARE_IDLE` seconds unused, or when the link
closes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from typing import Any

from ttsstream.cluster.link import RedisLink

__all__ = ["SharedSlots"]

# The room left after taking a permit, or -1 when the cluster is full.
_TAKE = """
local now, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= cap then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return -1
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[4]), ARGV[3])
return cap - held - 1
"""
_GIVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
#: Longest a waiter waits for an announced release before asking again, seconds.
RECHECK = 0.25
#: The channel on which released permits are announced.
FREED = "upstream-freed"
#: The channel on which an instance that found the cluster full asks for spares.
WANTED = "upstream-wanted"
#: Most spare permits an instance keeps (fewer with a small cap: a quarter of it).
SPARES = 16
#: A spare permit unused this long is given back, seconds.
SPARE_IDLE = 2.0


class SharedSlots:
    """Upstream permits over the cluster (a :class:`~ttsstream.core.router.SharedSlots`)."""

    def __init__(self, link: RedisLink, cap: int) -> None:
        self._link = link
        self._cap = cap
        self._numbers = itertools.count()
        #: The permits this instance holds (spares too), renewed together.
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[Any]] = set()
        #: This instance's syntheses waiting for the cluster to have room, in order.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Permits held for this instance's next syntheses, and when each goes back.
        self._spares: dict[str, asyncio.TimerHandle] = {}
        self._max_spares = min(SPARES, cap // 4)
        #: The room the cluster had after this instance's last take (-1: full).
        self._room = -1
        link.listen(FREED, self._on_freed)
        link.listen(WANTED, self._on_wanted)
        link.on_up(self._no_spares)  # Redis may have restarted without them
        link.on_close(self._close)

    async def take(self) -> str | None:
        """A permit once the cluster has room; ``None`` when Redis cannot tell (then the
        instance's own cap holds alone)."""
        link = self._link
        if self._spares and link.up:
            member, idle = self._spares.popitem()
            idle.cancel()
            return member  # still renewed with the lease
        member = f"{link.instance}:{next(self._numbers)}"
        # Behind those already waiting, if any: they came first.
        queued = bool(self._waiters)
        while True:
            if queued:
                await self._wait_turn()

            now = time.time()
            args = [now, self._cap, member, now + link.lease_seconds]
            try:
                answer = await link.script(
                    _TAKE, [link.key("upstream")], [*args, link.key(WANTED), link.instance]
                )
            except BaseException:
                # Cancelled (its utterance, or its deadline) while the script was sent:
                # it may still have run, and nobody would renew nor use the permit.
                self._give_back(member)
                raise
            if answer is None:
                # Past its deadline the script may still have run: the permit is given
                # back (not kept as a spare: it may not be in the set), or it would hold
                # a place until it lapsed, with nobody to use it.
                self._give_back(member)
                return None
            self._room = room = int(answer)
            if room >= 0:
                if room > 0:
                    self._wake_one()  # room for the next waiter too
                self._held.add(member)
                if self._renewer is None:
                    self._renewer = asyncio.create_task(self._renew())
                return member
            queued = True

    def release(self, permit: str) -> None:
        if (
            len(self._spares) < self._max_spares
            and self._room >= self._cap // 2
            and not self._waiters
            and self._link.up
        ):
            later = asyncio.get_running_loop().call_later(SPARE_IDLE, self._return_spare, permit)
            self._spares[permit] = later
            return
        self._give_back(permit)

    def _give_back(self, permit: str) -> None:
        self._held.discard(permit)
        write = asyncio.ensure_future(self._give(permit))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _give(self, permit: str) -> None:
        link = self._link

        await link.script(_GIVE, [link.key("upstream")], [permit, link.key(FREED), link.instance])
        self._wake_one()  # this instance's first waiter asks at once

    async def _wait_turn(self) -> None:
        """Wait until a permit is given back somewhere, or RECHECK passes."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK):
                    await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake_one()  # woken, but gone: the turn passes on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _return_spare(self, permit: str) -> None:
        """Give a spare back (unused for SPARE_IDLE, or wanted elsewhere)."""
        idle = self._spares.pop(permit, None)
        if idle is not None:
            idle.cancel()
            self._give_back(permit)

    def _on_wanted(self, data: bytes) -> None:
        """Some instance found the cluster full: the spares go back to it."""
        self._no_spares()

    def _no_spares(self) -> None:
        """Give the spares back, and keep none until a take finds room again (also when
        the link comes back: Redis may have restarted without them)."""
        self._room = -1
        for permit in list(self._spares):
            self._return_spare(permit)

    async def _close(self) -> None:
        """Give the spares back as the link closes (the link no longer makes calls)."""
        spares = list(self._spares)
        for permit in spares:
            self._spares.pop(permit).cancel()
            self._held.discard(permit)
        if self._renewer is not None:
            self._renewer.cancel()
        if spares:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await self._link.client.zrem(self._link.key("upstream"), *spares)

    def _on_freed(self, data: bytes) -> None:
        if data.decode() != self._link.instance:  # this instance's own were woken already
            self._wake_one()

    async def _renew(self) -> None:
        """Renew every permit this instance holds, in one call a third of a lease apart,
        while it holds any (a task per permit cost a task switch each)."""
        link = self._link
        try:
            while self._held:
                await asyncio.sleep(link.lease_seconds / 3)
                expiry = time.time() + link.lease_seconds
                scored = [part for member in self._held for part in (expiry, member)]
                if scored:
                    await link.run(("ZADD", link.key("upstream"), "XX", *scored))
        finally:
            self._renewer = None
