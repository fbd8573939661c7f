"""OpenAI's text-to-speech contract, read into a speech request (pure; no I/O).

``POST /v1/audio/speech`` takes ``model``, ``input``, ``voice``, ``speed``,
``instructions`` (accepted, not used: Edge's voices take no instructions),
``response_format`` (every format of :mod:`ttsstream.audio.formats`: OpenAI's
six and ``webm``) and ``stream_format``; ttsstream adds ``timestamps`` (word
events in the SSE stream). OpenAI's voice names map to Edge voices by
:data:`DEFAULT_VOICES`, which ``VOICE_MAP`` overrides name by name; any Edge or
``espeak:`` voice may also be named directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ttsstream.audio.formats import Format
from ttsstream.core.fields import format_field, text_field, voice_field
from ttsstream.exceptions import BadMessage, ClientError, InvalidParameter, UnsupportedFormat

__all__ = ["DEFAULT_VOICES", "MODELS", "SpeechCall", "read_speech_call", "voice_table"]

#: The model names accepted (they all mean the same here: Edge's neural voices).
MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")

#: OpenAI's voices and the Edge voices they are spoken with, by default.
DEFAULT_VOICES: dict[str, str] = {
    "alloy": "en-US-AvaNeural",
    "ash": "en-US-AndrewNeural",
    "ballad": "en-GB-RyanNeural",
    "coral": "en-US-EmmaNeural",
    "echo": "en-US-BrianNeural",
    "fable": "en-GB-SoniaNeural",
    "onyx": "en-US-ChristopherNeural",
    "nova": "en-US-JennyNeural",
    "sage": "en-US-AriaNeural",
    "shimmer": "en-US-MichelleNeural",
    "verse": "en-US-GuyNeural",
    "marin": "en-US-AvaMultilingualNeural",
    "cedar": "en-US-AndrewMultilingualNeural",
}

_STREAM_FORMATS = ("audio", "sse")
_SPEED_MIN, _SPEED_MAX = 0.25, 4.0


@dataclass(frozen=True, slots=True)
class SpeechCall:
    """A valid ``/v1/audio/speech`` request, as a speech request."""

    text: str
    voice: str
    rate: str
    sse: bool
    timestamps: bool
    format: Format


def voice_table(overrides: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """OpenAI's voice names and what they are spoken with: the defaults, then ``VOICE_MAP``."""
    return {**DEFAULT_VOICES, **dict(overrides)}


def read_speech_call(
    body: Mapping[str, Any], *, voices: Mapping[str, str], max_text_length: int
) -> SpeechCall:
    """Check a decoded request body against OpenAI's contract.

    Raises:
        RequestError: A field is missing or out of its range; ``param`` names it.
    """
    model = body.get("model")
    if not isinstance(model, str) or model not in MODELS:
        raise _about("model", InvalidParameter('"model" must be one of ' + ", ".join(MODELS)))
    text = text_field(body.get("input"), max_length=max_text_length, field="input")

    voice = body.get("voice")
    if isinstance(voice, dict):
        voice = voice.get("id")
    if voice is None:
        raise _about("voice", BadMessage('a field "voice" is required'))
    name = voice_field(voice)
    assert name is not None
    name = voices.get(name.lower(), name)

    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float):
        raise _about("speed", BadMessage('"speed" must be a number'))
    if not _SPEED_MIN <= speed <= _SPEED_MAX:
        raise _about(
            "speed", InvalidParameter(f'"speed" must be from {_SPEED_MIN} to {_SPEED_MAX}')
        )
    if not isinstance(body.get("instructions", ""), str):
        raise _about("instructions", BadMessage('"instructions" must be a string'))

    audio_format = format_field(
        body.get("response_format"), field="response_format", unknown=UnsupportedFormat
    )
    stream_format = body.get("stream_format", "audio")
    if stream_format not in _STREAM_FORMATS:
        raise _about("stream_format", InvalidParameter('"stream_format" must be audio or sse'))
    timestamps = body.get("timestamps", False)
    if not isinstance(timestamps, bool):
        raise _about("timestamps", BadMessage('"timestamps" must be true or false'))
    return SpeechCall(
        text=text,
        voice=name,
        rate=f"{round((speed - 1) * 100):+d}%",
        sse=stream_format == "sse",
        timestamps=timestamps,
        format=audio_format,
    )


def _about(field: str, exc: ClientError) -> ClientError:
    exc.param = field
    return exc
