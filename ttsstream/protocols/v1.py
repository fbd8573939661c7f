"""Protocol v1 on the wire: parse client frames, encode server messages.

This module does no I/O and imports neither asyncio nor websockets: it is tested
by feeding it strings. ``docs/protocol.md`` is its specification.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import orjson

from ttsstream.core.fields import (
    WORD_MODES,
    cleanup_field,
    format_field,
    prosody_fields,
    text_field,
    voice_field,
    without_nulls,
)
from ttsstream.core.voices import in_locale
from ttsstream.engines.base import Voice, WordEvent, word_fields
from ttsstream.exceptions import (
    BadJSON,
    BadMessage,
    ClientError,
    InvalidParameter,
    RateLimited,
    ResumeFailed,
    TextTooLong,
    error_code,
)
from ttsstream.protocols.actions import (
    Append,
    Cancel,
    ClientMessage,
    Finish,
    Flush,
    ListVoices,
    Resume,
    ResumeAt,
    Speak,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_ID_LENGTH",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "WORD_MODES",
    "Append",
    "Cancel",
    "ClientMessage",
    "Finish",
    "Flush",
    "ListVoices",
    "Speak",
    "encode_cancelled",
    "encode_end",
    "encode_error",
    "encode_hello",
    "encode_resumed",
    "encode_start",
    "encode_voices",
    "encode_word",
    "encode_words",
    "parse_client_message",
    "refused_type",
]

PROTOCOL_VERSION = 1

# Limits
#: Largest client frame in bytes; a larger one closes the connection with 1009.
MAX_FRAME_BYTES = 64 * 2**10
#: Utterance ids are client-chosen strings of 1 to this many characters.
MAX_ID_LENGTH = 64


#: The ``type`` of every client message.
MESSAGE_TYPES = tuple(
    message.kind for message in (Speak, Cancel, ListVoices, Append, Flush, Finish, Resume)
)
#: An SSML document may be this many times MAX_TEXT_LENGTH long (its markup), its text
#: content at most MAX_TEXT_LENGTH.
SSML_LENGTH_FACTOR = 8
#: Most utterances one ``resume`` may name.
MAX_RESUMED = 64


def parse_client_message(
    frame: str | bytes,
    *,
    max_text_length: int,
    make_id: Callable[[], str],
) -> ClientMessage:
    """Parse and validate one client frame.

    Args:
        frame: The frame's payload: ``str`` for a text frame, ``bytes`` for binary.
        max_text_length: Most characters a ``speak`` text may have.
        make_id: Returns a fresh utterance id for a ``speak`` without one.

    Returns:
        The validated message.

    Raises:
        RequestError: The frame is not a valid message; the exception's
            ``utterance_id`` is the frame's ``id`` when it had a valid one, and
            its ``message_type`` what the error's ``for`` says (:func:`refused_type`).
    """
    try:
        if not isinstance(frame, str):
            raise BadMessage("binary frames are not accepted: send JSON text frames")
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            raise BadJSON("frame is not valid JSON") from None
        if not isinstance(message, dict):
            raise BadMessage("message must be a JSON object")
    except ClientError as exc:
        exc.message_type = refused_type(None)
        raise
    message = without_nulls(message)  # a field sent as null is one left out

    kind = message.get("type")
    try:
        utterance_id = _parse_id(message)
    except ClientError as exc:
        exc.message_type = refused_type(kind)
        raise
    try:
        if not isinstance(kind, str):
            raise BadMessage('message needs a string field "type"')
        if kind == "speak":
            speak = _parse_speak(message, utterance_id or make_id(), max_text_length)
            return speak if utterance_id else replace(speak, id_given=False)
        if kind == "cancel":
            return Cancel(id=utterance_id)
        if kind == "voices":
            locale = message.get("locale")
            if locale is not None and not isinstance(locale, str):
                raise BadMessage('"locale" must be a string')
            return ListVoices(locale=locale or None)
        if kind == "resume":
            return _parse_resume(message)
        if kind in ("append", "flush", "finish"):
            if utterance_id is None:
                raise BadMessage(f'"{kind}" needs the "id" of its streaming utterance')
            if kind == "flush":
                return Flush(id=utterance_id)
            if kind == "finish":
                return Finish(id=utterance_id)
            text = message.get("text")
            if not isinstance(text, str):
                raise BadMessage('a string field "text" is required')
            if len(text) > max_text_length:
                raise TextTooLong(
                    f"text has {len(text)} characters; the limit per append is {max_text_length}"
                )
            return Append(id=utterance_id, text=text)
        raise BadMessage(
            "unknown message type (expected speak, cancel, voices, append, flush, finish or resume)"
        )
    except ClientError as exc:
        exc.utterance_id = utterance_id
        exc.message_type = refused_type(kind)
        raise


def _parse_resume(message: dict[str, Any]) -> Resume:
    session = message.get("session")
    if not isinstance(session, str) or not 1 <= len(session) <= 64:
        raise BadMessage('"resume" needs the "session" of the hello it continues')
    listed = message.get("utterances", [])
    if not isinstance(listed, list) or len(listed) > MAX_RESUMED:
        raise BadMessage(f'"utterances" must be a list of at most {MAX_RESUMED}')
    utterances = []
    for item in listed:
        if not isinstance(item, dict):
            raise BadMessage('each of "utterances" is {"id", "offset", "frames"}')
        utterance_id = _parse_id(item)
        offset, frames = item.get("offset", 0), item.get("frames")
        if utterance_id is None or not _count(offset) or not (frames is None or _count(frames)):
            raise BadMessage(
                'each of "utterances" needs its "id", "offset" (audio bytes received) '
                'and may say "frames" (JSON messages received), both integers >= 0'
            )
        utterances.append(ResumeAt(id=utterance_id, offset=offset, frames=frames))
    return Resume(session=session, utterances=tuple(utterances))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def refused_type(kind: object) -> str:
    """What an error's ``for`` says of a refused message: its type, or ``unknown``."""
    return kind if isinstance(kind, str) and kind in MESSAGE_TYPES else "unknown"


