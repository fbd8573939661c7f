"""The server: its doors over the services, handshake checks, and its lifecycle.

.. code-block:: python

    async with Server(build_services(config)) as server:
        await server.serve_forever()
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from ttsstream import logs
from ttsstream.collector import Freezer
from ttsstream.config import Config
from ttsstream.core.admission import HttpAnswer
from ttsstream.core.auth import SUBPROTOCOL, offered_keys
from ttsstream.core.context import Principal, RequestContext
from ttsstream.doors import Door
from ttsstream.exceptions import CannotListen, HandshakeRefused, RateLimited
from ttsstream.http.app import STREAM_PATH, HttpDoor
from ttsstream.http.ops import OpsServer
from ttsstream.port import (
    PortGate,
    http_response,
    origin_of,
    request_line_limit,
    shared_port_connection,
)
from ttsstream.protocols.v1 import MAX_FRAME_BYTES
from ttsstream.routes import WEBSOCKET_ROUTES, WebSocketRoute, websocket_route
from ttsstream.services import Services, build_services
from ttsstream.ws.connection import Connections

__all__ = ["STREAM_PATH", "Server", "run"]

logger = logging.getLogger("ttsstream.server")

# Timeouts
#: Seconds a client has to complete the WebSocket handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a client gets to acknowledge the server's closing before the TCP connection drops.
CLOSE_TIMEOUT_AT_ONCE = 5.0
#: Seconds a draining server gives finished utterances waiting to be stored in the cache.
STORE_FLUSH_TIMEOUT = 5.0

# websockets logs request headers and frames at DEBUG: keys and text. Its logger
# stays at WARNING whatever LOG_LEVEL says.
_WEBSOCKETS_LOGGER = logging.getLogger("ttsstream.websockets")
_WEBSOCKETS_LOGGER.setLevel(logging.WARNING)


class Server:
    """A ttsstream server: an async context manager that listens while entered.

    Args:
        services: Every part, built by :func:`~ttsstream.services.build_services`;
            ``services.config.host`` and ``.port`` say where to listen (port 0 picks a
            free port: see :attr:`port`).
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.config = services.config
        self.stats = services.stats
        self._admission = services.admission
        #: Each admitted handshake: who, and the route it asked for (until its handler runs).
        self._admitted: dict[ServerConnection, _Admitted] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        #: starting, serving, draining or closed; /ready is 200 only while serving.
        self.state = "starting"
        self.ops = OpsServer(services, state=lambda: self.state)
        #: The WebSocket doors, one per stats label of the route table.
        self._websockets = {route.label: Connections(route.label) for route in WEBSOCKET_ROUTES}
        self._server: WebSocketServer | None = None
        self._port: int | None = None
        self._voice_list: asyncio.Task[None] | None = None
        #: The keys file's watch and the usage's batch writer.
        self._keepers: list[asyncio.Task[None]] = []
        self._ops_closed = False
        self._http_closed = False
        self.http = HttpDoor(services)
        #: Every door: what a drain waits for and cuts, what /stats shows per door.
        self.doors: list[Door] = [*self._websockets.values(), *self.http.doors]
        services.stats.door_labels = tuple(dict.fromkeys(door.label for door in self.doors))
        services.stats.doors_in_progress = self._by_door
        self._front = shared_port_connection(_Gate(services, self.http))

    async def start(self) -> None:
        """Start the side port, open the cache, listen, and fetch the voice list.

        Raises:
            CannotListen: A port cannot be listened on (which one, and why).
        """
        config = self.config
        try:
            await self.ops.start()
        except OSError as exc:
            raise CannotListen(
                "HEALTH_PORT", config.health_address, config.health_port, _reason(exc)
            ) from exc
        if self.services.store is not None:
            await asyncio.to_thread(self.services.store.open)
        if self.services.cluster is not None:
            await self.services.cluster.start()
        await self.http.start()
        try:
            self._server = await self._listen()
        except OSError as exc:
            raise CannotListen("PORT", config.host, config.port, _reason(exc)) from exc
        self._port = next(iter(self._server.sockets)).getsockname()[1]
        self._warn_about_access()
        self._voice_list = asyncio.create_task(
            self.services.router.keep_voices_fresh(self.config.voices_ttl)
        )
        self.services.keys.on_change(self.revoke)
        self._keepers = [
            asyncio.create_task(self.services.keys.watch()),
            asyncio.create_task(self.services.usage.run()),
            asyncio.create_task(self.services.stats.loop_lag.run()),
        ]
        self.state = "serving"
        logger.info(
            "listening on %s (side port %s:%d)",
            ", ".join(self.addresses),
            self.config.health_address,
            self.ops.port,
        )

    def revoke(self) -> int:
        """End what was opened with a key that no longer opens the server, on every door
        (``key_revoked``); how many connections and streams."""
        holds = self.services.keys.holds
        ended = sum(door.revoke(holds) for door in self.doors)
        if ended:
            logger.info("keys changed: %d connections and streams ended (key_revoked)", ended)
        return ended

    def reload_keys(self) -> None:
        """Read ``API_KEYS_FILE`` again (SIGHUP)."""
        self.services.keys.reload()

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
        """The port the first listening socket is bound to (kept after it closed)."""
        assert self._port is not None, "server is not started"
        return self._port

    @property
    def connections(self) -> set[ServerConnection]:
        """The open WebSocket connections."""
        return set(self._server.connections) if self._server is not None else set()

    def close(self) -> None:
        """Stop accepting and close every connection with 1001 (going away). Idempotent."""
        self.state = "closed"
        # Dropped connections stop waiting for their client: they end with the server.
        self.services.parking.close()
        if self._voice_list is not None:
            self._voice_list.cancel()
        self.http.stop()
        if self._server is not None:
            self._server.close()
            # After a drain the listener is already closed; close what is still open.
            for connection in self.connections:
                self._spawn_close(connection, CLOSE_TIMEOUT_AT_ONCE)
        # Connections still sending their first head belong to no door yet.
        self._front.fronts.abort_unserved()

    async def wait_closed(self) -> None:
        """Return once the listener is closed, every session has finished, the side
        port is down and the engines are closed."""
        if self.state == "closed" and not self._http_closed:
            # HTTP connections first: the listener's own wait (Python 3.12 and newer)
            # waits for every connection, kept-alive ones too.
            self._http_closed = True
            await self.http.close(CLOSE_TIMEOUT_AT_ONCE)
        if self._server is not None:
            await self._server.wait_closed()
        if not self._ops_closed:
            self._ops_closed = True
            if not self._http_closed:
                self._http_closed = True
                await self.http.close(CLOSE_TIMEOUT_AT_ONCE)
            await self.ops.close()
            for keeper in self._keepers:
                keeper.cancel()
            if self._keepers:
                await asyncio.wait(self._keepers)
            await self.services.usage.close()
            await self.services.router.aclose()
            if self.services.cluster is not None:
                await self.services.cluster.aclose()

    async def drain(self, grace: float) -> None:
        """Shut down gracefully: stop taking work, let utterances finish, then close.

        /ready turns 503 and the listener closes at once; new ``speak`` messages get
        ``shutting_down``; utterances queued or playing get ``grace`` seconds to
        finish, and those that did not then get a ``shutting_down`` error (saying
        whether their audio is partial); then every connection is closed with 1001.
        """
        if self.state != "serving" or self._server is None:
            return
        self.state = "draining"
        self._server.close(close_connections=False)
        # Nobody can come back to a dropped connection now: they end with their work.
        self.services.parking.close()
        self.services.utterances.draining = True
        doors = self.doors
        waiting = self._in_progress()
        logger.info(
            "draining: %d utterances in progress (%s), %.0fs to finish",
            waiting,
            ", ".join(f"{door.label} {door.in_progress}" for door in doors),
            grace,
        )
        if waiting:
            idle = [asyncio.create_task(door.wait_idle()) for door in doors]
            _, late = await asyncio.wait(idle, timeout=grace)
            for task in late:
                task.cancel()
        unfinished = self._in_progress()
        # What is left is cut: each utterance learns it, before the connection closes.
        cuts = [asyncio.create_task(door.cut()) for door in doors]
        _, late = await asyncio.wait(cuts, timeout=CLOSE_TIMEOUT_AT_ONCE)
        for task in late:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STORE_FLUSH_TIMEOUT):
                await self.services.speech.finish_stores()
        logger.info(
            "drained: %d of %d utterances finished, %d cut",
            waiting - unfinished,
            waiting,
            unfinished,
        )
        self.close()

    def _by_door(self) -> dict[str, int]:
        """What is in progress on each door, by label."""
        counts = dict.fromkeys((door.label for door in self.doors), 0)
        for door in self.doors:
            counts[door.label] += door.in_progress
        return counts

    def _in_progress(self) -> int:
        """Utterances queued or playing, and HTTP streams, on every door."""
        return sum(door.in_progress for door in self.doors)

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

    async def _listen(self) -> WebSocketServer:
        return await serve(
            self._handle,
            self.config.host,
            self.config.port,
            # One port: connections that do not ask for a WebSocket go to the HTTP door.
            create_connection=self._front,
            process_request=self._check_handshake,
            select_subprotocol=_select_subprotocol,
            # Timeouts
            open_timeout=HANDSHAKE_TIMEOUT,
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_interval,
            # Limits
            max_size=MAX_FRAME_BYTES,
            # MP3 does not compress; deflate would only cost CPU on every chunk.
            compression=None,
            server_header=None,
            logger=_WEBSOCKETS_LOGGER,
        )

    def _warn_about_access(self) -> None:
        if not _is_loopback(self.config.health_address):
            logger.warning(
                "the side port %s:%d is reachable from other hosts (HEALTH_HOST): /stats, "
                "/metrics and /voices need no key; keep it on a private network",
                self.config.health_address,
                self.ops.port,
            )
        loopback = _is_loopback(self.config.host)
        keys_required = self._admission.keys.required
        if not keys_required and not loopback:
            logger.warning(
                "no TTS_API_KEY: anyone who can reach %s:%s can use this server",
                self.config.host,
                self.config.port,
            )
        if keys_required and self.config.allowed_origins is None:
            logger.warning(
                "API keys are set but ALLOWED_ORIGINS allows every origin: any web page "
                "that learns a key can use it from visitors' browsers"
            )

    async def _check_handshake(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """Admit the handshake, or answer it with an HTTP error and no upgrade."""
        peer = connection.remote_address[0] if connection.remote_address else ""
        ip = self._admission.client_ip(request.headers, peer)
        routed = websocket_route(request.path)
        # A protocol that takes the key in its first message is admitted without one here.
        key_later = (
            routed is not None
            and routed[0].key_in_first_message
            and self._admission.keys.required
            and not offered_keys(request.headers, request.path)
        )
        try:
            principal = await self._admission.admit(
                request.path,
                request.headers,
                ip,
                endpoint=routed is not None,
                needs_key=not key_later,
            )
        except (HandshakeRefused, RateLimited) as refused:
            answer = self._admission.answer(
                refused, headers=request.headers, client=ip, path=request.path
            )
            return _respond(connection, answer)
        assert routed is not None
        route, params = routed
        self._admitted[connection] = _Admitted(
            ip, principal, route, params, request.path, key_later
        )
        watcher = asyncio.create_task(self._release_when_closed(connection, ip, principal))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return None

    def _spawn_close(self, connection: ServerConnection, grace: float) -> None:
        task = asyncio.create_task(_close_within(connection, grace))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _release_when_closed(
        self, connection: ServerConnection, ip: str, principal: Principal
    ) -> None:
        try:
            await connection.wait_closed()
        finally:
            self._admission.release(ip, principal)
            self._admitted.pop(connection, None)

    async def _handle(self, connection: ServerConnection) -> None:
        admitted = self._admitted.pop(connection)
        route = admitted.route
        context = RequestContext(
            admitted.principal, admitted.ip, connection.id.hex[:12], route.label
        )
        served = route.connection(
            connection,
            services=self.services,
            context=context,
            path=admitted.path,
            params=admitted.params,
            key_pending=admitted.key_later,
        )
        door = self._websockets[route.label]
        door.add(served)
        if not self.services.keys.holds(admitted.principal):
            # Revoked between the handshake and now: ended as the others were.
            door.revoke(self.services.keys.holds)
        self.stats.connections += 1
        logger.debug("conn=%s open ip=%s door=%s", context.connection, admitted.ip, route.label)
        try:
            await served.run()
        finally:
            self.stats.connections -= 1
            door.discard(served)
        logger.debug("conn=%s closed code=%s", context.connection, connection.close_code)


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A WebSocket handshake admitted, waiting for its handler."""

    ip: str
    principal: Principal
    route: WebSocketRoute
    params: Mapping[str, str]
    path: str
    #: The key is to come in the first message.
    key_later: bool


class _Gate(PortGate):
    """The shared port's questions about each TCP connection, answered by admission (its
    caps), the stats and the HTTP door."""

    def __init__(self, services: Services, http: HttpDoor) -> None:
        self._admission = services.admission
        self._stats = services.stats
        self._http = http
        self.line_limit = request_line_limit(services.config.max_text_length)

    def opened(self, peer: str) -> Callable[[bytes], bytes] | None:
        refused = self._admission.open_socket(peer)
        if refused is None:
            return None

        def answer(head: bytes) -> bytes:
            readable = self._admission.readable(refused, origin=origin_of(head))
            return http_response(readable.status, readable.body, readable.headers)

        return answer

    def closed(self, peer: str) -> None:
        self._admission.close_socket(peer)

    def http_protocol(self) -> asyncio.Protocol:
        return self._http.protocol()

    def http_opened(self) -> None:
        self._stats.http_connections += 1

    def http_closed(self) -> None:
        self._stats.http_connections -= 1


async def _close_within(connection: ServerConnection, grace: float) -> None:
    """Close with 1001; drop the TCP connection if the client does not take the close."""
    try:
        async with asyncio.timeout(grace):
            await connection.close(1001, "server shutting down")
    except TimeoutError:
        connection.transport.abort()


def _respond(connection: ServerConnection, answer: HttpAnswer) -> Response:
    """The websockets response for an answer: its status, headers and body."""
    response = connection.respond(answer.status, "")
    # Headers holds several values per name: replace, do not append.
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    for name, value in answer.headers:
        response.headers[name] = value
    response.headers["Content-Length"] = str(len(answer.body))
    response.body = answer.body
    return response


def _select_subprotocol(
    connection: ServerConnection, subprotocols: Sequence[Subprotocol]
) -> Subprotocol | None:
    """Select ``ttsstream.v1`` when offered, never a ``key.`` one; none is fine too."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in subprotocols else None


