"""Scenario 13, scale: live streams at 100, 300 and 1,000 concurrent clients.

Each client speaks a new text, listens to its end, thinks (exponentially, PACED_THINK
s on average), and speaks again, for DURATION seconds, through the WebSocket
(``/v1/stream``, ``"words": "batch"``) and the OpenAI door (``POST /v1/audio/speech``),
against edge-tts alone (baseline (a): one process on the server's core, bench/load.py's
edge mode) through the same fake service, in the same turns (the order reversed every
other turn), the samples of all turns pooled.

The fake speaks at real time (first audio after 150 ms), so that streams are as long
as a listener's: FAKES processes of tests/fake_edge.py share one port (SO_REUSEPORT),
and the load clients run in several processes, all on the other core (run.py's
OTHER_CPUS); their CPU is measured, and how busy that core was, so that a figure
limited by them rather than by the server is marked. Each door has a server of its
own, new for each level, so that its RSS and its event loop's lag (the side port's
/stats, the last 60 s, read at each run's end) are its door's alone.

    .venv/bin/python bench/scale.py                      # 100, 300, 1,000 clients
    .venv/bin/python bench/scale.py --quick              # 20 clients, seconds (CI)
    .venv/bin/python bench/scale.py --levels 1000 --profile   # with py-spy's flame graph

bench/run.py runs it as scenario 13 (``run(bench)``, ``markdown(out)``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from run import (
    OTHER_CPUS,
    PACED_THINK,
    PYTHON,
    ROOT,
    SERVER_CPUS,
    TEXT,
    Bench,
    Process,
    on_cpus,
    own_times,
    percentile,
    ready_workers,
    results_of,
    side_stats,
    signal_workers,
    start,
    stop,
    usage,
)

#: Concurrent clients of a full run, and of a quick one.
LEVELS = (100, 300, 1000)
QUICK_LEVELS = (20,)
#: Seconds during which the clients start new speaks (full run; the utterances under
#: way then end, about 5.6 s of audio each at real time); a quick run's clients speak
#: once each.
DURATION = (40.0, 0.0)
#: Mean seconds of think before each speak (full run, quick run).
THINK = (PACED_THINK, 0.2)
#: Turns per level (full run, quick run): each door and the baseline once per turn.
TURNS = (2, 1)
#: The fake's first audio after this many seconds, and its pace (× real time).
FAKE_TTFA, FAKE_SPEED = 0.15, 1.0
#: Fake processes sharing one port (full run, quick run).
FAKES = (3, 2)
#: Load clients per load process at most (at least two processes).
CLIENTS_PER_PROCESS = 250
#: The quick run's text: about 1.5 s of audio, so that its turn is short.
QUICK_TEXT = "Short."
#: The doors and the baseline, in their first turn's order.
NAMES = ("edge", "ws", "http")
DOOR_TITLES = {"ws": "WebSocket", "http": "OpenAI HTTP"}
#: Bytes of MP3 per second of audio (48 kbit/s).
BYTES_PER_S = 6000
#: Seconds between two samples of the processes' CPU and memory.
SAMPLE_EVERY = 0.5
#: A core this busy (share of a second) limits what runs on it.
SATURATED = 0.9
#: The profile (--profile): seconds after go it starts, seconds it lasts, samples a second.
PROFILE_DELAY, PROFILE_SECONDS, PROFILE_RATE = 8.0, 20, 100


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Each CPU's (busy, total) jiffies so far, from /proc/stat."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]
            idle = ticks[3] + ticks[4]  # idle, iowait
            times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def _rss(pid: int) -> int:
    try:
        return usage(pid)[1]
    except (FileNotFoundError, ProcessLookupError):
        return 0


@dataclass
class Watch:
    """CPU seconds of a set of processes, their CPUs' busy shares, and the server's RSS,
    sampled every SAMPLE_EVERY s from /proc while a run lasts."""

    groups: dict[str, list[int]]
    server: int = 0
    first: dict[int, float] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)
    rss: list[int] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0

    def sample(self) -> None:
        for pids in self.groups.values():
            for pid in pids:
                try:
                    cpu = usage(pid)[0]
                except (FileNotFoundError, ProcessLookupError):
                    continue
                self.first.setdefault(pid, cpu)
                self.last[pid] = cpu
        if self.server:
            self.rss.append(_rss(self.server))

    async def run(self) -> None:
        self.cores0 = _cpu_times()
        self.started = time.perf_counter()
        try:
            while True:
                self.sample()
                await asyncio.sleep(SAMPLE_EVERY)
        finally:
            self.sample()
            self.cores1 = _cpu_times()
            self.ended = time.perf_counter()

    def cpu(self, group: str) -> float:
        return sum(self.last.get(pid, 0.0) - self.first.get(pid, 0.0) for pid in self.groups[group])

    def busy(self, cpus: set[int]) -> float:
        """The share of ``cpus``' time they were busy (the busiest of them)."""
        shares = []
        for cpu in cpus:
            (busy0, total0), (busy1, total1) = self.cores0[cpu], self.cores1[cpu]
            shares.append((busy1 - busy0) / max(1, total1 - total0))
        return max(shares, default=0.0)