def _parse_id(message: dict[str, Any]) -> str | None:
    value = message.get("id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadMessage('"id" must be a string')
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise InvalidParameter(f'"id" must have 1 to {MAX_ID_LENGTH} characters')
    return value


def _parse_speak(message: dict[str, Any], utterance_id: str, max_text_length: int) -> Speak:
    stream = message.get("stream", False)
    if not isinstance(stream, bool):
        raise BadMessage('"stream" must be true or false')
    ssml = message.get("ssml")
    if ssml is not None:
        if not isinstance(ssml, str):
            raise BadMessage('"ssml" must be a string: an SSML document, <speak>…</speak>')
        if stream or "text" in message:
            raise BadMessage('"ssml" is a whole document: not with "text" or "stream"')
        if len(ssml) > SSML_LENGTH_FACTOR * max_text_length:
            raise TextTooLong(
                f"the SSML document has {len(ssml)} characters; the limit is "
                f"{SSML_LENGTH_FACTOR * max_text_length}"
            )
    if ssml is not None:
        text = ssml
    elif stream:  # a first piece, maybe none: the text comes in appends
        text = message.get("text", "")
        if not isinstance(text, str):
            raise BadMessage('"text" must be a string')
        if len(text) > max_text_length:
            raise TextTooLong(f"text has {len(text)} characters; the limit is {max_text_length}")
    else:
        text = text_field(message.get("text"), max_length=max_text_length)
    voice = voice_field(message.get("voice"))
    prosody = prosody_fields(message)

    words = message.get("words", "each")
    if not isinstance(words, str):
        raise BadMessage('"words" must be a string')
    if words not in WORD_MODES:
        raise InvalidParameter('"words" must be one of ' + ", ".join(map(repr, WORD_MODES)))

    audio_format = format_field(message.get("format"))
    return Speak(
        id=utterance_id,
        text=text,
        voice=voice,
        words=words,
        format=audio_format,
        stream=stream,
        cleanup=cleanup_field(message.get("cleanup")),
        ssml=ssml is not None,
        **prosody,
    )


def _encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def encode_hello(
    *,
    server: str,
    default_voice: str,
    max_text_length: int,
    session: str | None = None,
    resume_window: float = 0.0,
) -> bytes:
    """Encode the ``hello`` message sent on connect (with its ``session`` token when a
    dropped connection may be resumed)."""
    hello: dict[str, Any] = {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "server": server,
        "default_voice": default_voice,
        "max_text_length": max_text_length,
    }
    if session is not None:
        hello["session"] = session
        hello["resume_window"] = resume_window
    return _encode(hello)


def encode_resumed(
    session: str, resumed: Sequence[tuple[str, int, int | None]], lost: Sequence[str]
) -> bytes:
    """Encode the answer to a ``resume``: the session that goes on (its token for the
    next resume), each utterance resumed at its offset (a streaming one with the
    characters of text received: its appends go on from there), those that cannot be."""
    utterances = []
    for uid, offset, received in resumed:
        entry: dict[str, Any] = {"id": uid, "offset": offset}
        if received is not None:
            entry["received"] = received
        utterances.append(entry)
    return _encode(
        {"type": "resumed", "session": session, "utterances": utterances, "lost": list(lost)}
    )


def encode_start(
    utterance_id: str,
    *,
    voice: str,
    engine: str,
    mime_type: str,
    format_name: str,
    sample_rate: int,
    cached: bool,
    fallback_reason: str | None = None,
    stream: bool = False,
) -> bytes:
    """Encode ``start``, sent before an utterance's first audio byte.

    ``fallback_reason`` is the error code that made the offline voice speak instead;
    ``stream`` marks a streaming utterance.
    """
    extra: dict[str, Any] = {"stream": True} if stream else {}
    return _encode(
        {
            "type": "start",
            "id": utterance_id,
            "voice": voice,
            "format": mime_type,
            "format_name": format_name,
            "sample_rate": sample_rate,
            "cached": cached,
            "engine": engine,
            "fallback": fallback_reason is not None,
            "fallback_reason": fallback_reason,
            **extra,
        }
    )


def encode_word(utterance_id: str, word: WordEvent) -> bytes:
    """Encode one word boundary (``"words": "each"``)."""
    return _encode({"type": "word", "id": utterance_id, **word_fields(word)})


def encode_words(utterance_id: str, words: Sequence[WordEvent]) -> bytes:
    """Encode several word boundaries in one message (``"words": "batch"``)."""
    return _encode({"type": "words", "id": utterance_id, "words": list(map(word_fields, words))})


def encode_end(
    utterance_id: str,
    *,
    byte_count: int,
    audio_ms: float,
    words: int,
    cached: bool,
    ttfb_ms: float,
    segments: tuple[int, int] | None = None,
) -> bytes:
    """Encode ``end``, sent once an utterance's audio is complete; a streaming one's has
    ``segments`` (spoken, of them replayed from the cache)."""
    extra: dict[str, Any] = (
        {} if segments is None else {"segments": segments[0], "cached_segments": segments[1]}
    )
    return _encode(
        {
            "type": "end",
            "id": utterance_id,
            "bytes": byte_count,
            "audio_ms": round(audio_ms, 3),
            "words": words,
            "cached": cached,
            "ttfb_ms": round(ttfb_ms, 3),
            **extra,
        }
    )


def encode_cancelled(utterance_id: str) -> bytes:
    """Encode ``cancelled``: no more frames of this utterance follow."""
    return _encode({"type": "cancelled", "id": utterance_id})


def encode_voices(voices: Iterable[Voice], *, locale: str | None = None) -> bytes:
    """Encode the voice list: the voices of ``locale`` (:func:`~ttsstream.core.voices.in_locale`),
    or every voice."""
    return _encode(
        {
            "type": "voices",
            "voices": [
                {
                    "name": voice.name,
                    "locale": voice.locale,
                    "gender": voice.gender,
                    "engine": voice.engine,
                }
                for voice in voices
                if in_locale(voice.locale, locale)
            ],
        }
    )


def encode_error(
    exc: BaseException,
    *,
    utterance_id: str | None,
    partial: bool = False,
    refused: str | None = None,
) -> bytes:
    """Encode the ``error`` message a client receives for ``exc``.

    This is the one place where exceptions become wire errors. Unexpected
    exceptions become ``internal`` with a message that reveals nothing.

    An error either refuses a message (``refused`` is its type, sent as
    ``for``; it ends no utterance) or ends the utterance ``utterance_id``
    (sent with ``partial``).

    Args:
        exc: What went wrong.
        utterance_id: The utterance or message it concerns, if any.
        partial: Some of the utterance's audio was already sent.
        refused: The type of the client message refused (see :func:`refused_type`).
    """
    message = exc.message if isinstance(exc, ClientError) else "internal server error"
    if partial:
        message += "; the audio already sent is partial"
    error: dict[str, Any] = {
        "type": "error",
        "id": utterance_id,
        "code": error_code(exc),
        "message": message,
    }
    if refused is not None:
        error["for"] = refused
    else:
        error["partial"] = partial
    if isinstance(exc, RateLimited):
        error["retry_after"] = exc.retry_after
    if isinstance(exc, ResumeFailed):
        error["reason"] = exc.reason
    return _encode(error)
