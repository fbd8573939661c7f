"""Usage per tenant: what each key's holder spoke, and its character quotas.

The rule, the same on every door: the characters of a text the client sent are
charged to its tenant when its utterance is accepted (a streamed text: as it
ends, all it received), counted whether they were synthesized or replayed from
the cache (the replayed ones also apart, as ``cached_characters``), and given
back when the utterance ends without a byte of audio heard (refused by the
engine, failed, cancelled before its first byte). A request whose characters
would pass the tenant's ``characters_per_day`` or ``characters_per_month`` is
refused with ``quota_exceeded`` and when the period resets (UTC midnight, the
first of the month). A streamed text is admitted while its tenant has characters
left, and finishes even if it passes the quota.

Beside the quota counts, :class:`Usage` tallies per tenant, UTC day and door:
characters, cached characters, audio seconds sent, requests and errors. It writes
them to its :class:`UsageStore` in batches (once a second, and at shutdown), so a
process killed loses at most the last second of counts.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ttsstream.core.context import Principal, RequestContext
from ttsstream.core.ratelimit import LimiterUnavailable
from ttsstream.exceptions import QuotaExceeded

__all__ = [
    "FLUSH_INTERVAL",
    "Charge",
    "SharedQuota",
    "Tally",
    "Usage",
    "UsageRow",
    "UsageStore",
    "day_of",
    "month_of",
]

logger = logging.getLogger("ttsstream.usage")

#: Seconds between two batches written to the store (at most this much is lost to a crash).
FLUSH_INTERVAL = 1.0


def day_of(now: dt.datetime) -> str:
    """The UTC day a moment counts in: ``2026-12-07``."""
    return now.astimezone(dt.UTC).strftime("%Y-%m-%d")


def month_of(now: dt.datetime) -> str:
    """The UTC month a moment counts in: ``2026-12``."""
    return now.astimezone(dt.UTC).strftime("%Y-%m")


def _next_day(now: dt.datetime) -> dt.datetime:
    today = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + dt.timedelta(days=1)


def _next_month(now: dt.datetime) -> dt.datetime:
    now = now.astimezone(dt.UTC)
    days = calendar.monthrange(now.year, now.month)[1]
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return first + dt.timedelta(days=days)


@dataclass(slots=True)
class Tally:
    """Counts of one tenant (on one day and door, or summed)."""

    characters: int = 0
    cached_characters: int = 0
    audio_ms: float = 0.0
    requests: int = 0
    errors: int = 0

    def add(self, other: Tally) -> None:
        self.characters += other.characters
        self.cached_characters += other.cached_characters
        self.audio_ms += other.audio_ms
        self.requests += other.requests
        self.errors += other.errors

    def as_dict(self) -> dict[str, float]:
        return {
            "characters": self.characters,
            "cached_characters": self.cached_characters,
            "audio_seconds": round(self.audio_ms / 1000, 3),
            "requests": self.requests,
            "errors": self.errors,
        }


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Counts of a tenant on a UTC day through a door."""

    tenant: str
    day: str
    door: str
    tally: Tally = field(default_factory=Tally)


class UsageStore(Protocol):
    """Where tallies are kept (SQLite on one instance, Redis in a cluster)."""

    async def add(self, rows: Iterable[UsageRow]) -> None:
        """Add these counts to what is stored (in one transaction)."""

    async def rows(self, tenant: str | None, first_day: str, last_day: str) -> list[UsageRow]:
        """The stored rows of ``tenant`` (``None``: every tenant) from ``first_day`` to
        ``last_day``, inclusive."""

    async def close(self) -> None:
        """Release the store."""


class SharedQuota(Protocol):
    """Characters charged per tenant and period, one count for the whole cluster
    (``cluster/`` implements it in Redis)."""

    async def charge(
        self,
        tenant: str,
        periods: tuple[str, str],
        characters: int,
        limits: tuple[int | None, int | None],
        *,
        check_only: bool,
    ) -> tuple[int, int, int]:
        """Charge ``characters`` to ``tenant`` in its day and month ``periods`` unless that
        passes a limit (``None``: none; 0 characters need one left), or only say whether
        it would (``check_only``); the quota that refused (0: none, 1: the day's, 2: the
        month's) and the characters charged in each period after it.

        Raises:
            LimiterUnavailable: No decision could be had; the caller decides alone.
        """

    def refund(self, tenant: str, periods: tuple[str, str], characters: int) -> None:
        """Give characters back (in the background)."""


@dataclass(frozen=True, slots=True)
class Charge:
    """Characters charged to a tenant's quotas, and where (to give them back there)."""

    tenant: str
    #: The day and the month they count in.
    periods: tuple[str, str]
    characters: int
    #: In the cluster's counts (Redis), else this instance's.
    shared: bool


@dataclass(slots=True)
class _Quota:
    """A tenant's characters charged in the current day and month."""

    day: str
    month: str
    day_chars: int
    month_chars: int


