"""One load-generating process of the benchmark (bench/run.py starts several).

It reads a JSON spec from argv, opens its connections, prints ``ready``, waits for
``go`` on stdin, runs, writes its results to the spec's "out" file and prints
``done``; with ``--pool`` instead of a spec, it does so for each spec file named on
a line of stdin. Running the clients in their own processes keeps them off the
server's event loop.

Every mode but idle takes "think" (mean seconds a client waits before each
request) and "ramp" (seconds over which the clients' first requests are spread).

Modes:
    speak   clients speak texts through a ttsstream server (or the bare baseline);
            with "tokens_per_s", each text is streamed (speak with stream, one
            append per word at that rate, finish), as an LLM's reply; with "key",
            every client sends it as X-API-Key, with "keys", client n sends
            keys[n % len(keys)] (clients spread over tenants); with "cancel" ([low,
            high] audio bytes), each speak is cancelled (docs/protocol.md) once a
            random number of audio bytes in that range has come
    edge    clients call edge_tts.Communicate directly (baseline a); "requests" each,
            or with "duration", for that many seconds
    idle    clients connect and stay idle until ``stop`` arrives on stdin
    http    clients POST /v1/audio/speech on kept-alive connections, reading the audio
            (HTTP/1.1 written and read by hand: see _HttpConnection); "requests" each,
            or with "duration", for that many seconds
    agent   clients stream LLM-like replies, a word every 1/"tokens_per_s" s, through
            one of the voice-agent doors ("door": v1, elevenlabs or cartesia, see
            AGENT_DOORS; "url" is the server's ws://host:port), one context per reply
            on a kept connection
    drop    each client speaks one long text ("sentences" of long_text's, new for
            each); with "cut" ([low, high] audio bytes), once it has received a random
            number of audio bytes in that range it drops its TCP connection
            (transport.abort(): no close frame, as when the network goes away); with
            "away" too, it connects again that many seconds later, resumes the
            utterance (docs/protocol.md) and hears it to its end; with "duration"
            (and "cut", without "away"), each client drops, connects again, speaks a
            new text, drops… for that many seconds (its think before each speak)
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


async def _ramp(spec: dict[str, Any], rng: random.Random) -> None:
    """With "ramp", a client's first request waits a random part of that many seconds.

    Closed-loop clients that all start at ``go`` send their requests together, and
    since every request takes about as long, they keep arriving together, round after
    round: the benchmark then measures a herd of N, not N clients at work. Spread over
    about one request's length, they arrive as N independent clients do.
    """
    if spec.get("ramp"):
        await asyncio.sleep(rng.uniform(0, spec["ramp"]))


async def _think(spec: dict[str, Any], rng: random.Random) -> None:
    """With "think", a client waits that many seconds on average before a request."""
    if spec.get("think"):
        await asyncio.sleep(rng.expovariate(1 / spec["think"]))


async def speak_once(
    ws: ClientConnection,
    text: str,
    index: int,
    words: str | None = None,
    audio_format: str | None = None,
    cancel_at: int | None = None,
) -> dict[str, Any]:
    """One request; time to first audio byte and to the end, as the client sees them.

    With ``cancel_at``, the utterance is cancelled once that many audio bytes have
    come: the record says ``cancelled`` (the server's ``cancelled`` came), or
    ``late_cancel`` (its ``end`` came first, and the cancel's ``not_found``).
    """
    uid = f"b{index}"
    request = {"type": "speak", "id": uid, "text": text}
    if words is not None:
        request["words"] = words
    if audio_format is not None:
        request["format"] = audio_format
    started = time.perf_counter()
    await ws.send(orjson.dumps(request).decode())
    first = None
    size = 0
    frames = 0
    cancel_sent = False
    while True:
        frame = await ws.recv()
        frames += 1
        if isinstance(frame, bytes):
            size += len(frame)
            if first is None:
                first = time.perf_counter() - started
            if cancel_at is not None and not cancel_sent and size >= cancel_at:
                await ws.send(orjson.dumps({"type": "cancel", "id": uid}).decode())
                cancel_sent = True
            continue
        message = orjson.loads(frame)
        kind = message.get("type")
        if kind == "cancelled" and cancel_sent:
            return {
                "ttfb": first,
                "ttlb": time.perf_counter() - started,
                "bytes": size,
                "frames": frames,
                "index": index,
                "cached": False,
                "cancelled": True,
            }
        if kind == "end" and cancel_sent:  # too late: the cancel's not_found follows
            while True:
                late = await ws.recv()
                if isinstance(late, str) and orjson.loads(late).get("type") == "error":
                    break
            return {
                "ttfb": first,
                "ttlb": time.perf_counter() - started,
                "bytes": size,
                "frames": frames,
                "index": index,
                "cached": message.get("cached", False),
                "late_cancel": True,
            }
        if kind == "end":
            return {
                "ttfb": first,
                "ttlb": time.perf_counter() - started,
                "bytes": size,
                "frames": frames,
                "index": index,
                "cached": message.get("cached", False),
                "audio_ms": message.get("audio_ms", 0.0),
            }
        if kind == "error":
            return {"error": message.get("code", "error")}


#: MP3 at 48 kbit/s: bytes per millisecond of audio, for the listener model.
BYTES_PER_MS = 6


async def stream_once(
    ws: ClientConnection, text: str, index: int, tokens_per_s: float
) -> dict[str, Any]:
    """One streamed reply: its words appended at ``tokens_per_s``.

    Measured: the time from sending the append that completed the first sentence
    (its end and the space after it) to the first audio byte; and the smallest
    slack of a listener who starts playing at the first byte: for every audio frame,
    how long before the listener needs it that it arrived (negative: a gap).
    """
    utterance = f"b{index}"
    tokens = [token + " " for token in text.split(" ")]
    # The append that completes the first segment: a sentence end once the text has
    # 20 characters (STREAM_MIN_CHARS), the space after it in the same append.
    completing = next(
        n
        for n, token in enumerate(tokens)
        if token.rstrip().endswith(".") and len("".join(tokens[: n + 1]).strip()) >= 20
    )
    started = time.perf_counter()
    completed_at: list[float] = []

    async def send() -> None:
        request = {"type": "speak", "id": utterance, "stream": True, "words": "batch"}
        await ws.send(orjson.dumps(request).decode())
        for number, token in enumerate(tokens):
            message = {"type": "append", "id": utterance, "text": token}
            await ws.send(orjson.dumps(message).decode())
            if number == completing:
                completed_at.append(time.perf_counter())
            await asyncio.sleep(1 / tokens_per_s)
        await ws.send(orjson.dumps({"type": "finish", "id": utterance}).decode())

    sender = asyncio.create_task(send())
    first = None
    size = 0
    slack = float("inf")
    try:
        while True:
            frame = await ws.recv()
            now = time.perf_counter()
            if isinstance(frame, bytes):
                if first is None:
                    first = now
                else:  # when the listener needs this frame, less when it came
                    slack = min(slack, first + size / BYTES_PER_MS / 1000 - now)
                size += len(frame)
                continue
            message = orjson.loads(frame)
            kind = message.get("type")
            if kind == "end":
                assert first is not None and completed_at
                return {
                    "first_after_sentence": first - completed_at[0],
                    "ttlb": now - started,
                    "bytes": size,
                    "index": index,
                    "segments": message.get("segments", 0),
                    "min_slack": slack,
                }
            if kind == "error" and message.get("for") is None:
                return {"error": message.get("code", "error")}
    finally:
        await sender


async def speak_mode(spec: dict[str, Any]) -> dict[str, Any]:
    # "keys": the clients' keys, client n connecting with keys[n % len(keys)] (clients
    # spread over tenants); else "key", every client's.
    keys: list[str] = spec.get("keys") or ([spec["key"]] if spec.get("key") else [])
    connections = []
    for number in range(spec["clients"]):
        headers = {"X-API-Key": keys[number % len(keys)]} if keys else None
        ws = await connect(spec["url"], compression=None, max_size=None, additional_headers=headers)
        if spec.get("hello", True):
            await ws.recv()
        connections.append(ws)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    texts: list[str] = spec["texts"]
    weights = spec.get("weights")
    rng = random.Random(spec.get("seed", 0))
    deadline = time.perf_counter() + spec.get("duration", 0)
    results: list[dict[str, Any]] = []
    counter = 0

    async def client(number: int, ws: ClientConnection) -> None:
        nonlocal counter
        done = 0
        await _ramp(spec, rng)
        while True:
            await _think(spec, rng)
            if spec.get("duration") and time.perf_counter() >= deadline:
                return
            if not spec.get("duration") and done >= spec["requests"]:
                return
            if spec.get("in_order"):
                text = texts[done % len(texts)]
            elif weights:
                text = rng.choices(texts, weights)[0]
            elif spec.get("unique") == "first":  # a new first sentence, the rest as before
                counter += 1
                text = f"Reply {spec['offset'] + counter}. {texts[0]}"
            elif spec.get("unique"):
                counter += 1
                text = f"{texts[0]} Number {spec['offset'] + counter}."
            else:
                text = texts[0]
            try:
                if spec.get("tokens_per_s"):
                    results.append(await stream_once(ws, text, done, spec["tokens_per_s"]))
                else:
                    cancel_at = rng.randint(*spec["cancel"]) if spec.get("cancel") else None
                    results.append(
                        await speak_once(
                            ws, text, done, spec.get("words"), spec.get("format"), cancel_at
                        )
                    )
            except Exception as exc:
                results.append({"error": type(exc).__name__})
                return
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(n, ws) for n, ws in enumerate(connections)))
    elapsed = time.perf_counter() - started
    dropped = sum(1 for ws in connections if ws.close_code is not None)
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    return {"results": results, "elapsed": elapsed, "dropped": dropped}


#: The voice every door of the agent mode asks for (the baseline's too).
AGENT_VOICE = "en-US-AriaNeural"


def agent_reply(number: int) -> str:
    """An LLM-like reply of four sentences; the first three are new for each ``number``
    (none cached), the last is a stock question (cached after its first time)."""
    return (
        f"Sure, your order number {number} is on its way to you now. "
        f"The parcel for order {number} left our warehouse early this morning. "
        f"It should reach you by Friday, and the tracking link for {number} is in your email. "
        "Is there anything else I can help you with today?"
    )


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """What one frame from a door means to the agent mode."""

    #: "audio", "final" (the context's last message), "error", or "other".
    kind: str
    #: The context it is about (``None``: the door does not say).
    context: str | None = None
    #: Audio bytes it carries.
    size: int = 0
    code: str = ""


@dataclass(frozen=True, slots=True)
class AgentDoor:
    """One door's side of a streamed reply, as its clients speak it."""

    #: The path and query of its WebSocket.
    path: str
    #: The messages that open context ``cid`` with its first piece of text.
    opening: Callable[[str, str], list[dict[str, Any]]]
    #: The message that appends a piece to context ``cid``.
    piece: Callable[[str, str], dict[str, Any]]
    #: The messages that end context ``cid``'s text.
    closing: Callable[[str], list[dict[str, Any]]]
    #: What a frame from the server means.
    read: Callable[[str | bytes], AgentEvent]
    #: Whether the first frame after the handshake is a greeting to read first.
    hello: bool = False


def _v1_read(frame: str | bytes) -> AgentEvent:
    if isinstance(frame, bytes):
        return AgentEvent("audio", None, len(frame))
    message = orjson.loads(frame)
    kind = message.get("type")
    if kind == "end":
        return AgentEvent("final", message.get("id"))
    if kind == "error" and message.get("for") is None:
        return AgentEvent("error", message.get("id"), code=message.get("code", "error"))
    return AgentEvent("other")


def _elevenlabs_read(frame: str | bytes) -> AgentEvent:
    message = orjson.loads(frame)
    context = message.get("contextId")
    if message.get("audio"):
        return AgentEvent("audio", context, len(base64.b64decode(message["audio"])))
    if message.get("isFinal"):
        return AgentEvent("final", context)
    if "error" in message:
        return AgentEvent("error", context, code=message["error"])
    return AgentEvent("other", context)


def _cartesia_read(frame: str | bytes) -> AgentEvent:
    message = orjson.loads(frame)
    kind, context = message.get("type"), message.get("context_id")
    if kind == "chunk":
        return AgentEvent("audio", context, len(base64.b64decode(message["data"])))
    if kind == "done":
        return AgentEvent("final", context)
    if kind == "error":
        return AgentEvent("error", context, code=str(message.get("error_code", "error")))
    return AgentEvent("other", context)


def _cartesia_message(cid: str, text: str, more: bool) -> dict[str, Any]:
    """A Cartesia generation request: every field again on every message, as its SDK
    and Pipecat send them."""
    return {
        "context_id": cid,
        "model_id": "sonic-2",
        "transcript": text,
        "continue": more,
        "voice": {"mode": "id", "id": AGENT_VOICE},
        "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000},
        "add_timestamps": True,
    }


#: The doors of the agent mode, each asking for 16 kHz PCM with word timings.
AGENT_DOORS = {
    "v1": AgentDoor(
        path="/v1/stream",
        opening=lambda cid, text: [
            {
                "type": "speak",
                "id": cid,
                "stream": True,
                "text": "",
                "voice": AGENT_VOICE,
                "format": "pcm_16000",
                "words": "batch",
            },
            {"type": "append", "id": cid, "text": text},
        ],
        piece=lambda cid, text: {"type": "append", "id": cid, "text": text},
        closing=lambda cid: [{"type": "finish", "id": cid}],
        read=_v1_read,
        hello=True,
    ),
    "elevenlabs": AgentDoor(
        path=f"/v1/text-to-speech/{AGENT_VOICE}/multi-stream-input?output_format=pcm_16000",
        opening=lambda cid, text: [
            {"text": " ", "context_id": cid},
            {"text": text, "context_id": cid},
        ],
        piece=lambda cid, text: {"text": text, "context_id": cid},
        closing=lambda cid: [
            {"context_id": cid, "flush": True},
            {"context_id": cid, "close_context": True},
        ],
        read=_elevenlabs_read,
    ),
    "cartesia": AgentDoor(
        path="/tts/websocket?cartesia_version=2025-04-16",
        opening=lambda cid, text: [_cartesia_message(cid, text, True)],
        piece=lambda cid, text: _cartesia_message(cid, text, True),
        closing=lambda cid: [_cartesia_message(cid, "", False)],
        read=_cartesia_read,
    ),
}
#: 16 kHz 16-bit PCM: bytes per millisecond of audio, for the listener model.
AGENT_BYTES_PER_MS = 32
#: Seconds a reply may go without a frame before its final counts as missing.
AGENT_SILENCE_TIMEOUT = 30.0
#: Seconds a client listens after its last reply's final for audio that should not come.
AGENT_LAST_LOOK = 0.3


async def agent_once(
    ws: ClientConnection, door: AgentDoor, text: str, cid: str, tokens_per_s: float
) -> dict[str, Any]:
    """One reply streamed through ``door`` as context ``cid``, a word at a time.

    Measured: the time from the first piece sent to the first audio byte, and from
    the piece that completed the first sentence; whether the context's final message
    came last and its audio contiguous (``stray``: audio of another context, or of
    this one after its final: the next reply, or agent_mode's last look, sees that);
    the smallest slack of a
    listener playing from the first byte (negative: it would have heard a gap).
    """
    tokens = [token + " " for token in text.split(" ")]
    completing = next(
        n
        for n, token in enumerate(tokens)
        if token.rstrip().endswith(".") and len("".join(tokens[: n + 1]).strip()) >= 20
    )
    times: dict[str, float] = {}

    async def send() -> None:
        for number, token in enumerate(tokens):
            messages = door.opening(cid, token) if number == 0 else [door.piece(cid, token)]
            for message in messages:
                await ws.send(orjson.dumps(message).decode())
            now = time.perf_counter()
            times.setdefault("first_piece", now)
            if number == completing:
                times["sentence"] = now
            await asyncio.sleep(1 / tokens_per_s)
        for message in door.closing(cid):
            await ws.send(orjson.dumps(message).decode())

    sender = asyncio.create_task(send())
    first = None
    size = 0
    stray = 0
    slack = float("inf")
    try:
        while True:
            try:
                frame = await asyncio.wait_for(ws.recv(), AGENT_SILENCE_TIMEOUT)
            except TimeoutError:
                return {"error": "no_final" if first is not None else "no_audio"}
            event = door.read(frame)
            now = time.perf_counter()
            if event.context not in (None, cid):
                stray += event.kind == "audio"
                continue
            if event.kind == "audio":
                if first is None:
                    first = now
                else:  # when the listener needs these bytes, less when they came
                    slack = min(slack, first + size / AGENT_BYTES_PER_MS / 1000 - now)
                size += event.size
            elif event.kind == "final":
                break
            elif event.kind == "error":
                return {"error": event.code}
    finally:
        await sender
    if first is None:
        return {"error": "no_audio"}
    return {
        "ttfb": first - times["first_piece"],
        "first_after_sentence": first - times["sentence"],
        "ttlb": now - times["first_piece"],
        "bytes": size,
        "min_slack": slack,
        "stray": stray,
    }


async def agent_mode(spec: dict[str, Any]) -> dict[str, Any]:
    door = AGENT_DOORS[spec["door"]]
    connections = []
    for _ in range(spec["clients"]):
        ws = await connect(spec["url"] + door.path, compression=None, max_size=None)
        if door.hello:
            await ws.recv()
        connections.append(ws)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    rng = random.Random(spec.get("seed", 0))
    results: list[dict[str, Any]] = []
    counter = 0
    late = 0

    async def client(ws: ClientConnection) -> None:
        nonlocal counter, late
        await _ramp(spec, rng)
        for _ in range(spec["requests"]):
            await _think(spec, rng)
            counter += 1
            number = spec["offset"] + counter
            try:
                results.append(
                    await agent_once(
                        ws, door, agent_reply(number), f"c{number}", spec["tokens_per_s"]
                    )
                )
            except Exception as exc:
                results.append({"error": type(exc).__name__})
                return
        # Audio after the last reply's final: stray too.
        try:
            while True:
                event = door.read(await asyncio.wait_for(ws.recv(), AGENT_LAST_LOOK))
                late += event.kind == "audio"
        except (TimeoutError, ConnectionClosed):
            pass

    cpu0 = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(client(ws) for ws in connections))
    elapsed = time.perf_counter() - started
    dropped = sum(1 for ws in connections if ws.close_code is not None)
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    return {
        "results": results,
        "elapsed": elapsed,
        "dropped": dropped,
        "cpu_s": time.process_time() - cpu0,
        "late": late,
    }


async def edge_mode(spec: dict[str, Any]) -> dict[str, Any]:
    import edge_tts
    import edge_tts.communicate

    edge_tts.communicate.WSS_URL = spec["wss_url"]  # type: ignore[attr-defined]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    results: list[dict[str, Any]] = []
    counter = 0

    rng = random.Random(spec.get("seed", 0))
    # With "duration", each client speaks until that many seconds after go.
    deadline = time.perf_counter() + spec.get("duration", 0)

    async def client() -> None:
        nonlocal counter
        await _ramp(spec, rng)
        index = -1
        while True:
            index += 1
            if not spec.get("duration") and index >= spec["requests"]:
                return
            await _think(spec, rng)
            if spec.get("duration") and time.perf_counter() >= deadline:
                return
            counter += 1
            text = f"{spec['texts'][0]} Number {spec['offset'] + counter}."
            started = time.perf_counter()
            first = None
            size = 0
            try:
                stream = edge_tts.Communicate(text, "en-US-AriaNeural", boundary="WordBoundary")
                async for chunk in stream.stream():
                    if chunk["type"] == "audio":
                        size += len(chunk["data"])
                        if first is None:
                            first = time.perf_counter() - started
            except Exception as exc:
                results.append({"error": type(exc).__name__})
                continue
            results.append(
                {
                    "ttfb": first,
                    "ttlb": time.perf_counter() - started,
                    "bytes": size,
                    "index": index,
                }
            )

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(spec["clients"])))
    return {"results": results, "elapsed": time.perf_counter() - started, "dropped": 0}


