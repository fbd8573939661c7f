"""A door adds no policy: every rule of admission and of a drain holds on every door.

One parametrised test per rule, over every door of the route table: ttsstream's
WebSocket (v1) and HTTP (``/tts``, OpenAI's ``/v1/audio/speech``), ElevenLabs'
WebSocket and HTTP, Cartesia's WebSocket and HTTP. Each door is driven by a small
adapter that speaks one short text the way that door's clients do and says what
came back: audio, a refusal (its status or error code), or a cut.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import TIMEOUT, ServerFactory, eventually, wait_for_entries
from tests.fake_edge import FakeEdge
from tests.redis_server import RedisServer
from ttsstream.routes import HTTP_DOORS, WEBSOCKET_ROUTES
from ttsstream.server import Server

TEXT = "Every door keeps the same rules."
VOICE = "en-US-AriaNeural"
KEY = "door-key"
ORIGIN = "https://app.example"
CARTESIA = {"Cartesia-Version": "2025-04-16"}


@dataclass(frozen=True)
class Outcome:
    """What a door answered: ``audio`` when it spoke, else why not (a status or a code)."""

    audio: bytes = b""
    status: int | None = None
    code: str | None = None

    @property
    def spoke(self) -> bool:
        return bool(self.audio) and self.status is None and self.code is None


Speak = Callable[[Server, dict[str, str]], Coroutine[Any, Any, Outcome]]


def _http(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def _ws(server: Server, path: str) -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def _post(
    server: Server, path: str, body: dict[str, Any], headers: dict[str, str]
) -> Outcome:
    async with (
        aiohttp.ClientSession() as session,
        session.post(_http(server, path), json=body, headers=headers) as response,
    ):
        try:
            data = await asyncio.wait_for(response.read(), TIMEOUT)
        except aiohttp.ClientPayloadError:
            return Outcome(code="truncated")
        if response.status != 200:
            return Outcome(status=response.status, code=_code_of(data))
        if response.content_type == "text/event-stream":
            return _sse(data)
        return Outcome(audio=data)


def _code_of(body: bytes) -> str | None:
    """The stable error code in any door's HTTP error shape."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):  # OpenAI's, Azure's
        return str(error.get("code"))
    if isinstance(error, str):  # ttsstream's, Cartesia's
        return error
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    if isinstance(detail, dict):  # ElevenLabs'
        return str(detail.get("status"))
    return None


def _sse(data: bytes) -> Outcome:
    audio = b""
    for line in data.splitlines():
        if line.startswith(b"data: "):
            event = orjson.loads(line[6:])
            if event.get("type") == "error":
                return Outcome(code=str(event["error"].get("code")))
            if "audio" in event:
                audio += base64.b64decode(event["audio"])
    return Outcome(audio=audio)


async def _ws_speak(
    url: str,
    headers: dict[str, str],
    messages: list[dict[str, Any]],
    read: Callable[[dict[str, Any] | bytes], tuple[bytes, bool, str | None]],
) -> Outcome:
    """Open a WebSocket, send ``messages``, read until ``read`` says the utterance ended."""
    try:
        async with websockets.connect(url, additional_headers=headers) as ws:
            for message in messages:
                await ws.send(orjson.dumps(message).decode())
            audio = b""
            while True:
                try:
                    frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
                except ConnectionClosed as closed:
                    return Outcome(
                        audio=audio, code=closed.rcvd.reason if closed.rcvd else "closed"
                    )
                parsed = frame if isinstance(frame, bytes) else orjson.loads(frame)
                data, done, code = read(parsed)
                audio += data
                if code is not None:
                    return Outcome(code=code)
                if done:
                    return Outcome(audio=audio)
    except InvalidStatus as refused:
        return Outcome(
            status=refused.response.status_code, code=_code_of(bytes(refused.response.body))
        )


def _read_v1(message: dict[str, Any] | bytes) -> tuple[bytes, bool, str | None]:
    if isinstance(message, bytes):
        return message, False, None
    if message["type"] == "error":
        return b"", False, message["code"]
    return b"", message["type"] == "end", None


def _read_elevenlabs(message: dict[str, Any] | bytes) -> tuple[bytes, bool, str | None]:
    assert isinstance(message, dict)
    if "error" in message:
        return b"", False, message["error"]
    if message.get("isFinal"):
        return b"", True, None
    return base64.b64decode(message.get("audio") or ""), False, None


