"""Tenants: named API keys with their own limits (``API_KEYS_FILE``), pure and reloadable.

The file is TOML, one table per tenant under ``[tenants]``; the table's name is the
tenant's, and what logs, stats and errors show. A key is stored as its SHA-256
(hex), never itself::

    [tenants.webui]
    keys = [{ sha256 = "9f86d0…" }]
    requests = 1000            # per window (RATE_LIMIT_REQUESTS if unset)
    window = 60                # seconds (RATE_LIMIT_WINDOW if unset)
    concurrent = 50            # open connections and streams (MAX_CONNECTIONS_PER_IP if unset)
    characters_per_day = 200000
    characters_per_month = 5000000
    voices = ["en-*", "espeak:*"]            # fnmatch patterns, case-insensitive
    origins = ["https://chat.example.com"]   # browser origins its pages may call from

During a rotation a tenant has two keys, the old one with ``expires`` (a TOML date
and time; without an offset, UTC): ``keys = [{ sha256 = "new…" }, { sha256 =
"old…", expires = 2026-12-08T12:00:00Z }]``.

Parsing is pure (text in, a :class:`TenantTable` out, or a ``KeysFileError``
naming the problem); reading the file, reloading it and ending revoked keys'
connections belong to :class:`~ttsstream.core.keyring.Keyring`.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import hmac
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ttsstream.exceptions import KeysFileError

__all__ = [
    "FIELDS",
    "TENANT_NAME",
    "KeyHash",
    "Tenant",
    "TenantTable",
    "hash_key",
    "parse_tenants",
]

#: A tenant's name: what logs, stats, metrics labels and errors show.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
#: A tenant's fields, in the order a new tenant's table has them.
FIELDS = (
    "keys",
    "requests",
    "window",
    "concurrent",
    "characters_per_day",
    "characters_per_month",
    "voices",
    "origins",
)
#: The name of the tenant ``TTS_API_KEY``'s keys belong to (global limits).
DEFAULT_TENANT = "default"


def hash_key(key: str) -> bytes:
    """A key's SHA-256, as the file stores it (in hex) and as keys are compared."""
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class KeyHash:
    """One key of a tenant, by its hash."""

    digest: bytes
    #: When it stops opening anything (a rotated-out key); ``None``: never.
    expires: dt.datetime | None = None

    def valid(self, now: dt.datetime) -> bool:
        return self.expires is None or now < self.expires


@dataclass(frozen=True, slots=True)
class Tenant:
    """A named key holder and its limits (``None``: the server's global setting)."""

    name: str
    keys: tuple[KeyHash, ...]
    requests: int | None = None
    window: float | None = None
    concurrent: int | None = None
    characters_per_day: int | None = None
    characters_per_month: int | None = None
    #: Voice name patterns it may use (``None``: any).
    voices: tuple[str, ...] | None = None
    #: Browser origins its requests may come from (``None``: the server's ``ALLOWED_ORIGINS``).
    origins: frozenset[str] | None = None
    #: Whether it is ``TTS_API_KEY``'s unnamed tenant (limits per client IP, as before).
    unnamed: bool = False

    def allows_voice(self, voice: str) -> bool:
        if self.voices is None:
            return True
        name = voice.lower()
        return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in self.voices)

    def allows_origin(self, origin: str | None) -> bool:
        """Whether a request from ``origin`` (``None``: not a browser's) may use this key."""
        return origin is None or self.origins is None or origin.rstrip("/") in self.origins


class TenantTable:
    """Every tenant a server knows, found by key in constant time."""

    def __init__(self, tenants: Iterable[Tenant] = ()) -> None:
        self.tenants: dict[str, Tenant] = {tenant.name: tenant for tenant in tenants}
        self._keys = [(key, tenant) for tenant in self.tenants.values() for key in tenant.keys]

    def __len__(self) -> int:
        return len(self.tenants)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def find(self, key: str, now: dt.datetime | None = None) -> tuple[Tenant, KeyHash] | None:
        """The tenant ``key`` belongs to and which of its keys it is, if it opens one.

        The key's hash is compared with every key's in constant time, so the time
        taken does not tell which key matched, or whether one did.
        """
        now = now or dt.datetime.now(dt.UTC)
        digest = hash_key(key)
        found: tuple[Tenant, KeyHash] | None = None
        for stored, tenant in self._keys:
            if hmac.compare_digest(digest, stored.digest) and stored.valid(now):
                found = (tenant, stored)
        return found

    def holds(self, tenant: str, key: KeyHash | None, now: dt.datetime | None = None) -> bool:
        """Whether ``tenant``'s ``key`` (``None``: any of its keys) still opens the server."""
        now = now or dt.datetime.now(dt.UTC)
        current = self.tenants.get(tenant)
        if current is None:
            return False
        if key is None:
            return True
        return any(k.digest == key.digest and k.valid(now) for k in current.keys)

    def next_expiry(self, now: dt.datetime) -> dt.datetime | None:
        """When the next rotated-out key expires, if one will."""
        pending = [k.expires for k, _ in self._keys if k.expires is not None and k.expires > now]
        return min(pending, default=None)


