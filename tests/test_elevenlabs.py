"""ElevenLabs' API (WebSocket stream-input and the HTTP routes) as its real clients use it.

The ``elevenlabs`` SDK, Pipecat's ``ElevenLabsTTSService`` (multi-stream-input) and
``ElevenLabsHttpTTSService``, and LiveKit's ``livekit.plugins.elevenlabs.TTS`` run for
real against the in-process server, which reaches the fake Edge through edge-tts.
Where a client's flow needs what a test cannot give it (the SDK's realtime helper
forces ``wss://``; Pipecat's barge-in needs a live transport), the test says how it
gets round that or replays that client's exact messages.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import miniaudio
import orjson
import pytest
from elevenlabs.client import AsyncElevenLabs, ElevenLabs
from elevenlabs.core.api_error import ApiError
from livekit.plugins import elevenlabs as livekit_elevenlabs
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.elevenlabs.tts import ElevenLabsHttpTTSService, ElevenLabsTTSService
from pipecat.services.elevenlabs.tts_base import calculate_word_times
from pipecat.workers.runner import WorkerRunner
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import TIMEOUT, ServerFactory, eventually
from tests.fake_edge import FakeEdge, SynthesisRecord
from ttsstream.audio.formats import format_named
from ttsstream.server import Server
from ttsstream.ws import connection

VOICE = "en-US-AriaNeural"
KEY = "elevenlabs-client-key-0123456789"
#: One sentence, as a client sends it whole.
TEXT = "Hello there, friend. How are you doing on this fine day?"
#: An LLM's reply: several sentences, sent as the tokens come.
REPLY = (
    "Sure! The museum opens at nine in the morning, and tickets cost twelve dollars. "
    "You can buy them online or at the door."
)
#: Seconds between two tokens of a reply (about 30 tokens per second, as an LLM writes).
TOKEN_INTERVAL = 1 / 30
#: LAME's priming in the MP3 LiveKit asks by default (its decoder plays it).
LIVEKIT_PRIMING_MS = format_named("mp3_22050_32").priming_ms  # type: ignore[union-attr]
#: How far a decoded duration may be from the upstream audio's, ms (the encoders' and
#: resampler's padding).
DURATION_TOLERANCE_MS = 30


def tokens(text: str) -> list[str]:
    """``text`` as an LLM streams it: words with their leading space, punctuation apart."""
    pieces: list[str] = []
    for number, word in enumerate(text.split(" ")):
        lead = " " if number else ""
        core = word.rstrip(",.!?")
        pieces.append(lead + core)
        if word[len(core) :]:
            pieces.append(word[len(core) :])
    assert "".join(pieces) == text
    return pieces


def http_base(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


def ws_base(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}"


def stream_url(server: Server, path: str = "multi-stream-input", voice: str = VOICE) -> str:
    return f"{ws_base(server)}/v1/text-to-speech/{voice}/{path}"


# What the audio is: its duration, decoded


def mp3_ms(data: bytes) -> float:
    """How long an MP3 plays, decoded (at its own rate), ms."""
    decoded = miniaudio.mp3_read_s16(data)
    rate: int = decoded.sample_rate
    return 1000 * len(array.array("h", decoded.samples)) / rate


def decoded_ms(data: bytes, output_format: str | None) -> float:
    """How long audio in an ElevenLabs format plays, decoded, less the encoder's priming
    (which no decoder can drop from a stream: LAME's, in MP3 made here), ms."""
    if output_format is None:
        return mp3_ms(data)
    named = format_named(output_format)
    assert named is not None
    if output_format.startswith("mp3"):
        return mp3_ms(data) - named.priming_ms
    if output_format.startswith("ulaw_"):
        return len(data) / 8  # a byte per sample, 8 kHz
    assert output_format.startswith("pcm_")
    return 1000 * (len(data) // 2) / named.sample_rate


def upstream_ms(records: list[SynthesisRecord]) -> float:
    """How long the fake's audio for these syntheses plays, ms."""
    return sum(mp3_ms(bytes(record.audio)) for record in records)


def assert_times_in_order(starts: list[float], ends: list[float], total_ms: float) -> None:
    """Start times never go back, each character ends after it starts, and the last ends
    within the audio."""
    assert starts == sorted(starts)
    assert all(start <= end for start, end in zip(starts, ends, strict=True))
    assert starts[0] >= 0 and ends[-1] <= total_ms + DURATION_TOLERANCE_MS


# A raw stream-input client, for the replays


class StreamInput:
    """A stream-input WebSocket as a client reads it: every message, by context."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []

    async def send(self, **message: Any) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def recv(self) -> dict[str, Any]:
        message: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
        self.messages.append(message)
        return message

    async def until_final(self, context_id: str | None = None) -> list[dict[str, Any]]:
        """The messages of ``context_id`` (of the socket when ``None``) up to ``isFinal``."""
        mine: list[dict[str, Any]] = []
        while True:
            message = await self.recv()
            if context_id is None or message.get("contextId") == context_id:
                mine.append(message)
                if message.get("isFinal") is True:
                    return mine

    async def until_error(self) -> dict[str, Any]:
        while "message" not in (message := await self.recv()):
            pass
        return message


@contextlib.asynccontextmanager
async def stream_input(url: str, **headers: str) -> AsyncIterator[StreamInput]:
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        yield StreamInput(ws)


def audio_of(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(m["audio"]) for m in messages if m.get("audio"))


def alignments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m["alignment"] for m in messages if m.get("alignment")]


# The SDK over HTTP


@contextlib.asynccontextmanager
async def sdk_for(server: Server, key: str | None = KEY) -> AsyncIterator[AsyncElevenLabs]:
    """The SDK's async client, pointed at the server by ``base_url`` (closed at the end)."""
    async with httpx.AsyncClient() as http:
        yield AsyncElevenLabs(base_url=http_base(server), api_key=key, httpx_client=http)


@pytest.mark.parametrize(
    ("method", "output_format"),
    [
        ("stream", None),
        ("stream", "mp3_22050_32"),
        ("convert", "mp3_44100_128"),
        ("convert", "pcm_16000"),
        ("stream", "ulaw_8000"),
    ],
)
async def test_sdk_speaks_in_elevenlabs_formats(
    start_server: ServerFactory, fake: FakeEdge, method: str, output_format: str | None
) -> None:
    """The SDK's ``stream`` and ``convert`` with ``base_url`` and ``xi-api-key``: the audio
    decodes to the fake's duration for the text, in the format named."""
    server = await start_server(api_keys=(KEY,))
    async with sdk_for(server) as sdk:
        call = getattr(sdk.text_to_speech, method)
        options = {"output_format": output_format} if output_format else {}
        audio = b"".join([chunk async for chunk in call(VOICE, text=TEXT, **options)])
    record = fake.records[0]
    assert record.voice.endswith("AriaNeural)") and record.text == TEXT
    assert decoded_ms(audio, output_format) == pytest.approx(
        upstream_ms([record]), abs=DURATION_TOLERANCE_MS
    )


@pytest.mark.parametrize("streamed", [False, True])
async def test_sdk_with_timestamps_aligns_every_character(
    server: Server, fake: FakeEdge, streamed: bool
) -> None:
    """``convert_with_timestamps`` and ``stream_with_timestamps``: the characters, joined,
    are the text, their times in order and within the audio, which decodes to the fake's
    duration."""
    async with sdk_for(server, key=None) as sdk:
        if streamed:
            parts = [
                part
                async for part in sdk.text_to_speech.stream_with_timestamps(
                    VOICE, text=TEXT, output_format="pcm_16000"
                )
            ]
        else:
            parts = [
                await sdk.text_to_speech.convert_with_timestamps(
                    VOICE, text=TEXT, output_format="pcm_16000"
                )
            ]
    audio = b"".join(base64.b64decode(part.audio_base_64) for part in parts)
    total_ms = upstream_ms(fake.records)
    assert decoded_ms(audio, "pcm_16000") == pytest.approx(total_ms, abs=DURATION_TOLERANCE_MS)
    chars: list[str] = []
    starts: list[float] = []
    ends: list[float] = []
    for part in parts:
        if part.alignment is not None:
            chars += part.alignment.characters
            starts += [1000 * t for t in part.alignment.character_start_times_seconds]
            ends += [1000 * t for t in part.alignment.character_end_times_seconds]
    assert "".join(chars) == TEXT
    assert_times_in_order(starts, ends, total_ms)
    assert starts[0] == fake.records[0].words[0][1]  # the first word, where Edge put it


async def test_sdk_lists_voices_by_v1_and_v2(server: Server) -> None:
    """``voices.get_all()`` (``/v1/voices``) and ``voices.search()`` (``/v2/voices``) list
    the server's voices, each ``voice_id`` a name the text-to-speech path takes;
    ``search`` filters."""
    async with sdk_for(server, key=None) as sdk:
        listed = await sdk.voices.get_all()
        found = await sdk.voices.search()
        aria = await sdk.voices.search(search="aria")
    assert VOICE in [voice.voice_id for voice in listed.voices]
    assert [voice.voice_id for voice in found.voices] == [v.voice_id for v in listed.voices]
    assert (found.has_more, found.total_count) == (False, len(listed.voices))
    assert [voice.voice_id for voice in aria.voices] == [VOICE]


async def test_sdk_http_errors_in_elevenlabs_shape(start_server: ServerFactory) -> None:
    """Without a key: 401; an unknown ``output_format``: 400; an unknown voice: 400; each
    body ``{"detail": {"status", "message"}}`` as the SDK's ApiError carries it."""
    server = await start_server(api_keys=(KEY,))
    answers: list[tuple[int | None, Any]] = []
    async with sdk_for(server, key=None) as anonymous, sdk_for(server) as sdk:
        for client, voice, options in [
            (anonymous, VOICE, {}),
            (sdk, VOICE, {"output_format": "mp3_12345_6"}),
            (sdk, "en-US-NobodyNeural", {}),
        ]:
            with pytest.raises(ApiError) as raised:
                async for _ in client.text_to_speech.stream(voice, text=TEXT, **options):
                    pass
            answers.append((raised.value.status_code, raised.value.body))
    assert [status for status, _ in answers] == [401, 400, 400]
    for _, body in answers:
        assert set(body) == {"detail"} and set(body["detail"]) == {"status", "message"}
    assert answers[1][1]["detail"]["message"] == "Invalid output format: mp3_12345_6"


# The SDK's realtime WebSocket helper


def realtime_audio(server: Server, text: Iterator[str], output_format: str) -> bytes:
    """The SDK's ``convert_realtime`` (synchronous): its audio, all of it."""
    with httpx.Client() as http:
        sdk = ElevenLabs(base_url=http_base(server), api_key=KEY, httpx_client=http)
        # The helper makes its URL from base_url with the scheme forced to wss (no
        # setting changes that): behind TLS, base_url="https://host" is all it needs;
        # this test server speaks plain ws.
        sdk.text_to_speech._ws_base_url = ws_base(server)
        return b"".join(
            sdk.text_to_speech.convert_realtime(VOICE, text=text, output_format=output_format)
        )


async def test_sdk_realtime_speaks_a_reply_given_in_pieces(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """``convert_realtime`` with the text as an iterator of LLM tokens (stream-input, the
    key in ``xi-api-key``): every word is spoken, and the 16 kHz PCM has as many samples
    as the fake's audio for the reply lasts."""
    server = await start_server(api_keys=(KEY,))
    audio = await asyncio.to_thread(realtime_audio, server, iter(tokens(REPLY)), "pcm_16000")
    spoken = " ".join(record.text for record in fake.records)
    assert spoken.split() == REPLY.split()
    assert len(audio) // 2 == pytest.approx(
        upstream_ms(fake.records) * 16, abs=DURATION_TOLERANCE_MS * 16
    )


# Pipecat


class _Collector(FrameProcessor):
    """The end of a Pipecat pipeline: keeps the audio and the errors."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = bytearray()
        self.errors: list[ErrorFrame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio += frame.audio
        elif isinstance(frame, ErrorFrame):
            self.errors.append(frame)
        await self.push_frame(frame, direction)


class _Recorder:
    """What a Pipecat service received on its WebSocket (a stand-in for the socket that
    passes everything through and keeps each message)."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self.messages: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def send(self, message: str) -> None:
        self.sent.append(orjson.loads(message))
        await self._ws.send(message)

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        async for message in self._ws:
            self.messages.append(orjson.loads(message))
            yield message


async def run_pipeline(service: FrameProcessor, frames: list[Frame], rate: int) -> _Collector:
    """Run ``service`` in a pipeline on ``frames`` (then an EndFrame); what came out."""
    collector = _Collector()
    worker = PipelineWorker(
        Pipeline([service, collector]), params=PipelineParams(audio_out_sample_rate=rate)
    )
    await worker.queue_frames([*frames, EndFrame()])
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    return collector


def spoken_by(words: list[tuple[str, float]], at_ms: float) -> int:
    """How many words have started by ``at_ms`` (Pipecat's reading of an interruption)."""
    return sum(1 for _, start in words if start * 1000 <= at_ms)


async def test_pipecat_websocket_speaks_an_llm_reply_with_alignment(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Pipecat's ElevenLabsTTSService (multi-stream-input, ``url`` set, its key in
    ``xi-api-key``) fed an LLM reply token by token: 16 kHz PCM as long as the fake's
    audio, ``isFinal`` last, the alignment's characters are the reply, in order within the
    audio, and an interruption placed by Pipecat's word times is within a word of the
    truth."""
    server = await start_server(api_keys=(KEY,))
    service = ElevenLabsTTSService(
        api_key=KEY,
        url=ws_base(server),
        settings=ElevenLabsTTSService.Settings(voice=VOICE, speed=1.0),
    )
    recorders: list[_Recorder] = []
    connect_websocket = service._websocket_connect

    async def recorded(uri: str, **kwargs: Any) -> Any:
        recorders.append(_Recorder(await connect_websocket(uri, **kwargs)))
        return recorders[-1]

    service._websocket_connect = recorded  # type: ignore[method-assign]
    frames: list[Frame] = [
        LLMFullResponseStartFrame(),
        *(LLMTextFrame(piece) for piece in tokens(REPLY)),
        LLMFullResponseEndFrame(),
    ]
    collector = await run_pipeline(service, frames, 16_000)
    assert collector.errors == []
    total_ms = upstream_ms(fake.records)
    assert len(collector.audio) // 2 == pytest.approx(total_ms * 16, abs=DURATION_TOLERANCE_MS * 16)

    (recorder,) = recorders
    # Pipecat sends whole sentences without the space between them (auto_mode=true):
    # they are spoken and aligned apart, as ElevenLabs does.
    assert [m["text"] for m in recorder.sent if m.get("text", " ").strip()] == [
        "Sure!",
        "The museum opens at nine in the morning, and tickets cost twelve dollars.",
        "You can buy them online or at the door.",
    ]
    messages = [m for m in recorder.messages if "contextId" in m]
    assert messages[-1].get("isFinal") is True
    assert all(m.get("isFinal") is not True for m in messages[:-1])
    # Pipecat's own reading: times restart in every message, its clock moving by each
    # message's last character's end.
    clock, chars, starts, ends = 0.0, [], [], []
    words: list[tuple[str, float]] = []
    partial, partial_start = "", 0.0
    for alignment in alignments(messages):
        found, partial, partial_start = calculate_word_times(
            alignment, clock, partial, partial_start
        )
        words += found
        chars += alignment["chars"]
        starts += [clock * 1000 + t for t in alignment["charStartTimesMs"]]
        ends += [
            clock * 1000 + t + d
            for t, d in zip(
                alignment["charStartTimesMs"], alignment["charDurationsMs"], strict=True
            )
        ]
        clock += (alignment["charStartTimesMs"][-1] + alignment["charDurationsMs"][-1]) / 1000
    assert "".join(chars) == REPLY
    assert_times_in_order(starts, ends, total_ms)
    # The truth: where the fake put each word, on the reply's timeline.
    truth: list[tuple[str, float]] = []
    shift = 0.0
    for record in fake.records:
        truth += [(word, (shift + offset) / 1000) for word, offset, _ in record.words]
        shift += mp3_ms(bytes(record.audio))
    assert len(words) + bool(partial) == len(truth)
    for at in range(0, int(total_ms), 50):
        assert abs(spoken_by(words, at) - spoken_by(truth, at)) <= 1, at


async def test_pipecat_http_speaks_with_word_times(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Pipecat's ElevenLabsHttpTTSService (``base_url``, an aiohttp session,
    ``/stream/with-timestamps``): 24 kHz PCM as long as the fake's audio, and a word time
    for every word, each where the fake put it."""
    server = await start_server(api_keys=(KEY,))
    async with aiohttp.ClientSession() as session:
        service = ElevenLabsHttpTTSService(
            api_key=KEY,
            base_url=http_base(server),
            aiohttp_session=session,
            settings=ElevenLabsHttpTTSService.Settings(voice=VOICE),
        )
        words: list[tuple[str, float]] = []
        add_word_timestamps = service.add_word_timestamps

        async def recorded(word_times: list[tuple[str, float]], *args: Any, **kw: Any) -> None:
            words.extend(word_times)
            await add_word_timestamps(word_times, *args, **kw)

        service.add_word_timestamps = recorded  # type: ignore[method-assign]
        collector = await run_pipeline(
            service,
            [LLMFullResponseStartFrame(), LLMTextFrame(TEXT), LLMFullResponseEndFrame()],
            24_000,
        )
    assert collector.errors == []
    assert len(collector.audio) // 2 == pytest.approx(
        upstream_ms(fake.records) * 24, abs=DURATION_TOLERANCE_MS * 24
    )
    # One request per sentence; Pipecat moves its clock on by each one's audio.
    expected: list[tuple[str, float]] = []
    shift = 0.0
    for record in fake.records:
        expected += [(word, (shift + offset) / 1000) for word, offset, _ in record.words]
        shift += mp3_ms(bytes(record.audio))
    assert [word.strip(",.?") for word, _ in words] == [word for word, _ in expected]
    assert [start for _, start in words] == pytest.approx([t for _, t in expected], abs=0.002)


# LiveKit


@contextlib.asynccontextmanager
async def livekit_tts(server: Server, **options: Any) -> AsyncIterator[livekit_elevenlabs.TTS]:
    """LiveKit's ElevenLabs TTS at the server (``base_url`` with ``/v1``), closed at the end."""
    async with aiohttp.ClientSession() as session:
        tts = livekit_elevenlabs.TTS(
            voice_id=VOICE,
            api_key=KEY,
            base_url=http_base(server) + "/v1",
            http_session=session,
            **options,
        )
        try:
            yield tts
        finally:
            await tts.aclose()


async def test_livekit_streams_pushed_text_with_aligned_transcript(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """LiveKit's ``stream()`` (its defaults: mp3_22050_32, sync_alignment, auto_mode,
    inactivity_timeout=180) with an LLM reply pushed token by token: 22.05 kHz frames as
    long as the fake's audio, and timed transcripts whose text is the reply, in order
    within the audio."""
    server = await start_server(api_keys=(KEY,))
    samples = 0
    rates: set[int] = set()
    timed: list[Any] = []
    async with livekit_tts(server) as tts:
        stream = tts.stream()
        try:
            for piece in tokens(REPLY):
                stream.push_text(piece)
                await asyncio.sleep(TOKEN_INTERVAL)  # pacing, as an LLM writes
            stream.end_input()
            async for event in stream:
                samples += event.frame.samples_per_channel
                rates.add(event.frame.sample_rate)
                timed += getattr(event.frame, "userdata", {}).get("lk.timed_transcripts", [])
        finally:
            await stream.aclose()
    assert rates == {22_050}
    total_ms = upstream_ms(fake.records)
    assert samples / 22.05 - LIVEKIT_PRIMING_MS == pytest.approx(
        total_ms, abs=DURATION_TOLERANCE_MS
    )
    assert "".join(str(part) for part in timed).split() == REPLY.split()
    starts = [1000 * part.start_time for part in timed]
    ends = [1000 * part.end_time for part in timed]
    assert_times_in_order(starts, ends, total_ms)


async def test_livekit_synthesize(start_server: ServerFactory, fake: FakeEdge) -> None:
    """LiveKit's ``synthesize()`` (``/stream`` over HTTP, mp3_22050_32): 22.05 kHz frames
    as long as the fake's audio for the text."""
    server = await start_server(api_keys=(KEY,))
    samples = 0
    async with livekit_tts(server) as tts, tts.synthesize(TEXT) as stream:
        async for event in stream:
            assert event.frame.sample_rate == 22_050
            samples += event.frame.samples_per_channel
    (record,) = fake.records
    assert record.text == TEXT
    assert samples / 22.05 - LIVEKIT_PRIMING_MS == pytest.approx(
        upstream_ms([record]), abs=DURATION_TOLERANCE_MS
    )


async def test_livekit_two_streams_share_one_socket(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Two LiveKit streams at once on its one multi-stream socket (two contexts): both
    speak their text in full."""
    server = await start_server(api_keys=(KEY,))
    texts = ["The first context speaks this.", "And the second one says that."]

    async def speak(tts: livekit_elevenlabs.TTS, text: str) -> int:
        stream = tts.stream()
        try:
            stream.push_text(text)
            stream.end_input()
            return sum([event.frame.samples_per_channel async for event in stream])
        finally:
            await stream.aclose()

    async with livekit_tts(server) as tts:
        samples = await asyncio.gather(*(speak(tts, text) for text in texts))
    assert sorted(record.text for record in fake.records) == sorted(texts)
    for text, count in zip(texts, samples, strict=True):
        (record,) = [r for r in fake.records if r.text == text]
        assert count / 22.05 - LIVEKIT_PRIMING_MS == pytest.approx(
            upstream_ms([record]), abs=DURATION_TOLERANCE_MS
        )


# The WebSocket's rules, as the clients' messages meet them


async def test_a_barge_in_speaks_at_once_beside_the_closed_context(
    server: Server, fake: FakeEdge
) -> None:
    """A barge-in, in Pipecat's exact messages (its interruption closes the context, the
    next reply opens another): the new context's audio starts while the closed one still
    speaks (contexts speak at the same time), and the closed one is not cut (Pipecat
    closes every context so at the end of a reply too, and drops what it interrupted)."""
    fake.realtime_factor = 4  # the first reply is still speaking when the user cuts in
    long = " ".join(["This reply goes on and on, long enough to be cut short."] * 4)
    async with stream_input(stream_url(server) + "?output_format=pcm_16000") as ws:
        await ws.send(text=" ", context_id="a", voice_settings={"speed": 1.0})
        await ws.send(text=long, context_id="a")
        await ws.send(context_id="a", flush=True)
        while not (await ws.recv()).get("audio"):
            pass
        await ws.send(context_id="a", close_context=True)
        await ws.send(text=" ", context_id="b", voice_settings={"speed": 1.0})
        await ws.send(text="Sorry, go ahead.", context_id="b")
        await ws.send(context_id="b", flush=True)
        await ws.send(context_id="b", close_context=True)
        finals: list[str] = []
        while len(finals) < 2:
            message = await ws.recv()
            if message.get("isFinal") is True:
                finals.append(message["contextId"])
        await ws.send(close_socket=True)
        await ws.ws.wait_closed()
    by_context = {
        context: [m for m in ws.messages if m.get("contextId") == context] for context in "ab"
    }
    first_b = next(i for i, m in enumerate(ws.messages) if m.get("contextId") == "b")
    final_a = next(
        i for i, m in enumerate(ws.messages) if m.get("contextId") == "a" and m.get("isFinal")
    )
    assert first_b < final_a and finals == ["b", "a"]
    assert "".join(c for a in alignments(by_context["a"]) for c in a["chars"]) == long
    assert "".join(c for a in alignments(by_context["b"]) for c in a["chars"]) == (
        "Sorry, go ahead."
    )
    (record,) = [r for r in fake.records if r.text == "Sorry, go ahead."]
    assert len(audio_of(by_context["b"])) // 2 == pytest.approx(
        upstream_ms([record]) * 16, abs=DURATION_TOLERANCE_MS * 16
    )


async def test_a_context_whose_opening_is_refused_is_not_left_open(
    start_server: ServerFactory,
) -> None:
    """A context refused when it opens (over the rate limit) is not counted as open: once
    the window has room, as many contexts open as ElevenLabs allows, and the refused
    ids open again (before, five refused openings blocked the socket for good)."""
    server = await start_server(rate_limit_requests=2)
    async with stream_input(stream_url(server)) as ws:  # the handshake is one request
        await ws.send(text=" ", context_id="ok")  # the second
        for context in "vwxyz":
            await ws.send(text=" ", context_id=context)
            refused = await ws.until_error()
            assert (refused["error"], refused["contextId"]) == ("rate_limited", context)
        server.services.admission.limiter.limit = 100  # the window has room again
        await ws.send(text="Open again. ", context_id="v")
        await ws.send(context_id="v", close_context=True)
        spoken = await ws.until_final("v")
        assert audio_of(spoken)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("not json", "bad_json"),
        ('{"text": 5, "context_id": "a"}', "bad_message"),
        ('{"context_id": "nobody", "close_context": true}', "not_found"),
    ],
)
async def test_a_bad_message_is_answered_and_the_socket_goes_on(
    server: Server, bad: str, error: str
) -> None:
    """A bad message gets ElevenLabs' error (``message`` for the SDK, ``error`` for
    LiveKit, ``contextId`` when it names one); a context opened next speaks."""
    async with stream_input(stream_url(server)) as ws:
        await ws.ws.send(bad)
        refused = await ws.until_error()
        assert refused["error"] == error and refused["message"]
        if '"context_id"' in bad:
            assert refused["contextId"] in ("a", "nobody")
        await ws.send(text="Still here. ", context_id="c")
        await ws.send(context_id="c", close_context=True)
        spoken = await ws.until_final("c")
    assert audio_of(spoken)
    assert "".join(c for a in alignments(spoken) for c in a["chars"]) == "Still here. "


async def test_the_key_in_the_first_message(start_server: ServerFactory, fake: FakeEdge) -> None:
    """ElevenLabs' documented first message carries the key (``xi_api_key``) when the
    handshake has none: with TTS_API_KEY set, stream-input speaks then closes (1000)."""
    server = await start_server(api_keys=(KEY,))
    async with stream_input(stream_url(server, "stream-input")) as ws:
        await ws.send(text=" ", xi_api_key=KEY, generation_config={"chunk_length_schedule": [50]})
        await ws.send(text=TEXT + " ")
        await ws.send(text="")
        spoken = await ws.until_final()
        await ws.ws.wait_closed()
    assert ws.ws.close_code == 1000
    assert "".join(c for a in alignments(spoken) for c in a["chars"]) == TEXT + " "
    assert mp3_ms(audio_of(spoken)) == pytest.approx(
        upstream_ms(fake.records), abs=DURATION_TOLERANCE_MS
    )


async def test_a_wrong_key_is_refused(start_server: ServerFactory, fake: FakeEdge) -> None:
    """A wrong key in the first message: an error message, then close 1008; in the
    ``xi-api-key`` header: the handshake is refused with 401 (Pipecat and LiveKit report
    the connection error); nothing reaches Edge."""
    server = await start_server(api_keys=(KEY,))
    async with stream_input(stream_url(server)) as ws:
        with contextlib.suppress(ConnectionClosed):  # closed once it has read the key
            await ws.send(text=" ", context_id="a", xi_api_key="wrong-key-0123456789")
            await ws.send(text=TEXT, context_id="a")
        refused = await ws.until_error()
        await ws.ws.wait_closed()
    assert refused["error"] == "unauthorized" and refused["message"]
    assert ws.ws.close_code == 1008
    with pytest.raises(InvalidStatus) as raised:
        async with stream_input(stream_url(server), **{"xi-api-key": "wrong-key-0123456789"}):
            pass
    assert raised.value.response.status_code == 401
    assert fake.records == []


async def test_an_unknown_output_format_is_refused_on_the_websocket(server: Server) -> None:
    """The SDK's realtime helper asked an ``output_format`` no one makes: the server says
    so and closes 1008, and the SDK raises ApiError with that message."""

    def run() -> None:
        with httpx.Client() as http:
            sdk = ElevenLabs(base_url=http_base(server), api_key=KEY, httpx_client=http)
            sdk.text_to_speech._ws_base_url = ws_base(server)
            for _ in sdk.text_to_speech.convert_realtime(
                VOICE, text=iter(["Hello ", "there."]), output_format="mp3_12345_6"
            ):
                pass

    with pytest.raises(ApiError) as raised:
        await asyncio.to_thread(run)
    assert raised.value.status_code == 1008
    body = raised.value.body  # the error message, or the close's reason: it came first
    message = body["message"] if isinstance(body, dict) else body
    assert message == "Invalid output format: mp3_12345_6"


async def test_voice_map_gives_a_hard_coded_id_an_edge_voice(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """LiveKit's default voice id (an ElevenLabs id, kept when no voice is set) mapped by
    VOICE_MAP speaks with the Edge voice it names, over the WebSocket and over HTTP."""
    default_id = livekit_elevenlabs.tts.DEFAULT_VOICE_ID
    # As VOICE_MAP="hpp4J3VqNfWAUOO0d1Us=en-US-GuyNeural" is read: names in lower case.
    server = await start_server(
        api_keys=(KEY,), voice_map=((default_id.lower(), "en-US-GuyNeural"),)
    )
    async with aiohttp.ClientSession() as session:
        tts = livekit_elevenlabs.TTS(
            api_key=KEY, base_url=http_base(server) + "/v1", http_session=session
        )
        try:
            async with tts.synthesize(TEXT) as chunked:
                assert [event async for event in chunked]
            stream = tts.stream()
            try:
                stream.push_text(TEXT)
                stream.end_input()
                assert [event async for event in stream]
            finally:
                await stream.aclose()
        finally:
            await tts.aclose()
    assert len(fake.records) >= 2
    assert all(record.voice.endswith("GuyNeural)") for record in fake.records)


async def _pipecat_clock(server: Server, output_format: str, text: str) -> float:
    """Where Pipecat's clock ends for one stream-input context: it adds each alignment
    message's last character end to a running sum (per-message times)."""
    url = (
        f"ws://127.0.0.1:{server.port}/v1/text-to-speech/en-US-AriaNeural/stream-input"
        f"?output_format={output_format}"
    )
    clock = 0.0
    async with connect(url, max_size=None) as ws:
        for message in ({"text": " "}, {"text": text + " ", "flush": True}, {"text": ""}):
            await ws.send(orjson.dumps(message).decode())
        while not (message := orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))).get(
            "isFinal"
        ):
            alignment = message.get("alignment")
            if alignment:
                clock += alignment["charStartTimesMs"][-1] + alignment["charDurationsMs"][-1]
    return clock


