"""The route table: every WebSocket endpoint of the shared port and the connection
class that serves it, in one place.

A route's path may hold ``{name}`` parts (a voice id), which match one path
segment and reach the connection as ``params``. The HTTP door answers a plain
``GET`` of any of these paths as it answers a refused or an unupgraded handshake
(:mod:`ttsstream.http.app`). HTTP endpoints are registered by the HTTP doors
listed in :data:`HTTP_DOORS`.

Adding a WebSocket door is a protocol module (:mod:`ttsstream.protocols`), a
connection class (:mod:`ttsstream.ws`) and a line here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote, urlsplit

from aiohttp import web

from ttsstream.http.azure import AzureApi
from ttsstream.http.cartesia import CartesiaApi
from ttsstream.http.elevenlabs import ElevenLabsApi
from ttsstream.http.speech import SpeechApi
from ttsstream.http.streams import HttpStreams
from ttsstream.services import Services
from ttsstream.ws.cartesia import CartesiaSocket
from ttsstream.ws.connection import Connection
from ttsstream.ws.elevenlabs import ElevenLabsMultiStream, ElevenLabsStream
from ttsstream.ws.session import Session

__all__ = ["HTTP_DOORS", "WEBSOCKET_ROUTES", "HttpDoorFamily", "WebSocketRoute", "websocket_route"]


@dataclass(frozen=True, slots=True)
class WebSocketRoute:
    """One WebSocket endpoint."""

    #: Its path; ``{name}`` matches one segment.
    path: str
    #: Serves each connection.
    connection: type[Connection]
    #: The protocol may carry the key in its first message (ElevenLabs' ``xi_api_key``):
    #: a handshake without any key is admitted, and its first message must bring one.
    key_in_first_message: bool = False
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = re.split(r"\{(\w+)\}", self.path)
        regex = "".join(
            re.escape(part) if index % 2 == 0 else f"(?P<{part}>[^/]+)"
            for index, part in enumerate(parts)
        )
        object.__setattr__(self, "_pattern", re.compile(regex))

    @property
    def label(self) -> str:
        """The door's stats label."""
        return self.connection.label

    def match(self, path: str) -> Mapping[str, str] | None:
        """The ``{name}`` values if ``path`` (maybe with a query) is this route's."""
        found = self._pattern.fullmatch(urlsplit(path).path)
        if found is None:
            return None
        return {name: unquote(value) for name, value in found.groupdict().items()}


class HttpDoorFamily(Protocol):
    """An HTTP door: it adds its routes to the application, and drains as its doors."""

    def __init__(self, services: Services) -> None: ...

    def routes(self, app: web.Application) -> None:
        """Add the door's routes."""

    @property
    def doors(self) -> list[HttpStreams]:
        """Its streams, for a drain and the stats."""


WEBSOCKET_ROUTES: tuple[WebSocketRoute, ...] = (
    WebSocketRoute("/v1/stream", Session),
    WebSocketRoute(
        "/v1/text-to-speech/{voice_id}/stream-input", ElevenLabsStream, key_in_first_message=True
    ),
    WebSocketRoute(
        "/v1/text-to-speech/{voice_id}/multi-stream-input",
        ElevenLabsMultiStream,
        key_in_first_message=True,
    ),
    WebSocketRoute("/tts/websocket", CartesiaSocket),
)

HTTP_DOORS: tuple[type[HttpDoorFamily], ...] = (SpeechApi, ElevenLabsApi, CartesiaApi, AzureApi)


def websocket_route(path: str) -> tuple[WebSocketRoute, Mapping[str, str]] | None:
    """The route ``path`` names, with its ``{name}`` values; ``None``: no endpoint."""
    for route in WEBSOCKET_ROUTES:
        params = route.match(path)
        if params is not None:
            return route, params
    return None
