"""The HTTP speech API: ``/tts`` and OpenAI's ``/v1/audio/speech``, streamed, and
OpenAI's model and voice lists.

Both endpoints run the same utterance as a WebSocket ``speak``
(:class:`~ttsstream.core.utterance.Utterances`), with the same admission, cache,
shared syntheses, fallback and limits; only the sink differs. Audio is written
as it arrives: the status and headers go out with the first audio bytes, so an
error before them is a proper status and body. A cached text is answered at once
with its ``Content-Length``. After the first bytes, a failure ends the stream
early: the connection is dropped before the chunked body's end (SSE: a last
``error`` event), and the access log says so.

OpenAI's routes are served under ``/v1`` and without it (``/audio/speech``,
``/models``…): clients are configured with either base URL. With
``PUBLIC_LISTS`` the lists answer without a key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import orjson
from aiohttp import StreamReader, web

from ttsstream.audio.formats import MP3, Format
from ttsstream.core.fields import (
    cleanup_field,
    format_field,
    prosody_fields,
    text_field,
    voice_field,
    without_nulls,
)
from ttsstream.core.router import Started
from ttsstream.core.services import Services
from ttsstream.core.utterance import ListenerGone, Summary
from ttsstream.engines.base import SynthesisRequest, WordEvent, word_fields
from ttsstream.exceptions import (
    BadJSON,
    BadMessage,
    BodyTimeout,
    BodyTooLarge,
    ClientError,
    EndpointNotFound,
    InvalidVoice,
    RateLimited,
    ShuttingDown,
    UnsupportedFormat,
    UnsupportedMediaType,
)
from ttsstream.http.errors import Shape, error_body, status_of
from ttsstream.http.openai import (
    MODELS,
    model_named,
    model_object,
    read_speech_call,
    voice_listing,
    voice_table,
)
from ttsstream.http.request import Judged, judge

__all__ = ["SpeechApi"]

#: Largest request body, in bytes (as the WebSocket's largest frame).
MAX_BODY_BYTES = 64 * 2**10
#: Seconds a request body has to arrive whole, from when the admitted request starts
#: reading it (as a head has the shared port's ``HEAD_TIMEOUT``). A body sent slower
#: is answered 408 ``body_timeout``, and the connection slot its admission took is
#: free again.
BODY_TIMEOUT = 10.0
#: Below this many bytes waiting to be sent, a write cannot wait (aiohttp drains above
#: 64 KiB), so it is made without arming SEND_TIMEOUT's timer.
SEND_BUFFER_LOW = 16 * 2**10
#: Headers a page from an allowed origin may read.
_EXPOSED = "X-TTS-Cache, X-TTS-Engine, X-TTS-Voice, X-TTS-Fallback, X-Request-Id, Retry-After"
#: Most seconds a CORS preflight answer is kept by the browser.
_PREFLIGHT_MAX_AGE = "600"
#: OpenAI's routes are served under this prefix and without it.
_OPENAI_PREFIXES = ("/v1", "")
#: Where a client learns the voices, as an unknown voice's error says.
_VOICES_PATH = "/v1/audio/voices"


class Asked(NamedTuple):
    """What a speech request asks for."""

    synthesis: SynthesisRequest
    audio_format: Format
    sse: bool = False
    timestamps: bool = False


#: Reads a request into what it asks for.
Reader = Callable[[], Awaitable[Asked]]


class SpeechApi:
    """The handlers of the HTTP speech API, over the server's services.

    Args:
        services: The server's parts.
    """

    def __init__(self, services: Services) -> None:
        self._services = services
        self._config = services.config
        self._voices = voice_table(services.config.voice_map)
        #: Streams in progress, for a drain: their tasks and sinks.
        self._streams: dict[asyncio.Task[Any], _Body] = {}
        #: Requests reading their body (which a drain does not wait for: once read, a
        #: request is refused with ``shutting_down`` anyway).
        self._reading: set[asyncio.Task[Any]] = set()
        #: :meth:`cut` ran: the server stops.
        self._stopped = False
        self._idle = asyncio.Event()
        self._idle.set()

    def routes(self, app: web.Application) -> None:
        """Add the API's routes to ``app``."""
        app.router.add_post("/tts", self.tts)
        # No HEAD: it would synthesize a body only to drop it.
        app.router.add_get("/tts", self.tts, allow_head=False)
        app.router.add_route("OPTIONS", "/tts", self.preflight)
        for prefix in _OPENAI_PREFIXES:
            app.router.add_post(prefix + "/audio/speech", self.openai_speech)
            app.router.add_get(prefix + "/models", self.models)
            app.router.add_get(prefix + "/models/{model}", self.model)
            app.router.add_get(prefix + "/audio/models", self.audio_models)
            app.router.add_get(prefix + "/audio/voices", self.voices)
            for path in ("/audio/speech", "/models", "/models/{model}", "/audio/models"):
                app.router.add_route("OPTIONS", prefix + path, self.preflight)
            app.router.add_route("OPTIONS", prefix + "/audio/voices", self.preflight)

    # Drain

    @property
    def streams_in_progress(self) -> int:
        return len(self._streams)

    async def wait_idle(self) -> None:
        """Return once no stream is in progress."""
        await self._idle.wait()

    def cut(self) -> None:
        """Stop the streams still in progress (a drain ran out of time), and the requests
        still reading their body (answered 503 ``shutting_down``)."""
        self._stopped = True
        for task, body in list(self._streams.items()):
            body.cut = True
            task.cancel()
        for task in self._reading:
            task.cancel()

    # Endpoints

    async def tts(self, request: web.Request) -> web.StreamResponse:
        """``POST /tts`` (JSON body) or ``GET /tts?text=…``: the audio, streamed."""

        async def read() -> Asked:
            fields: Any = await _json_body(request) if request.method == "POST" else request.query
            if not isinstance(fields, dict) and request.method == "POST":
                raise BadMessage("the body must be a JSON object")
            if isinstance(fields, dict):
                fields = without_nulls(fields)
            text = text_field(fields.get("text"), max_length=self._config.max_text_length)
            prosody = prosody_fields(fields)
            audio_format = format_field(fields.get("format"), unknown=UnsupportedFormat)
            utterances = self._services.utterances
            synthesis = utterances.request(
                text=text,
                voice=voice_field(fields.get("voice")),
                cleanup=cleanup_field(fields.get("cleanup")),
                **prosody,
            )
            await self._accept(synthesis)
            return Asked(synthesis, audio_format)

        return await self._serve(request, "tts", read)

    async def openai_speech(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/audio/speech``: OpenAI's contract, audio or server-sent events."""

        async def read() -> Asked:
            body = await _json_body(request)
            if not isinstance(body, dict):
                raise BadMessage("the body must be a JSON object")
            call = read_speech_call(
                body, voices=self._voices, max_text_length=self._config.max_text_length
            )
            utterances = self._services.utterances
            synthesis = utterances.request(
                text=call.text, voice=call.voice, rate=call.rate, cleanup=call.cleanup
            )
            await self._accept(synthesis)
            return Asked(synthesis, call.format, call.sse, call.timestamps)

        return await self._serve(request, "openai", read)

    async def models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models``: OpenAI's model names, in OpenAI's list shape (any name is
        accepted by ``/v1/audio/speech``; these are the ones known)."""
        refused = await self._admit_list(request)
        if refused is not None:
            return refused
        return self._json(
            request, {"object": "list", "data": [model_object(model) for model in MODELS]}
        )

    async def model(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models/{model}``: a listed model's object; 404 for another name."""
        refused = await self._admit_list(request)
        if refused is not None:
            return refused
        name = request.match_info["model"]
        model = model_named(name)
        if model is None:
            unknown = EndpointNotFound(f'no model "{name}" is listed: GET /v1/models lists them')
            return self._error(request, unknown, "openai")
        return self._json(request, model_object(model))

    async def audio_models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/audio/models``: the model names as Open WebUI reads them
        (``{"models": [{"id": …}]}``)."""
        refused = await self._admit_list(request)
        if refused is not None:
            return refused
        return self._json(request, {"models": [{"id": model} for model in MODELS]})

    async def voices(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/audio/voices[?locale=…]``: every name ``voice`` accepts, OpenAI's names
        (with what they map to) first, each with its ``id`` and a ``name`` for people."""
        refused = await self._admit_list(request)
        if refused is not None:
            return refused
        try:
            voices = await self._services.speech.voices()
        except ClientError as exc:
            return self._error(request, exc, "openai")
        listing = voice_listing(voices, self._voices, locale=request.query.get("locale"))
        return self._json(request, listing)

    async def preflight(self, request: web.Request) -> web.StreamResponse:
        """A browser's CORS preflight: allowed origins only."""
        origin = request.headers.get("Origin")
        if origin is None or not self._services.admission.origin_allowed(origin):
            return web.Response(
                status=403,
                body=orjson.dumps(
                    {"error": "origin_not_allowed", "message": "this origin may not connect"}
                ),
                content_type="application/json",
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type, X-API-Key",
                "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
                "Vary": "Origin",
            },
        )

    # The one way a speech request is served

    async def _serve(self, request: web.Request, shape: Shape, read: Reader) -> web.StreamResponse:
        # Before admission, which may ask Redis: the time to first audio includes it.
        received_at = time.perf_counter()
        admission = self._services.admission
        judged = await judge(admission, request)
        if judged.refused is not None:
            return self._refused(judged, shape)
        client = judged.client
        self._services.stats.total_requests += 1
        request_id = "h-" + secrets.token_hex(6)
        task = asyncio.current_task()
        assert task is not None
        try:
            self._reading.add(task)
            try:
                asked = await read()
            except ClientError as exc:
                return self._unread(request, exc, shape, request_id)
            except asyncio.CancelledError:
                if not self._stopped:
                    raise
                task.uncancel()
                refusal = ShuttingDown("the server is shutting down; reconnect in a moment")
                response = self._unread(request, refusal, shape, request_id)
                # The answer goes out now, and the connection with it: the server does
                # not stay to read (and drop) the rest of the body, as aiohttp would.
                with contextlib.suppress(ConnectionError):
                    await response.prepare(request)
                    await response.write_eof()
                request.protocol.force_close()
                return response
            finally:
                self._reading.discard(task)
            body = _Body(
                request,
                sse=asked.sse,
                timestamps=asked.timestamps,
                shape=shape,
                request_id=request_id,
                cors=self._cors(request),
                send_timeout=self._config.send_timeout,
                text_length=len(asked.synthesis.text),
            )
            self._streams[task] = body
            self._idle.clear()
            try:
                await self._services.utterances.run(
                    asked.synthesis,
                    body,
                    words="batch" if asked.timestamps else "none",
                    audio_format=asked.audio_format,
                    utterance_id=request_id,
                    received_at=received_at,
                    client_ip=client,
                    connection=request_id,
                    interface="http",
                )
            except asyncio.CancelledError:
                if not body.cut:
                    raise
                # Cut by a shutdown, which the run told the client (503 before the first
                # bytes, an SSE error event, or a truncated body).
            return body.response
        finally:
            admission.release(client)
            self._streams.pop(task, None)
            if not self._streams:
                self._idle.set()

    def _unread(
        self, request: web.Request, exc: ClientError, shape: Shape, request_id: str
    ) -> web.Response:
        """The answer to a request refused as it was read, counted as an error."""
        self._services.stats.errors += 1
        response = self._error(request, exc, shape, request_id=request_id)
        if not request.content.is_eof():
            # Its body was not read to the end: the connection carries no other request.
            response.force_close()
        return response

    async def _accept(self, synthesis: SynthesisRequest) -> None:
        """Accept an utterance; an unknown voice's error names it, and where the list is.

        Raises:
            ClientError: As :meth:`Utterances.accept`; ``param`` is ``voice`` for a voice.
        """
        try:
            await self._services.utterances.accept(synthesis)
        except InvalidVoice as exc:
            exc.message = (
                f'{exc.message}: "{synthesis.voice}" (GET {_VOICES_PATH} lists them; '
                "OpenAI's names such as alloy are for /v1/audio/speech)"
            )
            exc.param = "voice"
            raise

    async def _admit_list(self, request: web.Request) -> web.StreamResponse | None:
        """Admission for a list (a request that holds no stream): a refusal, or ``None``.
        With ``PUBLIC_LISTS`` it needs no key."""
        judged = await judge(
            self._services.admission, request, needs_key=not self._config.public_lists
        )
        if judged.refused is not None:
            return self._refused(judged, "openai")
        self._services.admission.release(judged.client)
        return None

    def _refused(self, judged: Judged, shape: Shape) -> web.Response:
        """The refusal's answer, with the endpoint's error shape."""
        assert judged.answer is not None and judged.refused is not None
        answer = judged.answer
        body = answer.body if shape == "tts" else error_body(judged.refused, shape)
        return web.Response(status=answer.status, body=body, headers=dict(answer.headers))

    def _error(
        self, request: web.Request, exc: BaseException, shape: Shape, *, request_id: str = ""
    ) -> web.Response:
        headers = {"Content-Type": "application/json", **self._cors(request)}
        if request_id:
            headers["X-Request-Id"] = request_id
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(exc.retry_after)
        return web.Response(status=status_of(exc), body=error_body(exc, shape), headers=headers)

    def _json(self, request: web.Request, body: object) -> web.Response:
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/json",
            headers=self._cors(request),
        )

    def _cors(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is None or not self._services.admission.origin_allowed(origin):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": _EXPOSED,
            "Vary": "Origin",
        }