async def start_fakes(count: int) -> tuple[list[Process], tuple[str, str]]:
    """``count`` fake Edge processes at real time on one port (SO_REUSEPORT), on the
    other core; their URLs."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def command(port: int) -> list[str]:
        call = f"serve_forever({FAKE_TTFA}, {FAKE_SPEED}, port={port}, reuse_port=True)"
        return [PYTHON, "-c", f"from tests.fake_edge import serve_forever; {call}"]

    first = await start(command(0), env, r"^(\S+ \S+)$")
    wss, voices = first.match.split()
    port = int(wss.split("/")[2].rsplit(":", 1)[1])
    others = await asyncio.gather(
        *(start(command(port), env, r"^(\S+ \S+)$") for _ in range(count - 1))
    )
    return [first, *others], (wss, voices)


@dataclass
class Level:
    """One level's runs: by name (edge, ws, http), the samples and figures of its turns."""

    clients: int
    firsts: dict[str, list[float]] = field(default_factory=dict)
    own: dict[str, list[float]] = field(default_factory=dict)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in NAMES:
            self.firsts[name] = []
            self.own[name] = []
            self.runs[name] = []


async def _profile(pid: int, clients: int) -> list[str]:
    """py-spy on the server: a flame graph and the folded stacks, side by side."""
    await asyncio.sleep(PROFILE_DELAY)
    paths = []
    spies = []
    for form, suffix in (("flamegraph", "svg"), ("raw", "txt")):
        path = ROOT / "bench" / f"profile-{clients}.{suffix}"
        paths.append(str(path))
        spies.append(
            await asyncio.create_subprocess_exec(
                str(Path(PYTHON).parent / "py-spy"),
                "record",
                "-p",
                str(pid),
                "-f",
                form,
                "-o",
                str(path),
                "-d",
                str(PROFILE_SECONDS),
                "-r",
                str(PROFILE_RATE),
                "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                preexec_fn=on_cpus(OTHER_CPUS),
            )
        )
    for spy in spies:
        await spy.wait()
    return paths


