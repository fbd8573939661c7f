"""The tenants' usage and character quotas in Redis, one count for the whole cluster.

Quotas: one counter per tenant and period (``quota:<tenant>:2026-12-07`` and
``quota:<tenant>:2026-12``); one Lua script checks both limits and charges both in
one round trip, so two instances cannot both spend a tenant's last characters.
Usage: one hash per tenant and UTC day (``usage:<tenant>:<day>``, a field per
door and count), added to by each instance's batches; the set ``usage:tenants``
names the tenants that have any. Both expire after :data:`KEEP_DAYS`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable
from typing import Any

from ttsstream.cluster.link import RedisLink
from ttsstream.core.ratelimit import LimiterUnavailable
from ttsstream.core.usage import Tally, UsageRow

__all__ = ["KEEP_DAYS", "SharedUsage"]

#: Most quota refunds kept while Redis is away.
MAX_UNSENT = 10_000
#: Days usage and quota counts are kept in Redis.
KEEP_DAYS = 400
_KEEP_SECONDS = KEEP_DAYS * 86_400
#: The counts of a tally, as hash fields ``<door>|<count>``.
_COUNTS = ("characters", "cached_characters", "audio_ms", "requests", "errors")

#: KEYS: the day's and the month's counters. ARGV: characters, the day's and the
#: month's limits (-1: none), 1 to only check, the seconds to keep the counts.
#: Returns {refused (0, 1: day, 2: month), day's count, month's count}.
_CHARGE = """
local day = tonumber(redis.call('GET', KEYS[1]) or '0')
local month = tonumber(redis.call('GET', KEYS[2]) or '0')
local n = tonumber(ARGV[1])
local needed = math.max(n, 1)
local day_limit, month_limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if day_limit >= 0 and day + needed > day_limit then return {1, day, month} end
if month_limit >= 0 and month + needed > month_limit then return {2, day, month} end
if ARGV[4] == '1' or n == 0 then return {0, day, month} end
day = redis.call('INCRBY', KEYS[1], n)
month = redis.call('INCRBY', KEYS[2], n)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {0, day, month}
"""


#: KEYS: a counter. ARGV: characters to add (negative: given back). Never below 0: a
#: refund that comes after Redis lost its counts (restarted empty) takes nothing more.
_REFUND = """
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if value < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
return value
"""


class SharedUsage:
    """A :class:`~ttsstream.core.usage.UsageStore` and
    :class:`~ttsstream.core.usage.SharedQuota` in the cluster's Redis."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        #: Quota refunds (and streamed texts' later charges) not sent yet.
        self._unsent: list[tuple[Any, ...]] = []
        self._sending: asyncio.Task[None] | None = None
        link.on_up(self._send_kept)

    # Quotas

    async def charge(
        self,
        tenant: str,
        periods: tuple[str, str],
        characters: int,
        limits: tuple[int | None, int | None],
        *,
        check_only: bool,
    ) -> tuple[int, int, int]:
        link = self._link
        keys = [link.key("quota", tenant, period) for period in periods]
        args = [
            characters,
            -1 if limits[0] is None else limits[0],
            -1 if limits[1] is None else limits[1],
            "1" if check_only else "0",
            _KEEP_SECONDS,
        ]
        reply = await link.script(_CHARGE, keys, args)
        if reply is None:
            raise LimiterUnavailable("redis is not answering")
        refused, day, month = (int(value) for value in reply)
        return refused, day, month

    def refund(self, tenant: str, periods: tuple[str, str], characters: int) -> None:
        link = self._link
        self._unsent += [
            ("EVAL", _REFUND, 1, link.key("quota", tenant, period), -characters)
            for period in periods
        ]
        if self._sending is None:
            self._sending = asyncio.create_task(self._send_refunds())

    def _send_kept(self) -> None:
        """Send the refunds kept while Redis was away (it is back)."""
        if self._unsent and self._sending is None:
            self._sending = asyncio.create_task(self._send_refunds())

    async def _send_refunds(self) -> None:
        """Send the refunds not sent yet; kept for the next try while Redis is away."""
        try:
            while self._unsent:
                commands, self._unsent = self._unsent, []
                if await self._link.run(*commands) is None:
                    # Redis is away: kept (the newest MAX_UNSENT) for the next refund or batch.
                    self._unsent = (commands + self._unsent)[-MAX_UNSENT:]
                    return
        finally:
            self._sending = None

    # The store

    async def add(self, rows: Iterable[UsageRow]) -> None:
        link = self._link
        commands: list[tuple[Any, ...]] = []
        tenants = set()
        for row in rows:
            key = link.key("usage", row.tenant, row.day)
            tenants.add(row.tenant)
            tally = row.tally
            for name, value in zip(_COUNTS, _values(tally), strict=True):
                if value:
                    command = "HINCRBYFLOAT" if isinstance(value, float) else "HINCRBY"
                    commands.append((command, key, f"{row.door}|{name}", value))
            commands.append(("EXPIRE", key, _KEEP_SECONDS))
        if not commands:
            return
        commands.append(("SADD", link.key("usage", "tenants"), *sorted(tenants)))
        if await link.run(*commands, within=1.0) is None:
            raise LimiterUnavailable("redis is not answering")
        self._send_kept()

    async def rows(self, tenant: str | None, first_day: str, last_day: str) -> list[UsageRow]:
        link = self._link
        if tenant is None:
            members = await link.run(("SMEMBERS", link.key("usage", "tenants")), within=1.0)
            if members is None:
                raise LimiterUnavailable("redis is not answering")
            tenants = sorted(member.decode() for member in members[0])
        else:
            tenants = [tenant]
        days = _days(first_day, last_day)
        wanted = [(name, day) for name in tenants for day in days]
        if not wanted:
            return []
        replies = await link.run(
            *(("HGETALL", link.key("usage", name, day)) for name, day in wanted), within=1.0
        )
        if replies is None:
            raise LimiterUnavailable("redis is not answering")
        rows = []
        for (name, day), reply in zip(wanted, replies, strict=True):
            rows += _rows(name, day, reply)
        return rows

    async def close(self) -> None:
        if self._sending is not None:
            await asyncio.wait([self._sending])


