"""The disk cache of finished utterances: one file per entry, written atomically.

Layout under ``CACHE_DIR``::

    ab/abcdef….tts      an entry, named by its key (fanned out by the key's first two hex digits)
    ab/abcdef…-opus.tts an utterance made into another format, beside its MP3 (a variant)
    tmp/<key>.<pid>.<random>.part   entries being written; renamed into place once complete

An entry file holds a small binary header, a JSON description (voice, engine,
word events, audio length and SHA-256) and the MP3 bytes. It is written to a
temporary file, then renamed: a reader sees the whole entry or none, whatever
moment the writer is killed. A damaged entry (truncated, bad JSON, checksum
mismatch) is detected on read, dropped and counted.

Entries are not fsynced. A cache needs its entries whole, not durable: after a
power failure an entry written just before may be missing, empty or zeroed, and
the checksum makes that a miss (synthesized again), never wrong audio. An fsync
of each entry and of its directory cost the writer thread a disk flush per
utterance, and the server's p99 first byte about 25 ms at 100 live clients
(bench/NOTES.md).

Recency lives in the files' modification times (a hit touches its file), so the
least-recently-used order survives a restart; the in-memory index is rebuilt
from a directory scan at start. Several instances may share the directory: the
disk is the truth, and each instance's index covers what it has seen (so each
evicts by what it has seen: with N instances, the directory may hold up to N ×
``CACHE_MAX_SIZE_MB``).

A temporary file whose writer is gone (killed mid-write) is removed at start and
by a sweep at most once a minute while entries are written; until then it counts
toward the cache's size, so the size cap holds.

Variants (:func:`variant_key`) count toward the size cap too, and may take at most
:data:`VARIANT_SHARE` of it: past that the least recently used variants are evicted
first, so that formats made from the MP3 never push out more than that share of
MP3 entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from ttsstream.engines.base import AudioFormat, WordEvent
from ttsstream.stats import Stats

__all__ = [
    "FORMAT_VERSION",
    "CacheEntry",
    "CorruptEntry",
    "DiskCache",
    "SharedTier",
    "cache_key",
    "decode_entry",
    "encode_entry",
    "is_variant",
    "variant_key",
]

logger = logging.getLogger("ttsstream.cache.store")

T = TypeVar("T")

#: Changes whenever the key's inputs or the file layout change: old entries then miss.
FORMAT_VERSION = 1
_MAGIC = b"TTSC"
_HEADER = struct.Struct(">4sBI")  # magic, format version, JSON length
_SUFFIX = ".tts"
_TEMP_DIR = "tmp"
#: Threads that read entries, and threads that write or delete them.
READ_THREADS = 4
WRITE_THREADS = 2
#: Temporary files older than this, in seconds, are a crashed writer's whoever wrote them.
STALE_TEMP_SECONDS = 300.0
#: A temporary file of a process that no longer runs is abandoned after these seconds.
#: Younger, it may be a write in progress of an instance that does not share our
#: process ids (another container on the same volume): a write takes milliseconds.
ABANDONED_TEMP_SECONDS = 1.0
#: Seconds between sweeps of abandoned temporary files while entries are written.
TEMP_SWEEP_SECONDS = 60.0
#: The share of the cache's size that variants may take at most.
VARIANT_SHARE = 0.25
#: Between an entry's key and a format's name in a variant's key (never in a key).
_VARIANT_MARK = "-"


@functools.lru_cache(maxsize=1024)
def cache_key(
    *,
    engine: str,
    voice: str,
    rate: str,
    volume: str,
    pitch: str,
    audio_format: AudioFormat,
    text: str,
) -> str:
    """The SHA-256 (hex) of everything that makes two utterances' audio the same.

    Memoised: the cache lookup and the access log of one utterance both need it.
    """
    material = orjson.dumps(
        [
            FORMAT_VERSION,
            engine,
            voice,
            rate,
            volume,
            pitch,
            audio_format.mime_type,
            audio_format.sample_rate,
            audio_format.bitrate_bps,
            text,
        ]
    )
    return hashlib.sha256(material).hexdigest()


def variant_key(key: str, format_name: str) -> str:
    """The key of entry ``key``'s utterance made into format ``format_name`` (a variant)."""
    return f"{key}{_VARIANT_MARK}{format_name}"


