"""Fixtures: the fake Edge service, servers on ephemeral ports, and protocol helpers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.fake_edge import FakeEdge
from ttsstream.config import Config
from ttsstream.server import STREAM_PATH, Server
from ttsstream.services import build_services

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

#: Every timeout in the tests is a multiple of this; raise
#: TTSSTREAM_TEST_TIMEOUT_SCALE on slow machines.
TIMEOUT = 5.0 * float(os.environ.get("TTSSTREAM_TEST_TIMEOUT_SCALE", "1"))

#: Seconds between two looks at a condition that no event announces.
POLL_INTERVAL = 0.01


T = TypeVar("T")


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T]], timeout: float = ..., *, what: str = ...
) -> T: ...


@overload
async def eventually(predicate: Callable[[], T], timeout: float = ..., *, what: str = ...) -> T: ...


async def eventually(
    predicate: Callable[[], Any], timeout: float = TIMEOUT, *, what: str = ""
) -> Any:
    """Wait until ``predicate()`` (a function or a coroutine function) is truthy.

    For what no event announces (a counter, a file, another process); wait on the
    event where the code offers one. It looks every POLL_INTERVAL.

    Returns:
        The predicate's truthy value.

    Raises:
        AssertionError: it was still false after ``timeout`` seconds; the message
            names ``what`` (or the predicate) and its last value.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            name = what or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"not within {timeout:g} s: {name} (last {value!r})")
        await asyncio.sleep(POLL_INTERVAL)


# Leaks: a test that leaves a process, a thread or a socket behind fails itself.

#: Threads that outlive a test by design: pools' workers (the loop's default executor,
#: joined when its loop closes; the cache's and transcoders' pools, ended when their
#: owner is collected; eSpeak's one per process), the access log's writer (one per
#: process, replaced by the next ``logs.configure``), asyncio's child watchers (each
#: ends with its child, which the process check covers).
LONG_LIVED_THREADS = (
    "asyncio_",
    "cache-read",
    "cache-write",
    "transcode",
    "espeak",
    "access-log",
    "waitpid-",
)


def _children(of: int | str = "self") -> dict[int, str]:
    """A process's live children (zombies are not: their work is over): pid, command."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{of}/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    if stat.rsplit(")", 1)[1].split()[0] in "ZX":
                        continue
                    command = Path(f"/proc/{pid}/cmdline").read_bytes()
                    found[int(pid)] = command.replace(b"\0", b" ").decode(errors="replace")
    return found


def _descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (nginx's workers, say), parents first."""
    found = [pid]
    with contextlib.suppress(OSError):
        for child in _children(pid):
            found += _descendants(child)
    return found


def _sockets() -> set[int]:
    """The inodes of this process's open sockets."""
    inodes: set[int] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone already
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _describe_sockets(inodes: set[int]) -> list[str]:
    """Each socket's family and addresses, from /proc/net (what opened it, in effect)."""
    described: dict[int, str] = {}
    for table in ("tcp", "tcp6", "udp", "udp6", "unix"):
        with contextlib.suppress(OSError):
            rows = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
            for row in rows:
                fields = row.split()
                inode = int(fields[9] if table != "unix" else fields[6])
                if inode in inodes:
                    where = (
                        " ".join(fields[7:])
                        if table == "unix"
                        else " -> ".join(map(_address, fields[1:3]))
                    )
                    described[inode] = f"{table} {where}".strip()
    return [described.get(inode, f"socket:[{inode}]") for inode in sorted(inodes)]


def _address(hexadecimal: str) -> str:
    """``0100007F:1F90`` (as /proc/net/tcp has it) as ``127.0.0.1:8080``."""
    host, port = hexadecimal.split(":")
    if len(host) == 8:
        host = ".".join(str(byte) for byte in reversed(bytes.fromhex(host)))
    return f"{host}:{int(port, 16)}"


def _lingering_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [
        thread
        for thread in threading.enumerate()
        if thread not in before
        and thread.is_alive()
        and not thread.name.startswith(LONG_LIVED_THREADS)
    ]


