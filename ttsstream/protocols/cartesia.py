"""Cartesia's TTS API on the wire: its WebSocket contexts, its HTTP bodies, its events.

Sans-I/O, like :mod:`ttsstream.protocols.v1`: no asyncio, no websockets, no aiohttp.
It is judged by Cartesia's real clients: the official ``cartesia`` SDK (4.x),
Pipecat's ``CartesiaTTSService`` / ``CartesiaHttpTTSService`` and LiveKit's plugin.

``WS /tts/websocket``: :class:`CartesiaContexts` turns the client's messages into
:mod:`~ttsstream.protocols.actions`. A context is one streaming utterance whose id
is the ``context_id``:

- The first message of a new ``context_id`` with ``"continue": true`` opens it
  (:class:`~ttsstream.protocols.actions.Speak` with ``stream=True``; its voice,
  format, timestamps and speed hold for the whole context); each later
  ``transcript`` is an :class:`~ttsstream.protocols.actions.Append`.
- ``"continue": false`` (or no ``continue``) ends its text
  (:class:`~ttsstream.protocols.actions.Finish`); on a new context it is a one-shot
  utterance (a plain ``Speak``). A new context whose only message is a blank
  ``continue: false`` (LiveKit's empty turn) is answered ``done`` at once.
- ``"flush": true`` speaks what is buffered (:class:`~ttsstream.protocols.actions.Flush`)
  and is acknowledged with ``flush_done`` (its ``flush_id`` counts the context's
  flushes from 1). ``"max_buffer_delay_ms": 0`` flushes after every transcript
  (Pipecat's and LiveKit's sentence mode: each message is a whole sentence).
- ``{"context_id", "cancel": true}`` cancels it; nothing is sent for a cancel, and
  later messages of a cancelled context are dropped.

The connection tells the machine when a context is over (:meth:`CartesiaContexts.ended`):
once it has sent the context's ``done`` or ``error``, or cancelled it. Contexts are
spoken at the same time, a few at once, the rest in the order they were opened (the
connection's queue).

HTTP: :func:`parse_http_request` reads the body of ``POST /tts/bytes`` and
``POST /tts/sse``; :func:`sse_event` frames the same messages as server-sent events;
:func:`encode_voices` answers ``GET /voices`` as the SDK's paginated list reads it.

Authentication and version, at the handshake (the door's and admission's part): the
SDK 4.x sends ``Authorization: Bearer <key>`` and ``cartesia-version: 2026-08-14``;
Pipecat ``X-API-Key`` and ``Cartesia-Version: 2026-03-01``; LiveKit ``X-API-Key``
and, on the WebSocket, ``?cartesia_version=2025-04-16`` (a header on HTTP). Browsers
put the key in ``?api_key=``. Every version is accepted: the
messages read here are the same in all of them.
"""

from __future__ import annotations

import base64
import re
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson

from ttsstream.audio.formats import Format, format_named
from ttsstream.core.fields import text_field, voice_field, without_nulls
from ttsstream.core.voices import in_locale
from ttsstream.engines.base import Voice, WordEvent
from ttsstream.exceptions import (
    BadJSON,
    BadMessage,
    ClientError,
    InvalidParameter,
    InvalidVoice,
    RateLimited,
    TextTooLong,
    UnsupportedFormat,
    error_code,
    http_status,
)
from ttsstream.protocols.actions import Action, Append, Cancel, Finish, Flush, Reply, Speak
from ttsstream.protocols.v1 import MAX_ID_LENGTH

__all__ = [
    "DEFAULT_VOICE_PAGE",
    "MAX_BUFFER_DELAY_MS",
    "MAX_CLOSED_REMEMBERED",
    "MAX_VOICE_PAGE",
    "CartesiaContexts",
    "encode_chunk",
    "encode_done",
    "encode_error",
    "encode_flush_done",
    "encode_http_error",
    "encode_timestamps",
    "encode_voices",
    "format_name",
    "output_format_field",
    "parse_http_request",
    "sse_event",
    "status_code",
]

# Limits
#: Largest ``max_buffer_delay_ms`` Cartesia accepts (its range is 0 to 5000).
MAX_BUFFER_DELAY_MS = 5000
#: Context ids of one connection remembered once over (cancelled, ended, refused), so
#: that a late message for one is dropped rather than spoken; the oldest is forgotten.
MAX_CLOSED_REMEMBERED = 256
#: Voices in a ``GET /voices`` page when ``limit`` is not given, and the most it may ask.
DEFAULT_VOICE_PAGE = 100
MAX_VOICE_PAGE = 100

