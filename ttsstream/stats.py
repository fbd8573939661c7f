"""The server's counters: one object that every part updates and the side port reads."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Stats"]


@dataclass
class Stats:
    """Counters since start. Plain attributes: updated on the event loop only."""

    # Refusals
    #: Handshakes and speak messages refused by a rate or connection limit.
    rate_limited: int = 0
    #: Handshakes without a valid API key.
    auth_failures: int = 0
    #: Handshakes from an origin not in ALLOWED_ORIGINS.
    origin_rejected: int = 0

    # Cache
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evictions: int = 0
    #: Entries dropped as corrupt, and disk reads or writes that failed.
    cache_errors: int = 0
    cache_entries: int = 0
    cache_bytes: int = 0
    #: Requests that joined an identical synthesis already in flight.
    coalesced: int = 0

    @property
    def cache_hit_rate(self) -> str:
        """Hits over hits + misses, as the old server reported it: ``"72.1%"``."""
        lookups = self.cache_hits + self.cache_misses
        return f"{100 * self.cache_hits / lookups:.1f}%" if lookups else "0.0%"

    def snapshot(self) -> dict[str, Any]:
        """Every counter, and the hit rate, as a JSON-ready dict."""
        return {**asdict(self), "cache_hit_rate": self.cache_hit_rate}
