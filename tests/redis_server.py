"""A real ``redis-server`` for the cluster tests: a free port, persistence off.

Debian's ``redis-server`` must be installed (``.ci/run`` installs it): without it
the tests that use it fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

from tests.conftest import TIMEOUT

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def redis_command(
    port: int, *, directory: Path | None = None, password: str | None = None
) -> list[str]:
    """``redis-server`` on 127.0.0.1:``port`` in the foreground, persistence off (the
    tests' and the benchmark's)."""
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1"]
    args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    if directory is not None:
        args += ["--dir", str(directory)]
    if password:
        args += ["--requirepass", password]
    return args


class RedisServer:
    """One ``redis-server`` process, which a test may stop and start again on its port."""

    def __init__(self, directory: Path, password: str | None = None) -> None:
        assert Path(REDIS_SERVER).exists(), (
            "install Debian's redis-server (apt-get install redis-server)"
        )
        self.port = free_port()
        self.password = password
        self._directory = directory
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = redis_command(self.port, directory=self._directory, password=self.password)
        self._process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        assert self._process.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            while b"Ready to accept connections" not in await self._process.stdout.readline():
                assert self._process.returncode is None, "redis-server exited"
        # Keep reading its output so that it never blocks on a full pipe.
        self._drain = asyncio.ensure_future(self._process.stdout.read())

    async def stop(self) -> None:
        """Kill it at once (as a crash would)."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
            await self._drain
        self._process = None