def long_text(number: int, sentences: int) -> str:
    """A text of ``sentences`` sentences, new for each ``number``: every number makes
    words of the same lengths, so the fake service speaks each text for as long."""
    return " ".join(
        f"Sentence {index:03d} of story {number:09d} keeps its listener waiting for the end."
        for index in range(sentences)
    )


#: Seconds a drop client may take in all before it counts as an error.
DROP_TIMEOUT = 300.0


@dataclass
class _Heard:
    """What a drop client has received of its utterance, on every connection."""

    audio: int = 0
    #: Its JSON messages (start, words, end).
    texts: int = 0
    #: Bytes of every frame, JSON messages too: what the server's log of it holds.
    size: int = 0
    frames: int = 0
    words: int = 0


async def _hear(
    ws: ClientConnection, heard: _Heard, uid: str, cut: int | None = None
) -> tuple[dict[str, Any] | None, float | None]:
    """Read ``uid``'s frames into ``heard`` until its end (returned) or, with ``cut``,
    until that many audio bytes are in (``None`` returned); and when the first audio
    frame of this call came (``perf_counter``)."""
    first = None
    while True:
        frame = await ws.recv()
        heard.size += len(frame)
        heard.frames += 1
        if isinstance(frame, bytes):
            first = first or time.perf_counter()
            heard.audio += len(frame)
            if cut is not None and heard.audio >= cut:
                return None, first
            continue
        message = orjson.loads(frame)
        if message.get("id") != uid:
            continue
        heard.texts += 1
        kind = message.get("type")
        if kind == "words":
            heard.words += len(message["words"])
        elif kind == "end":
            return message, first
        elif kind == "error":
            raise RuntimeError(message.get("code", "error"))


