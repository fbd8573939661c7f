"""ElevenLabs' text-to-speech API on the wire: its WebSocket protocols and the pure
parts of its HTTP API (parse, validate, encode; no I/O).

Judged by its real clients: the ``elevenlabs`` SDK, Pipecat's ``ElevenLabsTTSService``
(multi-context) and ``ElevenLabsHttpTTSService``, LiveKit's plugin.

**WebSocket.** ``/v1/text-to-speech/{voice_id}/stream-input`` carries one context;
``/multi-stream-input`` several, each named by ``context_id``. A context is one
streaming utterance (:class:`~ttsstream.protocols.actions.Speak` with ``stream=True``
and the context's id):

- A context's first message opens it: ``{"text": " ", "voice_settings": {…},
  "generation_config": {…}, "xi_api_key": …}``. Its text is the protocol's opener
  when blank, else the utterance's first text.
- ``{"text": "Hello "}`` appends (verbatim); ``"flush": true`` then flushes. With
  ``auto_mode=true`` each text is a whole sentence or phrase: one that would touch
  the text before it (``"Sure!"`` then ``"The museum…"``, as Pipecat sends them) is
  set apart by a space, in the speech and in the alignment, as ElevenLabs does.
- ``{"text": ""}`` ends the single context (then the socket closes, as ElevenLabs
  does); on multi it only keeps the context alive. ``try_trigger_generation`` is
  ignored: the SDK sets it on every word, and the segmenter decides.
- ``{"context_id": …, "close_context": true}`` finishes the context: what it has is
  spoken, then ``{"isFinal": true, "contextId": …}``. It cannot mean a cancel:
  Pipecat closes every context so, at the end of a reply as on a barge-in (and
  drops the audio of one it interrupted itself). Contexts speak at the same time,
  as ElevenLabs' do (the door's ``parallel``), so a barge-in's new context is not
  held behind the old one. A context cancelled ends with ``isFinal`` too (Pipecat
  and LiveKit free a context when it comes), as does one that failed.
- ``{"close_socket": true}`` finishes every context, then closes.

Audio goes out as ``{"audio": base64, "isFinal": null, "normalizedAlignment": …,
"alignment": …}`` (``"contextId"`` on multi), then ``{"isFinal": true}``. Alignment
times count from the previous message's (Pipecat's reading, and ElevenLabs'
documentation) unless the client asked ``sync_alignment=true``: then from the
context's start, as LiveKit's plugin (which always asks it) reads them.

**HTTP.** :func:`parse_speech_body` reads ``POST /v1/text-to-speech/{voice_id}``
(``/stream``, ``/with-timestamps``), :func:`encode_with_timestamps` answers the
latter, :func:`encode_voices` is ``GET /v1/voices`` and :func:`encode_voices_page`
``GET /v2/voices``, :func:`encode_http_error`
ElevenLabs' ``{"detail": {…}}``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ttsstream.audio.formats import MP3, Format, format_named
from ttsstream.core.fields import text_field, voice_field, without_nulls
from ttsstream.core.timings import CharacterTimes, CharacterTrack, http_alignment, ws_alignment
from ttsstream.engines.base import Voice, WordEvent
from ttsstream.exceptions import (
    BadJSON,
    BadMessage,
    ClientError,
    InvalidParameter,
    NotFound,
    QueueFull,
    TextTooLong,
    UnsupportedFormat,
    error_code,
)
from ttsstream.protocols.actions import (
    Action,
    Append,
    CloseSocket,
    Finish,
    Flush,
    Speak,
)

__all__ = [
    "DEFAULT_INACTIVITY_TIMEOUT",
    "MAX_CONTEXTS",
    "MAX_INACTIVITY_TIMEOUT",
    "SINGLE_CONTEXT_ID",
    "SPEED_RANGE",
    "SpeechRequest",
    "StreamInput",
    "StreamQuery",
    "encode_http_error",
    "encode_voices",
    "encode_voices_page",
    "encode_with_timestamps",
    "parse_query",
    "parse_speech_body",
    "speed_to_rate",
]

# Limits
#: Contexts a multi-stream connection may have open at once (ElevenLabs' limit).
MAX_CONTEXTS = 5
#: Longest ``context_id``, in characters (an utterance id's limit).
MAX_CONTEXT_ID_LENGTH = 64
#: Seconds a context may go without a message before the door closes it, by default.
DEFAULT_INACTIVITY_TIMEOUT = 20.0
#: The longest ``inactivity_timeout`` a client may ask, seconds.
MAX_INACTIVITY_TIMEOUT = 180.0
#: ``voice_settings.speed`` accepted (ElevenLabs' documented range).
SPEED_RANGE = (0.7, 1.2)
#: ``chunk_length_schedule`` entries accepted, characters (ElevenLabs' range).
CHUNK_LENGTH_RANGE = (50, 500)

#: The id of the one context of ``/stream-input``.
SINGLE_CONTEXT_ID = "0"


def _flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise _about(name, InvalidParameter(f"{name} must be true or false"))


def _about(name: str, exc: ClientError) -> ClientError:
    exc.param = name
    return exc


@dataclass(frozen=True, slots=True)
class StreamQuery:
    """The handshake's query, checked (``model_id`` and the rest are ignored)."""

    format: Format = MP3
    auto_mode: bool = False
    #: Seconds without a message before a context is closed (the door's timer).
    inactivity_timeout: float = DEFAULT_INACTIVITY_TIMEOUT
    sync_alignment: bool = False


