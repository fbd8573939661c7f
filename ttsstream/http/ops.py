"""The HTTP side port for operators: /health, /ready, /stats, /metrics, /voices.

Built on ``aiohttp.web`` with its two-phase ``AppRunner`` (``setup`` then
``cleanup``). It has no authentication: it is meant for internal networks, so
bind it to loopback (``HEALTH_HOST=127.0.0.1``) on a host that faces the internet.
Unknown paths get 404 and wrong methods 405 with the JSON error body of the main
port's HTTP door.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ttsstream import __version__
from ttsstream.core.voices import in_locale
from ttsstream.exceptions import ClientError
from ttsstream.http.app import json_error
from ttsstream.protocols.v1 import encode_voices
from ttsstream.services import Services

__all__ = ["OpsServer"]


class OpsServer:
    """The side port of one server.

    Args:
        services: The server's parts, which it reports on.
        state: The server's state now: ``starting``, ``serving``, ``draining`` or ``closed``.
    """

    def __init__(self, services: Services, *, state: Callable[[], str]) -> None:
        self._services = services
        self._state = state
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/voices", self.voices)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._site: web.TCPSite | None = None

    async def start(self) -> None:
        config = self._services.config
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, config.health_address, config.health_port)
        await self._site.start()

    async def close(self) -> None:
        await self._runner.cleanup()

    @property
    def port(self) -> int:
        """The port the side port listens on."""
        assert self._site is not None and self._site._server is not None
        sockets = self._site._server.sockets  # type: ignore[attr-defined]
        port: int = sockets[0].getsockname()[1]
        return port

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: 200 while the process works, whatever Microsoft's service does."""
        services = self._services
        config = services.config
        router = services.router
        breaker = router.breaker.status
        # Without Edge's voice list, voices are not checked before calling Edge.
        no_voice_list = router.edge_voices is None and router.edge_voices_error is not None
        cluster = services.cluster
        redis_down = cluster is not None and not cluster.up
        keys, usage = services.keys, services.usage
        troubled = keys.error is not None or usage.error is not None
        body = {
            "status": (
                "degraded"
                if breaker.state == "open" or no_voice_list or redis_down or troubled
                else "healthy"
            ),
            "uptime_seconds": round(services.stats.uptime_seconds, 3),
            "cache_enabled": config.cache_enabled,
            "rate_limit": (
                f"{config.rate_limit_requests}/{config.rate_limit_window:g}s"
                if config.rate_limit_requests
                else "off"
            ),
            "version": __version__,
            "upstream": {
                "state": breaker.state,
                "consecutive_failures": breaker.consecutive_failures,
                "last_error": breaker.last_error,
                "retry_in_seconds": breaker.retry_in_seconds,
                "voice_list": {
                    "voices": router.edge_voices,
                    "last_error": router.edge_voices_error,
                },
            },
            "fallback_voice": router.fallback_voice,
            "connections": services.stats.connections,
            "cluster": "redis" if cluster is not None else "single",
            "redis": cluster.snapshot() if cluster is not None else None,
            "keys": {
                "file": str(keys.path) if keys.path is not None else None,
                "tenants": len(keys.table.tenants),
                # Why the file was not reloaded (the last good keys are in force).
                "last_error": keys.error,
            },
            "usage": {"last_error": usage.error},
        }
        return _json(body)

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness: 503 before the WebSocket port listens and while draining."""
        state = self._state()
        return _json(
            {"ready": state == "serving", "state": state}, 200 if state == "serving" else 503
        )

    async def stats(self, request: web.Request) -> web.Response:
        cluster = self._services.cluster
        return _json(
            {
                **self._services.stats.snapshot(),
                # Each tenant's counts since this process started (GET /v1/usage and
                # `ttsstream keys usage` give the stored ones).
                "tenants": self._services.usage.snapshot(),
                "cluster": "redis" if cluster is not None else "single",
                "redis": cluster.snapshot() if cluster is not None else None,
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self._services.stats.metrics())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def voices(self, request: web.Request) -> web.Response:
        try:
            voices = await self._services.speech.voices()
        except ClientError as exc:
            return _json({"error": exc.code, "message": exc.message}, 503)
        wanted = request.query.get("locale")  # the same rule as on every door
        voices = [voice for voice in voices if in_locale(voice.locale, wanted)]
        return web.Response(body=encode_voices(voices), content_type="application/json")


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404 and 405 with the JSON body of refusals, as on the main port."""
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


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
