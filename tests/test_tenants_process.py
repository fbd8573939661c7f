"""Tenants in a real server process: SIGHUP reloads the keys file, and usage survives
``kill -9`` up to its last batch."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import TIMEOUT, eventually
from tests.fake_edge import FakeEdge
from tests.processes import serve_process, stop
from tests.test_tenants import ALPHA, BETA, tenants_toml, write_keys


def stored_requests(database: Path) -> int:
    """Requests the usage file holds (read as another process would: WAL readers do not
    block the writer)."""
    if not database.exists():
        return 0
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        try:
            (count,) = db.execute("SELECT COALESCE(SUM(requests), 0) FROM usage").fetchone()
        except sqlite3.OperationalError:  # the table is not made yet
            return 0
    return int(count)


async def speak(session: aiohttp.ClientSession, port: str, key: str, text: str) -> int:
    async with session.post(
        f"http://127.0.0.1:{port}/tts", json={"text": text}, headers={"X-API-Key": key}
    ) as response:
        await response.read()
        return response.status


def port_of(url: str) -> str:
    return url.split(":")[2].split("/")[0]


async def test_sighup_reloads_the_keys_file(fake: FakeEdge, tmp_path: Path) -> None:
    """A change the file watch cannot see (same size, inode and time) is read on SIGHUP."""
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}})
    process, url, _ = await serve_process(fake, tmp_path, API_KEYS_FILE=str(path))
    try:
        port = port_of(url)
        async with aiohttp.ClientSession() as session:
            assert await speak(session, port, ALPHA, "Before.") == 200
            assert await speak(session, port, BETA, "Before.") == 401
            stat = os.stat(path)
            text = path.read_text()
            changed = tenants_toml({"alpha": {"key": BETA}})
            assert len(changed) == len(text)
            with open(path, "r+") as file:  # in place: the same inode
                file.write(changed)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            process.send_signal(signal.SIGHUP)

            async def beta_opens() -> bool:
                return await speak(session, port, BETA, "After.") == 200

            for _ in range(int(TIMEOUT * 20)):
                if await beta_opens():
                    break
                await asyncio.sleep(0.05)
            assert await speak(session, port, BETA, "After.") == 200
            assert await speak(session, port, ALPHA, "After.") == 401
    finally:
        await stop(process)


async def test_usage_survives_kill_9_up_to_its_last_batch(fake: FakeEdge, tmp_path: Path) -> None:
    """Killed with SIGKILL during a burst and started again: the usage file is whole,
    holds every request written before the burst and no more than were served; the new
    process answers GET /v1/usage from it."""
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}})
    database = tmp_path / "usage.sqlite3"
    settings: dict[str, Any] = {"API_KEYS_FILE": str(path), "RATE_LIMIT_REQUESTS": "0"}
    process, url, _ = await serve_process(fake, tmp_path, **settings)
    served = 0
    try:
        port = port_of(url)
        async with aiohttp.ClientSession() as session:
            for number in range(10):
                assert await speak(session, port, ALPHA, f"Before the crash {number}.") == 200
            served = 10
            await eventually(lambda: stored_requests(database) == 10, what="a batch written")
            fake.chunk_delay = 0.01  # the burst is still under way when the process dies

            async def one(number: int) -> bool:
                try:
                    return await speak(session, port, ALPHA, f"In the burst {number}.") == 200
                except aiohttp.ClientError:
                    return False

            burst = [asyncio.create_task(one(number)) for number in range(30)]
            await eventually(lambda: sum(task.done() for task in burst) >= 5)
            process.send_signal(signal.SIGKILL)
            results = await asyncio.gather(*burst)
            served += sum(results)
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), TIMEOUT)
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    kept = stored_requests(database)
    assert 10 <= kept <= served
    fake.chunk_delay = 0.0
    again, url, _ = await serve_process(fake, tmp_path, **settings)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port_of(url)}/v1/usage", headers={"X-API-Key": ALPHA}
            ) as response,
        ):
            usage = await response.json()
        assert usage["tenant"] == "alpha" and usage["requests"] == kept
    finally:
        await stop(again)