E = TypeVar("E", bound=ClientError)

#: Cartesia's ``status_code`` of a chunk, timestamps or flush acknowledgement.
_PARTIAL = 206
#: ... and of ``done``.
_OK = 200


# Speed: Cartesia's named speeds (the top-level ``speed``, and the older
# ``voice.__experimental_controls.speed``) as our rate. Its numeric experimental speed
# runs from -1 (slowest) to 1 (fastest): 50 points of rate per unit, as the names.
_NAMED_SPEEDS = {
    "slowest": "-50%",
    "slow": "-25%",
    "normal": "+0%",
    "fast": "+25%",
    "fastest": "+50%",
}
_EXPERIMENTAL_SPEED_PERCENT = 50
#: ``generation_config.speed``, a multiplier: Cartesia documents 0.6 to 1.5, LiveKit
#: lets 2.0 through.
_SPEED_RANGE = (0.6, 2.0)
#: ``generation_config.volume``, a multiplier.
_VOLUME_RANGE = (0.5, 2.0)

#: A Cartesia voice id: a UUID. It names no voice here, unless ``VOICE_MAP`` maps it;
#: the default voice speaks (LiveKit and the SDK send one when the user chose none).
_CARTESIA_VOICE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# Formats


def format_name(output_format: Mapping[str, object]) -> str:
    """The name in our format table (:func:`~ttsstream.audio.formats.format_named`) of
    a Cartesia ``output_format``.

    ``raw``: ``pcm_s16le`` is ``pcm_<rate>``, ``pcm_f32le`` ``pcm_f32le_<rate>``,
    ``pcm_mulaw`` and ``pcm_alaw`` ``ulaw_8000`` and ``alaw_8000``; ``wav`` (16-bit)
    is ``wav_<rate>``; ``mp3`` is ``mp3_<rate>_<kbit/s>``.

    Raises:
        BadMessage: A field is missing or of the wrong type.
        UnsupportedFormat: The format has no equivalent here.
    """
    container = output_format.get("container")
    if not isinstance(container, str):
        raise _about("output_format", BadMessage('"output_format" needs a string "container"'))
    if container not in ("raw", "wav", "mp3"):
        raise _unsupported(f'container "{container}": raw, wav and mp3 are made here')
    rate = output_format.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise _about("output_format", BadMessage('"output_format" needs an integer "sample_rate"'))
    if container == "mp3":
        bit_rate = output_format.get("bit_rate")
        if isinstance(bit_rate, bool) or not isinstance(bit_rate, int) or bit_rate % 1000:
            raise _about(
                "output_format",
                BadMessage('an mp3 "output_format" needs an integer "bit_rate" in bit/s'),
            )
        return f"mp3_{rate}_{bit_rate // 1000}"
    encoding = output_format.get("encoding", "pcm_s16le")
    if not isinstance(encoding, str):
        raise _about("output_format", BadMessage('"encoding" must be a string'))
    if container == "wav":
        if encoding != "pcm_s16le":
            raise _unsupported(f"wav of {encoding}: only wav of pcm_s16le is made here")
        return f"wav_{rate}"
    if encoding == "pcm_s16le":
        return f"pcm_{rate}"
    if encoding == "pcm_f32le":
        return f"pcm_f32le_{rate}"
    if encoding in ("pcm_mulaw", "pcm_alaw"):
        if rate != 8000:
            raise _unsupported(f"{encoding} at {rate} Hz: it is made at 8000 Hz only")
        return f"{'ulaw' if encoding == 'pcm_mulaw' else 'alaw'}_8000"
    raise _unsupported(
        f'encoding "{encoding}": pcm_s16le, pcm_f32le, pcm_mulaw and pcm_alaw are made here'
    )


def output_format_field(value: object) -> Format:
    """The format a Cartesia ``output_format`` asks for (:func:`format_name`).

    Raises:
        BadMessage: It is missing or malformed.
        UnsupportedFormat: It has no equivalent here.
    """
    if not isinstance(value, dict):
        raise _about("output_format", BadMessage('an object "output_format" is required'))
    name = format_name(value)
    found = format_named(name)
    if found is None:
        raise _unsupported(f"{name} is not made here")
    return found


