"""Cartesia's doors on the main port (``WS /tts/websocket``, ``POST /tts/bytes``,
``POST /tts/sse``, ``GET /voices``), proven by Cartesia's real clients run against the
server: the ``cartesia`` SDK, Pipecat's ``CartesiaTTSService`` and
``CartesiaHttpTTSService``, and LiveKit's ``livekit.plugins.cartesia.TTS``.

Every test runs over the fake Edge through the real edge-tts. The fake's audio is
CBR MP3 (:data:`~tests.fake_edge.FRAME_BYTES` per :data:`~tests.fake_edge.FRAME_MS`),
so what the server decodes and sends must last as long as the MP3 the fake sent for
the text's segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import wave
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import av
import orjson
import pytest
from cartesia import AsyncCartesia, BadRequestError
from livekit.plugins import cartesia as livekit_cartesia
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.cartesia.tts import CartesiaHttpTTSService, CartesiaTTSService
from pipecat.workers.runner import WorkerRunner
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.conftest import TIMEOUT, ServerFactory
from tests.fake_edge import FRAME_BYTES, FRAME_MS, FakeEdge, spoken_words
from ttsstream.server import Server

VOICE = "en-US-AriaNeural"
#: A voice as Pipecat, LiveKit and the SDK's examples name one.
SDK_VOICE: Any = {"mode": "id", "id": VOICE}
KEY = "cartesia-client-key-0123456789"
#: An LLM's reply as it streams: pieces that cut words and sentences anywhere.
REPLY = [
    "Hello there, ",
    "this is a rep",
    "ly streamed in pie",
    "ces. And a second ",
    "sentence follows it.",
]
TEXT = "".join(REPLY)
#: How far the decoded audio may last from the fake's MP3 for the same text, ms.
DURATION_SLACK_MS = 30
RAW_16K: Any = {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000}
#: An output format Cartesia has and this server does not make.
NOT_MADE: Any = {"container": "raw", "encoding": "pcm_s8", "sample_rate": 8000}


def http_of(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


def ws_of(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}"


def fake_ms(fake: FakeEdge) -> float:
    """How long the MP3 the fake sent (every synthesis so far) plays, ms."""
    return sum(len(record.audio) for record in fake.records) / FRAME_BYTES * FRAME_MS


def decoded_ms(audio: bytes, encoding: str, rate: int) -> float:
    """How long raw audio of Cartesia's ``encoding`` at ``rate`` plays, once decoded, ms."""
    if encoding == "pcm_s16le":
        samples = len(audio) // 2
    elif encoding == "pcm_f32le":
        samples = len(audio) // 4
    else:
        decoder: Any = av.CodecContext.create(encoding, "r")
        decoder.sample_rate = rate
        decoder.layout = "mono"
        samples = sum(int(frame.samples) for frame in decoder.decode(av.Packet(audio)))
    return samples * 1000 / rate


def wav_ms(audio: bytes) -> float:
    """How long a streamed WAV plays: its sizes are unknown (all ones) as it begins, so
    its samples are what follows its ``data`` header."""
    with wave.open(io.BytesIO(audio)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth()) == (1, 2)
        rate: int = reader.getframerate()
    samples = len(audio[audio.index(b"data") + 8 :]) // 2
    return samples * 1000 / rate


def assert_timestamps(words: list[str], starts: list[float], ends: list[float], ms: float) -> None:
    """The words are the text's as sent (with their punctuation, as Cartesia echoes
    them), in order, on one timeline within the audio."""
    assert words == TEXT.split()
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(start < end for start, end in zip(starts, ends, strict=True))
    assert starts[0] >= 0 and ends[-1] * 1000 <= ms


# The SDK's WebSocket


@contextlib.asynccontextmanager
async def sdk(server: Server, **options: Any) -> AsyncIterator[AsyncCartesia]:
    client = AsyncCartesia(
        api_key=KEY,
        base_url=http_of(server),
        websocket_base_url=ws_of(server),
        max_retries=0,
        **options,
    )
    try:
        yield client
    finally:
        await client.close()