def parse_query(query: Mapping[str, str]) -> StreamQuery:
    """Check the query of a stream-input handshake (refuse it with the error raised).

    Raises:
        UnsupportedFormat: ``output_format`` names no format this server makes.
        InvalidParameter: A flag or the timeout has a bad value, or
            ``enable_ssml_parsing=true`` (text is spoken as it is written).
    """
    name = query.get("output_format") or None
    audio_format = MP3 if name is None else format_named(name)
    if audio_format is None:
        raise _about("output_format", UnsupportedFormat(f"Invalid output format: {name}"))
    if _flag(query, "enable_ssml_parsing", False):
        raise _about(
            "enable_ssml_parsing", InvalidParameter("enable_ssml_parsing=true is not supported")
        )
    timeout = DEFAULT_INACTIVITY_TIMEOUT
    if raw := query.get("inactivity_timeout"):
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not 0 < timeout <= MAX_INACTIVITY_TIMEOUT:
            raise _about(
                "inactivity_timeout",
                InvalidParameter(
                    f"inactivity_timeout must be a number of seconds, at most "
                    f"{MAX_INACTIVITY_TIMEOUT:g}"
                ),
            )
    return StreamQuery(
        format=audio_format,
        auto_mode=_flag(query, "auto_mode", False),
        inactivity_timeout=timeout,
        sync_alignment=_flag(query, "sync_alignment", False),
    )


def speed_to_rate(speed: object, *, field: str = "voice_settings.speed") -> str | None:
    """ElevenLabs' ``speed`` (1.0 is normal) as a rate (``"+10%"``); ``None`` when absent."""
    if speed is None:
        return None
    if isinstance(speed, bool) or not isinstance(speed, int | float):
        raise _about(field, BadMessage(f"{field} must be a number"))
    low, high = SPEED_RANGE
    if not low <= speed <= high:
        raise _about(field, InvalidParameter(f"{field} must be between {low} and {high}"))
    percent = round((speed - 1) * 100)
    return f"{percent:+d}%"


