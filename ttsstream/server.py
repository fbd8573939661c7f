"""The WebSocket server: handshake checks, sessions, and its lifecycle.

.. code-block:: python

    async with Server(config, engine) as server:
        await server.serve_forever()
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import signal
from types import TracebackType
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from ttsstream.breaker import CircuitBreaker
from ttsstream.cache import SpeechCache
from ttsstream.config import Config
from ttsstream.edge import EdgeEngine
from ttsstream.espeak import EspeakEngine
from ttsstream.exceptions import ClientError, ConfigError
from ttsstream.protocol import MAX_FRAME_BYTES
from ttsstream.session import Session
from ttsstream.speech import AUTO, SpeechRouter
from ttsstream.stats import Stats
from ttsstream.store import DiskCache

__all__ = ["STREAM_PATH", "Server", "run"]

logger = logging.getLogger("ttsstream.server")

#: The one WebSocket endpoint of protocol v1.
STREAM_PATH = "/v1/stream"


class Server:
    """A ttsstream server: an async context manager that listens while entered.

    Args:
        config: Every setting; ``config.host`` and ``config.port`` say where to listen
            (port 0 picks a free port: see :attr:`port`).
        router: Routes utterances to engines; by default built from ``config``.

    Raises:
        ConfigError: A voice setting names an offline voice that is not available.
    """

    def __init__(self, config: Config, router: SpeechRouter | None = None) -> None:
        self.config = config
        self.stats = Stats()
        self.store = (
            DiskCache(config.cache_dir, max_bytes=config.cache_max_bytes, stats=self.stats)
            if config.cache_enabled
            else None
        )
        self.speech = SpeechCache(router or speech_router(config), self.store, self.stats)
        self._server: WebSocketServer | None = None
        self._prefetch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the cache, start listening, and fetch the voice list in the background."""
        if self.store is not None:
            await asyncio.to_thread(self.store.open)
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._check_handshake,
            max_size=MAX_FRAME_BYTES,
            # MP3 does not compress; deflate would only cost CPU on every chunk.
            compression=None,
            server_header=None,
        )
        self._prefetch = asyncio.create_task(self._prefetch_voices())
        logger.info("listening on %s", ", ".join(self.addresses))

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of every listening socket."""
        assert self._server is not None, "server is not started"
        result = []
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            result.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return result

    @property
    def port(self) -> int:
        """The port the first listening socket is bound to."""
        assert self._server is not None, "server is not started"
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def connections(self) -> set[ServerConnection]:
        """The open WebSocket connections."""
        return set(self._server.connections) if self._server is not None else set()

    def close(self) -> None:
        """Stop accepting and close every connection with 1001 (going away). Idempotent."""
        if self._prefetch is not None:
            self._prefetch.cancel()
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        """Return once the listener is closed and every session has finished."""
        if self._server is not None:
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called or the task is cancelled."""
        assert self._server is not None, "server is not started"
        await self._server.serve_forever()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != STREAM_PATH:
            return _refuse(connection, http.HTTPStatus.NOT_FOUND, "not_found", "no such endpoint")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        session = Session(connection, config=self.config, speech=self.speech)
        logger.debug("conn=%s open from %s", session.connection_id, connection.remote_address)
        await session.run()
        logger.debug("conn=%s closed code=%s", session.connection_id, connection.close_code)

    async def _prefetch_voices(self) -> None:
        try:
            await self.speech.router.edge.voices()
        except ClientError as exc:
            logger.warning("voice list not available yet (%s); voices are not checked", exc.code)


def speech_router(config: Config, *, with_offline: bool = True) -> SpeechRouter:
    """Build the engines and the router that ``config`` describes.

    Args:
        config: The settings.
        with_offline: Load the offline voice when it is installed (tests turn it off
            to see a server without the ``local`` extra).

    Raises:
        ConfigError: ``DEFAULT_VOICE`` or ``FALLBACK_VOICE`` names an offline voice
            that is not available.
    """
    edge = EdgeEngine(
        wss_url=config.edge_wss_url,
        voices_url=config.edge_voices_url,
        timeout=config.upstream_timeout,
        voices_ttl=config.voices_ttl,
    )
    offline = EspeakEngine.load() if with_offline else None
    for variable, voice in (
        ("DEFAULT_VOICE", config.default_voice),
        ("FALLBACK_VOICE", config.fallback_voice),
    ):
        if voice is None or voice == AUTO or not voice.startswith("espeak:"):
            continue
        if offline is None:
            raise ConfigError(variable, voice, "an Edge voice: the offline voice is not installed")
        if not offline.has_voice(voice):
            raise ConfigError(variable, voice, "an offline voice listed by the voices message")
    if offline is None:
        logger.warning("fallback: none (no offline voice); Edge failures reach clients as errors")
    else:
        logger.info("fallback: %s", config.fallback_voice or "none")
    return SpeechRouter(
        edge=edge,
        offline=offline,
        fallback_voice=config.fallback_voice,
        breaker=CircuitBreaker(
            failure_threshold=config.breaker_failures, cooldown=config.breaker_cooldown
        ),
        retries=config.upstream_retries,
        concurrency=config.upstream_concurrency,
        timeout=config.upstream_timeout,
    )


def _refuse(
    connection: ServerConnection, status: http.HTTPStatus, code: str, message: str
) -> Response:
    """Refuse a handshake with a small JSON body instead of upgrading."""
    response = connection.respond(status, "")
    body = orjson.dumps({"error": code, "message": message})
    # Headers holds several values per name: replace, do not append.
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = "application/json"
    response.headers["Content-Length"] = str(len(body))
    response.body = body
    return response


async def run(config: Config) -> None:
    """Run a server until SIGINT or SIGTERM, then close it cleanly."""
    loop = asyncio.get_running_loop()
    async with Server(config) as server:
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("shutting down: closing %s", ", ".join(server.addresses))
