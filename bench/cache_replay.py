"""Benchmark: cache-hit time to first audio byte, and to the last, at 1, 50 and 500 clients.

Everything runs on 127.0.0.1: the fake Edge service and the server are separate
processes; the clients run here. One text is synthesized once (a miss), then
every client asks for it at the same moment; each measures from sending its
``speak`` to its first binary frame, and to its ``end``.

    .venv/bin/python bench/cache_replay.py            # 1, 50, 500 clients, 5 rounds
    .venv/bin/python bench/cache_replay.py --quick    # a few seconds, for CI

Prints a Markdown table; timings depend on the machine, so compare runs made on
the same machine at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import orjson
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
TEXT = " ".join(["This sentence is replayed from the cache to many clients at once."] * 4)


async def start(
    args: list[str], env: dict[str, str], pattern: str
) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        *args, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    streams = [process.stdout, process.stderr]
    while True:
        for stream in streams:
            try:
                line = (await asyncio.wait_for(stream.readline(), 0.2)).decode()
            except TimeoutError:
                continue
            if match := re.search(pattern, line):
                return process, match.group(1)
            if not line and process.returncode is not None:
                raise RuntimeError(f"{args} exited")


async def speak(ws: ClientConnection, index: int) -> tuple[float, float, bool]:
    started = time.perf_counter()
    await ws.send(orjson.dumps({"type": "speak", "id": f"b{index}", "text": TEXT}).decode())
    first = None
    cached = False
    while True:
        frame = await ws.recv()
        if isinstance(frame, bytes):
            if first is None:
                first = time.perf_counter() - started
            continue
        message = orjson.loads(frame)
        if message["type"] == "start":
            cached = message["cached"]
        elif message["type"] == "end":
            assert first is not None
            return first, time.perf_counter() - started, cached
        elif message["type"] == "error":
            raise RuntimeError(message)


async def round_of(url: str, clients: int) -> list[tuple[float, float, bool]]:
    connections = [await connect(url, compression=None, max_size=None) for _ in range(clients)]
    try:
        for ws in connections:
            await ws.recv()  # hello
        return await asyncio.gather(*(speak(ws, i) for i, ws in enumerate(connections)))
    finally:
        await asyncio.gather(*(ws.close() for ws in connections))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run for CI")
    args = parser.parse_args()
    levels, rounds = ((1, 10), 1) if args.quick else ((1, 50, 500), 5)

    with tempfile.TemporaryDirectory() as cache_dir:
        fake, fake_urls = await start(
            [sys.executable, "-c", "from tests.fake_edge import serve_forever; serve_forever()"],
            dict(os.environ, PYTHONPATH=str(ROOT)),
            r"^(\S+ \S+)$",
        )
        wss_url, voices_url = fake_urls.split()
        env = dict(
            os.environ,
            HOST="127.0.0.1",
            PORT="0",
            EDGE_WSS_URL=wss_url,
            EDGE_VOICES_URL=voices_url,
            CACHE_DIR=cache_dir,
            LOG_LEVEL="INFO",
        )
        server, port = await start(
            [sys.executable, "-m", "ttsstream", "serve"], env, r"listening on 127\.0\.0\.1:(\d+)"
        )
        # The server logs every utterance; keep reading so its pipe never fills.
        assert server.stderr is not None
        drain = asyncio.create_task(server.stderr.read())
        url = f"ws://127.0.0.1:{port}/v1/stream"
        try:
            ((first, _, cached),) = await round_of(url, 1)
            assert not cached
            print(f"miss (live synthesis): first byte {first * 1000:.2f} ms\n")
            await asyncio.sleep(0.2)  # let the entry reach the disk
            print(
                f"Cache-hit replay, {len(TEXT)} characters, {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}, {rounds} rounds per row\n"
            )
            print("| clients | first byte p50 | first byte p99 | last byte p50 | last byte p99 |")
            print("|---:|---:|---:|---:|---:|")
            for clients in levels:
                results = []
                for _ in range(rounds):
                    results += await round_of(url, clients)
                assert all(cached for _, _, cached in results)
                firsts = [r[0] * 1000 for r in results]
                lasts = [r[1] * 1000 for r in results]
                cells = [
                    f"{percentile(values, fraction):.2f} ms"
                    for values in (firsts, lasts)
                    for fraction in (0.5, 0.99)
                ]
                print(f"| {clients} | " + " | ".join(cells) + " |")
        finally:
            for process in (server, fake):
                process.terminate()
                await process.wait()
            drain.cancel()


if __name__ == "__main__":
    asyncio.run(main())
