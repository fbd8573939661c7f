"""What a WebSocket protocol asks of its connection: the actions every protocol shares.

Each protocol (:mod:`ttsstream.protocols.v1`, :mod:`~ttsstream.protocols.elevenlabs`,
:mod:`~ttsstream.protocols.cartesia`) is a state machine that turns the client's
frames into these actions and the utterances' events into its own frames; the
connection (:mod:`ttsstream.ws.connection`) carries them out. Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ttsstream.audio.formats import MP3, Format

__all__ = [
    "Action",
    "Append",
    "Cancel",
    "ClientMessage",
    "CloseSocket",
    "Finish",
    "Flush",
    "ListVoices",
    "Reply",
    "Resume",
    "ResumeAt",
    "Speak",
]


@dataclass(frozen=True, slots=True)
class Speak:
    """Speak ``text``; ``voice`` is ``None`` for the server's default voice."""

    #: The message's ``type`` on the wire.
    kind: ClassVar[str] = "speak"
    id: str
    text: str
    voice: str | None = None
    rate: str = "+0%"
    volume: str = "+0%"
    pitch: str = "+0Hz"
    #: One of :data:`WORD_MODES`.
    words: str = "each"
    #: What the audio is sent as.
    format: Format = MP3
    #: Whether the client gave the id (else the server made it, and a refusal says ``null``).
    id_given: bool = True
    #: A streaming utterance: ``text`` is its first piece (maybe empty), ``append``s follow.
    stream: bool = False
    #: How its text is cleaned (``markdown``, ``none``); ``None``: the server's TEXT_CLEANUP.
    cleanup: str | None = None
    #: A streaming utterance's shortest segment in characters (a protocol's own
    #: chunking, as ElevenLabs' ``chunk_length_schedule``); ``None``: STREAM_MIN_CHARS.
    min_chars: int | None = None
    #: Most milliseconds its buffered text waits without growing before it is spoken;
    #: ``None``: STREAM_MAX_WAIT_MS.
    max_wait_ms: int | None = None
    #: ``text`` is an SSML document (its spans have their own voices and prosody).
    ssml: bool = False


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel one utterance, or all of the connection's when ``id`` is ``None``."""

    kind: ClassVar[str] = "cancel"
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ListVoices:
    """Ask for the voice list: every voice, or those of ``locale`` (``en``, ``en-US``)."""

    kind: ClassVar[str] = "voices"
    locale: str | None = None


@dataclass(frozen=True, slots=True)
class Append:
    """More text for the open streaming utterance ``id`` (verbatim)."""

    kind: ClassVar[str] = "append"
    id: str
    text: str


@dataclass(frozen=True, slots=True)
class Flush:
    """Speak what the streaming utterance ``id`` has buffered now, even mid-sentence."""

    kind: ClassVar[str] = "flush"
    id: str


@dataclass(frozen=True, slots=True)
class Finish:
    """No more text for the streaming utterance ``id``: speak the rest, then ``end``."""

    kind: ClassVar[str] = "finish"
    id: str


@dataclass(frozen=True, slots=True)
class ResumeAt:
    """Where a client's copy of one utterance stopped."""

    id: str
    #: Audio bytes it received.
    offset: int
    #: JSON messages about it it received (``start``, words, ``end``); ``None``: not
    #: said (then the messages sent at ``offset`` come again).
    frames: int | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """Continue the utterances of a dropped connection (its ``session`` token) here."""

    kind: ClassVar[str] = "resume"
    session: str
    utterances: tuple[ResumeAt, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``data`` to the client as it is (an acknowledgement, a protocol's own message)."""

    kind: ClassVar[str] = "reply"
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseSocket:
    """Close the connection once what is queued has been sent (the client asked)."""

    kind: ClassVar[str] = "close"
    code: int = 1000
    reason: str = ""


#: A message of protocol v1, each one action.
ClientMessage = Speak | Cancel | ListVoices | Append | Flush | Finish | Resume
#: Everything a protocol may ask of its connection.
Action = Speak | Cancel | ListVoices | Append | Flush | Finish | Resume | Reply | CloseSocket
