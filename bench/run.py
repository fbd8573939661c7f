"""The benchmark: ttsstream against its own baselines, on this machine, in one run.

Everything runs on 127.0.0.1, each part in its own process: the fake Edge service
(first audio after ``--ttfa``, then audio at ``--speed`` × real time, word metadata
ahead of the audio as the real service sends it), the server, and the load clients.

Baselines, measured in the same run:
  (a) edge_tts.Communicate called directly against the same fake service;
  (b) a bare websockets server sending the same MP3 bytes from memory.

Scenarios:
  1. live    time to first audio through the server at 1, 10, 100 clients, minus (a)
  2. replay  cached replay, first and last byte, at 1, 100, 1000 clients (each speaking
             about once a second), and closed-loop throughput against (b)
  3. idle    10,000 idle authenticated connections: RSS each; one utterance among them
  4. mixed   Zipf-distributed texts over a catalogue: hit rate, coalescing, latencies
  5. http    OpenAI's POST /v1/audio/speech: time to first audio byte at 1, 10, 100
             clients minus (a), the WebSocket in the same turns, paced at 100 too; a
             cold herd (100 requests at once); cached first byte at 1 and 100
  6. formats each audio format live at 10 clients (the base ones, and 16 and 8 kHz PCM
             and G.711 μ-law), first byte against mp3 in the same turns; the server's
             CPU per second of audio sent; each transcoder alone
  7. cluster one instance in cluster mode (REDIS_URL, a local redis-server) against one
             without, loaded at once, live at 100 clients (50 each; paced, then closed
             loop), with the server's CPU per utterance, Redis on the server's core;
             the closed loop again with Redis on the other core; a second instance's
             first byte when it joins the first one's synthesis of the same text; a
             third one's shared-tier hits
  8. streaming  replies streamed a word at a time at 30 words/s, 1 and 10 clients: the
             first byte after the first sentence is complete, against that sentence
             spoken whole; the smallest slack of a listener playing from the first byte
  9. hostile issue 31's attacks, each on a new server with the limits it meets at their
             defaults, the attacker and the victim on two loopback addresses (two
             client IPs), each in its own process: the victim's first byte of a live
             and of a cached speak, and /health's answer, without the attack and
             during it; and what the attacker got
  10. agents  an LLM-like reply streamed a word at a time at 30 words/s through the
             voice-agent doors, in the same turns: (a) /v1/stream's streaming input,
             (b) ElevenLabs' multi-stream-input, (c) Cartesia's /tts/websocket, 16 kHz
             PCM, at 10 and 100 clients: first audio after the first piece against
             (a), finals, stray audio, errors, the server's and the fake's CPU
  11. tenants the cost of per-tenant accounting: a server with TTS_API_KEY only (a)
             against one with API_KEYS_FILE's tenants (b: every speak checked against
             its tenant's limits and quotas, charged, tallied and written to SQLite),
             loaded at once, live at 100 clients (50 each; paced, then closed loop),
             with the server's CPU per utterance; and bench/usage_writes.py's
             micro-measures (SqliteUsage.add's rows a second, Usage.record's calls a
             second)
  12. resume  the cost of keeping each utterance's frames for a resume: a server with
             RESUME_WINDOW=0 (a) against one with the default (b), loaded at once, live
             at 100 clients (50 each; paced, then closed loop), with the server's CPU
             per utterance and RSS; then 200 clients that drop mid-utterance (no close
             frame): the RSS their parked utterances add, against the same utterances
             heard whole on a server that keeps no log; the time a resume takes; and
             bench/resume_logs.py's micro-measure (what a log holds in memory)
  13. scale   live streams at 100, 300 and 1,000 clients, paced like real use, through
             the WebSocket and the OpenAI door against edge-tts alone, the fake at real
             time in several processes: added first byte, CPU per stream-second, RSS
             per stream, event-loop lag, and the fake's and clients' CPU (bench/scale.py)
  14. burst   clients asking for the same cached text at once: the last one's first
             byte against a bare websockets server's (bench/burst.py)
  15. soak    mixed load at 70 % of the measured limit for 30 minutes: RSS, open files
             and tasks after warm-up, errors (bench/soak.py; only with --only soak)

    .venv/bin/python bench/run.py            # the full run (scenarios 1 to 14)
    .venv/bin/python bench/run.py --only soak   # the 30-minute soak
    .venv/bin/python bench/run.py --quick    # under a minute; CI runs it so it cannot rot

A quick run runs every scenario at its smallest size, with the fake service 20×
real time and its first audio after 50 ms: its figures only show that the code
works. The load processes are kept for the whole run (load.py --pool).

Closed-loop clients (each asks again as soon as its last request ended) spread their
first requests over RAMP seconds, so that N clients are N clients at work and not a
herd re-formed every round; the herd is measured on its own (scenario 5).

Writes bench/results.md and bench/results.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TEXT = "Benchmarks measure the server against its limits, one sentence at a time."
KEY = "bench-key"
TICKS = os.sysconf("SC_CLK_TCK")
#: The speak's "words" modes the closed-loop replay is measured in; "batch" is
#: what the bundled clients ask for.
WORD_MODES = ("each", "batch", "none")
#: Turns of baseline (a) and server per live level in a full run.
REPEATS = 3
#: Paired turns of scenario 7: closed loop (each with Redis beside, then apart), and
#: paced (each paced turn is longer).
CLUSTER_REPEATS, CLUSTER_PACED_REPEATS = 8, 8
#: Mean seconds a paced client of scenario 7 thinks between two speaks (full run,
#: quick run: Bench.think).
PACED_THINK = 2.0
QUICK_THINK = 0.2
#: The fake service's first-audio delay (s) and pace (× real time) in a quick run,
#: unless given: the same protocol and chunks as in a full run, sent faster, so that
#: every scenario runs at its smallest size in a few seconds.
QUICK_TTFA, QUICK_SPEED = 0.05, 20.0
#: Seconds over which closed-loop clients' first requests are spread: about one
#: request's length at the fake's pace (TEXT is about 5 s of audio, sent at 4x).
#: Started together, they would stay a herd round after round (load.py's _ramp).
RAMP = 1.5
#: Rounds of the cold herd (scenario 5): every client's one request sent at once.
HERD_ROUNDS = 8
#: Scenario 7's settings, in the order they run: the runs of the instance alone and of
#: the one in cluster mode. Paced (each client thinks PACED_THINK s on average between
#: speaks), closed loop (each asks again at once), and the closed loop with Redis moved
#: to the other core.
CLUSTER_SETTINGS = {
    "paced": ("single_paced", "cluster_paced"),
    "closed": ("single", "cluster"),
    "apart": ("single_apart", "cluster_apart"),
}
#: Scenario 9: the loopback addresses the attacker and the victim connect from, two
#: client IPs that the server's TRUSTED_PROXIES does not cover.
ATTACKER_IP, VICTIM_IP = "127.0.0.2", "127.0.0.3"
#: The victim's samples without the attack and during it, each (full run); seconds
#: between two samples; seconds a probe may take before it counts as an error.
HOSTILE_SAMPLES, HOSTILE_GAP, PROBE_TIMEOUT = 20, 0.2, 30.0
#: Scenario 9's IDLE_TIMEOUT, seconds (full run, quick run): short enough for waves
#: of idle connections (finding 3) to be closed within the victim's samples.
HOSTILE_IDLE_TIMEOUT = (5.0, 2.0)
#: Idle connections per wave (finding 3; full run, quick run), as in issue 31 (300
#: to 1,000 from one IP).
IDLE_CONNECTIONS = (1000, 300)
#: Seconds between two tries of GET / then a WebSocket handshake (finding 2).
UPGRADE_PACE = 0.05
#: Characters of each long /tts of finding 4, as in issue 31.
LONG_TEXT = 4900
#: Seconds an attacker runs at most if never told to stop.
ATTACK_MAX_S = 600.0
#: What the victim times: a live speak, a cached speak, /health.
PROBES = ("live", "cached", "health")
#: Scenario 6's formats beyond the base ones: telephony's and voice agents' PCM and G.711.
EXTRA_FORMATS = ("pcm_16000", "pcm_8000", "ulaw_8000")
#: Scenario 10: the doors, in their first turn's order ((a) is the one compared with).
AGENT_DOORS = ("v1", "elevenlabs", "cartesia")
#: Scenario 10: words a second an agent's LLM writes its reply at (a quick run: ×5,
#: as the fake's audio is faster too).
AGENT_TOKENS_PER_S = 30
#: Scenario 10: replies per client per turn at each level of a full run.
AGENT_REQUESTS = {10: 4, 100: 2}
#: Scenario 10: seconds over which the clients' first replies are spread (about a
#: reply's length: its words typed in 1.5 s, its audio sent at the fake's pace).
AGENT_RAMP = 3.0
#: Scenario 11: tenants in the keys file, the clients spread over them.
TENANT_COUNT = 4
#: Scenario 11's settings, in the order they run: paced (each client thinks
#: PACED_THINK s on average between speaks; 0.5 s in a quick run), then closed loop;
#: by setting, its paired turns and each client's speaks per turn (full run, quick
#: run). A paced turn lasts as long as its slowest client's thinking: about 27 s for
#: 5 speaks at 50 clients, 50 s for 10.
TENANT_SETTINGS = ("paced", "closed")
TENANT_REPEATS = {"paced": (4, 1), "closed": (4, 1)}
TENANT_REQUESTS = {"paced": (5, 1), "closed": (10, 1)}
#: Scenario 11's micro-measures (bench/usage_writes.py): tenants and doors of a batch,
#: batches written, rounds of 10,000 records and of 10,000 charges (full run, quick).
USAGE_WRITES = (
    {"tenants": 100, "doors": 7, "batches": 200, "records": 30, "charges": 30},
    {"tenants": 100, "doors": 7, "batches": 10, "records": 3, "charges": 3},
)
#: Scenario 12's paired settings, as scenario 11's: paced, then closed loop; by setting,
#: its paired turns and each client's speaks per turn (full run, quick run).
RESUME_SETTINGS = ("paced", "closed")
RESUME_REPEATS = {"paced": (4, 1), "closed": (4, 1)}
RESUME_REQUESTS = {"paced": (5, 1), "closed": (10, 1)}
#: Scenario 12's parked utterances (full run, quick run): clients, each speaking a text
#: of that many of bench/load.py's long_text's sentences (about 4.5 s of audio each);
#: the server's RESUME_WINDOW for them, s (long enough for an utterance to end while
#: parked); where each client drops, a random share of the utterance's audio in this
#: range; how long a resuming client stays away, s; seconds over which the clients'
#: speaks are spread; seconds let pass before the server's memory is read.
RESUME_PARKED = (200, 20)
RESUME_SENTENCES = (13, 1)
RESUME_PARK_WINDOW = (20.0, 1.0)
RESUME_CUT = (0.10, 0.25)
RESUME_AWAY = (1.0, 0.2)
RESUME_RAMP = (RAMP, 0.2)
RESUME_SETTLE = (1.0, 0.3)
#: Scenarios in modules of their own, each with ``run(bench)`` and ``markdown(out)``:
#: 13, live streams at scale; 14, fair bursts of replays; 15, the soak (not in the
#: default run: 30 minutes).
SCENARIO_MODULES = ("scale", "burst", "soak")
#: The soak's seconds (full run, quick run: CI runs `bench/soak.py --seconds 60`).
SOAK_SECONDS = (1800.0, 20.0)
#: The two servers of a paired turn (scenarios 11 and 12).
PAIR = ("a", "b")
_DRAINS: set[asyncio.Future[Any]] = set()
#: Load process id -> the file it writes its results to.
worker_outputs: dict[int, str] = {}
#: The pooled load processes waiting for a spec, by the cores they run on; and each
#: one's cores, by process id.
_idle_workers: dict[frozenset[int], list[asyncio.subprocess.Process]] = {}
_worker_cpus: dict[int, frozenset[int]] = {}


@dataclass
class Process:
    process: asyncio.subprocess.Process
    match: str
    #: Its standard output so far, when started with ``keep_output`` (a server's
    #: access log).
    output: bytearray = field(default_factory=bytearray)
    #: Its standard error so far, likewise (a server's other log lines).
    errors: bytearray = field(default_factory=bytearray)


def _cpus() -> tuple[set[int], set[int]]:
    """The server's core and everyone else's (the fake service, the load clients).

    The server under test gets a core of its own, as it would on a real host,
    where neither Microsoft's service nor the clients share its CPU; on a single
    CPU everything shares it.
    """
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return set(available), set(available)
    return {available[-1]}, set(available[:-1])


SERVER_CPUS, OTHER_CPUS = _cpus()


def on_cpus(cpus: set[int]) -> Any:
    """A ``preexec_fn`` that runs the child (and all its threads) on ``cpus``."""
    return lambda: os.sched_setaffinity(0, cpus)


async def start(
    args: list[str],
    env: dict[str, str],
    pattern: str,
    cpus: set[int] = OTHER_CPUS,
    *,
    keep_output: bool = False,
) -> Process:
    process = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=on_cpus(cpus),
    )
    assert process.stdout is not None and process.stderr is not None
    pending = {
        asyncio.ensure_future(process.stdout.readline()): process.stdout,
        asyncio.ensure_future(process.stderr.readline()): process.stderr,
    }
    while pending:
        done, _ = await asyncio.wait(pending, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise RuntimeError(f"{args} did not start")
        for task in done:
            stream = pending.pop(task)
            line = task.result().decode()
            if match := re.search(pattern, line):
                for other in pending:
                    other.cancel()
                # Keep draining both pipes so the process never blocks on a full one.
                started = Process(process, match.group(1))
                _DRAINS.add(
                    asyncio.ensure_future(
                        _keep(process.stdout, started.output)
                        if keep_output
                        else process.stdout.read()
                    )
                )
                _DRAINS.add(
                    asyncio.ensure_future(
                        _keep(process.stderr, started.errors)
                        if keep_output
                        else process.stderr.read()
                    )
                )
                return started
            if line:
                pending[asyncio.ensure_future(stream.readline())] = stream
    raise RuntimeError(f"{args} exited before starting")


async def _keep(stream: asyncio.StreamReader, into: bytearray) -> None:
    while chunk := await stream.read(2**16):
        into += chunk


#: An access-log line of an utterance Edge spoke: its time to first audio, and Edge's.
_SPOKEN = re.compile(rb" utterance .* ttfb_ms=([0-9.]+) upstream_ms=([0-9.]+) ")


def own_times(output: bytes | bytearray) -> list[float]:
    """The server's own part of each Edge utterance's time to first audio, in ms
    (``ttfb_ms`` minus ``upstream_ms``, from the access log in ``output``)."""
    return [float(ttfb) - float(upstream) for ttfb, upstream in _SPOKEN.findall(output)]


async def stop(process: Process) -> None:
    if process.process.returncode is None:
        process.process.terminate()
        try:
            await asyncio.wait_for(process.process.wait(), 10)
        except TimeoutError:
            process.process.kill()
            await process.process.wait()


def usage(pid: int) -> tuple[float, int, int]:
    """CPU seconds used so far, current RSS and peak RSS in bytes, of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / TICKS
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]
    peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) * 1024  # type: ignore[union-attr]
    return cpu, rss, peak