@pytest.mark.parametrize(("encoding", "rate"), [("pcm_s16le", 16000), ("pcm_mulaw", 8000)])
async def test_sdk_streams_a_reply_in_pieces(
    server: Server, fake: FakeEdge, encoding: str, rate: int
) -> None:
    """The SDK's context, fed an LLM's reply in pieces then no_more_inputs, receives audio
    as long as the fake's for that text, the text's words in seconds on one timeline,
    and done last."""
    output_format = {"container": "raw", "encoding": encoding, "sample_rate": rate}
    async with sdk(server) as client, client.tts.websocket_connect() as connection:
        context = connection.context(
            "reply-1",
            model_id="sonic-3",
            voice=SDK_VOICE,
            output_format=output_format,
            add_timestamps=True,
        )
        for piece in REPLY:
            await context.push(piece)
        await context.no_more_inputs()
        events: list[Any] = [event async for event in context.receive()]
    assert [event.type for event in events][-1] == "done"
    assert {event.type for event in events} == {"chunk", "timestamps", "done"}
    assert {event.context_id for event in events} == {"reply-1"}
    audio = b"".join(event.audio for event in events if event.type == "chunk")
    ms = decoded_ms(audio, encoding, rate)
    assert " ".join(record.text for record in fake.records) == TEXT
    assert len(fake.records) == 2  # one synthesis per sentence
    assert abs(ms - fake_ms(fake)) < DURATION_SLACK_MS, (ms, fake_ms(fake))
    stamps = [event.word_timestamps for event in events if event.type == "timestamps"]
    assert_timestamps(
        [word for stamp in stamps for word in stamp.words],
        [start for stamp in stamps for start in stamp.start],
        [end for stamp in stamps for end in stamp.end],
        ms,
    )


async def test_sdk_two_contexts_without_timestamps(server: Server, fake: FakeEdge) -> None:
    """Two contexts of one connection, one flushed, are both spoken whole, each in its
    own order; without add_timestamps no timestamps are sent; the flush is acknowledged."""
    async with sdk(server) as client, client.tts.websocket_connect() as connection:
        first = connection.context(
            "first", model_id="sonic-3", voice=SDK_VOICE, output_format=RAW_16K
        )
        second = connection.context(
            "second", model_id="sonic-3", voice=SDK_VOICE, output_format=RAW_16K
        )
        await first.push("The first context, ")
        await first.push("", flush=True)
        await second.push("The second context.")
        await first.push("said in two goes.")
        await first.no_more_inputs()
        await second.no_more_inputs()
        heard_first: list[Any] = [event async for event in first.receive()]
        heard_second: list[Any] = [event async for event in second.receive()]
    for events in (heard_first, heard_second):
        assert events[-1].type == "done"
        assert {event.type for event in events} <= {"chunk", "flush_done", "done"}
    assert [event.flush_id for event in heard_first if event.type == "flush_done"] == [1]
    texts = [record.text for record in fake.records]
    # Contexts speak at the same time: only each one's own order is given.
    assert [t for t in texts if t != "The second context."] == [
        "The first context,",
        "said in two goes.",
    ]
    assert sorted(texts) == sorted(
        ["The first context,", "said in two goes.", "The second context."]
    )
    audio = b"".join(e.audio for e in heard_first + heard_second if e.type == "chunk")
    assert abs(decoded_ms(audio, "pcm_s16le", 16000) - fake_ms(fake)) < DURATION_SLACK_MS


# The WebSocket as a client's own code sees it