def _unsupported(what: str) -> UnsupportedFormat:
    return _about("output_format", UnsupportedFormat(f"output_format {what}"))


def _about(field: str, exc: E) -> E:
    exc.param = field
    return exc


# What a request asks of the voice


@dataclass(frozen=True, slots=True)
class _Voicing:
    """The fields of a generation request that hold for its whole utterance."""

    voice: str | None
    format: Format
    words: str
    rate: str | None
    volume: str | None


def _voice_id(value: object, aliases: Collection[str] = ()) -> str | None:
    """Our voice name from Cartesia's ``voice`` (``{"mode": "id", "id": …}``, or the id
    alone as the SDK 4.x allows); ``None``: the default voice. A Cartesia id (a UUID)
    is the default voice unless ``aliases`` (``VOICE_MAP``'s names) has it."""
    if isinstance(value, dict):
        mode = value.get("mode", "id")
        if mode != "id":
            raise _about(
                "voice", InvalidVoice(f'voice mode "{mode}" is not supported: give a voice "id"')
            )
        value = value.get("id")
        if value is None:
            raise _about("voice", BadMessage('"voice" needs an "id"'))
    name = voice_field(value)
    if (
        name is not None
        and _CARTESIA_VOICE_ID.fullmatch(name.lower())
        and name.lower() not in aliases
    ):
        return None
    return name


def _percent(value: float) -> str:
    return f"{round(value):+d}%"


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _multiplier(config: Mapping[str, object], name: str, bounds: tuple[float, float]) -> str | None:
    value = config.get(name)
    if value is None:
        return None
    number = _number(value)
    low, high = bounds
    if number is None or not low <= number <= high:
        raise _about(
            "generation_config",
            InvalidParameter(f'"generation_config.{name}" must be a number from {low} to {high}'),
        )
    return _percent((number - 1) * 100)


