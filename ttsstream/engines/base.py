"""The interface every speech engine implements, and the events it produces.

An engine turns a :class:`SynthesisRequest` into an async generator of
:class:`AudioChunk` and :class:`WordEvent`, in the order the client must receive
them. Closing the generator (``aclose()``, or cancelling the task that reads it)
must release the engine's upstream resources at once.

This module does no I/O; engines live in their own modules (:mod:`ttsstream.engines.edge`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "AudioChunk",
    "AudioFormat",
    "Engine",
    "SynthesisEvent",
    "SynthesisRequest",
    "Voice",
    "WordEvent",
    "word_fields",
]


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """The encoding of an engine's audio stream."""

    mime_type: str
    sample_rate: int
    bitrate_bps: int
    #: The short name clients ask for it by (:mod:`ttsstream.audio.formats`).
    name: str = "mp3"

    def duration_ms(self, byte_count: int) -> float:
        """Return the playing time of ``byte_count`` bytes of this constant-bitrate stream."""
        return byte_count * 8 * 1000 / self.bitrate_bps


# What Edge's "audio-24khz-48kbitrate-mono-mp3" output is; other engines encode to it too,
# so clients see one format.
MP3_24KHZ_48KBPS = AudioFormat(mime_type="audio/mpeg", sample_rate=24_000, bitrate_bps=48_000)


@dataclass(frozen=True, slots=True)
class SynthesisRequest:
    """One utterance to synthesize, already validated."""

    text: str
    voice: str
    rate: str = "+0%"
    volume: str = "+0%"
    pitch: str = "+0Hz"
    #: Who asks (the client's IP; the tenant once there are tenants), for the fair
    #: share of the upstream's slots. Not part of what is said: not compared, and no
    #: engine reads it.
    client: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A piece of the encoded audio stream, forwarded as it arrived.

    A ``memoryview`` when it is a slice of a stored entry, so replay copies nothing.
    An engine that makes PCM before encoding it (the offline voice) also gives
    that PCM, so that other formats are made from it rather than from a decode of
    ``data``: 16-bit mono samples at ``pcm_rate``, on the same timeline as the
    MP3 (the encoder's delay as leading silence). Then ``data`` may be empty
    while the encoder holds its output back.
    """

    data: bytes | memoryview
    pcm: bytes | None = None
    pcm_rate: int = 0


@dataclass(frozen=True, slots=True)
class WordEvent:
    """When one word is spoken, and where it is in the text the client sent.

    Times are milliseconds from the start of the utterance's audio. ``char_start``
    and ``char_end`` index the original text in Unicode code points (Python ``str``
    indices), or are ``None`` when the word could not be located in it. Times are
    rounded to the microsecond when the event is made, once, instead of on every
    replay.
    """

    text: str
    offset_ms: float
    duration_ms: float
    char_start: int | None
    char_end: int | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset_ms", round(self.offset_ms, 3))
        object.__setattr__(self, "duration_ms", round(self.duration_ms, 3))


def word_fields(word: WordEvent) -> dict[str, Any]:
    """A word event's fields as both doors send them (a dict: orjson encodes one faster
    than a slotted dataclass)."""
    return {
        "text": word.text,
        "offset_ms": word.offset_ms,
        "duration_ms": word.duration_ms,
        "char_start": word.char_start,
        "char_end": word.char_end,
    }


SynthesisEvent = AudioChunk | WordEvent


@dataclass(frozen=True, slots=True)
class Voice:
    """One voice an engine offers."""

    name: str
    locale: str
    gender: str
    engine: str


class Engine(Protocol):
    """A speech engine: Edge's online voices, an offline voice, or a test double."""

    #: Short engine name sent to clients (``"edge"``).
    name: str
    #: The format of every :class:`AudioChunk` this engine yields.
    audio_format: AudioFormat

    def synthesize(self, request: SynthesisRequest) -> AsyncGenerator[SynthesisEvent, None]:
        """Stream the audio and word events of one utterance.

        Raises:
            UpstreamError: The engine could not produce (all of) the audio.
            InvalidVoice: The engine does not know ``request.voice``.
        """
        ...

    async def voices(self) -> list[Voice]:
        """Return the voices this engine offers.

        Raises:
            UpstreamError: The list could not be fetched.
        """
        ...

    async def check_voice(self, voice: str) -> None:
        """Refuse a voice that is known not to exist, without contacting the upstream.

        Raises:
            InvalidVoice: ``voice`` is not one of this engine's voices.
        """
        ...

    async def aclose(self) -> None:
        """Release what the engine keeps open between utterances; once, at shutdown."""
        ...