def unnamed_tenant(keys: Iterable[str]) -> Tenant | None:
    """``TTS_API_KEY``'s keys as the unnamed tenant (global limits, per client IP)."""
    hashes = tuple(KeyHash(hash_key(key)) for key in keys if key)
    return Tenant(DEFAULT_TENANT, hashes, unnamed=True) if hashes else None


def parse_tenants(text: str, *, source: str = "API_KEYS_FILE") -> TenantTable:
    """The tenants a file's ``text`` defines.

    Raises:
        KeysFileError: It is not TOML, or a tenant is not as the module says (the
            message names the tenant and the field).
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(document) - {"tenants"}
    if unknown:
        first = sorted(unknown)[0]
        raise KeysFileError(f"{source}: unknown table {first!r} (expected [tenants.NAME])")
    tables = document.get("tenants", {})
    if not isinstance(tables, dict):
        raise KeysFileError(f"{source}: 'tenants' must be a table of tenants")
    tenants = [_tenant(name, table, source) for name, table in tables.items()]
    seen: dict[bytes, str] = {}
    for tenant in tenants:
        for key in tenant.keys:
            if key.digest in seen:
                raise KeysFileError(
                    f"{source}: tenants {seen[key.digest]!r} and {tenant.name!r} share a key"
                )
            seen[key.digest] = tenant.name
    return TenantTable(tenants)


def _tenant(name: str, table: Any, source: str) -> Tenant:
    where = f"{source}: tenant {name!r}"
    if not TENANT_NAME.fullmatch(name) or name == DEFAULT_TENANT:
        raise KeysFileError(
            f"{where}: a name is 1 to 64 letters, digits, '_', '.' or '-', not {DEFAULT_TENANT!r}"
        )
    if not isinstance(table, dict):
        raise KeysFileError(f"{where}: must be a table")
    unknown = set(table) - set(FIELDS)
    if unknown:
        raise KeysFileError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    return Tenant(
        name=name,
        keys=_keys(table.get("keys"), where),
        requests=_count(table, "requests", where, minimum=0),
        window=_seconds(table, where),
        concurrent=_count(table, "concurrent", where, minimum=1),
        characters_per_day=_count(table, "characters_per_day", where, minimum=0),
        characters_per_month=_count(table, "characters_per_month", where, minimum=0),
        voices=_strings(table, "voices", where),
        origins=(
            None
            if (origins := _strings(table, "origins", where)) is None
            else frozenset(origin.rstrip("/") for origin in origins)
        ),
    )


def _keys(value: Any, where: str) -> tuple[KeyHash, ...]:
    if not isinstance(value, list) or not value:
        raise KeysFileError(f"{where}: 'keys' must be a list of {{ sha256 = \"…\" }} tables")
    keys = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) - {"sha256", "expires"}:
            raise KeysFileError(f'{where}: each key is {{ sha256 = "…", expires = <date> }}')
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest):
            raise KeysFileError(f"{where}: a key's sha256 is 64 lower-case hex digits")
        expires = entry.get("expires")
        if expires is not None:
            if not isinstance(expires, dt.datetime):
                raise KeysFileError(f"{where}: a key's expires is a date and time")
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=dt.UTC)
        keys.append(KeyHash(bytes.fromhex(digest), expires))
    return tuple(keys)


def _count(table: Mapping[str, Any], field: str, where: str, *, minimum: int) -> int | None:
    value = table.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KeysFileError(f"{where}: {field!r} must be an integer >= {minimum}")
    return value


def _seconds(table: Mapping[str, Any], where: str) -> float | None:
    value = table.get("window")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise KeysFileError(f"{where}: 'window' must be seconds > 0")
    return float(value)


def _strings(table: Mapping[str, Any], field: str, where: str) -> tuple[str, ...] | None:
    value = table.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise KeysFileError(f"{where}: {field!r} must be a list of strings")
    return tuple(value)