def _named_speed(value: object, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value in _NAMED_SPEEDS:
        return _NAMED_SPEEDS[value]
    number = _number(value)
    if number is None or not -1 <= number <= 1:
        raise _about(
            field,
            InvalidParameter(
                f'"{field}" must be one of '
                + ", ".join(_NAMED_SPEEDS)
                + " or a number from -1 to 1"
            ),
        )
    return _percent(number * _EXPERIMENTAL_SPEED_PERCENT)


def _prosody(message: Mapping[str, object]) -> tuple[str | None, str | None]:
    """The rate and volume a request asks for: ``generation_config`` (sonic-3) first,
    then ``speed``, then the voice's ``__experimental_controls``."""
    config = message.get("generation_config", {})
    if not isinstance(config, dict):
        raise _about("generation_config", BadMessage('"generation_config" must be an object'))
    config = without_nulls(config)
    rate = _multiplier(config, "speed", _SPEED_RANGE)
    volume = _multiplier(config, "volume", _VOLUME_RANGE)
    speed = _named_speed(message.get("speed"), "speed")
    voice = message.get("voice")
    controls = voice.get("__experimental_controls") if isinstance(voice, dict) else None
    experimental = (
        _named_speed(controls.get("speed"), "__experimental_controls.speed")
        if isinstance(controls, dict)
        else None
    )
    return rate or speed or experimental, volume


def _flag(message: Mapping[str, object], field: str) -> bool:
    value = message.get(field, False)
    if not isinstance(value, bool):
        raise _about(field, BadMessage(f'"{field}" must be true or false'))
    return value


def _voicing(message: Mapping[str, object], aliases: Collection[str] = ()) -> _Voicing:
    rate, volume = _prosody(message)
    return _Voicing(
        voice=_voice_id(message.get("voice"), aliases),
        format=output_format_field(message.get("output_format")),
        words="batch" if _flag(message, "add_timestamps") else "none",
        rate=rate,
        volume=volume,
    )


def _speak(
    utterance_id: str,
    text: str,
    voicing: _Voicing,
    *,
    stream: bool,
    id_given: bool = True,
    max_wait_ms: int | None = None,
) -> Speak:
    return Speak(
        id=utterance_id,
        text=text,
        voice=voicing.voice,
        rate=voicing.rate or "+0%",
        volume=voicing.volume or "+0%",
        words=voicing.words,
        format=voicing.format,
        stream=stream,
        id_given=id_given,
        max_wait_ms=max_wait_ms,
    )


def _decode(frame: str | bytes) -> dict[str, object]:
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError:
        raise BadJSON("the message is not valid JSON") from None
    if not isinstance(message, dict):
        raise BadMessage("the message must be a JSON object")
    return without_nulls(message)  # LiveKit sends "language": null


def _context_id(message: Mapping[str, object]) -> str | None:
    value = message.get("context_id")
    if value is None:
        return None
    if not isinstance(value, str):
        raise _about("context_id", BadMessage('"context_id" must be a string'))
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise _about(
            "context_id",
            InvalidParameter(f'"context_id" must have 1 to {MAX_ID_LENGTH} characters'),
        )
    return value


def _blank(text: str) -> bool:
    return not text.strip()


# The WebSocket's contexts


@dataclass(slots=True)
class _Context:
    """A context whose utterance the connection holds."""

    #: Its text is finished (``continue: false``): only its audio is to come.
    finished: bool
    #: Flush after every transcript (``max_buffer_delay_ms: 0``).
    flush_each: bool = False
    #: Flushes asked so far (the last ``flush_done``'s ``flush_id``).
    flushes: int = 0
    #: Its transcripts so far, as sent (what its words' character ranges index).
    text: list[str] = field(default_factory=list)


_Closed = Literal["cancelled", "ended"]


class CartesiaContexts:
    """The contexts of one ``/tts/websocket`` connection, message by message.

    Args:
        max_text_length: Most characters of one message's ``transcript``.
        aliases: ``VOICE_MAP``'s names (lower case): a Cartesia voice id among them
            is passed on, to be mapped; another is the default voice.
    """

    def __init__(self, *, max_text_length: int, aliases: Collection[str] = ()) -> None:
        if max_text_length < 1:
            raise ValueError("max_text_length must be at least 1")
        self._max_text_length = max_text_length
        self._aliases = frozenset(aliases)
        self._open: dict[str, _Context] = {}
        self._closed: OrderedDict[str, _Closed] = OrderedDict()

    def receive(self, frame: str | bytes) -> list[Action]:
        """The actions one client message asks for (maybe none).

        Raises:
            ClientError: The message is refused; ``utterance_id`` is its
                ``context_id`` when it had a valid one. A refused message of an
                open context ends that context: the connection cancels its
                utterance, and later messages of it are dropped.
        """
        message = _decode(frame)
        context_id = _context_id(message)
        try:
            if context_id is None:
                raise _about("context_id", BadMessage('a string "context_id" is required'))
            return self._receive(context_id, message)
        except ClientError as exc:
            exc.utterance_id = context_id
            if context_id is not None and context_id in self._open:
                self._close(context_id, "cancelled")
            raise

    def ended(self, context_id: str, *, failed: bool = False) -> None:
        """The context's utterance is over: its ``done`` was sent (its id may open a new
        context), or its ``error`` (``failed``: later messages of it are dropped, as the
        clients stop reading it), or it was cancelled. Unknown ids are ignored."""
        if context_id in self._open:
            self._close(context_id, "cancelled" if failed else "ended")

    def text_of(self, context_id: str) -> str:
        """The transcripts of an open context so far, joined ("" for another)."""
        context = self._open.get(context_id)
        if context is None:
            return ""
        if len(context.text) > 1:
            context.text[:] = ["".join(context.text)]
        return context.text[0] if context.text else ""

    @property
    def open_contexts(self) -> int:
        """Contexts whose utterance the connection holds."""
        return len(self._open)

    def _close(self, context_id: str, how: _Closed) -> None:
        self._open.pop(context_id, None)
        self._closed[context_id] = how
        self._closed.move_to_end(context_id)
        while len(self._closed) > MAX_CLOSED_REMEMBERED:
            self._closed.popitem(last=False)

    def _receive(self, context_id: str, message: dict[str, object]) -> list[Action]:
        if _flag(message, "cancel"):
            if context_id in self._open:
                self._close(context_id, "cancelled")
                return [Cancel(id=context_id)]
            return []  # Cartesia answers no cancel: one of a context over is no error
        transcript = message.get("transcript", "")
        if not isinstance(transcript, str):
            raise _about("transcript", BadMessage('"transcript" must be a string'))
        if len(transcript) > self._max_text_length:
            raise _about(
                "transcript",
                TextTooLong(
                    f"transcript has {len(transcript)} characters; "
                    f"the limit per message is {self._max_text_length}"
                ),
            )
        more = _flag(message, "continue")
        flush = _flag(message, "flush")
        context = self._open.get(context_id)
        if context is not None:
            return self._continue(context_id, context, transcript, more=more, flush=flush)
        closed = self._closed.get(context_id)
        if closed == "cancelled" or (closed == "ended" and _blank(transcript)):
            return []  # a late message of a context over
        self._closed.pop(context_id, None)
        return self._open_context(context_id, message, transcript, more=more, flush=flush)

    def _open_context(
        self,
        context_id: str,
        message: dict[str, object],
        transcript: str,
        *,
        more: bool,
        flush: bool,
    ) -> list[Action]:
        if not more and _blank(transcript):
            # Nothing to say (LiveKit's turn without text): the context is done at once.
            self._close(context_id, "ended")
            return [Reply(encode_done(context_id))]
        voicing = _voicing(message, self._aliases)
        delay = message.get("max_buffer_delay_ms")
        if delay is not None and (
            isinstance(delay, bool)
            or not isinstance(delay, int)
            or not 0 <= delay <= MAX_BUFFER_DELAY_MS
        ):
            raise _about(
                "max_buffer_delay_ms",
                InvalidParameter(
                    f'"max_buffer_delay_ms" must be an integer from 0 to {MAX_BUFFER_DELAY_MS}'
                ),
            )
        if not more:
            text = text_field(transcript, max_length=self._max_text_length, field="transcript")
            self._open[context_id] = _Context(finished=True, text=[text])
            return [_speak(context_id, text, voicing, stream=False)]
        context = _Context(finished=False, flush_each=delay == 0, text=[transcript])
        self._open[context_id] = context
        actions: list[Action] = [
            _speak(context_id, transcript, voicing, stream=True, max_wait_ms=delay or None)
        ]
        return actions + self._flushes(
            context_id, context, spoke=not _blank(transcript), flush=flush
        )

    def _continue(
        self, context_id: str, context: _Context, transcript: str, *, more: bool, flush: bool
    ) -> list[Action]:
        if context.finished:
            if _blank(transcript):
                return []  # a second end (Pipecat may flush a turn twice)
            raise BadMessage(
                "this context's input has ended (continue: false): send to a new context_id"
            )
        actions: list[Action] = [Append(id=context_id, text=transcript)] if transcript else []
        if transcript:
            context.text.append(transcript)
        if not more:
            context.finished = True
            actions.append(Finish(id=context_id))
            if flush:
                context.flushes += 1
                actions.append(Reply(encode_flush_done(context_id, context.flushes)))
            return actions
        return actions + self._flushes(
            context_id, context, spoke=not _blank(transcript), flush=flush
        )

    @staticmethod
    def _flushes(context_id: str, context: _Context, *, spoke: bool, flush: bool) -> list[Action]:
        if flush:
            context.flushes += 1
            return [Flush(id=context_id), Reply(encode_flush_done(context_id, context.flushes))]
        if context.flush_each and spoke:
            return [Flush(id=context_id)]
        return []


# HTTP


def parse_http_request(
    body: str | bytes,
    *,
    max_text_length: int,
    make_id: Callable[[], str],
    timestamps: bool = False,
    aliases: Collection[str] = (),
) -> Speak:
    """What a ``POST /tts/bytes`` or ``POST /tts/sse`` body asks to speak.

    Args:
        body: The request's JSON body.
        max_text_length: Most characters of its ``transcript``.
        make_id: Returns an utterance id for a request without ``context_id``.
        timestamps: Whether the endpoint sends word timestamps when asked
            (``/tts/sse``; ``/tts/bytes`` sends audio only).
        aliases: ``VOICE_MAP``'s names, as :class:`CartesiaContexts` takes them.

    Returns:
        A whole (not streaming) :class:`~ttsstream.protocols.actions.Speak`; its
        ``words`` is ``batch`` when ``add_timestamps`` asked for them.

    Raises:
        ClientError: The body is refused.
    """
    message = _decode(body)
    context_id = _context_id(message)
    try:
        text = text_field(message.get("transcript"), max_length=max_text_length, field="transcript")
        voicing = _voicing(message, aliases)
        if not timestamps:
            voicing = _Voicing(voicing.voice, voicing.format, "none", voicing.rate, voicing.volume)
        return _speak(
            context_id or make_id(), text, voicing, stream=False, id_given=context_id is not None
        )
    except ClientError as exc:
        exc.utterance_id = context_id
        raise


# What the server sends


def _encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def _with_context(context_id: str | None, message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with its ``context_id`` first; left out when there is none (SSE
    without one; Pipecat reads the field of every message, so the WebSocket always has it)."""
    return message if context_id is None else {"context_id": context_id, **message}


def encode_chunk(
    context_id: str | None,
    audio: bytes | memoryview,
    *,
    step_time_ms: float = 0.0,
    flush_id: int | None = None,
) -> bytes:
    """Encode a ``chunk`` of audio (base64 in ``data``); ``step_time_ms`` is how long the
    server took to make it, ``flush_id`` the generation it belongs to (left out when
    ``None``)."""
    message = {
        "type": "chunk",
        "data": base64.b64encode(audio).decode("ascii"),
        "done": False,
        "status_code": _PARTIAL,
        "step_time": round(step_time_ms, 3),
    }
    if flush_id is not None:
        message["flush_id"] = flush_id
    return _encode(_with_context(context_id, message))


def encode_timestamps(context_id: str | None, words: Sequence[WordEvent], text: str = "") -> bytes:
    """Encode ``timestamps``: the words' start and end in seconds from the utterance's
    start, in Cartesia's parallel arrays. Each word is written as in ``text`` (the
    transcript sent) when given: with the punctuation that stands against it
    (``there,``), as Cartesia echoes the transcript's words and LiveKit aligns them."""
    return _encode(
        _with_context(
            context_id,
            {
                "type": "timestamps",
                "done": False,
                "status_code": _PARTIAL,
                "word_timestamps": {
                    "words": [_as_sent(word, text) for word in words],
                    "start": [round(word.offset_ms / 1000, 6) for word in words],
                    "end": [round((word.offset_ms + word.duration_ms) / 1000, 6) for word in words],
                },
            },
        )
    )


def _as_sent(word: WordEvent, text: str) -> str:
    """The word as ``text`` has it, with the punctuation that stands against it up to
    the next space or word (``there,``, ``(hello``), or the word as spoken when ``text``
    does not hold it."""
    start, end = word.char_start, word.char_end
    if not text or start is None or end is None or not 0 <= start < end <= len(text):
        return word.text
    opening = start
    while opening > 0 and not text[opening - 1].isspace() and not text[opening - 1].isalnum():
        opening -= 1
    if opening == 0 or text[opening - 1].isspace():  # else the marks close the word before
        start = opening
    while end < len(text) and not text[end].isspace() and not text[end].isalnum():
        end += 1
    return text[start:end]


def encode_flush_done(context_id: str, flush_id: int) -> bytes:
    """Encode ``flush_done``, the acknowledgement of the context's ``flush_id``-th flush."""
    return _encode(
        {
            "type": "flush_done",
            "context_id": context_id,
            "done": False,
            "flush_done": True,
            "flush_id": flush_id,
            "status_code": _PARTIAL,
        }
    )


def encode_done(context_id: str | None) -> bytes:
    """Encode ``done``: the context's audio is complete; nothing more of it follows."""
    return _encode(_with_context(context_id, {"type": "done", "done": True, "status_code": _OK}))


def status_code(exc: BaseException) -> int:
    """The HTTP-like ``status_code`` Cartesia's clients see for ``exc`` (the HTTP doors')."""
    return http_status(exc)


def _error_fields(exc: BaseException, request_id: str | None) -> dict[str, Any]:
    code = error_code(exc)
    message = exc.message if isinstance(exc, ClientError) else "internal server error"
    title = code.replace("_", " ").capitalize()
    fields: dict[str, Any] = {"error_code": code, "title": title, "message": message}
    if request_id is not None:
        fields["request_id"] = request_id
    if isinstance(exc, RateLimited):
        fields["retry_after"] = exc.retry_after
    return fields


def encode_error(
    exc: BaseException,
    *,
    context_id: str | None,
    request_id: str | None = None,
    partial: bool = False,
) -> bytes:
    """Encode the ``error`` a client receives for ``exc``: it ends the context
    (``done: true``, as Cartesia's do; every client stops reading the context there).

    Cartesia's fields since version 2026-03-01 (``error_code``, ``title``,
    ``message``, ``request_id``) and the older ``error`` string (``title: message``).
    Unexpected exceptions say nothing of what happened.

    Args:
        exc: What went wrong.
        context_id: The context it ends (``None``: the message had none).
        request_id: The connection's or the request's id, for the operators.
        partial: Some of the context's audio was already sent.
    """
    fields = _error_fields(exc, request_id)
    if partial:
        fields["message"] += "; the audio already sent is partial"
    return _encode(
        {
            "type": "error",
            "context_id": context_id,
            "done": True,
            "status_code": status_code(exc),
            **fields,
            "error": f"{fields['title']}: {fields['message']}",
        }
    )


def encode_http_error(exc: BaseException, *, request_id: str) -> bytes:
    """The JSON body of an HTTP error answer (its status: :func:`status_code`)."""
    return _encode(_error_fields(exc, request_id))


def sse_event(kind: str, message: bytes) -> bytes:
    """``message`` (one of the encoders' above) as a server-sent event named ``kind``
    (``chunk``, ``timestamps``, ``done``, ``error``); the SDK reads its ``data``."""
    return b"event: " + kind.encode("ascii") + b"\ndata: " + message + b"\n\n"


# Voices

_GENDERS = {"female": "feminine", "male": "masculine"}
#: What a voice's ``created_at`` says: the list's voices have no date here.
_CREATED_AT = "1970-01-01T00:00:00Z"


def _voice_object(voice: Voice) -> dict[str, Any]:
    return {
        "id": voice.name,
        "name": voice.name,
        "description": f"{voice.locale} {voice.gender.lower()} voice ({voice.engine})",
        "language": voice.locale.split("-")[0].lower(),
        "locales": [{"locale": voice.locale, "is_native": True}],
        "gender": _GENDERS.get(voice.gender.lower(), "gender_neutral"),
        "tagline": "",
        "access": "public",
        "visibility": "all",
        "is_owner": False,
        "is_public": True,  # the SDK's 2.x field
        "created_at": _CREATED_AT,
    }


def _matches(item: Mapping[str, Any], query: Mapping[str, str]) -> bool:
    gender = query.get("gender")
    if gender and item["gender"] != gender:
        return False
    words = query.get("q", "").strip().lower()
    if words and not any(words in item[field].lower() for field in ("id", "name", "description")):
        return False
    owned = query.get("is_owner", "").lower()
    if owned == "true":
        return False  # no voice here is the client's own
    return in_locale(item["locales"][0]["locale"], query.get("language"))


def encode_voices(voices: Iterable[Voice], query: Mapping[str, str]) -> bytes:
    """Answer ``GET /voices``: one page of the voices, as the SDK's ``voices.list()`` reads it.

    The SDK pages by cursor: the next request says ``starting_after=<last id>``
    until a page is empty (``has_more`` is for other clients). A cursor that names
    no voice (the list changed) gives an empty page, which ends the iteration.

    Args:
        voices: Every voice, in a stable order.
        query: The request's query: ``limit`` (1 to :data:`MAX_VOICE_PAGE`),
            ``starting_after`` or ``ending_before``, and filters ``q``,
            ``gender`` (``feminine``, ``masculine``), ``is_owner``, ``language``.

    Raises:
        InvalidParameter: ``limit`` is not a number from 1 to :data:`MAX_VOICE_PAGE`.
    """
    limit_text = query.get("limit") or str(DEFAULT_VOICE_PAGE)
    if (
        not limit_text.isascii()
        or not limit_text.isdigit()
        or not 1 <= int(limit_text) <= MAX_VOICE_PAGE
    ):
        raise _about(
            "limit", InvalidParameter(f'"limit" must be an integer from 1 to {MAX_VOICE_PAGE}')
        )
    limit = int(limit_text)
    items = [item for item in map(_voice_object, voices) if _matches(item, query)]
    ids = [item["id"] for item in items]
    after, before = query.get("starting_after"), query.get("ending_before")
    if after:
        start = ids.index(after) + 1 if after in ids else len(items)
        page = items[start : start + limit]
        more = start + limit < len(items)
    elif before:
        end = ids.index(before) if before in ids else 0
        page = items[max(0, end - limit) : end]
        more = end - limit > 0
    else:
        page = items[:limit]
        more = limit < len(items)
    return _encode(
        {"data": page, "has_more": more, "next_page": page[-1]["id"] if more and page else None}
    )
