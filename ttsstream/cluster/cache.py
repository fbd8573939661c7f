"""The cluster's shared cache tier: finished entries in Redis, behind each instance's disk.

An MP3 entry written to an instance's disk is also written to Redis (the same
checksummed bytes as on disk) with ``CACHE_SHARED_TTL``; an instance that misses
on its disk looks there, and keeps what it finds on its own disk too. The formats
made from an MP3 are never written here (the speech cache keeps them on the disk
of the instance that made them): another instance makes them from the shared MP3,
while keeping them would multiply the tier (a long text's MP3 took 1.75 MB of
Redis; with its six other formats, 30 MB). Redis bounds the tier by its own
``maxmemory`` with ``maxmemory-policy allkeys-lru`` (docs/deployment.md). Writes
go in the background; a read waits at most the link's operation deadline, as
every Redis call, and a damaged entry is a miss.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ttsstream.cache.store import CacheEntry, CorruptEntry, decode_entry, encode_entry
from ttsstream.cluster.flights import SharedFlights
from ttsstream.cluster.link import RedisLink
from ttsstream.cluster.ratelimit import SharedWindow, retry_after
from ttsstream.core.ratelimit import LimiterUnavailable

__all__ = ["SharedEntries"]

logger = logging.getLogger("ttsstream.cluster")

#: Reads of entries get this long (an entry is up to a few hundred KB), seconds.
READ_TIMEOUT = 0.25


class SharedEntries:
    """Cache entries in Redis (a :class:`~ttsstream.cache.store.SharedTier`).

    Args:
        link: The cluster's Redis.
        ttl: Seconds an entry is kept after it was last written.
        flights: The cluster's flights, claimed in the lookup's round trip on a miss.
        window: The cluster's rate window, which a speak's lookup may count it in
            (:meth:`hit_then_find_or_claim`).
    """

    def __init__(
        self, link: RedisLink, *, ttl: float, flights: SharedFlights, window: SharedWindow
    ) -> None:
        self._link = link
        self._ttl = max(1, round(ttl))
        self._flights = flights
        self._window = window
        self._writes: set[asyncio.Task[Any]] = set()

    async def find_or_claim(self, key: str) -> tuple[CacheEntry | None, bool | None]:
        # One script, one wait: on a busy instance each wait for Redis costs a turn of
        # the event loop, and two calls at once cost two tasks handed over (NOTES).
        found = await self._flights.find_or_claim(
            key, self._link.key("entry", key), within=READ_TIMEOUT
        )
        return (None, None) if found is None else await self._settled(key, found.found)

    async def hit_then_find_or_claim(
        self, ip: str, limit: int, window: float, key: str
    ) -> tuple[int | None, CacheEntry | None, bool | None]:
        window_key, hit_args = self._window.hit_parts(ip, limit, window)
        found = await self._flights.find_or_claim(
            key, self._link.key("entry", key), within=READ_TIMEOUT, hit=(window_key, hit_args)
        )
        if found is None:
            raise LimiterUnavailable("redis is not answering")
        if found.wait_us is not None:
            return retry_after(found.wait_us), None, None
        return None, *await self._settled(key, found.found)

    async def _settled(
        self, key: str, found: bytes | bool
    ) -> tuple[CacheEntry | None, bool | None]:
        """The entry and the claim, from what the lookup's script found."""
        if not isinstance(found, bytes):
            return None, found
        entry = self._decoded(key, found)
        if entry is None:  # damaged: a miss, so the flight is claimed after all
            return None, await self._flights.claim(key)
        return entry, None

    def _decoded(self, key: str, data: bytes) -> CacheEntry | None:
        try:
            return decode_entry(bytes(data))
        except CorruptEntry as exc:
            logger.warning("shared cache: entry %s… is damaged (%s); a miss", key[:12], exc)
            return None

    def put(
        self, key: str, entry: CacheEntry, data: bytes | None = None, *, settles: bool = False
    ) -> None:
        if data is None:
            data = encode_entry(entry)  # on the loop: the disk did not write it
        if settles:
            self._flights.settle(key, self._setting(key, data), within=READ_TIMEOUT)
            return
        write = asyncio.ensure_future(self._store(key, data))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _store(self, key: str, data: bytes) -> None:
        await self._link.run(self._setting(key, data), within=READ_TIMEOUT)

    def _setting(self, key: str, data: bytes) -> tuple[Any, ...]:
        """The command that stores an entry's bytes for the tier's TTL."""
        return ("SET", self._link.key("entry", key), data, "EX", self._ttl)
