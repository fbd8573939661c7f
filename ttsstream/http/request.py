"""What the core needs of an aiohttp request: its headers as the core reads them, its peer."""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDictProxy

__all__ = ["RequestHeaders", "peer_of"]


class RequestHeaders:
    """aiohttp's request headers as the core reads headers (``get_all``, ``get``)."""

    __slots__ = ("_headers",)

    def __init__(self, headers: CIMultiDictProxy[str]) -> None:
        self._headers = headers

    def get_all(self, key: str, /) -> list[str]:
        return self._headers.getall(key, [])

    def get(self, key: str, /) -> str | None:
        return self._headers.get(key)


def peer_of(request: web.BaseRequest) -> str:
    """The TCP peer's address."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if peer else ""