@pytest.fixture(autouse=True)
async def leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Fail the test that leaves a child process, a thread or a socket behind (not a later
    one that trips over it); the leaked processes are killed and reaped first.

    It runs after every other fixture of the test is torn down, in the test's event
    loop, so what closes asynchronously is waited for (``eventually``). Processes are
    this one's children (a grandchild that outlives its parent is not seen), and every
    process the test started through asyncio is reaped and its pipes read to their end.
    When a thread or socket is still there, objects kept only by reference cycles are
    collected first: their finalizers close what they hold, or warn against this test.
    """
    children, threads, sockets = set(_children()), set(threading.enumerate()), _sockets()
    started: list[asyncio.subprocess.Process] = []

    def tracked(create: Callable[..., Awaitable[asyncio.subprocess.Process]]) -> Any:
        async def create_and_track(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
            process = await create(*args, **kwargs)
            started.append(process)
            return process

        return create_and_track

    monkeypatch.setattr(asyncio, "create_subprocess_exec", tracked(asyncio.create_subprocess_exec))
    monkeypatch.setattr(
        asyncio, "create_subprocess_shell", tracked(asyncio.create_subprocess_shell)
    )
    yield

    def new_children() -> dict[int, str]:
        return {pid: cmd for pid, cmd in _children().items() if pid not in children}

    leaks: list[str] = []
    if left := new_children():
        leaks += [f"process {pid}: {command}" for pid, command in left.items()]
        for pid in [pid for leaked in left for pid in _descendants(leaked)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for process in started:
        # Reaped and its pipes read to their end, so that its transport closes now
        # rather than warn, unclosed, in whatever test runs when it is collected.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(TIMEOUT):
                await process.communicate()
    with contextlib.suppress(AssertionError):
        await eventually(lambda: not new_children(), what="leaked processes reaped")

    if _lingering_threads(threads) or _sockets() - sockets:
        gc.collect()
        with contextlib.suppress(AssertionError):
            await eventually(lambda: not _lingering_threads(threads) and not _sockets() - sockets)
    leaks += [f"thread {thread.name}" for thread in _lingering_threads(threads)]
    leaks += [f"socket {what}" for what in _describe_sockets(_sockets() - sockets)]
    if leaks:
        pytest.fail("left behind:\n  " + "\n  ".join(leaks), pytrace=False)


@pytest.fixture
async def fake() -> AsyncIterator[FakeEdge]:
    """A fake Edge service; the test fails if edge-tts broke its protocol."""
    async with FakeEdge() as service:
        yield service
    assert service.violations == []


ServerFactory = Callable[..., Awaitable[Server]]

#: Settings for a test that opens many connections from 127.0.0.1 at once (they stand
#: for many clients: no limit per IP, nor a share of the upstream's slots).
MANY_CLIENTS: dict[str, Any] = {
    "max_connections_per_ip": 1000,
    "rate_limit_requests": 0,
    "upstream_concurrency_per_ip": 1000,
}


@pytest.fixture
async def start_server(fake: FakeEdge, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start servers on 127.0.0.1 with an ephemeral port, wired to the fake; closed at the end."""
    servers: list[Server] = []

    async def start(*, with_offline: bool = True, **settings: Any) -> Server:
        settings = {
            "host": "127.0.0.1",
            "port": 0,
            "health_port": 0,
            "edge_wss_url": fake.wss_url,
            "edge_voices_url": fake.voices_url,
            "upstream_timeout": TIMEOUT,
            "cache_dir": tmp_path / "cache",
            **settings,
        }
        config = Config(**settings)
        server = Server(build_services(config, with_offline=with_offline))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A real redis-server on a free port, persistence off; stopped at the end."""
    from tests.redis_server import RedisServer  # it imports this module's TIMEOUT

    server = RedisServer(tmp_path)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def server(start_server: ServerFactory) -> Server:
    """A server with the default settings."""
    return await start_server()


def url_of(server: Server, path: str = STREAM_PATH) -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


@dataclass
class Utterance:
    """Everything received about one utterance id."""

    id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    #: Each frame in arrival order: a message dict, or bytes for audio.
    frames: list[dict[str, Any] | bytes] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.messages[-1]

    @property
    def words(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "word"]

    @property
    def batched_words(self) -> list[dict[str, Any]]:
        """The words of its ``words`` messages (``"words": "batch"``), in order."""
        return [word for m in self.messages if m["type"] == "words" for word in m["words"]]


class Client:
    """A protocol-level test client over a real WebSocket connection.

    :meth:`until_final` reads frames and files each under its utterance id, so
    frames of other utterances read meanwhile are kept for a later call.
    """

    FINAL = ("end", "error", "cancelled")

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.hello: dict[str, Any] = {}
        #: The utterance whose start came last and that has not ended: audio is its.
        self.current: str | None = None
        #: Messages that concern no utterance (id null, voices).
        self.loose: list[dict[str, Any]] = []
        #: Errors ``for`` a message that named an utterance in progress (which goes on).
        self.refusals: list[dict[str, Any]] = []
        self._open: dict[str, Utterance] = {}
        self._finished: dict[str, deque[Utterance]] = {}

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            message = orjson.dumps(message).decode()
        await self.ws.send(message)

    async def speak(self, text: str, id: str = "u1", **fields: Any) -> None:
        await self.send({"type": "speak", "id": id, "text": text, **fields})

    async def recv(self) -> dict[str, Any] | bytes:
        frame = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        if isinstance(frame, bytes):
            return frame
        message: dict[str, Any] = orjson.loads(frame)
        return message

    async def recv_message(self) -> dict[str, Any]:
        """The next frame, which must be a JSON message."""
        frame = await self.recv()
        assert isinstance(frame, dict), "expected a JSON message, got audio"
        return frame

    async def next_loose(self) -> dict[str, Any]:
        """The next message that concerns no utterance, filing the others."""
        while not self.loose:
            await self._file(await self.recv())
        return self.loose.pop(0)

    async def until_final(self, id: str) -> Utterance:
        """Everything about utterance ``id`` up to its end, error or cancelled.

        Binary frames belong to the utterance whose ``start`` came last, which is
        what the protocol guarantees; audio with no utterance started fails.
        """
        while not self._finished.get(id):
            await self._file(await self.recv())
        return self._finished[id].popleft()

    async def read_one(self) -> None:
        """Read one frame and file it."""
        await self._file(await self.recv())

    def so_far(self, id: str) -> Utterance:
        """What has arrived of utterance ``id``, which has not ended yet."""
        return self._open.get(id, Utterance(id))

    async def _file(self, frame: dict[str, Any] | bytes) -> None:
        if isinstance(frame, bytes):
            assert self.current is not None, "audio outside any utterance"
            record = self._open[self.current]
            record.audio += frame
            record.frames.append(frame)
            return
        id = frame.get("id")
        if not isinstance(id, str):
            self.loose.append(frame)
            return
        if frame["type"] == "error" and (
            frame.get("for") in ("append", "flush", "finish")
            or ("for" in frame and id in self._open)
        ):
            # A refused message that reused the id of an utterance in progress, or
            # fed a streaming one: by the protocol's rule, an error with "for" ends
            # no utterance.
            self.refusals.append(frame)
            return
        record = self._open.setdefault(id, Utterance(id))
        record.messages.append(frame)
        record.frames.append(frame)
        if frame["type"] == "start":
            assert self.current is None, f"{id} started while {self.current} plays"
            self.current = id
        if frame["type"] in self.FINAL:
            if self.current == id:
                self.current = None
            self._finished.setdefault(id, deque()).append(self._open.pop(id))


@contextlib.asynccontextmanager
async def connected(server: Server) -> AsyncIterator[Client]:
    """Connect a client to ``server`` and read the hello."""
    async with connected_to(url_of(server)) as client:
        yield client


@contextlib.asynccontextmanager
async def connected_to(url: str) -> AsyncIterator[Client]:
    """Connect a client to the server at ``url`` (a process, say) and read the hello."""
    async with connect(url, max_size=None, compression=None) as ws:
        client = Client(ws)
        client.hello = await client.recv_message()
        yield client


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    """A client connected to ``server`` that has read the hello."""
    async with connected(server) as client:
        yield client


class Clock:
    """Monotonic time that a test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def speaks_fine(client: Client, id: str = "ok") -> None:
    """The connection still works: a fresh utterance completes."""
    await client.speak("Still here.", id=id)
    result = await client.until_final(id)
    assert result.final["type"] == "end", result.final
    assert result.audio


def entries(server: Server) -> list[Path]:
    return sorted(server.config.cache_dir.glob("*/*.tts"))


async def wait_for_entries(server: Server, count: int) -> None:
    """Wait until ``server``'s disk cache holds ``count`` entries (they are written later)."""
    await eventually(lambda: len(entries(server)) >= count, what=f"{count} cache entries")
