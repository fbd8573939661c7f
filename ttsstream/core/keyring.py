"""The keys a server accepts now: ``TTS_API_KEY``'s and ``API_KEYS_FILE``'s tenants,
reloaded without a restart.

The file is read at start (a bad file then stops the start, with the reason), again
on ``SIGHUP`` (:meth:`Keyring.reload`) and whenever it changes on disk
(:meth:`Keyring.watch` looks once a second). A file that cannot be read or parsed
later keeps the last good table: the reason is logged and shown in ``/health``
(:attr:`Keyring.error`). After each change, and when a rotated-out key's grace
period ends, the listeners learn it, so that connections opened with a key that
no longer opens anything end (``key_revoked``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ttsstream.core.context import Principal
from ttsstream.core.tenants import TenantTable, parse_tenants, unnamed_tenant
from ttsstream.exceptions import KeysFileError

__all__ = ["Keyring"]

logger = logging.getLogger("ttsstream.keys")

#: Seconds between two looks at the file's modification time.
WATCH_INTERVAL = 1.0
#: Seconds a changed file must stay unchanged before it is read.
SETTLE_INTERVAL = 0.05


class Keyring:
    """The tenant table in force.

    Args:
        api_keys: ``TTS_API_KEY``'s keys (the unnamed tenant ``default``).
        path: ``API_KEYS_FILE``, if any.
        now: The current UTC time (tests pass their own).

    Raises:
        KeysFileError: ``path`` cannot be read or is not a valid tenants file.
    """

    def __init__(
        self,
        api_keys: Sequence[str] = (),
        path: Path | None = None,
        *,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._unnamed = unnamed_tenant(api_keys)
        self.path = path
        self._now = now
        #: Why the last reload failed (the last good table is in force); ``None``: it did not.
        self.error: str | None = None
        #: Called after the table changed or a key expired.
        self._listeners: list[Callable[[], object]] = []
        self._stamp: tuple[int, int, int] | None = None
        self.table = self._with_unnamed(TenantTable())
        if path is not None:
            self.table = self._read()

    @property
    def required(self) -> bool:
        """Whether requests need a key: there is a keys file (even one with no tenant
        left: then no key opens the server), or ``TTS_API_KEY``."""
        return self.path is not None or self._unnamed is not None

    def find(self, key: str) -> Principal | None:
        """Who ``key`` belongs to, if it opens the server (constant time in the keys)."""
        found = self.table.find(key, self._now())
        if found is None:
            return None
        tenant, stored = found
        return Principal(tenant.name, keyed=True, tenant=tenant, key=stored)

    def current(self, principal: Principal) -> Principal:
        """``principal`` with its tenant's limits as the file says now (a connection
        admitted before a reload is held to the new ones)."""
        tenant = principal.tenant
        if tenant is None:
            return principal
        now = self.table.tenants.get(tenant.name)
        if now is None or now is tenant:
            return principal
        return Principal(principal.name, keyed=True, tenant=now, key=principal.key)

    def holds(self, principal: Principal) -> bool:
        """Whether what ``principal`` was admitted with still opens the server."""
        if principal.tenant is None:
            return True
        return self.table.holds(principal.tenant.name, principal.key, self._now())

    def on_change(self, listener: Callable[[], object]) -> None:
        """Call ``listener`` after every change of the keys in force."""
        self._listeners.append(listener)

    def reload(self) -> bool:
        """Read the file again; whether the table in force changed. A file that cannot
        be read or parsed changes nothing: :attr:`error` says why."""
        if self.path is None:
            return False
        try:
            table = self._read()
        except KeysFileError as exc:
            if self.error != str(exc):
                logger.error("keys not reloaded, the last good ones stay: %s", exc)
            self.error = str(exc)
            return False
        if self.error is not None:
            logger.info("keys file readable again")
        self.error = None
        self.table = table
        logger.info("keys reloaded: %d tenants", len(table.tenants))
        self._changed()
        return True

    def _read(self) -> TenantTable:
        assert self.path is not None
        try:
            stat = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysFileError(f"API_KEYS_FILE: cannot read {self.path}: {exc}") from None
        self._stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        return self._with_unnamed(parse_tenants(text, source=f"API_KEYS_FILE {self.path}"))

    def _with_unnamed(self, table: TenantTable) -> TenantTable:
        unnamed = self._unnamed
        if unnamed is None:
            return table
        shared = {key.digest for key in unnamed.keys}
        for tenant in table.tenants.values():
            if any(key.digest in shared for key in tenant.keys):
                raise KeysFileError(
                    f"API_KEYS_FILE {self.path}: tenant {tenant.name!r} has a key of "
                    "TTS_API_KEY (a key belongs to one tenant)"
                )
        return TenantTable([*table.tenants.values(), unnamed])

    def changed_on_disk(self) -> bool:
        """Whether the file is not the one last read (written, replaced or removed)."""
        if self.path is None:
            return False
        try:
            stat = os.stat(self.path)
        except OSError:
            return self._stamp is not None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino) != self._stamp

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Reload the file when it changes, and tell the listeners when a rotated-out
        key expires; runs until cancelled."""
        expiry = self.table.next_expiry(self._now())
        while True:
            await asyncio.sleep(interval)
            if self.changed_on_disk():
                await self._settled()
                self.reload()
                if self.path is not None and not self.path.exists():
                    self._stamp = None  # said once; looked at again when it is back
            now = self._now()
            if expiry is not None and now >= expiry:
                logger.info("a rotated-out key expired")
                self._changed()
            expiry = self.table.next_expiry(now)

    async def _settled(self) -> None:
        """Wait until the file stops changing (an editor writing it in place), for at
        most a second: a file read half-written could revoke the tenants after the cut."""
        stamp = self._stat()
        for _ in range(10):
            await asyncio.sleep(SETTLE_INTERVAL)
            now = self._stat()
            if now == stamp:
                return
            stamp = now

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()

    def __repr__(self) -> str:
        return f"Keyring({len(self.table.tenants)} tenants, path={self.path})"
