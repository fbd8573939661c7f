"""Per-client-IP limits: a moving-window request limiter and connection counts.

Hand-written rather than taken from the ``limits`` library: its in-memory
moving window reads ``time.time()`` directly (no clock to inject, so a window
cannot be tested without sleeping), keeps an asyncio lock per key, and purges
stale keys in a pass that makes one thread hop per key, which falls behind a
flood of distinct IPs. Here every IP holds at most ``limit`` timestamps, IPs
idle for a whole window are purged as requests go by (amortised O(1)), and the
number of IPs tracked has a hard cap.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from ttsstream.exceptions import ServerFull, TooManyConnections

__all__ = [
    "ConnectionCounter",
    "LimiterUnavailable",
    "MovingWindow",
    "SharedConnections",
    "SharedLimiter",
]

#: Most client IPs a limiter remembers; past it, the IP seen longest ago is dropped.
MAX_TRACKED_IPS = 200_000


class LimiterUnavailable(Exception):
    """A shared limiter cannot decide now (its store is down or slow)."""


class SharedLimiter(Protocol):
    """A moving window every instance of a cluster counts in (``cluster/`` implements it)."""

    async def hit(self, key: str, limit: int, window: float) -> int | None:
        """As :meth:`MovingWindow.hit`, across instances.

        Raises:
            LimiterUnavailable: No decision could be had; the caller decides alone.
        """


class SharedConnections(Protocol):
    """Open connections counted over every instance of a cluster (``cluster/`` implements it)."""

    async def acquire(self, ip: str, per_ip: int, total: int) -> None:
        """Count one more connection from ``ip`` if the cluster's caps allow it.

        Raises:
            ServerFull: The cluster is at ``total``.
            TooManyConnections: ``ip`` is at ``per_ip`` across the cluster.
            LimiterUnavailable: No decision could be had; the caller decides alone.
        """

    async def hit_and_acquire(
        self, ip: str, limit: int, window: float, per_ip: int, total: int
    ) -> int | None:
        """Count a request from ``ip`` in the cluster's rate window (as
        :meth:`SharedLimiter.hit`) and, if it is within it, its connection as
        :meth:`acquire` does, in one round trip; the seconds to wait when it is not.

        Raises:
            ServerFull: The cluster is at ``total``.
            TooManyConnections: ``ip`` is at ``per_ip`` across the cluster.
            LimiterUnavailable: No decision could be had; the caller decides alone.
        """

    def release(self, ip: str) -> None:
        """Count one connection from ``ip`` less (in the background)."""

    def mirror(self, counter: ConnectionCounter) -> None:
        """Publish this instance's counts whenever the shared store (re)connects."""


class MovingWindow:
    """At most ``limit`` hits per key in any ``window`` seconds.

    Args:
        limit: Hits allowed per window; 0 disables the limit.
        window: Seconds.
        clock: Monotonic seconds; tests pass their own.
        max_tracked: Most keys remembered at once.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = MAX_TRACKED_IPS,
    ) -> None:
        if limit < 0 or window <= 0 or max_tracked < 1:
            raise ValueError("limit must be >= 0, window > 0, max_tracked >= 1")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._max_tracked = max_tracked
        # key -> timestamps of its hits in the window, oldest first (a plain list: most
        # keys hold one or two, and a deque's fixed blocks would cost 10 times more);
        # keys least recently hit first, so stale ones are at the front.
        self._hits: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are tracked."""
        return len(self._hits)

    def hit(self, key: str) -> int | None:
        """Count one hit for ``key``.

        Returns:
            ``None`` if allowed; else whole seconds until the next hit would be
            (the refused hit is not counted).
        """
        if self.limit == 0:
            return None
        now = self._clock()
        self._purge(now)
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = []
            if len(self._hits) > self._max_tracked:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(key)
            expired = bisect.bisect_right(hits, now - self.window)
            if expired:
                del hits[:expired]
        if len(hits) >= self.limit:
            return max(1, math.ceil(hits[0] + self.window - now))
        hits.append(now)
        return None

    def _purge(self, now: float) -> None:
        """Drop keys whose every hit left the window (those at the front)."""
        cutoff = now - self.window
        while self._hits:
            key, hits = next(iter(self._hits.items()))
            if hits and hits[-1] > cutoff:
                break
            del self._hits[key]


class ConnectionCounter:
    """Open connections per client IP and in total, against their caps."""

    def __init__(self, *, per_ip: int, total: int) -> None:
        self.per_ip = per_ip
        self.total_cap = total
        self.total = 0
        self._by_ip: dict[str, int] = {}

    def acquire(
        self, ip: str, *, capped: bool = True, cap: int | None = None, force: bool = False
    ) -> None:
        """Count one more connection from ``ip`` (or of a tenant, named so).

        Args:
            capped: Whether ``MAX_CONNECTIONS_PER_IP`` applies (not to a trusted proxy,
                whose connections carry many clients).
            cap: The cap instead of ``MAX_CONNECTIONS_PER_IP`` (a tenant's ``concurrent``).
            force: Count it whatever the caps (it takes a dropped connection's place).

        Raises:
            ServerFull: The server is at ``MAX_CONNECTIONS``.
            TooManyConnections: ``ip`` is at ``MAX_CONNECTIONS_PER_IP``.
        """
        if self.total >= self.total_cap and not force:
            raise ServerFull("the server has too many connections; try again later")
        limit = self.per_ip if cap is None else cap
        if capped and not force and self._by_ip.get(ip, 0) >= limit:
            raise TooManyConnections(f"at most {limit} connections per client")
        self.total += 1
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1

    def release(self, ip: str) -> None:
        """Count one connection from ``ip`` less."""
        self.total -= 1
        left = self._by_ip.get(ip, 1) - 1
        if left:
            self._by_ip[ip] = left
        else:
            self._by_ip.pop(ip, None)

    def of(self, ip: str) -> int:
        return self._by_ip.get(ip, 0)

    def by_ip(self) -> dict[str, int]:
        """A copy of the open connections per IP."""
        return dict(self._by_ip)