async def run(config: Config) -> None:
    """Run a server until SIGINT or SIGTERM, then drain it; a second signal closes at once.

    SIGHUP reopens the log files and reloads ``API_KEYS_FILE``.
    """
    loop = asyncio.get_running_loop()
    _fit_file_limit(config.max_connections)
    server = Server(build_services(config))
    try:
        await server.start()
    except BaseException:
        server.close()
        await server.wait_closed()
        raise
    # What startup made (modules, the voice lists, the offline voice) lives as long as
    # the process, and what live streams hold dies by reference counting: the
    # collector found nothing in either at 300 and 1,000 clients, but walked all of
    # it, up to 400 ms at once (bench/NOTES.md). Freezer.start() freezes what startup
    # made, then what is alive every second; everything is collected once only when
    # the frozen objects grew by a quarter (ttsstream/collector.py).
    freezer = Freezer()
    freezer.start()
    signals = asyncio.Queue[int]()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, signals.put_nowait, signum)
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, _on_hangup, server)
    first = await signals.get()
    logger.info("%s: shutting down", signal.Signals(first).name)
    drain = asyncio.create_task(server.drain(config.drain_timeout))
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        logger.warning("second signal: closing every connection now")
        drain.cancel()
    second.cancel()
    freezer.stop()
    server.close()
    await server.wait_closed()
    logger.info("stopped")


def _on_hangup(server: Server) -> None:
    logs.reopen()
    server.reload_keys()


#: File descriptors kept beside the connections: the cache, logs, Redis, Edge, the side port.
SPARE_FILES = 256


def _fit_file_limit(max_connections: int) -> None:
    """Raise the open-file limit toward ``MAX_CONNECTIONS``, as far as the hard limit
    allows; warn when connections could still run out of file descriptors first."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning(
            "the open-file limit (%d) is below MAX_CONNECTIONS (%d) plus %d: past about "
            "%d connections, new ones and /health fail; raise the limit (LimitNOFILE=, "
            "ulimit -n) or lower MAX_CONNECTIONS",
            soft,
            max_connections,
            SPARE_FILES,
            soft - SPARE_FILES,
        )


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name
        return False


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
