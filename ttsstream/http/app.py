"""The HTTP door on the WebSocket's port: the demo files, and JSON answers for the rest.

An aiohttp application served by aiohttp's low-level request handler, which
:mod:`ttsstream.port` gives every request that does not ask for a WebSocket.
Unknown paths get 404 and wrong methods 405, both with the JSON error body of
refusals; a plain ``GET /v1/stream`` is judged like a handshake (so the browser
client learns why its WebSocket was refused) and, if admitted, answered 426.
A request that is not valid HTTP gets 400 ``bad_request`` and one rate-limited
log line, never a traceback. A kept-alive connection idles out after
``IDLE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from ttsstream.core.admission import HttpAnswer
from ttsstream.http.demo import load_static
from ttsstream.http.errors import in_shape_of
from ttsstream.http.request import judge
from ttsstream.http.streams import HttpStreams
from ttsstream.port import MAX_HEAD_BYTES, front_of, head_too_large, request_line_limit
from ttsstream.routes import HTTP_DOORS, WEBSOCKET_ROUTES
from ttsstream.services import Services

__all__ = ["MALFORMED_LOG_INTERVAL", "STREAM_PATH", "HttpDoor"]

logger = logging.getLogger("ttsstream.http")

#: The one WebSocket endpoint of protocol v1.
STREAM_PATH = "/v1/stream"
#: Seconds between two log lines about requests that are not valid HTTP (the ones
#: between are counted in the next line).
MALFORMED_LOG_INTERVAL = 10.0


def answer(http: HttpAnswer) -> web.Response:
    """The aiohttp response for an answer given in full."""
    return web.Response(status=http.status, body=http.body, headers=dict(http.headers))


def json_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    """A refusal's JSON body: ``{"error": code, "message": …}``."""
    return web.Response(
        status=status,
        body=orjson.dumps({"error": code, "message": message}),
        content_type="application/json",
        headers=headers,
    )