class Socket:
    """Cartesia's WebSocket at the message level: every message read is kept, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []

    async def send(self, **fields: Any) -> None:
        await self.ws.send(orjson.dumps(fields).decode())

    async def speak(self, context_id: str, transcript: str, *, more: bool, **fields: Any) -> None:
        opening = {"model_id": "sonic-3", "voice": {"mode": "id", "id": VOICE}}
        opening["output_format"] = RAW_16K
        await self.send(
            context_id=context_id, transcript=transcript, **{**opening, "continue": more, **fields}
        )

    async def next(self) -> dict[str, Any]:
        message: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
        self.seen.append(message)
        return message

    async def until_end(self, context_id: str | None) -> list[dict[str, Any]]:
        """The context's messages up to its done or error (others' are kept in ``seen``)."""
        start = len(self.seen)
        while True:
            message = await self.next()
            if message["context_id"] == context_id and message["type"] in ("done", "error"):
                return [m for m in self.seen[start:] if m["context_id"] == context_id]

    async def speaks_fine(self, context_id: str = "check") -> None:
        """The connection still works: a new context is spoken to its done."""
        await self.speak(context_id, "Still here.", more=False)
        messages = await self.until_end(context_id)
        assert messages[-1]["type"] == "done", messages[-1]
        assert any(m["type"] == "chunk" and m["data"] for m in messages)


@contextlib.asynccontextmanager
async def socket(url: str, **options: Any) -> AsyncIterator[Socket]:
    async with connect(url, max_size=None, **options) as ws:
        yield Socket(ws)


async def test_contexts_speak_at_the_same_time(server: Server, fake: FakeEdge) -> None:
    """A short context opened while a long one speaks is spoken at once beside it (its
    done comes first), not behind it; both are whole (LiveKit gives up on a context
    that hears nothing for 10 s, and a barge-in's reply must not wait for the old one)."""
    fake.realtime_factor = 4  # the long context still speaks when the short one opens
    long = " ".join(
        f"This context goes on for a while, its sentence number {n}." for n in range(1, 5)
    )
    async with socket(ws_of(server) + "/tts/websocket") as client:
        await client.speak("long", long, more=True)
        await client.send(context_id="long", transcript="", flush=True)
        while (await client.next())["type"] != "chunk":
            pass
        await client.speak("short", "Meanwhile.", more=False)
        short = await client.until_end("short")
        assert short[-1]["type"] == "done"
        assert not any(m["context_id"] == "long" and m["type"] == "done" for m in client.seen)
        await client.send(context_id="long", transcript="", **{"continue": False})
        assert (await client.until_end("long"))[-1]["type"] == "done"
    spoken = [record.text for record in fake.records if record.completed]
    assert "Meanwhile." in spoken
    assert " ".join(text for text in spoken if text != "Meanwhile.") == long


async def test_cancel_stops_a_context_and_the_socket_goes_on(
    server: Server, fake: FakeEdge
) -> None:
    """A cancel stops its context's audio with nothing sent back (no done, no error), its
    upstream closes, and the next context on the socket is spoken."""
    fake.pause_after_chunks = 1
    async with socket(ws_of(server) + "/tts/websocket") as client:
        await client.speak("cut", "A long sentence that a cancel will cut short. ", more=True)
        while (await client.next())["type"] != "chunk":
            pass
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await client.send(context_id="cut", cancel=True)
        await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)
        assert not fake.records[0].completed
        assert server.services.stats.outcomes_by_interface["cartesia", "cancelled"] == 1
        fake.pause_after_chunks = None
        await client.send(context_id="cut", transcript="Dropped: it is cancelled.")
        await client.speaks_fine()
        cut = [m for m in client.seen if m["context_id"] == "cut"]
        assert {m["type"] for m in cut} == {"chunk"}
        # Nothing of the cancelled context comes after the next one's first message.
        first_check = next(i for i, m in enumerate(client.seen) if m["context_id"] == "check")
        assert all(m["context_id"] == "check" for m in client.seen[first_check:])
        # A cancel of a context that is over is answered with nothing either.
        await client.send(context_id="check", cancel=True)
        await client.speaks_fine("check-2")
        assert [m for m in client.seen if m["context_id"] == "check"][-1]["type"] == "done"
    assert not any("Dropped" in record.text for record in fake.records)