async def drop_mode(spec: dict[str, Any]) -> dict[str, Any]:
    connections = []
    for _ in range(spec["clients"]):
        ws = await connect(spec["url"], compression=None, max_size=None)
        connections.append((ws, orjson.loads(await ws.recv())))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    rng = random.Random(spec.get("seed", 0))
    results: list[dict[str, Any]] = []
    duration = spec.get("duration", 0)
    deadline = time.perf_counter() + duration

    async def client(
        number: int, ws: ClientConnection, hello: dict[str, Any], first_round: bool = True
    ) -> dict[str, Any] | None:
        if first_round:
            await _ramp(spec, rng)
        await _think(spec, rng)
        if duration and time.perf_counter() >= deadline:
            return None
        uid = f"d{number}"
        text = long_text(number, spec["sentences"])
        cut = rng.randint(*spec["cut"]) if spec.get("cut") else None
        heard = _Heard()
        started = time.perf_counter()
        await ws.send(
            orjson.dumps({"type": "speak", "id": uid, "text": text, "words": "batch"}).decode()
        )
        end, first = await _hear(ws, heard, uid, cut)
        record: dict[str, Any] = {"ttfb": (first or started) - started}
        if end is None:  # the network goes away: no close frame
            ws.transport.abort()
            record.update(cut_audio=heard.audio, cut_texts=heard.texts)
            if not spec.get("away"):
                return record
            await asyncio.sleep(spec["away"])
            async with connect(spec["url"], compression=None, max_size=None) as again:
                await again.recv()  # its hello
                at = {"id": uid, "offset": heard.audio, "frames": heard.texts}
                resume = {"type": "resume", "session": hello["session"], "utterances": [at]}
                sent = time.perf_counter()
                await again.send(orjson.dumps(resume).decode())
                answer = orjson.loads(await again.recv())
                answered = time.perf_counter()
                if answer.get("type") != "resumed":
                    return {"error": answer.get("reason") or answer.get("code", "not_resumed")}
                end, first = await _hear(again, heard, uid)
                assert end is not None
                record.update(
                    resumed_ms=(answered - sent) * 1000,
                    first_audio_ms=((first or answered) - sent) * 1000,
                    lost=len(answer.get("lost", [])),
                )
        # Whole: every audio byte and every word once (the end says how many were sent).
        record.update(
            audio=heard.audio,
            texts=heard.texts,
            size=heard.size,
            frames=heard.frames,
            whole=heard.audio == end["bytes"] and heard.words == end["words"],
        )
        return record

    async def guarded(number: int, ws: ClientConnection, hello: dict[str, Any]) -> None:
        first_round = True
        while True:
            try:
                async with asyncio.timeout(DROP_TIMEOUT):
                    if not first_round:  # the last connection is gone: a new one
                        await ws.close()
                        ws = await connect(spec["url"], compression=None, max_size=None)
                        hello = orjson.loads(await ws.recv())
                    record = await client(number, ws, hello, first_round)
            except Exception as exc:
                results.append({"error": type(exc).__name__ + (f" {exc}" if str(exc) else "")})
                return
            if record is None:  # the duration is over
                await ws.close()
                return
            results.append(record)
            if not duration:
                return
            first_round = False
            number += len(connections)  # a new text for each round

    started = time.perf_counter()
    await asyncio.gather(
        *(
            guarded(spec["offset"] + index, ws, hello)
            for index, (ws, hello) in enumerate(connections)
        )
    )
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(ws.close() for ws, _ in connections), return_exceptions=True)
    return {"results": results, "elapsed": elapsed, "dropped": 0}