async def test_the_alignment_clock_is_the_same_in_every_format(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Character times follow the audio's own playing time (as the encoder counts it), so
    Pipecat's clock ends at the same point for variable-rate Opus as for PCM (timed from
    Opus' nominal bit rate, it ended seconds apart), and near the audio's end."""
    fake.voiced = True
    server = await start_server(cache_enabled=False)  # each format live, chunked alike
    text = "Hello there, friend. How are you doing on this fine day? I hope it is kind to you."
    pcm = await _pipecat_clock(server, "pcm_24000", text)
    for output_format in ("opus_48000_64", "opus_48000_192", "mp3_44100_128"):
        clock = await _pipecat_clock(server, output_format, text)
        # A format's priming (LAME's 25 ms at 44.1 kHz) moves it, nothing else.
        assert abs(clock - pcm) < 40, (output_format, clock, pcm)
    # The fake's 48 kbit/s MP3 of each segment of the first context: its playing time;
    # the clock never passes it.
    segments = len(fake.records) // 4
    audio_ms = sum(len(record.audio) for record in fake.records[:segments]) * 8 / 48
    assert audio_ms / 2 < pcm <= audio_ms + 30, (pcm, audio_ms)


async def test_idle_timeout_bounds_the_clients_inactivity_timeout(
    start_server: ServerFactory,
) -> None:
    """The operator's IDLE_TIMEOUT holds on ElevenLabs' socket too: a client asking
    inactivity_timeout=180 is closed (1000) once IDLE_TIMEOUT passes without a message."""
    server = await start_server(idle_timeout=TIMEOUT / 10)
    url = stream_url(server) + "?inactivity_timeout=180"
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert ws.close_code == 1000


async def test_a_socket_without_its_key_has_a_short_deadline(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admitted without a key (it may come in the first message), a socket that sends
    nothing is closed at FIRST_MESSAGE_TIMEOUT, whatever inactivity_timeout it asked,
    and its connection slot is free for a client with the key."""
    monkeypatch.setattr(connection, "FIRST_MESSAGE_TIMEOUT", TIMEOUT / 10)
    server = await start_server(api_keys=("k",), max_connections_per_ip=1)
    async with connect(stream_url(server) + "?inactivity_timeout=180") as keyless:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(keyless.recv(), TIMEOUT)
    await eventually(lambda: server.stats.snapshot()["connections"] == 0)
    async with stream_input(stream_url(server, "stream-input"), **{"xi-api-key": "k"}) as ws:
        await ws.send(text="With the key. ")
        await ws.send(text="")
        assert audio_of(await ws.until_final())
