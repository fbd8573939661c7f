"""What every HTTP speech door shares: one request served as a stream, and a drain.

:class:`HttpStreams` is an HTTP door's part in the server's life (a
:class:`~ttsstream.doors.Door`): it admits a request, reads what it asks for,
runs the utterance into the door's body (a :class:`StreamBody`, the door's
:class:`~ttsstream.core.utterance.Sink`), and tracks it for a drain. A door adds
only how its request is read and how its body is written. :class:`StreamBody`
holds what every body shares: the status and headers go out with the first
bytes (an error before them is a proper status and body), each write is timed
(``SEND_TIMEOUT``: a client that stops reading is dropped), and a body the server
cut or the client left says so to the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import orjson
from aiohttp import StreamReader, web

from ttsstream.audio.formats import Format
from ttsstream.core.context import Principal, RequestContext
from ttsstream.core.router import Started
from ttsstream.core.ssml import SsmlDocument
from ttsstream.core.utterance import ListenerGone, Summary, cut_short
from ttsstream.engines.base import SynthesisRequest, WordEvent
from ttsstream.exceptions import (
    BadJSON,
    BadMessage,
    BodyTimeout,
    BodyTooLarge,
    ClientError,
    KeyRevoked,
    RateLimited,
    ShuttingDown,
    UnsupportedMediaType,
)
from ttsstream.http.errors import Shape, error_body, status_of
from ttsstream.http.request import Judged, judge
from ttsstream.services import Services

__all__ = [
    "BODY_TIMEOUT",
    "MAX_BODY_BYTES",
    "Asked",
    "BodyArgs",
    "HttpStreams",
    "Reader",
    "StreamBody",
    "json_body",
]

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
#: Most seconds a CORS preflight answer is kept by the browser.
_PREFLIGHT_MAX_AGE = "600"
#: Request headers a page from an allowed origin may send (every door's key headers).
_ALLOWED_HEADERS = (
    "Authorization, Content-Type, X-API-Key, xi-api-key, Cartesia-Version, "
    "Ocp-Apim-Subscription-Key, X-Microsoft-OutputFormat"
)
#: Headers a page from an allowed origin may read.
EXPOSED_HEADERS = (
    "X-TTS-Cache, X-TTS-Engine, X-TTS-Voice, X-TTS-Fallback, X-Request-Id, Retry-After"
)


class Asked(NamedTuple):
    """What a speech request asks for."""

    synthesis: SynthesisRequest
    audio_format: Format
    sse: bool = False
    timestamps: bool = False
    #: The text as the client sent it (what character timings index), when a body needs it.
    text: str = ""
    #: An SSML request's spans (then ``synthesis`` stands for the document).
    document: SsmlDocument | None = None


#: Reads a request into what it asks for.
Reader = Callable[[], Awaitable[Asked]]


class StreamBody:
    """One utterance as an HTTP response body: a :class:`~ttsstream.core.utterance.Sink`
    whose subclasses say what the audio, words and end are written as.

    Args:
        asked: What the request asks for.
        args: Its request, error shape, id, CORS headers and SEND_TIMEOUT.
    """

    def __init__(self, asked: Asked, args: BodyArgs) -> None:
        self._request = args.request
        self._shape = args.shape
        self._request_id = args.request_id
        self._cors = args.cors
        self._send_timeout = args.send_timeout
        self._started: Started | None = None
        self._stream: web.StreamResponse | None = None
        #: What the handler returns: the stream once begun, else an answer given in full.
        self.response: web.StreamResponse = web.Response(status=500)
        #: Why the server cut the stream, if it did (a drain ran out of time, its key
        #: was revoked).
        self.cut: ClientError | None = None

    # The sink

    @property
    def gone(self) -> bool:
        transport = self._request.transport
        return transport is None or transport.is_closing()

    async def start(self, started: Started) -> None:
        self._started = started

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        await self._write(data)

    async def word(self, word: WordEvent) -> None:
        await self.words((word,))

    async def words(self, words: Sequence[WordEvent]) -> None:
        pass

    async def end(self, summary: Summary) -> None:
        await self._end()

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        if self._stream is None:
            self.response = self.error_response(exc)
            return
        # The audio cannot say it is incomplete: drop the connection before the
        # chunked body's end, so that the client sees a truncated transfer.
        self.abort()

    def hold(self, on: bool) -> None:
        pass  # a body's writes are not corked

    def finished(self) -> None:
        pass

    # For subclasses

    @property
    def content_type(self) -> str:
        """The body's ``Content-Type``."""
        started = self._started
        return started.audio_format.mime_type if started is not None else "audio/mpeg"

    def headers(self) -> dict[str, str]:
        """The headers sent with the first bytes."""
        started = self._started
        headers = {
            "Content-Type": self.content_type,
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
        return headers

    def error_response(self, exc: BaseException) -> web.Response:
        """The answer to an error before the first bytes, in the endpoint's shape."""
        headers = {"Content-Type": "application/json", **self._cors}
        headers["X-Request-Id"] = self._request_id
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(exc.retry_after)
        return web.Response(
            status=status_of(exc), body=error_body(exc, self._shape), headers=headers
        )

    async def _begin(
        self,
        content_length: int | None = None,
        *,
        status: int = 200,
        extra: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        """The response, its status and headers sent with the first bytes."""
        if self._stream is None:
            stream = web.StreamResponse(status=status, headers={**self.headers(), **(extra or {})})
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
        """Write within SEND_TIMEOUT; a client that does not read is dropped."""
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
            self.abort()
            raise TooSlow() from None

    async def _end(self) -> None:
        """Finish the body (its headers first, if nothing was written)."""
        stream = await self._begin()
        try:
            async with asyncio.timeout(self._send_timeout):
                await stream.write_eof()
        except (ConnectionError, TimeoutError):
            raise ListenerGone() from None

    def abort(self) -> None:
        """Drop the connection (a body that cannot end well)."""
        transport = self._request.transport
        if transport is not None:
            transport.abort()


class TooSlow(ListenerGone):
    """The client did not read the body within SEND_TIMEOUT."""

    outcome = "too_slow"


#: Makes a request's body (its sink) once what it asks for is read.
BodyMaker = Callable[[Asked, "BodyArgs"], StreamBody]


class BodyArgs(NamedTuple):
    """What every :class:`StreamBody` is made with (its keyword arguments)."""

    request: web.Request
    shape: Shape
    request_id: str
    cors: dict[str, str]
    send_timeout: float


class HttpStreams:
    """The speech requests of one HTTP door family, served as streams and drained.

    Args:
        services: The server's parts.
        label: The door's stats label.
    """

    def __init__(self, services: Services, label: str) -> None:
        self.label = label
        self._services = services
        self._config = services.config
        #: Streams in progress, for a drain: their tasks and bodies.
        self._streams: dict[asyncio.Task[Any], StreamBody] = {}
        #: Who each stream was admitted as (a revoked key's streams end).
        self._owners: dict[asyncio.Task[Any], Principal] = {}
        #: Requests reading their body (which a drain does not wait for: once read, a
        #: request is refused with ``shutting_down`` anyway).
        self._reading: set[asyncio.Task[Any]] = set()
        #: :meth:`stop` ran: the server stops.
        self._stopped = False
        self._idle = asyncio.Event()
        self._idle.set()

    # The door

    @property
    def in_progress(self) -> int:
        return len(self._streams)

    async def wait_idle(self) -> None:
        """Return once no stream is in progress."""
        await self._idle.wait()

    async def cut(self) -> None:
        self.stop()

    def revoke(self, holds: Callable[[Principal], bool]) -> int:
        """End the streams whose key no longer opens the server with ``key_revoked``;
        how many."""
        ended = 0
        for task, body in list(self._streams.items()):
            owner = self._owners.get(task)
            if owner is not None and not holds(owner) and body.cut is None:
                body.cut = KeyRevoked("this stream's API key was revoked")
                task.cancel()
                ended += 1
        return ended

    def stop(self) -> None:
        """Stop the streams still in progress (a drain ran out of time), and the requests
        still reading their body (answered 503 ``shutting_down``)."""
        self._stopped = True
        for task, body in list(self._streams.items()):
            body.cut = cut_short()
            task.cancel()
        for task in self._reading:
            task.cancel()

    # Serving

    def cors(self, request: web.Request) -> dict[str, str]:
        """The CORS headers of an answer to ``request`` (none for other origins)."""
        return self._services.admission.cors(request.headers.get("Origin"), EXPOSED_HEADERS)

    async def serve(
        self,
        request: web.Request,
        shape: Shape,
        read: Reader,
        body: BodyMaker,
        *,
        words: Callable[[Asked], str] = lambda asked: "none",
    ) -> web.StreamResponse:
        """Admit ``request``, read what it asks for, and stream its utterance into the
        body ``body`` makes; refusals and errors in the endpoint's ``shape``.

        Args:
            request: The request.
            shape: Its endpoint's error shape.
            read: Reads (and accepts) what it asks for.
            body: Makes its body.
            words: How the run gives its word boundaries.
        """
        # Before admission, which may ask Redis: the time to first audio includes it.
        received_at = time.perf_counter()
        admission = self._services.admission
        judged = await judge(admission, request)
        if judged.refused is not None:
            return self.refused(judged, shape)
        client = judged.client
        self._services.stats.total_requests += 1
        request_id = "h-" + secrets.token_hex(6)
        task = asyncio.current_task()
        assert task is not None
        try:
            self._reading.add(task)
            context = RequestContext(judged.principal, client, request_id, self.label)
            try:
                asked = await read()
                if not self._services.keys.holds(judged.principal):
                    # Revoked while the body was read: what it opened ends here.
                    raise KeyRevoked("this request's API key was revoked")
                await self._services.utterances.allow(
                    asked.synthesis, context, document=asked.document
                )
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
            sink = body(
                asked,
                BodyArgs(request, shape, request_id, self.cors(request), self._config.send_timeout),
            )
            self._streams[task] = sink
            self._owners[task] = judged.principal
            self._idle.clear()
            try:
                await self._services.utterances.run(
                    asked.synthesis,
                    sink,
                    words=words(asked),
                    audio_format=asked.audio_format,
                    utterance_id=request_id,
                    received_at=received_at,
                    context=context,
                    document=asked.document,
                )
            except asyncio.CancelledError:
                if sink.cut is None:
                    raise
                # Cut by a shutdown, which the run told the client (503 before the first
                # bytes, an SSE error event, or a truncated body).
            return sink.response
        finally:
            admission.release(client, judged.principal)
            self._streams.pop(task, None)
            self._owners.pop(task, None)
            if not self._streams:
                self._idle.set()

    def _unread(
        self, request: web.Request, exc: ClientError, shape: Shape, request_id: str
    ) -> web.Response:
        """The answer to a request refused as it was read, counted as an error."""
        self._services.stats.errors += 1
        response = self.error(request, exc, shape, request_id=request_id)
        if not request.content.is_eof():
            # Its body was not read to the end: the connection carries no other request.
            response.force_close()
        return response

    def refused(self, judged: Judged, shape: Shape) -> web.Response:
        """The refusal's answer, with the endpoint's error shape."""
        assert judged.answer is not None and judged.refused is not None
        answer = judged.answer
        body = answer.body if shape == "tts" else error_body(judged.refused, shape)
        return web.Response(status=answer.status, body=body, headers=dict(answer.headers))

    def error(
        self, request: web.Request, exc: BaseException, shape: Shape, *, request_id: str = ""
    ) -> web.Response:
        """An error's answer in the endpoint's shape, with CORS."""
        headers = {"Content-Type": "application/json", **self.cors(request)}
        if request_id:
            headers["X-Request-Id"] = request_id
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(exc.retry_after)
        return web.Response(status=status_of(exc), body=error_body(exc, shape), headers=headers)

    def json(self, request: web.Request, body: object) -> web.Response:
        """A JSON answer, with CORS."""
        return web.Response(
            body=orjson.dumps(body), content_type="application/json", headers=self.cors(request)
        )

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
                "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
                "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
                "Vary": "Origin",
            },
        )

    async def admit_list(self, request: web.Request, shape: Shape) -> web.StreamResponse | None:
        """Admission for a list (a request that holds no stream): a refusal, or ``None``.
        With ``PUBLIC_LISTS`` it needs no key."""
        judged = await judge(
            self._services.admission, request, needs_key=not self._config.public_lists
        )
        if judged.refused is not None:
            return self.refused(judged, shape)
        self._services.admission.release(judged.client, judged.principal)
        return None