class _HttpConnection:
    """One kept-alive HTTP/1.1 connection, spoken by hand.

    aiohttp's client cost the load processes about 0.4 ms of CPU per request, on
    the core they share with the fake service: when 100 clients start at once, the
    last request left its process about 20 ms after the first, which the benchmark
    counted as the server's (bench/NOTES.md). This writes a request already
    encoded and reads the answer's head and its chunked or sized body, no more.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, base: str) -> _HttpConnection:
        host, _, port = base.removeprefix("http://").partition(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def head(self) -> tuple[int, dict[str, str]]:
        """The status and headers (lower-cased names) of the next answer."""
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def chunks(self, headers: dict[str, str]) -> Any:
        """The body's pieces as they come (chunked, or sized at once)."""
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                yield await self.reader.readexactly(size)
                await self.reader.readexactly(2)
            await self.reader.readline()
        else:
            yield await self.reader.readexactly(int(headers.get("content-length", "0")))

    async def ask(self, request: bytes) -> tuple[int, dict[str, str]]:
        self.writer.write(request)
        return await self.head()


def _request(method: str, base: str, path: str, body: bytes = b"") -> bytes:
    host = base.removeprefix("http://")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def http_mode(spec: dict[str, Any]) -> dict[str, Any]:
    base = spec["url"]
    connections = [await _HttpConnection.open(base) for _ in range(spec["clients"])]
    for connection in connections:  # each kept-alive connection is used once first
        status, headers = await connection.ask(_request("GET", base, "/v1/models"))
        assert status == 200, status
        async for _ in connection.chunks(headers):
            pass
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    results: list[dict[str, Any]] = []
    counter = 0

    rng = random.Random(spec.get("seed", 0))

    deadline = time.perf_counter() + spec.get("duration", 0)

    async def client(connection: _HttpConnection) -> None:
        nonlocal counter
        await _ramp(spec, rng)
        index = -1
        while True:
            index += 1
            if not spec.get("duration") and index >= spec["requests"]:
                return
            await _think(spec, rng)
            if spec.get("duration") and time.perf_counter() >= deadline:
                return
            counter += 1
            text = spec["texts"][0]
            if spec.get("unique"):
                text = f"{text} Number {spec['offset'] + counter}."
            body = orjson.dumps({"model": "tts-1", "voice": "sage", "input": text})
            request = _request("POST", base, "/v1/audio/speech", body)
            started = time.perf_counter()
            try:
                status, headers = await connection.ask(request)
                first: float | None = None
                size = 0
                async for piece in connection.chunks(headers):
                    if first is None and piece:
                        first = time.perf_counter() - started
                    size += len(piece)
                if status != 200 or first is None:
                    results.append({"error": str(status)})
                    continue
            except Exception as exc:
                results.append({"error": type(exc).__name__})
                return
            results.append(
                {
                    "ttfb": first,
                    "ttlb": time.perf_counter() - started,
                    "bytes": size,
                    "index": index,
                    "cached": headers.get("x-tts-cache") == "hit",
                }
            )

    started = time.perf_counter()
    await asyncio.gather(*(client(connection) for connection in connections))
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.writer.close()
    return {"results": results, "elapsed": elapsed, "dropped": 0}


