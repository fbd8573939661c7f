"""The tenants' usage in a SQLite file, through ``aiosqlite`` (one instance).

One row per tenant, UTC day and door; each batch from
:class:`~ttsstream.core.usage.Usage` is one transaction of upserts, so a process
killed mid-write leaves the file as the last batch left it (the journal is WAL).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import aiosqlite

from ttsstream.core.usage import Tally, UsageRow

__all__ = ["SqliteUsage"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL,
    day TEXT NOT NULL,
    door TEXT NOT NULL,
    characters INTEGER NOT NULL DEFAULT 0,
    cached_characters INTEGER NOT NULL DEFAULT 0,
    audio_ms REAL NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day, door)
)
"""
_UPSERT = """
INSERT INTO usage (tenant, day, door, characters, cached_characters, audio_ms, requests, errors)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, day, door) DO UPDATE SET
    characters = characters + excluded.characters,
    cached_characters = cached_characters + excluded.cached_characters,
    audio_ms = audio_ms + excluded.audio_ms,
    requests = requests + excluded.requests,
    errors = errors + excluded.errors
"""
_SELECT = """
SELECT tenant, day, door, characters, cached_characters, audio_ms, requests, errors
FROM usage WHERE day >= ? AND day <= ? AND (? IS NULL OR tenant = ?)
"""


class SqliteUsage:
    """A :class:`~ttsstream.core.usage.UsageStore` in the SQLite file ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def _open(self) -> aiosqlite.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path)
            try:
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=NORMAL")
                await db.execute("PRAGMA busy_timeout=5000")
                await db.execute(_SCHEMA)
                await db.commit()
            except BaseException:
                await db.close()
                raise
            self._db = db
        return self._db

    async def add(self, rows: Iterable[UsageRow]) -> None:
        db = await self._open()
        values = [
            (
                row.tenant,
                row.day,
                row.door,
                row.tally.characters,
                row.tally.cached_characters,
                row.tally.audio_ms,
                row.tally.requests,
                row.tally.errors,
            )
            for row in rows
        ]
        try:
            await db.executemany(_UPSERT, values)
            await db.commit()
        except BaseException:
            await db.rollback()
            raise

    async def rows(self, tenant: str | None, first_day: str, last_day: str) -> list[UsageRow]:
        db = await self._open()
        async with db.execute(_SELECT, (first_day, last_day, tenant, tenant)) as cursor:
            found = await cursor.fetchall()
        return [
            UsageRow(
                str(name),
                str(day),
                str(door),
                Tally(int(chars), int(cached), float(audio), int(requests), int(errors)),
            )
            for name, day, door, chars, cached, audio, requests, errors in found
        ]

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()
