"""The composition root: every long-lived part of a server, built once from ``Config``.

Doors (the WebSocket server, the side port) receive the :class:`Services` and use
the parts they need; no part builds another or reaches through one to a third.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ttsstream.cache.store import DiskCache
from ttsstream.cluster.cache import SharedEntries
from ttsstream.cluster.connections import SharedConnections
from ttsstream.cluster.flights import SharedFlights
from ttsstream.cluster.link import RedisLink
from ttsstream.cluster.ratelimit import SharedWindow
from ttsstream.cluster.slots import SharedSlots
from ttsstream.cluster.usage import SharedUsage
from ttsstream.config import Config
from ttsstream.core.admission import Admission
from ttsstream.core.keyring import Keyring
from ttsstream.core.router import SpeechRouter, speech_router
from ttsstream.core.speech_cache import SpeechCache
from ttsstream.core.usage import Usage, UsageStore
from ttsstream.core.utterance import Utterances
from ttsstream.engines.base import Engine
from ttsstream.stats import Stats
from ttsstream.usage.sqlite import SqliteUsage
from ttsstream.ws.resume import Buffers, Parking

__all__ = ["Services", "build_services"]


@dataclass(frozen=True, slots=True)
class Services:
    """What a server is made of, shared by its doors."""

    config: Config
    stats: Stats
    admission: Admission
    router: SpeechRouter
    #: The disk cache, or ``None`` when caching is off.
    store: DiskCache | None
    #: Speaks through the cache.
    speech: SpeechCache
    #: The speak policy and the utterance run: what both doors call.
    utterances: Utterances
    #: The keys in force (``TTS_API_KEY``, ``API_KEYS_FILE``'s tenants), reloaded live.
    keys: Keyring
    #: The tenants' charges, quotas and usage.
    usage: Usage
    #: Dropped WebSocket connections waiting to be resumed.
    parking: Parking
    #: The link to the cluster's Redis (``REDIS_URL``), or ``None`` for one instance.
    cluster: RedisLink | None = None


def build_services(
    config: Config,
    *,
    edge: Engine | None = None,
    with_offline: bool = True,
    clock: Callable[[], float] = time.monotonic,
) -> Services:
    """Build every part ``config`` describes.

    Args:
        config: The settings.
        edge: The online engine; by default Edge, as ``config`` says (tests pass doubles).
        with_offline: Load the offline voice when it is installed (tests turn it off
            to see a server without the ``local`` extra).
        clock: Monotonic seconds for the rate limit; tests pass their own.

    Raises:
        ConfigError: A voice setting names an offline voice that is not available, or
            ``API_KEYS_FILE`` cannot be read or is not valid.
    """
    stats = Stats()
    keys = Keyring(config.api_keys, config.api_keys_file)
    cluster = (
        RedisLink(
            config.redis_url, prefix=config.redis_prefix, lease_seconds=config.redis_lease_seconds
        )
        if config.redis_url is not None
        else None
    )
    router = speech_router(
        config,
        stats=stats,
        edge=edge,
        with_offline=with_offline,
        shared_slots=(
            SharedSlots(cluster, config.upstream_concurrency) if cluster is not None else None
        ),
    )
    store = (
        DiskCache(
            config.cache_dir,
            max_bytes=config.cache_max_bytes,
            stats=stats,
            memory_bytes=int(config.cache_memory_mb * 2**20),
        )
        if config.cache_enabled
        else None
    )
    # The cluster's parts (Redis), when there is a cluster.
    window: SharedWindow | None = None
    connections: SharedConnections | None = None
    flights: SharedFlights | None = None
    entries: SharedEntries | None = None
    if cluster is not None:
        window = SharedWindow(cluster)
        connections = SharedConnections(cluster, window)
        flights = SharedFlights(cluster, timeout=config.upstream_timeout)
        entries = SharedEntries(
            cluster, ttl=config.cache_shared_ttl, flights=flights, window=window
        )
    shared_usage = SharedUsage(cluster) if cluster is not None else None
    usage = Usage(shared_usage or usage_store(config), shared=shared_usage)
    stats.tenant_counts = lambda: {
        key: (t.characters, t.cached_characters, t.audio_ms / 1000, t.requests, t.errors)
        for key, t in usage.totals.items()
    }
    admission = Admission(
        config, stats, clock=clock, shared=window, shared_connections=connections, keyring=keys
    )
    speech = SpeechCache(router, store, stats, shared=entries, flights=flights)
    return Services(
        config=config,
        stats=stats,
        admission=admission,
        router=router,
        store=store,
        speech=speech,
        utterances=Utterances(config, speech, stats, usage),
        keys=keys,
        usage=usage,
        parking=Parking(
            config.resume_window,
            Buffers(int(config.resume_buffer_mb * 2**20), int(config.resume_total_mb * 2**20)),
        ),
        cluster=cluster,
    )


def usage_store(config: Config) -> UsageStore | None:
    """Where one instance keeps the tenants' usage: ``USAGE_DB``, else ``usage.sqlite3``
    beside ``API_KEYS_FILE``; nowhere (memory only) without either. (A cluster keeps
    it in Redis.)"""
    if config.usage_db is not None:
        return SqliteUsage(config.usage_db)
    if config.api_keys_file is not None:
        return SqliteUsage(config.api_keys_file.parent / "usage.sqlite3")
    return None
