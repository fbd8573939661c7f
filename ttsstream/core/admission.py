"""Who may use the server, and how often: the one place that decides, for every door.

:meth:`Admission.admit` takes what any request carries (its path, its headers,
the TCP peer) and either admits it, returning the client's IP with a connection
counted, or raises the refusal; :meth:`Admission.answer` turns a refusal into
the HTTP answer (status, headers, JSON body) and counts and logs it.
:meth:`Admission.check_rate` counts each later request on an admitted
connection (a ``speak``, a ``voices``) against the same per-IP rate limit. A
WebSocket handshake and an HTTP request are judged by the same code, so they
can never disagree.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from ttsstream.config import Config
from ttsstream.core.auth import offered_key, redact
from ttsstream.core.clientip import client_ip, is_trusted
from ttsstream.core.context import ANONYMOUS, Principal
from ttsstream.core.headers import HeaderValues
from ttsstream.core.keyring import Keyring
from ttsstream.core.ratelimit import (
    ConnectionCounter,
    LimiterUnavailable,
    MovingWindow,
    SharedConnections,
    SharedLimiter,
)
from ttsstream.core.speech_cache import Lookahead
from ttsstream.exceptions import (
    AmbiguousKey,
    EndpointNotFound,
    HandshakeRefused,
    KeyRefused,
    OriginNotAllowed,
    RateLimited,
    ServerFull,
    TooManyConnections,
    Unauthorized,
)
from ttsstream.logs import access
from ttsstream.stats import Stats

__all__ = ["Admission", "HttpAnswer", "Refusal", "encode_refusal"]

#: Seconds between two access-log lines about connections refused at accept (the
#: ones between are counted in the next line's ``unlogged``).
REFUSAL_LOG_INTERVAL = 1.0

#: How a tenant's counts are named beside client IPs' (a name cannot be an IP).
TENANT_PREFIX = "tenant:"

#: What a request may be refused with.
Refusal = HandshakeRefused | RateLimited


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """An HTTP response given in full: a refusal, or a demo file."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def encode_refusal(exc: Refusal) -> HttpAnswer:
    """The HTTP response for a refusal: status, headers, small JSON body.

    This is the one place where refusals become responses.
    """
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    if isinstance(exc, RateLimited):
        status = 429
        headers += (("Retry-After", str(exc.retry_after)),)
        body = {"error": exc.code, "message": exc.message, "retry_after": exc.retry_after}
    else:
        status = exc.status
        body = {"error": exc.code, "message": exc.message}
    return HttpAnswer(status=status, headers=headers, body=orjson.dumps(body))


