"""The fields of a speech request, checked the same way whichever door they came through.

Pure functions over decoded JSON values (no I/O): each returns the value, or
``None`` when it is absent, or raises the protocol's error, with the name of the
field as the error's ``param``. A field sent as JSON ``null`` is absent, on every
door: each door reads its fields through :func:`without_nulls` first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypedDict, TypeVar

from ttsstream.audio.formats import FORMAT_CHOICES, MP3, Format, format_named
from ttsstream.core.cleanup import CLEANUP_MODES
from ttsstream.exceptions import (
    BadMessage,
    ClientError,
    EmptyText,
    InvalidParameter,
    InvalidVoice,
    TextTooLong,
)

__all__ = [
    "MAX_VOICE_LENGTH",
    "WORD_MODES",
    "Prosody",
    "cleanup_field",
    "format_field",
    "prosody_field",
    "prosody_fields",
    "text_field",
    "voice_field",
    "without_nulls",
]

#: How a request wants its word boundaries: one event each (as they come),
#: batched (just before the audio they describe), or none.
WORD_MODES = ("each", "batch", "none")

# Limits
#: Longest voice name accepted, in characters.
MAX_VOICE_LENGTH = 128
#: Most digits in a rate, volume or pitch value ("+100%" has three).
_MAX_PROSODY_DIGITS = 4

# ASCII digits only: \d would also admit digits of other scripts that the upstream refuses.
_PERCENT = re.compile(rf"[+-][0-9]{{1,{_MAX_PROSODY_DIGITS}}}%", re.ASCII)
_HERTZ = re.compile(rf"[+-][0-9]{{1,{_MAX_PROSODY_DIGITS}}}Hz", re.ASCII)
_PROSODY_FORMS = {
    "rate": (_PERCENT, '"+0%" (sign, digits, %)'),
    "volume": (_PERCENT, '"+0%" (sign, digits, %)'),
    "pitch": (_HERTZ, '"+0Hz" (sign, digits, Hz)'),
}

E = TypeVar("E", bound=ClientError)


def _about(field: str, exc: E) -> E:
    exc.param = field
    return exc


def without_nulls(fields: Mapping[str, object]) -> dict[str, object]:
    """``fields`` without those whose value is JSON ``null``: a ``null`` is the field left
    out (clients send ``"speed": null`` for "the default")."""
    return {name: value for name, value in fields.items() if value is not None}


def text_field(value: object, *, max_length: int, field: str = "text") -> str:
    """A text to speak: a string of at most ``max_length`` characters, with something to say."""
    if not isinstance(value, str):
        raise _about(field, BadMessage(f'a string field "{field}" is required'))
    if len(value) > max_length:
        raise _about(
            field, TextTooLong(f"{field} has {len(value)} characters; the limit is {max_length}")
        )
    if not any(char.isprintable() and not char.isspace() for char in value):
        raise _about(field, EmptyText(f"{field} has nothing to speak"))
    return value


def voice_field(value: object, *, field: str = "voice") -> str | None:
    """A voice name in a well-formed shape (whether it exists is the engines' to say);
    ``None`` (the default voice) when absent or empty. Spaces around it are dropped:
    clients that split a list on commas send ``" echo"``. The same on every door."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _about(field, BadMessage(f'"{field}" must be a string'))
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_VOICE_LENGTH or not value.isprintable():
        raise _about(field, InvalidVoice("voice name is malformed"))
    return value


def prosody_field(field: str, value: object) -> str | None:
    """A ``rate``, ``volume`` (``"+0%"``) or ``pitch`` (``"+0Hz"``)."""
    if value is None:
        return None
    pattern, form = _PROSODY_FORMS[field]
    if not isinstance(value, str):
        raise _about(field, BadMessage(f'"{field}" must be a string'))
    if pattern.fullmatch(value) is None:
        raise _about(field, InvalidParameter(f'"{field}" must look like {form}'))
    return value


class Prosody(TypedDict, total=False):
    """The prosody fields a request gave (those it left out keep their defaults)."""

    rate: str
    volume: str
    pitch: str


def prosody_fields(fields: Mapping[str, object]) -> Prosody:
    """The ``rate``, ``volume`` and ``pitch`` of ``fields`` that are there, checked."""
    prosody = Prosody()
    if (rate := prosody_field("rate", fields.get("rate"))) is not None:
        prosody["rate"] = rate
    if (volume := prosody_field("volume", fields.get("volume"))) is not None:
        prosody["volume"] = volume
    if (pitch := prosody_field("pitch", fields.get("pitch"))) is not None:
        prosody["pitch"] = pitch
    return prosody


def format_field(
    value: object, *, field: str = "format", unknown: type[ClientError] = InvalidParameter
) -> Format:
    """An audio format's short name (:func:`~ttsstream.audio.formats.format_named`: a base
    name, or a family's such as ``pcm_16000``); mp3 if absent.

    ``unknown`` is the error for a string that names no format: the WebSocket's
    ``invalid_parameter``, HTTP's ``unsupported_format``.
    """
    if value is None:
        return MP3
    if not isinstance(value, str):
        raise _about(field, BadMessage(f'"{field}" must be a string'))
    found = format_named(value)
    if found is None:
        raise _about(field, unknown(f'"{field}" must be one of {FORMAT_CHOICES}'))
    return found


def cleanup_field(value: object, *, field: str = "cleanup") -> str | None:
    """How a text is cleaned before it is spoken: ``"markdown"`` or ``"none"``
    (:mod:`ttsstream.core.cleanup`); ``None`` when absent (the server's ``TEXT_CLEANUP``)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in CLEANUP_MODES:
        raise _about(field, InvalidParameter(f'"{field}" must be "markdown" or "none"'))
    return value