async def load(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run one load process per spec: connect, start all at once, gather their results."""
    workers = await ready_workers(specs)
    await signal_workers(workers, b"go\n")
    return await results_of(workers)


async def ready_workers(specs: list[dict[str, Any]]) -> list[asyncio.subprocess.Process]:
    """Give each spec to a load process and wait until each has connected its clients.

    The processes are kept between loads (``load.py --pool``), one pool for each set
    of cores: starting one for every load took about a second, as long as a quick
    run's loads themselves.
    """
    workers = []
    for spec in specs:
        spec["out"] = tempfile.mkstemp(prefix="ttsstream-load-", suffix=".json")[1]
        spec_file = tempfile.mkstemp(prefix="ttsstream-spec-", suffix=".json")[1]
        Path(spec_file).write_text(json.dumps(spec))
        # Baseline (a) plays the server's part: it runs where the server runs.
        cpus = frozenset(SERVER_CPUS if spec["mode"] == "edge" else OTHER_CPUS)
        idle = _idle_workers.setdefault(cpus, [])
        worker = idle.pop() if idle else await _new_worker(cpus)
        worker_outputs[worker.pid] = spec["out"]
        _worker_cpus[worker.pid] = cpus
        assert worker.stdin is not None
        worker.stdin.write(f"{spec_file}\n".encode())
        workers.append(worker)
    for worker in workers:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 300)
        assert line == b"ready\n", line
    return workers


async def _new_worker(cpus: frozenset[int]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        PYTHON,
        str(ROOT / "bench" / "load.py"),
        "--pool",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=on_cpus(set(cpus)),
    )


async def signal_workers(workers: list[asyncio.subprocess.Process], line: bytes) -> None:
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(line)
        await worker.stdin.drain()


async def results_of(workers: list[asyncio.subprocess.Process]) -> list[dict[str, Any]]:
    """Each worker's results once it says ``done``; a pooled one goes back to its
    pool, any other (bench/hostile.py's) is waited for."""
    results = []
    for worker in workers:
        assert worker.stdout is not None
        line = await worker.stdout.readline()
        if line != b"done\n":
            await worker.wait()
            raise RuntimeError(f"a load process failed ({worker.returncode}): {line!r}")
        path = Path(worker_outputs.pop(worker.pid))
        results.append(json.loads(path.read_text()))
        path.unlink()
        if worker.pid in _worker_cpus:
            _idle_workers[_worker_cpus[worker.pid]].append(worker)
        else:
            await worker.wait()
            assert worker.returncode == 0, f"a load process failed ({worker.returncode})"
    return results


async def close_workers() -> None:
    """End the pooled load processes (their stdin closed, each exits)."""
    for idle in _idle_workers.values():
        for worker in idle:
            assert worker.stdin is not None
            worker.stdin.close()
            await worker.wait()
        idle.clear()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def split(total: int, parts: int) -> list[int]:
    return [
        total // parts + (1 if i < total % parts else 0)
        for i in range(parts)
        if total // parts or i < total
    ]


def _signed(values: list[float]) -> str:
    return ", ".join(f"{value:+.1f}" for value in values) or "none"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` and their sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarize(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    results = [r for output in outputs for r in output["results"]]
    good = [r for r in results if "error" not in r]
    first = [r["ttfb"] * 1000 for r in good]
    last = [r["ttlb"] * 1000 for r in good]
    return {
        "requests": len(results),
        "errors": len(results) - len(good),
        "dropped": sum(o.get("dropped", 0) for o in outputs),
        "first_p50": percentile(first, 0.5),
        "first_p95": percentile(first, 0.95),
        "first_p99": percentile(first, 0.99),
        "last_p50": percentile(last, 0.5),
        "last_p95": percentile(last, 0.95),
        "last_p99": percentile(last, 0.99),
        "bytes": sum(r["bytes"] for r in good),
        "elapsed": max(o["elapsed"] for o in outputs),
        "cached": sum(1 for r in good if r.get("cached")),
        # Frames the client received per utterance (the median).
        "frames": percentile([r.get("frames", 0) for r in good], 0.5),
    }


@dataclass
class Paired:
    """Two servers on the server's core, (a) and (b), loaded at once with half the
    clients each, turn after turn, so that both see the same machine (scenario 7's
    paired turns, as scenarios 11 and 12 use them); by setting, each one's loads, CPU
    and own part of the time to first audio, and each turn's added p50 ((b) minus (a)).

    Both servers keep their output (:meth:`Bench.logged_server`): their access logs give
    the server's own part of each time to first audio (``ttfb_ms`` − ``upstream_ms``).
    """

    a: Process
    b: Process
    settings: tuple[str, ...]

    def __post_init__(self) -> None:
        settings = self.settings
        self.runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            setting: {name: [] for name in PAIR} for setting in settings
        }
        self.cpu = {setting: dict.fromkeys(PAIR, 0.0) for setting in settings}
        self.wall = dict.fromkeys(settings, 0.0)
        self.turns: dict[str, list[float]] = {setting: [] for setting in settings}
        self.own: dict[str, dict[str, list[float]]] = {
            setting: {name: [] for name in PAIR} for setting in settings
        }
        self.own_turns: dict[str, list[float]] = {setting: [] for setting in settings}

    async def turn(self, setting: str, number: int, loads: dict[str, list[dict[str, Any]]]) -> None:
        """One turn of ``setting``: (a)'s and (b)'s ``loads`` at once, their load processes
        started and told to go in turn, (a)'s first in even turns and (b)'s in odd ones."""
        servers = {"a": self.a, "b": self.b}
        before = {name: usage(server.process.pid)[0] for name, server in servers.items()}
        logged = {name: len(server.output) for name, server in servers.items()}
        order = ["a", "b"] if number % 2 == 0 else ["b", "a"]
        done = await load(loads[order[0]] + loads[order[1]])
        for name, server in servers.items():
            self.cpu[setting][name] += usage(server.process.pid)[0] - before[name]
        first_count = len(loads[order[0]])
        ours = {order[0]: done[:first_count], order[1]: done[first_count:]}
        for name in PAIR:
            self.runs[setting][name] += ours[name]
        self.wall[setting] += summarize(done)["elapsed"]
        self.turns[setting].append(
            summarize(ours["b"])["first_p50"] - summarize(ours["a"])["first_p50"]
        )
        await asyncio.sleep(0.3)  # the access log is written within 50 ms, in bursts
        mine = {name: own_times(server.output[logged[name] :]) for name, server in servers.items()}
        if not mine["a"] or not mine["b"]:  # the access log's format changed
            raise RuntimeError("no Edge utterance with upstream_ms in the access logs")
        for name in PAIR:
            self.own[setting][name] += mine[name]
        self.own_turns[setting].append(percentile(mine["b"], 0.5) - percentile(mine["a"], 0.5))

    def summary(self, setting: str) -> dict[str, Any]:
        """``setting``'s figures: first byte p50/p99 of each, added, turn by turn, the
        server's own part, requests, errors, CPU per utterance (ms), the core's share."""
        served = {name: summarize(self.runs[setting][name]) for name in PAIR}
        own = self.own[setting]
        return {
            **{
                f"{name}_first_{p}": served[name][f"first_{p}"]
                for name in PAIR
                for p in ("p50", "p99")
            },
            "added_p50": served["b"]["first_p50"] - served["a"]["first_p50"],
            "added_p99": served["b"]["first_p99"] - served["a"]["first_p99"],
            "turns_added_p50": self.turns[setting],
            "turns_mean_sd": mean_sd(self.turns[setting]),
            # The server's own part of the time to first audio (see scenario 7).
            **{f"{name}_own_p50": percentile(own[name], 0.5) for name in PAIR},
            "own_added_p50": percentile(own["b"], 0.5) - percentile(own["a"], 0.5),
            "own_added_p99": percentile(own["b"], 0.99) - percentile(own["a"], 0.99),
            "own_turns_added_p50": self.own_turns[setting],
            "own_turns_mean_sd": mean_sd(self.own_turns[setting]),
            "requests": {name: served[name]["requests"] for name in PAIR},
            "errors": {name: served[name]["errors"] for name in PAIR},
            # Server CPU per utterance, ms; the share of the server's core both used.
            **{
                f"{name}_cpu_ms": 1000 * self.cpu[setting][name] / max(1, served[name]["requests"])
                for name in PAIR
            },
            "busy": sum(self.cpu[setting].values()) / max(self.wall[setting], 1e-9),
        }


@dataclass
class Bench:
    quick: bool
    fake_urls: tuple[str, str]
    out: dict[str, Any] = field(default_factory=dict)
    workers: int = 2
    #: The fake Edge service's process id, to measure its CPU (0: not measured).
    fake_pid: int = 0

    @property
    def gap(self) -> float:
        """Seconds between two samples of scenario 9's victim."""
        return 0.05 if self.quick else HOSTILE_GAP

    @property
    def think(self) -> float:
        """Mean seconds a paced client thinks between two speaks."""
        return QUICK_THINK if self.quick else PACED_THINK

    def server_env(self, cache: str, **extra: str) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.isupper() or key in ("PATH", "HOME", "LANG", "PYTHONPATH")
        }
        env.update(
            {
                "HOST": "127.0.0.1",
                "PORT": "0",
                "HEALTH_PORT": "0",
                "EDGE_WSS_URL": self.fake_urls[0],
                "EDGE_VOICES_URL": self.fake_urls[1],
                "CACHE_DIR": cache,
                "RATE_LIMIT_REQUESTS": "0",
                "MAX_CONNECTIONS_PER_IP": "100000",
                "MAX_CONNECTIONS": "100000",
                "UPSTREAM_CONCURRENCY": "1000",
                # The load all comes from 127.0.0.1: no share per client IP (a quarter
                # by default) caps it. Scenario 9 sets its own.
                "UPSTREAM_CONCURRENCY_PER_IP": "1000",
                "LOG_LEVEL": "INFO",
                **extra,
            }
        )
        return env

    async def server(self, cache: str, **extra: str) -> tuple[Process, str]:
        return await self.logged_server(cache, extra, keep_output=False)

    async def logged_server(
        self, cache: str, extra: dict[str, str], *, keep_output: bool = True
    ) -> tuple[Process, str]:
        """A server as :meth:`server` starts one, whose output is kept (``keep_output``)."""
        server = await start(
            [PYTHON, "-m", "ttsstream", "serve"],
            self.server_env(cache, **extra),
            r"listening on (127\.0\.0\.1:\d+)",
            cpus=SERVER_CPUS,
            keep_output=keep_output,
        )
        return server, f"ws://{server.match}/v1/stream"

    def half_load(
        self, url: str, clients: int, requests: int, think: float, offset: int, **extra: Any
    ) -> list[dict[str, Any]]:
        """Half of ``clients`` live clients at ``url`` (one server of a :class:`Paired`
        turn), each speaking ``requests`` new texts from ``offset``, thinking ``think`` s
        on average before each (paced), or, without, asking again at once (closed
        loop, their first requests spread over RAMP)."""
        return [
            {
                "mode": "speak",
                "url": url,
                "words": "batch",
                "clients": n,
                "requests": requests,
                "texts": [TEXT],
                "unique": True,
                "think": think,
                "ramp": 0.0 if think else RAMP,
                "offset": offset + part * 10**5,
                "seed": part,
                **extra,
            }
            for part, n in enumerate(split(clients // 2, self.workers))
        ]

    def baseline_spec(
        self, clients: int, requests: int, offset: int, **extra: Any
    ) -> dict[str, Any]:
        """Baseline (a)'s load: edge-tts alone, one process (on the server's core)."""
        return {
            "mode": "edge",
            "wss_url": self.fake_urls[0],
            "clients": clients,
            "requests": requests,
            "texts": [TEXT],
            "offset": offset,
            **extra,
        }

    def door_specs(
        self, door: dict[str, Any], clients: int, requests: int, offset: int, **extra: Any
    ) -> list[dict[str, Any]]:
        """A door's load (``door`` but for its clients): new texts, split over the
        load processes."""
        return [
            {
                **door,
                "clients": n,
                "requests": requests,
                "texts": [TEXT],
                "unique": True,
                "seed": i,
                "offset": offset + 10**6 * (i + 1),
                **extra,
            }
            for i, n in enumerate(split(clients, min(self.workers, clients)))
        ]

    async def against_baseline(
        self,
        server: Process,
        ours: dict[str, Any],
        offset: int,
        *,
        beside: dict[str, Any] | None = None,
        think: float = 0.0,
        levels: tuple[int, ...] | None = None,
    ) -> list[dict[str, Any]]:
        """Time to first audio through the server at each live level, against baseline (a).

        ``ours`` is the load spec of the server's clients but for their number and
        texts. Baseline and server take turns, REPEATS times, and the samples of all
        turns are pooled: this machine's speed drifts by more than the differences
        measured. ``beside`` is another door's spec, timed in the same turns (before
        ``ours`` in odd turns, after it in even ones), so that the two doors are
        compared in the same minutes; its rows are ``beside_*``. With ``think``, every
        client (the baseline's too) thinks that many seconds on average before each
        request, so that the server is not saturated; without, the clients' first
        requests are spread over RAMP seconds, and each asks again as soon as its
        last request ended (closed loop).
        """
        if levels is None:
            levels = (10,) if self.quick else (1, 10, 100)
        requests = 1 if self.quick else 10
        # Closed loop, the clients' first requests are spread (see RAMP).
        ramp = 0.0 if think else RAMP
        rows = []
        for clients in levels:
            baseline_runs: list[dict[str, Any]] = []
            our_runs: list[dict[str, Any]] = []
            beside_runs: list[dict[str, Any]] = []
            cpu = 0.0
            for repeat in range(1 if self.quick else REPEATS):
                turn = offset + 10**8 * repeat
                # Baseline (a) is one process on the server's core: what the server
                # is, less ttsstream.
                paced = {"think": think, "ramp": ramp}
                baseline_runs += await load([self.baseline_spec(clients, requests, turn, **paced)])
                doors = [(ours, our_runs, 0)]
                if beside is not None:
                    doors.insert(repeat % 2, (beside, beside_runs, 10**7))
                for spec, runs, shift in doors:
                    cpu0, _, _ = usage(server.process.pid)
                    at = turn + shift + clients * 1000
                    runs += await load(self.door_specs(spec, clients, requests, at, **paced))
                    if runs is our_runs:
                        cpu += usage(server.process.pid)[0] - cpu0
            baseline, summary = summarize(baseline_runs), summarize(our_runs)
            _, _, peak = usage(server.process.pid)
            if beside is not None:
                other = summarize(beside_runs)
                extra = {
                    **{f"beside_first_{p}": other[f"first_{p}"] for p in ("p50", "p99")},
                    **{
                        f"beside_added_{p}": other[f"first_{p}"] - baseline[f"first_{p}"]
                        for p in ("p50", "p99")
                    },
                    "beside_errors": other["errors"],
                }
            else:
                extra = {}
            rows.append(
                {
                    "clients": clients,
                    **{
                        f"baseline_first_{p}": baseline[f"first_{p}"] for p in ("p50", "p95", "p99")
                    },
                    **{f"first_{p}": summary[f"first_{p}"] for p in ("p50", "p95", "p99")},
                    **{
                        f"added_{p}": summary[f"first_{p}"] - baseline[f"first_{p}"]
                        for p in ("p50", "p95", "p99")
                    },
                    "errors": summary["errors"] + baseline["errors"],
                    "dropped": summary["dropped"],
                    "requests": summary["requests"],
                    "server_cpu_s": cpu,
                    "server_peak_rss_mb": peak / 2**20,
                    **extra,
                }
            )
        return rows

    async def herd(self, doors: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Every client's one request sent at the same moment, round after round.

        ``doors`` maps a name to a load spec but for its clients; baseline (a) goes
        first in each round's turns, then the doors in turn (their order rotating).
        The median over the rounds of each round's p50 and slowest.
        """
        clients = 10 if self.quick else 100
        rounds = 1 if self.quick else HERD_ROUNDS
        times: dict[str, list[tuple[float, float]]] = {"edge": [], **{name: [] for name in doors}}
        for number in range(rounds):
            names = list(doors)
            names = names[number % len(names) :] + names[: number % len(names)]
            for position, name in enumerate(["edge", *names]):
                # New texts for every turn: each door's own, none the cache has.
                offset = 7 * 10**9 + number * 10**8 + position * 10**7
                specs = (
                    [self.baseline_spec(clients, 1, offset)]
                    if name == "edge"
                    else self.door_specs(doors[name], clients, 1, offset)
                )
                runs = await load(specs)
                firsts = [r["ttfb"] * 1000 for run in runs for r in run["results"] if "ttfb" in r]
                times[name].append((percentile(firsts, 0.5), max(firsts)))
                # The round's entries stored before the next turn.
                await asyncio.sleep(0.1 if self.quick else 0.5)
        return {
            "clients": clients,
            "rounds": rounds,
            **{
                name: {
                    "p50": statistics.median(p50 for p50, _ in rows),
                    "slowest": statistics.median(slowest for _, slowest in rows),
                }
                for name, rows in times.items()
            },
        }

    async def live(self) -> None:
        with tempfile.TemporaryDirectory() as cache:
            server, url = await self.server(cache)
            try:
                # "words": "batch", as the bundled clients ask.
                ours = {"mode": "speak", "url": url, "words": "batch"}
                self.out["live"] = await self.against_baseline(server, ours, 0)
            finally:
                await stop(server)

    async def http(self) -> None:
        requests = 1 if self.quick else 10
        cached_rows = []
        with tempfile.TemporaryDirectory() as cache:
            server, url = await self.server(cache)
            base = url.replace("ws://", "http://").replace("/v1/stream", "")
            try:
                # The WebSocket in the same turns: the target is to add what it adds.
                http = {"mode": "http", "url": base}
                ws = {"mode": "speak", "url": url, "words": "none"}
                rows = await self.against_baseline(server, http, 5 * 10**7, beside=ws)
                # The most clients again, each thinking between requests (as in
                # scenario 7), so that the server's core is not kept busy (the same
                # code with a think: not in a quick run).
                if not self.quick:
                    paced = await self.against_baseline(
                        server, http, 6 * 10**7, beside=ws, think=PACED_THINK, levels=(100,)
                    )
                    rows += [{**row, "think_s": PACED_THINK} for row in paced]
                # A cold herd: every client's request at the same moment.
                herd = await self.herd({"WebSocket": ws, "HTTP": http})
                # Cached: one text, stored first, then asked by every client (the
                # earlier turns' entries are stored once their load ends).
                entries = (await side_stats(server))["cache_entries"]
                await load(
                    [{"mode": "http", "url": base, "clients": 1, "requests": 1, "texts": [TEXT]}]
                )
                await stored(server, entries + 1)
                for clients in (10,) if self.quick else (1, 100):
                    parts = split(clients, min(self.workers, clients))
                    runs = await load(
                        [
                            {
                                "mode": "http",
                                "url": base,
                                "clients": n,
                                "requests": requests,
                                "texts": [TEXT],
                            }
                            for n in parts
                        ]
                    )
                    cached = summarize(runs)
                    hits = sum(1 for run in runs for r in run["results"] if r.get("cached"))
                    cached_rows.append(
                        {
                            "clients": clients,
                            "requests": cached["requests"],
                            "hits": hits,
                            "first_p50": cached["first_p50"],
                            "first_p99": cached["first_p99"],
                            "last_p50": cached["last_p50"],
                            "last_p99": cached["last_p99"],
                            "errors": cached["errors"],
                        }
                    )
            finally:
                await stop(server)
        self.out["http"] = {"live": rows, "cached": cached_rows, "herd": herd}

    async def formats(self) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.fake_edge import tone_frames
        from ttsstream.audio.formats import FORMAT_NAMES, format_named
        from ttsstream.audio.transcode import Transcoder

        names = FORMAT_NAMES + EXTRA_FORMATS

        clients = 2 if self.quick else 10
        requests = 1 if self.quick else 10
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        cpu = dict.fromkeys(names, 0.0)
        replays: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory() as cache:
            server, url = await self.server(cache)
            try:
                # The formats take turns, REPEATS times, so that the machine's drift
                # falls on all of them alike.
                for repeat in range(1 if self.quick else REPEATS):
                    for number, name in enumerate(names):
                        parts = split(clients, min(self.workers, clients))
                        cpu0, _, _ = usage(server.process.pid)
                        runs[name] += await load(
                            [
                                {
                                    "mode": "speak",
                                    "url": url,
                                    "words": "batch",
                                    "format": name,
                                    "clients": n,
                                    "requests": requests,
                                    "texts": [TEXT],
                                    "unique": True,
                                    "offset": 7 * 10**8
                                    + repeat * 10**7
                                    + number * 10**6
                                    + part * 10**5,
                                }
                                for part, n in enumerate(parts)
                            ]
                        )
                        cpu[name] += usage(server.process.pid)[0] - cpu0
                # Replays: one text, stored once, then asked in each format by every
                # client in turn (each request waits for the previous one's end).
                entries = (await side_stats(server))["cache_entries"]
                await load(
                    [{"mode": "speak", "url": url, "clients": 1, "requests": 1, "texts": [TEXT]}]
                )
                await stored(server, entries + 1)
                for name in names:
                    parts = split(clients, min(self.workers, clients))
                    cpu0, _, _ = usage(server.process.pid)
                    replayed = await load(
                        [
                            {
                                "mode": "speak",
                                "url": url,
                                "words": "batch",
                                "format": name,
                                "clients": n,
                                "requests": requests,
                                "texts": [TEXT],
                            }
                            for n in parts
                        ]
                    )
                    summary = summarize(replayed)
                    replays[name] = {
                        "requests": summary["requests"],
                        "cached": summary["cached"],
                        "last_p50": summary["last_p50"],
                        "last_p99": summary["last_p99"],
                        "server_cpu_ms": (usage(server.process.pid)[0] - cpu0)
                        * 1000
                        / max(1, summary["requests"]),
                    }
            finally:
                await stop(server)
        mp3 = summarize(runs["mp3"])
        live = []
        for name in names:
            summary = summarize(runs[name])
            audio_s = (
                sum(r["audio_ms"] for run in runs[name] for r in run["results"] if "error" not in r)
                / 1000
            )
            live.append(
                {
                    "format": name,
                    "requests": summary["requests"],
                    "errors": summary["errors"],
                    "first_p50": summary["first_p50"],
                    "first_p99": summary["first_p99"],
                    "added_p50": summary["first_p50"] - mp3["first_p50"],
                    "added_p99": summary["first_p99"] - mp3["first_p99"],
                    # A stream plays in real time: CPU seconds per second of audio is
                    # the share of one core each concurrently streamed utterance takes.
                    "server_core_pct": cpu[name] / audio_s * 100 if audio_s else 0.0,
                    **{f"replay_{key}": value for key, value in replays[name].items()},
                }
            )
        # Each transcoder alone, on this process's thread: a minute of the fake's
        # two-tone MP3 (5 s in a quick run) in the fake's 576-byte chunks.
        seconds = 5 if self.quick else 60
        source = tone_frames(seconds * 1000 // 24)
        encoders = []
        for name in names:
            audio_format = format_named(name)
            assert audio_format is not None, name
            if not audio_format.transcoded:
                continue
            transcoder = Transcoder(audio_format)
            cpu0 = time.process_time()
            size = sum(
                len(transcoder.feed_mp3(source[i : i + 576])) for i in range(0, len(source), 576)
            )
            size += len(transcoder.finish())
            encoders.append(
                {
                    "format": name,
                    "core_pct": (time.process_time() - cpu0) / seconds * 100,
                    "kbit_s": size * 8 / seconds / 1000,
                }
            )
        self.out["formats"] = {"clients": clients, "live": live, "encoders": encoders}

    async def streaming(self) -> None:
        """Streaming input: words appended at 30 per second, as an LLM writes them."""
        first_sentence = "Streaming replies start to speak at the first full sentence."
        rest = "The next one follows without a gap. A third one ends the reply here."
        requests = 1 if self.quick else 10
        rows = []
        with tempfile.TemporaryDirectory() as cache:
            server, url = await self.server(cache)
            try:
                for clients in (2,) if self.quick else (1, 10):
                    base: list[dict[str, Any]] = []
                    streamed: list[dict[str, Any]] = []
                    for repeat in range(1 if self.quick else REPEATS):
                        offset = 8 * 10**8 + clients * 10**6 + repeat * 10**5
                        # The baseline: the same first sentence (new each time), spoken
                        # whole; then replies whose first sentence is new each time.
                        for name, runs, extra in (
                            ("base", base, {"texts": [first_sentence]}),
                            (
                                "stream",
                                streamed,
                                {"texts": [f"{first_sentence} {rest}"], "tokens_per_s": 30},
                            ),
                        ):
                            runs += await load(
                                [
                                    {
                                        "mode": "speak",
                                        "url": url,
                                        "clients": n,
                                        "requests": requests,
                                        "unique": "first",
                                        "offset": offset + part * 10**4 + len(name) * 10**3,
                                        **extra,
                                    }
                                    for part, n in enumerate(split(clients, self.workers))
                                ]
                            )
                    base_ok = [r for run in base for r in run["results"] if "error" not in r]
                    done = [r for run in streamed for r in run["results"] if "error" not in r]
                    errors = sum(
                        1 for run in base + streamed for r in run["results"] if "error" in r
                    )
                    base_ms = [r["ttfb"] * 1000 for r in base_ok]
                    after_ms = [r["first_after_sentence"] * 1000 for r in done]
                    rows.append(
                        {
                            "clients": clients,
                            "base_p50": percentile(base_ms, 0.5),
                            "stream_p50": percentile(after_ms, 0.5),
                            "stream_p99": percentile(after_ms, 0.99),
                            "added_p50": percentile(after_ms, 0.5) - percentile(base_ms, 0.5),
                            "min_slack_ms": min(r["min_slack"] for r in done) * 1000,
                            "segments": percentile([r["segments"] for r in done], 0.5),
                            "errors": errors,
                        }
                    )
            finally:
                await stop(server)
        self.out["streaming"] = rows

    async def agents(self) -> None:
        """Voice-agent doors: an LLM's reply streamed a word at a time through each door
        (scenario 10), the doors taking turns."""
        sys.path.insert(0, str(ROOT))
        from ttsstream.routes import websocket_route

        levels = (2,) if self.quick else (10, 100)
        tokens_per_s = AGENT_TOKENS_PER_S * (5 if self.quick else 1)
        doors = [
            name
            for name in AGENT_DOORS
            if name != "cartesia" or websocket_route("/tts/websocket") is not None
        ]
        rows = []
        with tempfile.TemporaryDirectory() as cache:
            server, url = await self.server(cache)
            base = url.removesuffix("/v1/stream")
            try:
                for clients in levels:
                    requests = 1 if self.quick else AGENT_REQUESTS[clients]
                    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in doors}
                    server_cpu = dict.fromkeys(doors, 0.0)
                    fake_cpu = dict.fromkeys(doors, 0.0)
                    for repeat in range(1 if self.quick else REPEATS):
                        # Each door first in one turn of three: the machine's drift
                        # falls on all of them alike.
                        order = doors[repeat % len(doors) :] + doors[: repeat % len(doors)]
                        for name in order:
                            offset = (
                                9 * 10**8
                                + clients * 10**6
                                + repeat * 10**5
                                + AGENT_DOORS.index(name) * 10**4
                            )
                            specs = [
                                {
                                    "mode": "agent",
                                    "door": name,
                                    "url": base,
                                    "clients": n,
                                    "requests": requests,
                                    "tokens_per_s": tokens_per_s,
                                    "ramp": 0.0 if self.quick else AGENT_RAMP,
                                    "seed": part,
                                    "offset": offset + part * 10**3,
                                }
                                for part, n in enumerate(split(clients, self.workers))
                            ]
                            server0 = usage(server.process.pid)[0]
                            fake0 = usage(self.fake_pid)[0] if self.fake_pid else 0.0
                            runs[name] += await load(specs)
                            server_cpu[name] += usage(server.process.pid)[0] - server0
                            if self.fake_pid:
                                fake_cpu[name] += usage(self.fake_pid)[0] - fake0
                    rows += agent_rows(clients, runs, server_cpu, fake_cpu)
                if "cartesia" not in doors:
                    rows += [
                        {"clients": clients, "door": "cartesia", "todo": True} for clients in levels
                    ]
            finally:
                await stop(server)
        self.out["agents"] = {
            # Its own date: a partial run keeps the other scenarios'.
            "date": time.strftime("%Y-%m-%d"),
            "tokens_per_s": tokens_per_s,
            "format": "pcm_16000",
            "rows": rows,
        }

    async def hostile(self) -> None:
        """Issue 31's attacks (findings 1 to 4), each on a new server: another client's
        first audio (live and cached) and /health's answer, without it and during it."""
        sys.path.insert(0, str(ROOT))
        from ttsstream.config import Config

        defaults = Config()
        idle_timeout = HOSTILE_IDLE_TIMEOUT[self.quick]
        # The limits the attacks meet, at their defaults (the bench's other servers
        # lift them); 127.0.0.1 trusted, the attacker's and the victim's addresses not.
        settings = {
            "TRUSTED_PROXIES": "127.0.0.1",
            "MAX_CONNECTIONS_PER_IP": str(defaults.max_connections_per_ip),
            "MAX_CONNECTIONS": str(defaults.max_connections),
            "UPSTREAM_CONCURRENCY": str(defaults.upstream_concurrency),
            "UPSTREAM_CONCURRENCY_PER_IP": str(defaults.upstream_concurrency_per_ip),
            "IDLE_TIMEOUT": str(idle_timeout),
        }
        attacks: dict[int, dict[str, Any]] = {
            1: {"mode": "junk_stream", "characters": defaults.max_stream_text_length},
            # From 127.0.0.1, as nginx in front would.
            2: {"mode": "upgrade_after_get", "source": "127.0.0.1", "pace": UPGRADE_PACE},
            3: {
                "mode": "idle_http",
                "connections": IDLE_CONNECTIONS[self.quick],
                "idle_timeout": idle_timeout,
            },
            # As many as the server has upstream slots.
            4: {
                "mode": "long_tts",
                "requests": defaults.upstream_concurrency,
                "characters": LONG_TEXT,
            },
        }
        samples = 2 if self.quick else HOSTILE_SAMPLES
        rows = []
        for finding, attack in attacks.items():
            # The server stops before its cache directory goes.
            with tempfile.TemporaryDirectory() as cache:
                server, url = await self.server(cache, **settings)
                try:
                    rows.append(
                        {
                            "finding": finding,
                            **await under_attack(server, url, finding, attack, samples, self.gap),
                        }
                    )
                finally:
                    await stop(server)
        self.out["hostile"] = {
            # Its own date: a partial run (--only hostile) keeps the other scenarios'.
            "date": time.strftime("%Y-%m-%d"),
            "samples": samples,
            "settings": {**settings, "UPSTREAM_SLOTS_PER_IP": defaults.upstream_slots_per_ip},
            "attacks": rows,
        }

    async def cluster(self) -> None:
        sys.path.insert(0, str(ROOT))
        from tests.redis_server import redis_command

        port = free_port()
        redis = await start(
            redis_command(port),
            dict(os.environ),
            r"(Ready to accept connections)",
            # First beside the server, the worst case for the instance (its CPU is
            # shared with Redis); then on the other core (moved, below).
            cpus=SERVER_CPUS,
        )
        redis_url = f"redis://127.0.0.1:{port}/0"
        clients = 10 if self.quick else 100
        requests = 1 if self.quick else 10
        pairs = 2 if self.quick else 20
        runs: dict[str, list[dict[str, Any]]] = {
            name: [] for names in CLUSTER_SETTINGS.values() for name in names
        }
        # By setting (CLUSTER_SETTINGS): CPU seconds of the two instances and of Redis,
        # seconds of load, each turn's added p50.
        settings = CLUSTER_SETTINGS
        cpu, redis_cpu = dict.fromkeys(runs, 0.0), dict.fromkeys(settings, 0.0)
        wall = dict.fromkeys(settings, 0.0)
        turns: dict[str, list[float]] = {setting: [] for setting in settings}
        # The server's own part of each time to first audio (ttfb_ms - upstream_ms, from
        # the access logs), by run; each turn's added p50 of it, by setting. Without the
        # fake service's and the clients' timing, it is the same comparison with less
        # noise: the two modes differ only before Edge is asked and after it answers.
        own: dict[str, list[float]] = {name: [] for name in runs}
        own_turns: dict[str, list[float]] = {setting: [] for setting in settings}

        def half_load(url: str, think: float, offset: int) -> list[dict[str, Any]]:
            """Half the clients at ``url``, each speaking new texts (from ``offset``)."""
            return [
                {
                    "mode": "speak",
                    "url": url,
                    "words": "batch",
                    "clients": n,
                    "requests": requests,
                    "texts": [TEXT],
                    "unique": True,
                    "think": think,
                    "ramp": 0.0 if think else RAMP,
                    "offset": offset + part * 10**5,
                    "seed": part,
                }
                for part, n in enumerate(split(clients // 2, self.workers))
            ]

        async def paired_turn(setting: str, think: float, offset: int) -> None:
            """One turn of ``setting``: the instance alone and the one in cluster mode
            loaded at once, half the clients each, so that both see the same machine."""
            alone_name, shared_name = settings[setting]
            pids = (single.process.pid, first.process.pid, redis.process.pid)
            before = [usage(pid)[0] for pid in pids]
            logged = (len(single.output), len(first.output))
            specs = half_load(single_url, think, offset)
            alone_specs = len(specs)
            specs += half_load(first_url, think, offset + 10**6)
            done = await load(specs)
            after = [usage(pid)[0] for pid in pids]
            alone, shared = done[:alone_specs], done[alone_specs:]
            cpu[alone_name] += after[0] - before[0]
            cpu[shared_name] += after[1] - before[1]
            redis_cpu[setting] += after[2] - before[2]
            runs[alone_name] += alone
            runs[shared_name] += shared
            wall[setting] += summarize(done)["elapsed"]
            turns[setting].append(summarize(shared)["first_p50"] - summarize(alone)["first_p50"])
            await asyncio.sleep(0.3)  # the access log is written within 50 ms, in bursts
            alone_own = own_times(single.output[logged[0] :])
            shared_own = own_times(first.output[logged[1] :])
            if not alone_own or not shared_own:  # the access log's format changed
                raise RuntimeError("no Edge utterance with upstream_ms in the access logs")
            own[alone_name] += alone_own
            own[shared_name] += shared_own
            own_turns[setting].append(percentile(shared_own, 0.5) - percentile(alone_own, 0.5))

        servers: list[Process] = []
        # The servers stop before their cache directories go (they may still be storing).
        with tempfile.TemporaryDirectory() as cache:
            try:
                # A rate limit too high to refuse anything, so that every speak and
                # handshake is decided by the limiter (in Redis, in cluster mode).
                limits = {"RATE_LIMIT_REQUESTS": "100000000"}
                single, single_url = await self.logged_server(cache + "/single", limits)
                servers.append(single)
                clustered = {"REDIS_URL": redis_url, **limits}
                first, first_url = await self.logged_server(cache + "/a", clustered)
                servers.append(first)
                second, second_url = await self.server(cache + "/b", **clustered)
                servers.append(second)
                # Both instances on the server's core, loaded at once (paired turns):
                # one instance's p50 moves by more than the 1 ms target from one turn
                # to the next, with the fake service and the load clients (bench/NOTES.md).
                # Paced (each client thinks PACED_THINK s on average between speaks: the
                # core is not saturated), then closed loop (each client asks again at
                # once: it is), then the closed loop with Redis moved to the other core.
                base = 9 * 10**8
                for repeat in range(1 if self.quick else CLUSTER_PACED_REPEATS):
                    await paired_turn("paced", self.think, base + repeat * 10**7)
                for repeat in range(1 if self.quick else CLUSTER_REPEATS):
                    await paired_turn("closed", 0.0, base + (20 + repeat) * 10**7)
                os.sched_setaffinity(redis.process.pid, OTHER_CPUS)
                for repeat in range(1 if self.quick else CLUSTER_REPEATS):
                    await paired_turn("apart", 0.0, base + (40 + repeat) * 10**7)
                alone, shared = summarize(runs["single"]), summarize(runs["cluster"])
                alone_apart = summarize(runs["single_apart"])
                shared_apart = summarize(runs["cluster_apart"])
                alone_paced = summarize(runs["single_paced"])
                shared_paced = summarize(runs["cluster_paced"])
                # The same new text on two instances at once: one synthesizes, the
                # other joins it through Redis; the gap between their first bytes.
                gaps, texts = [], []
                for number in range(pairs):
                    text = f"{TEXT} Pair {number}."
                    texts.append(text)
                    both = await load(
                        [
                            {
                                "mode": "speak",
                                "url": url,
                                "clients": 1,
                                "requests": 1,
                                "texts": [text],
                            }
                            for url in (first_url, second_url)
                        ]
                    )
                    firsts = sorted(run["results"][0]["ttfb"] * 1000 for run in both)
                    gaps.append(firsts[1] - firsts[0])
                await asyncio.sleep(1.5)  # stored (disk, then Redis) once quiet
                third, third_url = await self.server(cache + "/c", **clustered)
                servers.append(third)
                hits = await load(
                    [
                        {
                            "mode": "speak",
                            "url": third_url,
                            "clients": 1,
                            "requests": len(texts),
                            "texts": texts,
                            "in_order": True,
                        }
                    ]
                )
                tier = [r for r in hits[0]["results"] if "error" not in r]
            finally:
                for server in servers:
                    await stop(server)
                await stop(redis)
        self.out["cluster"] = {
            "clients": clients,
            "single_first_p50": alone["first_p50"],
            "single_first_p99": alone["first_p99"],
            "cluster_first_p50": shared["first_p50"],
            "cluster_first_p99": shared["first_p99"],
            "added_p50": shared["first_p50"] - alone["first_p50"],
            "added_p99": shared["first_p99"] - alone["first_p99"],
            "turns_added_p50": turns["closed"],
            "errors": alone["errors"] + shared["errors"],
            "apart_single_first_p50": alone_apart["first_p50"],
            "apart_cluster_first_p50": shared_apart["first_p50"],
            "apart_added_p50": shared_apart["first_p50"] - alone_apart["first_p50"],
            "apart_added_p99": shared_apart["first_p99"] - alone_apart["first_p99"],
            "apart_turns_added_p50": turns["apart"],
            "apart_errors": alone_apart["errors"] + shared_apart["errors"],
            "paced_think_s": self.think,
            "paced_single_first_p50": alone_paced["first_p50"],
            "paced_cluster_first_p50": shared_paced["first_p50"],
            "paced_single_first_p99": alone_paced["first_p99"],
            "paced_cluster_first_p99": shared_paced["first_p99"],
            "paced_added_p50": shared_paced["first_p50"] - alone_paced["first_p50"],
            "paced_added_p99": shared_paced["first_p99"] - alone_paced["first_p99"],
            "paced_turns_added_p50": turns["paced"],
            "paced_errors": alone_paced["errors"] + shared_paced["errors"],
            # By setting: the share of the server's core the two instances used (and
            # Redis, where it was beside them), CPU over the loads' seconds; Redis's CPU
            # per utterance in cluster mode, ms; the turns' added p50, mean and spread.
            "busy": {
                setting: (
                    cpu[names[0]]
                    + cpu[names[1]]
                    + (redis_cpu[setting] if setting != "apart" else 0)
                )
                / wall[setting]
                for setting, names in settings.items()
                if wall[setting]
            },
            "redis_cpu_ms": {
                setting: 1000 * redis_cpu[setting] / max(1, summarize(runs[names[1]])["requests"])
                for setting, names in settings.items()
            },
            "turns_mean_sd": {setting: mean_sd(added) for setting, added in turns.items()},
            # The server's own part of the time to first audio (see ``own``): p50 by run,
            # ms; the added p50 by setting, pooled, and the turns' mean and spread.
            "own_p50": {name: percentile(values, 0.5) for name, values in own.items()},
            "own_added_p50": {
                setting: percentile(own[names[1]], 0.5) - percentile(own[names[0]], 0.5)
                for setting, names in settings.items()
            },
            "own_turns_added_p50": own_turns,
            "own_turns_mean_sd": {setting: mean_sd(added) for setting, added in own_turns.items()},
            # Server CPU per utterance, ms (closed loop and paced together).
            "single_cpu_ms": 1000
            * (cpu["single"] + cpu["single_paced"])
            / max(1, alone["requests"] + alone_paced["requests"]),
            "cluster_cpu_ms": 1000
            * (cpu["cluster"] + cpu["cluster_paced"])
            / max(1, shared["requests"] + shared_paced["requests"]),
            "pairs": pairs,
            "join_gap_p50": percentile(gaps, 0.5),
            "join_gap_max": max(gaps),
            "tier_requests": len(tier),
            "tier_hits": sum(1 for r in tier if r.get("cached")),
            "tier_first_p50": percentile([r["ttfb"] * 1000 for r in tier], 0.5),
        }

    async def scale(self) -> None:
        """Scenario 13: live streams at 100, 300 and 1,000 clients (bench/scale.py)."""
        await importlib.import_module("scale").run(self)

    async def burst(self) -> None:
        """Scenario 14: clients asking for one cached text at once (bench/burst.py)."""
        await importlib.import_module("burst").run(self)

    async def soak(self) -> None:
        """Scenario 15: mixed load at 70 % of the limit, flat or not (bench/soak.py)."""
        await importlib.import_module("soak").run(self, SOAK_SECONDS[self.quick])

    async def tenants(self) -> None:
        """The cost of per-tenant accounting (scenario 11): (a) TTS_API_KEY only, per-IP
        limits, against (b) API_KEYS_FILE's tenants, in paired turns as scenario 7's."""
        import hashlib
        import sqlite3

        clients = 10 if self.quick else 100
        think = self.think
        keys = [f"bench-tenant-key-{number}" for number in range(TENANT_COUNT)]
        # Limits no load of the bench reaches, and quotas it does not use up: every
        # speak is checked and charged, none refused.
        limits = {
            "requests": 10**9,
            "window": 60,
            "concurrent": 10**5,
            "characters_per_day": 10**12,
            "characters_per_month": 10**13,
        }
        keys_file = "".join(
            f"[tenants.bench-{number}]\n"
            f'keys = [{{ sha256 = "{hashlib.sha256(key.encode()).hexdigest()}" }}]\n'
            + "".join(f"{field} = {value}\n" for field, value in limits.items())
            + "\n"
            for number, key in enumerate(keys)
        )

        def spread_keys(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """(b)'s load processes, their clients spread over every tenant: each
            process's keys start where the last one's stopped."""
            first = 0
            for spec in specs:
                spec["keys"] = keys[first:] + keys[:first]
                first = (first + spec["clients"]) % len(keys)
            return specs

        servers: list[Process] = []
        # The servers stop (and write their last usage) before their directories go.
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "keys.toml"
            path.write_text(keys_file)
            database = Path(directory) / "usage.sqlite3"
            try:
                # A rate limit too high to refuse anything, so that every speak and
                # handshake of (a) is decided by the per-IP limiter, as (b)'s by its
                # tenant's.
                common = {"RATE_LIMIT_REQUESTS": "100000000"}
                keyed, keyed_url = await self.logged_server(
                    directory + "/a", {**common, "TTS_API_KEY": KEY}
                )
                servers.append(keyed)
                tenanted, tenants_url = await self.logged_server(
                    directory + "/b", {**common, "API_KEYS_FILE": str(path)}
                )
                servers.append(tenanted)
                # (a) TTS_API_KEY only, (b) API_KEYS_FILE's tenants.
                pair = Paired(keyed, tenanted, TENANT_SETTINGS)
                base = 11 * 10**8
                for setting, first in zip(TENANT_SETTINGS, (0, 20), strict=True):
                    pause = think if setting == "paced" else 0.0
                    requests = TENANT_REQUESTS[setting][self.quick]
                    for repeat in range(TENANT_REPEATS[setting][self.quick]):
                        offset = base + (first + repeat) * 10**7
                        loads = {
                            "a": self.half_load(
                                keyed_url, clients, requests, pause, offset, key=KEY
                            ),
                            "b": spread_keys(
                                self.half_load(
                                    tenants_url, clients, requests, pause, offset + 10**6
                                )
                            ),
                        }
                        await pair.turn(setting, repeat, loads)
            finally:
                for server in servers:
                    await stop(server)
            # What (b) wrote to SQLite: every utterance's tally, the last at its stop.
            with sqlite3.connect(database) as db:
                stored = db.execute(
                    "SELECT COUNT(DISTINCT tenant), SUM(requests), SUM(characters), "
                    "SUM(errors) FROM usage"
                ).fetchone()
            db.close()
        # The micro-measures, on the server's core, the servers gone.
        micro = await start(
            [
                PYTHON,
                str(ROOT / "bench" / "usage_writes.py"),
                json.dumps(USAGE_WRITES[self.quick]),
            ],
            dict(os.environ),
            r"^(\{.*\})$",
            cpus=SERVER_CPUS,
        )
        await micro.process.wait()
        writes = json.loads(micro.match)
        settings = {setting: pair.summary(setting) for setting in TENANT_SETTINGS}
        self.out["tenants"] = {
            # Its own date: a partial run keeps the other scenarios'.
            "date": time.strftime("%Y-%m-%d"),
            "clients": clients,
            "tenants": TENANT_COUNT,
            "limits": limits,
            "think_s": think,
            "settings": settings,
            "stored": {
                "tenants": stored[0],
                "requests": stored[1],
                "characters": stored[2],
                "errors": stored[3],
            },
            "served_b": sum(row["requests"]["b"] for row in settings.values()),
            "writes": writes,
        }

    async def resume(self) -> None:
        """What keeping each utterance's frames for a resume costs (scenario 12): (a)
        RESUME_WINDOW=0 (no log kept) against (b) the default, in paired turns as
        scenario 11's; then what a parked utterance holds, and how long a resume takes."""
        clients = 10 if self.quick else 100
        think = self.think
        servers: list[Process] = []
        # The servers stop before their cache directories go (they may still be storing).
        with tempfile.TemporaryDirectory() as directory:
            try:
                off, off_url = await self.logged_server(directory + "/a", {"RESUME_WINDOW": "0"})
                servers.append(off)
                # The default RESUME_WINDOW (server_env passes none of this environment's).
                on, on_url = await self.logged_server(directory + "/b", {})
                servers.append(on)
                pair = Paired(off, on, RESUME_SETTINGS)
                base = 12 * 10**8
                for setting, first in zip(RESUME_SETTINGS, (0, 20), strict=True):
                    pause = think if setting == "paced" else 0.0
                    requests = RESUME_REQUESTS[setting][self.quick]
                    for repeat in range(RESUME_REPEATS[setting][self.quick]):
                        offset = base + (first + repeat) * 10**7
                        loads = {
                            "a": self.half_load(off_url, clients, requests, pause, offset),
                            "b": self.half_load(on_url, clients, requests, pause, offset + 10**6),
                        }
                        await pair.turn(setting, repeat, loads)
                # The last connections closed, their logs let go.
                await asyncio.sleep(RESUME_SETTLE[self.quick])
                memory = {}
                for name, server in zip(PAIR, servers, strict=True):
                    _, rss, peak = usage(server.process.pid)
                    memory[name] = {"rss_mb": rss / 2**20, "peak_rss_mb": peak / 2**20}
            finally:
                for server in servers:
                    await stop(server)
            parked = await self.parked(directory)
        self.out["resume"] = {
            # Its own date: a partial run keeps the other scenarios'.
            "date": time.strftime("%Y-%m-%d"),
            "clients": clients,
            "think_s": think,
            "settings": {setting: pair.summary(setting) for setting in RESUME_SETTINGS},
            "memory": memory,
            "parked": parked,
        }

    async def parked(self, directory: str) -> dict[str, Any]:
        """Scenario 12's second part: clients speak a long text and drop mid-utterance (no
        close frame), on a server with a short RESUME_WINDOW: their connections parked,
        their utterances spoken on into the logs. The server's RSS before, once all are
        parked and ended, and after the window, against a server that keeps no log
        (RESUME_WINDOW=0) whose clients heard the same utterances whole. Then the drops
        again, each client coming back RESUME_AWAY s later to resume: the time to
        ``resumed`` and to the first audio after it."""
        clients = RESUME_PARKED[self.quick]
        window = RESUME_PARK_WINDOW[self.quick]

        def drops(url: str, offset: int, **extra: Any) -> list[dict[str, Any]]:
            return [
                {
                    "mode": "drop",
                    "url": url,
                    "clients": n,
                    "sentences": RESUME_SENTENCES[self.quick],
                    "ramp": RESUME_RAMP[self.quick],
                    "seed": part,
                    "offset": offset + part * 10**5,
                    **extra,
                }
                for part, n in enumerate(split(clients, self.workers))
            ]

        async def logged(
            log: bytearray, mark: int, pattern: bytes, count: int, timeout: float
        ) -> int:
            """Wait until a server has logged ``count`` lines matching ``pattern`` in
            ``log`` (its access log, or its other lines) since ``mark`` (or ``timeout`` s
            went by); how many it has."""
            deadline = time.perf_counter() + timeout
            while True:
                found = len(re.findall(pattern, log[mark:]))
                if found >= count or time.perf_counter() > deadline:
                    return found
                await asyncio.sleep(0.1)

        def results(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [result for run in runs for result in run["results"]]

        base = 12 * 10**8 + 60 * 10**7
        # The utterances heard whole, on a server that keeps no log: what a log of one
        # would hold (every frame as sent, the JSON messages too), and the server's
        # memory for them without logs.
        plain, plain_url = await self.logged_server(directory + "/q", {"RESUME_WINDOW": "0"})
        try:
            _, plain_before, _ = usage(plain.process.pid)
            cpu0 = usage(plain.process.pid)[0]
            whole = results(await load(drops(plain_url, base)))
            await asyncio.sleep(RESUME_SETTLE[self.quick])
            plain_cpu, plain_after, plain_peak = usage(plain.process.pid)
            plain_cpu -= cpu0
        finally:
            await stop(plain)
        heard = [r for r in whole if "error" not in r]
        if not heard:
            raise RuntimeError(f"no utterance heard whole: {whole[:3]}")
        audio = percentile([r["audio"] for r in heard], 0.5)
        size = percentile([r["size"] for r in heard], 0.5)
        cut = [int(audio * share) for share in RESUME_CUT]
        server, url = await self.logged_server(directory + "/p", {"RESUME_WINDOW": f"{window:g}"})
        pid = server.process.pid
        try:
            _, before, _ = usage(pid)
            # Dropped mid-utterance, not coming back. The access log (an utterance's
            # end) and the other lines (parked, not resumed) from here.
            access, other = len(server.output), len(server.errors)
            cpu0 = usage(pid)[0]
            dropped = results(await load(drops(url, base + 10**7, cut=cut)))
            left = time.perf_counter()
            parked = await logged(server.errors, other, rb"dropped: parked for", clients, 30.0)
            ended = await logged(
                server.output, access, rb" utterance .* outcome=", clients, 3 * window
            )
            ended_after = time.perf_counter() - left
            await asyncio.sleep(RESUME_SETTLE[self.quick])
            parked_cpu, parked_rss, _ = usage(pid)
            parked_cpu -= cpu0
            # What /stats counts then (a parked connection counts as one).
            connections = (await side_stats(server))["connections"]
            outcomes = Counter(
                outcome.decode()
                for outcome in re.findall(rb" utterance .* outcome=(\w+)", server.output[access:])
            )
            expired = await logged(server.errors, other, rb" not resumed", clients, 3 * window)
            # The connections' ends: logs released, tasks gone.
            await asyncio.sleep(RESUME_SETTLE[self.quick])
            _, after, _ = usage(pid)
            # Dropped mid-utterance, back RESUME_AWAY s later.
            away = RESUME_AWAY[self.quick]
            resumes = results(await load(drops(url, base + 2 * 10**7, cut=cut, away=away)))
            await asyncio.sleep(RESUME_SETTLE[self.quick])
            _, resumed_rss, peak = usage(pid)
        finally:
            await stop(server)
        # What a log holds in memory, apart from a server (bench/resume_logs.py), for
        # utterances of the frames these had, on the server's core, the servers gone.
        texts = percentile([r["texts"] for r in heard], 0.5)
        frames = percentile([r["frames"] for r in heard], 0.5)
        shape = {
            "utterances": clients,
            "words": texts - 2,
            "audio": audio,
            "chunks": frames - texts,
        }
        micro = await start(
            [PYTHON, str(ROOT / "bench" / "resume_logs.py"), json.dumps(shape)],
            dict(os.environ),
            r"^(\{.*\})$",
            cpus=SERVER_CPUS,
        )
        await micro.process.wait()
        back = [r for r in resumes if "resumed_ms" in r]
        resumed_ms = [r["resumed_ms"] for r in back]
        first_ms = [r["first_audio_ms"] for r in back]
        grown = (parked_rss - before) - (plain_peak - plain_before)
        return {
            "clients": clients,
            "window_s": window,
            "sentences": RESUME_SENTENCES[self.quick],
            "audio_s": audio / 6000,  # MP3 at 48 kbit/s
            "log_mb": size / 2**20,
            "frames": percentile([r["frames"] for r in heard], 0.5),
            "whole": sum(1 for r in heard if r["whole"]),
            "whole_errors": len(whole) - len(heard),
            "plain_rss_before_mb": plain_before / 2**20,
            "plain_rss_after_mb": plain_after / 2**20,
            "plain_peak_rss_mb": plain_peak / 2**20,
            "plain_cpu_ms": 1000 * plain_cpu / max(1, len(heard)),
            "cut_kb": [c / 1024 for c in cut],
            "drop_errors": sum(1 for r in dropped if "error" in r),
            "parked": parked,
            "ended": ended,
            "ended_after_s": ended_after,
            "outcomes": dict(outcomes),
            "not_resumed": expired,
            "connections_parked": connections,
            "rss_before_mb": before / 2**20,
            "rss_parked_mb": parked_rss / 2**20,
            "rss_after_mb": after / 2**20,
            "rss_resumed_mb": resumed_rss / 2**20,
            "peak_rss_mb": peak / 2**20,
            # What the parked utterances added to the server's RSS, beyond what the same
            # utterances heard whole added to the server without logs.
            "mb_per_parked": grown / 2**20 / max(1, parked),
            "cpu_ms_per_parked": 1000 * parked_cpu / max(1, parked),
            "resumes": len(resumes),
            "resumed": len(back),
            "resume_whole": sum(1 for r in back if r["whole"]),
            "resume_lost": sum(r["lost"] for r in back),
            "resume_errors": Counter(r["error"] for r in resumes if "error" in r),
            "resumed_p50": percentile(resumed_ms, 0.5),
            "resumed_p99": percentile(resumed_ms, 0.99),
            "resumed_max": max(resumed_ms, default=float("nan")),
            "first_audio_p50": percentile(first_ms, 0.5),
            "first_audio_p99": percentile(first_ms, 0.99),
            "first_audio_max": max(first_ms, default=float("nan")),
            "away_s": away,
            "logs": json.loads(micro.match),
        }

    async def replay(self) -> None:
        levels = (20,) if self.quick else (1, 100, 1000)
        duration = 1.0 if self.quick else 10.0
        rows = []
        with tempfile.TemporaryDirectory() as cache:
            server, url = await self.server(cache)
            audio_path = Path(cache) / "replay.mp3"
            try:
                warm = await load(
                    [{"mode": "speak", "url": url, "clients": 1, "requests": 1, "texts": [TEXT]}]
                )
                assert warm[0]["results"][0].get("bytes"), warm
                await asyncio.sleep(0.3)
                for clients in levels:
                    cpu0, _, _ = usage(server.process.pid)
                    specs = [
                        {
                            "mode": "speak",
                            "url": url,
                            "clients": n,
                            "texts": [TEXT],
                            "think": 1.0,
                            "duration": duration,
                            "seed": i,
                        }
                        for i, n in enumerate(split(clients, min(self.workers, clients)))
                    ]
                    result = summarize(await load(specs))
                    cpu1, _, peak = usage(server.process.pid)
                    rows.append(
                        {
                            "clients": clients,
                            **result,
                            "server_cpu_s": cpu1 - cpu0,
                            "server_peak_rss_mb": peak / 2**20,
                        }
                    )
                # Closed-loop throughput: as fast as the server can replay, in each
                # words mode, against a bare websockets server sending the same audio
                # (baseline b), measured before and after to even out drift.
                closed = [
                    {
                        "mode": "speak",
                        "url": url,
                        "clients": n,
                        "texts": [TEXT],
                        "duration": duration / 2,
                    }
                    for n in split(50 if self.quick else 100, self.workers)
                ]
                audio_path.write_bytes(await replayed_audio(url))
                bare = await start(
                    [PYTHON, str(ROOT / "bench" / "bare_server.py"), str(audio_path)],
                    dict(os.environ),
                    r"listening on (127\.0\.0\.1:\d+)",
                    cpus=SERVER_CPUS,
                )
                closed_bare = [{**spec, "url": f"ws://{bare.match}/"} for spec in closed]
                modes = {}
                try:
                    baselines = [await busy(bare, closed_bare)]
                    for words in WORD_MODES:
                        specs = [{**spec, "words": words} for spec in closed]
                        modes[words] = await busy(server, specs)
                    baselines.append(await busy(bare, closed_bare))
                finally:
                    await stop(bare)
            finally:
                await stop(server)
        bare_rate = sum(b["requests"] / b["elapsed"] for b in baselines) / len(baselines)
        self.out["replay"] = rows
        self.out["throughput"] = {
            "clients": sum(spec["clients"] for spec in closed),
            "bare_requests_per_s": bare_rate,
            "bare_mb_per_s": bare_rate * baselines[0]["bytes"] / baselines[0]["requests"] / 2**20,
            "bare_frames": baselines[0]["frames"],
            "bare_busy": sum(b["server_busy"] for b in baselines) / len(baselines),
            "errors": sum(b["errors"] for b in baselines)
            + sum(m["errors"] for m in modes.values()),
            "modes": {
                words: {
                    "requests_per_s": m["requests"] / m["elapsed"],
                    "mb_per_s": m["bytes"] / m["elapsed"] / 2**20,
                    "frames": m["frames"],
                    "ratio": m["requests"] / m["elapsed"] / bare_rate,
                    "first_p50": m["first_p50"],
                    "busy": m["server_busy"],
                }
                for words, m in modes.items()
            },
        }

    async def idle(self) -> None:
        total = 500 if self.quick else 10_000
        with tempfile.TemporaryDirectory() as cache:
            server, url = await self.server(cache, TTS_API_KEY=KEY)
            try:
                await asyncio.sleep(0.5)
                _, before, _ = usage(server.process.pid)
                processes = 2 if self.quick else 4
                specs = [
                    {"mode": "idle", "url": url, "clients": n, "key": KEY}
                    for n in split(total, processes)
                ]
                workers = await ready_workers(specs)
                await signal_workers(workers, b"go\n")
                # Let the server settle after the connection burst.
                await asyncio.sleep(0.3 if self.quick else 1)
                _, after, _ = usage(server.process.pid)
                async with connect(url, additional_headers={"X-API-Key": KEY}) as ws:
                    await ws.recv()
                    started = time.perf_counter()
                    await ws.send(orjson.dumps({"type": "speak", "id": "i", "text": TEXT}).decode())
                    first = None
                    while True:
                        frame = await ws.recv()
                        if isinstance(frame, bytes) and first is None:
                            first = (time.perf_counter() - started) * 1000
                        elif isinstance(frame, str) and orjson.loads(frame)["type"] in (
                            "end",
                            "error",
                        ):
                            break
                    _, _, peak = usage(server.process.pid)
                    stats = await side_stats(server)
                connected = stats["connections"] - 1
                await signal_workers(workers, b"stop\n")
                idle_results = await results_of(workers)
            finally:
                await stop(server)
        self.out["idle"] = {
            "connections": connected,
            "idle_rss_mb": before / 2**20,
            "rss_mb": after / 2**20,
            "peak_rss_mb": peak / 2**20,
            "kb_per_connection": (after - before) / max(1, connected) / 1024,
            "first_audio_ms": first,
            "errors": sum(r["errors"] for r in idle_results),
            "dropped": sum(r["dropped"] for r in idle_results),
        }

    async def mixed(self) -> None:
        catalogue = 200 if self.quick else 2000
        texts = [f"{TEXT} Catalogue entry {i}." for i in range(catalogue)]
        weights = [1 / (rank + 1) ** 1.1 for rank in range(catalogue)]
        clients = 20 if self.quick else 200
        duration = 1.5 if self.quick else 20.0
        with tempfile.TemporaryDirectory() as cache:
            server, url = await self.server(cache)
            try:
                specs = [
                    {
                        "mode": "speak",
                        "url": url,
                        "clients": n,
                        "texts": texts,
                        "weights": weights,
                        "think": 0.5,
                        "duration": duration,
                        "seed": i,
                    }
                    for i, n in enumerate(split(clients, self.workers))
                ]
                cpu0, _, _ = usage(server.process.pid)
                result = summarize(await load(specs))
                cpu1, _, peak = usage(server.process.pid)
                stats = await side_stats(server)
            finally:
                await stop(server)
        self.out["mixed"] = {
            "clients": clients,
            "catalogue": catalogue,
            **result,
            "hit_rate": stats["cache_hit_rate"],
            "upstream_requests": stats["upstream_requests"],
            "coalesced": stats["coalesced"],
            "server_cpu_s": cpu1 - cpu0,
            "server_peak_rss_mb": peak / 2**20,
        }


def agent_rows(
    clients: int,
    runs: dict[str, list[dict[str, Any]]],
    server_cpu: dict[str, float],
    fake_cpu: dict[str, float],
) -> list[dict[str, Any]]:
    """Scenario 10's rows at one level: each door's replies, against door (a)'s."""

    def firsts(name: str, key: str) -> list[float]:
        return [r[key] * 1000 for run in runs[name] for r in run["results"] if "error" not in r]

    reference = firsts(AGENT_DOORS[0], "ttfb")
    rows = []
    for name, door_runs in runs.items():
        results = [r for run in door_runs for r in run["results"]]
        good = [r for r in results if "error" not in r]
        first = firsts(name, "ttfb")
        after = firsts(name, "first_after_sentence")
        elapsed = sum(run["elapsed"] for run in door_runs) / max(1, len(door_runs))
        rows.append(
            {
                "clients": clients,
                "door": name,
                "replies": len(results),
                "finals": len(good),
                "errors": Counter(r["error"] for r in results if "error" in r),
                "first_p50": percentile(first, 0.5),
                "first_p99": percentile(first, 0.99),
                "added_p50": percentile(first, 0.5) - percentile(reference, 0.5),
                "added_p99": percentile(first, 0.99) - percentile(reference, 0.99),
                "after_sentence_p50": percentile(after, 0.5),
                # Audio of a context after its final or amid another context's: none
                # means every final came last and every context's audio in one run.
                "stray": sum(r.get("stray", 0) for r in good)
                + sum(run.get("late", 0) for run in door_runs),
                # Replies a listener playing from their first byte would have heard a
                # gap in (some audio came after it was due).
                "listener_gaps": sum(1 for r in good if r["min_slack"] < 0),
                "min_slack_ms": min((r["min_slack"] * 1000 for r in good), default=float("nan")),
                "server_cpu_ms": server_cpu[name] * 1000 / max(1, len(good)),
                "fake_cpu_ms": fake_cpu[name] * 1000 / max(1, len(good)),
                "client_cpu_ms": sum(run.get("cpu_s", 0.0) for run in door_runs)
                * 1000
                / max(1, len(good)),
                "elapsed_s": elapsed,
            }
        )
    return rows


async def busy(server: Process, specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run a load and summarize it, with the share of a core the server used meanwhile."""
    cpu0, _, _ = usage(server.process.pid)
    result = summarize(await load(specs))
    cpu1, _, _ = usage(server.process.pid)
    result["server_busy"] = (cpu1 - cpu0) / result["elapsed"]
    return result


async def start_fake(ttfa: float = 0.0, speed: float | None = None) -> Process:
    """The fake Edge service in its own process (first audio after ``ttfa`` s, audio at
    ``speed`` × real time); its match is its two URLs, separated by a space."""
    return await start(
        [
            PYTHON,
            "-c",
            f"from tests.fake_edge import serve_forever; serve_forever({ttfa}, {speed})",
        ],
        dict(os.environ, PYTHONPATH=str(ROOT)),
        r"^(\S+ \S+)$",
    )


async def replayed_audio(url: str, text: str = TEXT) -> bytes:
    """The audio the server replays for ``text`` (cached), for the bare baseline to send."""
    return (await replayed_frames(url, text))[1]


async def replayed_frames(
    url: str, text: str = TEXT, words: str | None = None
) -> tuple[str, bytes, str]:
    """What the server sends for a speak of ``text`` (cached) in ``words`` mode: its
    ``start`` message, the audio, its ``end`` message (for the bare baseline to send)."""
    async with connect(url, max_size=None) as ws:
        await ws.recv()  # hello
        speak = {"type": "speak", "id": "b0", "text": text}
        if words is not None:
            speak["words"] = words
        await ws.send(orjson.dumps(speak).decode())
        start = ""
        chunks = bytearray()
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                chunks += frame
                continue
            kind = orjson.loads(frame)["type"]
            if kind == "start":
                start = frame
            elif kind == "end":
                return start, bytes(chunks), frame


async def under_attack(
    server: Process, url: str, finding: int, attack: dict[str, Any], samples: int, gap: float
) -> dict[str, Any]:
    """The victim's samples without ``attack`` (a bench/hostile.py spec but for its
    addresses) and during it, and what the attacker got."""
    address = server.match
    port = int(address.rsplit(":", 1)[1])
    health_port = next(p for p in listening_ports(server.process.pid) if p != port)
    cached_text = f"{TEXT} Cached before attack {finding}."
    await load([{"mode": "speak", "url": url, "clients": 1, "requests": 1, "texts": [cached_text]}])
    await stored(server, 1)  # a new server: its first entry
    victim = {
        "mode": "victim",
        "url": url,
        "host": address,
        "health_port": health_port,
        "source": VICTIM_IP,
        "samples": samples,
        "gap": gap,
        "timeout": PROBE_TIMEOUT,
        "live_text": f"Another client speaks during attack {finding}, sample",
        "cached_text": cached_text,
    }
    pid = server.process.pid
    busy = {}
    cpu0, started = usage(pid)[0], time.perf_counter()
    baseline = await hostile_results(await hostile_process({**victim, "offset": 0}))
    busy["without"] = (usage(pid)[0] - cpu0) / (time.perf_counter() - started)
    attacker_started = time.perf_counter()
    attacker = await hostile_process(
        {
            "url": url,
            "host": address,
            "source": ATTACKER_IP,
            "offset": finding * 10**6,
            "max_s": ATTACK_MAX_S,
            **attack,
        }
    )
    try:
        assert attacker.stdout is not None
        line = await asyncio.wait_for(attacker.stdout.readline(), 120)
        assert line == b"attacking\n", line
        cpu0, started = usage(pid)[0], time.perf_counter()
        during = await hostile_results(await hostile_process({**victim, "offset": samples}))
        busy["during"] = (usage(pid)[0] - cpu0) / (time.perf_counter() - started)
        # The attacker's share of a core, on the cores the victim runs on.
        busy["attacker"] = usage(attacker.pid)[0] / (time.perf_counter() - attacker_started)
    finally:
        await signal_workers([attacker], b"stop\n")
        attacked = await asyncio.wait_for(hostile_results(attacker), 120)
    without, under = victim_summary(baseline), victim_summary(during)
    return {
        "attack": {key: value for key, value in attack.items() if key != "mode"},
        "mode": attack["mode"],
        "without": without,
        "during": under,
        "ratios": {
            probe: under[f"{probe}_p50"] / without[f"{probe}_p50"]
            for probe in PROBES
            if without[f"{probe}_p50"] > 0
        },
        "attacker": attacker_summary(attack["mode"], attacked),
        # Shares of a core: the server's without the attack and during it, the attacker's.
        "busy": busy,
    }


async def hostile_process(spec: dict[str, Any]) -> asyncio.subprocess.Process:
    """A bench/hostile.py process for ``spec``, on the other cores (not the server's)."""
    spec["out"] = tempfile.mkstemp(prefix="ttsstream-hostile-", suffix=".json")[1]
    spec_file = tempfile.mkstemp(prefix="ttsstream-spec-", suffix=".json")[1]
    Path(spec_file).write_text(json.dumps(spec))
    process = await asyncio.create_subprocess_exec(
        PYTHON,
        str(ROOT / "bench" / "hostile.py"),
        spec_file,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=on_cpus(OTHER_CPUS),
    )
    worker_outputs[process.pid] = spec["out"]
    return process


async def hostile_results(process: asyncio.subprocess.Process) -> dict[str, Any]:
    """A bench/hostile.py process's results, once it has ended."""
    return (await results_of([process]))[0]


def victim_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The victim's p50 and slowest of each probe, ms, and its errors by kind."""
    summary: dict[str, Any] = {}
    errors: Counter[str] = Counter()
    for probe in PROBES:
        answers = [sample[probe] for sample in run["samples"]]
        times = [answer["ms"] for answer in answers if "ms" in answer]
        errors.update(f"{probe} {answer['error']}" for answer in answers if "error" in answer)
        summary[f"{probe}_p50"] = percentile(times, 0.5)
        summary[f"{probe}_max"] = max(times, default=float("nan"))
    summary["errors"] = sum(errors.values())
    summary["error_kinds"] = dict(errors)
    # A cached speak the cache did not answer (it would not measure a replay).
    summary["not_cached"] = sum(
        1 for sample in run["samples"] if sample["cached"].get("cached") is False
    )
    return summary


def attacker_summary(mode: str, run: dict[str, Any]) -> dict[str, Any]:
    """What the attacker got, by attack (see bench/hostile.py)."""
    if mode == "junk_stream":
        durations = [seconds * 1000 for seconds in run["durations"]]
        return {
            "streams": run["streams"],
            "characters": run["characters"],
            "piece": run["piece"],
            "outcomes": run["outcomes"],
            "refusals": run["refusals"],
            "stream_ms_p50": percentile(durations, 0.5),
            "stream_ms_max": max(durations, default=float("nan")),
        }
    if mode == "upgrade_after_get":
        return run
    if mode == "idle_http":
        waves = run["waves"]
        closed = [seconds for wave in waves for seconds in wave["closed_after"]]
        refused: Counter[str] = Counter()
        for wave in waves:
            refused.update(wave["refused"])
        return {
            "waves": len(waves),
            "connections": waves[0]["connections"],
            "accepted": [wave["accepted"] for wave in waves],
            "refused": dict(refused),
            "closed_after_p50": percentile(closed, 0.5),
            "closed_after_max": max(closed, default=float("nan")),
            "left_open": sum(wave["left_open"] for wave in waves),
            "idle_timeout": run["idle_timeout"],
        }
    records = run["requests"]
    # By the engine that spoke (X-TTS-Engine): how many, and their first byte's p50, s.
    engines: dict[str, list[float]] = {}
    for record in records:
        if "first_s" in record:
            engines.setdefault(record.get("engine") or "?", []).append(record["first_s"])
    return {
        "requests": len(records),
        "characters": run["characters"],
        "engines": {
            engine: {"requests": len(firsts), "first_s_p50": percentile(firsts, 0.5)}
            for engine, firsts in sorted(engines.items())
        },
        "waiting": sum(1 for record in records if "status" not in record),
        "statuses": dict(
            Counter(str(record["status"]) for record in records if "status" in record)
        ),
    }


async def stored(server: Process, count: int) -> None:
    """Wait until ``server`` has ``count`` entries in its cache (a finished
    synthesis is stored once no utterance waits for its first audio, within 1 s)."""
    deadline = time.monotonic() + 30
    while (await side_stats(server))["cache_entries"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not store {count} entries within 30 s")
        await asyncio.sleep(0.05)


async def side_stats(server: Process) -> dict[str, Any]:
    """The server's /stats; its side port is read from /proc (it listens on two ports)."""
    import aiohttp

    pid = server.process.pid
    ws_port = int(server.match.rsplit(":", 1)[1])
    ports = listening_ports(pid)
    side = next(port for port in ports if port != ws_port)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{side}/stats") as response,
    ):
        stats: dict[str, Any] = await response.json()
        return stats


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:"):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def markdown(out: dict[str, Any]) -> str:
    meta = out["machine"]
    lines = [
        f"Run {meta['date']} on {meta['cpus']} CPUs ({meta['machine']}), Python {meta['python']}, "
        f"websockets {meta['websockets']}, edge-tts {meta['edge_tts']}, uvloop "
        f"{meta['uvloop'] or 'not installed'}; fake Edge: first audio after {meta['ttfa_ms']:.0f} ms, "
        f"audio at {meta['speed']:g}× real time{' (quick mode)' if meta['quick'] else ''}.",
        "",
        "**1. Live (cache miss), time to first audio byte, ms** (baseline a: edge-tts alone)",
        "",
        "| clients | edge-tts p50 | p95 | p99 | ttsstream p50 | p95 | p99 | added p50 | added p95 | added p99 | errors | server CPU s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in out.get("live", []):
        lines.append(
            f"| {row['clients']} | {row['baseline_first_p50']:.1f} | "
            f"{row['baseline_first_p95']:.1f} | {row['baseline_first_p99']:.1f} | "
            f"{row['first_p50']:.1f} | {row['first_p95']:.1f} | {row['first_p99']:.1f} | "
            f"{row['added_p50']:+.1f} | {row['added_p95']:+.1f} | {row['added_p99']:+.1f} | "
            f"{row['errors']} | {row['server_cpu_s']:.2f} | {row['server_peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "**2. Cached replay, each client speaking about once a second, ms**",
        "",
        "| clients | requests | first byte p50 | p95 | p99 | last byte p50 | p95 | p99 | errors | dropped | server CPU s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in out.get("replay", []):
        lines.append(
            f"| {row['clients']} | {row['requests']} | {row['first_p50']:.2f} | "
            f"{row['first_p95']:.2f} | {row['first_p99']:.2f} | {row['last_p50']:.2f} | "
            f"{row['last_p95']:.2f} | {row['last_p99']:.2f} | {row['errors']} | {row['dropped']} | "
            f"{row['server_cpu_s']:.2f} | {row['server_peak_rss_mb']:.0f} |"
        )
    if "throughput" in out:
        t = out["throughput"]
        lines += [
            "",
            f"**Closed-loop replay throughput**, {t['clients']} clients replaying one cached "
            f"sentence as fast as they can, by the speak's `words` mode (errors: {t['errors']}):",
            "",
            "| sent as | frames per utterance | utterances/s | MB/s of audio | server core busy "
            "| of baseline b |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for words, m in t["modes"].items():
            lines.append(
                f'| ttsstream, `"words": "{words}"` | {m["frames"]:.0f} | '
                f"{m['requests_per_s']:.0f} | {m['mb_per_s']:.1f} | {100 * m['busy']:.0f} % | "
                f"**{100 * m['ratio']:.0f} %** |"
            )
        lines.append(
            f"| bare websockets (baseline b) | {t['bare_frames']:.0f} | "
            f"{t['bare_requests_per_s']:.0f} | {t['bare_mb_per_s']:.1f} | "
            f"{100 * t['bare_busy']:.0f} % | 100 % |"
        )
    if "idle" in out:
        i = out["idle"]
        lines += [
            "",
            f"**3. Idle:** {i['connections']} authenticated idle connections: "
            f"{i['kb_per_connection']:.1f} KB of RSS each (server {i['idle_rss_mb']:.0f} MB idle with "
            f"the offline voice loaded → {i['rss_mb']:.0f} MB); an utterance among them had its first "
            f"audio after {i['first_audio_ms']:.1f} ms.",
        ]
    if "mixed" in out:
        m = out["mixed"]
        lines += [
            "",
            f"**4. Mixed:** {m['clients']} clients, Zipf(1.1) over {m['catalogue']} texts: "
            f"{m['requests']} requests, hit rate {m['hit_rate']}, {m['upstream_requests']} upstream "
            f"calls, {m['coalesced']} requests coalesced onto one in flight; first byte p50 "
            f"{m['first_p50']:.1f} ms, p95 {m['first_p95']:.1f} ms, p99 {m['first_p99']:.1f} ms; "
            f"errors {m['errors']}, dropped {m['dropped']}; server CPU {m['server_cpu_s']:.2f} s, "
            f"peak RSS {m['server_peak_rss_mb']:.0f} MB.",
        ]
    if "http" in out:
        lines += [
            "",
            "**5. HTTP, OpenAI's `POST /v1/audio/speech`, time to first audio byte, ms** "
            "(kept-alive connections; baseline a: edge-tts alone; the WebSocket's `speak` "
            "timed in the same turns, audio only as the HTTP body is)",
            "",
            "| clients | edge-tts p50 | p99 | ttsstream p50 | p99 | added p50 | added p99 "
            "| WebSocket added p50 | p99 | errors | server CPU s | peak RSS MB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in out["http"]["live"]:
            beside = (
                f"{row['beside_added_p50']:+.1f} | {row['beside_added_p99']:+.1f}"
                if "beside_added_p50" in row
                else "– | –"
            )
            clients = (
                f"{row['clients']}, paced ({row['think_s']:.0f} s think)"
                if row.get("think_s")
                else str(row["clients"])
            )
            lines.append(
                f"| {clients} | {row['baseline_first_p50']:.1f} | "
                f"{row['baseline_first_p99']:.1f} | {row['first_p50']:.1f} | "
                f"{row['first_p99']:.1f} | {row['added_p50']:+.1f} | {row['added_p99']:+.1f} | "
                f"{beside} | {row['errors'] + row.get('beside_errors', 0)} | "
                f"{row['server_cpu_s']:.2f} | {row['server_peak_rss_mb']:.0f} |"
            )
        if "herd" in out["http"]:
            h = out["http"]["herd"]
            lines += [
                "",
                f"A cold herd, {h['clients']} clients sending at the same moment (median over "
                f"{h['rounds']} rounds of the round's p50 / slowest, ms): edge-tts alone "
                f"{h['edge']['p50']:.1f} / {h['edge']['slowest']:.1f}, the WebSocket "
                f"{h['WebSocket']['p50']:.1f} / {h['WebSocket']['slowest']:.1f}, HTTP "
                f"{h['HTTP']['p50']:.1f} / {h['HTTP']['slowest']:.1f}.",
            ]
        lines += [
            "",
            "| cached, clients | requests | hits | first byte p50 | p99 | last byte p50 | p99 | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in out["http"]["cached"]:
            lines.append(
                f"| {row['clients']} | {row['requests']} | {row['hits']} | {row['first_p50']:.2f} | "
                f"{row['first_p99']:.2f} | {row['last_p50']:.2f} | {row['last_p99']:.2f} | "
                f"{row['errors']} |"
            )
    if "formats" in out:
        f = out["formats"]
        lines += [
            "",
            f"**6. Formats**, live at {f['clients']} clients, each format's turn after the "
            "others' (time to first audio byte, ms; server core share per streamed utterance; "
            "the target for `pcm_16000`, `pcm_8000` and `ulaw_8000`, a voice agent's and a "
            "phone line's: under 15 ms added over mp3 at p50)",
            "",
            "| format | requests | first byte p50 | p99 | added over mp3 p50 | p99 | "
            "server, % of a core per stream | errors | replays (cached) | replay last byte p50 "
            "| p99 | server CPU per replay, ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in f["live"]:
            lines.append(
                f"| {row['format']} | {row['requests']} | {row['first_p50']:.1f} | "
                f"{row['first_p99']:.1f} | {row['added_p50']:+.1f} | {row['added_p99']:+.1f} | "
                f"{row['server_core_pct']:.2f} | {row['errors']} | "
                f"{row['replay_requests']} ({row['replay_cached']}) | "
                f"{row['replay_last_p50']:.1f} | {row['replay_last_p99']:.1f} | "
                f"{row['replay_server_cpu_ms']:.2f} |"
            )
        total = sum(row["core_pct"] for row in f["encoders"])
        lines += [
            "",
            "Each transcoder alone, a minute of two-tone MP3 (decode, encode, mux), % of one "
            "core per stream (and kbit/s made): "
            + ", ".join(
                f"{row['format']} {row['core_pct']:.2f} ({row['kbit_s']:.0f})"
                for row in f["encoders"]
            )
            + f"; all together {total:.2f}.",
        ]
    if "cluster" in out:
        c = out["cluster"]

        def busy_share(setting: str) -> str:
            share = c.get("busy", {}).get(setting)
            return "?" if share is None else f"{100 * share:.0f} %"

        def spread(setting: str) -> str:
            mean, sd = c.get("turns_mean_sd", {}).get(setting, (float("nan"),) * 2)
            return f"mean {mean:+.1f}, sd {sd:.1f}"

        lines += [
            "",
            f"**7. Cluster mode** (`REDIS_URL`, a local redis-server), {c['clients']} live "
            f"clients: one instance alone and one in cluster mode, both on the server's core, "
            f"loaded at once with half the clients each (paired turns), Redis on that core "
            f"unless said; added p50 = cluster mode's first-byte p50 minus the alone one's. "
            f"Each client thinking {c['paced_think_s']:.0f} s on average between speaks (the "
            f"core {busy_share('paced')} busy): first byte p50/p99 {c['paced_single_first_p50']:.1f}/"
            f"{c['paced_single_first_p99']:.1f} ms alone, {c['paced_cluster_first_p50']:.1f}/"
            f"{c['paced_cluster_first_p99']:.1f} ms in cluster mode, added "
            f"{c['paced_added_p50']:+.1f}/{c['paced_added_p99']:+.1f} ms (errors "
            f"{c['paced_errors']}; added p50 turn by turn {spread('paced')}: "
            f"{_signed(c.get('paced_turns_added_p50', []))}). Each client asking again the "
            f"moment it is answered (closed loop, the core {busy_share('closed')} busy; Redis's "
            f"CPU {c.get('redis_cpu_ms', {}).get('closed', float('nan')):.2f} ms per "
            f"utterance in cluster mode): {c['single_first_p50']:.1f}/{c['single_first_p99']:.1f} ms alone, "
            f"{c['cluster_first_p50']:.1f}/{c['cluster_first_p99']:.1f} ms in cluster mode, "
            f"added {c['added_p50']:+.1f}/{c['added_p99']:+.1f} ms (errors {c['errors']}; "
            f"turn by turn {spread('closed')}: {_signed(c.get('turns_added_p50', []))}). The "
            f"closed loop with Redis moved to the other core (beside the fake service and the "
            f"load clients; the server's core {busy_share('apart')} busy): "
            f"{c['apart_single_first_p50']:.1f} ms alone, "
            f"{c['apart_cluster_first_p50']:.1f} ms in cluster mode, added "
            f"{c['apart_added_p50']:+.1f}/{c['apart_added_p99']:+.1f} ms (errors "
            f"{c['apart_errors']}; turn by turn {spread('apart')}: "
            f"{_signed(c.get('apart_turns_added_p50', []))}). Server CPU per utterance: "
            f"{c['single_cpu_ms']:.1f} ms alone, {c['cluster_cpu_ms']:.1f} ms in cluster mode. "
            f"The same new text asked on two "
            f"instances at once ({c['pairs']} texts): the joiner's first byte came "
            f"{c['join_gap_p50']:.1f} ms after the owner's (p50; at most "
            f"{c['join_gap_max']:.1f}). Those texts on a third instance with an empty disk: "
            f"{c['tier_hits']} of {c['tier_requests']} replayed from Redis, first byte p50 "
            f"{c['tier_first_p50']:.1f} ms.",
        ]
        if "own_p50" in c:
            lines += [
                "",
                "The server's own part of each Edge utterance's time to first audio (its "
                "access log's `ttfb_ms` minus `upstream_ms`: before Edge was asked and after "
                "it answered, where the two modes differ; logged to 0.1 ms), p50, ms:",
                "",
                "| setting | alone | cluster mode | added, pooled | added, turns' mean (sd) |",
                "|---|---:|---:|---:|---:|",
            ]
            labels = {
                "paced": f"paced ({c['paced_think_s']:.0f} s think)",
                "closed": "closed loop",
                "apart": "closed loop, Redis on the other core",
            }
            for setting, label in labels.items():
                alone_name, shared_name = CLUSTER_SETTINGS[setting]
                mean, sd = c["own_turns_mean_sd"][setting]
                lines.append(
                    f"| {label} | {c['own_p50'][alone_name]:.1f} | "
                    f"{c['own_p50'][shared_name]:.1f} | "
                    f"**{c['own_added_p50'][setting]:+.1f}** | {mean:+.2f} ({sd:.2f}) |"
                )
    if "streaming" in out:
        lines += [
            "",
            "**8. Streaming input** (replies appended a word at a time at 30 words/s; "
            "baseline: the same first sentence spoken whole), ms",
            "",
            "| clients | first sentence whole, first byte p50 | streamed, first byte after "
            "the sentence was complete, p50 | p99 | added p50 | smallest listener slack "
            "| segments | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in out["streaming"]:
            lines.append(
                f"| {row['clients']} | {row['base_p50']:.1f} | {row['stream_p50']:.1f} | "
                f"{row['stream_p99']:.1f} | {row['added_p50']:+.1f} | "
                f"{row['min_slack_ms']:.0f} | {row['segments']:.0f} | {row['errors']} |"
            )
    if "hostile" in out:
        lines += hostile_markdown(out["hostile"])
    if "agents" in out:
        lines += agents_markdown(out["agents"])
    if "tenants" in out:
        lines += tenants_markdown(out["tenants"])
    if "resume" in out:
        lines += resume_markdown(out["resume"])
    # Scenarios in modules of their own (bench/scale.py, burst.py, soak.py).
    for name in SCENARIO_MODULES:
        if name in out:
            lines += ["", *importlib.import_module(name).markdown(out)]
    return "\n".join(lines) + "\n"


def agents_markdown(a: dict[str, Any]) -> list[str]:
    """Scenario 10's section of results.md."""
    lines = [
        "",
        f"**10. Voice-agent doors** (run {a['date']}): an LLM-like reply of four sentences "
        f"streamed a word at a time at {a['tokens_per_s']} words/s, one context per reply on "
        "a kept connection, each client's next reply once the last one's final came (closed "
        "loop): (a) `/v1/stream`'s streaming input (`speak` with `stream`, `append`s, "
        "`finish`), (b) ElevenLabs' `multi-stream-input` (`context_id`, `flush`, "
        "`close_context`), (c) Cartesia's `/tts/websocket` (`continue`), all asking "
        f"`{a['format']}` with word timings; the doors take turns (each first in one turn of "
        "three). First audio: from the first piece sent to the first audio byte (the first "
        "sentence takes about 0.35 s to write), and from the piece that completed the "
        "first sentence; ms. Stray: audio of a context after its final or amid another's "
        "(0: every final came last, every context's audio in one run); listener gaps: "
        "replies a listener playing from their first byte would have heard a gap in. CPU "
        "per reply, ms: the server's (its own core), the fake Edge's and the load "
        "clients' (the other core).",
        "",
        "| clients | door | replies | finals | first audio p50 | p99 | vs (a) p50 | p99 "
        "| after the first sentence p50 | stray | listener gaps | errors "
        "| server CPU | fake CPU | clients' CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    names = {"v1": "(a) /v1/stream", "elevenlabs": "(b) ElevenLabs", "cartesia": "(c) Cartesia"}
    for row in a["rows"]:
        if row.get("todo"):
            lines.append(
                f"| {row['clients']} | {names[row['door']]} | TODO: the door was not on the "
                "server when this ran | | | | | | | | | | | | |"
            )
            continue
        errors = ", ".join(f"{code} {n}" for code, n in row["errors"].items()) or "0"
        lines.append(
            f"| {row['clients']} | {names[row['door']]} | {row['replies']} | {row['finals']} | "
            f"{row['first_p50']:.1f} | {row['first_p99']:.1f} | {row['added_p50']:+.1f} | "
            f"{row['added_p99']:+.1f} | {row['after_sentence_p50']:.1f} | {row['stray']} | "
            f"{row['listener_gaps']} | {errors} | {row['server_cpu_ms']:.1f} | "
            f"{row['fake_cpu_ms']:.1f} | {row['client_cpu_ms']:.1f} |"
        )
    return lines


def tenants_markdown(t: dict[str, Any]) -> list[str]:
    """Scenario 11's section of results.md."""
    limits = t["limits"]
    stored, writes = t["stored"], t["writes"]
    add, record, charge = writes["add"], writes["record"], writes["charge"]
    lines = [
        "",
        f"**11. Tenants** (run {t['date']}): the cost of per-tenant accounting, {t['clients']} "
        f"live clients through the WebSocket, new texts: (a) a server with `TTS_API_KEY` only "
        f"(one key, limits per client IP) against (b) one with `API_KEYS_FILE` holding "
        f"{t['tenants']} tenants, the clients spread evenly over them, each tenant with "
        f"`requests` {limits['requests']:,} per `window` of {limits['window']} s, `concurrent` "
        f"{limits['concurrent']:,}, `characters_per_day` {limits['characters_per_day']:,} and "
        f"`characters_per_month` {limits['characters_per_month']:,} (nothing refused; every speak "
        "checked against its tenant's limits and quotas, charged, tallied, and the tallies "
        "written to SQLite once a second). Both on the server's core, loaded at once with "
        "half the clients each (paired turns, as scenario 7; the two loads' processes told "
        "to go (a)'s first in one turn, (b)'s in the next); both rate limits too high to "
        "refuse, so that every speak passes a limiter. First byte, ms; added = (b) minus "
        "(a); the server's own part as in scenario 7 (`ttfb_ms` − `upstream_ms`, logged to "
        "0.1 ms); server CPU per utterance, ms; the share of the server's core both used:",
        "",
        "| setting | (a) p50 | p99 | (b) p50 | p99 | added p50 | added p99 | added p50 turn by "
        "turn | own part added p50 (turns' mean, sd) | CPU (a) | CPU (b) | core busy | "
        "requests (a) / (b) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, row in t["settings"].items():
        label = f"paced ({t['think_s']:g} s think)" if setting == "paced" else "closed loop"
        mean, sd = row["turns_mean_sd"]
        own_mean, own_sd = row["own_turns_mean_sd"]
        errors = row["errors"]["a"] + row["errors"]["b"]
        lines.append(
            f"| {label} | {row['a_first_p50']:.1f} | {row['a_first_p99']:.1f} | "
            f"{row['b_first_p50']:.1f} | {row['b_first_p99']:.1f} | "
            f"**{row['added_p50']:+.1f}** | {row['added_p99']:+.1f} | "
            f"{_signed(row['turns_added_p50'])} (mean {mean:+.2f}, sd {sd:.2f}) | "
            f"{row['own_added_p50']:+.1f} ({own_mean:+.2f}, {own_sd:.2f}) | "
            f"{row['a_cpu_ms']:.2f} | {row['b_cpu_ms']:.2f} | {100 * row['busy']:.0f} % | "
            f"{row['requests']['a']} / {row['requests']['b']} | {errors} |"
        )
    lines += [
        "",
        f"(b)'s SQLite file after its stop: {stored['requests']} requests of the "
        f"{t['served_b']} it served, {stored['characters']:,} characters, over "
        f"{stored['tenants']} tenants. Apart from a server, on its core (bench/usage_writes.py): "
        f"`SqliteUsage.add` sustained {add['rows_per_s']:,.0f} tally rows a second in "
        f"batches of {add['rows_per_batch']} (100 tenants × 7 doors, as `Usage.flush` makes "
        f"them; {add['batches']} batches back to back, {add['batch_ms_p50']:.2f} ms each at "
        f"p50, at most {add['batch_ms_max']:.2f}; a 1 ms timer on the loop fired "
        f"{add['lag_ms_p50']:.2f} ms late at p50, {add['lag_ms_p99']:.2f} at p99, against "
        f"{add['idle_lag_ms_p50']:.2f} / {add['idle_lag_ms_p99']:.2f} idle); `Usage.record` "
        f"{record['records_per_s']:,.0f} calls a second on the loop ({record['ms_per_10000']:.1f} "
        f"ms per 10,000 at p50 of {record['rounds']} rounds); an utterance's check and charge "
        f"(`Usage.charge` twice) {charge['us_per_utterance']:.1f} µs.",
    ]
    return lines


def resume_markdown(r: dict[str, Any]) -> list[str]:
    """Scenario 12's section of results.md."""
    lines = [
        "",
        f"**12. Resume** (run {r['date']}): the cost of keeping each WebSocket utterance's "
        f"frames for a resume after a dropped connection, {r['clients']} live clients, new "
        "texts: (a) a server with `RESUME_WINDOW=0` (no log kept) against (b) one with the "
        "default (30 s: every frame sent is also kept in its utterance's log, for as long "
        "as the connection lasts or the window after the utterance's end). Both on the "
        "server's core, loaded at once with half the clients each (paired turns, as "
        "scenarios 7 and 11; (a)'s load first in one turn, (b)'s in the next). First byte, "
        "ms; added = (b) minus (a); the server's own part as in scenario 7 (`ttfb_ms` − "
        "`upstream_ms`, logged to 0.1 ms); server CPU per utterance, ms; the share of the "
        "server's core both used:",
        "",
        "| setting | (a) p50 | p99 | (b) p50 | p99 | added p50 | added p99 | added p50 turn by "
        "turn | own part added p50 (turns' mean, sd) | own part added p99 | CPU (a) | CPU (b) "
        "| core busy | requests (a) / (b) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, row in r["settings"].items():
        label = f"paced ({r['think_s']:g} s think)" if setting == "paced" else "closed loop"
        mean, sd = row["turns_mean_sd"]
        own_mean, own_sd = row["own_turns_mean_sd"]
        errors = row["errors"]["a"] + row["errors"]["b"]
        lines.append(
            f"| {label} | {row['a_first_p50']:.1f} | {row['a_first_p99']:.1f} | "
            f"{row['b_first_p50']:.1f} | {row['b_first_p99']:.1f} | "
            f"**{row['added_p50']:+.1f}** | {row['added_p99']:+.1f} | "
            f"{_signed(row['turns_added_p50'])} (mean {mean:+.2f}, sd {sd:.2f}) | "
            f"{row['own_added_p50']:+.1f} ({own_mean:+.2f}, {own_sd:.2f}) | "
            f"{row['own_added_p99']:+.1f} | "
            f"{row['a_cpu_ms']:.2f} | {row['b_cpu_ms']:.2f} | {100 * row['busy']:.0f} % | "
            f"{row['requests']['a']} / {row['requests']['b']} | {errors} |"
        )
    memory, p = r["memory"], r["parked"]
    outcomes = ", ".join(f"{kind} {n}" for kind, n in p["outcomes"].items()) or "none"
    errors = ", ".join(f"{kind} {n}" for kind, n in p["resume_errors"].items()) or "0"
    lines += [
        "",
        f"RSS after the last turn, its clients gone: (a) {memory['a']['rss_mb']:.0f} MB (peak "
        f"{memory['a']['peak_rss_mb']:.0f}), (b) {memory['b']['rss_mb']:.0f} MB (peak "
        f"{memory['b']['peak_rss_mb']:.0f}).",
        "",
        f"Parked utterances: {p['clients']} clients each speak a text of {p['sentences']} "
        f"sentences, new for each ({p['audio_s']:.1f} s of audio in {p['frames']:.0f} frames; "
        f"its log, every frame as sent, JSON messages too, {p['log_mb']:.3f} MB), and drop "
        f"their TCP connection (no close frame) after {p['cut_kb'][0]:.0f} to "
        f"{p['cut_kb'][1]:.0f} KB of its audio, on a server with `RESUME_WINDOW="
        f"{p['window_s']:g}`: {p['parked']} parked (`/stats` then counting "
        f"{p['connections_parked']} connections), their utterances spoken on into the logs, "
        f"{p['ended']} ended while parked ({outcomes}), the last {p['ended_after_s']:.1f} s "
        f"after the last drop; {p['not_resumed']} not resumed at the window's end. Its RSS: "
        f"{p['rss_before_mb']:.0f} MB before → {p['rss_parked_mb']:.0f} MB all parked and "
        f"ended → {p['rss_after_mb']:.0f} MB after the window → {p['rss_resumed_mb']:.0f} MB "
        f"after the resumes below (peak {p['peak_rss_mb']:.0f}). The same utterances heard "
        f"whole on a server with `RESUME_WINDOW=0` ({p['whole']} whole, errors "
        f"{p['whole_errors']}): {p['plain_rss_before_mb']:.0f} MB before → "
        f"{p['plain_rss_after_mb']:.0f} MB after (peak {p['plain_peak_rss_mb']:.0f}). "
        f"Added by parking, beyond that peak: **{p['mb_per_parked']:.3f} MB per parked "
        f"utterance**, against {p['log_mb']:.3f} MB of frames. Server CPU per utterance, its "
        f"synthesis included: {p['cpu_ms_per_parked']:.0f} ms parked, "
        f"{p['plain_cpu_ms']:.0f} ms heard whole without a log. The drops again, each "
        f"client back {p['away_s']:g} s after its drop with `resume`: {p['resumed']} of "
        f"{p['resumes']} resumed, `resumed` after **{p['resumed_p50']:.2f} ms** at p50, "
        f"{p['resumed_p99']:.2f} at p99 (at most {p['resumed_max']:.2f}), the first audio "
        f"after it **{p['first_audio_p50']:.2f} ms** at p50, {p['first_audio_p99']:.2f} at "
        f"p99 (at most {p['first_audio_max']:.2f}), from the `resume` sent; "
        f"{p['resume_whole']} heard whole (every audio byte and word once), "
        f"{p['resume_lost']} lost, errors {errors}.",
    ]
    if "logs" in p:
        logs = p["logs"]
        sent, trimmed = logs["as_sent"], logs["trimmed"]
        lines += [
            "",
            f"What a log holds, apart from a server (bench/resume_logs.py: {logs['utterances']} "
            f"logs filled as the server fills them, frames made as these utterances' were: "
            f"{logs['texts']} JSON messages, the rest audio chunks; tracemalloc): "
            f"**{sent['held_mb']:.3f} MB per utterance** against {sent['counted_mb']:.3f} MB "
            f"counted toward `RESUME_BUFFER_MB` and `RESUME_TOTAL_MB` (the frames' lengths): "
            f"the JSON messages {sent['json_mb']:.3f} MB (orjson {logs['orjson']} leaves "
            f"each in a buffer of about 4 KB, not shrunk: {logs['message_held']:,.0f} bytes "
            f"held for a {logs['message_length']}-byte `words` message), the audio chunks "
            f"{sent['audio_mb']:.3f} MB, the logs' records (a tuple and an int per frame) "
            f"{sent['records_mb']:.3f} MB. With each JSON message copied to a bytes object "
            f"of its length before it is kept (`bytes(memoryview(message))`, "
            f"{logs['trim_us']:.2f} µs a message): {trimmed['held_mb']:.3f} MB. "
            f"`Buffers.add`: {logs['add_us']:.2f} µs a frame; `Buffers.release` of a "
            f"connection's {logs['released']} utterances' logs, as at its end: "
            f"{logs['release_us']:.2f} µs a frame.",
        ]
    return lines


def hostile_markdown(h: dict[str, Any]) -> list[str]:
    """Scenario 9's section of results.md."""
    settings = h["settings"]
    lines = [
        "",
        f"**9. Hostile clients** (issue 31, findings 1 to 4; run {h.get('date', '?')}): each "
        f"attack on a new server "
        f"with the limits it meets at their defaults (`MAX_CONNECTIONS_PER_IP` "
        f"{settings['MAX_CONNECTIONS_PER_IP']}, `UPSTREAM_CONCURRENCY` "
        f"{settings['UPSTREAM_CONCURRENCY']}, {settings['UPSTREAM_SLOTS_PER_IP']} of them "
        f"per IP) and `IDLE_TIMEOUT` {float(settings['IDLE_TIMEOUT']):g} s; the attacker "
        f"connects from {ATTACKER_IP} (but for finding 2, from 127.0.0.1 as nginx would), "
        f"another client, the victim, from {VICTIM_IP}, each in its own process. The "
        f"victim's {h['samples']} samples without the attack, then {h['samples']} during it, "
        f"each a live speak (a new text) and a cached speak, each on a new WebSocket "
        f"connection, and `GET /health` on the side port, at once. p50 in ms, without → "
        f"during (during / without), and the slowest during; no rate limit "
        f"(`RATE_LIMIT_REQUESTS=0`, as for an attacker with many IPs); the server's core "
        f"busy without → during:",
        "",
        "| attack | what the attacker got | live first byte | cached first byte | /health "
        "| slowest during: live / cached / health | server core busy | errors without / during |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in h["attacks"]:
        without, during, ratios = row["without"], row["during"], row["ratios"]
        cells = [
            f"{without[f'{probe}_p50']:.1f} → {during[f'{probe}_p50']:.1f} "
            f"(×{ratios.get(probe, float('nan')):.2f})"
            for probe in PROBES
        ]
        slowest = " / ".join(f"{during[f'{probe}_max']:.1f}" for probe in PROBES)
        errors = f"{without['errors']} / {during['errors']}"
        if during["error_kinds"]:
            errors += " (" + ", ".join(f"{k}: {n}" for k, n in during["error_kinds"].items()) + ")"
        busy = row["busy"]
        lines.append(
            f"| {row['finding']}. {_attack_text(row)} | {_attacker_text(row)} | "
            f"{' | '.join(cells)} | {slowest} | {100 * busy['without']:.0f} → "
            f"{100 * busy['during']:.0f} % | {errors} |"
        )
    return lines


def _attack_text(row: dict[str, Any]) -> str:
    attack, got = row["attack"], row["attacker"]
    if row["mode"] == "junk_stream":
        return (
            f"streaming utterances of {attack['characters']:,} characters with no letter or "
            f"digit, in {got['piece']:,}-character appends, one after another"
        )
    if row["mode"] == "upgrade_after_get":
        return (
            f"`GET /`, then a WebSocket handshake on the same kept-alive connection, a try "
            f"every {1000 * attack['pace']:.0f} ms"
        )
    if row["mode"] == "idle_http":
        return (
            f"waves of {attack['connections']:,} idle kept-alive HTTP connections from one "
            "IP, each opened with `GET /nope`"
        )
    return f"{attack['requests']} `POST /tts` of {attack['characters']:,} characters at once"


def _attacker_text(row: dict[str, Any]) -> str:
    got = row["attacker"]
    if row["mode"] == "junk_stream":
        outcomes = ", ".join(f"{kind} {n}" for kind, n in got["outcomes"].items())
        refusals = sum(got["refusals"].values())
        return (
            f"{got['streams']} streams ({outcomes}), each ended {got['stream_ms_p50']:.0f} ms "
            f"after its first append (p50; at most {got['stream_ms_max']:.0f}); "
            f"{refusals} appends refused"
        )
    if row["mode"] == "upgrade_after_get":
        failed = ", ".join(f"{kind} {n}" for kind, n in got["outcomes"].items() if kind != "ok")
        return f"**{got['ok']} of {got['tries']}** upgraded (101 and hello)" + (
            f"; failed: {failed}" if failed else ""
        )
    if row["mode"] == "idle_http":
        refused = ", ".join(f"{kind} {n}" for kind, n in got["refused"].items())
        accepted = ", ".join(str(n) for n in got["accepted"])
        return (
            f"{got['waves']} waves: {accepted} accepted, the rest refused ({refused}); the "
            f"accepted closed by the server {got['closed_after_p50']:.1f} s after their "
            f"answer (p50; at most {got['closed_after_max']:.1f}); {got['left_open']} left open"
        )
    engines = "; ".join(
        f"{engine} {spoken['requests']}, first byte p50 {spoken['first_s_p50']:.1f} s"
        for engine, spoken in got["engines"].items()
    )
    return (
        f"spoken by (`X-TTS-Engine`): {engines or 'none'}; no audio yet at the attack's end: "
        f"{got['waiting']}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--ttfa", type=float, help=f"fake first-audio delay, s (0.15; quick: {QUICK_TTFA})"
    )
    parser.add_argument(
        "--speed", type=float, help=f"fake audio pace × real time (4; quick: {QUICK_SPEED:g})"
    )
    scenarios = [
        "live",
        "replay",
        "idle",
        "mixed",
        "http",
        "formats",
        "cluster",
        "streaming",
        "hostile",
        "agents",
        "tenants",
        "resume",
        "scale",
        "burst",
    ]
    parser.add_argument(
        "--only", nargs="*", default=scenarios, choices=[*scenarios, "soak"], metavar="SCENARIO"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench")
    args = parser.parse_args()
    if args.ttfa is None:
        args.ttfa = QUICK_TTFA if args.quick else 0.15
    if args.speed is None:
        args.speed = QUICK_SPEED if args.quick else 4.0
    fake = await start_fake(args.ttfa, args.speed)
    wss, voices = fake.match.split()
    bench = Bench(quick=args.quick, fake_urls=(wss, voices), fake_pid=fake.process.pid)
    previous = args.out / "results.json"
    if set(args.only) != set(scenarios) and previous.exists():
        # A partial run updates the scenarios it ran and keeps the others.
        bench.out.update(json.loads(previous.read_text()))

    async def scenario(name: str) -> None:
        started = time.perf_counter()
        await getattr(bench, name)()
        print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)

    try:
        if args.quick:
            # A quick run's figures only show that each scenario works (CI runs it so
            # that none rots): the scenarios run at once, each with its own servers,
            # and the run takes about as long as the longest one.
            await asyncio.gather(*map(scenario, args.only))
        else:
            for name in args.only:
                await scenario(name)
    finally:
        await close_workers()
        await stop(fake)

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    bench.out["machine"] = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "websockets": version("websockets"),
        "edge_tts": version("edge-tts"),
        "uvloop": version("uvloop"),
        "ttfa_ms": args.ttfa * 1000,
        "speed": args.speed,
        "quick": args.quick,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(bench.out, indent=2, default=str))
    table = markdown(bench.out)
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    # The scenario modules import this one as ``run``: the same module, not a copy
    # (whose pool of load processes would be another).
    sys.modules.setdefault("run", sys.modules["__main__"])
    asyncio.run(main())
