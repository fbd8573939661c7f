"""One process of the hostile-client scenario (bench/run.py, scenario 9): an attacker
of issue 31, or the victim, another client timing what it gets meanwhile.

It reads a JSON spec from argv and writes its results, one JSON object, to the spec's
"out" file. The victim takes its samples and exits. An attacker prints ``attacking``
once its attack is in place, keeps it up until ``stop`` arrives on stdin (or for
"max_s" seconds at most), ends it, and exits.

Each runs in a process of its own, so that the attacker never shares the victim's
event loop; each binds its connections to the loopback address "source" (such as
127.0.0.2), so that the server sees the attacker and the victim as two client IPs.

Modes:
    victim             samples, each a live speak, a cached speak (each on a new
                       WebSocket connection) and a GET /health on the side port, at
                       once: time to first audio byte and to /health's answer
    junk_stream        (finding 1) streaming utterances of "characters" characters
                       with no letter or digit, in appends of the server's
                       max_text_length, one after another on one connection
    upgrade_after_get  (finding 2) tries, "pace" seconds apart: GET / and then a
                       WebSocket handshake on the same kept-alive TCP connection, as
                       nginx's upstream keep-alive sends them; a success is a 101 and
                       the hello message
    idle_http          (finding 3) waves of "connections" HTTP connections, each
                       opened with GET /nope and then left idle, each wave held until
                       the server closes them (or "idle_timeout" plus IDLE_MARGIN)
    long_tts           (finding 4) "requests" POST /tts of "characters" characters
                       each, sent at once, their audio read until the attack ends
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from websockets.asyncio.client import connect

#: Text with nothing to speak, of the kinds issue 31 reported (dots, dashes and
#: newlines, emoji).
UNSPEAKABLE = ". . . . ,,,, - \n😀😀. "
#: A sentence the long texts of finding 4 repeat.
LONG_SENTENCE = "Long requests hold the upstream slots of the server for a long time. "
#: Seconds past its IDLE_TIMEOUT the server gets to close an idle connection before the
#: attacker counts it as left open.
IDLE_MARGIN = 5.0
#: Connections of a wave being opened at once (finding 3).
OPENING = 50
#: Seconds an attack waits after its first audio before it says it is in place (the
#: other requests admitted meanwhile; finding 4).
SETTLE = 0.5
#: Seconds any one request or handshake of an attacker may take.
STEP_TIMEOUT = 10.0


def _connect(spec: dict[str, Any], url: str | None = None) -> connect:
    """A WebSocket connection to the server from the spec's source address."""
    return connect(
        url or spec["url"],
        compression=None,
        max_size=None,
        proxy=None,
        open_timeout=STEP_TIMEOUT,
        local_addr=(spec["source"], 0),
    )


async def _open(spec: dict[str, Any], port: int | None = None) -> tuple[Any, Any]:
    """A TCP connection to the server's port (or ``port``) from the spec's source."""
    host, _, main_port = spec["host"].partition(":")
    return await asyncio.open_connection(
        host, port or int(main_port), local_addr=(spec["source"], 0)
    )