def is_variant(key: str) -> bool:
    """Whether ``key`` is a variant's (:func:`variant_key`)."""
    return _VARIANT_MARK in key


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One finished utterance: its audio and word events, as first sent."""

    engine: str
    voice: str
    audio: bytes
    words: tuple[WordEvent, ...]
    #: Playing time of ``audio`` when its length does not tell (a format made from
    #: the MP3 and stored beside it); ``None`` for the MP3 itself.
    audio_ms: float | None = None
    #: Its replays' events, made once per audio format and words mode by the speech
    #: cache (an entry kept in memory is replayed again and again).
    replays: dict[tuple[AudioFormat, bool], tuple[Any, ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )


class CorruptEntry(Exception):
    """An entry file that cannot be what its header says."""


class DiskCache:
    """Finished utterances on disk, bounded in size, least recently used evicted first.

    The most recently used entries are also kept in memory, decoded, up to
    ``memory_bytes``: a hit on one of them needs no disk read and no thread.

    Variants (:func:`variant_key`) are evicted first, least recently used first, while
    they take more than ``variant_share`` of ``max_bytes``; then any entry is, least
    recently used first, while all take more than ``max_bytes``.

    Args:
        directory: Where entries live; created if missing.
        max_bytes: Total size above which entries are evicted.
        stats: Counters to update.
        memory_bytes: Audio bytes of hot entries kept in memory; 0 keeps none.
        touch_interval: Seconds between two recordings on disk of hits on the same
            in-memory entry (their recency, which survives restarts).
        variant_share: The share of ``max_bytes`` that variants may take, from 0 to 1.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        stats: Stats,
        memory_bytes: int = 32 * 2**20,
        touch_interval: float = 1.0,
        variant_share: float = VARIANT_SHARE,
    ) -> None:
        if max_bytes < 0 or memory_bytes < 0:
            raise ValueError("max_bytes and memory_bytes must be >= 0")
        if not 0 <= variant_share <= 1:
            raise ValueError("variant_share must be from 0 to 1")
        self.directory = directory
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        #: The most that variants may take of the cache's size, bytes.
        self.variant_max_bytes = int(max_bytes * variant_share)
        self._stats = stats
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, oldest first
        self._bytes = 0
        #: The variants of the index, oldest first, and their total size.
        self._variants: OrderedDict[str, int] = OrderedDict()
        self._variant_bytes = 0
        self._hot: OrderedDict[str, CacheEntry] = OrderedDict()
        self._hot_bytes = 0
        self._touched: dict[str, float] = {}
        #: Temporary files found on disk that are not known abandoned: path -> size.
        self._temps: dict[str, int] = {}
        self._swept_at = 0.0
        self._touch_interval = touch_interval
        # Reads and writes on threads of their own: a lookup must never queue behind a
        # write (nor behind the default executor's other work).
        self._readers = ThreadPoolExecutor(
            max_workers=READ_THREADS, thread_name_prefix="cache-read"
        )
        self._writers = ThreadPoolExecutor(
            max_workers=WRITE_THREADS, thread_name_prefix="cache-write"
        )
        #: Entry directories made (or found) by this instance: made once, not per write.
        self._made: set[Path] = set()

    @staticmethod
    async def _in(executor: ThreadPoolExecutor, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)

    # Start

    def open(self) -> None:
        """Create the directory, remove stale temporary files, rebuild the index.

        Disk errors are logged and counted, never raised: the server then runs
        without entries and tries again on each write.
        """
        started = time.perf_counter()
        temps: dict[str, int] = {}
        try:
            (self.directory / _TEMP_DIR).mkdir(parents=True, exist_ok=True)
            temps = self._sweep_temporaries()
            found = list(self._scan())
        except OSError as exc:
            self._disk_error("open", exc)
            found = []
        found.sort(key=lambda item: item[1])
        self._index = OrderedDict((key, size) for key, _, size in found)
        self._bytes = sum(self._index.values())
        self._variants = OrderedDict((key, size) for key, _, size in found if is_variant(key))
        self._variant_bytes = sum(self._variants.values())
        self._temps = {}
        self._count_temporaries(temps)
        self._evict()
        self._publish()
        logger.info(
            "cache: %d entries, %.1f MB in %s (indexed in %.0f ms)",
            len(self._index),
            self._bytes / 2**20,
            self.directory,
            (time.perf_counter() - started) * 1000,
        )

    def _sweep_temporaries(self) -> dict[str, int]:
        """Remove abandoned temporary files; the others' sizes, by path (in a thread)."""
        kept = {}
        now = time.time()
        with os.scandir(self.directory / _TEMP_DIR) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    if _abandoned(entry.name, now - stat.st_mtime):
                        os.unlink(entry.path)
                        logger.info("cache: removed abandoned temporary file %s", entry.name)
                    else:
                        kept[entry.path] = stat.st_size
        return kept

    def _count_temporaries(self, temps: dict[str, int]) -> None:
        """Count ``temps`` (and no longer the ones of the last sweep) in the cache's size."""
        self._bytes += sum(temps.values()) - sum(self._temps.values())
        self._temps = temps
        self._swept_at = time.monotonic()
        self._publish()

    async def sweep(self) -> None:
        """Remove abandoned temporary files now and count the others (disk errors logged)."""
        try:
            self._count_temporaries(await self._in(self._writers, self._sweep_temporaries))
        except OSError as exc:
            self._disk_error("sweep", exc)

    def _scan(self) -> list[tuple[str, float, int]]:
        found = []
        with os.scandir(self.directory) as shards:
            for shard in shards:
                if len(shard.name) != 2 or not shard.is_dir():
                    continue
                with os.scandir(shard.path) as files:
                    for file in files:
                        if file.name.endswith(_SUFFIX):
                            with contextlib.suppress(FileNotFoundError):
                                stat = file.stat()
                                found.append(
                                    (file.name[: -len(_SUFFIX)], stat.st_mtime, stat.st_size)
                                )
        return found

    # Reads

    def holds(self, key: str) -> bool:
        """Whether there is an entry for ``key`` (in memory, or a file: a stat, no read)."""
        if key in self._hot:
            return True
        try:
            os.stat(self._path(key))
        except OSError:
            return False
        return True

    async def get(self, key: str) -> CacheEntry | None:
        """The entry for ``key``, or ``None``; a damaged entry is dropped and counted."""
        hot = self._hot.get(key)
        if hot is not None:
            self._hot.move_to_end(key)
            if key in self._index:
                self._index.move_to_end(key)
                if key in self._variants:
                    self._variants.move_to_end(key)
            self._touch_later(key)
            return hot
        try:
            # A miss is answered without a thread: a stat of a local file takes
            # microseconds, while a thread hop under load waits for the GIL.
            os.stat(self._path(key))
        except FileNotFoundError:
            self._forget(key)
            return None
        except OSError as exc:
            self._disk_error("read", exc)
            return None
        try:
            entry, size = await self._in(self._readers, self._read, key)
        except FileNotFoundError:
            self._forget(key)
            return None
        except CorruptEntry as exc:
            logger.warning("cache: dropped corrupt entry %s: %s", key[:12], exc)
            self._stats.cache_errors += 1
            await self._in(self._writers, self._unlink, key)
            self._forget(key)
            return None
        except OSError as exc:
            self._disk_error("read", exc)
            return None
        self._remember(key, size)
        self._keep_hot(key, entry)
        self._touched[key] = time.monotonic()
        return entry

    def _keep_hot(self, key: str, entry: CacheEntry) -> None:
        if len(entry.audio) > self.memory_bytes:
            return
        old = self._hot.pop(key, None)
        self._hot_bytes += len(entry.audio) - (len(old.audio) if old else 0)
        self._hot[key] = entry
        while self._hot_bytes > self.memory_bytes:
            _, dropped = self._hot.popitem(last=False)
            self._hot_bytes -= len(dropped.audio)

    def _drop_hot(self, key: str) -> None:
        dropped = self._hot.pop(key, None)
        if dropped is not None:
            self._hot_bytes -= len(dropped.audio)
        self._touched.pop(key, None)

    def _touch_later(self, key: str) -> None:
        """Record a hit on disk (the mtime) at most once per touch interval, off the loop."""
        now = time.monotonic()
        if now - self._touched.get(key, 0.0) < self._touch_interval:
            return
        self._touched[key] = now
        path = self._path(key)
        asyncio.get_running_loop().run_in_executor(self._writers, _touch, path)

    def _read(self, key: str) -> tuple[CacheEntry, int]:
        path = self._path(key)
        data = path.read_bytes()
        entry = _decode(data)
        # A hit is a use: the modification time is the recency that survives restarts.
        with contextlib.suppress(OSError):
            os.utime(path)
        return entry, len(data)

    # Writes

    async def put(self, key: str, entry: CacheEntry) -> bytes | None:
        """Store ``entry`` atomically, then evict down to the size cap; disk errors are
        logged. The stored bytes (:func:`encode_entry`), or ``None`` if none were."""
        try:
            # Encoding hashes the audio (about 0.3 ms for a sentence): in the writer
            # thread, which hashlib lets run without the GIL, not on the loop.
            data = await self._in(self._writers, self._write, key, entry)
        except OSError as exc:
            self._disk_error("write", exc)
            return None
        self._remember(key, len(data))
        self._keep_hot(key, entry)
        self._touched[key] = time.monotonic()
        if time.monotonic() - self._swept_at > TEMP_SWEEP_SECONDS:
            self._swept_at = time.monotonic()
            await self.sweep()
        victims = self._victims()
        if victims:
            await self._in(self._writers, self._unlink_all, victims)
        return data

    def _write(self, key: str, entry: CacheEntry) -> bytes:
        data = _encode(entry)
        path = self._path(key)
        try:
            self._write_file(path, data)
        except FileNotFoundError:
            # A directory went away (the cache was emptied by hand): make it again.
            self._made.discard(path.parent)
            self._write_file(path, data)
        return data

    def _write_file(self, path: Path, data: bytes) -> None:
        """Write ``data`` as ``path``: a temporary file, renamed into place."""
        parent = path.parent
        if parent not in self._made:
            (self.directory / _TEMP_DIR).mkdir(parents=True, exist_ok=True)
            parent.mkdir(parents=True, exist_ok=True)
            self._made.add(parent)
        temp = f"{self.directory}/{_TEMP_DIR}/{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.part"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    # Index

    @property
    def entries(self) -> int:
        return len(self._index)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    @property
    def variant_bytes(self) -> int:
        """What the variants take of :attr:`total_bytes`."""
        return self._variant_bytes

    def _remember(self, key: str, size: int) -> None:
        self._bytes += size - self._index.get(key, 0)
        self._index[key] = size
        self._index.move_to_end(key)
        if is_variant(key):
            self._variant_bytes += size - self._variants.get(key, 0)
            self._variants[key] = size
            self._variants.move_to_end(key)
        self._publish()

    def _forget(self, key: str) -> None:
        self._bytes -= self._index.pop(key, 0)
        self._variant_bytes -= self._variants.pop(key, 0)
        self._drop_hot(key)
        self._publish()

    def _victims(self) -> list[str]:
        """Take least-recently-used keys off the index until it fits the cap: variants
        first while they are over their share."""
        victims = []
        while self._variant_bytes > self.variant_max_bytes and self._variants:
            key, size = self._variants.popitem(last=False)
            self._variant_bytes -= size
            self._bytes -= self._index.pop(key, 0)
            self._drop_hot(key)
            victims.append(key)
        while self._bytes > self.max_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._bytes -= size
            self._variant_bytes -= self._variants.pop(key, 0)
            self._drop_hot(key)
            victims.append(key)
        self._stats.cache_evictions += len(victims)
        self._publish()
        return victims

    def _evict(self) -> None:
        self._unlink_all(self._victims())

    def _unlink_all(self, keys: list[str]) -> None:
        for key in keys:
            self._unlink(key)
            logger.debug("cache: evicted %s", key[:12])

    def _unlink(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self._path(key).unlink()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}{_SUFFIX}"

    def _publish(self) -> None:
        self._stats.cache_entries = len(self._index)
        self._stats.cache_bytes = self._bytes

    def _disk_error(self, operation: str, exc: OSError) -> None:
        self._stats.cache_errors += 1
        logger.warning(
            "cache: %s failed in %s: %s",
            operation,
            self.directory,
            exc.strerror or type(exc).__name__,
        )