async def test_a_bad_message_gets_cartesias_error_and_the_socket_goes_on(server: Server) -> None:
    """Invalid JSON, a message without context_id and a context asking a format not made
    are each answered with Cartesia's error (status_code, error_code, title, message,
    done true, the context's id); the connection keeps working."""
    async with socket(ws_of(server) + "/tts/websocket") as client:
        await client.ws.send("{not json")
        error = await client.next()
        assert error["type"] == "error" and error["context_id"] is None
        assert (error["status_code"], error["error_code"], error["done"]) == (400, "bad_json", True)
        assert error["title"] and error["message"] and error["request_id"]
        await client.send(transcript="Hello.", model_id="sonic-3")
        error = await client.next()
        assert (error["context_id"], error["error_code"]) == (None, "bad_message")
        await client.speak(
            "ogg",
            "Hello.",
            more=False,
            output_format={"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 16000},
        )
        (error,) = await client.until_end("ogg")
        assert (error["type"], error["status_code"], error["error_code"]) == (
            "error",
            400,
            "unsupported_format",
        )
        assert "8000" in error["message"] and error["error"].endswith(error["message"])
        await client.speaks_fine()


async def test_a_refused_message_of_a_context_being_spoken_stops_it(
    server: Server, fake: FakeEdge
) -> None:
    """A refused message of a context whose audio is streaming is its error, which ends
    it for the client: nothing more of it is sent, its upstream closes, its later
    messages are dropped, and the socket goes on."""
    fake.pause_after_chunks = 1
    async with socket(ws_of(server) + "/tts/websocket") as client:
        await client.speak("ctx", "A sentence being spoken when its context fails. ", more=True)
        while (await client.next())["type"] != "chunk":
            pass
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await client.send(context_id="ctx", transcript=42, **{"continue": True})
        messages = await client.until_end("ctx")
        assert messages[-1]["type"] == "error" and messages[-1]["error_code"] == "bad_message"
        await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)
        assert server.services.stats.outcomes_by_interface["cartesia", "cancelled"] == 1
        fake.pause_after_chunks = None
        fake.resume.set()
        await client.send(context_id="ctx", transcript="More text.", **{"continue": False})
        await client.speaks_fine()
        after = client.seen[client.seen.index(messages[-1]) + 1 :]
        assert all(m["context_id"] == "check" for m in after)
    assert len(fake.records) == 2 and not fake.records[0].completed


async def test_a_key_is_required_when_the_server_has_one(start_server: ServerFactory) -> None:
    """With TTS_API_KEY set, the WebSocket and HTTP doors refuse a request without the key
    (401, Cartesia's shape on HTTP) and serve it given as X-API-Key (with any
    Cartesia-Version) or as ?api_key= (with ?cartesia_version=)."""
    server = await start_server(api_keys=(KEY,))
    url = ws_of(server) + "/tts/websocket"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url):
            pass
    assert refused.value.response.status_code == 401
    headers = {"X-API-Key": KEY, "Cartesia-Version": "2026-03-01"}
    async with socket(url, additional_headers=headers) as client:
        await client.speaks_fine()
    async with socket(f"{url}?api_key={KEY}&cartesia_version=2025-04-16") as client:
        await client.speaks_fine()
    body = {"model_id": "sonic-3", "transcript": "Hello.", "voice": {"mode": "id", "id": VOICE}}
    body["output_format"] = RAW_16K
    async with aiohttp.ClientSession() as session:
        async with session.post(http_of(server) + "/tts/bytes", json=body) as response:
            assert response.status == 401
            error = orjson.loads(await response.read())
            assert (error["error"], error["status_code"]) == ("unauthorized", 401)
        async with session.post(
            http_of(server) + "/tts/bytes", json=body, headers=headers
        ) as response:
            assert response.status == 200 and await response.read()


# The SDK's HTTP calls


async def test_sdk_bytes_as_wav(server: Server, fake: FakeEdge) -> None:
    """The SDK's tts.generate (POST /tts/bytes, Accept: audio/wav; ``tts.bytes`` is its
    deprecated alias) streams a WAV as long as the fake's MP3, at the rate asked, with
    its Content-Type; its speed reaches the voice."""
    seen: list[str] = []

    async def hook(response: Any) -> None:
        seen.append(response.headers["content-type"])

    async with sdk(server, http_client=_httpx_client(hook)) as client:
        response = await client.tts.generate(
            model_id="sonic-3",
            transcript=TEXT,
            voice=SDK_VOICE,
            output_format={"container": "wav", "encoding": "pcm_s16le", "sample_rate": 22050},
            speed="slow",
        )
        audio = b"".join([chunk async for chunk in response.iter_bytes()])
    assert seen == ["audio/wav"]
    assert fake.records[0].rate == "-25%"
    with wave.open(io.BytesIO(audio)) as reader:
        assert reader.getframerate() == 22050
    assert abs(wav_ms(audio) - fake_ms(fake)) < DURATION_SLACK_MS


def _httpx_client(hook: Any) -> Any:
    import httpx  # the SDK's own HTTP client

    return httpx.AsyncClient(event_hooks={"response": [hook]})


