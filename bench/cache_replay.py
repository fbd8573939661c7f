"""Benchmark: cache-hit time to first audio byte, and to the last, at 1, 50 and 500 clients.

Every client asks for the same cached text at the same moment (a burst), from load
processes apart from the server. It reuses bench/run.py's processes and load
clients; bench/run.py's replay scenario measures clients speaking about once a
second instead.

    .venv/bin/python bench/cache_replay.py            # 1, 50, 500 clients, 5 rounds
    .venv/bin/python bench/cache_replay.py --quick    # a few seconds, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile

from run import TEXT, Bench, load, percentile, split, start_fake, stop


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run for CI")
    args = parser.parse_args()
    levels, rounds = ((1, 10), 1) if args.quick else ((1, 50, 500), 5)
    fake = await start_fake()
    wss, voices = fake.match.split()
    bench = Bench(quick=args.quick, fake_urls=(wss, voices))
    with tempfile.TemporaryDirectory() as cache:
        server, url = await bench.server(cache)
        try:
            (warm,) = await load(
                [{"mode": "speak", "url": url, "clients": 1, "requests": 1, "texts": [TEXT]}]
            )
            assert not warm["results"][0]["cached"]
            await asyncio.sleep(0.3)  # let the entry reach the disk
            print(
                f"Cache-hit replay burst, {len(TEXT)} characters, {os.cpu_count()} CPUs, "
                f"Python {platform.python_version()}, {rounds} rounds per row\n"
            )
            print("| clients | first byte p50 | first byte p99 | last byte p50 | last byte p99 |")
            print("|---:|---:|---:|---:|---:|")
            for clients in levels:
                results = []
                for _ in range(rounds):
                    specs = [
                        {"mode": "speak", "url": url, "clients": n, "requests": 1, "texts": [TEXT]}
                        for n in split(clients, min(2, clients))
                    ]
                    results += [r for output in await load(specs) for r in output["results"]]
                assert all(r.get("cached") for r in results), results[:3]
                firsts = [r["ttfb"] * 1000 for r in results]
                lasts = [r["ttlb"] * 1000 for r in results]
                cells = [
                    f"{percentile(values, fraction):.2f} ms"
                    for values in (firsts, lasts)
                    for fraction in (0.5, 0.99)
                ]
                print(f"| {clients} | " + " | ".join(cells) + " |")
        finally:
            await stop(server)
            await stop(fake)


if __name__ == "__main__":
    asyncio.run(main())
