"""Who is asking, from where, on which connection and door: one request's context.

Admission makes it (:meth:`~ttsstream.core.admission.Admission.admit` returns the
:class:`Principal` it admitted); the utterance run, the stats and the access log
receive it. The principal is who the key belongs to (its tenant, or anonymous),
never the key itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ttsstream.core.tenants import KeyHash, Tenant

__all__ = ["ANONYMOUS", "Principal", "RequestContext"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request was admitted as."""

    #: The name logs, stats and errors show (a key's tenant); never the key.
    name: str
    #: Whether the request proved a key (else the server needs none, or the endpoint).
    keyed: bool = False
    #: The tenant whose key it proved, with its limits (``None``: anonymous).
    tenant: Tenant | None = None
    #: Which of the tenant's keys (so a revoked or expired one ends what it opened).
    key: KeyHash | None = None

    @property
    def limited_as_tenant(self) -> bool:
        """Whether its requests count toward its tenant's limits rather than its IP's
        (a tenant of ``API_KEYS_FILE``; ``TTS_API_KEY``'s keys keep the per-IP limits)."""
        return self.tenant is not None and not self.tenant.unnamed


#: A request admitted without a key (the server has none, or a public list).
ANONYMOUS = Principal("anonymous")


@dataclass(frozen=True, slots=True)
class RequestContext:
    """One admitted request (an HTTP request, a WebSocket connection's utterance)."""

    principal: Principal
    #: The client's address, as admission determined it (behind trusted proxies too).
    client_ip: str
    #: The connection's (or HTTP request's) id, for the access log.
    connection: str
    #: The door's stats label (``ws``, ``http``, ``elevenlabs``…).
    door: str
