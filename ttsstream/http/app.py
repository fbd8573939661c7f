"""The HTTP door on the WebSocket's port: the demo files, and JSON answers for the rest.

An aiohttp application served by aiohttp's low-level request handler, which
:mod:`ttsstream.port` gives every connection that does not ask for a WebSocket.
Unknown paths get 404 and wrong methods 405, both with the JSON error body of
refusals; a plain ``GET /v1/stream`` is judged like a handshake (so the browser
client learns why its WebSocket was refused) and, if admitted, answered 426.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from ttsstream.core.admission import HttpAnswer
from ttsstream.core.services import Services
from ttsstream.http.demo import load_static
from ttsstream.http.request import judge
from ttsstream.http.speech import SpeechApi

__all__ = ["STREAM_PATH", "HttpDoor"]

#: The one WebSocket endpoint of protocol v1.
STREAM_PATH = "/v1/stream"


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
        app = web.Application(middlewares=[_json_errors], client_max_size=64 * 2**10)
        app.router.add_get(STREAM_PATH, self._stream_without_upgrade)
        self.speech = SpeechApi(services)
        self.speech.routes(app)
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
        return server()

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
        self._services.admission.release(judged.client)
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


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404, 405 and 413 with the JSON body of refusals."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return json_error(404, "not_found", "no such endpoint")
    except web.HTTPMethodNotAllowed as exc:
        return json_error(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed here",
            Allow=", ".join(sorted(exc.allowed_methods)),
        )
    except web.HTTPRequestEntityTooLarge:
        return json_error(413, "body_too_large", "the request body is over 64 KiB")
