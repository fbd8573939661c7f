"""The browser client resumes a dropped connection by itself, in a real Chromium.

The demo page and its WebSocket reach the server process through a TCP proxy in
the test (:class:`Cable`) that the test can unplug: every connection through it
is reset, so neither Chromium nor the server gets a closing handshake (the server
sees 1006 and keeps the connection; the page sees 1006), and while it is unplugged
new connections are reset at once. The browser is taken offline meanwhile too
(playwright's ``set_offline``): Chromium's offline emulation refuses new connections
(``net::ERR_INTERNET_DISCONNECTED``) but leaves an established WebSocket open, hence
the cable. The fake upstream sends real MP3, paced, so the utterance is still
streaming when the network goes and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser

from tests.conftest import TIMEOUT, eventually
from tests.fake_edge import FRAME_BYTES, FakeEdge, spoken_words
from tests.test_browser import browser, open_demo, served, until  # noqa: F401 (fixtures)

TEXT = (
    "A connection that drops in the middle of a sentence comes back by itself. "
    "The words go on where they stopped, and nothing is heard twice, "
    "not even a single frame of the audio."
)
#: Bytes of one of the fake's audio messages (four MP3 frames).
CHUNK_BYTES = 4 * FRAME_BYTES


class Cable:
    """A TCP proxy from a local port to the server's, which can be unplugged."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.unplugged = False
        #: Connections reset on arrival while unplugged.
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Cable:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.unplug()
        await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def unplug(self) -> None:
        """The network goes away: every connection through the cable is reset."""
        self.unplugged = True
        for client, server in list(self._links):
            client.transport.abort()
            server.transport.abort()
        self._links.clear()

    def plug(self) -> None:
        self.unplugged = False

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.unplugged:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._links.discard(link)
            self._tasks.discard(task)
            writer.transport.abort()
            up_writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until either end goes."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@pytest.fixture
async def cable(served: dict[str, str]) -> AsyncIterator[Cable]:  # noqa: F811 (the fixture)
    port = urlsplit(served["url"]).port
    assert port is not None
    async with Cable(port) as proxy:
        yield proxy


async def test_the_client_resumes_a_dropped_connection_and_plays_every_byte_once(
    browser: Browser,  # noqa: F811 (the fixture)
    served: dict[str, str],  # noqa: F811 (the fixture)
    fake: FakeEdge,
    cable: Cable,
) -> None:
    """Speaking a long text, the network goes (proxy reset, browser offline) while the
    utterance streams, and the server goes on speaking into its log; back online, the
    client reconnects and resumes by itself, the demo says where, and the utterance
    plays to its end: the bytes appended are the server's, each once, its words once
    each and in order, played for exactly the audio's length."""
    fake.realtime_factor = 2.0  # a second of audio every 0.5 s: it is streaming
    fake.pause_after_chunks = 20  # 1.9 s of audio, then it waits for the cut
    page, problems = await open_demo(browser, f"http://127.0.0.1:{cable.port}/")
    await until(page, "document.querySelectorAll('#voice option').length > 5")
    await page.evaluate(
        """() => {
            window.closes = [];
            window.demo.client.addEventListener('close', (e) => window.closes.push(e.detail));
        }"""
    )
    await page.fill("#text", TEXT)
    await page.click("#speak")
    await until(page, "window.demo.utterance && window.demo.utterance.audio.currentTime > 0.3")
    await eventually(lambda: fake.paused.is_set(), what="the upstream paused")
    record = fake.records[0]
    assert not record.completed

    await page.context.set_offline(True)
    cable.unplug()
    await until(page, "document.querySelector('#connection').textContent.includes('reconnecting')")
    assert await page.evaluate("() => window.demo.utterance.state") == "playing"
    # The server goes on speaking into the dropped connection's log meanwhile.
    sent_before = len(record.audio)
    fake.resume.set()
    await eventually(
        lambda: len(record.audio) >= sent_before + 10 * CHUNK_BYTES, what="spoken while away"
    )
    # At least one reconnection failed while the network was away.
    await until(page, "window.closes.filter(c => c.resuming).length >= 2")
    await page.context.set_offline(False)
    cable.plug()

    await until(
        page,
        "document.querySelector('#connection').textContent.startsWith('reconnected, resumed at')",
        timeout=TIMEOUT * 2,
    )
    await until(page, "window.demo.utterance.state === 'ended'", timeout=TIMEOUT * 2)
    await until(page, "window.demo.utterance.audio.ended", timeout=TIMEOUT * 4)
    result: dict[str, Any] = await page.evaluate(
        """() => {
            const u = window.demo.utterance;
            return {
                end: u.end,
                appended: u.bytesAppended,
                received: u.audioReceived,
                words: u.words.map(w => [w.text, w.offset_ms]),
                played: u.audio.currentTime * 1000,
                error: u.audio.error,
                log: window.demo.wordLog,
                resumedAt: window.demo.resumedAt,
                status: document.querySelector('#connection').textContent,
                shownError: document.querySelector('#error').textContent,
            };
        }"""
    )
    assert record.completed and len(fake.records) == 1  # nothing synthesized again
    end = result["end"]
    # Every byte the server sent, each once, handed to the player.
    assert result["appended"] == result["received"] == end["bytes"] == len(record.audio)
    # Each word once, in order, as the upstream timed it.
    assert [text for text, _ in result["words"]] == spoken_words(TEXT)
    assert [offset for _, offset in result["words"]] == [
        float(offset) for _, offset, _ in record.words
    ]
    assert end["words"] == len(result["words"])
    # Played for the audio's length: no gap, no repeat.
    assert abs(result["played"] - end["audio_ms"]) < 100
    assert result["error"] is None
    log = result["log"]
    assert log == sorted(log) and len(set(log)) >= len(result["words"]) - 2
    # Where playback was when it resumed, as the demo said.
    [position] = result["resumedAt"]
    assert 0.3 < position < end["audio_ms"] / 1000
    assert result["status"] == f"reconnected, resumed at {position:.1f} s"
    assert result["shownError"] == ""
    # The browser logs each failed connection itself; nothing else may fail.
    assert all("WebSocket connection" in p or "net::ERR_" in p for p in problems), problems
