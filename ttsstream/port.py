"""One port, both protocols: WebSocket upgrades to websockets, everything else to aiohttp.

websockets listens on ``PORT`` and makes one :class:`SharedPortConnection` per TCP
connection. It reads the request head (bounded in size and time, so a slow-loris
head costs a timer and at most ``MAX_HEAD_BYTES``) and then decides, once:

- a request asking for ``Upgrade: websocket`` becomes a WebSocket connection:
  websockets' own handshake runs on the head, with every check of the handshake;
- any other request is handed, with the head already read, to an aiohttp
  request handler (the HTTP speech API, the demo files), which keeps the
  connection alive for the requests that follow.

The hand-over is what uvicorn does on an upgrade, the other way round
(``transport.set_protocol``, ``connection_made``, ``data_received``): websockets
17 cannot stream an HTTP body and refuses methods other than GET, aiohttp can.
Written by hand because neither library offers one port for both.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, cast

from websockets.asyncio.server import ServerConnection

__all__ = ["HEAD_TIMEOUT", "MAX_HEAD_BYTES", "SharedPortConnection", "shared_port_connection"]

#: Largest request head read before deciding (websockets' own limit is 8 KiB per line).
MAX_HEAD_BYTES = 16 * 2**10
#: Seconds a client has to send its first request head.
HEAD_TIMEOUT = 10.0

#: A header line ``Upgrade: websocket`` (any case; other protocols may be listed too).
_UPGRADE = re.compile(rb"^upgrade:[^\r\n]*\bwebsocket\b", re.IGNORECASE | re.MULTILINE)
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"Content-Type: application/json\r\nContent-Length: 71\r\nConnection: close\r\n\r\n"
    b'{"error":"bad_request","message":"the request head is over 16384 bytes"}'
)


class SharedPortConnection(ServerConnection):
    """A connection of the shared port: WebSocket on an upgrade request, else HTTP.

    Until the head is complete, nothing of websockets runs: its handler starts only
    for an upgrade. :attr:`http_protocol` makes the aiohttp handler for the rest.
    """

    #: Makes the asyncio protocol that serves a plain HTTP connection.
    http_protocol: Callable[[], asyncio.Protocol]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = bytearray()
        self._decided = False
        #: The connection became a WebSocket: websockets handles everything now.
        self._upgraded = False
        self._waiting: asyncio.Transport | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._waiting = cast(asyncio.Transport, transport)
        self._head_timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._waiting.abort)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            super().data_received(data)
            return
        if self._decided:
            return  # refused: closing
        transport = self._waiting
        assert transport is not None
        # Only the new bytes (and the 3 before them) can complete the blank line: a head
        # sent a byte at a time costs no rescan of what came before.
        searched = max(0, len(self._head) - 3)
        self._head += data
        end = self._head.find(b"\r\n\r\n", searched)
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self._decide()
                transport.write(_HEAD_TOO_LARGE)
                transport.close()
            return
        head = bytes(self._head)
        self._decide()
        if _UPGRADE.search(head, 0, end):
            self._upgraded = True
            super().connection_made(transport)
            super().data_received(head)
            return
        handler = self.http_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(head)

    def eof_received(self) -> None:
        # Returning None closes the transport, as websockets wants at the end too.
        if self._upgraded:
            super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._upgraded:
            super().connection_lost(exc)
        else:
            self._decide()

    def pause_writing(self) -> None:
        if self._upgraded:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self._upgraded:
            super().resume_writing()

    def _decide(self) -> None:
        self._decided = True
        self._head = bytearray()
        if self._head_timer is not None:
            self._head_timer.cancel()


def shared_port_connection(
    http_protocol: Callable[[], asyncio.Protocol],
) -> type[SharedPortConnection]:
    """The connection class for websockets' ``create_connection``, serving HTTP with
    ``http_protocol``."""
    return type(
        "SharedPortConnection",
        (SharedPortConnection,),
        {"http_protocol": staticmethod(http_protocol)},
    )