async def test_sdk_sse_streams_chunks_timestamps_and_done(server: Server, fake: FakeEdge) -> None:
    """The SDK's tts.sse reads our events: chunks as long as the fake's audio, the text's
    words in seconds, done last, each event with the request's context_id."""
    async with sdk(server) as client:
        stream = await client.tts.sse(
            model_id="sonic-3",
            transcript=TEXT,
            voice=SDK_VOICE,
            output_format=RAW_16K,
            add_timestamps=True,
            context_id="sse-1",
        )
        events: list[Any] = [event async for event in stream]
    assert events[-1].type == "done"
    assert {event.type for event in events} == {"chunk", "timestamps", "done"}
    assert {event.context_id for event in events} == {"sse-1"}
    ms = decoded_ms(b"".join(e.audio for e in events if e.type == "chunk"), "pcm_s16le", 16000)
    assert abs(ms - fake_ms(fake)) < DURATION_SLACK_MS
    stamps = [event.word_timestamps for event in events if event.type == "timestamps"]
    assert_timestamps(
        [word for stamp in stamps for word in stamp.words],
        [start for stamp in stamps for start in stamp.start],
        [end for stamp in stamps for end in stamp.end],
        ms,
    )


async def test_sdk_http_errors_and_voices(server: Server, fake: FakeEdge) -> None:
    """A body the server refuses is the SDK's BadRequestError with Cartesia's error shape;
    an unknown voice names where the list is; voices.list pages through every voice."""
    async with sdk(server) as client:
        with pytest.raises(BadRequestError) as refused:
            await client.tts.generate(
                model_id="sonic-3",
                transcript="Hello.",
                voice=SDK_VOICE,
                output_format=NOT_MADE,
            )
        assert refused.value.body == {
            "error": "unsupported_format",
            "message": refused.value.body["message"],  # type: ignore[index]
            "status_code": 400,
        }
        with pytest.raises(BadRequestError) as unknown:
            await client.tts.generate(
                model_id="sonic-3",
                transcript="Hello.",
                voice={"id": "xx-XX-NobodyNeural"},
                output_format=RAW_16K,
            )
        assert "GET /voices" in unknown.value.body["message"]  # type: ignore[index]
        ids = [voice.id async for voice in client.voices.list(limit=5)]
    listed = await server.services.speech.voices()
    assert ids == [voice.name for voice in listed]
    assert VOICE in ids and len(ids) > 5


async def test_cartesia_paths_answer_a_browsers_preflight(start_server: ServerFactory) -> None:
    """A preflight from an allowed origin is answered on each HTTP path (with the
    Cartesia-Version header allowed); another origin is refused."""
    server = await start_server(allowed_origins=("https://app.example",))
    async with aiohttp.ClientSession() as session:
        for path in ("/tts/bytes", "/tts/sse", "/voices"):
            async with session.options(
                http_of(server) + path,
                headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
            ) as response:
                assert response.status == 204, path
                assert "Cartesia-Version" in response.headers["Access-Control-Allow-Headers"]
            async with session.options(
                http_of(server) + path, headers={"Origin": "https://evil.example"}
            ) as response:
                assert response.status == 403, path


# Pipecat


