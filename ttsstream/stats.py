"""The server's counters: one object that every part updates and the side port reads.

``/stats`` is :meth:`Stats.snapshot`; ``/metrics`` is :meth:`Stats.metrics`, the
same numbers in Prometheus' text format (base units, ``_total`` and ``_seconds``
suffixes) plus a time-to-first-audio histogram. No label ever holds text, an IP
or a key: outcomes and error kinds are the protocol's fixed codes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["LAG_BUCKETS", "TTFA_BUCKETS", "LoopLag", "Stats", "process_figures"]

#: Time-to-first-audio histogram buckets, in seconds: cached replay lands in the
#: first few, live Edge around 0.2–1 s.
TTFA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Event-loop lag histogram buckets, in seconds: a healthy loop stays in the first two.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class LoopLag:
    """How late the event loop runs what is due: every utterance waits that long more.

    A task sleeps ``interval`` seconds at a time and notes how much later than asked
    it woke: the time the loop was busy with other callbacks (or a collection, or a
    blocking call). ``/stats`` gives the percentiles of the last ``window`` seconds,
    ``/metrics`` a histogram since start. One timer every 100 ms costs nothing
    measurable.
    """

    def __init__(self, interval: float = 0.1, window: float = 60.0) -> None:
        self.interval = interval
        self.window = window
        self._samples: deque[float] = deque(maxlen=max(1, round(window / interval)))
        self.histogram: Histogram | None = None

    def note(self, lag: float) -> None:
        """Record one sample, in seconds."""
        self._samples.append(lag)
        if self.histogram is not None:
            self.histogram.observe(lag)

    async def run(self) -> None:
        """Sample until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.interval)
            self.note(max(0.0, loop.time() - asked - self.interval))

    def snapshot(self) -> dict[str, float | int]:
        """p50, p99 and max in ms over the window, and the samples they come from."""
        ordered = sorted(self._samples)
        count = len(ordered)

        def at(fraction: float) -> float:
            return round(1000 * ordered[min(count - 1, int(fraction * count))], 3) if count else 0.0

        return {
            "p50": at(0.5),
            "p99": at(0.99),
            "max": round(1000 * ordered[-1], 3) if count else 0.0,
            "samples": count,
            "window_s": self.window,
        }