async def json_body(request: web.Request) -> Any:
    """The request's JSON body, read to its end (at most 64 KiB, within BODY_TIMEOUT).

    Raises:
        UnsupportedMediaType: It is declared as something else than JSON.
        BodyTooLarge: It is over 64 KiB (as its length says, or as it comes).
        BodyTimeout: It did not arrive whole within BODY_TIMEOUT.
        BadJSON: It is not JSON, or ended early.
    """
    if request.content_type not in ("application/json", "application/octet-stream"):
        raise UnsupportedMediaType("send the body as JSON (Content-Type: application/json)")
    raw = await _body(request, ended_early=BadJSON)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadJSON("the body is not valid JSON") from None


async def ssml_body(request: web.Request) -> str:
    """The request's SSML body (``application/ssml+xml``), read to its end as
    :func:`json_body` reads JSON.

    Raises:
        BodyTooLarge: It is over 64 KiB.
        BodyTimeout: It did not arrive whole within BODY_TIMEOUT.
        BadMessage: It is not UTF-8, or ended early.
    """
    raw = await _body(request, ended_early=BadMessage)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadMessage("the SSML body is not UTF-8") from None


#: The media type of an SSML body.
SSML_TYPE = "application/ssml+xml"


async def _body(request: web.Request, *, ended_early: type[ClientError]) -> bytes:
    """A request's body, read to its end: at most 64 KiB, within BODY_TIMEOUT.

    Raises:
        BodyTooLarge: It is over 64 KiB (as its length says, or as it comes).
        BodyTimeout: It did not arrive whole within BODY_TIMEOUT.
        ClientError: ``ended_early``, the client closed its side before the body's end.
    """
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BodyTooLarge("the request body is over 64 KiB")
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return await _read_to_end(request.content)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {BODY_TIMEOUT:g} seconds"
        ) from None
    except ConnectionError:
        raise ended_early("the body ended early") from None


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
