"""The HTTP speech API: /tts and OpenAI's /v1/audio/speech, streamed, on the WebSocket's port."""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import miniaudio
import openai
import orjson
import pytest
from openai._streaming import SSEDecoder

from tests.conftest import (
    MANY_CLIENTS,
    TIMEOUT,
    Clock,
    ServerFactory,
    connected,
    eventually,
    wait_for_entries,
)
from tests.fake_edge import FRAME_BYTES, FakeEdge
from ttsstream.http import streams as speech
from ttsstream.http.openai import DEFAULT_VOICES, MODELS
from ttsstream.server import Server

TEXT = "Streaming over plain HTTP, as the upstream produces it."
KEY = "http-api-key-0123456789"


def http_of(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def post(
    server: Server, path: str, body: object, **options: Any
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(http_of(server) + path, json=body, **options) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_tts_streams_before_the_upstream_has_finished(server: Server, fake: FakeEdge) -> None:
    """POST /tts answers 200 audio/mpeg, chunked, with the first bytes while the upstream
    is paused mid-utterance; the whole body is the upstream's audio."""
    fake.pause_after_chunks = 2
    async with (
        aiohttp.ClientSession() as session,
        session.post(http_of(server) + "/tts", json={"text": TEXT}) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == "audio/mpeg"
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.headers["X-TTS-Cache"] == "miss"
        assert response.headers["X-TTS-Engine"] == "edge"
        assert response.headers["X-TTS-Voice"] == server.config.default_voice
        assert response.headers["X-Request-Id"].startswith("h-")
        first = await asyncio.wait_for(response.content.readany(), TIMEOUT)
        assert first and fake.paused.is_set() and not fake.records[0].completed
        fake.resume.set()
        audio = first + await response.read()
    assert audio == bytes(fake.records[0].audio)
    stats = server.stats.snapshot()
    assert stats["interfaces"]["http"] == 1 and stats["total_requests"] == 1
    assert sum(stats["interfaces"].values()) == 1  # counted on its own door only
    assert server.stats.outcomes_by_interface["http", "ok"] == 1


async def test_a_cached_text_comes_whole_with_its_length(server: Server, fake: FakeEdge) -> None:
    """The second time, the text is a cache hit: Content-Length and the same bytes."""
    _, headers, first = await post(server, "/tts", {"text": TEXT, "rate": "+10%"})
    await wait_for_entries(server, 1)
    status, headers, again = await post(server, "/tts", {"text": TEXT, "rate": "+10%"})
    assert (status, headers["X-TTS-Cache"]) == (200, "hit")
    assert headers["Content-Length"] == str(len(first)) and again == first
    assert len(fake.records) == 1


async def test_get_tts_takes_its_fields_from_the_query(server: Server, fake: FakeEdge) -> None:
    """GET /tts?text=…&voice=…&pitch=… speaks with those fields (for <audio src>)."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            http_of(server) + "/tts",
            params={"text": "Hello there.", "voice": "en-US-GuyNeural", "pitch": "+5Hz"},
        ) as response,
    ):
        assert response.status == 200
        audio = await response.read()
    assert audio == bytes(fake.records[0].audio)
    assert (fake.records[0].voice.endswith("GuyNeural)"), fake.records[0].pitch) == (True, "+5Hz")


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [
        ("/tts", {}, 400, "bad_message", "text"),
        ("/tts", {"text": "   "}, 400, "empty_text", "text"),
        ("/tts", {"text": "x" * 5001}, 400, "text_too_long", "text"),
        ("/tts", {"text": "Hi", "voice": "Bob"}, 400, "invalid_voice", None),
        ("/tts", {"text": "Hi", "voice": "en-US-NobodyNeural"}, 400, "invalid_voice", None),
        ("/tts", {"text": "Hi", "rate": "fast"}, 400, "invalid_parameter", "rate"),
        ("/tts", [1, 2], 400, "bad_message", None),
        (
            "/v1/audio/speech",
            {"model": 1, "voice": "alloy", "input": "Hi"},
            400,
            "bad_message",
            "model",
        ),
        ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy"}, 400, "bad_message", "input"),
        ("/v1/audio/speech", {"voice": "Bob", "input": "Hi"}, 400, "invalid_voice", "voice"),
        ("/v1/audio/speech", {"voice": 7, "input": "Hi"}, 400, "bad_message", "voice"),
        ("/audio/speech", {"input": "Hi", "speed": "fast"}, 400, "bad_message", "speed"),
        (
            "/v1/audio/speech",
            {"model": "tts-1", "voice": "alloy", "input": "Hi", "speed": 5},
            400,
            "invalid_parameter",
            "speed",
        ),
        (
            "/v1/audio/speech",
            {"model": "tts-1", "voice": "alloy", "input": "Hi", "response_format": "vorbis"},
            400,
            "unsupported_format",
            "response_format",
        ),
        (
            "/v1/audio/speech",
            {"model": "tts-1", "voice": "alloy", "input": "Hi", "stream_format": "x"},
            400,
            "invalid_parameter",
            "stream_format",
        ),
    ],
)
async def test_bad_requests_get_a_status_and_a_stable_code(
    server: Server,
    fake: FakeEdge,
    path: str,
    body: object,
    status: int,
    code: str,
    param: str | None,
) -> None:
    """Each bad request gets its status and code, in the endpoint's error shape."""
    await server.services.speech.voices()  # the list is known: voices are checked
    got, _, raw = await post(server, path, body)
    assert got == status
    error = orjson.loads(raw)
    if path == "/tts":
        assert error["error"] == code and error["message"]
    else:
        assert error["error"]["code"] == code and error["error"]["message"]
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["param"] == param
    assert fake.records == []


async def test_bodies_that_are_not_json_or_too_large(server: Server) -> None:
    """415 for a body declared as something else, 400 bad_json for broken JSON, 413 past 64 KiB."""
    async with aiohttp.ClientSession() as session:
        for data, headers, status, code in [
            (b"text=hi", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
            (b"{oops", {"Content-Type": "application/json"}, 400, "bad_json"),
            (
                orjson.dumps({"text": "y" * 70_000}),
                {"Content-Type": "application/json"},
                413,
                "body_too_large",
            ),
        ]:
            async with session.post(
                http_of(server) + "/tts", data=data, headers=headers
            ) as response:
                assert response.status == status
                assert orjson.loads(await response.read())["error"] == code


async def test_upstream_failure_before_audio_is_a_status(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Without a fallback, an upstream that refuses gives 503 upstream_unavailable."""
    server = await start_server(with_offline=False, upstream_retries=0)
    fake.refuse_status = 503
    status, _, raw = await post(server, "/tts", {"text": TEXT})
    assert (status, orjson.loads(raw)["error"]) == (503, "upstream_unavailable")
    status, _, raw = await post(
        server, "/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": TEXT}
    )
    error = orjson.loads(raw)["error"]
    assert (status, error["code"], error["type"]) == (503, "upstream_unavailable", "server_error")


async def test_the_fallback_voice_says_so_in_a_header(server: Server, fake: FakeEdge) -> None:
    """When Edge fails before audio, the offline voice speaks and X-TTS-Fallback says why."""
    fake.refuse_status = 503
    status, headers, audio = await post(server, "/tts", {"text": TEXT})
    assert status == 200 and audio
    assert (headers["X-TTS-Engine"], headers["X-TTS-Fallback"]) == (
        "espeak",
        "upstream_unavailable",
    )


async def test_a_failure_after_the_first_bytes_ends_the_stream_early(
    server: Server, fake: FakeEdge
) -> None:
    """Audio cut mid-way: the chunked body never ends (the client sees a truncated
    transfer); SSE: a last error event."""
    fake.drop_after_chunks = 3
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(server, "/tts", {"text": TEXT})
    status, _, raw = await post(
        server,
        "/v1/audio/speech",
        {"model": "tts-1", "voice": "sage", "input": TEXT + " Again.", "stream_format": "sse"},
    )
    events = [orjson.loads(line[6:]) for line in raw.split(b"\n\n") if line]
    assert status == 200 and events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "upstream_unavailable"


async def test_a_websocket_and_an_http_request_share_one_synthesis(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """The same text asked at once on both doors: one upstream call, the same bytes."""
    server = await start_server(**MANY_CLIENTS)
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await client.speak(TEXT)
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        http = asyncio.create_task(post(server, "/tts", {"text": TEXT}))
        await eventually(lambda: server.stats.coalesced, what="the HTTP request joined")
        fake.resume.set()
        spoken = await client.until_final("u1")
        status, headers, audio = await http
    assert status == 200 and headers["X-TTS-Cache"] == "miss"
    assert len(fake.records) == 1 and server.stats.coalesced == 1
    assert audio == bytes(spoken.audio) == bytes(fake.records[0].audio)


# Admission, as on the WebSocket


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("POST", {"headers": {"X-API-Key": KEY}}),
        ("POST", {"headers": {"Authorization": f"Bearer {KEY}"}}),
        ("GET", {"params": {"text": TEXT, "api_key": KEY}}),
    ],
)
async def test_every_key_form_opens_the_api(
    start_server: ServerFactory, method: str, options: dict[str, Any]
) -> None:
    """X-API-Key, Authorization: Bearer, and ?api_key= on a GET."""
    server = await start_server(api_keys=(KEY,))
    async with aiohttp.ClientSession() as session:
        if method == "POST":
            options = {**options, "json": {"text": TEXT}}
        async with session.request(method, http_of(server) + "/tts", **options) as response:
            assert response.status == 200
            assert await response.read()


async def test_one_key_per_http_request(start_server: ServerFactory) -> None:
    """Two different keys (even the right one beside a guess) get 400 ambiguous_key on
    /tts and /v1/audio/speech, each in its error shape; the same key twice speaks."""
    server = await start_server(api_keys=(KEY,))
    two = [("X-API-Key", "a-guess"), ("Authorization", f"Bearer {KEY}")]
    status, _, raw = await post(server, "/tts", {"text": TEXT}, headers=two)
    assert (status, orjson.loads(raw)["error"]) == (400, "ambiguous_key")
    status, _, raw = await post(
        server,
        f"/v1/audio/speech?api_key={KEY}",
        {"model": "tts-1", "voice": "alloy", "input": TEXT},
        headers={"Authorization": "Bearer another-guess"},
    )
    error = orjson.loads(raw)["error"]
    assert (status, error["code"], error["type"]) == (400, "ambiguous_key", "invalid_request_error")
    assert server.stats.auth_failures == 2
    same = [("X-API-Key", KEY), ("Authorization", f"Bearer {KEY}")]
    status, _, audio = await post(server, "/tts", {"text": TEXT}, headers=same)
    assert status == 200 and audio


async def test_refusals_over_http_are_those_of_the_websocket(start_server: ServerFactory) -> None:
    """No key, a wrong key, a refused origin, a forged X-Forwarded-For, the rate limit,
    the connection cap: refused as a handshake would be, in the endpoint's shape."""
    clock = Clock()
    server = await start_server(
        api_keys=(KEY,),
        allowed_origins=("https://app.example",),
        rate_limit_requests=6,
        trusted_proxies=("10.0.0.1",),
    )
    server.services.admission.limiter._clock = clock
    key = {"X-API-Key": KEY}
    for headers, status, code in [
        ({}, 401, "unauthorized"),
        ({"X-API-Key": "wrong"}, 401, "unauthorized"),
        ({**key, "Origin": "https://evil.example"}, 403, "origin_not_allowed"),
    ]:
        got, _, raw = await post(server, "/tts", {"text": TEXT}, headers=headers)
        assert (got, orjson.loads(raw)["error"]) == (status, code)
        got, _, raw = await post(
            server,
            "/v1/audio/speech",
            {"model": "tts-1", "voice": "alloy", "input": TEXT},
            headers=headers,
        )
        assert (got, orjson.loads(raw)["error"]["code"]) == (status, code)
    # A client that is not a trusted proxy cannot pick another IP to dodge the limit:
    # its six requests above and these count against 127.0.0.1.
    got, headers, raw = await post(
        server, "/tts", {"text": TEXT}, headers={**key, "X-Forwarded-For": "203.0.113.9"}
    )
    assert got == 429 and orjson.loads(raw)["error"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    assert server.stats.auth_failures == 4 and server.stats.origin_rejected == 2


async def test_a_stream_counts_as_a_connection(start_server: ServerFactory, fake: FakeEdge) -> None:
    """With MAX_CONNECTIONS_PER_IP=1, an open WebSocket leaves no room for an HTTP stream,
    and a stream in progress none for a WebSocket."""
    server = await start_server(max_connections_per_ip=1)
    async with connected(server):
        status, _, raw = await post(server, "/tts", {"text": TEXT})
        assert (status, orjson.loads(raw)["error"]) == (429, "too_many_connections")
    await eventually(
        lambda: server.services.admission.connections.total == 0, what="the WebSocket's place free"
    )
    fake.pause_after_chunks = 1
    stream = asyncio.create_task(post(server, "/tts", {"text": TEXT}))
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}/v1/stream") as response,
    ):
        assert response.status == 429
    fake.resume.set()
    assert (await stream)[0] == 200


async def test_cors_for_allowed_origins_only(start_server: ServerFactory) -> None:
    """A preflight from an allowed origin is answered, and the response exposes the
    X-TTS headers to it; another origin gets no CORS headers."""
    server = await start_server(allowed_origins=("https://app.example",))
    async with aiohttp.ClientSession() as session:
        async with session.options(
            http_of(server) + "/v1/audio/speech",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        ) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
        async with session.options(
            http_of(server) + "/tts", headers={"Origin": "https://evil.example"}
        ) as response:
            assert response.status == 403
    _, headers, _ = await post(
        server, "/tts", {"text": TEXT}, headers={"Origin": "https://app.example"}
    )
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "X-TTS-Cache" in headers["Access-Control-Expose-Headers"]


async def test_drain_finishes_streams_and_refuses_new_requests(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """While draining, a stream in progress finishes and a new request on a kept-alive
    connection gets 503 shutting_down (the port takes no new connection)."""
    server = await start_server()
    async with aiohttp.ClientSession() as kept, aiohttp.ClientSession() as session:
        async with kept.get(http_of(server) + "/v1/models") as warm:
            assert warm.status == 200  # its connection stays open, idle
        fake.pause_after_chunks = 2
        async with session.post(http_of(server) + "/tts", json={"text": TEXT}) as response:
            await asyncio.wait_for(response.content.readany(), TIMEOUT)
            drain = asyncio.create_task(server.drain(TIMEOUT))
            await eventually(lambda: server.state == "draining")
            async with kept.post(http_of(server) + "/tts", json={"text": "Too late."}) as late:
                assert late.status == 503
                assert orjson.loads(await late.read())["error"] == "shutting_down"
            fake.resume.set()
            audio = await response.read()
        await asyncio.wait_for(drain, TIMEOUT)
    assert audio and fake.records[0].completed


# The official openai client


OpenAIClients = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def openai_client() -> AsyncIterator[OpenAIClients]:
    """Make official clients of a server (``openai_client(server, key)``), each closed
    at the test's end (left open, one would close in a later test's event loop)."""
    clients: list[openai.AsyncOpenAI] = []

    def make(server: Server, key: str = "unused") -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=http_of(server) + "/v1", api_key=key, max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_the_openai_sdk_streams_speech(
    server: Server, fake: FakeEdge, openai_client: OpenAIClients
) -> None:
    """client.audio.speech.with_streaming_response.create streams MP3 that decodes to
    the upstream's duration; every model name and OpenAI voice is accepted."""
    client = openai_client(server)
    async with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=TEXT
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        chunks = [chunk async for chunk in response.iter_bytes()]
    audio = b"".join(chunks)
    assert audio == bytes(fake.records[0].audio)
    assert fake.records[0].voice.endswith("AvaNeural)")
    decoded = miniaudio.mp3_read_s16(audio)
    samples = array.array("h", decoded.samples)
    assert len(samples) / 24 == pytest.approx(len(audio) / FRAME_BYTES * 24, rel=0.05)
    assert len(MODELS) == 7 and len(DEFAULT_VOICES) == 13
    for model, voice in zip(MODELS, DEFAULT_VOICES, strict=False):
        speech = await client.audio.speech.create(model=model, voice=voice, input="Hi.")
        assert speech.content


async def test_the_openai_sdk_reads_server_sent_events(
    server: Server, fake: FakeEdge, openai_client: OpenAIClients
) -> None:
    """stream_format="sse": audio deltas as they come, word timestamps when asked, and a
    last done event with usage, parsed by the SDK's own SSE decoder."""
    client = openai_client(server)
    async with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="coral",
        input=TEXT,
        stream_format="sse",
        extra_body={"timestamps": True},
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [
            orjson.loads(event.data)
            async for event in SSEDecoder().aiter_bytes(response.iter_bytes())
        ]
    kinds = [event["type"] for event in events]
    assert kinds[-1] == "speech.audio.done" and kinds.count("speech.audio.done") == 1
    audio = b"".join(
        base64.b64decode(event["audio"])
        for event in events
        if event["type"] == "speech.audio.delta"
    )
    assert audio == bytes(fake.records[0].audio)
    words = [word for event in events if event["type"] == "speech.words" for word in event["words"]]
    assert [word["text"] for word in words] == [text for text, _, _ in fake.records[0].words]
    assert events[-1]["usage"]["input_tokens"] == len(TEXT)


async def test_the_openai_sdk_raises_its_own_errors(
    start_server: ServerFactory, openai_client: OpenAIClients
) -> None:
    """A wrong key is openai.AuthenticationError; past the rate limit, openai.RateLimitError."""
    server = await start_server(api_keys=(KEY,), rate_limit_requests=2)
    with pytest.raises(openai.AuthenticationError):
        await openai_client(server, "wrong").audio.speech.create(
            model="tts-1", voice="alloy", input=TEXT
        )
    client = openai_client(server, KEY)
    assert (await client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")).content
    with pytest.raises(openai.RateLimitError):
        await client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")


async def test_models_and_voices(
    server: Server, fake: FakeEdge, openai_client: OpenAIClients
) -> None:
    """GET /v1/models lists the model names (the SDK reads it); GET /v1/audio/voices every
    name voice accepts, OpenAI's first, each with the id to send and a name for people."""
    models = await openai_client(server).models.list()
    assert [model.id for model in models.data] == list(MODELS)
    async with aiohttp.ClientSession() as session:
        async with session.get(http_of(server) + "/v1/audio/voices") as response:
            listed = orjson.loads(await response.read())
        async with session.get(
            http_of(server) + "/v1/audio/voices", params={"locale": "en-GB"}
        ) as response:
            british = orjson.loads(await response.read())
    ids = [voice["id"] for voice in listed["voices"]]
    assert ids[: len(DEFAULT_VOICES)] == list(DEFAULT_VOICES)
    assert {voice["ShortName"] for voice in fake.voices} <= set(ids) and "espeak:fr" in ids
    by_id = {voice["id"]: voice for voice in listed["voices"]}
    assert by_id["en-US-AriaNeural"] == {
        "id": "en-US-AriaNeural",
        "name": "en-US-AriaNeural (Female, en-US)",
        "locale": "en-US",
        "gender": "Female",
        "engine": "edge",
    }
    assert by_id["alloy"] == {
        "id": "alloy",
        "name": "alloy → en-US-AvaNeural",
        "voice": "en-US-AvaNeural",
        "locale": "en-US",
        "gender": "Female",
        "engine": "edge",
    }
    assert by_id["espeak:fr"]["name"] == "espeak:fr (Male, fr-FR)"
    assert {alias["id"]: alias["voice"] for alias in listed["aliases"]} == DEFAULT_VOICES
    assert {voice["locale"][:5] for voice in british["voices"]} == {"en-GB"}
    assert "en-GB-scotland" in {voice["locale"] for voice in british["voices"]}
    assert {alias["id"] for alias in british["aliases"]} == {"ballad", "fable"}
    assert {"ballad", "fable", "en-GB-RyanNeural", "espeak:en"} <= {
        voice["id"] for voice in british["voices"]
    }


async def test_voice_map_overrides_the_default_table(
    start_server: ServerFactory, fake: FakeEdge, openai_client: OpenAIClients
) -> None:
    """VOICE_MAP=alloy=fr-FR-DeniseNeural speaks alloy with Denise."""
    server = await start_server(voice_map=(("alloy", "fr-FR-DeniseNeural"),))
    speech = await openai_client(server).audio.speech.create(
        model="tts-1", voice="alloy", input="Bonjour."
    )
    assert speech.content
    assert fake.records[0].voice.endswith("DeniseNeural)")


async def test_a_stream_cut_by_a_drain_is_told_so(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Past DRAIN_TIMEOUT a stream in progress ends: SSE with a shutting_down error event."""
    server = await start_server()
    fake.pause_after_chunks = 2
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            http_of(server) + "/v1/audio/speech",
            json={"model": "tts-1", "voice": "alloy", "input": TEXT, "stream_format": "sse"},
        ) as response,
    ):
        await asyncio.wait_for(response.content.readany(), TIMEOUT)
        await asyncio.wait_for(server.drain(0.2), TIMEOUT)
        raw = await asyncio.wait_for(response.read(), TIMEOUT)
    last = orjson.loads(raw.strip().split(b"\n\n")[-1][6:])
    assert (last["type"], last["error"]["code"]) == ("error", "shutting_down")
    assert server.stats.outcomes_by_interface["http", "shutting_down"] == 1


async def curl(*args: str) -> tuple[int, bytes, str]:
    """Run curl (Debian's; .ci/run installs it); its exit code, body and headers."""
    process = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--dump-header",
        "/dev/stderr",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    body, headers = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode is not None
    return process.returncode, body, headers.decode()


async def test_curl_speaks_with_and_without_a_key(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """The README's curl calls: POST /tts with X-API-Key, GET /tts?api_key=…, and 401
    without a key."""
    server = await start_server(api_keys=(KEY,))
    url = http_of(server) + "/tts"
    code, audio, headers = await curl(
        "-H",
        f"X-API-Key: {KEY}",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"text": "Hello from curl."}',
        url,
    )
    assert code == 0 and "200 OK" in headers.splitlines()[0]
    assert audio == bytes(fake.records[0].audio)
    code, again, headers = await curl(
        "--get",
        "--data-urlencode",
        "text=Hello from curl.",
        "--data-urlencode",
        f"api_key={KEY}",
        url,
    )
    assert code == 0 and again == audio and "x-tts-cache" in headers.lower()
    code, body, headers = await curl(
        "-H", "Content-Type: application/json", "-d", '{"text": "No key."}', url
    )
    assert "401" in headers.splitlines()[0]
    assert orjson.loads(body)["error"] == "unauthorized"


async def test_an_http_client_leaving_stops_nothing_shared(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """An HTTP client that disconnects mid-stream leaves the shared synthesis to the
    WebSocket client that asked for the same text: it ends whole, and is cached."""
    server = await start_server(**MANY_CLIENTS)
    fake.pause_after_chunks = 2
    async with connected(server) as client:
        async with (
            aiohttp.ClientSession() as session,
            session.post(http_of(server) + "/tts", json={"text": TEXT}) as response,
        ):
            await asyncio.wait_for(response.content.readany(), TIMEOUT)
            await client.speak(TEXT)
            await eventually(lambda: server.stats.coalesced, what="the speak joined")
            assert response.connection is not None
            transport = response.connection.transport
            assert transport is not None
            transport.abort()  # the HTTP client goes away
        fake.resume.set()
        result = await client.until_final("u1")
    assert result.final["type"] == "end"
    assert bytes(result.audio) == bytes(fake.records[0].audio)
    assert len(fake.records) == 1
    await wait_for_entries(server, 1)
    assert server.stats.outcomes_by_interface["http", "disconnected"] == 1


async def test_http_requests_are_counted_as_speaks_are(server: Server, fake: FakeEdge) -> None:
    """/stats counts every speech request, refused or spoken, and every error answer,
    on HTTP as on the WebSocket."""
    async with connected(server) as client:
        await client.speak("   ", id="empty")  # refused
        await client.until_final("empty")
        await client.speak(TEXT, id="spoken")
        await client.until_final("spoken")
    ws = server.stats.snapshot()
    await post(server, "/tts", {"text": "   "})  # refused
    await post(server, "/tts", {"text": TEXT + " Again."})
    both = server.stats.snapshot()
    assert (ws["total_requests"], ws["errors"]) == (2, 1)
    assert (both["total_requests"], both["errors"]) == (4, 2)


# Request bodies on the wire


async def _answer_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 answer given in full (with its Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines if line)
    }
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), TIMEOUT)
    return int(status_line.split()[1]), headers, body


def _head(path: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tts", {"text": TEXT}),
        ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": TEXT}),
    ],
)
async def test_a_chunked_body_is_read_to_its_end(
    server: Server, fake: FakeEdge, path: str, body: dict[str, Any]
) -> None:
    """A chunked body whose second half comes after the server began reading it is
    read whole: the audio, not bad_json."""
    raw = orjson.dumps(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(_head(path, Transfer_Encoding="chunked") + _chunk(raw[:10]))
        # The handler reads the body once admitted (the request is counted then).
        await eventually(lambda: server.stats.total_requests, what="the request counted")
        await asyncio.sleep(TIMEOUT / 50)  # the second segment comes later
        writer.write(_chunk(raw[10:]) + b"0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert fake.records[0].text == (body.get("text") or body["input"])


async def test_a_chunked_body_over_the_limit_is_413(server: Server) -> None:
    """A chunked body past 64 KiB, in pieces, gets 413 body_too_large."""
    piece = b" " * 2**14
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(_head("/tts", Transfer_Encoding="chunked") + _chunk(b'{"text": "Hi"}'))
        for _ in range(5):
            writer.write(_chunk(piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        status, _, answer = await _answer_of(reader)
    finally:
        writer.close()
    assert (status, orjson.loads(answer)["error"]) == (413, "body_too_large")


async def _trickle(writer: asyncio.StreamWriter, pause: float) -> None:
    """Send a body a byte at a time, ``pause`` seconds apart, until it is closed."""
    with contextlib.suppress(ConnectionError):
        while not writer.is_closing():
            await asyncio.sleep(pause)
            writer.write(b" ")
            await writer.drain()


async def test_a_trickled_body_gets_408_and_frees_its_connection(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies that keep coming a byte at a time past BODY_TIMEOUT get 408 body_timeout
    (both error shapes), and the connection slots they took are free again."""
    monkeypatch.setattr(speech, "BODY_TIMEOUT", TIMEOUT / 10)
    slots = 5
    server = await start_server(max_connections_per_ip=slots)
    paths = ["/tts", "/v1/audio/speech"] * slots
    connections = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(slots)]
    loop = asyncio.get_running_loop()
    began = loop.time()
    tricklers = []
    for (_, writer), path in zip(connections, paths, strict=False):
        writer.write(_head(path, Content_Length="1000") + b'{"text": "Slow')
        tricklers.append(asyncio.create_task(_trickle(writer, speech.BODY_TIMEOUT / 10)))
    try:
        answers = [await _answer_of(reader) for reader, _ in connections]
        took = loop.time() - began
    finally:
        for _, writer in connections:
            writer.close()
        await asyncio.gather(*tricklers)
    for (status, headers, body), path in zip(answers, paths, strict=False):
        assert (status, headers["connection"]) == (408, "close")
        error = orjson.loads(body)
        assert (error["error"] if path == "/tts" else error["error"]["code"]) == "body_timeout"
    assert speech.BODY_TIMEOUT <= took < speech.BODY_TIMEOUT + TIMEOUT
    assert server.services.admission.connections.total == 0
    status, _, audio = await post(server, "/tts", {"text": TEXT})
    assert status == 200 and audio


async def test_a_drain_does_not_wait_for_a_trickled_body(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body still coming when a drain ends is answered 503 shutting_down, and the
    server closes within its drain time, not the body's deadline."""
    monkeypatch.setattr(speech, "BODY_TIMEOUT", TIMEOUT * 4)
    server = await start_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(_head("/tts", Content_Length="1000") + b'{"text": "Slow')
    trickler = asyncio.create_task(_trickle(writer, TIMEOUT / 50))
    try:
        await eventually(lambda: server.stats.total_requests, what="the request counted")
        async with asyncio.timeout(TIMEOUT):
            await server.drain(TIMEOUT / 10)
            await server.wait_closed()
        status, _, body = await _answer_of(reader)
    finally:
        writer.close()
        await trickler
    assert (status, orjson.loads(body)["error"]) == (503, "shutting_down")


async def test_a_body_that_ends_early_is_no_server_error(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves before its body's declared end is counted as a refused
    request (bad_json), not logged as an error of the server."""
    caplog.set_level(logging.WARNING)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(_head("/tts", Content_Length="1000") + b'{"text": "Cut')
        await eventually(lambda: server.stats.total_requests, what="the request counted")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()
    await eventually(lambda: server.stats.errors, what="the refusal counted")
    assert server.stats.errors == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# OpenAI's contract as its clients use it (issue 32)


@pytest.mark.parametrize(
    "model",
    [None, "", "kokoro", "TTS-1", "tts-1-1106", "tts-1-hd-1106", "gpt-4o-mini-tts-2025-03-20"],
)
async def test_any_model_is_spoken(server: Server, fake: FakeEdge, model: str | None) -> None:
    """A model left out, empty, another server's, in capitals or dated speaks as tts-1
    (Edge has one quality)."""
    body = {"input": "Hi.", "voice": "alloy"} | ({} if model is None else {"model": model})
    status, headers, audio = await post(server, "/v1/audio/speech", body)
    assert (status, headers["Content-Type"]) == (200, "audio/mpeg")
    assert audio == bytes(fake.records[0].audio)


@pytest.mark.parametrize(
    ("voice", "spoken"),
    [
        (None, "EmmaMultilingualNeural"),  # DEFAULT_VOICE
        ("", "EmmaMultilingualNeural"),
        ("   ", "EmmaMultilingualNeural"),
        (" echo", "BrianNeural"),
        ("ALLOY ", "AvaNeural"),
        ("Nova", "JennyNeural"),
        (" en-US-GuyNeural ", "GuyNeural"),
        ({"id": " sage"}, "AriaNeural"),
    ],
)
async def test_a_voice_left_out_spaced_or_in_capitals(
    server: Server, fake: FakeEdge, voice: object, spoken: str
) -> None:
    """No voice or an empty one is DEFAULT_VOICE; surrounding spaces are dropped; OpenAI's
    names match in any case."""
    body = {"model": "tts-1", "input": "Hi."} | ({} if voice is None else {"voice": voice})
    status, headers, _ = await post(server, "/v1/audio/speech", body)
    assert status == 200
    assert fake.records[0].voice.endswith(f"{spoken})")
    assert headers["X-TTS-Voice"].endswith(spoken)


@pytest.mark.parametrize("path", ["/tts", "/v1/audio/speech"])
async def test_an_unknown_voice_is_named_with_where_the_list_is(
    server: Server, fake: FakeEdge, path: str
) -> None:
    """An unknown voice's error names it and says where the voices are listed; OpenAI's
    shape says param voice."""
    await server.services.speech.voices()  # the list is known: voices are checked
    body = {"text": "Hi.", "input": "Hi.", "voice": "Bobby"}
    status, _, raw = await post(server, path, body)
    error = orjson.loads(raw)
    message = error["message"] if path == "/tts" else error["error"]["message"]
    assert status == 400 and '"Bobby"' in message and "GET /v1/audio/voices" in message
    if path != "/tts":
        assert (error["error"]["code"], error["error"]["param"]) == ("invalid_voice", "voice")
    assert fake.records == []


@pytest.mark.parametrize("door", ["ws", "tts", "openai"])
async def test_null_is_a_field_left_out_on_every_door(
    server: Server, fake: FakeEdge, door: str
) -> None:
    """Every optional field sent as null is the field left out, on every door (defect 7:
    "speed": null was 400 while "response_format": null was the default)."""
    prosody: dict[str, Any] = {"voice": None, "rate": None, "volume": None, "pitch": None}
    if door == "ws":
        async with connected(server) as client:
            await client.speak(TEXT, words=None, format=None, stream=None, **prosody)
            final = (await client.until_final("u1")).final
        assert final["type"] == "end", final
    elif door == "tts":
        status, _, _ = await post(server, "/tts", {"text": TEXT, "format": None, **prosody})
        assert status == 200
    else:
        body = {
            "input": TEXT,
            "model": None,
            "voice": None,
            "speed": None,
            "instructions": None,
            "response_format": None,
            "stream_format": None,
            "timestamps": None,
        }
        status, headers, _ = await post(server, "/v1/audio/speech", body)
        assert (status, headers["Content-Type"]) == (200, "audio/mpeg")
    record = fake.records[0]
    assert record.voice.endswith("EmmaMultilingualNeural)")
    assert (record.rate, record.pitch) == ("+0%", "+0Hz")


@pytest.mark.parametrize("prefix", ["/v1", ""])
async def test_the_model_lists(server: Server, prefix: str) -> None:
    """/models in OpenAI's list shape, /models/{id} the model object (in any case; 404 in
    OpenAI's shape for a name not listed), /audio/models as Open WebUI reads it; with
    and without /v1."""
    async with aiohttp.ClientSession() as session:
        async with session.get(http_of(server) + prefix + "/models") as response:
            listed = orjson.loads(await response.read())
        async with session.get(http_of(server) + prefix + "/models/TTS-1") as response:
            assert response.status == 200
            one = orjson.loads(await response.read())
        async with session.get(http_of(server) + prefix + "/models/kokoro") as response:
            assert response.status == 404
            missing = orjson.loads(await response.read())
        async with session.get(http_of(server) + prefix + "/audio/models") as response:
            audio_models = orjson.loads(await response.read())
    assert [model["id"] for model in listed["data"]] == list(MODELS)
    assert one == {"id": "tts-1", "object": "model", "created": 0, "owned_by": "ttsstream"}
    assert missing["error"]["code"] == "not_found" and "kokoro" in missing["error"]["message"]
    assert audio_models == {"models": [{"id": model} for model in MODELS]}


async def test_openai_routes_without_v1(
    server: Server, fake: FakeEdge, openai_client: OpenAIClients
) -> None:
    """A client whose base URL has no /v1 speaks, lists voices and models, and gets
    OpenAI's error shape."""
    client = openai.AsyncOpenAI(base_url=http_of(server), api_key="unused", max_retries=0)
    try:
        speech = await client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
        models = await client.models.list()
        with pytest.raises(openai.BadRequestError) as raised:
            await client.audio.speech.create(model="tts-1", voice="alloy", input="  ")
    finally:
        await client.close()
    assert speech.content == bytes(fake.records[0].audio)
    assert [model.id for model in models.data] == list(MODELS)
    assert (raised.value.code, raised.value.param) == ("empty_text", "input")
    async with (
        aiohttp.ClientSession() as session,
        session.get(http_of(server) + "/audio/voices", params={"locale": "fr"}) as response,
    ):
        voices = orjson.loads(await response.read())["voices"]
    assert {voice["id"] for voice in voices} == {
        "fr-FR-DeniseNeural",
        "espeak:fr",
        "espeak:fr-be",
        "espeak:fr-ch",
    }


def _openai_error(raw: bytes) -> dict[str, Any]:
    """OpenAI's error object, checked to have its four fields."""
    error: dict[str, Any] = orjson.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


@pytest.mark.parametrize(
    ("method", "path", "options", "status", "code"),
    [
        ("GET", "/v1/nothing", {}, 404, "not_found"),
        ("GET", "/audio/nothing", {}, 404, "not_found"),
        ("GET", "/v1/models/nothing", {}, 404, "not_found"),
        ("GET", "/v1/audio/speech", {}, 405, "method_not_allowed"),
        ("DELETE", "/audio/voices", {}, 405, "method_not_allowed"),
        ("POST", "/v1/models", {}, 405, "method_not_allowed"),
        (
            "POST",
            "/v1/audio/speech",
            {
                "data": b"x" * (speech.MAX_BODY_BYTES + 1),
                "headers": {"Content-Type": "application/json"},
            },
            413,
            "body_too_large",
        ),
        (
            "POST",
            "/audio/speech",
            {"data": b"input=hi", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
    ],
)
async def test_every_error_of_openais_routes_has_openais_shape(
    server: Server, method: str, path: str, options: dict[str, Any], status: int, code: str
) -> None:
    """404, 405, 413 and 415 on OpenAI's routes, with and without /v1, come in OpenAI's
    error shape (defect 5: GET /v1/audio/speech's 405 did not)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, http_of(server) + path, **options) as response,
    ):
        assert response.status == status
        error = _openai_error(await response.read())
    assert error["code"] == code and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


async def test_a_later_heads_431_has_openais_shape_on_its_routes(server: Server) -> None:
    """A later request on a kept-alive connection with a head over its limit gets 431 in
    OpenAI's shape on OpenAI's routes; /tts keeps the protocol's."""
    for path, openai_shape in [("/v1/audio/voices", True), ("/tts?text=hi", False)]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, _, _ = await _answer_of(reader)
            assert status == 200
            fields = "".join(f"X-Filler-{n}: {'y' * 4000}\r\n" for n in range(5))
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{fields}\r\n".encode())
            status, _, body = await _answer_of(reader)
        finally:
            writer.close()
        assert status == 431
        if openai_shape:
            assert _openai_error(body)["code"] == "head_too_large"
        else:
            assert orjson.loads(body)["error"] == "head_too_large"


async def test_the_websocket_and_tts_keep_the_protocols_error_shape(
    start_server: ServerFactory,
) -> None:
    """/v1/stream (the WebSocket's path, read by the browser client) and /tts answer
    errors in the protocol's shape, though under /v1/ for the first."""
    server = await start_server(api_keys=(KEY,))
    async with aiohttp.ClientSession() as session:
        async with session.get(http_of(server) + "/v1/stream") as response:
            assert response.status == 401
            assert orjson.loads(await response.read())["error"] == "unauthorized"
        async with session.put(http_of(server) + "/tts") as response:
            assert response.status == 405
            assert orjson.loads(await response.read())["error"] == "method_not_allowed"


LIST_PATHS = [
    "/v1/models",
    "/v1/models/tts-1",
    "/v1/audio/models",
    "/v1/audio/voices",
    "/models",
    "/audio/models",
    "/audio/voices",
]


async def test_the_lists_are_public_and_speech_needs_the_key(
    start_server: ServerFactory,
) -> None:
    """With a key set and PUBLIC_LISTS (the default), every model and voice list answers
    without a key; speech still needs it."""
    server = await start_server(api_keys=(KEY,))
    assert server.config.public_lists
    async with aiohttp.ClientSession() as session:
        for path in LIST_PATHS:
            async with session.get(http_of(server) + path) as response:
                assert response.status == 200, path
    status, _, raw = await post(server, "/v1/audio/speech", {"input": "Hi."})
    assert (status, _openai_error(raw)["code"]) == (401, "unauthorized")
    assert server.stats.auth_failures == 1


async def test_public_lists_false_restores_the_key_on_lists(start_server: ServerFactory) -> None:
    """PUBLIC_LISTS=false: every list needs the key (401 in OpenAI's shape), and opens
    with it."""
    server = await start_server(api_keys=(KEY,), public_lists=False)
    async with aiohttp.ClientSession() as session:
        for path in LIST_PATHS:
            async with session.get(http_of(server) + path) as response:
                assert response.status == 401, path
                assert _openai_error(await response.read())["code"] == "unauthorized"
            async with session.get(
                http_of(server) + path, headers={"Authorization": f"Bearer {KEY}"}
            ) as response:
                assert response.status == 200, path


@pytest.mark.parametrize("locale", ["en", "en-US", "EN-gb", "fr", "de-DE", "xx"])
async def test_one_locale_rule_on_every_door(
    start_server: ServerFactory, tmp_path: Path, locale: str
) -> None:
    """HTTP's ?locale=, the WebSocket's voices message and say --list-voices --locale list
    the same voices; an alias by the voice it maps to (defect 6: ?locale=en listed no
    voice but 13 aliases, ?locale=en-US left out espeak:en-us-nyc)."""
    server = await start_server(**MANY_CLIENTS)
    async with (
        aiohttp.ClientSession() as session,
        session.get(http_of(server) + "/v1/audio/voices", params={"locale": locale}) as response,
    ):
        listing = orjson.loads(await response.read())
    over_http = {voice["id"] for voice in listing["voices"]} - set(DEFAULT_VOICES)
    async with connected(server) as client:
        await client.send({"type": "voices", "locale": locale})
        message = await client.next_loose()
    over_ws = {voice["name"] for voice in message["voices"]}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ttsstream",
        "say",
        "--list-voices",
        "--locale",
        locale,
        "--url",
        f"ws://127.0.0.1:{server.port}/v1/stream",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
    over_cli = {line.split("\t")[0] for line in stdout.decode().splitlines()}
    assert over_http == over_ws == over_cli
    aliases = {alias["id"] for alias in listing["aliases"]}
    if locale == "en":
        assert {"en-US-AriaNeural", "en-GB-RyanNeural", "espeak:en-us-nyc"} <= over_http
        assert aliases == set(DEFAULT_VOICES)
    if locale == "en-US":
        assert "espeak:en-us-nyc" in over_http and "en-GB-RyanNeural" not in over_http
        assert aliases == set(DEFAULT_VOICES) - {"ballad", "fable"}
    if locale == "xx":
        assert over_http == set() and aliases == set()