def _values(tally: Tally) -> tuple[int, int, float, int, int]:
    return (
        tally.characters,
        tally.cached_characters,
        float(tally.audio_ms),
        tally.requests,
        tally.errors,
    )


def _days(first: str, last: str) -> list[str]:
    """Each day from ``first`` to ``last`` (``2026-12-31`` may be given for any month's end)."""
    start = dt.date.fromisoformat(first)
    year, month, day = (int(part) for part in last.split("-"))
    while True:
        try:
            end = dt.date(year, month, day)
            break
        except ValueError:
            day -= 1  # "2026-02-31": the month's last day
    return [str(start + dt.timedelta(days=n)) for n in range((end - start).days + 1)]


def _rows(tenant: str, day: str, reply: Any) -> list[UsageRow]:
    """A day's hash (a flat list or a mapping, as the line or redis-py gives it) as rows."""
    if isinstance(reply, dict):
        pairs = list(reply.items())
    else:
        pairs = list(zip(reply[::2], reply[1::2], strict=True))
    doors: dict[str, dict[str, float]] = {}
    for field, value in pairs:
        door, _, name = (field.decode() if isinstance(field, bytes) else field).partition("|")
        doors.setdefault(door, {})[name] = float(value)
    return [
        UsageRow(
            tenant,
            day,
            door,
            Tally(
                characters=int(counts.get("characters", 0)),
                cached_characters=int(counts.get("cached_characters", 0)),
                audio_ms=counts.get("audio_ms", 0.0),
                requests=int(counts.get("requests", 0)),
                errors=int(counts.get("errors", 0)),
            ),
        )
        for door, counts in sorted(doors.items())
    ]
