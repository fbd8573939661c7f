"""One port, both protocols: WebSocket upgrades to websockets, everything else to aiohttp.

websockets listens on ``PORT`` and makes one :class:`SharedPortConnection` per TCP
connection. It stays the transport's protocol for the connection's whole life, and
is the connection's front door:

- At accept it counts the connection (:meth:`PortGate.opened`: per client IP and in
  total, so that idle kept-alive connections cannot take every file descriptor); a
  connection over a cap gets the refusal at once and is closed.
- It reads the first request head itself, bounded in size (a request line of
  :func:`request_line_limit`, header fields of ``MAX_HEAD_BYTES``) and time
  (``HEAD_TIMEOUT``), and decides: ``GET`` asking for ``Upgrade: websocket``
  becomes a WebSocket connection (websockets' own handshake runs on the head, with
  every check of the handshake); anything else goes, with the head, to an aiohttp
  request handler (the HTTP speech API, the demo files), which keeps the
  connection alive.
- aiohttp parses the later requests (it orders pipelined ones, and stops at an
  upgrade). A later ``GET`` asking for a WebSocket is handed back here by the HTTP
  door (:meth:`SharedPortConnection.upgrade`): a proxy such as nginx reuses its
  upstream connections, so the demo page's ``GET /``, its scripts and then its
  WebSocket may all come on one connection. A later head must also arrive within
  ``HEAD_TIMEOUT`` of its first byte (the door tells when each request starts and
  ends), and the door holds it to the same sizes (aiohttp's own line limit is set
  to the request line's).

The hand-over is what uvicorn does on an upgrade: websockets 17 cannot stream an
HTTP body and refuses methods other than GET, aiohttp can. Written by hand because
neither library offers one port for both.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, Protocol, cast

import orjson
from websockets.asyncio.server import ServerConnection

__all__ = [
    "HEAD_TIMEOUT",
    "MAX_HEAD_BYTES",
    "MAX_LINGERING_REFUSALS",
    "REFUSAL_LINGER",
    "REQUEST_LINE_SPARE",
    "PortGate",
    "SharedPortConnection",
    "front_of",
    "head_too_large",
    "http_response",
    "origin_of",
    "request_line_limit",
    "shared_port_connection",
]

# Limits
#: Most bytes of a request head's header fields, the request line aside.
MAX_HEAD_BYTES = 16 * 2**10
#: Bytes of a request line beside its text: the method, the path, the other parameters.
REQUEST_LINE_SPARE = 2 * 2**10
#: Most bytes one character takes percent-encoded in a URL (4 UTF-8 bytes, %XX each).
_ENCODED_CHAR_BYTES = 12
#: Refused connections kept open at once to read their heads; past it, a refused
#: connection is dropped at once (each holds a file descriptor).
MAX_LINGERING_REFUSALS = 64

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
#: A header line ``Origin: …``.
_ORIGIN = re.compile(rb"^origin:[ \t]*([^\r\n]*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def http_response(status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An HTTP/1.1 response that closes the connection, as bytes to write."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Server: ttsstream"]
    if not any(name.lower() == "content-type" for name, _ in headers):
        lines.append("Content-Type: application/json")
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def origin_of(head: bytes) -> str | None:
    """The ``Origin`` of a request head as received, if it has one."""
    found = _ORIGIN.search(head)
    return found.group(1).decode("latin-1") if found else None


def _error(status: int, code: str, message: str) -> bytes:
    return http_response(status, orjson.dumps({"error": code, "message": message}))


def request_line_limit(max_text_length: int) -> int:
    """The longest request line, in bytes: room for ``GET /tts?text=`` with
    ``max_text_length`` characters percent-encoded, and :data:`REQUEST_LINE_SPARE`."""
    return max_text_length * _ENCODED_CHAR_BYTES + REQUEST_LINE_SPARE


def head_too_large(line_limit: int) -> bytes:
    """The answer to a head over the limits (431 ``head_too_large``)."""
    return _error(
        431,
        "head_too_large",
        f"a request line holds at most {line_limit} bytes and the header fields at most "
        f"{MAX_HEAD_BYTES} bytes",
    )


_HEAD_TIMED_OUT = _error(
    408, "head_timeout", f"the request head did not arrive within {HEAD_TIMEOUT:g} seconds"
)
_BYTES_BEFORE_UPGRADE = _error(
    400, "bad_request", "no data may follow a WebSocket handshake request before its answer"
)


class PortGate(Protocol):
    """What the shared port asks of the server for each TCP connection."""

    #: The longest request line, in bytes (see :func:`request_line_limit`).
    line_limit: int

    def opened(self, peer: str) -> Callable[[bytes], bytes] | None:
        """Count a new connection from ``peer``; if it is over a cap, what makes the
        refusal to send from its request head (which may be empty: none came in time)."""

    def closed(self, peer: str) -> None:
        """A connection :meth:`opened` counted ended."""

    def http_protocol(self) -> asyncio.Protocol:
        """An aiohttp request handler for one connection."""

    def http_opened(self) -> None:
        """A connection began to serve HTTP."""

    def http_closed(self) -> None:
        """A connection that served HTTP ended or became a WebSocket."""


class _Fronts:
    """The shared port's connections that neither websockets nor aiohttp knows yet
    (reading their first head, or refused), so that closing the server can end them."""

    def __init__(self) -> None:
        self.unserved: set[SharedPortConnection] = set()
        self.lingering = 0

    def abort_unserved(self) -> None:
        for front in list(self.unserved):
            front.abort()


class SharedPortConnection(ServerConnection):
    """A connection of the shared port: WebSocket on an upgrade request, else HTTP.

    Until the first head is complete, nothing of websockets runs: its handler starts
    only for an upgrade. :attr:`gate` counts the connection and makes the aiohttp
    handler.
    """

    gate: PortGate
    fronts: _Fronts

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The first head, while it is read, and where its request line ends (-1: not yet).
        self._head = bytearray()
        self._line_end = -1
        #: Counted by the gate (its peer, to release it).
        self._peer: str | None = None
        #: The connection became a WebSocket: websockets handles everything now.
        self._upgraded = False
        #: Refused: what arrives is dropped.
        self._refused = False
        self._lingering = False
        #: Makes the answer of a connection refused at accept, until it is sent.
        self._refusal: Callable[[bytes], bytes] | None = None
        self._tcp: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: aiohttp's handler, once the connection serves HTTP.
        self._http: asyncio.Protocol | None = None
        #: Requests aiohttp is handling (the door tells).
        self._active = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        tcp = self._tcp = cast(asyncio.Transport, transport)
        self.fronts.unserved.add(self)
        peername = tcp.get_extra_info("peername")
        peer = str(peername[0]) if peername else ""
        refusal = self.gate.opened(peer)
        if refusal is not None:
            self._refuse_at_accept(refusal)
            return
        self._peer = peer
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._head_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            super().data_received(data)
        elif self._http is not None:
            if self._active == 0 and self._timer is None:
                # A later head begins: it has HEAD_TIMEOUT from its first byte.
                self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._late_head)
            self._http.data_received(data)
        elif self._refused:
            self._read_refused_head(data)
        else:
            self._read_head(data)

    def eof_received(self) -> None:
        # Returning None closes the transport, as websockets and aiohttp want.
        if self._upgraded:
            super().eof_received()
        elif self._http is not None:
            self._http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self.fronts.unserved.discard(self)
        if self._lingering:
            self._lingering = False
            self.fronts.lingering -= 1
        if self._upgraded:
            super().connection_lost(exc)
        elif self._http is not None:
            self._http.connection_lost(exc)
            self._http = None
            self.gate.http_closed()
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

    def abort(self) -> None:
        """Drop the connection now."""
        if self._tcp is not None:
            self._tcp.abort()

    # What the HTTP door tells of its requests

    def request_started(self) -> None:
        """aiohttp has a request's head and began to handle it."""
        self._active += 1
        self._stop_timer()

    def request_ended(self) -> None:
        """aiohttp's handler for a request of this connection returned."""
        self._active = max(0, self._active - 1)

    def upgrade(self, head: bytes, http: asyncio.Protocol) -> None:
        """Make this HTTP connection a WebSocket at a later request's ``head``.

        ``http`` (aiohttp's handler, handling that request) forgets the connection
        without closing it: with no transport it writes and closes nothing.
        """
        tcp = self._tcp
        assert tcp is not None and http is self._http
        cast(Any, http).transport = None
        http.connection_lost(None)
        self._http = None
        self.gate.http_closed()
        self._active = 0
        self._stop_timer()
        tcp.resume_reading()  # aiohttp pauses reading behind an upgrade
        self._upgraded = True
        super().connection_made(tcp)
        super().data_received(head)

    # The first head

    def _read_head(self, data: bytes) -> None:
        # Only the new bytes (and the 3 before them) can complete the blank line: a head
        # sent a byte at a time costs no rescan of what came before.
        searched = max(0, len(self._head) - 3)
        self._head += data
        line_limit = self.gate.line_limit
        if self._line_end < 0:
            self._line_end = self._head.find(b"\r\n", max(0, searched - 1))
        line_end = self._line_end
        end = self._head.find(_END_OF_HEAD, searched)
        if end >= 0:
            end += len(_END_OF_HEAD)
        # The line and the fields are held to their limits as they come.
        fields = (end if end >= 0 else len(self._head)) - line_end
        if (
            (line_end < 0 and len(self._head) > line_limit)
            or line_end > line_limit
            or (line_end >= 0 and fields > MAX_HEAD_BYTES)
        ):
            self._refuse(head_too_large(line_limit))
            return
        if end < 0:
            return
        received = bytes(self._head)
        self._head = bytearray()
        self._stop_timer()
        self.fronts.unserved.discard(self)
        tcp = self._tcp
        assert tcp is not None
        if _UPGRADE.search(received, 0, end) and received.startswith(b"GET "):
            if len(received) > end:
                self._refuse(_BYTES_BEFORE_UPGRADE)
                return
            self._upgraded = True
            super().connection_made(tcp)
            super().data_received(received)
            return
        http = self._http = self.gate.http_protocol()
        self.gate.http_opened()
        http.connection_made(tcp)
        http.data_received(received)

    def _late_head(self) -> None:
        """A later head did not arrive whole in time (or bytes came and no request)."""
        self._timer = None
        if self._active == 0 and not self._upgraded:
            self._head_timed_out()

    def _head_timed_out(self) -> None:
        """Answer 408 and close; drop the connection if it is not reading its answers."""
        self._timer = None
        tcp = self._tcp
        if tcp is None or tcp.is_closing():
            return
        if tcp.get_write_buffer_size():
            tcp.abort()
            return
        self._refuse(_HEAD_TIMED_OUT)

    def _refuse(self, response: bytes) -> None:
        """Answer ``response`` and close."""
        tcp = self._tcp
        assert tcp is not None
        self._refused = True
        self._head = bytearray()
        self._stop_timer()
        tcp.write(response)
        tcp.close()

    def _refuse_at_accept(self, refusal: Callable[[bytes], bytes]) -> None:
        """Refuse a connection over a cap once its head is read (so that a page may read
        why), or after ``REFUSAL_LINGER`` seconds; drop it at once while
        ``MAX_LINGERING_REFUSALS`` others wait."""
        tcp = self._tcp
        assert tcp is not None
        self._refused = True
        if self.fronts.lingering >= MAX_LINGERING_REFUSALS:
            tcp.abort()
            return
        self._refusal = refusal
        self._lingering = True
        self.fronts.lingering += 1
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self._answer_refusal)

    def _read_refused_head(self, data: bytes) -> None:
        if self._refusal is None:
            return  # answered: what follows is dropped until the connection closes
        searched = max(0, len(self._head) - 3)
        self._head += data
        limit = self.gate.line_limit + MAX_HEAD_BYTES
        if self._head.find(_END_OF_HEAD, searched) >= 0 or len(self._head) > limit:
            refusal, self._refusal = self._refusal, None
            assert self._tcp is not None
            self._tcp.write(refusal(bytes(self._head[:limit])))
            self._head = bytearray()
            # The connection closes when the linger ends (or the client closes first):
            # closing now with a body still arriving would reset it, answer unread.

    def _answer_refusal(self) -> None:
        self._timer = None
        tcp = self._tcp
        assert tcp is not None
        if self._refusal is not None:
            tcp.write(self._refusal(bytes(self._head)))
            self._refusal = None
        tcp.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def shared_port_connection(gate: PortGate) -> type[SharedPortConnection]:
    """The connection class for websockets' ``create_connection``, counting and serving
    HTTP through ``gate``; its ``fronts`` are the connections to end on closing."""
    return type(
        "SharedPortConnection", (SharedPortConnection,), {"gate": gate, "fronts": _Fronts()}
    )


def front_of(transport: asyncio.BaseTransport | None) -> SharedPortConnection | None:
    """The shared port's front of a connection aiohttp serves, if it is one."""
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, SharedPortConnection) else None
