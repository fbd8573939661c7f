"""The OpenAI door as its real clients use it (issue 32).

Open WebUI, LibreChat, SillyTavern and Home Assistant are replayed: each test
sends exactly the requests their code sends (read from their sources: paths,
headers, bodies, what they leave out). The ``openai`` SDK, Pipecat's
``OpenAITTSService`` and LiveKit's ``livekit.plugins.openai.TTS`` are run for
real against the server.
"""

from __future__ import annotations

import array
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import miniaudio
import openai
import orjson
import pytest
from livekit.plugins import openai as livekit_openai
from pipecat.frames.frames import EndFrame, ErrorFrame, Frame, TTSAudioRawFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.tts import OpenAITTSService
from pipecat.workers.runner import WorkerRunner

from tests.conftest import ServerFactory
from tests.fake_edge import FakeEdge
from ttsstream.audio.formats import FORMATS
from ttsstream.server import Server

TEXT = "One sentence of a longer answer, spoken as soon as it is written."
KEY = "client-api-key-0123456789"


def base_of(server: Server, v1: bool = True) -> str:
    """A client's base URL for the server: configured with /v1 or without, in the wild."""
    return f"http://127.0.0.1:{server.port}" + ("/v1" if v1 else "")


async def call(
    method: str, url: str, *, json: object = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request as a client sends it: status, headers, body."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, json=json, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def decoded_samples(mp3: bytes) -> int:
    """How many 24 kHz samples an MP3 holds."""
    decoded = miniaudio.mp3_read_s16(mp3)
    assert decoded.sample_rate == 24_000
    return len(array.array("h", decoded.samples))


# Open WebUI (backend/open_webui/routers/audio.py, engine "openai")


@pytest.mark.parametrize("v1", [True, False])
async def test_open_webui_lists_voices_and_models_without_its_key(
    start_server: ServerFactory, v1: bool
) -> None:
    """Open WebUI asks {base}/audio/voices and builds {id: name}, then {base}/audio/models
    (else {base}/models), all without its key: on a server with a key, both answer."""
    server = await start_server(api_keys=(KEY,))
    base = base_of(server, v1)
    status, _, body = await call("GET", base + "/audio/voices")
    assert status == 200
    available = {voice["id"]: voice["name"] for voice in orjson.loads(body).get("voices", [])}
    assert available["alloy"] == "alloy → en-US-AvaNeural"
    assert available["en-US-AriaNeural"] == "en-US-AriaNeural (Female, en-US)"
    assert available["espeak:fr"] == "espeak:fr (Male, fr-FR)"
    status, _, body = await call("GET", base + "/audio/models")
    assert status == 200
    assert {"id": "tts-1"} in orjson.loads(body).get("models", [])
    status, _, body = await call("GET", base + "/models")
    assert status == 200
    assert "tts-1" in [model["id"] for model in orjson.loads(body)["data"]]


@pytest.mark.parametrize(
    ("server_key", "model", "voice"),
    [
        (True, "tts-1", "alloy"),
        (True, "", "en-US-AriaNeural"),  # no model set: Open WebUI passes ""
        (True, "kokoro", "nova"),  # a model of another server, kept from before
        (False, "tts-1-hd", "alloy"),  # no key on either side: "Bearer " goes out
    ],
)
async def test_open_webui_speaks_with_its_settings(
    start_server: ServerFactory, fake: FakeEdge, server_key: bool, model: str, voice: str
) -> None:
    """Open WebUI's speech call: POST {base}/audio/speech, its JSON payload with the
    configured model and a voice from the list, Authorization: Bearer <its key>."""
    server = await start_server(api_keys=(KEY,) if server_key else ())
    status, headers, audio = await call(
        "POST",
        base_of(server) + "/audio/speech",
        json={"input": TEXT, "voice": voice, "model": model},
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {KEY if server_key else ''}",
        },
    )
    assert (status, headers["Content-Type"]) == (200, "audio/mpeg")
    assert audio == bytes(fake.records[0].audio)


# LibreChat (api/server/services/Files/Audio/TTSService.js, openAIProvider)


