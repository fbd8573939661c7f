"""The cluster's connection caps: open connections counted over every live instance.

Each instance keeps its own counts (:class:`~ttsstream.core.ratelimit.ConnectionCounter`,
the truth for its connections) and mirrors them in a Redis hash of its own
(client IP, hashed, and ``*`` for its total), which expires with the instance's
lease: counts of an instance that died leave with it. Admitting a connection is
one Lua script, which counts the request in its IP's rate window
(:data:`~ttsstream.cluster.ratelimit.HIT_FUNCTION`), and if it is within it sums
the live instances' hashes and, if the caps allow, counts the new connection in
this instance's hash: one round trip per admission; a connection's end writes
this instance's count for that IP as it now is, and every reconnection to Redis
publishes the whole mirror again, so whatever Redis lost or missed while down is
put right by the next write.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from ttsstream.cluster.link import RedisLink
from ttsstream.cluster.ratelimit import HIT_FUNCTION, SharedWindow, retry_after
from ttsstream.core.ratelimit import ConnectionCounter, LimiterUnavailable
from ttsstream.exceptions import ServerFull, TooManyConnections

__all__ = ["SharedConnections"]

#: The field of an instance's hash that holds its total.
_TOTAL = "*"

# 0 once the connection is counted, 1 if its IP is at its cap, 2 if the cluster is.
_ACQUIRE_FUNCTION = """
local function acquire(instances, now, ip, per_ip, total, prefix, me, lease)
  local of_ip, all = 0, 0
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', instances, now, '+inf')) do
    local counts = redis.call('HMGET', prefix .. 'conns:' .. member, ip, '*')
    of_ip = of_ip + (tonumber(counts[1]) or 0)
    all = all + (tonumber(counts[2]) or 0)
  end
  if all >= total then return 2 end
  if of_ip >= per_ip then return 1 end
  local mine = prefix .. 'conns:' .. me
  redis.call('HINCRBY', mine, ip, 1)
  redis.call('HINCRBY', mine, '*', 1)
  redis.call('PEXPIRE', mine, lease)
  return 0
end
"""
_ACQUIRE_CALL = (
    "acquire(KEYS[{k}], tonumber(ARGV[{a}]), ARGV[{a}+1], tonumber(ARGV[{a}+2]), "
    "tonumber(ARGV[{a}+3]), ARGV[{a}+4], ARGV[{a}+5], tonumber(ARGV[{a}+6]))"
)
_ACQUIRE = _ACQUIRE_FUNCTION + "return " + _ACQUIRE_CALL.format(k=1, a=1) + "\n"
# Admission in one round trip: the request's hit in its IP's rate window, then, if it
# is within it, the connection: {wait in µs, 0} when over the rate limit (nothing
# counted but the hit), else {-1, what acquire said}.
_HIT_AND_ACQUIRE = (
    HIT_FUNCTION
    + _ACQUIRE_FUNCTION
    + """
local wait = hit(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
if wait >= 0 then return {wait, 0} end
return {-1, """
    + _ACQUIRE_CALL.format(k=2, a=4)
    + "}\n"
)


def _judge(verdict: int | None, per_ip: int) -> None:
    """Raise what the acquire function's ``verdict`` means, if it refused."""
    if verdict is None:
        raise LimiterUnavailable("redis is not answering")
    if verdict == 2:
        raise ServerFull("the server has too many connections; try again later")
    if verdict == 1:
        raise TooManyConnections(f"at most {per_ip} connections per client")


def _field(ip: str) -> str:
    return hashlib.sha256(ip.encode()).hexdigest()[:32]


class SharedConnections:
    """Connection caps over the cluster (a :class:`~ttsstream.core.ratelimit.SharedConnections`)."""

    def __init__(self, link: RedisLink, window: SharedWindow) -> None:
        self._link = link
        self._window = window
        self._counter: ConnectionCounter | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def mirror(self, counter: ConnectionCounter) -> None:
        self._counter = counter
        self._link.on_up(self._publish)

    async def acquire(self, ip: str, per_ip: int, total: int) -> None:
        link = self._link

        args = self._acquire_args(ip, per_ip, total)
        verdict = await link.script(_ACQUIRE, [link.key("instances")], args)
        _judge(None if verdict is None else int(verdict), per_ip)

    async def hit_and_acquire(
        self, ip: str, limit: int, window: float, per_ip: int, total: int
    ) -> int | None:
        link = self._link
        window_key, hit_args = self._window.hit_parts(ip, limit, window)

        args = [*hit_args, *self._acquire_args(ip, per_ip, total)]
        answer = await link.script(_HIT_AND_ACQUIRE, [window_key, link.key("instances")], args)
        if answer is None:
            raise LimiterUnavailable("redis is not answering")
        waited, verdict = (int(n) for n in answer)
        if waited >= 0:
            return retry_after(waited)
        _judge(verdict, per_ip)
        return None

    def _acquire_args(self, ip: str, per_ip: int, total: int) -> list[Any]:
        link = self._link
        lease_ms = round(link.lease_seconds * 1000)
        return [time.time(), _field(ip), per_ip, total, link.prefix, link.instance, lease_ms]

    def release(self, ip: str) -> None:
        counter = self._counter
        if counter is None or not self._link.up:
            return
        count, total = counter.of(ip), counter.total
        link = self._link
        key, field = link.key("conns", link.instance), _field(ip)

        change = ("HSET", key, field, count) if count else ("HDEL", key, field)
        lease = ("PEXPIRE", key, round(link.lease_seconds * 1000))
        self._spawn(link.run(("MULTI",), change, ("HSET", key, _TOTAL, total), lease, ("EXEC",)))

    def _publish(self) -> None:
        """Write this instance's whole mirror (after Redis came back)."""
        counter = self._counter
        if counter is None:
            return
        link = self._link
        key = link.key("conns", link.instance)
        counts = {_field(ip): count for ip, count in counter.by_ip().items()}
        counts[_TOTAL] = counter.total

        fields = [part for pair in counts.items() for part in pair]
        lease = ("PEXPIRE", key, round(link.lease_seconds * 1000))
        self._spawn(link.run(("MULTI",), ("DEL", key), ("HSET", key, *fields), lease, ("EXEC",)))

    def _spawn(self, write: Any) -> None:
        task = asyncio.ensure_future(write)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