def _request(
    spec: dict[str, Any], method: str, path: str, *headers: str, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {spec['host']}", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join([*lines, "", ""])).encode() + body


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and headers (lower-cased names) of the next answer."""
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("closed before an answer")
    status = int(line.split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def _body(
    reader: asyncio.StreamReader,
    headers: dict[str, str],
    on_piece: Callable[[bytes], None] = lambda piece: None,
) -> None:
    """Read an answer's body (chunked, sized, or to the connection's end)."""
    if headers.get("transfer-encoding") == "chunked":
        while size := int((await reader.readline()).split(b";")[0], 16):
            on_piece(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readline()
    elif "content-length" in headers:
        on_piece(await reader.readexactly(int(headers["content-length"])))
    else:
        on_piece(await reader.read())


# The victim


async def _spoken(spec: dict[str, Any], text: str) -> dict[str, Any]:
    """A speak of ``text`` on a new connection: ms to its first audio byte."""
    async with _connect(spec) as ws:
        await ws.recv()  # hello
        request = {"type": "speak", "id": "v", "text": text, "words": "none"}
        started = time.perf_counter()
        await ws.send(orjson.dumps(request).decode())
        first = None
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):
                if first is None:
                    first = time.perf_counter() - started
                continue
            message = orjson.loads(frame)
            if message["type"] == "error":
                return {"error": message.get("code", "error")}
            if message["type"] == "end":
                if first is None:
                    return {"error": "no_audio"}
                return {"ms": first * 1000, "cached": message.get("cached", False)}


async def _health(spec: dict[str, Any]) -> dict[str, Any]:
    """GET /health on the side port, on a new connection: ms to the whole answer."""
    started = time.perf_counter()
    reader, writer = await _open(spec, spec["health_port"])
    try:
        writer.write(_request(spec, "GET", "/health", "Connection: close"))
        status, headers = await _head(reader)
        await _body(reader, headers)
    finally:
        writer.close()
    if status != 200:
        return {"error": str(status)}
    return {"ms": (time.perf_counter() - started) * 1000}


async def _probe(probe: Awaitable[dict[str, Any]], timeout: float) -> dict[str, Any]:
    try:
        async with asyncio.timeout(timeout):
            return await probe
    except TimeoutError:
        return {"error": "timeout"}
    except Exception as exc:
        return {"error": type(exc).__name__}


async def victim(spec: dict[str, Any]) -> dict[str, Any]:
    """Samples: a live speak (a new text each time), a cached speak and /health at once."""
    samples = []
    for number in range(spec["samples"]):
        live, cached, health = await asyncio.gather(
            _probe(
                _spoken(spec, f"{spec['live_text']} {spec['offset'] + number}."), spec["timeout"]
            ),
            _probe(_spoken(spec, spec["cached_text"]), spec["timeout"]),
            _probe(_health(spec), spec["timeout"]),
        )
        samples.append({"live": live, "cached": cached, "health": health})
        await asyncio.sleep(spec["gap"])
    return {"samples": samples}


# The attacks: each takes its spec, a callable to say the attack is in place, and an
# event set when it is to end.

Attack = Callable[[dict[str, Any], Callable[[], None], asyncio.Event], Awaitable[dict[str, Any]]]


async def junk_stream(
    spec: dict[str, Any], in_place: Callable[[], None], stopping: asyncio.Event
) -> dict[str, Any]:
    """Finding 1: streams with nothing to speak, one after another, as fast as answered."""
    outcomes: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    durations: list[float] = []
    async with _connect(spec) as ws:
        piece = orjson.loads(await ws.recv())["max_text_length"]
        length = spec["characters"]
        text = (UNSPEAKABLE * (length // len(UNSPEAKABLE) + 1))[:length]
        in_place()
        number = 0
        while not stopping.is_set():
            number += 1
            utterance = f"junk{number}"
            started = time.perf_counter()
            await ws.send(orjson.dumps({"type": "speak", "id": utterance, "stream": True}).decode())
            for start in range(0, length, piece):
                append = {"type": "append", "id": utterance, "text": text[start : start + piece]}
                await ws.send(orjson.dumps(append).decode())
            await ws.send(orjson.dumps({"type": "finish", "id": utterance}).decode())
            while True:
                frame = await asyncio.wait_for(ws.recv(), STEP_TIMEOUT)
                if isinstance(frame, bytes):
                    outcomes["audio"] += 1
                    continue
                message = orjson.loads(frame)
                if message.get("id") != utterance or message["type"] not in ("end", "error"):
                    continue
                if message.get("for"):  # refused, the utterance goes on
                    refusals[message.get("code", "error")] += 1
                    continue
                outcomes[message["type"] if message["type"] == "end" else message["code"]] += 1
                durations.append(time.perf_counter() - started)
                break
    return {
        "streams": len(durations),
        "characters": length,
        "piece": piece,
        "outcomes": dict(outcomes),
        "refusals": dict(refusals),
        "durations": durations,
    }


def _handshake(spec: dict[str, Any]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return _request(
        spec,
        "GET",
        "/v1/stream",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    )


async def _frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A server's (unmasked) WebSocket frame: its opcode and payload."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(size)


def _close_frame() -> bytes:
    """A client's close frame, code 1000, masked."""
    payload = struct.pack("!H", 1000)
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x88, 0x80 | len(payload)]) + mask + masked


async def _upgrade_after_get(spec: dict[str, Any]) -> str:
    """One try: GET /, then the handshake on the same connection; "ok" or what failed."""
    reader, writer = await _open(spec)
    try:
        writer.write(_request(spec, "GET", "/", "Connection: keep-alive"))
        status, headers = await _head(reader)
        await _body(reader, headers)
        if status != 200:
            return f"GET / {status}"
        writer.write(_handshake(spec))
        status, headers = await _head(reader)
        if status != 101:
            return f"handshake {status}"
        opcode, payload = await _frame(reader)
        if opcode != 1 or orjson.loads(payload).get("type") != "hello":
            return "no hello"
        writer.write(_close_frame())
        while await reader.read(2**16):  # the server's close frame, then its end
            pass
        return "ok"
    finally:
        writer.close()


async def upgrade_after_get(
    spec: dict[str, Any], in_place: Callable[[], None], stopping: asyncio.Event
) -> dict[str, Any]:
    """Finding 2: the demo page, then its WebSocket, on one kept-alive connection."""
    outcomes: Counter[str] = Counter()
    in_place()
    while not stopping.is_set():
        outcome = await _probe_outcome(_upgrade_after_get(spec))
        outcomes[outcome] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), spec["pace"])
    return {"tries": sum(outcomes.values()), "ok": outcomes["ok"], "outcomes": dict(outcomes)}


async def _probe_outcome(attempt: Awaitable[str]) -> str:
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await attempt
    except TimeoutError:
        return "timeout"
    except Exception as exc:
        return type(exc).__name__


