"""Soak (issue 37): one server under a mixed load at about 70 % of its limit for a long time.

One server on its own core (bench/run.py's ``Bench.server``), the fake Edge service and
the load processes (bench/load.py) on the other, every client paced (it thinks THINK s
on average before each request). The mix, per unit of load (MIX): live WebSocket speaks
of new texts in mp3, opus and pcm; cached replays of a small catalogue; OpenAI's
``POST /v1/audio/speech``, new texts and a cached one; streaming input (a reply
appended a word at a time); speaks cancelled after some of their audio; and clients
that drop their TCP connection mid-utterance (no close frame), then connect again.

The limit: one process's limit is its core, fully busy. A short calibration measures
the share of the server's core the mix keeps busy at a few units and scales the units
to TARGET_BUSY (70 %) of it; then the soak runs at that many units for ``--seconds``.

Every ``interval`` seconds the server's ``/stats`` (its side port) is sampled: the
process block (RSS, open files, asyncio tasks, threads), the event loop's lag, the
outcomes and errors. Verdict: after the warm-up, RSS, open files and tasks flat (see
:func:`flatness`), and no error, the server's or the clients' (:func:`server_errors`,
:func:`tally`).

    .venv/bin/python bench/soak.py                  # 30 minutes (not in CI)
    .venv/bin/python bench/soak.py --seconds 60     # CI's short version
    .venv/bin/python bench/soak.py --seconds 60 --units 6 --out DIR

Prints the report's lines, writes soak.json to ``--out``; exits 1 when the verdict fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run import (
    OTHER_CPUS,
    ROOT,
    TEXT,
    Bench,
    Process,
    listening_ports,
    percentile,
    ready_workers,
    results_of,
    signal_workers,
    start_fake,
    stop,
    usage,
)

#: The share of the server's core the soak aims at: 70 % of the limit, a core fully busy.
TARGET_BUSY = 0.70
#: Mean seconds every client thinks before each request.
THINK = 2.0
#: Texts of the cached replays (each a miss once, then hits).
CATALOGUE = [f"Catalogue entry {n}. {TEXT}" for n in range(20)]
#: One unit of the mix: by part, its clients, and its load spec (but for the server's
#: address, the clients, the duration and the texts' offsets). Each part is one load
#: process whatever the units.
MIX: dict[str, tuple[int, dict[str, Any]]] = {
    "live_mp3": (3, {"mode": "speak", "unique": True, "words": "batch"}),
    "live_opus": (1, {"mode": "speak", "unique": True, "words": "batch", "format": "opus"}),
    "live_pcm": (1, {"mode": "speak", "unique": True, "words": "batch", "format": "pcm"}),
    "cached": (
        3,
        {"mode": "speak", "texts": CATALOGUE, "weights": [1] * len(CATALOGUE), "words": "batch"},
    ),
    "http_live": (1, {"mode": "http", "unique": True}),
    "http_cached": (1, {"mode": "http", "texts": CATALOGUE[:1]}),
    "streaming": (1, {"mode": "speak", "unique": "first", "tokens_per_s": 30}),
    # Cancelled after 2 to 12 KB of their audio (about 30 KB: TEXT's 5 s of mp3).
    "cancel": (1, {"mode": "speak", "unique": True, "words": "batch", "cancel": [2000, 12000]}),
    # Two of load.py's long_text's sentences (about 9 s of audio, 54 KB), dropped after
    # 4 to 24 KB; connected again for the next one.
    "drop": (1, {"mode": "drop", "sentences": 2, "cut": [4000, 24000]}),
}
#: Parts on the HTTP door (the others on the WebSocket's /v1/stream).
HTTP_PARTS = ("http_live", "http_cached")
#: Outcomes of an utterance that are not errors: heard whole, cancelled by its client,
#: its client gone (the drops; a dropped connection's utterance that ends while parked
#: is ``ok``).
NOT_ERRORS = frozenset({"ok", "cancelled", "disconnected"})
#: Runs shorter than this (seconds) size the server's bounded stores so that they fill
#: within the warm-up (SHORT_SETTINGS); longer ones keep the defaults but for the disk
#: cache's size (LONG_SETTINGS), which a 30-minute run fills in its first minutes.
SHORT_RUN = 600.0
SHORT_SETTINGS = {"RESUME_WINDOW": "5", "CACHE_MEMORY_MB": "4", "CACHE_MAX_SIZE_MB": "20"}
LONG_SETTINGS = {"CACHE_MAX_SIZE_MB": "100"}
#: Calibration: units of the first step, seconds of each step (short run, long run),
#: and seconds of each step before its busy share is measured (the clients' first
#: requests are spread over a think, then each thinks: the load is whole after that).
CALIBRATION_UNITS = 3
CALIBRATION_SECONDS = (12.0, 30.0)
CALIBRATION_SETTLE = 2 * THINK
#: Units at most (a bound on the calibration's guess).
MAX_UNITS = 40
#: Seconds of warm-up at least (else a fifth of the run): from a new server, RSS rises
#: for about 35 s at 16 units (the stores above filling, the allocator's high water;
#: bench/soak.py --seconds 180 --units 16), about 20 s after the calibration's load.
WARMUP = 30.0
#: Flatness after the warm-up: the mean of its last third over the mean of its first
#: third may grow by this share or this many (whichever is larger), and so may the
#: least-squares line over all its samples, end to end. RSS in MB.
ALLOWANCE = {"rss_mb": (0.10, 8.0), "open_files": (0.10, 10.0), "tasks": (0.15, 25.0)}


def _specs(
    urls: dict[str, str], units: int, duration: float, offset: int, seed: int
) -> list[dict[str, Any]]:
    specs = []
    for number, (part, (clients, spec)) in enumerate(MIX.items()):
        door = "http" if part in HTTP_PARTS else "ws"
        specs.append(
            {
                "texts": [TEXT],
                **spec,
                "part": part,
                "url": urls[door],
                "clients": clients * units,
                "duration": duration,
                "think": THINK,
                # Each client's first request within one think of the start.
                "ramp": THINK,
                "offset": offset + number * 10**7,
                "seed": seed + number,
            }
        )
    return specs


class Sampler:
    """The server's /stats on its side port (and /proc where /stats lacks the process
    block: RSS and open files, no tasks), every ``interval`` s, and the CPU of the server
    and of the other core's processes."""

    def __init__(self, server: Process, others: list[int]) -> None:
        import aiohttp

        self.pid = server.process.pid
        ws_port = int(server.match.rsplit(":", 1)[1])
        side = next(port for port in listening_ports(self.pid) if port != ws_port)
        self.url = f"http://127.0.0.1:{side}/stats"
        self.session = aiohttp.ClientSession()
        self.others = others
        self.samples: list[dict[str, Any]] = []

    async def close(self) -> None:
        await self.session.close()

    def other_cpu(self) -> float:
        total = 0.0
        for pid in self.others:
            with contextlib.suppress(OSError, AttributeError):  # a load process that ended
                total += usage(pid)[0]
        return total

    async def sample(self, t: float) -> dict[str, Any]:
        async with self.session.get(self.url) as response:
            stats: dict[str, Any] = await response.json()
        cpu, rss, _ = usage(self.pid)
        process = stats.get("process") or {
            "rss_bytes": rss,
            "open_files": len(os.listdir(f"/proc/{self.pid}/fd")),
            "tasks": None,
            "threads": int(
                re.search(  # type: ignore[union-attr]
                    r"Threads:\s+(\d+)", Path(f"/proc/{self.pid}/status").read_text()
                ).group(1)
            ),
        }
        lag = stats.get("loop_lag_ms") or {}
        record = {
            "t": round(t, 2),
            "rss_mb": process["rss_bytes"] / 2**20,
            "open_files": process["open_files"],
            "tasks": process["tasks"],
            "threads": process["threads"],
            "lag_p50": lag.get("p50"),
            "lag_p99": lag.get("p99"),
            "lag_max": lag.get("max"),
            "source": "stats" if "process" in stats else "proc",
            "server_cpu": cpu,
            "other_cpu": self.other_cpu(),
            "connections": stats["connections"],
            "http_connections": stats["http_connections"],
            "active_utterances": stats["active_utterances"],
            "requests": stats["total_requests"],
            "errors": stats["errors"],
            "outcomes": stats["outcomes"],
            "upstream_errors": stats["upstream_errors"],
            "cache_errors": stats["cache_errors"],
            "cache_entries": stats["cache_entries"],
            "cache_hits": stats["cache_hits"],
        }
        return record


