"""The Python client (``ttsstream say``'s) resumes by itself: the network between it and
the server (a TCP proxy here, which the test cuts) goes away mid-utterance and comes
back; the utterance ends whole, no audio twice, a streamed text without a character
lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.conftest import TIMEOUT, ServerFactory, eventually
from tests.fake_edge import FakeEdge
from ttsstream.client import SpeechError, speak
from ttsstream.server import Server


class Network:
    """A TCP proxy to the server whose connections the test can cut (no close frame
    reaches either side: the network went away)."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def network(server: Server) -> AsyncIterator[Network]:
    proxy = Network(server.port)
    await proxy.start()
    yield proxy
    await proxy.close()


def url_through(network: Network) -> str:
    assert network.server is not None
    return f"ws://127.0.0.1:{network.server.sockets[0].getsockname()[1]}/v1/stream"


async def test_say_resumes_a_text_cut_off_mid_way(
    network: Network, fake: FakeEdge, server: Server
) -> None:
    fake.tone = True
    fake.pause_after_chunks = 3  # the rest waits until the network is cut
    heard = bytearray()

    def on_audio(data: bytes) -> None:
        heard.extend(data)
        if network.connections == 1 and not fake.resume.is_set():
            network.cut()
            fake.resume.set()

    text = "A reply read aloud on a train that goes into a tunnel, and out of it again. " * 2
    result = await asyncio.wait_for(speak(url_through(network), text, on_audio=on_audio), TIMEOUT)
    assert network.connections == 2  # cut once, resumed once
    assert bytes(heard) == bytes(fake.records[0].audio)
    assert result.end["bytes"] == len(heard) and len(fake.records) == 1
    words = [word["text"] for word in result.words]
    assert len(words) == len(set(zip(words, (w["offset_ms"] for w in result.words), strict=True)))


async def test_say_resumes_a_streamed_text_without_losing_a_character(
    network: Network, fake: FakeEdge, start_server: ServerFactory, server: Server
) -> None:
    fake.tone = True
    more = asyncio.Event()
    pieces = ["The first sentence comes. ", "Then a second one. ", "And a third, the last."]

    async def reply() -> AsyncIterator[str]:
        yield pieces[0]
        await more.wait()
        for piece in pieces[1:]:
            yield piece

    def on_audio(data: bytes) -> None:
        if network.connections == 1:
            network.cut()  # at the first audio: the network goes away
            more.set()  # the rest of the text comes while it is away

    result = await asyncio.wait_for(
        speak(url_through(network), reply(), on_audio=on_audio), TIMEOUT
    )
    assert result.text == "".join(pieces) and result.end["type"] == "end"
    assert network.connections >= 2
    spoken = " ".join(record.text for record in fake.records)
    for piece in pieces:
        assert piece.strip() in spoken


async def test_say_reports_a_resume_the_server_cannot_serve(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A server that does not resume: the drop is an error, not a hang."""
    server = await start_server(resume_window=0)
    network = Network(server.port)
    await network.start()
    fake.tone = True

    def on_audio(data: bytes) -> None:
        network.cut()

    try:
        with pytest.raises(SpeechError) as failed:
            await asyncio.wait_for(
                speak(url_through(network), "Cut off for good.", on_audio=on_audio), TIMEOUT
            )
        assert failed.value.code == "closed"
    finally:
        await network.close()
    await eventually(lambda: server.stats.active_utterances == 0)