async def _json_body(request: web.Request) -> Any:
    """The request's JSON body, read to its end (at most 64 KiB, within BODY_TIMEOUT).

    Raises:
        UnsupportedMediaType: It is declared as something else than JSON.
        BodyTooLarge: It is over 64 KiB (as its length says, or as it comes).
        BodyTimeout: It did not arrive whole within BODY_TIMEOUT.
        BadJSON: It is not JSON, or ended early.
    """
    if request.content_type not in ("application/json", "application/octet-stream"):
        raise UnsupportedMediaType("send the body as JSON (Content-Type: application/json)")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BodyTooLarge("the request body is over 64 KiB")
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await _read_to_end(request.content)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {BODY_TIMEOUT:g} seconds"
        ) from None
    except ConnectionError:
        # The client closed its side before the body's end.
        raise BadJSON("the body ended early") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadJSON("the body is not valid JSON") from None


async def _read_to_end(content: StreamReader) -> bytes:
    """A body to its end, which may come in several pieces (chunks, TCP segments): a
    read gives only what has arrived so far.

    Raises:
        BodyTooLarge: It is over MAX_BODY_BYTES.
    """
    pieces: list[bytes] = []
    size = 0
    # One byte more than the limit allows tells a body over it.
    while piece := await content.read(MAX_BODY_BYTES + 1 - size):
        size += len(piece)
        if size > MAX_BODY_BYTES:
            raise BodyTooLarge("the request body is over 64 KiB")
        pieces.append(piece)
    return b"".join(pieces)