def profile_summary(path: str, top: int = 12) -> dict[str, Any]:
    """py-spy's folded stacks (``-f raw``) by function: the samples, and the top
    functions by leaf (self) and by inclusive share of the samples."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        # "function (path/to/file.py:line)": the function and its file, not its line.
        frames = [frame.rsplit(":", 1)[0] + ")" for frame in stack.split(";")]
        leaf[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, samples / max(total, 1)) for name, samples in counter.most_common(top)]

    return {"samples": total, "leaf": share(leaf), "inclusive": share(inclusive)}


class Scale:
    def __init__(self, bench: Bench, fakes: list[Process], urls: tuple[str, str]) -> None:
        self.bench = bench
        self.quick = bench.quick
        self.fakes = fakes
        self.urls = urls
        pick = 1 if self.quick else 0
        self.duration = DURATION[pick]
        self.think = THINK[pick]
        self.text = QUICK_TEXT if self.quick else TEXT
        self.profile_level: int | None = None
        self.profiles: dict[str, Any] = {}

    async def level(self, clients: int, turns: int) -> dict[str, Any]:
        processes = max(2, math.ceil(clients / CLIENTS_PER_PROCESS))
        bench = Bench(quick=self.quick, fake_urls=self.urls, workers=processes)
        level = Level(clients)
        extra = {
            "EDGE_WSS_URL": self.urls[0],
            "EDGE_VOICES_URL": self.urls[1],
            # Every synthesis at once: no queue in front of Edge at this level.
            "UPSTREAM_CONCURRENCY": str(max(1000, clients)),
            "UPSTREAM_CONCURRENCY_PER_IP": str(max(1000, clients)),
        }
        with tempfile.TemporaryDirectory() as ws_cache, tempfile.TemporaryDirectory() as h_cache:
            started = await asyncio.gather(
                bench.logged_server(ws_cache, extra), bench.logged_server(h_cache, extra)
            )
            servers = {"ws": started[0][0], "http": started[1][0]}
            url = started[0][1]
            base = f"http://{started[1][0].match}"
            doors = {
                "ws": {"mode": "speak", "url": url, "words": "batch"},
                "http": {"mode": "http", "url": base},
            }
            try:
                if not self.quick:  # a quick run's first speaks fetch the voice list
                    await self._warm(url, base)
                idle = {name: _rss(server.process.pid) for name, server in servers.items()}
                for turn in range(turns):
                    order = list(NAMES) if turn % 2 == 0 else list(reversed(NAMES))
                    for position, name in enumerate(order):
                        # New texts in every run (each door's server has its own cache).
                        offset = turn * 10**8 + position * 10**7
                        paced = {
                            "think": self.think,
                            "ramp": 0.0,
                            "duration": self.duration,
                            "texts": [self.text],
                        }
                        if name == "edge":
                            specs = [bench.baseline_spec(clients, 1, offset, **paced)]
                        else:
                            specs = bench.door_specs(doors[name], clients, 1, offset, **paced)
                        profile = name == "ws" and turn == 0 and clients == self.profile_level
                        record = await self._run(
                            name, specs, servers.get(name), idle, clients if profile else 0
                        )
                        level.runs[name].append(record)
                        level.firsts[name] += record.pop("firsts")
                        level.own[name] += record.pop("own")
            finally:
                await asyncio.gather(*(stop(server) for server in servers.values()))
        return self._summary(level, processes, idle)

    async def _warm(self, url: str, base: str) -> None:
        """One utterance through each server first (its imports, the voice list)."""
        specs = [
            {"mode": "speak", "url": url, "words": "batch", "clients": 1, "requests": 1},
            {"mode": "http", "url": base, "clients": 1, "requests": 1},
        ]
        for spec in specs:
            spec.update(texts=["Warm up."], unique=True, offset=1)
        workers = await ready_workers(specs)
        await signal_workers(workers, b"go\n")
        await results_of(workers)

    async def _run(
        self,
        name: str,
        specs: list[dict[str, Any]],
        server: Process | None,
        idle: dict[str, int],
        profile: int,
    ) -> dict[str, Any]:
        """One run of a door (or the baseline): its clients connected, then told to go;
        with ``profile`` (its clients), py-spy on the server meanwhile."""
        workers = await ready_workers(specs)
        load_pids = [worker.pid for worker in workers]
        groups = {
            "fake": [fake.process.pid for fake in self.fakes],
            "load": load_pids if name != "edge" else [],
            "baseline": load_pids if name == "edge" else [],
            "server": [server.process.pid] if server else [],
        }
        server_pid = server.process.pid if server else 0
        connected = _rss(server_pid) if server else 0
        logged = len(server.output) if server else 0
        watch = Watch(groups, server_pid)
        sampler = asyncio.create_task(watch.run())
        await asyncio.sleep(0)  # the first sample before go
        spy = asyncio.create_task(_profile(server_pid, profile)) if profile and server else None
        await signal_workers(workers, b"go\n")
        outputs = await results_of(workers)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        stats = await side_stats(server) if server else {}
        if spy is not None:
            svg, raw = await spy
            self.profiles[f"{name}_{profile}"] = {
                "svg": svg,
                "raw": raw,
                "clients": profile,
                "seconds": PROFILE_SECONDS,
                "rate": PROFILE_RATE,
                **profile_summary(raw),
            }
        results = [r for output in outputs for r in output["results"]]
        good = [r for r in results if "error" not in r]
        wall = max(output["elapsed"] for output in outputs)
        stream_s = sum(r["ttlb"] for r in good)
        audio_s = sum(r["bytes"] for r in good) / BYTES_PER_S
        own: list[float] = []
        if server:
            await asyncio.sleep(0.3)  # the access log is written every 50 ms
            own = own_times(server.output[logged:])
        return {
            "firsts": [1000 * r["ttfb"] for r in good],
            "own": own,
            "requests": len(results),
            "errors": len(results) - len(good),
            "error_kinds": dict(Counter(r["error"] for r in results if "error" in r)),
            "dropped": sum(output.get("dropped", 0) for output in outputs),
            "wall_s": wall,
            "stream_s": stream_s,
            "audio_s": audio_s,
            "live_streams": stream_s / max(wall, 1e-9),
            "cpu_s": {group: watch.cpu(group) for group in groups},
            "sampled_s": watch.ended - watch.started,
            "server_core": watch.busy(SERVER_CPUS),
            "other_core": watch.busy(OTHER_CPUS),
            "connected_rss": connected,
            "rss_mean": statistics.fmean(watch.rss) if watch.rss else 0,
            "rss_peak": max(watch.rss, default=0),
            "idle_rss": idle.get(name, 0),
            "loop_lag_ms": stats.get("loop_lag_ms"),
            "process": stats.get("process"),
        }

    def _summary(self, level: Level, processes: int, idle: dict[str, int]) -> dict[str, Any]:
        edge = level.firsts["edge"]
        rows: dict[str, Any] = {}
        for name in NAMES:
            runs = level.runs[name]
            firsts = level.firsts[name]
            wall = sum(run["sampled_s"] for run in runs)
            cpu = {group: sum(run["cpu_s"][group] for run in runs) for group in runs[0]["cpu_s"]}
            audio_s = sum(run["audio_s"] for run in runs)
            stream_s = sum(run["stream_s"] for run in runs)
            row: dict[str, Any] = {
                "first_p50": percentile(firsts, 0.5),
                "first_p99": percentile(firsts, 0.99),
                "requests": sum(run["requests"] for run in runs),
                "errors": sum(run["errors"] for run in runs),
                "error_kinds": sum((Counter(run["error_kinds"]) for run in runs), Counter()),
                "dropped": sum(run["dropped"] for run in runs),
                "audio_s": audio_s,
                "live_streams": statistics.fmean(run["live_streams"] for run in runs),
                # Shares of a core, over the runs' sampled seconds.
                "fake_cpu": cpu["fake"] / max(wall, 1e-9),
                "load_cpu": cpu["load"] / max(wall, 1e-9),
                "baseline_cpu": cpu["baseline"] / max(wall, 1e-9),
                "server_cpu": cpu["server"] / max(wall, 1e-9),
                "server_core": max(run["server_core"] for run in runs),
                "other_core": max(run["other_core"] for run in runs),
                "turns": runs,
            }
            row["error_kinds"] = dict(row["error_kinds"])
            if name == "edge":
                # edge-tts's own CPU per second of audio: what the server does, less ttsstream.
                row["cpu_ms_per_audio_s"] = 1000 * cpu["baseline"] / max(audio_s, 1e-9)
            else:
                row.update(
                    added_p50=row["first_p50"] - percentile(edge, 0.5),
                    added_p99=row["first_p99"] - percentile(edge, 0.99),
                    own_p50=percentile(level.own[name], 0.5),
                    own_p99=percentile(level.own[name], 0.99),
                    server_cpu_s=cpu["server"],
                    cpu_ms_per_audio_s=1000 * cpu["server"] / max(audio_s, 1e-9),
                    cpu_ms_per_stream_s=1000 * cpu["server"] / max(stream_s, 1e-9),
                    idle_rss_mb=idle[name] / 2**20,
                    connected_rss_mb=statistics.fmean(run["connected_rss"] for run in runs) / 2**20,
                    rss_mb=statistics.fmean(run["rss_mean"] for run in runs) / 2**20,
                    peak_rss_mb=max(run["rss_peak"] for run in runs) / 2**20,
                    lag_p99_ms=max((run["loop_lag_ms"] or {}).get("p99", math.nan) for run in runs),
                    lag_max_ms=max((run["loop_lag_ms"] or {}).get("max", math.nan) for run in runs),
                    lag_window_s=(runs[0]["loop_lag_ms"] or {}).get("window_s"),
                )
                row["rss_per_stream_kb"] = (
                    1024 * (row["rss_mb"] - row["idle_rss_mb"]) / max(row["live_streams"], 1e-9)
                )
            rows[name] = row
        return {
            "clients": level.clients,
            "turns": len(level.runs["edge"]),
            "load_processes": processes,
            "edge": rows["edge"],
            "doors": {name: rows[name] for name in ("ws", "http")},
        }


async def scale(
    bench: Bench,
    levels: tuple[int, ...] | None = None,
    turns: int | None = None,
    profile_level: int | None = None,
) -> dict[str, Any]:
    """The scenario's figures (``run`` stores them in ``bench.out["scale"]``)."""
    pick = 1 if bench.quick else 0
    levels = levels or (QUICK_LEVELS if bench.quick else LEVELS)
    turns = turns or TURNS[pick]
    began = time.perf_counter()
    fakes, urls = await start_fakes(FAKES[pick])
    try:
        runner = Scale(bench, fakes, urls)
        runner.profile_level = profile_level
        rows = [await runner.level(clients, turns) for clients in levels]
    finally:
        await asyncio.gather(*(stop(fake) for fake in fakes))
    return {
        "levels": rows,
        "duration_s": runner.duration,
        "think_s": runner.think,
        "turns": turns,
        "fakes": len(fakes),
        "fake_ttfa_ms": FAKE_TTFA * 1000,
        "fake_speed": FAKE_SPEED,
        "text_chars": len(runner.text),
        "quick": bench.quick,
        "profiles": runner.profiles,
        "wall_s": time.perf_counter() - began,
    }


