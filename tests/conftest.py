"""Fixtures: the fake Edge service, servers on ephemeral ports, and protocol helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.fake_edge import FakeEdge
from ttsstream.config import Config
from ttsstream.core.services import build_services
from ttsstream.server import STREAM_PATH, Server

#: Every timeout in the tests is a multiple of this; raise
#: TTSSTREAM_TEST_TIMEOUT_SCALE on slow machines.
TIMEOUT = 5.0 * float(os.environ.get("TTSSTREAM_TEST_TIMEOUT_SCALE", "1"))


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
    for _ in range(int(TIMEOUT * 100)):
        if len(entries(server)) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} cache entries, found {len(entries(server))}")