async def idle_mode(spec: dict[str, Any]) -> dict[str, Any]:
    headers = {"X-API-Key": spec["key"]} if spec.get("key") else None
    connections = []
    errors = 0
    for _ in range(spec["clients"]):
        try:
            ws = await connect(
                spec["url"],
                compression=None,
                additional_headers=headers,
                ping_interval=None,
                open_timeout=30,
            )
            await ws.recv()
            connections.append(ws)
        except Exception:
            errors += 1
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # go
    await loop.run_in_executor(None, sys.stdin.readline)  # stop
    dropped = sum(1 for ws in connections if ws.close_code is not None)
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    return {"connected": len(connections), "errors": errors, "dropped": dropped}


def run_spec(spec_file: str) -> None:
    """Run the spec in ``spec_file``: ``ready``, ``go``, the load, its results written
    to its "out" file, then ``done``."""
    with open(spec_file) as file:
        spec = json.load(file)
    modes = {
        "speak": speak_mode,
        "edge": edge_mode,
        "idle": idle_mode,
        "http": http_mode,
        "agent": agent_mode,
        "drop": drop_mode,
    }
    mode = modes[spec["mode"]]
    result = asyncio.run(mode(spec))
    # Results can be large (one record per request): a file, not the pipe.
    with open(spec["out"], "w") as file:
        json.dump(result, file)
    print("done", flush=True)


def main() -> None:
    """``load.py SPEC_FILE`` runs one spec; ``load.py --pool`` runs one spec per line of
    its standard input until it ends (bench/run.py keeps such processes for the whole
    run: a new process per load cost about a second, more than a quick run's loads)."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    if sys.argv[1] != "--pool":
        run_spec(sys.argv[1])
        return
    while line := sys.stdin.readline():
        run_spec(line.strip())


if __name__ == "__main__":
    main()