class Admission:
    """API keys, origins, client IPs behind proxies, rate limits and connection caps.

    Args:
        config: The settings it enforces.
        stats: Counts refusals.
        clock: Monotonic seconds for the rate limit; tests pass their own.
    """

    def __init__(
        self,
        config: Config,
        stats: Stats,
        *,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedLimiter | None = None,
        shared_connections: SharedConnections | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        #: The keys in force (``TTS_API_KEY``, ``API_KEYS_FILE``'s tenants).
        self.keys = keyring if keyring is not None else Keyring(config.api_keys)
        self._clock = clock
        #: Each tenant's own window, by name (made again when its limits change).
        self._tenant_windows: dict[str, MovingWindow] = {}
        #: This instance's own window: the limit alone, or when the shared one cannot answer.
        self.limiter = MovingWindow(
            config.rate_limit_requests, config.rate_limit_window, clock=clock
        )
        #: The cluster's window (Redis), if any.
        self.shared = shared
        #: The cluster's connection counts (Redis), if any; they mirror this instance's.
        self.shared_connections = shared_connections
        self.connections = ConnectionCounter(
            per_ip=config.max_connections_per_ip, total=config.max_connections
        )
        if shared_connections is not None:
            shared_connections.mirror(self.connections)
        #: Open TCP connections of this instance (idle kept-alive HTTP ones too), by peer.
        self.sockets = ConnectionCounter(
            per_ip=config.max_connections_per_ip, total=config.max_connections
        )
        self._refusals_logged_at = -REFUSAL_LOG_INTERVAL
        self._refusals_unlogged = 0
        self._trusted = config.trusted_networks
        self._origins = config.allowed_origins
        self._stats = stats

    def open_socket(self, peer: str) -> HttpAnswer | None:
        """Count a new TCP connection from ``peer``; the refusal's answer if it is over a
        cap (counted and logged).

        Every connection counts toward ``MAX_CONNECTIONS``, and toward
        ``MAX_CONNECTIONS_PER_IP`` unless ``peer`` is a trusted proxy (whose connections
        carry many clients: each request is judged by its own client then). These are
        this instance's sockets, not the cluster's: a file descriptor is a process's.
        """
        try:
            self.sockets.acquire(peer, capped=not is_trusted(peer, self._trusted))
        except (TooManyConnections, ServerFull) as refused:
            self._count(refused)
            # A flood of connections is one line a second, not one per connection.
            now = time.monotonic()
            if now >= self._refusals_logged_at + REFUSAL_LOG_INTERVAL:
                self._refusals_logged_at = now
                access(
                    "connection_refused",
                    ip=peer,
                    reason=refused.code,
                    unlogged=self._refusals_unlogged,
                )
                self._refusals_unlogged = 0
            else:
                self._refusals_unlogged += 1
            return encode_refusal(refused)
        return None

    def close_socket(self, peer: str) -> None:
        """A TCP connection :meth:`open_socket` counted ended."""
        self.sockets.release(peer)

    def client_ip(self, headers: HeaderValues, peer: str) -> str:
        """The client's address: the peer, or what a trusted proxy says it is."""
        return client_ip(peer, headers, self._trusted)

    async def admit(
        self,
        path: str,
        headers: HeaderValues,
        client: str,
        *,
        endpoint: bool,
        needs_key: bool = True,
        key: str | None = None,
    ) -> Principal:
        """Admit a request from ``client`` (see :meth:`client_ip`) and count its connection;
        who it was admitted as.

        Every request counts toward the rate limit, refused or not, so that keys
        cannot be guessed at speed. Once admitted, :meth:`release` the connection
        when it ends.

        Args:
            path: The request's path and query (the query may hold a key).
            headers: Its headers.
            client: The client's IP.
            endpoint: Whether ``path`` names an endpoint.
            needs_key: Whether the endpoint needs a key when the server has keys (the
                public lists do not: ``PUBLIC_LISTS``); whatever key it offers is ignored.
            key: A key the request offers in a form the headers and path do not carry
                (ElevenLabs' ``xi_api_key`` in a first message), judged as if it did.

        Raises:
            HandshakeRefused: Not an endpoint, bad origin or key (or two different
                keys), or a connection cap.
            RateLimited: The client is over its rate limit.
        """
        if not endpoint:
            raise EndpointNotFound("no such endpoint")
        refusal: HandshakeRefused | None = None
        principal = ANONYMOUS
        origin = headers.get("Origin")
        if not self.origin_allowed(origin):
            refusal = OriginNotAllowed("this origin may not connect")
        elif self.keys.required and needs_key:
            judged = self._judge_key(headers, path, key)
            if isinstance(judged, Principal):
                principal = judged
                if principal.tenant is not None and not principal.tenant.allows_origin(origin):
                    refusal = OriginNotAllowed("this key may not be used from this origin")
            else:
                refusal = judged
        if refusal is None and principal.limited_as_tenant:
            # A tenant's requests count toward its own limits, not its IP's.
            retry_after = await self._hit(client, principal=principal)
            if retry_after is not None:
                raise RateLimited(self._over_tenant_limit(principal), retry_after=retry_after)
            await self._count_connection(client, principal)
            return principal
        if refusal is None and self._in_one_round_trip:
            retry_after = await self._hit_and_count(client)
        else:
            retry_after = await self._hit(client)
        if retry_after is not None:
            raise RateLimited(self._over_limit, retry_after=retry_after)
        if refusal is not None:
            raise refusal
        if not self._in_one_round_trip:
            await self._count_connection(client)
        return principal

    def limits_of(self, principal: Principal) -> dict[str, float | int | str]:
        """The limits ``principal``'s requests are held to now, and whose they are
        (``tenant``: its own or the server's settings for it; ``ip``: per client IP)."""
        window = self._window(principal)
        return {
            "per": "tenant" if self.keys.current(principal).limited_as_tenant else "ip",
            "requests": window.limit,
            "window": window.window,
            "concurrent": self._holder("", principal)[1],
        }

    def _over_tenant_limit(self, principal: Principal) -> str:
        window = self._window(principal)
        return (
            f"too many requests with the key of {principal.name!r} (more than "
            f"{window.limit} in {window.window:g} seconds)"
        )

    def _window(self, principal: Principal) -> MovingWindow:
        """The window ``principal``'s requests count in: its tenant's (with its limits as
        the keys file says now), or the per-IP one."""
        tenant = self.keys.current(principal).tenant
        if tenant is None or tenant.unnamed:
            return self.limiter
        limit = self.limiter.limit if tenant.requests is None else tenant.requests
        seconds = self.limiter.window if tenant.window is None else tenant.window
        window = self._tenant_windows.get(tenant.name)
        if window is None:
            window = self._tenant_windows[tenant.name] = MovingWindow(
                limit, seconds, clock=self._clock
            )
        else:
            # Limits changed by a reload: the hits counted so far still count.
            window.limit, window.window = limit, seconds
        return window

    @property
    def _over_limit(self) -> str:
        """What a client over the rate limit is told: the limit is per IP address, which an
        app speaking for many users from one address (Open WebUI, LibreChat, Home
        Assistant: a request per sentence) reaches for all of them at once."""
        limiter = self.limiter
        return (
            f"too many requests from this IP address (more than {limiter.limit} in "
            f"{limiter.window:g} seconds); an app that speaks for many users from one "
            "address needs the server's RATE_LIMIT_REQUESTS raised, or a proxy that "
            "forwards each user's IP"
        )

    def _judge_key(
        self, headers: HeaderValues, path: str, extra: str | None = None
    ) -> Principal | HandshakeRefused:
        """Who the request's key belongs to, or why it opens nothing: no key, a wrong
        one, or several different ones (one request tries one key)."""
        try:
            key = offered_key(headers, path, extra)
        except AmbiguousKey as ambiguous:
            return ambiguous
        principal = None if key is None else self.keys.find(key)
        if principal is None:
            return Unauthorized("a valid API key is required")
        return principal

    @property
    def _in_one_round_trip(self) -> bool:
        """Whether the rate limit and the connection caps are both the cluster's (then
        one script in Redis decides both)."""
        return (
            self.shared is not None
            and self.shared_connections is not None
            and self.limiter.limit > 0
        )

    async def _hit_and_count(self, client: str) -> int | None:
        """One request of ``client`` in the cluster's window and, if it is within it, its
        connection counted; the seconds to wait if it is not. Alone while Redis is away."""
        shared, counter, limiter = self.shared_connections, self.connections, self.limiter
        assert shared is not None
        try:
            retry_after = await shared.hit_and_acquire(
                client, limiter.limit, limiter.window, counter.per_ip, counter.total_cap
            )
        except LimiterUnavailable:
            retry_after = limiter.hit(client)
            if retry_after is None:
                counter.acquire(client)
            return retry_after
        if retry_after is None:
            self._count_here(client)
        return retry_after

    async def _count_connection(self, client: str, principal: Principal = ANONYMOUS) -> None:
        """Count ``client``'s new connection (a tenant's: toward its ``concurrent``), in
        the cluster too if there is one."""
        holder, cap = self._holder(client, principal)
        shared, counter = self.shared_connections, self.connections
        if shared is None:
            counter.acquire(holder, cap=cap)
            return
        try:
            await shared.acquire(holder, cap, counter.total_cap)
        except LimiterUnavailable:
            counter.acquire(holder, cap=cap)
            return
        self._count_here(holder, cap)

    async def hold(self, client: str, principal: Principal = ANONYMOUS) -> None:
        """Count a connection of ``client`` that takes a dropped one's place (a parked
        one): toward the caps of those to come, never refused. :meth:`release` it."""
        holder, _ = self._holder(client, principal)
        shared = self.shared_connections
        if shared is not None:
            # Counted in the cluster too, whatever its caps (the largest there are).
            with contextlib.suppress(LimiterUnavailable, TooManyConnections, ServerFull):
                await shared.acquire(holder, 2**31, 2**31)
        self.connections.acquire(holder, capped=False, force=True)

    def _holder(self, client: str, principal: Principal) -> tuple[str, int]:
        """Whose connection count a connection is in, and its cap: the client IP's
        (``MAX_CONNECTIONS_PER_IP``), or its tenant's (``concurrent``)."""
        tenant = self.keys.current(principal).tenant
        if tenant is None or tenant.unnamed:
            return client, self.connections.per_ip
        cap = self.connections.per_ip if tenant.concurrent is None else tenant.concurrent
        return TENANT_PREFIX + tenant.name, cap

    def _count_here(self, client: str, cap: int | None = None) -> None:
        """Count a connection the cluster counted in this instance's own counts too."""
        assert self.shared_connections is not None
        try:
            self.connections.acquire(client, cap=cap)
        except (TooManyConnections, ServerFull):
            self.shared_connections.release(client)
            raise

    def release(self, client: str, principal: Principal = ANONYMOUS) -> None:
        """An admitted connection ended (``principal``: who :meth:`admit` admitted)."""
        holder, _ = self._holder(client, principal)
        self.connections.release(holder)
        if self.shared_connections is not None:
            self.shared_connections.release(holder)

    async def check_rate(
        self,
        client: str,
        utterance_id: str | None = None,
        *,
        lookahead: Lookahead | None = None,
        principal: Principal = ANONYMOUS,
    ) -> None:
        """Count one more request on an admitted connection (a ``speak``, a ``voices``).

        A speak's ``lookahead`` is asked of the cluster in the same round trip as its
        rate limit (one script), when the limit is the cluster's.

        Raises:
            RateLimited: The client is over its rate limit.
        """
        retry_after = await self._hit(client, lookahead, principal=principal)
        if retry_after is not None:
            self._stats.rate_limited += 1
            raise RateLimited(
                (
                    self._over_tenant_limit(principal)
                    if principal.limited_as_tenant
                    else self._over_limit
                ),
                retry_after=retry_after,
                utterance_id=utterance_id,
            )

    async def _hit(
        self,
        client: str,
        lookahead: Lookahead | None = None,
        *,
        principal: Principal = ANONYMOUS,
    ) -> int | None:
        """One request of ``client`` (of its tenant, when ``principal`` has limits of its
        own): in the cluster's window, else in this instance's."""
        limiter = self._window(principal)
        key = self._holder(client, principal)[0]
        if self.shared is None or limiter.limit == 0:
            return limiter.hit(key)
        try:
            if lookahead is not None:
                return await lookahead.hit(key, limiter.limit, limiter.window)
            return await self.shared.hit(key, limiter.limit, limiter.window)
        except LimiterUnavailable:
            return limiter.hit(key)

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a request from ``origin`` (``None``: not from a browser) is allowed."""
        return origin is None or self._origins is None or origin.rstrip("/") in self._origins

    def answer(
        self, refused: Refusal, *, headers: HeaderValues, client: str, path: str
    ) -> HttpAnswer:
        """Count and log a refusal; the HTTP answer to send for it.

        Browsers hide why a WebSocket was refused, so the browser client asks the
        same URL over HTTP: an allowed origin may read the answer and its
        ``Retry-After``.
        """
        self._count(refused)
        access("handshake_refused", ip=client, reason=refused.code, path=redact(path)[:200])
        return self.readable(encode_refusal(refused), origin=headers.get("Origin"))

    def readable(self, answer: HttpAnswer, *, origin: str | None) -> HttpAnswer:
        """``answer`` with the headers that let a page of ``origin`` read it, if that
        origin is allowed."""
        cors = tuple(self.cors(origin, "Retry-After").items())
        return HttpAnswer(answer.status, answer.headers + cors, answer.body) if cors else answer

    def cors(self, origin: str | None, exposed: str) -> dict[str, str]:
        """The CORS headers of an answer to a request from ``origin``, letting its page
        read the headers ``exposed``; none for a request not from an allowed origin.

        The one place CORS is decided, for every door.
        """
        if origin is None or not self.origin_allowed(origin):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": exposed,
            "Vary": "Origin",
        }

    def check_key(self, key: str | None, origin: str | None = None) -> Principal:
        """Who a key given after the handshake (in a protocol's first message) belongs to.

        Raises:
            KeyRefused: It opens nothing, or not from ``origin`` (counted as an
                authentication failure).
        """
        if not self.keys.required:
            return ANONYMOUS
        principal = None if key is None else self.keys.find(key)
        if principal is None or (
            principal.tenant is not None and not principal.tenant.allows_origin(origin)
        ):
            self._stats.auth_failures += 1
            raise KeyRefused("a valid API key is required")
        return principal

    def _count(self, refused: Refusal) -> None:
        if isinstance(refused, RateLimited | TooManyConnections | ServerFull):
            self._stats.rate_limited += 1
        elif isinstance(refused, Unauthorized | AmbiguousKey):
            self._stats.auth_failures += 1
        elif isinstance(refused, OriginNotAllowed):
            self._stats.origin_rejected += 1
