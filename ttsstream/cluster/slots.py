"""The cluster's upstream cap: at most ``UPSTREAM_CONCURRENCY`` Edge syntheses at once,
over every instance.

Microsoft throttles per egress address, which a cluster usually shares. A
permit is a member of a sorted set scored by when it lapses; taking one is one
Lua script (drop the lapsed, count, add if there is room). A held permit is
renewed every third of ``REDIS_LEASE_SECONDS``, so the permits of an instance
that died lapse with its lease. While the cluster is full, a synthesis waits,
asking again every 20 to 100 ms; while Redis is down, each instance is held to
its own cap alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

from ttsstream.cluster.link import RedisLink

__all__ = ["SharedSlots"]

_TAKE = """
local now, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= cap then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[4]), ARGV[3])
return 1
"""
#: Waits between asks while the cluster is full, seconds: growing from the first to the last.
POLL_FIRST, POLL_MAX = 0.02, 0.1


class SharedSlots:
    """Upstream permits over the cluster (a :class:`~ttsstream.core.router.SharedSlots`)."""

    def __init__(self, link: RedisLink, cap: int) -> None:
        self._link = link
        self._cap = cap
        self._script: Any = None
        self._numbers = itertools.count()
        self._renewals: dict[str, asyncio.Task[None]] = {}
        self._writes: set[asyncio.Task[Any]] = set()

    async def take(self) -> str | None:
        """A permit once the cluster has room; ``None`` when Redis cannot tell (then the
        instance's own cap holds alone)."""
        link = self._link
        member = f"{link.instance}:{next(self._numbers)}"
        wait = POLL_FIRST
        while True:

            async def ask(client: Any) -> int:
                if self._script is None:
                    self._script = client.register_script(_TAKE)
                now = time.time()
                args = [now, self._cap, member, now + link.lease_seconds]
                return int(await self._script(keys=[link.key("upstream")], args=args))

            granted = await link.call(ask)
            if granted is None:
                return None
            if granted:
                self._renewals[member] = asyncio.create_task(self._renew(member))
                return member
            await asyncio.sleep(wait)
            wait = min(wait * 2, POLL_MAX)

    def release(self, permit: str) -> None:
        renewal = self._renewals.pop(permit, None)
        if renewal is not None:
            renewal.cancel()
        link = self._link
        write = asyncio.ensure_future(
            link.call(lambda client: client.zrem(link.key("upstream"), permit))
        )
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _renew(self, member: str) -> None:
        link = self._link
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(link.lease_seconds / 3)
                expiry = time.time() + link.lease_seconds

                def renew(client: Any, expiry: float = expiry) -> Any:
                    return client.zadd(link.key("upstream"), {member: expiry}, xx=True)

                await link.call(renew)