class HttpDoor:
    """The aiohttp application of the shared port, and its lifecycle.

    Args:
        services: The server's parts.
    """

    def __init__(self, services: Services) -> None:
        self._services = services
        self._static = load_static() if services.config.serve_demo else {}
        self._idle_timeout = services.config.idle_timeout
        self._line_limit = request_line_limit(services.config.max_text_length)
        self._malformed = _MalformedLog()
        # _json_errors outermost: the front door's answers (a later head's 431) are shaped too.
        app = web.Application(middlewares=[_json_errors, _front_door], client_max_size=64 * 2**10)
        # A WebSocket endpoint asked without an upgrade is judged like a handshake.
        for route in WEBSOCKET_ROUTES:
            app.router.add_get(route.path, self._stream_without_upgrade)
        self.doors: list[HttpStreams] = []
        for make_door in HTTP_DOORS:
            door = make_door(services)
            door.routes(app)
            self.doors += door.doors
        for path in self._static:
            app.router.add_get(path, self._static_file)
        app.on_response_prepare.append(_server_header)
        self.app = app
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        await self._runner.setup()

    def protocol(self) -> asyncio.Protocol:
        """A request handler for one connection (aiohttp's low-level server)."""
        server = self._runner.server
        assert server is not None, "the HTTP door is not started"
        return _RequestHandler(
            server,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self._idle_timeout,
            max_line_size=self._line_limit,
            access_log=None,
            malformed=self._malformed,
        )

    def stop(self) -> None:
        """Stop every stream still in progress (the server closes now)."""
        for door in self.doors:
            door.stop()

    async def close(self, grace: float) -> None:
        """Close keep-alive connections, giving requests in progress ``grace`` seconds."""
        server = self._runner.server
        if server is not None:
            server.pre_shutdown()  # idle keep-alive connections close now
            await server.shutdown(grace)
        await self._runner.cleanup()

    async def _static_file(self, request: web.Request) -> web.Response:
        return answer(self._static[request.path])

    async def _stream_without_upgrade(self, request: web.Request) -> web.Response:
        """Judge it as a handshake; a browser page learns from the answer why it was refused."""
        judged = await judge(self._services.admission, request)
        if judged.answer is not None:
            return answer(judged.answer)
        self._services.admission.release(judged.client, judged.principal)
        return json_error(
            426,
            "upgrade_required",
            "this endpoint speaks WebSocket: connect with an Upgrade request",
            Upgrade="websocket",
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _server_header(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """Name the server without giving away versions (aiohttp's default does)."""
    response.headers["Server"] = "ttsstream"


class _MalformedLog:
    """One log line per ``MALFORMED_LOG_INTERVAL`` about requests that are not HTTP."""

    def __init__(self) -> None:
        self._next = 0.0
        self._unlogged = 0

    def note(self, client: str | None, status: int) -> None:
        now = time.monotonic()
        if now < self._next:
            self._unlogged += 1
            return
        more, self._unlogged = self._unlogged, 0
        self._next = now + MALFORMED_LOG_INTERVAL
        logger.warning(
            "malformed HTTP request from %s: answered %d (%d more since the last line)",
            client or "?",
            status,
            more,
        )


class _RequestHandler(web.RequestHandler):
    """aiohttp's handler, answering requests that are not valid HTTP with JSON and a
    rate-limited line instead of a traceback (what the request held is never logged)."""

    def __init__(self, *args: object, malformed: _MalformedLog, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._malformed = malformed
        self._line_limit = self.max_line_size

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # a fault of ours: its traceback is wanted
            return super().handle_error(request, status, exc, message)
        self._malformed.note(request.remote, status)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was sent already")
        if isinstance(exc, LineTooLong):  # a request line or a header field too long
            return _too_large(self._line_limit)
        response = _closing(status, "the request is not valid HTTP/1.1")
        # aiohttp's on_response_prepare does not run for a request it could not parse.
        response.headers["Server"] = "ttsstream"
        return response


@web.middleware
async def _front_door(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the shared port's front when each request starts and ends (a later head's
    deadline), hold a later head to its size, and hand a later WebSocket handshake
    back to the front (an upgrade that is not a ``GET`` is refused)."""
    front = front_of(request.transport)
    if front is None:
        return await handler(request)
    front.request_started()
    try:
        # The header fields as received (aiohttp held the request line to its limit).
        fields = sum(len(name) + len(value) + 4 for name, value in request.raw_headers) + 2
        if fields > MAX_HEAD_BYTES:
            return _too_large(front.gate.line_limit)
        if "websocket" in request.headers.get("Upgrade", "").lower():
            if request.method != "GET":
                return _closing(400, "a WebSocket handshake is a GET request")
            # aiohttp keeps what came after an upgrade's head here, unparsed.
            if getattr(request.protocol, "_message_tail", b""):
                return _closing(
                    400, "no data may follow a WebSocket handshake request before its answer"
                )
            front.upgrade(_head_of(request), request.protocol)
            return web.Response()  # never sent: aiohttp has no transport any more
        return await handler(request)
    finally:
        front.request_ended()


def _head_of(request: web.BaseRequest) -> bytes:
    """The request's head as it came (request line and headers, as received)."""
    version = request.version
    line = f"{request.method} {request.raw_path} HTTP/{version.major}.{version.minor}\r\n"
    fields = b"".join(name + b": " + value + b"\r\n" for name, value in request.raw_headers)
    return line.encode("latin-1") + fields + b"\r\n"


def _too_large(line_limit: int) -> web.Response:
    """431 ``head_too_large`` (the same body as the shared port's), closing."""
    body = head_too_large(line_limit).split(b"\r\n\r\n", 1)[1]
    response = web.Response(status=431, body=body, content_type="application/json")
    response.force_close()
    response.headers["Server"] = "ttsstream"
    return response


def _closing(status: int, message: str) -> web.Response:
    """A ``bad_request`` answer that closes the connection (what follows is not trusted)."""
    response = json_error(status, "bad_request", message)
    response.force_close()
    return response


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404, 405 and 413 with the JSON body of refusals, and every error
    answer in the shape of its path (OpenAI's under ``/v1/``)."""
    try:
        response = await handler(request)
    except web.HTTPNotFound:
        response = json_error(404, "not_found", "no such endpoint")
    except web.HTTPMethodNotAllowed as exc:
        response = json_error(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed here",
            Allow=", ".join(sorted(exc.allowed_methods)),
        )
    except web.HTTPRequestEntityTooLarge:
        response = json_error(413, "body_too_large", "the request body is over 64 KiB")
    return in_shape_of(request.path, response)
