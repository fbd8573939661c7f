"""Who the client is: the TCP peer, or what a trusted proxy says it is (pure; no I/O)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from ttsstream.config import Network, parse_networks
from ttsstream.core.headers import HeaderValues

__all__ = ["Network", "client_ip", "is_trusted", "parse_networks"]


def client_ip(peer: str, headers: HeaderValues, trusted: Sequence[Network]) -> str:
    """The client's IP address.

    It is the TCP peer, unless the peer is a trusted proxy: then the right-most
    ``X-Forwarded-For`` address that is not itself trusted (the first hop no proxy
    of ours vouches for), else ``X-Real-IP``. A client that is not a trusted proxy
    cannot change its IP by sending these headers.
    """
    if not is_trusted(peer, trusted):
        return peer
    hops = [
        hop.strip()
        for value in headers.get_all("X-Forwarded-For")
        for hop in value.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # garbage in the chain: nothing left of it can be believed
        if not is_trusted(address, trusted):
            return address
    real_ip = _address(headers.get("X-Real-IP") or "")
    return real_ip if real_ip is not None else peer


def _address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None


def is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    """Whether ``address`` is one of the trusted proxies."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)
