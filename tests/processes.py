"""Servers as separate processes, as users run them: start, wait, talk, stop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import TIMEOUT, eventually
from tests.fake_edge import FakeEdge

CONSOLE_SCRIPT = Path(sys.executable).with_name("ttsstream")
LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")


def environment(fake: FakeEdge, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HOST", "PORT", "DEFAULT_VOICE", "MAX_TEXT_LENGTH", "LOG_LEVEL")
    }
    env.update(fake.environ)
    env.update({"HOST": "127.0.0.1", "PORT": "0", "HEALTH_PORT": "0", **extra})
    return env


async def start_process(
    args: Sequence[str], env: dict[str, str], cwd: Path, *, access_log: bool = False
) -> asyncio.subprocess.Process:
    """Start a process; stderr (the error log) is piped, stdout (the access log) only when
    the test reads it, so an unread pipe can never fill and block the server."""
    return await asyncio.create_subprocess_exec(
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE if access_log else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def wait_listening(process: asyncio.subprocess.Process) -> int:
    assert process.stderr is not None
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), TIMEOUT)
        assert line, "server exited before listening"
        if match := LISTENING.search(line):
            return int(match.group(1))


async def run(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def serve_process(
    fake: FakeEdge, tmp_path: Path, **settings: str
) -> tuple[asyncio.subprocess.Process, str, str]:
    """``python -m ttsstream serve`` wired to the fake, in ``tmp_path`` (its cache there
    unless CACHE_DIR is given); its WebSocket URL and side port address."""
    env = environment(fake, **{"CACHE_DIR": str(tmp_path / "cache"), **settings})
    process = await start_process([sys.executable, "-m", "ttsstream", "serve"], env, tmp_path)
    assert process.stderr is not None
    said = b""
    if "LOG_DIR" in settings:  # the error log is a file then
        error_log = Path(settings["LOG_DIR"]) / "error.log"

        def logged() -> bytes:
            said = error_log.read_bytes() if error_log.exists() else b""
            return said if LISTENING.search(said) else b""

        said = await eventually(logged, what=f"'listening' in {error_log}")
    while not (match := LISTENING.search(said)):
        line = await asyncio.wait_for(process.stderr.readline(), TIMEOUT)
        assert line, said.decode()
        said += line
    side = said.decode().rsplit("side port ", 1)[1].split(")")[0]
    return process, f"ws://127.0.0.1:{match.group(1).decode()}/v1/stream", side


async def stop(process: asyncio.subprocess.Process) -> None:
    """Stop a server: SIGTERM, and a second one if it is still draining after a moment."""
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), TIMEOUT / 5)
    except TimeoutError:
        process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
