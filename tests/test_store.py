"""The disk cache on its own: entries, eviction, restarts, damage, crashes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TIMEOUT, eventually
from ttsstream.cache.store import (
    ABANDONED_TEMP_SECONDS,
    STALE_TEMP_SECONDS,
    CacheEntry,
    DiskCache,
    cache_key,
    variant_key,
)
from ttsstream.engines.base import MP3_24KHZ_48KBPS, WordEvent
from ttsstream.stats import Stats

WORDS = (WordEvent("Hello", 100.0, 300.0, 0, 5), WordEvent("world", 450.0, 310.5, 7, 12))


def entry(size: int = 1000, fill: bytes = b"a") -> CacheEntry:
    return CacheEntry(engine="edge", voice="en-US-AriaNeural", audio=fill * size, words=WORDS)


def key(text: str, **changes: str) -> str:
    fields = {"engine": "edge", "voice": "v", "rate": "+0%", "volume": "+0%", "pitch": "+0Hz"}
    fields.update(changes)
    return cache_key(audio_format=MP3_24KHZ_48KBPS, text=text, **fields)


#: The size on disk of one entry().
ENTRY_BYTES = 1000 + 217


def opened(
    directory: Path, max_bytes: int = 2**30, memory_bytes: int = 0
) -> tuple[DiskCache, Stats]:
    """A cache on ``directory``; by default without the in-memory layer, to test the disk."""
    stats = Stats()
    cache = DiskCache(directory, max_bytes=max_bytes, stats=stats, memory_bytes=memory_bytes)
    cache.open()
    return cache, stats


def test_key_covers_every_input() -> None:
    """The same inputs give the same key; any change gives another."""
    base = key("Hello")
    assert base == key("Hello") and len(base) == 64
    variants = {
        key("Hello "),
        key("hello"),
        key("Hello", engine="espeak"),
        key("Hello", voice="w"),
        key("Hello", rate="+1%"),
        key("Hello", volume="-1%"),
        key("Hello", pitch="+1Hz"),
    }
    assert base not in variants and len(variants) == 7


async def test_put_then_get_round_trips(tmp_path: Path) -> None:
    """An entry comes back byte for byte, words included, and is counted."""
    cache, stats = opened(tmp_path)
    stored = entry(fill=b"\xff\xf3xyz")
    await cache.put(key("a"), stored)
    assert await cache.get(key("a")) == stored
    assert await cache.get(key("b")) is None
    assert list(tmp_path.glob("*/*.tts")) == [tmp_path / key("a")[:2] / f"{key('a')}.tts"]
    assert list((tmp_path / "tmp").iterdir()) == []
    await cache.put(key("c"), entry())
    assert (stats.cache_entries, stats.cache_bytes) == (2, cache.total_bytes)
    assert cache.total_bytes == ENTRY_BYTES + len(stored.audio) + 217


async def test_least_recently_used_is_evicted_first(tmp_path: Path) -> None:
    """Over the cap, the entry used longest ago goes first; a hit counts as use."""
    cache, stats = opened(tmp_path, max_bytes=int(ENTRY_BYTES * 3.5))
    for name in ("a", "b", "c"):
        await cache.put(key(name), entry())
    assert await cache.get(key("a")) is not None  # a is now the most recent
    await cache.put(key("d"), entry())
    assert await cache.get(key("b")) is None
    assert all([await cache.get(key(n)) is not None for n in ("a", "c", "d")])
    assert cache.total_bytes <= ENTRY_BYTES * 3.5
    assert stats.cache_evictions == 1
    assert len(list(tmp_path.glob("*/*.tts"))) == 3


async def test_variants_push_out_at_most_their_share_of_entries(tmp_path: Path) -> None:
    """Formats made from the MP3 take at most a quarter of the cache: past it their own
    least recently used go first, so MP3 entries keep three quarters of the room, before
    and after a restart."""
    cache, _ = opened(tmp_path, max_bytes=ENTRY_BYTES * 8)
    assert cache.variant_max_bytes == ENTRY_BYTES * 2
    sources = [key(f"text {number}") for number in range(8)]
    for source in sources:
        await cache.put(source, entry())
    for round_ in range(3):
        for source in sources:
            await cache.put(variant_key(source, "opus"), entry(fill=b"v"))
            assert cache.variant_bytes <= cache.variant_max_bytes
            assert cache.total_bytes <= cache.max_bytes
        kept = [source for source in sources if await cache.get(source) is not None]
        # Six MP3s keep their room; the two oldest made way for two variants.
        assert kept == sources[2:], round_
    variants = {path.name for path in tmp_path.glob("*/*-opus.tts")}
    assert variants == {f"{variant_key(sources[n], 'opus')}.tts" for n in (6, 7)}
    restarted, _ = opened(tmp_path, max_bytes=ENTRY_BYTES * 8)
    assert restarted.variant_bytes == 2 * ENTRY_BYTES
    await restarted.put(variant_key(sources[2], "aac"), entry(fill=b"v"))
    assert await restarted.get(sources[2]) is not None
    assert await restarted.get(variant_key(sources[6], "opus")) is None


async def test_restart_keeps_entries_and_recency(tmp_path: Path) -> None:
    """A new instance finds the entries and evicts in the order of last use before it."""
    cache, _ = opened(tmp_path)
    for name in ("a", "b", "c"):
        await cache.put(key(name), entry())
        time.sleep(0.01)
    await cache.get(key("a"))

    restarted, stats = opened(tmp_path, max_bytes=int(ENTRY_BYTES * 2.5))
    assert stats.cache_entries == 2 and stats.cache_evictions == 1
    assert await restarted.get(key("b")) is None  # b was the least recently used
    assert await restarted.get(key("a")) is not None
    assert await restarted.get(key("c")) is not None


async def test_size_bound_applies_at_start(tmp_path: Path) -> None:
    """Lowering the cap below what is on disk evicts down to it at start."""
    cache, _ = opened(tmp_path)
    for name in "abcdef":
        await cache.put(key(name), entry())
    smaller, stats = opened(tmp_path, max_bytes=int(ENTRY_BYTES * 2.5))
    assert smaller.total_bytes <= ENTRY_BYTES * 2.5
    assert stats.cache_entries == len(list(tmp_path.glob("*/*.tts"))) == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) - 10],  # truncated MP3
        lambda data: data[:20],  # truncated description
        lambda data: data[:9] + b"{not json" + data[18:],  # bad JSON
        lambda data: data[:-1] + bytes([data[-1] ^ 1]),  # one bit of audio flipped
        lambda data: b"",  # empty file
        lambda data: b"GIF89a" + data,  # not an entry at all
        # What a power failure may leave of an entry written just before (not fsynced).
        lambda data: bytes(len(data)),
        lambda data: data[: len(data) // 2] + bytes(len(data) - len(data) // 2),
    ],
    ids=[
        "truncated_audio",
        "truncated_header",
        "bad_json",
        "bit_flip",
        "empty",
        "foreign",
        "zeroed",
        "half_zeroed",
    ],
)
async def test_corrupt_entry_is_dropped_and_counted(tmp_path: Path, damage: object) -> None:
    """A damaged entry reads as a miss, is deleted and counted; a new put replaces it."""
    cache, stats = opened(tmp_path)
    await cache.put(key("a"), entry())
    path = tmp_path / key("a")[:2] / f"{key('a')}.tts"
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    assert await cache.get(key("a")) is None
    assert not path.exists()
    assert stats.cache_errors == 1 and stats.cache_entries == 0
    await cache.put(key("a"), entry())
    assert await cache.get(key("a")) == entry()


async def test_a_cache_emptied_by_hand_is_written_again(tmp_path: Path) -> None:
    """Directories are made once, not per write: if an operator empties the cache
    directory while the server runs, the next write makes them again."""
    cache, stats = opened(tmp_path)
    await cache.put(key("a"), entry())
    for child in tmp_path.iterdir():
        shutil.rmtree(child)
    await cache.put(key("b"), entry())
    await cache.put(key("a"), entry())
    assert (tmp_path / key("b")[:2] / f"{key('b')}.tts").is_file()
    assert (tmp_path / key("a")[:2] / f"{key('a')}.tts").is_file()
    assert stats.cache_errors == 0
    reopened, _ = opened(tmp_path)
    assert await reopened.get(key("a")) == entry()
    assert await reopened.get(key("b")) == entry()


async def test_unusable_directory_never_raises(tmp_path: Path) -> None:
    """A cache directory that cannot exist (a file is in the way) fails quietly: misses, counts."""
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    cache, stats = opened(blocker / "cache")
    await cache.put(key("a"), entry())
    assert await cache.get(key("a")) is None
    assert stats.cache_errors >= 2 and stats.cache_entries == 0


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_abandoned_temporaries_are_removed_and_counted_until_then(tmp_path: Path) -> None:
    """A temporary file whose writer died is removed at the next start, however soon that
    comes; one of a writer still running is left, and counted in the cache's size until
    a sweep finds it abandoned; a very old one goes whoever wrote it."""
    opened(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        temp = tmp_path / "tmp"
        crashed = temp / f"{key('a')}.{gone.pid}.aa.part"
        writing = temp / f"{key('b')}.{running.pid}.bb.part"
        ancient = temp / f"{key('c')}.{running.pid}.cc.part"
        for path in (crashed, writing, ancient):
            path.write_bytes(b"x" * 1000)
        _age(crashed, ABANDONED_TEMP_SECONDS + 1)
        _age(ancient, STALE_TEMP_SECONDS + 1)
        cache, stats = opened(tmp_path)
        assert sorted(temp.iterdir()) == [writing]
        assert cache.total_bytes == stats.cache_bytes == 1000
        # The writer dies too: the next sweep removes its file and stops counting it.
        running.kill()
        running.wait()
        _age(writing, ABANDONED_TEMP_SECONDS + 1)
        await cache.sweep()
        assert list(temp.iterdir()) == []
        assert cache.total_bytes == stats.cache_bytes == 0
    finally:
        running.kill()
        running.wait()


WRITER = """
import asyncio, sys
from pathlib import Path
from ttsstream.stats import Stats
from ttsstream.cache.store import CacheEntry, DiskCache
cache = DiskCache(Path(sys.argv[1]), max_bytes=2**40, stats=Stats())
cache.open()
print("ready", flush=True)
audio = bytes(range(256)) * (int(sys.argv[3]) // 256)
asyncio.run(cache.put(sys.argv[2], CacheEntry("edge", "v", audio, ())))
print("written", flush=True)
"""


async def test_kill_9_mid_write_leaves_no_half_entry(tmp_path: Path) -> None:
    """A writer killed at any moment leaves either no entry or a whole one, never a part."""
    killed_mid_write = 0
    for attempt in range(5):
        target = key(f"big {attempt}")
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), target, str(64 * 2**20)],
            stdout=subprocess.PIPE,
        )
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + TIMEOUT
        while not any((tmp_path / "tmp").iterdir()) and time.monotonic() < deadline:
            await asyncio.sleep(0.001 * attempt)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        temporaries = list((tmp_path / "tmp").iterdir())
        killed_mid_write += bool(temporaries)
        for temporary in temporaries:
            _age(temporary, ABANDONED_TEMP_SECONDS + 1)  # the restart is not instantaneous

        cache, stats = opened(tmp_path)
        found = await cache.get(target)
        assert found is None or len(found.audio) == 64 * 2**20
        assert stats.cache_errors == 0  # nothing visible was damaged
        assert list((tmp_path / "tmp").iterdir()) == []
    assert killed_mid_write >= 1


RACER = """
import asyncio, sys
from pathlib import Path
from ttsstream.stats import Stats
from ttsstream.cache.store import CacheEntry, DiskCache
from tests.conftest import entries
cache = DiskCache(Path(sys.argv[1]), max_bytes=2**40, stats=Stats())
cache.open()
fill = sys.argv[3].encode()
async def main():
    for round in range(200):
        await cache.put(sys.argv[2], CacheEntry("edge", "v", fill * (1000 + round), ()))
asyncio.run(main())
"""


async def test_two_processes_writing_one_key_leave_one_valid_entry(tmp_path: Path) -> None:
    """Two instances sharing the directory and storing the same key at once end with
    exactly one whole entry and no temporary files."""
    target = key("shared by two instances")
    writers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", RACER, str(tmp_path), target, fill
        )
        for fill in ("a", "b")
    ]
    assert [await asyncio.wait_for(w.wait(), TIMEOUT * 4) for w in writers] == [0, 0]
    files = list(tmp_path.glob("*/*.tts"))
    assert files == [tmp_path / target[:2] / f"{target}.tts"]
    assert list((tmp_path / "tmp").iterdir()) == []
    cache, stats = opened(tmp_path)
    found = await cache.get(target)
    assert found is not None and stats.cache_errors == 0
    assert set(found.audio) in ({ord("a")}, {ord("b")}) and len(found.audio) == 1199


async def test_hot_entries_are_served_from_memory(tmp_path: Path) -> None:
    """Recently used entries are served from memory (even with the file gone), within the
    memory bound, and their hits still reach the file's recency."""
    stats = Stats()
    cache = DiskCache(tmp_path, max_bytes=2**30, stats=stats, memory_bytes=2500, touch_interval=0)
    cache.open()
    for name in ("a", "b", "c"):
        await cache.put(key(name), entry())  # 1000 audio bytes each: only two fit
    path_c = tmp_path / key("c")[:2] / f"{key('c')}.tts"
    old = time.time() - 3600
    os.utime(path_c, (old, old))
    assert await cache.get(key("c")) == entry()
    # The hit is recorded on disk, by a thread.
    await eventually(lambda: path_c.stat().st_mtime > old, what="c's hit recorded")
    path_c.unlink()
    assert await cache.get(key("c")) == entry()  # from memory
    path_a = tmp_path / key("a")[:2] / f"{key('a')}.tts"
    path_a.unlink()
    assert await cache.get(key("a")) is None  # evicted from memory by the bound: a disk miss
