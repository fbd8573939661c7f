"""Cartesia's API without sockets: messages in, actions out, and what we send read by the
real clients' own code (the ``cartesia`` SDK, Pipecat, LiveKit)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from cartesia import BadRequestError, Cartesia
from cartesia._models import construct_type_unchecked, validate_type
from cartesia._streaming import SSEDecoder
from cartesia.lib._tts import TTSResourceConnection
from cartesia.types.tts_sse_event import TTSSSEEvent
from cartesia.types.voice import Voice as CartesiaVoice
from cartesia.types.websocket_response import WebsocketResponse
from livekit.plugins.cartesia import tts as livekit_cartesia
from pipecat.services.cartesia.tts import CartesiaHttpTTSService, CartesiaTTSService

from ttsstream.audio import formats
from ttsstream.audio.formats import Format
from ttsstream.engines.base import Voice, WordEvent
from ttsstream.exceptions import (
    BadJSON,
    BadMessage,
    ClientError,
    EmptyText,
    InvalidParameter,
    InvalidVoice,
    RateLimited,
    TextTooLong,
    UnsupportedFormat,
    UpstreamTimeout,
)
from ttsstream.protocols import cartesia
from ttsstream.protocols.actions import Action, Append, Cancel, Finish, Flush, Reply, Speak
from ttsstream.protocols.cartesia import (
    MAX_CLOSED_REMEMBERED,
    MAX_VOICE_PAGE,
    CartesiaContexts,
    encode_chunk,
    encode_done,
    encode_error,
    encode_flush_done,
    encode_http_error,
    encode_timestamps,
    encode_voices,
    format_name,
    parse_http_request,
    sse_event,
    status_code,
)
from ttsstream.protocols.v1 import MAX_ID_LENGTH

VOICE = "en-US-AriaNeural"
#: How Pipecat, LiveKit and the SDK's examples name a voice.
SDK_VOICE: Any = {"mode": "id", "id": VOICE}
RAW: Any = {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000}
#: What every opening message of these tests carries.
OPENING = {"model_id": "sonic-3", "voice": {"mode": "id", "id": VOICE}, "output_format": RAW}

#: The names the format table is getting (another change): what the fake table knows.
_TABLE_NAMES = re.compile(
    r"(pcm|pcm_f32le|wav)_(8000|16000|22050|24000|44100|48000)|(ulaw|alaw)_8000"
    r"|mp3_22050_32|mp3_24000_48|mp3_44100_(32|64|96|128|192)"
)


def fake_format(name: str) -> Format | None:
    """A format for every name the table is to have, so these tests do not wait for it."""
    if _TABLE_NAMES.fullmatch(name) is None:
        return None
    return Format(name=name, mime_type="audio/test", extension="bin")


@pytest.fixture(autouse=True)
def format_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cartesia, "format_named", fake_format)


def fmt(name: str) -> Format:
    found = fake_format(name)
    assert found is not None
    return found


def frame(**fields: Any) -> str:
    return json.dumps(fields)


def replies(actions: list[Action]) -> list[Any]:
    """The actions, each reply as the JSON it sends."""
    return [orjson.loads(a.data) if isinstance(a, Reply) else a for a in actions]


def feed(*messages: dict[str, Any], max_text_length: int = 1000) -> list[Any]:
    """Every action the messages ask for, in order, on one connection."""
    contexts = CartesiaContexts(max_text_length=max_text_length)
    actions: list[Action] = []
    for message in messages:
        actions += contexts.receive(json.dumps(message))
    return replies(actions)


def done(context_id: str) -> dict[str, Any]:
    return {"type": "done", "context_id": context_id, "done": True, "status_code": 200}


def flush_done(context_id: str, flush_id: int) -> dict[str, Any]:
    return {
        "type": "flush_done",
        "context_id": context_id,
        "done": False,
        "flush_done": True,
        "flush_id": flush_id,
        "status_code": 206,
    }


def streaming(text: str, **fields: Any) -> Speak:
    return Speak(id="c", text=text, voice=VOICE, format=fmt("pcm_24000"), stream=True, **fields)


# Messages in, actions out

CONTEXTS: list[tuple[str, list[dict[str, Any]], list[Any]]] = [
    (
        "a context: open, more text, end",
        [
            {"context_id": "c", "transcript": "Hello ", "continue": True, **OPENING},
            {"context_id": "c", "transcript": "world.", "continue": True, **OPENING},
            {"context_id": "c", "transcript": "", "continue": False, **OPENING},
        ],
        [streaming("Hello ", words="none"), Append("c", "world."), Finish("c")],
    ),
    (
        "timestamps asked: words in batches",
        [
            {
                "context_id": "c",
                "transcript": "Hi ",
                "continue": True,
                "add_timestamps": True,
                **OPENING,
            }
        ],
        [streaming("Hi ", words="batch")],
    ),
    (
        "no continue: a one-shot utterance",
        [{"context_id": "c", "transcript": "Hi.", **OPENING}],
        [Speak(id="c", text="Hi.", voice=VOICE, format=fmt("pcm_24000"), words="none")],
    ),
    (
        "continue false on a new context: a one-shot utterance",
        [{"context_id": "c", "transcript": "Hi.", "continue": False, **OPENING}],
        [Speak(id="c", text="Hi.", voice=VOICE, format=fmt("pcm_24000"), words="none")],
    ),
    (
        "a new context with nothing to say (LiveKit's empty turn) is done at once",
        [{"context_id": "c", "transcript": " ", "continue": False, **OPENING}],
        [done("c")],
    ),
    (
        "LiveKit's end: a space, continue false",
        [
            {"context_id": "c", "transcript": "Hi. ", "continue": True, **OPENING},
            {"context_id": "c", "transcript": " ", "continue": False, **OPENING},
        ],
        [streaming("Hi. ", words="none"), Append("c", " "), Finish("c")],
    ),
    (
        "a flush speaks the buffer and is acknowledged, counted from 1",
        [
            {"context_id": "c", "transcript": "Stay hungry, ", "continue": True, **OPENING},
            {"context_id": "c", "transcript": "", "continue": True, "flush": True, **OPENING},
            {"context_id": "c", "transcript": "stay foolish.", "continue": True, **OPENING},
            {"context_id": "c", "transcript": "", "continue": True, "flush": True, **OPENING},
            {"context_id": "c", "transcript": "", "continue": False, **OPENING},
        ],
        [
            streaming("Stay hungry, ", words="none"),
            Flush("c"),
            flush_done("c", 1),
            Append("c", "stay foolish."),
            Flush("c"),
            flush_done("c", 2),
            Finish("c"),
        ],
    ),
    (
        "a flush on the opening message",
        [{"context_id": "c", "transcript": "Hi ", "continue": True, "flush": True, **OPENING}],
        [streaming("Hi ", words="none"), Flush("c"), flush_done("c", 1)],
    ),
    (
        "a flush with the end",
        [
            {"context_id": "c", "transcript": "Hi ", "continue": True, **OPENING},
            {"context_id": "c", "transcript": "", "continue": False, "flush": True, **OPENING},
        ],
        [streaming("Hi ", words="none"), Finish("c"), flush_done("c", 1)],
    ),
    (
        "max_buffer_delay_ms 0 (Pipecat's and LiveKit's sentences): each transcript is flushed",
        [
            {"context_id": "c", "transcript": "One. ", "continue": True, "max_buffer_delay_ms": 0}
            | OPENING,
            {"context_id": "c", "transcript": "Two. ", "continue": True, **OPENING},
            {"context_id": "c", "transcript": "", "continue": False, **OPENING},
        ],
        [
            streaming("One. ", words="none"),
            Flush("c"),
            Append("c", "Two. "),
            Flush("c"),
            Finish("c"),
        ],
    ),
    (
        "max_buffer_delay_ms is the segmenter's longest wait",
        [
            {"context_id": "c", "transcript": "", "continue": True, "max_buffer_delay_ms": 700}
            | OPENING
        ],
        [streaming("", words="none", max_wait_ms=700)],
    ),
    (
        "a cancel cancels the context; its later messages are dropped",
        [
            {"context_id": "c", "transcript": "Hi ", "continue": True, **OPENING},
            {"context_id": "c", "cancel": True},
            {"context_id": "c", "transcript": "more", "continue": True, **OPENING},
            {"context_id": "c", "transcript": "", "continue": False, **OPENING},
        ],
        [streaming("Hi ", words="none"), Cancel("c")],
    ),
    (
        "a cancel of no context is no error (Pipecat cancels what is over)",
        [{"context_id": "nothing", "cancel": True}],
        [],
    ),
    (
        "a second end of a context is dropped (a turn flushed twice)",
        [
            {"context_id": "c", "transcript": "Hi.", "continue": True, **OPENING},
            {"context_id": "c", "transcript": "", "continue": False, **OPENING},
            {"context_id": "c", "transcript": "", "continue": False, **OPENING},
        ],
        [streaming("Hi.", words="none"), Finish("c")],
    ),
    (
        "the first message's voice and format hold for the context",
        [
            {"context_id": "c", "transcript": "Hi ", "continue": True, **OPENING},
            {
                "context_id": "c",
                "transcript": "there.",
                "continue": True,
                "voice": {"mode": "id", "id": "fr-FR-DeniseNeural"},
                "output_format": {"container": "ogg"},
            },
        ],
        [streaming("Hi ", words="none"), Append("c", "there.")],
    ),
    (
        "contexts are independent",
        [
            {"context_id": "a", "transcript": "One.", **OPENING},
            {"context_id": "b", "transcript": "Two ", "continue": True, **OPENING},
        ],
        [
            Speak(id="a", text="One.", voice=VOICE, format=fmt("pcm_24000"), words="none"),
            Speak(
                id="b", text="Two ", voice=VOICE, format=fmt("pcm_24000"), stream=True, words="none"
            ),
        ],
    ),
]


@pytest.mark.parametrize(
    ("messages", "expected"), [(m, e) for _, m, e in CONTEXTS], ids=[n for n, _, _ in CONTEXTS]
)
def test_contexts(messages: list[dict[str, Any]], expected: list[Any]) -> None:
    """Each sequence of client messages asks for exactly these actions, in this order."""
    assert feed(*messages) == expected


def test_null_fields_are_absent() -> None:
    """A field sent as null (LiveKit's ``"language": null``) is one left out."""
    actions = feed(
        {"context_id": "c", "transcript": "Hi.", "language": None, "speed": None, **OPENING}
    )
    assert actions == [
        Speak(id="c", text="Hi.", voice=VOICE, format=fmt("pcm_24000"), words="none")
    ]


def test_a_binary_frame_of_json_is_read() -> None:
    """A message sent in a binary frame is read as its text."""
    contexts = CartesiaContexts(max_text_length=100)
    message = {"context_id": "c", "transcript": "Hi.", **OPENING}
    assert contexts.receive(orjson.dumps(message)) == feed(message)


@pytest.mark.parametrize(
    ("voice", "expected"),
    [
        ({"mode": "id", "id": VOICE}, VOICE),
        (VOICE, VOICE),  # the SDK 4.x's voice: the id alone
        ({"id": f"  {VOICE} "}, VOICE),
        ({"mode": "id", "id": "6ccbfb76-1fc6-48f7-b71d-91ac6298247b"}, None),  # a Cartesia id
        ("A0E99841-438C-4A64-B679-AE501E7D6091", None),
        ({"mode": "id", "id": ""}, None),
    ],
)
def test_voice(voice: object, expected: str | None) -> None:
    """A voice id is our voice name; a Cartesia voice id (a UUID) or none is the default voice."""
    (speak,) = feed({"context_id": "c", "transcript": "Hi.", **OPENING, "voice": voice})
    assert speak.voice == expected


@pytest.mark.parametrize(
    ("fields", "rate", "volume"),
    [
        ({}, "+0%", "+0%"),
        ({"speed": "slow"}, "-25%", "+0%"),
        ({"speed": "normal"}, "+0%", "+0%"),
        ({"speed": "fast"}, "+25%", "+0%"),
        ({"speed": "fastest"}, "+50%", "+0%"),
        ({"speed": -1}, "-50%", "+0%"),
        ({"speed": 0.5}, "+25%", "+0%"),
        ({"generation_config": {"speed": 1.5}}, "+50%", "+0%"),
        ({"generation_config": {"speed": 0.6, "volume": 2}}, "-40%", "+100%"),
        ({"generation_config": {"volume": 0.5, "emotion": "calm"}}, "+0%", "-50%"),
        ({"generation_config": {"speed": 1.2}, "speed": "slow"}, "+20%", "+0%"),
        (
            {"voice": {"mode": "id", "id": VOICE, "__experimental_controls": {"speed": "slowest"}}},
            "-50%",
            "+0%",
        ),
        (
            {
                "voice": {
                    "mode": "id",
                    "id": VOICE,
                    "__experimental_controls": {"speed": 0.2, "emotion": ["positivity:high"]},
                }
            },
            "+10%",
            "+0%",
        ),
    ],
)
def test_speed_and_volume(fields: dict[str, Any], rate: str, volume: str) -> None:
    """Cartesia's speeds and volume are our rate and volume (generation_config first)."""
    (speak,) = feed({"context_id": "c", "transcript": "Hi.", **OPENING, **fields})
    assert (speak.rate, speak.volume) == (rate, volume)


FORMATS = [
    (RAW, "pcm_24000"),
    ({"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000}, "pcm_16000"),
    ({"container": "raw", "encoding": "pcm_f32le", "sample_rate": 44100}, "pcm_f32le_44100"),
    ({"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 8000}, "ulaw_8000"),
    ({"container": "raw", "encoding": "pcm_alaw", "sample_rate": 8000}, "alaw_8000"),
    ({"container": "wav", "encoding": "pcm_s16le", "sample_rate": 22050}, "wav_22050"),
    ({"container": "mp3", "bit_rate": 128000, "sample_rate": 44100}, "mp3_44100_128"),
]


@pytest.mark.parametrize(("output_format", "name"), FORMATS)
def test_output_format(output_format: dict[str, Any], name: str) -> None:
    """Each Cartesia output_format is the format table's name of the same audio."""
    assert format_name(output_format) == name
    (speak,) = feed(
        {"context_id": "c", "transcript": "Hi.", **OPENING, "output_format": output_format}
    )
    assert speak.format == fmt(name)


@pytest.mark.parametrize(
    ("output_format", "error"),
    [
        ({"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 16000}, UnsupportedFormat),
        ({"container": "raw", "encoding": "pcm_s8", "sample_rate": 16000}, UnsupportedFormat),
        ({"container": "wav", "encoding": "pcm_f32le", "sample_rate": 16000}, UnsupportedFormat),
        ({"container": "ogg", "sample_rate": 48000}, UnsupportedFormat),
        ({"container": "mp3", "bit_rate": 32000, "sample_rate": 8000}, UnsupportedFormat),
        ({"container": "raw", "encoding": "pcm_s16le", "sample_rate": 11025}, UnsupportedFormat),
        ({"container": "raw", "encoding": "pcm_s16le"}, BadMessage),
        ({"container": "raw", "encoding": "pcm_s16le", "sample_rate": "24000"}, BadMessage),
        ({"container": "mp3", "sample_rate": 44100}, BadMessage),
        ({"encoding": "pcm_s16le", "sample_rate": 24000}, BadMessage),
        ("pcm_24000", BadMessage),
    ],
)
def test_output_format_refused(output_format: object, error: type[ClientError]) -> None:
    """An output_format with no equivalent here, or malformed, is refused for its context."""
    contexts = CartesiaContexts(max_text_length=100)
    message = {"context_id": "c", "transcript": "Hi.", **OPENING, "output_format": output_format}
    with pytest.raises(error) as refused:
        contexts.receive(json.dumps(message))
    assert refused.value.utterance_id == "c"
    assert refused.value.param == "output_format"
    assert "output_format" in refused.value.message


@pytest.mark.skipif(
    formats.format_named("pcm_16000") is None,
    reason="the format table does not have the names of every rate yet (another change)",
)
def test_the_format_table_has_every_name_made() -> None:
    """Every name an output_format of Cartesia's rates becomes is in the real format table."""
    rates = (8000, 16000, 22050, 24000, 44100, 48000)
    names = [f"pcm_{r}" for r in rates] + [f"pcm_f32le_{r}" for r in rates]
    names += [f"wav_{r}" for r in rates] + ["ulaw_8000", "alaw_8000", "mp3_44100_128"]
    assert [name for name in names if formats.format_named(name) is None] == []


REFUSALS: list[tuple[str | bytes, type[ClientError], str | None]] = [
    ("{not json", BadJSON, None),
    ("[1, 2]", BadMessage, None),
    (frame(transcript="Hi.", **OPENING), BadMessage, None),
    (frame(context_id=7, transcript="Hi.", **OPENING), BadMessage, None),
    (frame(context_id="x" * (MAX_ID_LENGTH + 1), transcript="Hi."), InvalidParameter, None),
    (frame(context_id="c", transcript=5, **OPENING), BadMessage, "c"),
    (frame(context_id="c", transcript="x" * 101, **OPENING), TextTooLong, "c"),
    (frame(context_id="c", transcript="Hi", **{"continue": "yes"}, **OPENING), BadMessage, "c"),
    (frame(context_id="c", transcript="Hi", flush=1, **OPENING), BadMessage, "c"),
    (frame(context_id="c", transcript="Hi", add_timestamps="true", **OPENING), BadMessage, "c"),
    (frame(context_id="c", transcript="Hi", voice=VOICE, model_id="sonic"), BadMessage, "c"),
    (
        frame(context_id="c", transcript="Hi", voice={"mode": "id"}, output_format=RAW),
        BadMessage,
        "c",
    ),
    (
        frame(
            context_id="c",
            transcript="Hi",
            voice={"mode": "embedding", "embedding": [0.1]},
            output_format=RAW,
        ),
        InvalidVoice,
        "c",
    ),
    (frame(context_id="c", transcript="Hi", **{**OPENING, "voice": "x" * 200}), InvalidVoice, "c"),
    (
        frame(context_id="c", transcript="Hi", max_buffer_delay_ms=5001, **OPENING),
        InvalidParameter,
        "c",
    ),
    (
        frame(context_id="c", transcript="Hi", max_buffer_delay_ms=-1, **OPENING),
        InvalidParameter,
        "c",
    ),
    (
        frame(context_id="c", transcript="Hi", max_buffer_delay_ms=0.5, **OPENING),
        InvalidParameter,
        "c",
    ),
    (frame(context_id="c", transcript="Hi", speed="warp", **OPENING), InvalidParameter, "c"),
    (frame(context_id="c", transcript="Hi", speed=1.5, **OPENING), InvalidParameter, "c"),
    (
        frame(context_id="c", transcript="Hi", generation_config={"speed": 3}, **OPENING),
        InvalidParameter,
        "c",
    ),
    (
        frame(context_id="c", transcript="Hi", generation_config={"volume": 0.1}, **OPENING),
        InvalidParameter,
        "c",
    ),
    (frame(context_id="c", transcript="Hi", generation_config=1.2, **OPENING), BadMessage, "c"),
    (frame(context_id="c", transcript="\u200b", **OPENING), EmptyText, "c"),
]


@pytest.mark.parametrize(("message", "error", "context_id"), REFUSALS)
def test_refusals(message: str | bytes, error: type[ClientError], context_id: str | None) -> None:
    """A bad message raises its ClientError with the context id when it had a valid one."""
    contexts = CartesiaContexts(max_text_length=100)
    with pytest.raises(error) as refused:
        contexts.receive(message)
    assert refused.value.utterance_id == context_id


def test_limits_at_their_edge() -> None:
    """A transcript of max_text_length, a context id of MAX_ID_LENGTH and a 5000 ms delay pass."""
    contexts = CartesiaContexts(max_text_length=10)
    (speak,) = contexts.receive(
        frame(
            context_id="x" * MAX_ID_LENGTH,
            transcript="y" * 10,
            max_buffer_delay_ms=5000,
            **{"continue": True},
            **OPENING,
        )
    )
    assert isinstance(speak, Speak) and speak.max_wait_ms == 5000 and len(speak.id) == MAX_ID_LENGTH
    with pytest.raises(TextTooLong):
        contexts.receive(frame(context_id="x" * MAX_ID_LENGTH, transcript="y" * 11))
    with pytest.raises(ValueError, match="max_text_length"):
        CartesiaContexts(max_text_length=0)


def test_text_after_the_end_is_refused_and_ends_the_context() -> None:
    """Text for a context whose input has ended is refused; the context is then over."""
    contexts = CartesiaContexts(max_text_length=100)
    contexts.receive(frame(context_id="c", transcript="Hi.", **OPENING))
    with pytest.raises(BadMessage, match="new context_id") as refused:
        contexts.receive(frame(context_id="c", transcript="More.", **{"continue": True}))
    assert refused.value.utterance_id == "c"
    assert contexts.open_contexts == 0
    assert contexts.receive(frame(context_id="c", transcript="Again.", **OPENING)) == []


def test_a_refused_message_ends_its_open_context() -> None:
    """A refused message of an open context closes it: its later messages are dropped."""
    contexts = CartesiaContexts(max_text_length=10)
    contexts.receive(frame(context_id="c", transcript="Hi ", **{"continue": True}, **OPENING))
    with pytest.raises(TextTooLong):
        contexts.receive(frame(context_id="c", transcript="x" * 11, **{"continue": True}))
    assert contexts.receive(frame(context_id="c", transcript="more", **{"continue": True})) == []
    assert contexts.open_contexts == 0


def test_an_ended_context_id_may_open_a_new_context() -> None:
    """Once the door says a context ended, a late blank end is dropped; new text reopens it."""
    contexts = CartesiaContexts(max_text_length=100)
    contexts.receive(frame(context_id="c", transcript="Hi.", **OPENING))
    assert contexts.open_contexts == 1
    contexts.ended("c")
    contexts.ended("never-opened")
    assert contexts.open_contexts == 0
    assert contexts.receive(frame(context_id="c", transcript="", **{"continue": False})) == []
    (speak,) = contexts.receive(frame(context_id="c", transcript="Again.", **OPENING))
    assert isinstance(speak, Speak) and speak.text == "Again."


def test_a_failed_context_drops_its_later_messages() -> None:
    """After its error, a context's later text is dropped, not spoken as a new context."""
    contexts = CartesiaContexts(max_text_length=100)
    contexts.receive(frame(context_id="c", transcript="Hi ", **{"continue": True}, **OPENING))
    contexts.ended("c", failed=True)
    assert contexts.receive(frame(context_id="c", transcript="more", **{"continue": True})) == []


def test_closed_contexts_remembered_are_bounded() -> None:
    """The newest MAX_CLOSED_REMEMBERED cancelled ids are remembered; an older one is not."""
    contexts = CartesiaContexts(max_text_length=100)
    for n in range(MAX_CLOSED_REMEMBERED + 1):
        contexts.receive(
            frame(context_id=f"c{n}", transcript="Hi ", **{"continue": True}, **OPENING)
        )
        contexts.receive(frame(context_id=f"c{n}", cancel=True))
    late = {"transcript": "", "continue": False}
    assert contexts.receive(frame(context_id=f"c{MAX_CLOSED_REMEMBERED}", **late)) == []
    assert contexts.receive(frame(context_id="c1", **late)) == []
    # The oldest is forgotten: a blank end of it is a new empty context, done at once.
    assert replies(contexts.receive(frame(context_id="c0", **late))) == [done("c0")]


# HTTP bodies


def test_http_request() -> None:
    """A /tts/sse body is a whole Speak; its context_id is its id, timestamps its words."""
    body = orjson.dumps(
        {
            "model_id": "sonic-3",
            "transcript": "Hello.",
            "voice": {"mode": "id", "id": VOICE},
            "output_format": RAW,
            "language": "en",
            "context_id": "ctx",
            "add_timestamps": True,
            "generation_config": {"speed": 1.1},
        }
    )
    speak = parse_http_request(body, max_text_length=100, make_id=lambda: "made", timestamps=True)
    assert speak == Speak(
        id="ctx", text="Hello.", voice=VOICE, rate="+10%", format=fmt("pcm_24000"), words="batch"
    )
    bytes_speak = parse_http_request(body, max_text_length=100, make_id=lambda: "made")
    assert bytes_speak.words == "none"


def test_http_request_without_context_id() -> None:
    """Without a context_id the request gets a made id, marked as not given."""
    body = frame(transcript="Hello.", voice=VOICE, output_format=RAW, model_id="sonic-3")
    speak = parse_http_request(body, max_text_length=100, make_id=lambda: "made")
    assert (speak.id, speak.id_given, speak.stream) == ("made", False, False)


@pytest.mark.parametrize(
    ("body", "error", "context_id"),
    [
        ("nope", BadJSON, None),
        (frame(voice=VOICE, output_format=RAW), BadMessage, None),
        (frame(transcript="  ", voice=VOICE, output_format=RAW, context_id="k"), EmptyText, "k"),
        (frame(transcript="x" * 11, voice=VOICE, output_format=RAW), TextTooLong, None),
        (
            frame(transcript="Hi", voice=VOICE, output_format={"container": "flac"}),
            UnsupportedFormat,
            None,
        ),
    ],
)
def test_http_request_refused(body: str, error: type[ClientError], context_id: str | None) -> None:
    """A bad HTTP body raises its ClientError, with its context_id when it had one."""
    with pytest.raises(error) as refused:
        parse_http_request(body, max_text_length=10, make_id=lambda: "made")
    assert refused.value.utterance_id == context_id


# What we send, read by the SDK's own models

WORDS = [
    WordEvent(text="Hello", offset_ms=100, duration_ms=350.5, char_start=0, char_end=5),
    WordEvent(text="world", offset_ms=500, duration_ms=300, char_start=6, char_end=11),
]


def sdk_reads(message: bytes) -> Any:
    """What the SDK makes of a WebSocket message, validated against its model."""
    validated: Any = validate_type(type_=WebsocketResponse, value=json.loads(message))  # type: ignore[arg-type]
    loose: Any = construct_type_unchecked(value=json.loads(message), type_=WebsocketResponse)  # type: ignore[arg-type]
    assert type(validated) is type(loose)
    return validated


def test_sdk_reads_every_message() -> None:
    """Each encoded message is the SDK's model of its type, with the values we meant."""
    chunk = sdk_reads(encode_chunk("c", b"\x01\x02\x03", step_time_ms=12.3456, flush_id=2))
    assert (chunk.type, chunk.context_id, chunk.audio, chunk.done) == (
        "chunk",
        "c",
        b"\x01\x02\x03",
        False,
    )
    assert (chunk.status_code, chunk.step_time, chunk.flush_id) == (206, 12.346, 2)
    assert "flush_id" not in orjson.loads(encode_chunk("c", memoryview(b"ab")))

    stamps = sdk_reads(encode_timestamps("c", WORDS))
    assert stamps.type == "timestamps" and stamps.context_id == "c" and not stamps.done
    assert stamps.word_timestamps.words == ["Hello", "world"]
    assert stamps.word_timestamps.start == [0.1, 0.5]
    assert stamps.word_timestamps.end == [0.4505, 0.8]

    flushed = sdk_reads(encode_flush_done("c", 3))
    assert (flushed.type, flushed.flush_id, flushed.flush_done, flushed.done) == (
        "flush_done",
        3,
        True,
        False,
    )

    ended = sdk_reads(encode_done("c"))
    assert (ended.type, ended.done, ended.status_code) == ("done", True, 200)

    error = sdk_reads(encode_error(TextTooLong("too long"), context_id="c", request_id="conn-1"))
    assert (error.type, error.context_id, error.done, error.status_code) == (
        "error",
        "c",
        True,
        400,
    )
    assert (error.error_code, error.title, error.message) == (
        "text_too_long",
        "Text too long",
        "too long",
    )
    assert error.request_id == "conn-1"
    assert error.error == "Text too long: too long"  # the SDK's property, and the older field


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (BadJSON("x"), 400),
        (RateLimited("slow down", retry_after=3), 429),
        (UpstreamTimeout("late"), 504),
        (RuntimeError("secret detail"), 500),
    ],
)
def test_error_status_and_what_it_reveals(exc: BaseException, status: int) -> None:
    """An error's status_code follows its code; an unexpected one says nothing of itself."""
    message = orjson.loads(encode_error(exc, context_id=None, partial=True))
    assert message["status_code"] == status_code(exc) == status
    assert message["context_id"] is None and message["done"] is True
    assert message["message"].endswith("the audio already sent is partial")
    assert "secret" not in json.dumps(message)
    if isinstance(exc, RateLimited):
        assert message["retry_after"] == 3


# The SDK's WebSocket client, end to end over an in-memory connection


@dataclass
class Door:
    """What the WebSocket door is to do with the actions, in memory: some audio for each
    piece of text, its words when asked, ``done`` when the context ends."""

    contexts: CartesiaContexts = field(
        default_factory=lambda: CartesiaContexts(max_text_length=1000)
    )
    out: deque[bytes] = field(default_factory=deque)
    actions: list[Action] = field(default_factory=list)
    speaks: dict[str, Speak] = field(default_factory=dict)
    said: dict[str, float] = field(default_factory=dict)

    def client_sends(self, message: str | bytes) -> None:
        try:
            actions = self.contexts.receive(message)
        except ClientError as exc:
            self.out.append(encode_error(exc, context_id=exc.utterance_id))
            return
        for action in actions:
            self.actions.append(action)
            if isinstance(action, Speak):
                self.speaks[action.id] = action
                self._say(action.id, action.text)
                if not action.stream:
                    self._end(action.id)
            elif isinstance(action, Append):
                self._say(action.id, action.text)
            elif isinstance(action, Finish):
                self._end(action.id)
            elif isinstance(action, Reply):
                self.out.append(action.data)
            elif isinstance(action, Cancel) and action.id is not None:
                self.speaks.pop(action.id)

    def _say(self, context_id: str, text: str) -> None:
        if not text.strip():
            return
        self.out.append(encode_chunk(context_id, text.encode(), step_time_ms=1.5))
        if self.speaks[context_id].words == "batch":
            at = self.said.get(context_id, 0.0)
            words = [WordEvent(w, at + 100 * n, 90, None, None) for n, w in enumerate(text.split())]
            self.said[context_id] = at + 100 * len(words)
            self.out.append(encode_timestamps(context_id, words))

    def _end(self, context_id: str) -> None:
        self.out.append(encode_done(context_id))
        self.contexts.ended(context_id)
        self.speaks.pop(context_id)


class SyncSocket:
    """The websockets connection the SDK's sync client reads and writes, in memory."""

    def __init__(self, door: Door) -> None:
        self.door = door

    def send(self, data: str) -> None:
        self.door.client_sends(data)

    def recv(self, decode: bool = False, timeout: float | None = None) -> bytes:
        if not self.door.out:
            raise TimeoutError("the door has nothing more to send")
        return self.door.out.popleft()


def sdk_connection(door: Door) -> TTSResourceConnection:
    return TTSResourceConnection(SyncSocket(door))  # type: ignore[arg-type]


def test_sdk_context_push_and_receive() -> None:
    """The SDK's context helper: pushes, a flush, the end; it receives audio, words and done."""
    door = Door()
    connection = sdk_connection(door)
    ctx = connection.context(
        "ctx-1",
        model_id="sonic-3",
        voice=SDK_VOICE,
        output_format={"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000},
        add_timestamps=True,
        max_buffer_delay_ms=300,
    )
    ctx.push("Stay hungry, ")
    ctx.push("", flush=True)
    ctx.push("stay foolish.", speed="fast")
    ctx.no_more_inputs()
    events: list[Any] = list(ctx.receive())
    assert [e.type for e in events] == [
        "chunk",
        "timestamps",
        "flush_done",
        "chunk",
        "timestamps",
        "done",
    ]
    assert b"".join(e.audio for e in events if e.type == "chunk") == b"Stay hungry, stay foolish."
    words = [w for e in events if e.type == "timestamps" for w in e.word_timestamps.words]
    assert words == ["Stay", "hungry,", "stay", "foolish."]
    assert events[2].flush_id == 1
    assert door.actions[0] == Speak(
        id="ctx-1",
        text="Stay hungry, ",
        voice=VOICE,
        format=fmt("pcm_24000"),
        words="batch",
        stream=True,
        max_wait_ms=300,
    )
    assert door.contexts.open_contexts == 0


def test_sdk_default_context_and_one_shot() -> None:
    """The SDK's defaults (voice id alone, f32 at 44.1 kHz) and a one-shot push are spoken."""
    door = Door()
    ctx = sdk_connection(door).context()
    ctx.send(transcript="Hello.", voice=VOICE, continue_=False)
    events: list[Any] = list(ctx.receive())
    assert [e.type for e in events] == ["chunk", "done"]
    (speak,) = door.actions
    assert isinstance(speak, Speak) and speak.format == fmt("pcm_f32le_44100") and not speak.stream


def test_sdk_cancel() -> None:
    """The SDK's cancel cancels the context's utterance and expects nothing back."""
    door = Door()
    ctx = sdk_connection(door).context(voice=VOICE, model_id="sonic-3")
    ctx.push("Hello ")
    ctx.cancel()
    assert isinstance(door.actions[-1], Cancel)
    assert len(door.out) == 1  # the first chunk only


def test_sdk_sees_an_error_as_the_end_of_its_context() -> None:
    """A refused context's error ends the SDK's receive, with its message."""
    door = Door()
    ctx = sdk_connection(door).context(
        model_id="sonic-3",
        output_format={"container": "raw", "encoding": "pcm_mulaw", "sample_rate": 16000},
    )
    ctx.push("Hello.", voice=VOICE)
    events: list[Any] = list(ctx.receive())
    (event,) = events
    assert event.type == "error" and event.context_id == ctx._context_id
    assert "8000" in event.message and event.status_code == 400


def test_sdk_v2_compatible_send() -> None:
    """The SDK's v2-style ``websocket().send(stream=False)`` gathers the audio and words."""
    client = Cartesia(api_key="key", base_url="http://cartesia.test")
    door = Door()
    legacy = client.tts.websocket()
    legacy._connection = sdk_connection(door)
    output: Any = legacy.send(
        model_id="sonic-3",
        transcript="Hello there.",
        output_format=RAW,
        voice={"mode": "id", "id": VOICE},
        add_timestamps=True,
        stream=False,
    )
    assert output.audio == b"Hello there."
    assert output.word_timestamps == {
        "words": ["Hello", "there."],
        "start": [0.0, 0.1],
        "end": [0.09, 0.19],
    }
    client.close()


# The SDK's HTTP client, over an in-memory transport


def sdk_client(handler: Callable[[httpx.Request], httpx.Response]) -> Cartesia:
    return Cartesia(
        api_key="key",
        base_url="http://cartesia.test",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        _strict_response_validation=True,
        max_retries=0,
    )


def test_sdk_sse() -> None:
    """The SDK's generate_sse reads our events, each validated against its model."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        speak = parse_http_request(
            request.content, max_text_length=100, make_id=lambda: "made", timestamps=True
        )
        body = (
            sse_event("chunk", encode_chunk(speak.id if speak.id_given else None, b"abc"))
            + sse_event("timestamps", encode_timestamps(None, WORDS))
            + sse_event("done", encode_done(None))
        )
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with sdk_client(handler) as client:
        events: list[Any] = list(
            client.tts.generate_sse(
                model_id="sonic-3",
                transcript="Hello world.",
                voice={"id": VOICE},
                output_format={"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000},
                add_timestamps=True,
                context_id="sse-1",
            )
        )
    assert [e.type for e in events] == ["chunk", "timestamps", "done"]
    assert events[0].audio == b"abc" and events[0].context_id == "sse-1"
    assert events[1].word_timestamps.words == ["Hello", "world"]
    (request,) = seen
    assert request.url.path == "/tts/sse"
    assert request.headers["authorization"] == "Bearer key"
    assert request.headers["cartesia-version"] == "2026-08-14"


def test_sse_error_event() -> None:
    """An error mid-stream is the SDK's SSE error event, with the fields it requires."""
    body = sse_event(
        "error", encode_error(UpstreamTimeout("late"), context_id=None, request_id="r-1")
    )
    (event,) = list(SSEDecoder().iter_bytes(iter([body])))
    assert event.event == "error"
    parsed: Any = validate_type(type_=TTSSSEEvent, value=event.json())  # type: ignore[arg-type]
    assert (parsed.type, parsed.status_code, parsed.request_id) == ("error", 504, "r-1")


def test_sdk_bytes_and_its_errors() -> None:
    """The SDK's generate posts a body we parse and reads the audio; our HTTP error is its
    BadRequestError with our message."""
    refuse = False

    def handler(request: httpx.Request) -> httpx.Response:
        try:
            speak = parse_http_request(request.content, max_text_length=100, make_id=lambda: "m")
            if refuse:
                raise TextTooLong("transcript has too many characters")
        except ClientError as exc:
            return httpx.Response(status_code(exc), content=encode_http_error(exc, request_id="r"))
        assert speak.format == fmt("wav_44100") and speak.rate == "-25%"
        return httpx.Response(200, content=b"RIFF....")

    with sdk_client(handler) as client:
        response = client.tts.generate(
            model_id="sonic-3",
            transcript="Hello.",
            voice=VOICE,
            output_format={"container": "wav", "encoding": "pcm_s16le", "sample_rate": 44100},
            speed="slow",
        )
        assert response.read() == b"RIFF...."
        refuse = True
        with pytest.raises(BadRequestError) as refused:
            client.tts.generate(
                model_id="sonic-3", transcript="Hello.", voice=VOICE, output_format=RAW
            )
    assert refused.value.status_code == 400
    assert refused.value.body == {
        "error_code": "text_too_long",
        "title": "Text too long",
        "message": "transcript has too many characters",
        "request_id": "r",
    }


VOICES = [
    Voice(name=f"en-US-Voice{n:02}Neural", locale="en-US", gender="Female", engine="edge")
    for n in range(23)
] + [
    Voice(name="fr-FR-HenriNeural", locale="fr-FR", gender="Male", engine="edge"),
    Voice(name="en-us", locale="en-US", gender="Neutral", engine="espeak"),
]


def voices_client(voices: list[Voice]) -> tuple[Cartesia, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        assert request.url.path == "/voices"
        return httpx.Response(200, content=encode_voices(voices, dict(request.url.params)))

    return sdk_client(handler), seen


def test_sdk_lists_every_voice_page_by_page() -> None:
    """The SDK's voices.list() pages through every voice (validated) and stops."""
    client, seen = voices_client(VOICES)
    with client:
        listed = list(client.voices.list(limit=10))
    assert [v.id for v in listed] == [v.name for v in VOICES]
    assert len(seen) == 4  # three pages and the empty one that ends the iteration
    henri = listed[23]
    assert isinstance(henri, CartesiaVoice)
    assert (henri.name, henri.language, henri.gender) == ("fr-FR-HenriNeural", "fr", "masculine")
    assert henri.locales[0].locale == "fr-FR"


def test_voice_filters_and_cursor_backwards() -> None:
    """gender, q, language and ending_before select the page the SDK asks for."""
    client, _ = voices_client(VOICES)
    with client:
        assert [v.id for v in client.voices.list(gender="masculine")] == ["fr-FR-HenriNeural"]
        assert [v.id for v in client.voices.list(q="espeak")] == ["en-us"]
        assert [v.id for v in client.voices.list(is_owner=True)] == []
        page = client.voices.list(limit=2, ending_before="en-US-Voice05Neural")
        assert [v.id for v in page.data] == ["en-US-Voice03Neural", "en-US-Voice04Neural"]
    page_body = orjson.loads(encode_voices(VOICES, {"language": "fr"}))
    assert [v["id"] for v in page_body["data"]] == ["fr-FR-HenriNeural"]
    assert page_body["has_more"] is False and page_body["next_page"] is None


def test_voice_page_limits() -> None:
    """limit runs from 1 to MAX_VOICE_PAGE; has_more and next_page say what is left."""
    first = orjson.loads(encode_voices(VOICES, {"limit": "1"}))
    assert len(first["data"]) == 1 and first["has_more"] and first["next_page"] == VOICES[0].name
    most = orjson.loads(encode_voices(VOICES * 5, {"limit": str(MAX_VOICE_PAGE)}))
    assert len(most["data"]) == MAX_VOICE_PAGE
    for bad in ("0", str(MAX_VOICE_PAGE + 1), "ten", "١٠"):
        with pytest.raises(InvalidParameter):
            encode_voices(VOICES, {"limit": bad})
    gone = orjson.loads(encode_voices(VOICES, {"starting_after": "no-such-voice"}))
    assert gone == {"data": [], "has_more": False, "next_page": None}


# Pipecat


class PipecatSocket:
    """Pipecat's websocket, in memory: what it sends goes to the door; what it iterates
    is what the door sent."""

    def __init__(self, door: Door) -> None:
        self.door = door

    async def send(self, data: str) -> None:
        self.door.client_sends(data)

    async def _frames(self) -> AsyncIterator[bytes]:
        while self.door.out:
            yield self.door.out.popleft()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._frames()


def pipecat_service(
    door: Door, calls: list[tuple[str, Any]]
) -> tuple[CartesiaTTSService, PipecatSocket]:
    service = CartesiaTTSService(api_key="key", settings=CartesiaTTSService.Settings(voice=VOICE))
    service._output_sample_rate = 16000
    socket = PipecatSocket(door)
    service._websocket = socket
    open_contexts = {"turn-1"}

    def record(name: str) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> None:
            calls.append((name, args or tuple(kwargs.values())))
            if name == "remove_audio_context":
                open_contexts.discard(args[0])

        return call

    service.audio_context_available = lambda context_id: context_id in open_contexts  # type: ignore[method-assign]
    for name in (
        "append_to_audio_context",
        "add_word_timestamps",
        "remove_audio_context",
        "push_error",
        "push_frame",
        "stop_ttfb_metrics",
        "stop_all_metrics",
    ):
        setattr(service, name, record(name))
    service.reset_active_audio_context = lambda: calls.append(("reset", ()))  # type: ignore[method-assign]
    return service, socket


async def test_pipecat_turn() -> None:
    """Pipecat's sentences and its flush at the end of the turn: it gets the audio, the
    words and the end of its context from our messages."""
    door = Door()
    calls: list[tuple[str, Any]] = []
    service, socket = pipecat_service(door, calls)
    for sentence in ("Hello there. ", "How are you?"):
        await socket.send(service._build_msg(text=sentence, context_id="turn-1"))
    await service.flush_audio(context_id="turn-1")
    await service._process_messages()  # type: ignore[no-untyped-call]

    speak = door.actions[0]
    assert isinstance(speak, Speak) and speak.format == fmt("pcm_16000") and speak.words == "batch"
    assert [type(a) for a in door.actions] == [Speak, Flush, Append, Flush, Finish]
    audio = b"".join(
        args[1].audio
        for name, args in calls
        if name == "append_to_audio_context" and hasattr(args[1], "audio")
    )
    assert audio == b"Hello there. How are you?"
    words = [w for name, args in calls if name == "add_word_timestamps" for w, _ in args[0]]
    assert words == ["Hello", "there.", "How", "are", "you?"]
    assert ("remove_audio_context", ("turn-1",)) in calls
    assert not any(name == "push_error" for name, _ in calls)


async def test_pipecat_reads_an_error() -> None:
    """Our error is read by Pipecat as an error of its context (it reads every field it needs)."""
    door = Door()
    calls: list[tuple[str, Any]] = []
    service, socket = pipecat_service(door, calls)
    service._output_encoding = "pcm_alaw"  # at 16 kHz: no equivalent here
    await socket.send(service._build_msg(text="Hello.", context_id="turn-1"))
    await service._process_messages()  # type: ignore[no-untyped-call]
    (error,) = [args for name, args in calls if name == "push_error"]
    assert "unsupported_format" in error[0] and "8000 Hz" in error[0]
    assert any(name == "push_frame" for name, _ in calls)


async def test_pipecat_cancel() -> None:
    """Pipecat's interruption (its cancel message) cancels the context."""
    door = Door()
    service, socket = pipecat_service(door, [])
    await socket.send(service._build_msg(text="Hello there. ", context_id="turn-1"))
    # What on_audio_context_interrupted sends.
    await socket.send(json.dumps({"context_id": "turn-1", "cancel": True}))
    assert door.actions[-1] == Cancel("turn-1")


@dataclass
class HTTPSession:
    """An aiohttp session, in memory: a POST is parsed as our HTTP door will."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def post(self, url: str, **kwargs: Any) -> AsyncIterator[Any]:
        self.requests.append({"url": url, **kwargs})
        speak = parse_http_request(
            orjson.dumps(kwargs["json"]), max_text_length=100, make_id=lambda: "m"
        )
        yield _HTTPResponse(speak.text.encode())


@dataclass
class _HTTPResponse:
    audio: bytes
    status: int = 200

    async def read(self) -> bytes:
        return self.audio

    def raise_for_status(self) -> None:
        pass

    @property
    def content(self) -> Any:
        audio = self.audio

        class Content:
            async def iter_chunks(self) -> AsyncIterator[tuple[bytes, bool]]:
                yield audio, True

        return Content()


async def test_pipecat_http() -> None:
    """Pipecat's CartesiaHttpTTSService body parses, with its headers and path."""
    session = HTTPSession()
    service = CartesiaHttpTTSService(
        api_key="key",
        settings=CartesiaHttpTTSService.Settings(voice=VOICE),
        aiohttp_session=session,  # type: ignore[arg-type]
    )
    service._output_sample_rate = 8000
    service._output_encoding = "pcm_mulaw"
    frames = [f async for f in service.run_tts("Hello.", "ctx")]
    assert [getattr(f, "audio", None) for f in frames] == [b"Hello."]
    (request,) = session.requests
    assert request["url"] == "https://api.cartesia.ai/tts/bytes"
    assert request["headers"]["X-API-Key"] == "key"
    assert request["headers"]["Cartesia-Version"] == "2026-03-01"


# LiveKit


class LiveKitSocket:
    """LiveKit's aiohttp websocket, in memory, in front of the door."""

    def __init__(self, door: Door) -> None:
        self.door = door
        self.sent: list[dict[str, Any]] = []
        self.waiting: asyncio.Queue[bytes] = asyncio.Queue()

    async def send_str(self, data: str) -> None:
        self.sent.append(json.loads(data))
        self.door.client_sends(data)
        while self.door.out:
            self.waiting.put_nowait(self.door.out.popleft())

    async def receive(self, timeout: float | None = None) -> aiohttp.WSMessage:
        data = await asyncio.wait_for(self.waiting.get(), timeout)
        return aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, data.decode(), None)


class LiveKitPool:
    last_acquire_time = 0.0
    last_connection_reused = False

    def __init__(self, socket: LiveKitSocket) -> None:
        self.socket = socket

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float) -> AsyncIterator[LiveKitSocket]:
        yield self.socket

    async def aclose(self) -> None:
        pass


@contextlib.asynccontextmanager
async def livekit(door: Door, **options: Any) -> AsyncIterator[tuple[Any, LiveKitSocket]]:
    tts = livekit_cartesia.TTS(api_key="key", voice=VOICE, http_session=object(), **options)  # type: ignore[arg-type]
    socket = LiveKitSocket(door)
    tts._pool = LiveKitPool(socket)  # type: ignore[assignment]
    try:
        yield tts, socket
    finally:
        await tts.aclose()


async def test_livekit_stream() -> None:
    """LiveKit's stream: sentences, then its end; it gets the audio and the timed words."""
    door = Door()
    async with livekit(door) as (tts, socket):
        stream = tts.stream()
        stream.push_text("Hello there. How are you today?")
        stream.end_input()
        events = [event async for event in stream]
        await stream.aclose()
    assert socket.sent[-1]["transcript"] == " " and socket.sent[-1]["continue"] is False
    (speak, *_) = door.actions
    assert isinstance(speak, Speak) and speak.format == fmt("pcm_24000") and speak.words == "batch"
    assert isinstance(door.actions[-1], Finish)
    audio = b"".join(bytes(e.frame.data) for e in events)
    assert audio.startswith(b"Hello there.")
    assert door.contexts.open_contexts == 0


async def test_livekit_empty_turn() -> None:
    """LiveKit's turn without text (a blank end of a new context) ends at once, without error."""
    door = Door()
    async with livekit(door) as (tts, socket):
        stream = tts.stream()
        stream.end_input()
        events = [event async for event in stream]
        await stream.aclose()
    assert [m["transcript"] for m in socket.sent] == [" "]
    assert [type(a) for a in door.actions] == [Reply] and events == []


async def test_livekit_chunked() -> None:
    """LiveKit's synthesize() posts a /tts/bytes body we parse (language null, no timestamps)."""
    session = HTTPSession()
    tts = livekit_cartesia.TTS(api_key="key", voice=VOICE, http_session=session, language=None)  # type: ignore[arg-type]
    try:
        events = [event async for event in tts.synthesize("Hello.")]
    finally:
        await tts.aclose()
    assert b"".join(bytes(e.frame.data) for e in events).startswith(b"Hel")
    (request,) = session.requests
    assert request["url"] == "https://api.cartesia.ai/tts/bytes"
    assert request["json"]["language"] is None
    assert request["headers"]["Cartesia-Version"] == "2025-04-16"


def test_clients_headers_and_urls() -> None:
    """Where each client connects and how it says its key and version (for the door)."""
    tts = livekit_cartesia.TTS(api_key="key", voice=VOICE, http_session=object())  # type: ignore[arg-type]
    assert tts._opts.get_ws_url("/tts/websocket?cartesia_version=2025-04-16").startswith(
        "wss://api.cartesia.ai/tts/websocket?cartesia_version="
    )
    # The SDK makes the WebSocket's URL wss:// whatever base_url says: a server without
    # TLS is reached by giving websocket_base_url too.
    client = Cartesia(api_key="key", base_url="http://localhost:8080")
    assert str(client.tts.websocket_connect()._prepare_url()).startswith("wss://localhost:8080/")
    client.close()
    client = Cartesia(
        api_key="key", base_url="http://localhost:8080", websocket_base_url="ws://localhost:8080"
    )
    assert str(client.tts.websocket_connect()._prepare_url()) == "ws://localhost:8080/tts/websocket"
    assert client.auth_headers == {"Authorization": "Bearer key"}
    assert client.default_headers["cartesia-version"] == "2026-08-14"
    client.close()


def _iter(items: list[bytes]) -> Iterator[bytes]:
    yield from items


def test_sse_framing() -> None:
    """Our SSE framing is read back by the SDK's decoder, event by event, even split anywhere."""
    body = sse_event("chunk", encode_chunk(None, b"\x00" * 10)) + sse_event(
        "done", encode_done(None)
    )
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    events: list[Any] = list(SSEDecoder().iter_bytes(_iter(pieces)))
    assert [e.event for e in events] == ["chunk", "done"]
    assert base64.b64decode(events[0].json()["data"]) == b"\x00" * 10
    assert "context_id" not in events[0].json()


def test_timestamps_write_each_word_as_the_transcript_has_it() -> None:
    """Given the transcript, each word goes out with the punctuation that stands
    against it (Cartesia echoes the transcript's words; LiveKit aligns them), never
    taking in a neighbouring word; without it, or out of its range, as spoken."""
    text = '"Well, (hi) there!" said he.Then'
    words = [
        WordEvent(text="Well", offset_ms=0, duration_ms=100, char_start=1, char_end=5),
        WordEvent(text="hi", offset_ms=100, duration_ms=100, char_start=8, char_end=10),
        WordEvent(text="there", offset_ms=200, duration_ms=100, char_start=12, char_end=17),
        WordEvent(text="he", offset_ms=300, duration_ms=100, char_start=25, char_end=27),
        WordEvent(text="Then", offset_ms=400, duration_ms=100, char_start=28, char_end=32),
        WordEvent(text="gone", offset_ms=500, duration_ms=100, char_start=40, char_end=44),
    ]
    sent = orjson.loads(encode_timestamps("c", words, text))["word_timestamps"]["words"]
    assert sent == ['"Well,', "(hi)", 'there!"', "he.", "Then", "gone"]
    assert orjson.loads(encode_timestamps("c", words))["word_timestamps"]["words"] == [
        "Well",
        "hi",
        "there",
        "he",
        "Then",
        "gone",
    ]