@pytest.mark.parametrize("no_key", ["Bearer undefined", "Bearer null", "Bearer "])
async def test_librechat_without_voice_model_or_key(
    start_server: ServerFactory, fake: FakeEdge, no_key: str
) -> None:
    """LibreChat drops "voice" when its voice list is empty and "model" when unset, and
    sends "Bearer undefined" with no key configured: the default voice speaks on a
    server without keys; a server with keys answers 401 as to no key (not 400), and
    "Bearer undefined" beside the real key is that key alone."""
    open_server = await start_server()
    headers = {"Content-Type": "application/json", "Authorization": no_key}
    status, response_headers, audio = await call(
        "POST", base_of(open_server) + "/audio/speech", json={"input": TEXT}, headers=headers
    )
    assert status == 200 and audio == bytes(fake.records[0].audio)
    assert response_headers["X-TTS-Voice"] == open_server.config.default_voice

    keyed = await start_server(api_keys=(KEY,))
    status, _, body = await call(
        "POST", base_of(keyed) + "/audio/speech", json={"input": TEXT}, headers=headers
    )
    error = orjson.loads(body)["error"]
    assert (status, error["code"], error["message"]) == (
        401,
        "unauthorized",
        "a valid API key is required",
    )
    status, _, audio = await call(
        "POST",
        base_of(keyed) + "/audio/speech",
        json={"input": TEXT},
        headers={**headers, "X-API-Key": KEY},
    )
    assert status == 200 and audio


# SillyTavern (public/scripts/extensions/tts/openai-compatible.js, and the server's
# /api/openai/custom/generate-voice that forwards it)


async def test_sillytavern_voice_with_a_space_at_its_slowest(
    server: Server, fake: FakeEdge
) -> None:
    """SillyTavern splits "alloy, echo" on commas without trimming (" echo" is sent),
    at speed 0.25, with its fixed response_format and model."""
    status, _, audio = await call(
        "POST",
        base_of(server) + "/audio/speech",
        json={
            "input": TEXT,
            "response_format": "mp3",
            "voice": " echo",
            "speed": 0.25,
            "model": "tts-1",
        },
        headers={"Content-Type": "application/json", "Authorization": "Bearer "},
    )
    assert status == 200 and audio == bytes(fake.records[0].audio)
    assert fake.records[0].voice.endswith("BrianNeural)")
    assert fake.records[0].rate == "-75%"


# Home Assistant: the "OpenAI TTS" integration (sfortis/openai_tts,
# custom_components/openai_tts/openaitts_engine.py), POSTing to its configured URL


#: The first bytes of each OpenAI format: the body is that format, not just labelled so.
MAGIC = {
    "mp3": (b"\xff",),
    "opus": (b"OggS",),
    "aac": (b"\xff\xf1", b"\xff\xf9"),
    "flac": (b"fLaC",),
    "wav": (b"RIFF",),
    "pcm": (b"",),
}


@pytest.mark.parametrize("response_format", list(MAGIC))
async def test_home_assistant_with_instructions_in_every_format(
    start_server: ServerFactory, fake: FakeEdge, response_format: str
) -> None:
    """Home Assistant's call: its payload with instructions (accepted, not used), speed,
    and each of OpenAI's response formats; the audio streams in that format."""
    server = await start_server(api_keys=(KEY,))
    status, headers, audio = await call(
        "POST",
        base_of(server) + "/audio/speech",
        json={
            "model": "gpt-4o-mini-tts",
            "input": TEXT,
            "voice": "coral",
            "response_format": response_format,
            "speed": 1.0,
            "instructions": "Speak in a cheerful and positive tone.",
        },
        headers={
            "Content-Type": "application/json",
            "User-Agent": "HomeAssistant-OpenAI-TTS",
            "Authorization": f"Bearer {KEY}",
        },
    )
    assert (status, headers["Content-Type"]) == (200, FORMATS[response_format].mime_type)
    assert audio.startswith(MAGIC[response_format]) and len(audio) > 1000
    assert fake.records[0].voice.endswith("EmmaNeural)")


# The openai SDK