def _tasks_alive() -> int:
    """asyncio tasks alive on the running loop; 0 without one (a Stats made, and its
    registry collected once, before the loop runs)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def process_figures() -> dict[str, int]:
    """This process's resident memory, open files, asyncio tasks and threads now.

    On Linux from ``/proc/self`` (cheap: a read and a directory listing); elsewhere
    the memory and files are reported as 0.
    """
    rss = 0
    open_files = 0
    proc = Path("/proc/self")
    try:
        rss = int((proc / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        open_files = len(os.listdir(proc / "fd"))
    except (OSError, ValueError, IndexError):
        pass
    return {
        "rss_bytes": rss,
        "open_files": open_files,
        "tasks": _tasks_alive(),
        "threads": threading.active_count(),
    }


@dataclass(eq=False)
class Stats:
    """Counters since start. Plain attributes, updated on the event loop only."""

    started_at: float = field(default_factory=time.monotonic)

    # Requests
    #: ``speak`` messages received.
    total_requests: int = 0
    #: ``error`` messages sent to clients.
    errors: int = 0
    #: Finished utterances by outcome: ok, cancelled, disconnected, too_slow, or an error code.
    outcomes: Counter[str] = field(default_factory=Counter)
    #: Finished utterances by door (``ws``, ``http``) and outcome.
    outcomes_by_interface: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: The doors' labels (the server sets them from its route table).
    door_labels: tuple[str, ...] = ("ws", "http")
    #: Utterances queued or playing (HTTP: streams) on each door, by label; the server
    #: sets it to ask its doors.
    doors_in_progress: Callable[[], dict[str, int]] = dict
    #: Each tenant's counts by door since start: (characters, cached characters, audio
    #: seconds, requests, errors); the services set it to ask the usage.
    tenant_counts: Callable[[], dict[tuple[str, str], tuple[int, int, float, int, int]]] = dict
    #: Finished utterances by the audio format they were sent in (``mp3``, ``opus``…).
    formats: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    #: Open WebSocket connections.
    connections: int = 0
    #: Open connections serving HTTP (kept alive between requests too).
    http_connections: int = 0
    active_utterances: int = 0

    # Refusals
    #: Handshakes and speak messages refused by a rate or connection limit.
    rate_limited: int = 0
    #: Handshakes without a valid API key.
    auth_failures: int = 0
    #: Handshakes from an origin not in ALLOWED_ORIGINS.
    origin_rejected: int = 0

    # Upstream
    #: Edge synthesis attempts (a retry is one more).
    upstream_requests: int = 0
    upstream_errors: int = 0
    #: Upstream errors by error code.
    upstream_error_kinds: Counter[str] = field(default_factory=Counter)
    #: Utterances spoken by the fallback voice because Edge failed.
    fallbacks: int = 0

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

    #: The event loop's lag (the server runs :meth:`LoopLag.run`).
    loop_lag: LoopLag = field(default_factory=LoopLag)

    def __post_init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(self))
        # prometheus-client's own: process_resident_memory_bytes, process_open_fds…
        ProcessCollector(registry=self.registry)
        self.loop_lag.histogram = Histogram(
            "ttsstream_event_loop_lag_seconds",
            "How much later than due the event loop ran a 100 ms timer.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self._ttfa = Histogram(
            "ttsstream_time_to_first_audio_seconds",
            "Time from receiving speak to sending its first audio byte.",
            ["source"],
            buckets=TTFA_BUCKETS,
            registry=self.registry,
        )
        # One child per source, made up front: labels() takes a lock on every call.
        self._ttfa_by_source = {
            source: self._ttfa.labels(source=source) for source in ("cached", "live", "fallback")
        }

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def cache_hit_rate(self) -> str:
        """Hits over hits + misses, as the old server reported it: ``"72.1%"``."""
        lookups = self.cache_hits + self.cache_misses
        return f"{100 * self.cache_hits / lookups:.1f}%" if lookups else "0.0%"

    def observe_first_audio(self, source: str, seconds: float) -> None:
        """Record a time to first audio; ``source`` is cached, live or fallback."""
        self._ttfa_by_source[source].observe(seconds)

    def finished(self, outcome: str, interface: str = "ws") -> None:
        """Count a finished utterance by its outcome and the door it came through."""
        self.outcomes[outcome] += 1
        self.outcomes_by_interface[interface, outcome] += 1

    def upstream_failed(self, code: str) -> None:
        """Count an Edge failure of kind ``code``."""
        self.upstream_errors += 1
        self.upstream_error_kinds[code] += 1

    def snapshot(self) -> dict[str, Any]:
        """What ``/stats`` shows: the old server's fields with the same names, and more."""
        uptime = self.uptime_seconds
        return {
            "uptime_seconds": round(uptime, 3),
            "total_requests": self.total_requests,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "cache_hit_rate": self.cache_hit_rate,
            "errors": self.errors,
            "rate_limited": self.rate_limited,
            "requests_per_second": round(self.total_requests / uptime, 3) if uptime else 0.0,
            "connections": self.connections,
            "http_connections": self.http_connections,
            "active_utterances": self.active_utterances,
            "upstream_requests": self.upstream_requests,
            "upstream_errors": self.upstream_errors,
            "fallbacks": self.fallbacks,
            "coalesced": self.coalesced,
            "bytes_sent": self.bytes_sent,
            "auth_failures": self.auth_failures,
            "origin_rejected": self.origin_rejected,
            "cache_entries": self.cache_entries,
            "cache_bytes": self.cache_bytes,
            "cache_evictions": self.cache_evictions,
            "cache_errors": self.cache_errors,
            "outcomes": dict(self.outcomes),
            "formats": dict(self.formats),
            "interfaces": {
                interface: sum(
                    count
                    for (door, _), count in self.outcomes_by_interface.items()
                    if door == interface
                )
                for interface in self.door_labels
            },
            "in_progress": self.doors_in_progress(),
            "process": process_figures(),
            "loop_lag_ms": self.loop_lag.snapshot(),
        }

    def metrics(self) -> bytes:
        """Everything in Prometheus' text exposition format."""
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """Reads the counters at scrape time, so they are kept in one place only."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        requests = CounterMetricFamily(
            "ttsstream_requests",
            "Finished utterances by door (ws, http, elevenlabs, cartesia) and outcome.",
            labels=["interface", "outcome"],
        )
        for (interface, outcome), count in sorted(stats.outcomes_by_interface.items()):
            requests.add_metric([interface, outcome], count)
        yield requests
        in_progress = GaugeMetricFamily(
            "ttsstream_in_progress",
            "Utterances queued or playing (HTTP: streams being answered), by door.",
            labels=["interface"],
        )
        for door, count in sorted(stats.doors_in_progress().items()):
            in_progress.add_metric([door], count)
        yield in_progress
        yield from _tenant_metrics(stats.tenant_counts())
        upstream_errors = CounterMetricFamily(
            "ttsstream_upstream_errors", "Edge failures by kind.", labels=["kind"]
        )
        for kind, count in sorted(stats.upstream_error_kinds.items()):
            upstream_errors.add_metric([kind], count)
        yield upstream_errors
        counters: tuple[tuple[str, str, int], ...] = (
            (
                "ttsstream_speak_messages",
                "Utterances asked for (speak messages and HTTP speech requests).",
                stats.total_requests,
            ),
            ("ttsstream_errors", "error messages sent to clients.", stats.errors),
            ("ttsstream_cache_hits", "Utterances replayed from the disk cache.", stats.cache_hits),
            ("ttsstream_cache_misses", "Cacheable utterances not on disk.", stats.cache_misses),
            ("ttsstream_cache_evictions", "Cache entries evicted.", stats.cache_evictions),
            ("ttsstream_cache_errors", "Corrupt entries and failed disk I/O.", stats.cache_errors),
            ("ttsstream_coalesced", "Requests that joined a synthesis in flight.", stats.coalesced),
            ("ttsstream_upstream_requests", "Edge synthesis attempts.", stats.upstream_requests),
            ("ttsstream_fallbacks", "Utterances spoken by the fallback voice.", stats.fallbacks),
            ("ttsstream_rate_limited", "Requests refused by a limit.", stats.rate_limited),
            ("ttsstream_auth_failures", "Handshakes without a valid key.", stats.auth_failures),
            (
                "ttsstream_origin_rejected",
                "Handshakes from a refused origin.",
                stats.origin_rejected,
            ),
            ("ttsstream_sent_bytes", "Audio bytes sent to clients.", stats.bytes_sent),
        )
        for name, documentation, count in counters:
            yield CounterMetricFamily(name, documentation, value=count)
        gauges: tuple[tuple[str, str, float], ...] = (
            ("ttsstream_connections", "Open WebSocket connections.", stats.connections),
            (
                "ttsstream_http_connections",
                "Open connections serving HTTP, idle kept-alive ones included.",
                stats.http_connections,
            ),
            ("ttsstream_active_utterances", "Utterances being spoken.", stats.active_utterances),
            ("ttsstream_cache_entries", "Entries in the disk cache.", stats.cache_entries),
            ("ttsstream_cache_size_bytes", "Size of the disk cache.", stats.cache_bytes),
            ("ttsstream_uptime_seconds", "Seconds since start.", stats.uptime_seconds),
            ("ttsstream_event_loop_tasks", "asyncio tasks alive.", _tasks_alive()),
        )
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=value)


#: The tenant counters, in the order of the counts' tuples.
_TENANT_COUNTS = (
    ("ttsstream_tenant_characters", "Characters spoken per tenant and door (cache hits included)."),
    (
        "ttsstream_tenant_cached_characters",
        "Characters replayed from the cache per tenant and door.",
    ),
    ("ttsstream_tenant_audio_seconds", "Seconds of audio sent per tenant and door."),
    ("ttsstream_tenant_requests", "Utterances per tenant and door."),
    ("ttsstream_tenant_errors", "Utterances that failed per tenant and door."),
)


def _tenant_metrics(
    counts: dict[tuple[str, str], tuple[int, int, float, int, int]],
) -> Iterator[Metric]:
    """Each tenant's counts by door (tenant names come from the keys file: bounded)."""
    families = [
        CounterMetricFamily(name, documentation, labels=["tenant", "interface"])
        for name, documentation in _TENANT_COUNTS
    ]
    for (tenant, door), values in sorted(counts.items()):
        for family, value in zip(families, values, strict=True):
            family.add_metric([tenant, door], value)
    yield from families