class _Collector(FrameProcessor):
    """The end of a Pipecat pipeline: keeps the audio, the words and the errors."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = bytearray()
        self.sample_rates: set[int] = set()
        self.words: list[tuple[str, int | None]] = []
        self.errors: list[ErrorFrame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio += frame.audio
            self.sample_rates.add(frame.sample_rate)
        elif isinstance(frame, TTSTextFrame):
            self.words.append((frame.text, frame.pts))
        elif isinstance(frame, ErrorFrame):
            self.errors.append(frame)
        await self.push_frame(frame, direction)


async def run_pipecat(service: FrameProcessor, frames: list[Frame], rate: int) -> _Collector:
    collector = _Collector()
    worker = PipelineWorker(
        Pipeline([service, collector]), params=PipelineParams(audio_out_sample_rate=rate)
    )
    await worker.queue_frames([*frames, EndFrame()])
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(runner.run(), 4 * TIMEOUT)
    return collector


async def test_pipecat_websocket_speaks_an_llm_reply(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Pipecat's CartesiaTTSService (its headers, sentences sharing the turn's context,
    pcm_s16le at the pipeline's 16 kHz) speaks an LLM's streamed reply: audio as long
    as the fake's, the text's words from our timestamps, in order, no error."""
    server = await start_server(api_keys=(KEY,))
    service = CartesiaTTSService(
        api_key=KEY,
        url=ws_of(server) + "/tts/websocket",
        settings=CartesiaTTSService.Settings(voice=VOICE),
    )
    frames: list[Frame] = [
        LLMFullResponseStartFrame(),
        *(LLMTextFrame(piece) for piece in REPLY),
        LLMFullResponseEndFrame(),
    ]
    collector = await run_pipecat(service, frames, 16000)
    assert collector.errors == [] and collector.sample_rates == {16000}
    assert [record.voice.endswith("AriaNeural)") for record in fake.records] == [True, True]
    ms = decoded_ms(bytes(collector.audio), "pcm_s16le", 16000)
    assert abs(ms - fake_ms(fake)) < DURATION_SLACK_MS
    # The text's words as sent, in order (Pipecat may join two that share a frame).
    assert " ".join(word for word, _ in collector.words) == TEXT
    times = [pts for _, pts in collector.words if pts is not None]
    assert len(times) == len(collector.words) and times == sorted(times)


async def test_pipecat_http_speaks(start_server: ServerFactory, fake: FakeEdge) -> None:
    """Pipecat's CartesiaHttpTTSService posts to /tts/bytes with its key and version and
    plays the raw PCM: as long as the fake's audio."""
    server = await start_server(api_keys=(KEY,))
    async with aiohttp.ClientSession() as session:
        service = CartesiaHttpTTSService(
            api_key=KEY,
            base_url=http_of(server),
            aiohttp_session=session,
            settings=CartesiaHttpTTSService.Settings(voice=VOICE),
        )
        collector = await run_pipecat(service, [TTSSpeakFrame(TEXT)], 16000)
    assert collector.errors == [] and collector.sample_rates == {16000}
    ms = decoded_ms(bytes(collector.audio), "pcm_s16le", 16000)
    assert abs(ms - fake_ms(fake)) < DURATION_SLACK_MS


# LiveKit


async def test_livekit_streams_and_synthesizes(start_server: ServerFactory, fake: FakeEdge) -> None:
    """LiveKit's Cartesia TTS: a stream fed in pieces gives audio as long as the fake's
    with the text's words timed in order; an empty turn ends at once; synthesize()
    over /tts/bytes gives the audio of its text."""
    server = await start_server(api_keys=(KEY,))
    async with aiohttp.ClientSession() as session:
        tts = livekit_cartesia.TTS(
            api_key=KEY,
            base_url=http_of(server),
            voice=VOICE,
            sample_rate=16000,
            http_session=session,
        )
        try:
            samples = 0
            words: list[Any] = []
            async with tts.stream() as stream:
                for piece in REPLY:
                    stream.push_text(piece)
                stream.end_input()
                async for event in stream:
                    assert event.frame.sample_rate == 16000
                    samples += event.frame.samples_per_channel
                    words += event.frame.userdata.get("lk.timed_transcripts", [])
            ms = samples * 1000 / 16000
            assert abs(ms - fake_ms(fake)) < DURATION_SLACK_MS
            # LiveKit aligns our words with the text it sent (its own code): each timed
            # string holds one of the text's words, maybe with punctuation and spaces.
            spoken = [word for word in words if spoken_words(word)]
            assert [w for word in spoken for w in spoken_words(word)] == spoken_words(TEXT)
            starts = [word.start_time for word in spoken]
            assert starts == sorted(starts) and spoken[-1].end_time * 1000 <= ms

            async with tts.stream() as stream:  # a turn without text
                stream.end_input()
                assert [event async for event in stream] == []

            before = fake_ms(fake)
            samples = 0
            async with tts.synthesize("One more sentence.") as synthesis:
                async for event in synthesis:
                    samples += event.frame.samples_per_channel
            assert abs(samples * 1000 / 16000 - (fake_ms(fake) - before)) < DURATION_SLACK_MS
        finally:
            await tts.aclose()
