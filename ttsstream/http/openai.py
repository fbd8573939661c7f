"""OpenAI's text-to-speech contract, read into a speech request (pure; no I/O).

``POST /v1/audio/speech`` takes ``model``, ``input``, ``voice``, ``speed``,
``instructions`` (accepted, not used: Edge's voices take no instructions),
``response_format`` (every format of :mod:`ttsstream.audio.formats`: OpenAI's
six and ``webm``) and ``stream_format``; ttsstream adds ``timestamps`` (word
events in the SSE stream). OpenAI's voice names map to Edge voices by
:data:`DEFAULT_VOICES`, which ``VOICE_MAP`` overrides name by name; any Edge or
``espeak:`` voice may also be named directly.

The contract is read as its clients use it, not as strictly as OpenAI checks
it: any ``model`` is accepted (Edge has one quality), a ``voice`` left out or
empty is the server's default, its surrounding spaces are dropped, OpenAI's
voice names match in any case, and a JSON ``null`` is a field left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ttsstream.audio.formats import Format
from ttsstream.config import EDGE_VOICE_PATTERN
from ttsstream.core.fields import (
    cleanup_field,
    format_field,
    text_field,
    voice_field,
    without_nulls,
)
from ttsstream.core.voices import in_locale
from ttsstream.engines.base import Voice
from ttsstream.exceptions import BadMessage, ClientError, InvalidParameter, UnsupportedFormat

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_VOICES",
    "MODELS",
    "SpeechCall",
    "model_named",
    "model_object",
    "read_speech_call",
    "voice_listing",
    "voice_table",
]

#: The model names listed (``/v1/models``): OpenAI's. Every name is accepted and they
#: all mean the same here (Edge's neural voices have one quality).
MODELS = (
    "tts-1",
    "tts-1-hd",
    "gpt-4o-mini-tts",
    "tts-1-1106",
    "tts-1-hd-1106",
    "gpt-4o-mini-tts-2025-03-20",
    "gpt-4o-mini-tts-2025-12-15",
)
#: The model of a request that names none.
DEFAULT_MODEL = "tts-1"

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
    #: The voice to speak with (an OpenAI name already mapped); ``None``: the default.
    voice: str | None
    rate: str
    sse: bool
    timestamps: bool
    format: Format
    #: The model named (``DEFAULT_MODEL`` if none): it changes nothing here.
    model: str = DEFAULT_MODEL
    #: ttsstream's own: how ``input`` is cleaned; ``None``: the server's TEXT_CLEANUP.
    cleanup: str | None = None


def voice_table(overrides: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """OpenAI's voice names and what they are spoken with: the defaults, then ``VOICE_MAP``."""
    return {**DEFAULT_VOICES, **dict(overrides)}


def read_speech_call(
    body: Mapping[str, Any], *, voices: Mapping[str, str], max_text_length: int
) -> SpeechCall:
    """Check a decoded request body against OpenAI's contract, as its clients use it.

    Args:
        body: The request's JSON object.
        voices: OpenAI's voice names (lower case) and what they are spoken with.
        max_text_length: Most characters ``input`` may have.

    Raises:
        RequestError: A field is missing or out of its range; ``param`` names it.
    """
    body = without_nulls(body)
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _about("model", BadMessage('"model" must be a string'))
    text = text_field(body.get("input"), max_length=max_text_length, field="input")
    voice = _voice(body.get("voice"), voices)

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
        voice=voice,
        rate=f"{round((speed - 1) * 100):+d}%",
        sse=stream_format == "sse",
        timestamps=timestamps,
        format=audio_format,
        model=model.strip() or DEFAULT_MODEL,
        cleanup=cleanup_field(body.get("cleanup")),
    )


def _voice(value: object, voices: Mapping[str, str]) -> str | None:
    """The voice a ``voice`` field asks for: a name, or ``{"id": name}``; an OpenAI name
    in any case is what it maps to; ``None`` (the default voice) when none is given."""
    if isinstance(value, dict):
        value = value.get("id")
    name = voice_field(value)
    if name is None:
        return None
    return voices.get(name.lower(), name)


def model_named(name: str) -> str | None:
    """The listed model ``name`` is, in any case; ``None`` if it is not one of them."""
    wanted = name.strip().lower()
    return next((model for model in MODELS if model == wanted), None)


def model_object(model: str) -> dict[str, object]:
    """OpenAI's model object for a listed model."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "ttsstream"}


def voice_listing(
    voices: Iterable[Voice], aliases: Mapping[str, str], *, locale: str | None = None
) -> dict[str, list[dict[str, object]]]:
    """The body of ``/v1/audio/voices``: every name ``voice`` accepts, in ``locale`` (by
    :func:`~ttsstream.core.voices.in_locale`).

    Each entry has ``id`` (the string to send as ``voice``) and ``name`` (a label
    for people: ``en-US-AriaNeural (Female, en-US)``, ``alloy → en-US-AvaNeural``),
    with ``locale``, ``gender`` and ``engine``. ``voices`` lists OpenAI's names
    first (each with the ``voice`` it is spoken with, and that voice's locale,
    gender and engine), then every voice; ``aliases`` OpenAI's names alone.

    Args:
        voices: Every voice of the engines.
        aliases: OpenAI's names and the voices they are spoken with.
        locale: Only the voices of this locale (an alias by the voice it maps to).
    """
    listed = list(voices)
    by_name = {voice.name: voice for voice in listed}
    alias_entries = []
    for alias, target in aliases.items():
        voice = by_name.get(target)
        entry: dict[str, object] = {
            "id": alias,
            "name": f"{alias} → {target}",
            "voice": target,
            "locale": voice.locale if voice is not None else _locale_of(target),
            "gender": voice.gender if voice is not None else None,
            "engine": voice.engine if voice is not None else None,
        }
        if in_locale(str(entry["locale"]), locale):
            alias_entries.append(entry)
    voice_entries: list[dict[str, object]] = [
        {
            "id": voice.name,
            "name": f"{voice.name} ({voice.gender}, {voice.locale})",
            "locale": voice.locale,
            "gender": voice.gender,
            "engine": voice.engine,
        }
        for voice in listed
        if in_locale(voice.locale, locale)
    ]
    return {"voices": alias_entries + voice_entries, "aliases": alias_entries}


def _locale_of(voice: str) -> str:
    """The locale an Edge voice's name begins with (``en-US`` of ``en-US-AvaNeural``), for
    a voice missing from the list (the list unavailable); empty when it tells none."""
    if EDGE_VOICE_PATTERN.fullmatch(voice) and not voice.startswith("Microsoft "):
        return "-".join(voice.split("-")[:2])
    return ""


def _about(field: str, exc: ClientError) -> ClientError:
    exc.param = field
    return exc