async def _idle(
    spec: dict[str, Any], opening: asyncio.Semaphore, answered: Callable[[], None]
) -> dict[str, Any]:
    """One connection opened with GET /nope (``answered`` called once it has its answer
    or failed); if answered 404, held until the server closes it (seconds from the
    answer), or until idle_timeout + IDLE_MARGIN (None)."""
    try:
        async with opening, asyncio.timeout(STEP_TIMEOUT):
            reader, writer = await _open(spec)
    except Exception as exc:
        answered()
        return {"refused": type(exc).__name__}
    try:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                writer.write(_request(spec, "GET", "/nope"))
                status, headers = await _head(reader)
                await _body(reader, headers)
        except Exception as exc:
            return {"refused": type(exc).__name__}
        finally:
            answered()
        if status != 404:
            return {"refused": str(status)}
        held_from = time.perf_counter()
        try:
            async with asyncio.timeout(spec["idle_timeout"] + IDLE_MARGIN):
                while await reader.read(2**16):
                    pass
        except TimeoutError:
            return {"held": None}
        except OSError:
            pass  # reset: closed too
        return {"held": time.perf_counter() - held_from}
    finally:
        writer.close()


async def _wave(
    spec: dict[str, Any], opening: asyncio.Semaphore, all_answered: asyncio.Event
) -> dict[str, Any]:
    """One wave of idle connections (``all_answered`` set once each has its answer)."""
    left = spec["connections"]

    def answered() -> None:
        nonlocal left
        left -= 1
        if not left:
            all_answered.set()

    results = await asyncio.gather(
        *(_idle(spec, opening, answered) for _ in range(spec["connections"]))
    )
    held = [r["held"] for r in results if "held" in r]
    return {
        "connections": spec["connections"],
        "accepted": len(held),
        "refused": dict(Counter(r["refused"] for r in results if "refused" in r)),
        "closed_after": [s for s in held if s is not None],
        "left_open": sum(1 for s in held if s is None),
    }


async def idle_http(
    spec: dict[str, Any], in_place: Callable[[], None], stopping: asyncio.Event
) -> dict[str, Any]:
    """Finding 3: waves of idle kept-alive connections from one IP, the next wave once
    the server has closed the last one's."""
    waves: list[dict[str, Any]] = []
    opening = asyncio.Semaphore(OPENING)
    while not waves or not stopping.is_set():
        all_answered = asyncio.Event()
        wave = asyncio.create_task(_wave(spec, opening, all_answered))
        if not waves:  # in place once the first wave's connections are all answered
            await all_answered.wait()
            in_place()
        waves.append(await wave)
    return {"waves": waves, "idle_timeout": spec["idle_timeout"]}


async def long_tts(
    spec: dict[str, Any], in_place: Callable[[], None], stopping: asyncio.Event
) -> dict[str, Any]:
    """Finding 4: long POST /tts requests at once, their audio read as it comes."""
    records: list[dict[str, Any]] = [{} for _ in range(spec["requests"])]
    first_audio = asyncio.Event()

    async def one(number: int) -> None:
        record = records[number]
        text = f"Request {spec['offset'] + number}. " + LONG_SENTENCE * (
            spec["characters"] // len(LONG_SENTENCE) + 1
        )
        body = orjson.dumps({"text": text[: spec["characters"]]})
        reader, writer = await _open(spec)
        try:
            started = time.perf_counter()
            writer.write(_request(spec, "POST", "/tts", body=body))
            status, headers = await _head(reader)
            record["status"] = status
            record["engine"] = headers.get("x-tts-engine")

            def on_piece(piece: bytes) -> None:
                if piece and "first_s" not in record:
                    record["first_s"] = time.perf_counter() - started
                    first_audio.set()
                record["bytes"] = record.get("bytes", 0) + len(piece)

            await _body(reader, headers, on_piece)
            record["ended"] = True
        except Exception as exc:
            record["error"] = type(exc).__name__
        finally:
            writer.close()

    tasks = [asyncio.create_task(one(number)) for number in range(spec["requests"])]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(first_audio.wait(), STEP_TIMEOUT)
    await asyncio.sleep(SETTLE)
    in_place()
    await stopping.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"requests": records, "characters": spec["characters"]}


ATTACKS: dict[str, Attack] = {
    "junk_stream": junk_stream,
    "upgrade_after_get": upgrade_after_get,
    "idle_http": idle_http,
    "long_tts": long_tts,
}


async def attack(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's attack until ``stop`` on stdin, or for "max_s" seconds at most."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def in_place() -> None:
        print("attacking", flush=True)

    def read_stop() -> None:
        sys.stdin.readline()
        with contextlib.suppress(RuntimeError):  # the loop is closed: over already
            loop.call_soon_threadsafe(stopping.set)

    # A daemon thread: at the deadline, the process exits without waiting for stdin.
    threading.Thread(target=read_stop, daemon=True).start()
    deadline = loop.call_later(spec["max_s"], stopping.set)
    try:
        return await ATTACKS[spec["mode"]](spec, in_place, stopping)
    finally:
        deadline.cancel()


def main() -> None:
    with open(sys.argv[1]) as file:
        spec = json.load(file)
    # Hundreds of connections at once (finding 3).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    result = asyncio.run(victim(spec) if spec["mode"] == "victim" else attack(spec))
    with open(spec["out"], "w") as file:
        json.dump(result, file)
    print("done", flush=True)


if __name__ == "__main__":
    main()
