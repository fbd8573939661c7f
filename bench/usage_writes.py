"""Scenario 11's micro-measures: what the tenants' accounting costs, apart from a server.

Three measures, each over a bounded number of iterations, on one event loop (uvloop
when installed, as the server runs):

  add     ``SqliteUsage.add`` sustained: batches as ``Usage.flush`` makes them (one
          row per tenant, day and door: ``tenants`` × ``doors`` rows), written back to
          back into a new file (the first batch inserts, the others update, as a
          server's batches do within a day); tally rows a second, ms per batch, and
          how late a 1 ms timer on the same loop fired meanwhile, and on the idle
          loop before (aiosqlite writes in its own thread, which shares the GIL)
  record  ``Usage.record`` calls a second on the loop (ms per 10,000), spread over
          the same tenants and doors
  charge  ``Usage.charge`` as an utterance makes it: a check (``check_only``), then
          the charge, against a tenant with both quotas whose counts are loaded;
          µs per pair

    python bench/usage_writes.py SPEC_JSON     prints one JSON line of results

SPEC_JSON: ``{"tenants": 100, "doors": 7, "batches": 50, "records": 20}`` (records:
rounds of 10,000 records; charges: rounds of 10,000 pairs).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ttsstream.core.context import Principal, RequestContext  # noqa: E402
from ttsstream.core.tenants import KeyHash, Tenant, hash_key  # noqa: E402
from ttsstream.core.usage import Tally, Usage, UsageRow, day_of  # noqa: E402
from ttsstream.usage.sqlite import SqliteUsage  # noqa: E402

#: Door labels of the rows: the server's four (ws, http, elevenlabs, cartesia), and
#: more, so that a batch can have as many rows per tenant as asked.
DOORS = ("ws", "http", "elevenlabs", "cartesia", "door4", "door5", "door6", "door7")
#: Calls per round of the record and charge measures.
ROUND = 10_000


def _tenant(number: int) -> Tenant:
    return Tenant(
        f"tenant-{number}",
        (KeyHash(hash_key(f"key-{number}")),),
        requests=10**9,
        window=60.0,
        concurrent=10**5,
        characters_per_day=10**12,
        characters_per_month=10**13,
    )


def _contexts(tenants: int, doors: int) -> list[RequestContext]:
    contexts = []
    for number in range(tenants):
        tenant = _tenant(number)
        principal = Principal(tenant.name, keyed=True, tenant=tenant, key=tenant.keys[0])
        contexts += [
            RequestContext(principal, "127.0.0.1", f"c{number}", door) for door in DOORS[:doors]
        ]
    return contexts


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def measure_add(tenants: int, doors: int, batches: int) -> dict[str, Any]:
    """``SqliteUsage.add`` with batches of ``tenants`` × ``doors`` rows, back to back."""
    day = day_of(dt.datetime.now(dt.UTC))
    rows = [
        UsageRow(f"tenant-{t}", day, DOORS[d], Tally(120, 30, 5000.0, 2, 0))
        for t in range(tenants)
        for d in range(doors)
    ]
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker(into: list[float]) -> None:
        """A 1 ms timer, as the server's other work waits on the loop: how late it fires."""
        while not done.is_set():
            asked = time.perf_counter()
            await asyncio.sleep(0.001)
            into.append((time.perf_counter() - asked - 0.001) * 1000)

    # The timer's lateness on an idle loop, for comparison.
    idle: list[float] = []
    tick = asyncio.create_task(ticker(idle))
    await asyncio.sleep(0.2)
    done.set()
    await tick
    done.clear()
    with tempfile.TemporaryDirectory() as directory:
        store = SqliteUsage(Path(directory) / "usage.sqlite3")
        try:
            await store.add(rows[:1])  # opened (WAL, schema) before the clock starts
            tick = asyncio.create_task(ticker(lags))
            times = []
            for _ in range(batches):
                started = time.perf_counter()
                await store.add(rows)
                times.append(time.perf_counter() - started)
            done.set()
            await tick
            stored = await store.rows(None, day, day)
        finally:
            await store.close()
    total = sum(times)
    written = sum(row.tally.requests for row in stored)
    assert written == 2 * len(rows) * batches + 2, written  # every batch was committed
    return {
        "rows_per_batch": len(rows),
        "batches": batches,
        "rows_per_s": len(rows) * batches / total,
        "batch_ms_p50": 1000 * statistics.median(times),
        "batch_ms_max": 1000 * max(times),
        "lag_ms_p50": _percentile(lags, 0.5),
        "lag_ms_p99": _percentile(lags, 0.99),
        "lag_ms_max": max(lags),
        "idle_lag_ms_p50": _percentile(idle, 0.5),
        "idle_lag_ms_p99": _percentile(idle, 0.99),
    }


async def measure_record(tenants: int, doors: int, rounds: int) -> dict[str, Any]:
    """``Usage.record`` on the loop, ``rounds`` × ROUND calls (flushed between rounds,
    untimed, to a store that keeps nothing)."""
    usage = Usage()
    contexts = _contexts(tenants, doors)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for number in range(ROUND):
            usage.record(
                contexts[number % len(contexts)],
                characters=74,
                cached=False,
                audio_ms=4900.0,
                error=False,
            )
        times.append(time.perf_counter() - started)
        await asyncio.sleep(0)
    return {
        "rounds": rounds,
        "ms_per_10000": 1000 * statistics.median(times) * 10_000 / ROUND,
        "ms_per_10000_max": 1000 * max(times) * 10_000 / ROUND,
        "records_per_s": ROUND * rounds / sum(times),
    }


async def measure_charge(rounds: int) -> dict[str, Any]:
    """An utterance's check and charge (``Usage.charge``), its tenant's counts loaded."""
    usage = Usage()
    tenant = _tenant(0)
    principal = Principal(tenant.name, keyed=True, tenant=tenant, key=tenant.keys[0])
    await usage.charge(principal, 74)  # the day's and month's counts loaded
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(ROUND):
            await usage.charge(principal, 74, check_only=True)
            await usage.charge(principal, 74)
        times.append(time.perf_counter() - started)
    return {
        "rounds": rounds,
        "us_per_utterance": 1e6 * statistics.median(times) / ROUND,
    }


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    tenants, doors = spec.get("tenants", 100), spec.get("doors", 7)
    return {
        "add": await measure_add(tenants, doors, spec.get("batches", 50)),
        "record": await measure_record(tenants, doors, spec.get("records", 20)),
        "charge": await measure_charge(spec.get("charges", spec.get("records", 20))),
    }


def main() -> None:
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    runner: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]] = asyncio.run
    try:
        import uvloop
    except ImportError:
        pass
    else:
        runner = uvloop.run
    print(json.dumps(runner(run(spec))), flush=True)


if __name__ == "__main__":
    main()