async def mix(
    bench: Bench,
    server: Process,
    urls: dict[str, str],
    units: int,
    seconds: float,
    offset: int,
    interval: float | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float, float]:
    """The mix at ``units`` for ``seconds``: the load processes' outputs (each with its
    part), the samples (every ``interval`` s, with ``None`` at the start and end only),
    the server's busy share and the other core's (the fake's and the load processes')."""
    specs = _specs(urls, units, seconds, offset, seed=offset % 9973)
    workers = await ready_workers(specs)
    sampler = Sampler(server, [bench.fake_pid, *(worker.pid for worker in workers)])
    try:
        await signal_workers(workers, b"go\n")
        started = time.perf_counter()
        samples = [await sampler.sample(0.0)]
        while (now := time.perf_counter() - started) < seconds:
            await asyncio.sleep(min(interval or seconds, seconds - now))
            samples.append(await sampler.sample(time.perf_counter() - started))
        outputs = await results_of(workers)
    finally:
        await sampler.close()
    busy, other = _busy(samples)
    for output, spec in zip(outputs, specs, strict=True):
        output["part"] = spec["part"]
        output["clients"] = spec["clients"]
    return outputs, samples, busy, other


def _busy(samples: list[dict[str, Any]]) -> tuple[float, float]:
    """The server's busy share of its core between the first and last of ``samples``,
    and the other core's (the fake's and the load processes' CPU)."""
    first, last = samples[0], samples[-1]
    wall = max(last["t"] - first["t"], 1e-9)
    busy = (last["server_cpu"] - first["server_cpu"]) / wall
    return busy, (last["other_cpu"] - first["other_cpu"]) / wall / max(1, len(OTHER_CPUS))