class _Body:
    """One utterance as an HTTP response body (a :class:`~ttsstream.core.utterance.Sink`):
    the audio bytes as they come, or OpenAI's server-sent events."""

    def __init__(
        self,
        request: web.Request,
        *,
        sse: bool,
        timestamps: bool,
        shape: Shape,
        request_id: str,
        cors: dict[str, str],
        send_timeout: float,
        text_length: int,
    ) -> None:
        self._request = request
        self._text_length = text_length
        self._sse = sse
        self._timestamps = timestamps
        self._shape = shape
        self._request_id = request_id
        self._cors = cors
        self._send_timeout = send_timeout
        self._started: Started | None = None
        self._stream: web.StreamResponse | None = None
        #: A replay's audio (slices of the cache entry), written at once with its length
        #: at the end.
        self._replay: list[bytes | memoryview] | None = None
        #: What the handler returns: the stream once begun, else an answer given in full.
        self.response: web.StreamResponse = web.Response(status=500)
        self.cut = False
        self._audio_bytes = 0

    @property
    def gone(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    async def start(self, started: Started) -> None:
        self._started = started
        # A stored entry (the MP3, or a format made from it once and stored beside it).
        stored = started.audio_format.name == MP3.name or started.audio_ms is not None
        if started.cached and not self._sse and stored:
            self._replay = []

    async def audio(self, data: bytes | memoryview) -> None:
        self._audio_bytes += len(data)
        if self._replay is not None:
            self._replay.append(data)
            return
        if self._sse:
            encoded = base64.b64encode(data).decode()
            await self._write(_event({"type": "speech.audio.delta", "audio": encoded}))
        else:
            await self._write(data)

    async def word(self, word: WordEvent) -> None:
        await self.words((word,))

    async def words(self, words: Sequence[WordEvent]) -> None:
        if self._sse and self._timestamps:
            await self._write(
                _event({"type": "speech.words", "words": [word_fields(word) for word in words]})
            )

    async def end(self, summary: Summary) -> None:
        if self._replay is not None:
            # The entry's own slices, with its length: no copy, no chunked encoding.
            chunks, self._replay = self._replay, None
            await self._begin(content_length=summary.byte_count)
            for chunk in chunks:
                await self._write(chunk)
        elif self._sse:
            text_length = self._text_length
            await self._write(
                _event(
                    {
                        "type": "speech.audio.done",
                        "usage": {
                            "input_tokens": text_length,
                            "output_tokens": round(summary.audio_ms),
                            "total_tokens": text_length + round(summary.audio_ms),
                        },
                    }
                )
            )
        stream = await self._begin()
        try:
            async with asyncio.timeout(self._send_timeout):
                await stream.write_eof()
        except (ConnectionError, TimeoutError):
            raise ListenerGone() from None

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        if self._stream is None:
            headers = {"Content-Type": "application/json", **self._cors}
            headers["X-Request-Id"] = self._request_id
            self.response = web.Response(
                status=status_of(exc), body=error_body(exc, self._shape), headers=headers
            )
            return
        if self._sse:
            error = orjson.loads(error_body(exc, "openai"))["error"]
            await self._write(_event({"type": "error", "error": error}))
            await self._stream.write_eof()
            return
        # The audio cannot say it is incomplete: drop the connection before the
        # chunked body's end, so that the client sees a truncated transfer.
        transport = self._request.transport
        if transport is not None:
            transport.abort()

    def finished(self) -> None:
        pass

    def _headers(self) -> dict[str, str]:
        started = self._started
        headers = {
            "Content-Type": "text/event-stream" if self._sse else _mime(started),
            "Cache-Control": "no-cache",
            "X-Request-Id": self._request_id,
            **self._cors,
        }
        if started is not None:
            headers["X-TTS-Cache"] = "hit" if started.cached else "miss"
            headers["X-TTS-Engine"] = started.engine
            headers["X-TTS-Voice"] = started.voice
            if started.fallback_reason is not None:
                headers["X-TTS-Fallback"] = started.fallback_reason
        if self._sse:
            headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return headers

    async def _begin(self, content_length: int | None = None) -> web.StreamResponse:
        if self._stream is None:
            stream = web.StreamResponse(headers=self._headers())
            if content_length is None:
                stream.enable_chunked_encoding()
            else:
                stream.content_length = content_length
            self.response = self._stream = stream
            try:
                await stream.prepare(self._request)
            except ConnectionError:
                raise ListenerGone() from None
        return self._stream

    async def _write(self, data: bytes | memoryview) -> None:
        stream = await self._begin()
        transport = self._request.transport
        try:
            if transport is not None and transport.get_write_buffer_size() < SEND_BUFFER_LOW:
                # Room in the buffer: the write does not wait, and needs no timer.
                await stream.write(data)
                return
            async with asyncio.timeout(self._send_timeout):
                await stream.write(data)
        except ConnectionError:
            raise ListenerGone() from None
        except TimeoutError:
            transport = self._request.transport
            if transport is not None:
                transport.abort()
            raise _TooSlow() from None


class _TooSlow(ListenerGone):
    outcome = "too_slow"


def _mime(started: Started | None) -> str:
    return started.audio_format.mime_type if started is not None else "audio/mpeg"


def _event(message: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(message) + b"\n\n"
