"""The cluster's rate limit: one moving window per client IP in Redis, for every instance.

One Lua script per decision (one round trip): it drops the hits older than the
window, counts the rest, and either refuses with the time until the oldest
leaves the window or records the hit. Time is Redis's own (``TIME``), so the
instances' clocks need not agree. Written as a script rather than with the
``limits`` library's Redis storage, whose moving window takes two round trips
per hit (a read, then a separate Lua call to add) and reads each instance's
clock. The client IP is stored hashed; nothing else about the client is.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Any

from ttsstream.cluster.link import RedisLink
from ttsstream.core.ratelimit import LimiterUnavailable

__all__ = ["HIT_FUNCTION", "SharedWindow", "retry_after"]

#: One hit in a window (µs): the wait until there is room, or -1 once the hit is
#: counted. A Lua function, so that admission can run it in its own script too.
HIT_FUNCTION = """
local function hit(key, limit, window, member)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return tonumber(oldest[2]) + window - now
  end
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, math.ceil(window / 1000))
  return -1
end
"""
_SCRIPT = HIT_FUNCTION + "return hit(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])\n"


class SharedWindow:
    """At most ``limit`` hits per client IP in any ``window`` seconds, across the cluster
    (a :class:`~ttsstream.core.ratelimit.SharedLimiter`)."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self._numbers = itertools.count()

    async def hit(self, key: str, limit: int, window: float) -> int | None:
        window_key, args = self.hit_parts(key, limit, window)

        waited = await self._link.script(_SCRIPT, [window_key], args)
        if waited is None:
            raise LimiterUnavailable("redis is not answering")
        return retry_after(int(waited))

    def hit_parts(self, key: str, limit: int, window: float) -> tuple[str, list[Any]]:
        """The Redis key and the arguments of :data:`HIT_FUNCTION` for one hit of ``key``."""
        link = self._link
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        member = f"{link.instance}:{next(self._numbers)}"
        return link.key("rate", digest), [limit, round(window * 1_000_000), member]


def retry_after(waited: int) -> int | None:
    """Whole seconds to wait, from what :data:`HIT_FUNCTION` returned (``None``: counted)."""
    if waited < 0:
        return None
    return max(1, math.ceil(waited / 1_000_000))