class Usage:
    """Charges, quotas and tallies of every tenant.

    Args:
        store: Where tallies go; ``None``: kept in memory only.
        shared: The cluster's quota counts, if any (else this instance's, below).
        now: The current time (tests pass their own clock).
    """

    def __init__(
        self,
        store: UsageStore | None = None,
        *,
        shared: SharedQuota | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._store = store
        self._shared = shared
        self._now = now
        #: Counts not yet written, by (tenant, day, door).
        self._pending: dict[tuple[str, str, str], Tally] = {}
        #: Every count of this process since it started, by (tenant, door): /stats.
        self.totals: dict[tuple[str, str], Tally] = {}
        self._quotas: dict[str, _Quota] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        #: Why the last write to the store failed, if it did (shown in /health).
        self.error: str | None = None

    # Quotas

    async def charge(
        self, principal: Principal, characters: int, *, check_only: bool = False
    ) -> Charge | None:
        """Charge ``characters`` to ``principal``'s tenant, or refuse them
        (``check_only``: only whether they would be refused); the charge, to give back
        with :meth:`refund` (``None``: nothing was charged, its tenant has no quota).

        Raises:
            QuotaExceeded: They would pass its ``characters_per_day`` or ``_per_month``
                (with the seconds until that period resets).
        """
        tenant = principal.tenant
        if tenant is None or (
            tenant.characters_per_day is None and tenant.characters_per_month is None
        ):
            return None
        now = self._now()
        quota = await self._quota(tenant.name, now)
        limits = (tenant.characters_per_day, tenant.characters_per_month)
        periods = (quota.day, quota.month)
        if self._shared is not None:
            try:
                refused, day_chars, month_chars = await self._shared.charge(
                    tenant.name, periods, characters, limits, check_only=check_only
                )
            except LimiterUnavailable:
                pass  # Redis is away: this instance decides alone, on its own counts
            else:
                # The cluster's counts, which this instance keeps for when Redis is away.
                quota.day_chars, quota.month_chars = day_chars, month_chars
                if refused:
                    raise _exceeded(tenant.name, limits, quota, characters, refused, now)
                if check_only:
                    return None
                return Charge(tenant.name, periods, characters, shared=True)
        # A streamed text (0 characters yet) needs one character left.
        needed = max(characters, 1)
        for refused, (limit, used) in enumerate(
            zip(limits, (quota.day_chars, quota.month_chars), strict=True), start=1
        ):
            if limit is not None and used + needed > limit:
                raise _exceeded(tenant.name, limits, quota, characters, refused, now)
        if check_only:
            return None
        quota.day_chars += characters
        quota.month_chars += characters
        return Charge(tenant.name, periods, characters, shared=False)

    def refund(self, charge: Charge | None) -> None:
        """Give back a charge of an utterance nobody heard, where it was made."""
        self._add(charge, -charge.characters if charge is not None else 0)

    def add_charge(self, charge: Charge | None, characters: int) -> None:
        """Charge characters that came after the utterance was accepted (a streamed
        text's), where its first charge was made."""
        self._add(charge, characters)

    def _add(self, charge: Charge | None, characters: int) -> None:
        if charge is None or characters == 0:
            return
        quota = self._quotas.get(charge.tenant)
        if quota is not None:
            if quota.day == charge.periods[0]:
                quota.day_chars = max(0, quota.day_chars + characters)
            if quota.month == charge.periods[1]:
                quota.month_chars = max(0, quota.month_chars + characters)
        if charge.shared and self._shared is not None:
            self._shared.refund(charge.tenant, charge.periods, -characters)

    async def _quota(self, tenant: str, now: dt.datetime) -> _Quota:
        """The tenant's counts in the current day and month, read from the store on the
        first charge of a period."""
        day, month = day_of(now), month_of(now)
        quota = self._quotas.get(tenant)
        if quota is not None and quota.day == day:
            return quota
        lock = self._loading.setdefault(tenant, asyncio.Lock())
        async with lock:
            quota = self._quotas.get(tenant)
            if quota is not None and quota.day == day:
                return quota
            try:
                rows = await self.rows(tenant, month + "-01", day)
            except Exception as exc:  # the store cannot be read: decide on what is known
                if self.error is None:
                    logger.error("usage not read, quotas counted from now: %s", exc)
                self.error = f"usage store: {exc}"
                rows = [
                    UsageRow(t, d, door, tally)
                    for (t, d, door), tally in self._pending.items()
                    if t == tenant and d.startswith(month)
                ]
            day_chars = sum(row.tally.characters for row in rows if row.day == day)
            month_chars = sum(row.tally.characters for row in rows)
            quota = self._quotas[tenant] = _Quota(day, month, day_chars, month_chars)
            return quota

    async def remaining(self, principal: Principal) -> dict[str, int | None]:
        """The quotas of ``principal``'s tenant and what it has left of them today and
        this month (``None``: no such quota)."""
        tenant = principal.tenant
        day_limit = tenant.characters_per_day if tenant is not None else None
        month_limit = tenant.characters_per_month if tenant is not None else None
        day_used = month_used = 0
        if tenant is not None and (day_limit is not None or month_limit is not None):
            quota = await self._quota(tenant.name, self._now())
            day_used, month_used = quota.day_chars, quota.month_chars
        return {
            "characters_per_day": day_limit,
            "characters_left_today": None if day_limit is None else max(0, day_limit - day_used),
            "characters_per_month": month_limit,
            "characters_left_this_month": (
                None if month_limit is None else max(0, month_limit - month_used)
            ),
        }

    # Tallies

    def record(
        self,
        context: RequestContext,
        *,
        characters: int,
        cached: bool,
        audio_ms: float,
        error: bool,
    ) -> None:
        """Count one utterance that ended (its characters as charged: 0 if refunded)."""
        tally = Tally(
            characters=characters,
            cached_characters=characters if cached else 0,
            audio_ms=audio_ms,
            requests=1,
            errors=int(error),
        )
        name = context.principal.name
        key = (name, day_of(self._now()), context.door)
        self._pending.setdefault(key, Tally()).add(tally)
        self.totals.setdefault((name, context.door), Tally()).add(tally)

    async def flush(self) -> None:
        """Write the counts not yet written (kept for the next try if the store fails)."""
        if not self._pending or self._store is None:
            return
        batch, self._pending = self._pending, {}
        rows = [UsageRow(t, d, door, tally) for (t, d, door), tally in batch.items()]
        try:
            await self._store.add(rows)
        except BaseException as exc:  # the disk or Redis failed: keep the counts, say so
            for row in rows:
                self._pending.setdefault((row.tenant, row.day, row.door), Tally()).add(row.tally)
            if not isinstance(exc, Exception):
                raise  # cancelled: kept for the last flush
            if self.error is None:
                logger.error("usage not written, kept to retry: %s", exc)
            self.error = f"usage store: {exc}"
            return
        if self.error is not None:
            logger.info("usage written again")
        self.error = None

    async def run(self, interval: float = FLUSH_INTERVAL) -> None:
        """Write the counts in batches until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self.flush()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def rows(self, tenant: str | None, first_day: str, last_day: str) -> list[UsageRow]:
        """Stored and pending counts of ``tenant`` (``None``: all) between two days."""
        rows = [] if self._store is None else await self._store.rows(tenant, first_day, last_day)
        rows += [
            UsageRow(t, day, door, tally)
            for (t, day, door), tally in self._pending.items()
            if (tenant is None or t == tenant) and first_day <= day <= last_day
        ]
        return rows

    async def report(self, tenant: str | None, month: str | None = None) -> dict[str, object]:
        """A month's counts (default: this one), per tenant and door, with their sums."""
        month = month or month_of(self._now())
        rows = await self.rows(tenant, month + "-01", month + "-31")
        return {"month": month, "tenants": summarize(rows)}

    def snapshot(self) -> dict[str, dict[str, object]]:
        """This process's counts since it started, per tenant and door (``/stats``)."""
        return summarize(
            UsageRow(tenant, "", door, tally) for (tenant, door), tally in self.totals.items()
        )

    async def close(self) -> None:
        await self.flush()
        if self._store is not None:
            await self._store.close()


def summarize(rows: Iterable[UsageRow]) -> dict[str, dict[str, object]]:
    """Rows summed per tenant: its total and each door's."""
    tenants: dict[str, dict[str, Tally]] = {}
    for row in rows:
        doors = tenants.setdefault(row.tenant, {})
        doors.setdefault(row.door, Tally()).add(row.tally)
    result: dict[str, dict[str, object]] = {}
    for name, doors in sorted(tenants.items()):
        total = Tally()
        for tally in doors.values():
            total.add(tally)
        by_door: Mapping[str, dict[str, float]] = {
            door: tally.as_dict() for door, tally in sorted(doors.items())
        }
        result[name] = {**total.as_dict(), "doors": by_door}
    return result


def _exceeded(
    tenant: str,
    limits: tuple[int | None, int | None],
    quota: _Quota,
    characters: int,
    refused: int,
    now: dt.datetime,
) -> QuotaExceeded:
    """The refusal of a charge the cluster's quota refused (1: the day's, 2: the month's)."""
    period, resets = ("day", _next_day(now)) if refused == 1 else ("month", _next_month(now))
    limit = limits[refused - 1]
    used = quota.day_chars if refused == 1 else quota.month_chars
    return QuotaExceeded(
        f"the key of {tenant!r} has used its {limit} characters of this {period} ({used} "
        f"spoken; this text has {characters}); the quota resets at {resets.isoformat()}",
        retry_after=max(1, int((resets - now).total_seconds() + 0.999)),
    )