def _abandoned(name: str, age: float) -> bool:
    """Whether a temporary file ``age`` seconds old is one no writer will finish."""
    if age > STALE_TEMP_SECONDS:
        return True
    parts = name.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return age > ABANDONED_TEMP_SECONDS  # not a name this module makes
    pid = int(parts[1])
    if pid == os.getpid():
        # Ours, or a previous life's (containers reuse ids): none of our writes takes
        # a sweep's period.
        return age > TEMP_SWEEP_SECONDS
    return age > ABANDONED_TEMP_SECONDS and not _running(pid)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (in this process-id namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it runs, as another user
    return True


def encode_entry(entry: CacheEntry) -> bytes:
    """An entry as stored: header, description (with the audio's SHA-256), audio."""
    return _encode(entry)


def decode_entry(data: bytes) -> CacheEntry:
    """An entry from what :func:`encode_entry` made.

    Raises:
        CorruptEntry: It is not whole, or its audio fails its checksum.
    """
    return _decode(data)


class SharedTier(Protocol):
    """Entries shared by a cluster's instances, behind the disk (``cluster/`` implements it)."""

    async def find_or_claim(self, key: str) -> tuple[CacheEntry | None, bool | None]:
        """The entry (``None``: missing, damaged, or the tier unavailable); when there is
        none, whether this instance now owns the cluster's flight of ``key`` (``None``:
        not known), asked in the same round trip."""

    async def hit_then_find_or_claim(
        self, ip: str, limit: int, window: float, key: str
    ) -> tuple[int | None, CacheEntry | None, bool | None]:
        """A request of ``ip`` counted in the cluster's rate window (as
        :meth:`~ttsstream.core.ratelimit.SharedLimiter.hit`) and, if it is within it,
        :meth:`find_or_claim` of ``key``, in the same round trip: the seconds to wait
        (then nothing was looked up), or ``None`` with the entry and the claim.

        Raises:
            LimiterUnavailable: The tier cannot answer; the caller decides alone.
        """

    def put(
        self, key: str, entry: CacheEntry, data: bytes | None = None, *, settles: bool = False
    ) -> None:
        """Keep ``entry`` for the other instances (in the background); ``data`` is its
        :func:`encode_entry`, when the disk made it already. With ``settles``, the
        cluster flight of ``key`` that made it (this instance's) is given back in the
        same round trip."""


def _encode(entry: CacheEntry) -> bytes:
    description = orjson.dumps(
        {
            "engine": entry.engine,
            "voice": entry.voice,
            "audio_bytes": len(entry.audio),
            "audio_sha256": hashlib.sha256(entry.audio).hexdigest(),
            "words": [
                [w.text, w.offset_ms, w.duration_ms, w.char_start, w.char_end] for w in entry.words
            ],
            # Only for a format made from the MP3: MP3 entries stay as they were.
            **({} if entry.audio_ms is None else {"audio_ms": entry.audio_ms}),
        }
    )
    return _HEADER.pack(_MAGIC, FORMAT_VERSION, len(description)) + description + entry.audio


def _decode(data: bytes) -> CacheEntry:
    if len(data) < _HEADER.size:
        raise CorruptEntry("shorter than its header")
    magic, version, length = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != FORMAT_VERSION:
        raise CorruptEntry("not an entry of this format")
    start = _HEADER.size + length
    try:
        description = orjson.loads(data[_HEADER.size : start])
        audio = data[start:]
        if len(audio) != description["audio_bytes"]:
            raise CorruptEntry(f"audio has {len(audio)} of {description['audio_bytes']} bytes")
        if hashlib.sha256(audio).hexdigest() != description["audio_sha256"]:
            raise CorruptEntry("audio checksum mismatch")
        words = tuple(
            WordEvent(text, float(offset), float(duration), start_char, end_char)
            for text, offset, duration, start_char, end_char in description["words"]
        )
        return CacheEntry(
            engine=str(description["engine"]),
            voice=str(description["voice"]),
            audio=audio,
            words=words,
            audio_ms=None
            if description.get("audio_ms") is None
            else float(description["audio_ms"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CorruptEntry(f"bad description: {type(exc).__name__}") from None


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)