@pytest.fixture
async def sdk(server: Server) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client, as applications make it."""
    client = openai.AsyncOpenAI(base_url=base_of(server), api_key="unused", max_retries=0)
    yield client
    await client.close()


async def test_the_openai_sdk_reads_models_and_errors(sdk: openai.AsyncOpenAI) -> None:
    """models.retrieve gives a model object, NotFoundError for a name not listed; an
    unknown voice is a BadRequestError whose param is voice and whose message names it."""
    model = await sdk.models.retrieve("tts-1-hd")
    assert (model.id, model.object) == ("tts-1-hd", "model")
    with pytest.raises(openai.NotFoundError):
        await sdk.models.retrieve("whisper-1")
    with pytest.raises(openai.BadRequestError) as raised:
        await sdk.audio.speech.create(model="tts-1", voice="Robert", input=TEXT)
    assert (raised.value.code, raised.value.param) == ("invalid_voice", "voice")
    assert '"Robert"' in raised.value.message


# One app, many users, one IP


async def test_an_app_speaking_for_many_users_shares_one_ips_limit(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Open WebUI, LibreChat or Home Assistant send every user's sentences from their one
    address: past RATE_LIMIT_REQUESTS they are all cut off, and the 429 says why and what
    to do; behind a proxy that forwards each user's IP, each user has their own limit."""
    server = await start_server(rate_limit_requests=3)
    answers = [
        await call(
            "POST",
            base_of(server) + "/audio/speech",
            json={"input": f"Sentence {n} for user {n}.", "voice": "alloy"},
        )
        for n in range(4)
    ]
    assert [status for status, _, _ in answers] == [200, 200, 200, 429]
    _, headers, body = answers[-1]
    error = orjson.loads(body)["error"]
    assert (error["code"], error["type"]) == ("rate_limited", "rate_limit_error")
    assert "IP address" in error["message"] and "RATE_LIMIT_REQUESTS" in error["message"]
    assert "more than 3 in 60 seconds" in error["message"]
    assert int(headers["Retry-After"]) >= 1
    for user in range(4):  # each user's own IP, from a trusted proxy (127.0.0.1)
        status, _, _ = await call(
            "POST",
            base_of(server) + "/audio/speech",
            json={"input": f"Sentence for user {user}.", "voice": "alloy"},
            headers={"X-Forwarded-For": f"203.0.113.{user + 1}"},
        )
        assert status == 200


# Pipecat (pipecat/services/openai/tts.py): PCM, read as 24 kHz


class _Collector(FrameProcessor):
    """The end of a Pipecat pipeline: keeps the audio frames and the errors."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = bytearray()
        self.sample_rates: set[int] = set()
        self.errors: list[ErrorFrame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.audio += frame.audio
            self.sample_rates.add(frame.sample_rate)
        elif isinstance(frame, ErrorFrame):
            self.errors.append(frame)
        await self.push_frame(frame, direction)


async def test_pipecat_speaks_pcm_at_24_khz(start_server: ServerFactory, fake: FakeEdge) -> None:
    """Pipecat's OpenAITTSService in a pipeline (its defaults: gpt-4o-mini-tts, alloy,
    response_format pcm, with speed set): 24 kHz PCM as long as the upstream's MP3."""
    server = await start_server(api_keys=(KEY,))
    tts = OpenAITTSService(
        api_key=KEY, base_url=base_of(server), settings=OpenAITTSService.Settings(speed=1.25)
    )
    collector = _Collector()
    worker = PipelineWorker(
        Pipeline([tts, collector]), params=PipelineParams(audio_out_sample_rate=24_000)
    )
    await worker.queue_frames([TTSSpeakFrame(TEXT), EndFrame()])
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    assert collector.errors == [] and collector.sample_rates == {24_000}
    record = fake.records[0]
    assert record.voice.endswith("AvaNeural)") and record.rate == "+25%"
    samples = len(collector.audio) // 2
    assert samples == pytest.approx(decoded_samples(bytes(record.audio)), rel=0.05)


# LiveKit (livekit-plugins-openai, livekit/plugins/openai/tts.py): SSE unless the model is
# tts-1 or tts-1-hd; audio under "delta" or "audio"


@pytest.mark.parametrize(
    ("model", "content_type"),
    [("gpt-4o-mini-tts", "text/event-stream"), ("tts-1", "audio/mpeg")],
)
async def test_livekit_speaks_by_sse_or_audio(
    start_server: ServerFactory, fake: FakeEdge, model: str, content_type: str
) -> None:
    """LiveKit's OpenAI TTS asks SSE for gpt-4o-mini-tts and plain audio for tts-1; both
    decode to 24 kHz frames as long as the upstream's MP3."""
    server = await start_server(api_keys=(KEY,))
    answered: list[str] = []

    async def seen(response: Any) -> None:  # the SDK's HTTP client's response
        answered.append(response.headers["content-type"])

    client = openai.AsyncOpenAI(
        base_url=base_of(server),
        api_key=KEY,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"response": [seen]}),
    )
    tts = livekit_openai.TTS(model=model, voice="ash", client=client)
    samples = 0
    rates: set[int] = set()
    try:
        async with tts.synthesize(TEXT) as stream:
            async for event in stream:
                samples += event.frame.samples_per_channel
                rates.add(event.frame.sample_rate)
    finally:
        await tts.aclose()
        await client.close()
    assert answered == [content_type] and rates == {24_000}
    record = fake.records[0]
    assert record.voice.endswith("AndrewNeural)")
    assert samples == pytest.approx(decoded_samples(bytes(record.audio)), rel=0.05)