def _read_cartesia(message: dict[str, Any] | bytes) -> tuple[bytes, bool, str | None]:
    assert isinstance(message, dict)
    if message.get("type") == "error":
        return b"", False, str(message.get("error_code") or message.get("error"))
    if message.get("type") == "chunk":
        return base64.b64decode(message["data"]), False, None
    return b"", message.get("type") == "done", None


async def v1(server: Server, headers: dict[str, str]) -> Outcome:
    speak = {"type": "speak", "id": "u", "text": TEXT}
    return await _ws_speak(_ws(server, "/v1/stream"), headers, [speak], _read_v1)


async def tts(server: Server, headers: dict[str, str]) -> Outcome:
    return await _post(server, "/tts", {"text": TEXT}, headers)


async def openai(server: Server, headers: dict[str, str]) -> Outcome:
    body = {"model": "tts-1", "voice": "alloy", "input": TEXT}
    return await _post(server, "/v1/audio/speech", body, headers)


async def elevenlabs_ws(server: Server, headers: dict[str, str]) -> Outcome:
    url = _ws(server, f"/v1/text-to-speech/{VOICE}/stream-input")
    messages = [{"text": " "}, {"text": TEXT + " "}, {"text": ""}]
    return await _ws_speak(url, headers, messages, _read_elevenlabs)


async def elevenlabs_http(server: Server, headers: dict[str, str]) -> Outcome:
    return await _post(server, f"/v1/text-to-speech/{VOICE}/stream", {"text": TEXT}, headers)


async def cartesia_ws(server: Server, headers: dict[str, str]) -> Outcome:
    message = {
        "context_id": "c",
        "model_id": "sonic-2",
        "transcript": TEXT,
        "continue": False,
        "voice": {"mode": "id", "id": VOICE},
        "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000},
    }
    url = _ws(server, "/tts/websocket")
    return await _ws_speak(url, {**CARTESIA, **headers}, [message], _read_cartesia)


async def cartesia_http(server: Server, headers: dict[str, str]) -> Outcome:
    body = {
        "model_id": "sonic-2",
        "transcript": TEXT,
        "voice": {"mode": "id", "id": VOICE},
        "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000},
    }
    return await _post(server, "/tts/bytes", body, {**CARTESIA, **headers})


async def azure(server: Server, headers: dict[str, str]) -> Outcome:
    document = (
        '<speak version="1.0" xmlns="http://www.w3.org/2001/10/synthesis" xml:lang="en-US">'
        f'<voice name="{VOICE}">{TEXT}</voice></speak>'
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            _http(server, "/cognitiveservices/v1"),
            data=document.encode(),
            headers={
                "Content-Type": "application/ssml+xml",
                "X-Microsoft-OutputFormat": "audio-24khz-48kbitrate-mono-mp3",
                **headers,
            },
        ) as response,
    ):
        try:
            data = await asyncio.wait_for(response.read(), TIMEOUT)
        except aiohttp.ClientPayloadError:
            return Outcome(code="truncated")
        if response.status != 200:
            return Outcome(status=response.status, code=_code_of(data))
        return Outcome(audio=data)


DOORS: dict[str, Speak] = {
    "v1": v1,
    "tts": tts,
    "openai": openai,
    "elevenlabs-ws": elevenlabs_ws,
    "elevenlabs-http": elevenlabs_http,
    "cartesia-ws": cartesia_ws,
    "cartesia-http": cartesia_http,
    "azure": azure,
}

#: The doors each adapter above stands for, by the route table's stats labels.
LABELS = {
    "v1": "ws",
    "tts": "http",
    "openai": "http",
    "elevenlabs-ws": "elevenlabs",
    "elevenlabs-http": "elevenlabs",
    "cartesia-ws": "cartesia",
    "cartesia-http": "cartesia",
    "azure": "azure",
}

#: Requests one speak counts toward the rate limit: a WebSocket's handshake, then its speak.
HITS = {door: 2 if door in ("v1", "elevenlabs-ws", "cartesia-ws") else 1 for door in DOORS}

doors = pytest.mark.parametrize("door", list(DOORS))


