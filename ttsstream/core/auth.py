"""API keys at the handshake (pure; no I/O).

A client proves itself with one of: ``X-API-Key: <key>`` (also as ElevenLabs'
``xi-api-key`` and Azure's ``Ocp-Apim-Subscription-Key``);
``Authorization: Bearer <key>``; the subprotocol pair ``["ttsstream.v1",
"key.<key>"]`` (browsers cannot set headers on a WebSocket; the server selects
and echoes only ``ttsstream.v1``); or ``?api_key=<key>`` in the URL (least safe:
proxies log URLs). A request offers one key: the same key in several forms is
that key, two different ones are refused (a request cannot try many keys at
once). Keys are compared in constant time (:mod:`ttsstream.core.tenants`) and never logged.

``Authorization: Bearer undefined`` or ``Bearer null`` (what a JavaScript client
with no key configured sends, LibreChat's for one) and an empty ``Bearer`` offer
no key at all: a server without keys admits them, a server with keys answers as
to a request without a key, and beside a real key they make no second key.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

from ttsstream.core.headers import HeaderValues
from ttsstream.exceptions import AmbiguousKey

__all__ = [
    "KEY_SUBPROTOCOL_PREFIX",
    "SUBPROTOCOL",
    "offered_key",
    "offered_keys",
    "redact",
]

#: The protocol's subprotocol name; the only one the server ever selects.
SUBPROTOCOL = "ttsstream.v1"
#: A subprotocol starting with this carries an API key.
KEY_SUBPROTOCOL_PREFIX = "key."
_QUERY_KEY = "api_key"
_BEARER = re.compile(r"Bearer\s+(\S+)\s*", re.IGNORECASE)
#: What a JavaScript client sends as its bearer token when it has none.
_NO_TOKEN = frozenset({"undefined", "null"})
_REDACTIONS = (
    (re.compile(r"(api_key=)[^&\s]*", re.IGNORECASE), r"\1[redacted]"),
    (re.compile(r"(key\.)[^,\s]+"), r"\1[redacted]"),
)


def offered_key(headers: HeaderValues, path: str, extra: str | None = None) -> str | None:
    """The one key a request offers, in any of the accepted forms (``None``: none);
    ``extra`` is one offered otherwise (in a first message).

    Raises:
        AmbiguousKey: It offers two different keys.
    """
    # The offered values are compared with each other, not with a key: nothing
    # secret is timed here.
    keys = set(offered_keys(headers, path))
    if extra is not None and extra.strip():
        keys.add(extra.strip())
    if len(keys) > 1:
        raise AmbiguousKey("several different API keys were offered: send one")
    return keys.pop() if keys else None


def offered_keys(headers: HeaderValues, path: str) -> list[str]:
    """Every credential a handshake offers, in all accepted forms."""
    offered = list(headers.get_all("X-API-Key"))
    offered += headers.get_all("xi-api-key")  # ElevenLabs' clients
    offered += headers.get_all("Ocp-Apim-Subscription-Key")  # Azure's
    for value in headers.get_all("Authorization"):
        if (match := _BEARER.fullmatch(value)) and match.group(1) not in _NO_TOKEN:
            offered.append(match.group(1))
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        for protocol in value.split(","):
            protocol = protocol.strip()
            if protocol.startswith(KEY_SUBPROTOCOL_PREFIX):
                offered.append(protocol[len(KEY_SUBPROTOCOL_PREFIX) :])
    offered += [value for name, value in parse_qsl(urlsplit(path).query) if name == _QUERY_KEY]
    return [value.strip() for value in offered if value.strip()]


def redact(text: str) -> str:
    """``text`` with API keys in a query string or a key subprotocol replaced."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text
