"""Benchmark: how long the cache index takes to rebuild at start, for N entries.

Writes N small entries straight into a temporary cache directory (as DiskCache
would), then times ``DiskCache.open()``: the directory scan, stale-temporary
sweep and index build that every start does.

    .venv/bin/python bench/cache_index.py              # 100,000 entries
    .venv/bin/python bench/cache_index.py --entries 1000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from ttsstream.cache.store import CacheEntry, DiskCache, _encode, cache_key
from ttsstream.engines.base import MP3_24KHZ_48KBPS, WordEvent
from ttsstream.stats import Stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    args = parser.parse_args()
    data = _encode(
        CacheEntry("edge", "en-US-AriaNeural", b"\xff\xf3" * 3000, (WordEvent("Hi", 0, 100, 0, 2),))
    )
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        started = time.perf_counter()
        for index in range(args.entries):
            key = cache_key(
                engine="edge",
                voice="v",
                rate="+0%",
                volume="+0%",
                pitch="+0Hz",
                audio_format=MP3_24KHZ_48KBPS,
                text=str(index),
            )
            shard = root / key[:2]
            shard.mkdir(exist_ok=True)
            (shard / f"{key}.tts").write_bytes(data)
        written = time.perf_counter() - started
        timings = []
        for _ in range(3):
            stats = Stats()
            cache = DiskCache(root, max_bytes=2**40, stats=stats)
            started = time.perf_counter()
            cache.open()
            timings.append(time.perf_counter() - started)
            assert stats.cache_entries == args.entries
        print(
            f"{args.entries} entries ({len(data) * args.entries / 2**20:.0f} MB, written in "
            f"{written:.1f} s): index rebuilt in {min(timings) * 1000:.0f} ms best, "
            f"{max(timings) * 1000:.0f} ms worst of 3 ({os.cpu_count()} CPUs)"
        )


if __name__ == "__main__":
    main()