def test_every_door_of_the_route_table_is_covered() -> None:
    """Each WebSocket route and HTTP door has an adapter here: a door added to the
    route table without one fails this test."""
    labels = {route.label for route in WEBSOCKET_ROUTES}
    labels |= {door.__name__ for door in HTTP_DOORS}
    covered = set(LABELS.values()) | {"SpeechApi", "ElevenLabsApi", "CartesiaApi", "AzureApi"}
    assert labels <= covered, labels - covered


@doors
async def test_a_door_speaks_and_counts_on_its_own_label(door: str, server: Server) -> None:
    """Each door speaks the text, and its utterance is counted under its door's label."""
    outcome = await DOORS[door](server, {})
    assert outcome.spoke, outcome
    stats = server.stats.snapshot()
    assert stats["interfaces"][LABELS[door]] == 1
    assert stats["total_requests"] == 1


@doors
async def test_a_key_is_required_on_every_door(door: str, start_server: ServerFactory) -> None:
    """With TTS_API_KEY set, no door speaks without a key or with a wrong one, and every
    door speaks with the key as X-API-Key."""
    server = await start_server(api_keys=(KEY,))
    for headers in ({}, {"X-API-Key": "wrong"}):
        refused = await DOORS[door](server, headers)
        assert not refused.spoke and (refused.status == 401 or refused.code == "unauthorized")
    assert (await DOORS[door](server, {"X-API-Key": KEY})).spoke
    assert server.stats.auth_failures == 2


@doors
async def test_an_origin_not_allowed_is_refused_on_every_door(
    door: str, start_server: ServerFactory
) -> None:
    """With ALLOWED_ORIGINS set, a page of another origin is refused 403 on every door,
    and a page of the allowed one speaks."""
    server = await start_server(allowed_origins=(ORIGIN,))
    refused = await DOORS[door](server, {"Origin": "https://evil.example"})
    assert refused.status == 403 and refused.code == "origin_not_allowed"
    assert (await DOORS[door](server, {"Origin": ORIGIN})).spoke


@doors
async def test_the_rate_limit_holds_on_every_door(door: str, start_server: ServerFactory) -> None:
    """Past RATE_LIMIT_REQUESTS in the window, every door refuses with rate_limited (429
    at the handshake or the request, or the protocol's error for a speak)."""
    server = await start_server(rate_limit_requests=3)
    outcomes = [await DOORS[door](server, {}) for _ in range(4)]
    assert outcomes[0].spoke
    refused = [o for o in outcomes if not o.spoke]
    assert refused and all(o.status == 429 or o.code == "rate_limited" for o in refused)
    assert server.stats.rate_limited >= 1


@doors
async def test_a_drain_cuts_what_is_left_on_every_door(
    door: str, server: Server, fake: FakeEdge
) -> None:
    """A drain that runs out of time cuts an utterance in progress on any door: the
    client learns it (shutting_down, or a truncated stream), and the server closes."""
    fake.pause_after_chunks = 1
    speaking = asyncio.create_task(DOORS[door](server, {}))
    await eventually(lambda: fake.paused.is_set(), what="the utterance is under way")
    await eventually(lambda: server.stats.snapshot()["in_progress"][LABELS[door]] == 1)
    await asyncio.wait_for(server.drain(0), TIMEOUT)
    outcome = await asyncio.wait_for(speaking, TIMEOUT)
    assert not outcome.spoke
    assert outcome.code in ("shutting_down", "truncated") or outcome.status == 503, outcome
    fake.resume.set()


