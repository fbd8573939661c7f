"""One port, both protocols: WebSocket upgrades to websockets, everything else to aiohttp.

websockets listens on ``PORT`` and makes one :class:`SharedPortConnection` per TCP
connection. It stays the transport's protocol for the connection's whole life, and
is the connection's front door:

- At accept it counts the connection (:meth:`PortGate.opened`: per client IP and in
  total, so that idle kept-alive connections cannot take every file descriptor); a
  connection over a cap gets the refusal at once and is closed.
- It reads each request head itself, bounded in size (``MAX_HEAD_BYTES``) and time
  (``HEAD_TIMEOUT`` from the head's first byte), and then decides:

  - ``GET`` asking for ``Upgrade: websocket`` becomes a WebSocket connection:
    websockets' own handshake runs on the head, with every check of the handshake;
  - any other request is given, with the head, to an aiohttp request handler (the
    HTTP speech API, the demo files), which answers it and keeps the connection
    alive; the next request head comes back here, so an upgrade is taken on any
    request of a kept-alive connection (a proxy such as nginx reuses its upstream
    connections: the demo page's ``GET /``, its scripts, then its WebSocket).

Between requests, the HTTP door tells the front when a request ended
(:meth:`SharedPortConnection.request_ended`). When the front cannot tell where the
next head starts (a body not read to its end, a pipelined request), it passes the
rest of the connection through to aiohttp, whose own limits (line and header sizes,
``IDLE_TIMEOUT`` between requests) still hold; only the WebSocket upgrade is then
refused (aiohttp answers it), never misread.

The hand-over is what uvicorn does on an upgrade: websockets 17 cannot stream an
HTTP body and refuses methods other than GET, aiohttp can. Written by hand because
neither library offers one port for both.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Protocol, cast

import orjson
from websockets.asyncio.server import ServerConnection

__all__ = [
    "HEAD_TIMEOUT",
    "MAX_HEAD_BYTES",
    "REFUSAL_LINGER",
    "PortGate",
    "SharedPortConnection",
    "front_of",
    "http_response",
    "shared_port_connection",
]

# Limits
#: Largest request head, in bytes (websockets' own limit is 8 KiB per line).
MAX_HEAD_BYTES = 16 * 2**10

# Timeouts
#: Seconds a client has to send a whole request head: the first from the connection's
#: start, each later one from its first byte.
HEAD_TIMEOUT = 10.0
#: Seconds a refused connection is kept to read its head, so that the refusal is read
#: before the connection closes (a close with unread bytes resets it).
REFUSAL_LINGER = 1.0

#: A header line ``Upgrade: websocket`` (any case; other protocols may be listed too).
_UPGRADE = re.compile(rb"^upgrade:[^\r\n]*\bwebsocket\b", re.IGNORECASE | re.MULTILINE)
_END_OF_HEAD = b"\r\n\r\n"
#: What ends a chunked body with no trailer.
_LAST_CHUNK = b"0\r\n\r\n"

_REASONS = {400: "Bad Request", 429: "Too Many Requests", 431: "Request Header Fields Too Large"}
_REASONS[503] = "Service Unavailable"


def http_response(status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An HTTP/1.1 response that closes the connection, as bytes to write."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    names = {name.lower() for name, _ in headers}
    if "content-type" not in names:
        lines.append("Content-Type: application/json")
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _error(status: int, code: str, message: str) -> bytes:
    return http_response(status, orjson.dumps({"error": code, "message": message}))


_HEAD_TOO_LARGE = _error(431, "bad_request", f"the request head is over {MAX_HEAD_BYTES} bytes")
_BYTES_BEFORE_UPGRADE = _error(
    400, "bad_request", "no data may follow a WebSocket handshake request before its answer"
)
_UPGRADE_PIPELINED = _error(
    400, "bad_request", "a WebSocket handshake may not follow requests still being answered"
)


class PortGate(Protocol):
    """What the shared port asks of the server for each TCP connection."""

    def opened(self, peer: str) -> bytes | None:
        """Count a new connection from ``peer``; the refusal to send if it is over a cap."""

    def closed(self, peer: str) -> None:
        """A connection :meth:`opened` counted ended."""

    def http_protocol(self) -> asyncio.Protocol:
        """An aiohttp request handler for one connection."""

    def http_opened(self) -> None:
        """A connection began to serve HTTP."""

    def http_closed(self) -> None:
        """A connection that served HTTP ended or became a WebSocket."""


class SharedPortConnection(ServerConnection):
    """A connection of the shared port: WebSocket on an upgrade request, else HTTP.

    Until a head is complete, nothing of websockets runs: its handler starts only
    for an upgrade. :attr:`gate` counts the connection and makes the aiohttp handler.
    """

    gate: PortGate

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The head being read (only while reading one).
        self._head = bytearray()
        #: Reading a head: the front decides what the next request is.
        self._reading_head = True
        #: Counted by the gate (its peer, to release it).
        self._peer: str | None = None
        #: The connection became a WebSocket: websockets handles everything now.
        self._upgraded = False
        #: Refused or closing: what arrives is dropped.
        self._done = False
        self._tcp: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: aiohttp's handler, once a request was HTTP.
        self._http: asyncio.Protocol | None = None
        #: Requests aiohttp is handling (the door's middleware tells).
        self._active = 0
        #: The front lost track of where heads start: aiohttp gets every byte.
        self._passthrough = False
        #: Bytes given to aiohttp since the last head, and their last few.
        self._after_head = 0
        self._tail = b""

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        tcp = self._tcp = cast(asyncio.Transport, transport)
        peername = tcp.get_extra_info("peername")
        peer = str(peername[0]) if peername else ""
        refusal = self.gate.opened(peer)
        if refusal is not None:
            self._refuse(refusal, linger=REFUSAL_LINGER)
            return
        self._peer = peer
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, tcp.abort)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            super().data_received(data)
        elif self._done:
            if _END_OF_HEAD in data and self._tcp is not None:
                self._tcp.close()  # the refusal was written: the head is read
        elif self._reading_head:
            self._read_head(data)
        else:
            self._to_http(data)

    def eof_received(self) -> None:
        # Returning None closes the transport, as websockets and aiohttp want.
        if self._upgraded:
            super().eof_received()
        elif self._http is not None and not self._reading_head:
            self._http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._upgraded:
            super().connection_lost(exc)
        elif self._http is not None:
            self._http.connection_lost(exc)
            self.gate.http_closed()
        self._done = True
        if self._peer is not None:
            self.gate.closed(self._peer)
            self._peer = None

    def pause_writing(self) -> None:
        if self._upgraded:
            super().pause_writing()
        elif self._http is not None:
            self._http.pause_writing()

    def resume_writing(self) -> None:
        if self._upgraded:
            super().resume_writing()
        elif self._http is not None:
            self._http.resume_writing()

    # The HTTP door's view of its requests

    def request_started(self) -> None:
        """aiohttp began to handle a request of this connection."""
        self._active += 1

    def request_ended(self, *, body_read: bool, body_length: int | None, chunked: bool) -> None:
        """aiohttp's handler for a request of this connection returned.

        Args:
            body_read: Its whole body arrived (aiohttp parsed it to the end).
            body_length: Its ``Content-Length``, if it had one.
            chunked: Its body came in chunks.
        """
        self._active = max(0, self._active - 1)
        if self._passthrough or self._reading_head or self._done or self._upgraded:
            return
        # The next byte starts a head only if aiohttp got exactly this request.
        if not body_read:
            aligned = False
        elif chunked:
            aligned = self._tail.endswith(_LAST_CHUNK)
        else:
            aligned = self._after_head == (body_length or 0)
        if aligned and self._active == 0:
            self._reading_head = True
        else:
            self._passthrough = True

    # Heads

    def _read_head(self, data: bytes) -> None:
        tcp = self._tcp
        assert tcp is not None
        if not self._head and self._http is not None:
            # A later head: its time counts from its first byte.
            self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, tcp.abort)
        # Only the new bytes (and the 3 before them) can complete the blank line: a head
        # sent a byte at a time costs no rescan of what came before.
        searched = max(0, len(self._head) - 3)
        self._head += data
        end = self._head.find(_END_OF_HEAD, searched)
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self._refuse(_HEAD_TOO_LARGE)
            return
        end += len(_END_OF_HEAD)
        if end > MAX_HEAD_BYTES:
            self._refuse(_HEAD_TOO_LARGE)
            return
        received = bytes(self._head)
        self._head = bytearray()
        self._stop_timer()
        if _UPGRADE.search(received, 0, end) and received.startswith(b"GET "):
            self._upgrade(received, end)
        else:
            self._reading_head = False
            self._after_head = -end  # what follows the head is counted from 0
            self._tail = b""
            self._to_http(received)

    def _upgrade(self, received: bytes, end: int) -> None:
        """Hand the connection to websockets at this head."""
        tcp = self._tcp
        assert tcp is not None
        if len(received) > end:
            self._refuse(_BYTES_BEFORE_UPGRADE)
            return
        http = self._http
        if http is not None:
            if self._active or tcp.get_write_buffer_size():
                self._refuse(_UPGRADE_PIPELINED)
                return
            # aiohttp forgets the connection without closing it: with no transport it
            # closes nothing, and its idle handler task ends.
            cast(Any, http).transport = None
            http.connection_lost(None)
            self._http = None
            self.gate.http_closed()
            tcp.resume_reading()
        self._upgraded = True
        super().connection_made(tcp)
        super().data_received(received)

    def _to_http(self, data: bytes) -> None:
        tcp = self._tcp
        assert tcp is not None
        http = self._http
        if http is None:
            http = self._http = self.gate.http_protocol()
            self.gate.http_opened()
            http.connection_made(tcp)
        if not self._passthrough:
            self._after_head += len(data)
            self._tail = (self._tail + data)[-len(_LAST_CHUNK) :]
        http.data_received(data)

    def _refuse(self, response: bytes, *, linger: float | None = None) -> None:
        """Answer ``response`` and close: at once, or once the head is read (at most
        ``linger`` seconds)."""
        tcp = self._tcp
        assert tcp is not None
        self._done = True
        self._head = bytearray()
        self._stop_timer()
        tcp.write(response)
        if linger is None:
            tcp.close()
        else:
            self._timer = asyncio.get_running_loop().call_later(linger, tcp.close)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def shared_port_connection(gate: PortGate) -> type[SharedPortConnection]:
    """The connection class for websockets' ``create_connection``, counting and serving
    HTTP through ``gate``."""
    return type("SharedPortConnection", (SharedPortConnection,), {"gate": gate})


def front_of(transport: asyncio.BaseTransport | None) -> SharedPortConnection | None:
    """The shared port's front of a connection aiohttp serves, if it is one."""
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, SharedPortConnection) else None