async def run(bench: Bench) -> None:
    """Scenario 13 of bench/run.py."""
    bench.out["scale"] = await scale(bench)


def _ms(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


def _pair(row: dict[str, Any], key: str, signed: bool = False) -> str:
    p50, p99 = row[f"{key}_p50"], row[f"{key}_p99"]
    if signed:
        return f"{p50:+.1f} / {p99:+.1f}"
    return f"{_ms(p50)} / {_ms(p99)}"


def markdown(out: dict[str, Any]) -> list[str]:
    """results.md's lines for scenario 13."""
    s = out["scale"]
    levels = ", ".join(f"{row['clients']:,}" for row in s["levels"])
    lines = [
        f"**13. Scale** (`bench/scale.py`): live streams at {levels} concurrent clients, "
        "paced like real use: each client speaks a new text, listens to its end, thinks "
        f"(exponentially, {s['think_s']:g} s on average) and speaks again, for "
        f"{s['duration_s']:g} s per run; through the WebSocket (`/v1/stream`, "
        '`"words": "batch"`) and the OpenAI door (`POST /v1/audio/speech`), against '
        "edge-tts alone (baseline (a), one process on the server's core) through the same "
        f"fake in the same turns ({s['turns']} per level, the order reversed every other "
        "turn, samples pooled). The fake speaks at real time (first audio after "
        f"{s['fake_ttfa_ms']:.0f} ms), {s['fakes']} processes sharing one port "
        "(SO_REUSEPORT); the load clients in several processes; both on the other core. "
        "Each door has its own server, new for each level (the bench's admission limits "
        "lifted, UPSTREAM_CONCURRENCY ≥ clients; everything else default). *Added* is the "
        "door's first byte minus edge-tts's; *own* the server's own part (access log: "
        "`ttfb_ms` − `upstream_ms`); *live* the mean number of streams playing (seconds "
        "of streams over the run's seconds); *CPU* the server's CPU ms per second of "
        "audio sent (= ‰ of a core per stream; edge-tts's own for the baseline row); "
        "*RSS/stream* the server's mean RSS during the run less its idle RSS, over "
        "*live*; *lag p99* the side port's `/stats` `loop_lag_ms` (the last "
        "60 s, read at each run's end: the worst turn); *fake, clients* their CPU in "
        "shares of a core, and how busy their core was (‡: ≥ 90 %, the figure is "
        "limited by them, not by the server).",
        "",
        "| clients | door | live | first byte p50 / p99 | added p50 / p99 | own p50 / p99 "
        "| CPU ms/s | server core | RSS/stream | lag p99 | errors | fake, clients (their core) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in s["levels"]:
        edge = row["edge"]
        mark = " ‡" if edge["other_core"] >= SATURATED else ""
        lines.append(
            f"| {row['clients']:,} | edge-tts | {edge['live_streams']:.0f} "
            f"| {_pair(edge, 'first')} | | | {edge['cpu_ms_per_audio_s']:.1f} "
            f"| {edge['baseline_cpu']:.0%} | | | {edge['errors']} "
            f"| {edge['fake_cpu']:.0%} ({edge['other_core']:.0%}{mark}) |"
        )
        for name, door in row["doors"].items():
            mark = " ‡" if door["other_core"] >= SATURATED else ""
            lines.append(
                f"| {row['clients']:,} | {DOOR_TITLES[name]} | {door['live_streams']:.0f} "
                f"| {_pair(door, 'first')} | {_pair(door, 'added', signed=True)} "
                f"| {_pair(door, 'own')} | {door['cpu_ms_per_audio_s']:.1f} "
                f"| {door['server_cpu']:.0%} | {door['rss_per_stream_kb']:.0f} KB "
                f"| {_ms(door['lag_p99_ms'])} ms | {door['errors'] + door['dropped']} "
                f"| {door['fake_cpu']:.0%}, {door['load_cpu']:.0%} "
                f"({door['other_core']:.0%}{mark}) |"
            )
    lines.append("")
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 clients, seconds (CI)")
    parser.add_argument("--levels", type=int, nargs="*", help="concurrent clients")
    parser.add_argument("--turns", type=int, help="turns per level")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy on the WebSocket door's server at the last level's first turn "
        "(bench/profile-N.svg and .txt)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON here")
    parser.add_argument("--fold", help="only summarise this py-spy raw profile")
    args = parser.parse_args()
    if args.fold:
        summary = profile_summary(args.fold, 20)
        print(f"{summary['samples']} samples")
        for kind in ("leaf", "inclusive"):
            print(f"\n{kind}:")
            for name, share in summary[kind]:
                print(f"{share:6.1%}  {name}")
        return
    bench = Bench(quick=args.quick, fake_urls=("", ""))
    levels = tuple(args.levels) if args.levels else None
    top = (levels or (QUICK_LEVELS if args.quick else LEVELS))[-1]
    bench.out["scale"] = await scale(bench, levels, args.turns, top if args.profile else None)
    print("\n".join(markdown(bench.out)))
    print(f"scale: {bench.out['scale']['wall_s']:.1f} s", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(bench.out, indent=2, default=str))


if __name__ == "__main__":
    asyncio.run(main())