async def test_voice_map_names_a_voice_on_every_door(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A VOICE_MAP name (an ElevenLabs voice id hard-coded in an app, in any case) is
    spoken by the voice it maps to through ttsstream's own WebSocket, ElevenLabs' path
    and the HTTP door alike."""
    alias = "21m00Tcm4TlvDq8ikWAM"
    server = await start_server(voice_map=((alias.lower(), "en-US-GuyNeural"),))
    url = _ws(server, f"/v1/text-to-speech/{alias}/stream-input")
    messages = [{"text": " "}, {"text": TEXT + " "}, {"text": ""}]
    assert (await _ws_speak(url, {}, messages, _read_elevenlabs)).spoke
    speak = {"type": "speak", "id": "u", "text": TEXT + " Again.", "voice": alias}
    assert (await _ws_speak(_ws(server, "/v1/stream"), {}, [speak], _read_v1)).spoke
    body = {"text": TEXT + " Once more.", "voice": alias.upper()}
    assert (await _post(server, "/tts", body, {})).spoke
    assert [record.voice for record in fake.records] == [
        "Microsoft Server Speech Text to Speech Voice (en-US, GuyNeural)"
    ] * 3


async def test_voice_map_maps_a_cartesia_voice_id(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A Cartesia voice id (a UUID) in VOICE_MAP is spoken by the voice it maps to on
    Cartesia's WebSocket and HTTP; another UUID is the default voice."""
    mapped = "a0e99841-438c-4a64-b679-ae501e7d6091"
    server = await start_server(voice_map=((mapped, "en-US-GuyNeural"),))
    request = {
        "context_id": "c",
        "model_id": "sonic-2",
        "transcript": TEXT,
        "continue": False,
        "voice": {"mode": "id", "id": mapped},
        "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000},
    }
    url = _ws(server, "/tts/websocket")
    assert (await _ws_speak(url, CARTESIA, [request], _read_cartesia)).spoke
    other = {
        **request,
        "transcript": TEXT + " Again.",
        "voice": {"mode": "id", "id": "0" * 8 + mapped[8:]},
    }
    assert (await _post(server, "/tts/bytes", other, CARTESIA)).spoke
    assert [record.voice for record in fake.records] == [
        "Microsoft Server Speech Text to Speech Voice (en-US, GuyNeural)",
        f"Microsoft Server Speech Text to Speech Voice ({server.config.default_voice[:5]}, "
        f"{server.config.default_voice[6:]})",
    ]


@doors
async def test_the_connection_cap_holds_on_every_door(
    door: str, start_server: ServerFactory
) -> None:
    """With MAX_CONNECTIONS_PER_IP=1, a client holding a connection is refused 429
    too_many_connections on every door, and speaks once it has let it go."""
    server = await start_server(max_connections_per_ip=1)
    async with websockets.connect(_ws(server, "/v1/stream")) as held:
        await held.recv()  # hello: the connection is admitted and counted
        refused = await DOORS[door](server, {})
        assert refused.status == 429 and refused.code == "too_many_connections", refused
    await eventually(lambda: server.stats.snapshot()["connections"] == 0)
    assert (await DOORS[door](server, {})).spoke


@doors
async def test_the_cluster_rate_limit_holds_on_every_door(
    door: str, start_server: ServerFactory, redis: RedisServer
) -> None:
    """Two instances on one Redis share one rate window on every door: requests spread
    over both, each instance within the limit alone, are refused once the cluster's
    count passes it."""
    servers = [await start_server(redis_url=redis.url, rate_limit_requests=3) for _ in range(2)]
    # 4 requests in all (a WebSocket's handshake and its speak are two): 2 on each.
    turns = 4 // HITS[door]
    outcomes = [await DOORS[door](servers[turn % 2], {}) for turn in range(turns)]
    assert all(outcome.spoke for outcome in outcomes[:-1])
    assert outcomes[-1].status == 429 or outcomes[-1].code == "rate_limited", outcomes[-1]


#: The doors whose adapter's request is one cached utterance replayed as it was stored,
#: which the core's turns order (first frames first: ttsstream/core/turns.py). The
#: others' are not: ElevenLabs' stream-input is streamed text (its segments are spoken
#: on one timeline), Cartesia's adapters ask for PCM (made again on each play, so each
#: waits for its encoder), Azure's is SSML (its spans).
TAKE_TURNS = {"v1", "tts", "openai", "elevenlabs-http"}


@doors
async def test_cached_replays_take_their_turns_on_every_door(door: str, server: Server) -> None:
    """Clients asking at once for a text a door has cached each hear it whole; a whole
    cached utterance is replayed through the core's turns, whichever door asked, and
    none is left waiting for its first frame."""
    first = await DOORS[door](server, {})
    assert first.spoke, first
    await wait_for_entries(server, 1)
    turns = server.services.utterances.turns
    before = turns.starts
    outcomes = await asyncio.gather(*(DOORS[door](server, {}) for _ in range(3)))
    assert all(outcome.audio == first.audio for outcome in outcomes), door
    assert turns.starts - before == (3 if door in TAKE_TURNS else 0)
    assert turns.pending == 0
