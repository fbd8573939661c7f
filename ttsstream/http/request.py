"""What the core needs of an aiohttp request (its headers, its peer), and its admission."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDictProxy

from ttsstream.core.admission import Admission, HttpAnswer, Refusal
from ttsstream.core.context import ANONYMOUS, Principal
from ttsstream.exceptions import HandshakeRefused, RateLimited

__all__ = ["Judged", "RequestHeaders", "judge", "peer_of"]


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


@dataclass(frozen=True, slots=True)
class Judged:
    """What admission said of a request: its client, who it was admitted as, and the
    refusal if refused."""

    client: str
    refused: Refusal | None = None
    #: The refusal's answer (protocol shape, CORS for allowed origins), counted and logged.
    answer: HttpAnswer | None = None
    principal: Principal = ANONYMOUS


async def judge(
    admission: Admission, request: web.BaseRequest, *, needs_key: bool = True
) -> Judged:
    """Admit ``request`` as a handshake would be (its connection counted: release it), or
    say why not; ``needs_key=False`` for an endpoint open without a key."""
    headers = RequestHeaders(request.headers)
    client = admission.client_ip(headers, peer_of(request))
    try:
        principal = await admission.admit(
            request.path_qs, headers, client, endpoint=True, needs_key=needs_key
        )
    except (HandshakeRefused, RateLimited) as refused:
        answer = admission.answer(refused, headers=headers, client=client, path=request.path_qs)
        return Judged(client, refused, answer)
    return Judged(client, principal=principal)