def _voice_settings(value: object) -> str | None:
    """The rate ``voice_settings`` asks (stability, similarity and style are ignored)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _about("voice_settings", BadMessage("voice_settings must be an object"))
    return speed_to_rate(value.get("speed"))


def _min_chars(message: Mapping[str, object], auto_mode: bool) -> int | None:
    """The shortest segment ``generation_config.chunk_length_schedule`` asks: its first entry
    (``None``, the server's, in auto mode, which ElevenLabs says disables the schedule)."""
    config = message.get("generation_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _about("generation_config", BadMessage("generation_config must be an object"))
    schedule = config.get("chunk_length_schedule")
    if schedule is None:
        return None
    low, high = CHUNK_LENGTH_RANGE
    if (
        not isinstance(schedule, list)
        or not schedule
        or not all(
            isinstance(n, int | float) and not isinstance(n, bool) and low <= n <= high
            for n in schedule
        )
    ):
        raise _about(
            "generation_config.chunk_length_schedule",
            InvalidParameter(f"chunk_length_schedule must be numbers between {low} and {high}"),
        )
    return None if auto_mode else int(schedule[0])


@dataclass(slots=True)
class _Context:
    """One context: its utterance's id, and its characters handed out with its audio."""

    id: str
    track: CharacterTrack
    #: ``close_context`` (or the end of the single context) was received.
    closed: bool = False
    #: Playing time of the audio sent so far, ms (where the next chunk starts).
    audio_ms: float = 0.0
    #: The text so far is empty or ends in whitespace (a phrase may follow as it is).
    at_word_break: bool = True

    def add_text(self, text: str, *, phrases: bool) -> str:
        """Take the next text; returns it as it joins the text so far.

        Args:
            phrases: Each message is a whole sentence or phrase (``auto_mode``): one that
                meets the text before it with no whitespace on either side is set apart
                by a space, as ElevenLabs speaks and aligns it (Pipecat sends sentences
                without their separating space). Else text is appended verbatim (tokens).
        """
        if phrases and not self.at_word_break and text and not text[0].isspace():
            text = " " + text
        if text:
            self.at_word_break = text[-1].isspace()
            self.track.add_text(text)
        return text


@dataclass(slots=True)
class StreamInput:
    """One stream-input connection's state: frames in, actions and frames out.

    Args:
        voice_id: The path's voice (one of ``GET /v1/voices``' ``voice_id``\\ s).
        query: The handshake's query (:func:`parse_query` checks it here too).
        multi: ``/multi-stream-input`` (else ``/stream-input``).
        max_text_length: Most characters one message's text may have.

    Raises:
        ClientError: The voice or the query is refused: refuse the handshake.
    """

    voice_id: str
    query: Mapping[str, str]
    multi: bool
    max_text_length: int
    #: The checked query.
    options: StreamQuery = field(init=False)
    #: The key of the first message (``xi_api_key``, ``xi-api-key`` or ``authorization``),
    #: for the door to check when the handshake had none; ``None`` until then or if none.
    api_key: str | None = field(init=False, default=None)
    #: Whether a first message was received.
    started: bool = field(init=False, default=False)
    _voice: str | None = field(init=False, default=None)
    _contexts: dict[str, _Context] = field(init=False, default_factory=dict)
    _ended: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if self.max_text_length < 1:
            raise ValueError("max_text_length must be >= 1")
        self.options = parse_query(self.query)
        self._voice = voice_field(self.voice_id, field="voice_id")

    # Client frames

    def receive(self, frame: str | bytes) -> list[Action]:
        """The actions one client frame asks for.

        Raises:
            ClientError: The frame is refused; ``utterance_id`` is its context's id
                when known. The door answers with :meth:`encode_error`.
        """
        message = self._decode(frame)
        first = not self.started
        self.started = True
        if first:
            self.api_key = _key(message)
        context_id = self._context_id(message)
        try:
            if message.get("close_socket") is True:
                self._ended = True
                return [CloseSocket(1000, "close_socket")]
            if self._ended:
                raise BadMessage("the stream has ended: no more messages are accepted")
            if message.get("close_context") is True:
                return self._close(context_id)
            return self._text(message, context_id)
        except ClientError as exc:
            exc.utterance_id = exc.utterance_id or context_id
            raise

    def _decode(self, frame: str | bytes) -> dict[str, Any]:
        if not isinstance(frame, str):
            raise BadMessage("binary frames are not accepted: send JSON text frames")
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            raise BadJSON("frame is not valid JSON") from None
        if not isinstance(message, dict):
            raise BadMessage("message must be a JSON object")
        return dict(without_nulls(message))

    def _context_id(self, message: Mapping[str, object]) -> str:
        if not self.multi:
            return SINGLE_CONTEXT_ID
        value = message.get("context_id", message.get("contextId"))
        if value is None:
            return SINGLE_CONTEXT_ID  # ElevenLabs' default context
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_CONTEXT_ID_LENGTH:
            raise _about(
                "context_id",
                InvalidParameter(
                    f"context_id must be a string of 1 to {MAX_CONTEXT_ID_LENGTH} characters"
                ),
            )
        return value

    def _text(self, message: Mapping[str, object], context_id: str) -> list[Action]:
        text = message.get("text", "")
        if not isinstance(text, str):
            raise _about("text", BadMessage("text must be a string"))
        if len(text) > self.max_text_length:
            raise _about(
                "text",
                TextTooLong(
                    f"text has {len(text)} characters; the limit is {self.max_text_length}"
                ),
            )
        flush = message.get("flush") is True
        context = self._contexts.get(context_id)
        if context is None or context.closed:
            if not self.multi and context is not None:
                raise BadMessage("the stream has ended: no more messages are accepted")
            if text == "" and not flush:
                return []  # a keep-alive before any context
            return self._open(message, context_id, text, flush)
        actions: list[Action] = []
        if text == "" and not self.multi and not flush:
            context.closed = True  # the end of the single context, then of the socket
            self._ended = True
            return [Finish(context_id), CloseSocket(1000, "end of stream")]
        if text:
            text = context.add_text(text, phrases=self.options.auto_mode)
            actions.append(Append(context_id, text))
        if flush:
            actions.append(Flush(context_id))
        return actions

    def _open(
        self, message: Mapping[str, object], context_id: str, text: str, flush: bool
    ) -> list[Action]:
        live = [c for c in self._contexts.values() if not c.closed]
        if len(live) >= MAX_CONTEXTS:
            raise QueueFull(f"a connection may have {MAX_CONTEXTS} contexts open at once")
        rate = _voice_settings(message.get("voice_settings"))
        min_chars = _min_chars(message, self.options.auto_mode)
        first_text = "" if text.isspace() else text
        actions: list[Action] = []
        context = _Context(context_id, CharacterTrack(per_message=not self.options.sync_alignment))
        context.add_text(first_text, phrases=False)
        self._contexts[context_id] = context
        actions.append(
            Speak(
                id=context_id,
                text=first_text,
                voice=self._voice,
                rate=rate or "+0%",
                format=self.options.format,
                stream=True,
                min_chars=min_chars,
            )
        )
        if flush:
            actions.append(Flush(context_id))
        return actions

    def forget(self, context_id: str) -> None:
        """The context's opening was refused (the rate limit, the queue…): it is not open,
        and its id may open a context again."""
        self._contexts.pop(context_id, None)

    def _close(self, context_id: str) -> list[Action]:
        context = self._contexts.get(context_id)
        if context is None or context.closed:
            raise NotFound("no open context has this context_id", utterance_id=context_id)
        context.closed = True
        return [Finish(context_id)]

    # Server frames

    def words(self, context_id: str, words: Iterable[WordEvent]) -> None:
        """Take a context's word events (they come before the audio they describe)."""
        context = self._contexts.get(context_id)
        if context is not None:
            context.track.add_words(words)

    def encode_audio(self, context_id: str, audio: bytes, *, audio_ms: float) -> bytes:
        """Encode a chunk of a context's audio with the characters due by its end.

        Args:
            context_id: The context (its utterance's id).
            audio: The chunk, in the context's format.
            audio_ms: Its playing time in ms (the door knows the format's rate).
        """
        context = self._contexts.get(context_id)
        times: CharacterTimes | None = None
        if context is not None:
            context.audio_ms += audio_ms
            times = context.track.take(context.audio_ms)
        return self._audio_frame(context_id, audio, times)

    def _audio_frame(self, context_id: str, audio: bytes, times: CharacterTimes | None) -> bytes:
        alignment = ws_alignment(times)
        message: dict[str, Any] = {
            "audio": base64.b64encode(audio).decode("ascii"),
            "isFinal": None,
            "normalizedAlignment": alignment,
            "alignment": alignment,
        }
        if self.multi:
            message["contextId"] = context_id
        return orjson.dumps(message)

    def encode_final(self, context_id: str) -> list[bytes]:
        """The frames that end a context (its utterance ended, done or cancelled): the
        characters still due, on an empty audio message, then ``isFinal``. The context is
        forgotten: its id may open a new one."""
        frames: list[bytes] = []
        context = self._contexts.pop(context_id, None)
        if context is not None:
            times = context.track.take(context.audio_ms, final=True)
            if times is not None:
                frames.append(self._audio_frame(context_id, b"", times))
        final: dict[str, Any] = {"isFinal": True}
        if self.multi:
            final["contextId"] = context_id
        frames.append(orjson.dumps(final))
        return frames

    def encode_cancelled(self, context_id: str) -> bytes:
        """The frame that ends a context cut short (a barge-in): ``isFinal``, without the
        characters never spoken. The context is forgotten."""
        self._contexts.pop(context_id, None)
        final: dict[str, Any] = {"isFinal": True}
        if self.multi:
            final["contextId"] = context_id
        return orjson.dumps(final)

    def encode_error(self, exc: BaseException) -> bytes:
        """Encode an error as ElevenLabs' clients read it: ``message`` (the SDK) and ``error``
        (LiveKit), with ``contextId`` on multi when it concerns one (LiveKit ends that
        context's stream)."""
        message: dict[str, Any] = {
            "message": exc.message if isinstance(exc, ClientError) else "internal server error",
            "error": error_code(exc),
        }
        context_id = exc.utterance_id if isinstance(exc, ClientError) else None
        if self.multi and context_id is not None:
            message["contextId"] = context_id
        return orjson.dumps(message)


def _key(message: Mapping[str, object]) -> str | None:
    """The API key a first message carries, if any."""
    for name in ("xi_api_key", "xi-api-key"):
        value = message.get(name)
        if isinstance(value, str) and value:
            return value
    value = message.get("authorization")
    if isinstance(value, str) and value:
        scheme, _, token = value.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else value
    return None


# HTTP


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    """A checked ``POST /v1/text-to-speech/{voice_id}`` request."""

    text: str
    voice: str | None
    rate: str
    format: Format


def parse_speech_body(
    body: object, *, voice_id: str, query: Mapping[str, str], max_text_length: int
) -> SpeechRequest:
    """Check the JSON body (decoded) and query of a text-to-speech request.

    ``model_id``, ``language_code``, ``seed``, ``previous_text``, ``next_text`` and the
    other voice settings are accepted and ignored; ``output_format`` is in the query
    (mp3, our source, when absent).

    Raises:
        ClientError: The request is refused (``param`` names the field).
    """
    if not isinstance(body, dict):
        raise BadMessage("the body must be a JSON object")
    fields = without_nulls(body)
    text = text_field(fields.get("text"), max_length=max_text_length)
    name = query.get("output_format") or None
    audio_format = MP3 if name is None else format_named(name)
    if audio_format is None:
        raise _about("output_format", UnsupportedFormat(f"Invalid output format: {name}"))
    return SpeechRequest(
        text=text,
        voice=voice_field(voice_id, field="voice_id"),
        rate=_voice_settings(fields.get("voice_settings")) or "+0%",
        format=audio_format,
    )


def encode_with_timestamps(audio: bytes, times: CharacterTimes | None) -> bytes:
    """One ``with-timestamps`` object: the whole answer, or one line of ``/stream`` (its
    times then count from the response's start, as Pipecat reads them)."""
    alignment = http_alignment(times)
    return orjson.dumps(
        {
            "audio_base64": base64.b64encode(audio).decode("ascii"),
            "alignment": alignment,
            "normalized_alignment": alignment,
        }
    )


def encode_voices(voices: Iterable[Voice]) -> bytes:
    """``GET /v1/voices``: each voice's ``voice_id`` is its name here (what the path takes)."""
    return orjson.dumps({"voices": [_voice(voice) for voice in voices]})


def encode_voices_page(voices: Iterable[Voice], query: Mapping[str, str]) -> bytes:
    """``GET /v2/voices`` (the SDK's ``voices.search()``): every voice in one page.

    ``search`` keeps the voices whose name, locale or gender contains it (any case);
    paging (``page_size``, ``next_page_token``) and the other filters are ignored, so
    ``has_more`` is always false.
    """
    term = (query.get("search") or "").strip().lower()
    found = [
        _voice(voice)
        for voice in voices
        if not term
        or any(term in part.lower() for part in (voice.name, voice.locale, voice.gender))
    ]
    return orjson.dumps(
        {"voices": found, "has_more": False, "total_count": len(found), "next_page_token": None}
    )


def _voice(voice: Voice) -> dict[str, Any]:
    """One voice as ElevenLabs lists it."""
    return {
        "voice_id": voice.name,
        "name": voice.name,
        "category": "premade",
        "labels": {
            "gender": voice.gender.lower(),
            "accent": voice.locale,
            "language": voice.locale.split("-")[0].lower(),
            "locale": voice.locale,
            "engine": voice.engine,
        },
        "description": None,
        "preview_url": None,
        "settings": None,
    }


def encode_http_error(exc: BaseException) -> bytes:
    """ElevenLabs' HTTP error body: ``{"detail": {"status": code, "message": text}}``."""
    message = exc.message if isinstance(exc, ClientError) else "internal server error"
    return orjson.dumps({"detail": {"status": error_code(exc), "message": message}})