def tally(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The clients' side: by part, requests, errors (and what they were), cancels, drops,
    cache hits; the live WebSocket's first byte."""
    parts: dict[str, dict[str, Any]] = {}
    live_first: list[float] = []
    for output in outputs:
        results = output["results"]
        errors = [r["error"] for r in results if "error" in r]
        row = parts.setdefault(
            output["part"],
            {"clients": 0, "requests": 0, "errors": 0, "kinds": {}, "dropped": 0},
        )
        row["clients"] += output["clients"]
        row["requests"] += len(results)
        row["errors"] += len(errors)
        for kind in errors:
            row["kinds"][kind] = row["kinds"].get(kind, 0) + 1
        # Connections the server closed under a WebSocket client (not the drops' own).
        row["dropped"] += output.get("dropped", 0)
        row["cancelled"] = row.get("cancelled", 0) + sum(1 for r in results if r.get("cancelled"))
        row["late_cancel"] = row.get("late_cancel", 0) + sum(
            1 for r in results if r.get("late_cancel")
        )
        row["cut"] = row.get("cut", 0) + sum(1 for r in results if "cut_audio" in r)
        row["cached"] = row.get("cached", 0) + sum(1 for r in results if r.get("cached"))
        if output["part"] == "live_mp3":
            live_first += [r["ttfb"] * 1000 for r in results if "error" not in r]
    return {
        "parts": parts,
        "requests": sum(row["requests"] for row in parts.values()),
        "errors": sum(row["errors"] + row["dropped"] for row in parts.values()),
        "late_cancels": sum(row["late_cancel"] for row in parts.values()),
        "live_first_p50": percentile(live_first, 0.5),
        "live_first_p99": percentile(live_first, 0.99),
    }


def _slope(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of ``points`` (x, y); 0 with fewer than two x."""
    if len({x for x, _ in points}) < 2:
        return 0.0
    return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope


def flatness(samples: list[dict[str, Any]], seconds: float, warmup: float) -> dict[str, Any]:
    """By figure (RSS MB, open files, tasks), after the warm-up: the means of its first
    and last thirds, the least-squares slope (per minute) and its rise end to end, the
    allowance, and whether it is flat (see ALLOWANCE)."""
    after = [s for s in samples if s["t"] >= warmup]
    third = (seconds - warmup) / 3
    first = [s for s in after if s["t"] < warmup + third]
    last = [s for s in after if s["t"] >= seconds - third]
    figures: dict[str, Any] = {}
    for name, (share, floor) in ALLOWANCE.items():
        if any(s[name] is None for s in after) or not first or not last:
            figures[name] = {"flat": None}  # not reported by this server
            continue
        early = statistics.fmean(s[name] for s in first)
        late = statistics.fmean(s[name] for s in last)
        slope = _slope([(s["t"] / 60, float(s[name])) for s in after])
        span = (after[-1]["t"] - after[0]["t"]) / 60
        allowance = max(share * early, floor)
        figures[name] = {
            "first_third": early,
            "last_third": late,
            "growth": late - early,
            "slope_per_min": slope,
            "line_rise": slope * span,
            "allowance": allowance,
            "min": min(s[name] for s in after),
            "max": max(s[name] for s in after),
            "flat": late - early <= allowance and slope * span <= allowance,
        }
    return figures


def server_errors(first: dict[str, Any], last: dict[str, Any], late_cancels: int) -> dict[str, Any]:
    """The server's errors between two samples: error messages it sent (less the
    not_found of each cancel that came after its utterance's end), outcomes that are not
    NOT_ERRORS, Edge and cache failures."""
    outcomes = {
        kind: count - first["outcomes"].get(kind, 0)
        for kind, count in last["outcomes"].items()
        if count - first["outcomes"].get(kind, 0)
    }
    bad = {kind: count for kind, count in outcomes.items() if kind not in NOT_ERRORS}
    sent = last["errors"] - first["errors"] - late_cancels
    return {
        "outcomes": outcomes,
        "bad_outcomes": bad,
        "error_messages": sent,
        "upstream_errors": last["upstream_errors"] - first["upstream_errors"],
        "cache_errors": last["cache_errors"] - first["cache_errors"],
        "total": sent
        + sum(bad.values())
        + last["upstream_errors"]
        - first["upstream_errors"]
        + last["cache_errors"]
        - first["cache_errors"],
    }


async def calibrate(
    bench: Bench, server: Process, urls: dict[str, str], step: float
) -> tuple[int, list[dict[str, Any]]]:
    """The units at which the mix keeps the server's core TARGET_BUSY busy: the mix at
    CALIBRATION_UNITS, scaled in proportion to its busy share, then once more from the
    second step's (two steps of ``step`` s)."""
    steps: list[dict[str, Any]] = []
    units = CALIBRATION_UNITS
    for number in range(2):
        outputs, samples, _, _ = await mix(
            bench, server, urls, units, step, offset=(number + 1) * 10**8, interval=1.0
        )
        busy, other = _busy([s for s in samples if s["t"] >= CALIBRATION_SETTLE])
        steps.append(
            {"units": units, "busy": busy, "other_busy": other, "errors": tally(outputs)["errors"]}
        )
        units = max(1, min(MAX_UNITS, round(units * TARGET_BUSY / max(busy, 1e-3))))
    return units, steps


async def run(bench: Bench, seconds: float, units: int | None = None) -> None:
    """The soak, into ``bench.out["soak"]``: calibration (unless ``units`` is given),
    then the mix for ``seconds`` on the same server, sampled, and the verdict."""
    short = seconds < SHORT_RUN
    settings = SHORT_SETTINGS if short else LONG_SETTINGS
    warmup = min(max(0.2 * seconds, WARMUP), seconds / 2)
    interval = min(10.0, max(1.0, seconds / 30))
    with tempfile.TemporaryDirectory() as cache:
        server, ws_url = await bench.server(cache, **settings)
        try:
            urls = {"ws": ws_url, "http": "http://" + server.match}
            steps: list[dict[str, Any]] = []
            if units is None:
                units, steps = await calibrate(bench, server, urls, CALIBRATION_SECONDS[not short])
            before = (await _one_sample(bench, server))["rss_mb"]
            outputs, samples, busy, other = await mix(
                bench, server, urls, units, seconds, offset=9 * 10**8, interval=interval
            )
        finally:
            await stop(server)
    clients = tally(outputs)
    served = server_errors(samples[0], samples[-1], clients["late_cancels"])
    flat = flatness(samples, seconds, warmup)
    errors = clients["errors"] + served["total"]
    calibration_errors = sum(step["errors"] for step in steps)
    passed = all(f["flat"] is not False for f in flat.values()) and not (
        errors or calibration_errors
    )
    bench.out["soak"] = {
        "date": time.strftime("%Y-%m-%d"),
        "seconds": seconds,
        "warmup": warmup,
        "interval": interval,
        "settings": settings,
        "think": THINK,
        "mix": {part: clients_per_unit for part, (clients_per_unit, _) in MIX.items()},
        "units": units,
        "clients": sum(n for n, _ in MIX.values()) * units,
        "calibration": steps,
        "busy": busy,
        "other_busy": other,
        "rss_before_mb": before,
        "samples": samples,
        "flatness": flat,
        "clients_tally": clients,
        "server": served,
        "errors": errors,
        "calibration_errors": calibration_errors,
        "utterances": sum(served["outcomes"].values()),
        "passed": passed,
    }


async def _one_sample(bench: Bench, server: Process) -> dict[str, Any]:
    sampler = Sampler(server, [])
    try:
        return await sampler.sample(0.0)
    finally:
        await sampler.close()


def verdict(s: dict[str, Any]) -> str:
    """The verdict's sentence."""
    return "passed" if s["passed"] else "FAILED"


def _length(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 120 else f"{seconds / 60:g} minutes"


def _at(samples: list[dict[str, Any]], t: float) -> dict[str, Any]:
    return min(samples, key=lambda s: abs(s["t"] - t))


def markdown(out: dict[str, Any]) -> list[str]:
    """The soak's lines of bench/results.md."""
    s = out["soak"]
    samples = s["samples"]
    flat = s["flatness"]
    calibration = ", ".join(
        f"{step['units']} units {100 * step['busy']:.0f} %" for step in s["calibration"]
    )
    parts = s["clients_tally"]["parts"]
    mix_text = (
        f"{s['mix']['live_mp3']} live mp3 (new texts), {s['mix']['live_opus']} opus, "
        f"{s['mix']['live_pcm']} pcm, {s['mix']['cached']} cached replays of a catalogue of "
        f"{len(CATALOGUE)} texts, {s['mix']['http_live']} HTTP `POST /v1/audio/speech` of new "
        f"texts and {s['mix']['http_cached']} of a cached one, {s['mix']['streaming']} "
        f"streaming input (a word every 1/30 s), {s['mix']['cancel']} cancelling after 2 to "
        f"12 KB of audio, {s['mix']['drop']} dropping its TCP connection after 4 to 24 KB "
        "of a 9 s text, then connecting again"
    )

    def figure(name: str, unit: str, fmt: str) -> str:
        f = flat[name]
        if f.get("flat") is None:
            return f"{name.replace('_', ' ')}: not reported"
        return (
            f"{name.replace('_mb', '').replace('_', ' ')} {f['first_third']:{fmt}} → "
            f"{f['last_third']:{fmt}}{unit} (first third's mean → last third's; "
            f"{f['slope_per_min']:+.2f}{unit}/min after the warm-up, "
            f"{f['line_rise']:+{fmt}} end to end; allowed {f['allowance']:{fmt}}; "
            f"range {f['min']:{fmt}}–{f['max']:{fmt}})"
        )

    settings = ", ".join(f"`{k}={v}`" for k, v in s["settings"].items())
    server = s["server"]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(server["outcomes"].items()))
    cancels = sum(p.get("cancelled", 0) for p in parts.values())
    late = s["clients_tally"]["late_cancels"]
    cuts = sum(p.get("cut", 0) for p in parts.values())
    client_errors = s["clients_tally"]["errors"]
    kinds = {k: v for p in parts.values() for k, v in p["kinds"].items()}
    lines = [
        f"**15. Soak** (run {s['date']}): {_length(s['seconds'])} of mixed load on one "
        f"server, every client thinking {s['think']:g} s on average before each request; "
        f"a unit of load is {mix_text}. The limit is the server's core fully busy: "
        f"calibrated ({calibration or 'units given'}), {s['units']} units "
        f"({s['clients']} clients) kept the core **{100 * s['busy']:.0f} % busy** "
        f"(target {100 * TARGET_BUSY:.0f} %; the other core's fake Edge and load "
        f"processes {100 * s['other_busy']:.0f} %). Settings beyond the bench's: "
        f"{settings} (the bounded stores full within the warm-up). "
        f"{s['utterances']} utterances ({outcomes}); the clients' {cancels} cancels "
        f"answered `cancelled` ({late} came after the end) and {cuts} drops; live mp3 "
        f"first byte p50 {s['clients_tally']['live_first_p50']:.1f} ms, p99 "
        f"{s['clients_tally']['live_first_p99']:.1f}. After the {s['warmup']:g} s warm-up: "
        f"{figure('rss_mb', ' MB', '.1f')}; {figure('open_files', '', '.1f')}; "
        f"{figure('tasks', '', '.1f')}. Errors: the server's {server['total']} "
        f"(error messages {server['error_messages']}, outcomes other than ok, cancelled "
        f"and disconnected {sum(server['bad_outcomes'].values())}, Edge "
        f"{server['upstream_errors']}, cache {server['cache_errors']}), the clients' "
        f"{client_errors}{' (' + ', '.join(f'{k} {v}' for k, v in kinds.items()) + ')' if kinds else ''}"
        f", the calibration's {s['calibration_errors']}. Flat: after the warm-up, the mean "
        "of its last third within the allowance (10 % or 8 MB of RSS, 10 % or 10 open "
        "files, 15 % or 25 tasks, whichever is larger) of its first third's, and so the "
        "least-squares line's rise over it; an error: an error message the server sent "
        "(but the `not_found` of a cancel that came after its utterance's end), an "
        "outcome other than ok, cancelled and disconnected, an Edge or cache failure, a "
        "client's failed request or a connection the server closed under it; verdict: "
        f"**{verdict(s)}**.",
        "",
        "| at | s | RSS MB | open files | tasks | loop lag p99 ms | utterances | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = samples[0]
    for label, t in (
        ("start", 0.0),
        ("warm-up end", s["warmup"]),
        ("middle", (s["warmup"] + s["seconds"]) / 2),
        ("end", s["seconds"]),
    ):
        sample = _at(samples, t)
        so_far = server_errors(first, sample, 0)
        lag = sample["lag_p99"]
        lines.append(
            f"| {label} | {sample['t']:.0f} | {sample['rss_mb']:.1f} | {sample['open_files']} "
            f"| {sample['tasks'] if sample['tasks'] is not None else '–'} "
            f"| {f'{lag:.1f}' if lag is not None else '–'} "
            f"| {sum(so_far['outcomes'].values())} | {so_far['total']} |"
        )
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1800.0)
    parser.add_argument("--units", type=int, help="units of the mix (default: calibrated)")
    parser.add_argument("--ttfa", type=float, default=0.15, help="fake first-audio delay, s")
    parser.add_argument("--speed", type=float, default=4.0, help="fake audio pace × real time")
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    fake = await start_fake(args.ttfa, args.speed)
    wss, voices = fake.match.split()
    bench = Bench(quick=False, fake_urls=(wss, voices), fake_pid=fake.process.pid)
    try:
        await run(bench, args.seconds, args.units)
    finally:
        await stop(fake)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(bench.out, indent=2, default=str))
    print("\n".join(markdown(bench.out)))
    if not bench.out["soak"]["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
