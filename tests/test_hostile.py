"""What one client, hostile or just unlucky, must not be able to do to the others.

Each test here failed before its fix: a connection frozen by another client's
cancel, memory taken by a flood of ``voices``, offline speech held up by a
client that does not read, a circuit breaker opened by made-up voices, and a
refusal that looked like a failure of the utterance playing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator
from pathlib import Path

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    MANY_CLIENTS,
    TIMEOUT,
    Client,
    ServerFactory,
    connected,
    connected_to,
    eventually,
    speaks_fine,
    url_of,
)
from tests.fake_edge import FakeEdge
from tests.processes import serve_process, stop
from ttsstream.cache.flight import SharedSynthesis
from ttsstream.exceptions import UpstreamUnavailable
from ttsstream.ws.connection import VOICES_PENDING_MAX

#: Trials of each race; before the fix, every one froze a connection.
RACE_TRIALS = 10
#: Seconds the upstream of an abandoned synthesis takes to close: the window for the race.
SLOW_TEARDOWN = 0.2


async def _join_while_abandoned(server_factory: ServerFactory, fake: FakeEdge, how: str) -> None:
    # A dropped connection's utterance ends with it (no resume: that is test_resume's).
    server = await server_factory(**MANY_CLIENTS, resume_window=0)
    fake.deaf_when_paused = SLOW_TEARDOWN
    async with connected(server) as b:
        for trial in range(RACE_TRIALS):
            text = f"Trial number {trial} of a text two clients ask for at once."
            fake.pause_after_chunks, fake.resume = 1, asyncio.Event()
            fake.paused.clear()
            async with connected(server) as a:
                await a.speak(text, id="a")
                await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
                fake.pause_after_chunks = None  # only A's synthesis waits
                if how == "cancel":
                    await a.send({"type": "cancel", "id": "a"})
                else:  # the tab is closed: the TCP connection ends, no closing handshake
                    a.ws.transport.abort()
                if trial % 2:
                    # B asks once the server has seen A leave, while A's upstream closes.
                    while server.stats.active_utterances:
                        await asyncio.sleep(0)
                await b.speak(text, id=f"b{trial}")
                if how == "cancel":
                    assert (await a.until_final("a")).final["type"] == "cancelled"
            fake.resume.set()
            # B's utterance ends, one way or another, and its connection speaks on.
            joined = await b.until_final(f"b{trial}")
            print(trial, joined.final, len(fake.records), server.stats.coalesced)
            assert joined.final["type"] in ("end", "error"), joined.final
            if joined.final["type"] == "error":
                assert joined.final["code"] != "internal", joined.final
        await speaks_fine(b)
    assert server.stats.active_utterances == 0


async def test_someone_elses_cancel_never_freezes_a_joiner(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """B asks for the text A just cancelled: B's utterance ends and B's connection speaks on."""
    await _join_while_abandoned(start_server, fake, "cancel")


async def test_someone_elses_disconnect_never_freezes_a_joiner(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """B asks for the text of a client that just left: same as after a cancel."""
    await _join_while_abandoned(start_server, fake, "disconnect")


async def test_an_abandoned_synthesis_is_never_joined(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A request after the last listener left starts a new synthesis and gets all of it."""
    server = await start_server(**MANY_CLIENTS)
    fake.pause_after_chunks = 1
    text = "A text whose first synthesis is abandoned halfway."
    async with connected(server) as a, connected(server) as b:
        await a.speak(text, id="a")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await a.send({"type": "cancel", "id": "a"})
        assert (await a.until_final("a")).final["type"] == "cancelled"
        fake.pause_after_chunks = None
        await b.speak(text, id="b")
        result = await b.until_final("b")
        assert result.final["type"] == "end", result.final
    assert len(fake.records) == 2
    assert fake.records[1].completed
    assert bytes(result.audio) == bytes(fake.records[1].audio)


async def test_a_stopped_synthesis_fails_its_listeners_with_an_ordinary_error() -> None:
    """Listeners of a synthesis stopped under them get UpstreamUnavailable, not a cancel."""
    release = asyncio.Event()

    async def source() -> AsyncGenerator[int, None]:
        yield 1
        await release.wait()
        yield 2

    flight = SharedSynthesis(source())
    events = flight.listen()
    assert await anext(events) == 1
    waiting = asyncio.create_task(anext(events))
    await asyncio.sleep(0)
    await flight.aclose()
    with pytest.raises(UpstreamUnavailable):
        await waiting
    assert not flight.joinable


async def test_refusing_a_duplicate_id_does_not_end_the_playing_utterance(
    client: Client, fake: FakeEdge
) -> None:
    """A speak reusing the playing id is refused with an error "for" the speak, and the
    playing utterance carries on to its end; errors that end an utterance have no "for"."""
    fake.pause_after_chunks = 1
    await client.speak("The first one, playing.", id="dup")
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    await client.speak("The second one.", id="dup")
    while not client.refusals:
        await client.read_one()
    refusal = client.refusals.pop()
    assert (refusal["id"], refusal["code"], refusal["for"]) == ("dup", "invalid_parameter", "speak")
    assert "partial" not in refusal
    fake.resume.set()
    playing = await client.until_final("dup")
    assert playing.messages[0]["type"] == "start"
    assert playing.final["type"] == "end"
    assert len(fake.records) == 1

    fake.pause_after_chunks, fake.drop_after_chunks = None, 2
    await client.speak("This one breaks halfway.", id="broken")
    failed = await client.until_final("broken")
    assert failed.final["code"] == "upstream_unavailable"
    assert failed.final["partial"] is True and "for" not in failed.final


def _rss_mib(pid: int) -> float:
    """A process's resident memory, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _connect_not_reading(url: str) -> ClientConnection:
    """A client that reads nothing: a small receive buffer, and one frame queued at most."""
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await connect(url, sock=sock, max_queue=1, compression=None)


#: voices frames a flooding client sends.
FLOOD_FRAMES = 100_000
#: Growth of the server's memory the flood may cause, in MiB.
FLOOD_RSS_BOUND_MIB = 20


async def test_a_voices_flood_takes_no_memory(fake: FakeEdge, tmp_path: Path) -> None:
    """100,000 voices frames from clients that never read leave the server's memory,
    its side port and its other clients as they were (the rate limit is off here:
    what bounds the replies is the connection's own limit)."""
    process, url, side = await serve_process(
        fake, tmp_path, RATE_LIMIT_REQUESTS="0", SEND_TIMEOUT="1"
    )
    try:
        async with connected_to(url) as warm:
            await warm.send({"type": "voices"})
            assert (await warm.next_loose())["type"] == "voices"
            await speaks_fine(warm)
        before = _rss_mib(process.pid)
        peak = before
        frame = orjson.dumps({"type": "voices"}).decode()
        sent = 0
        async with asyncio.timeout(TIMEOUT * 12):
            while sent < FLOOD_FRAMES:
                # The server closes a client that leaves its replies unread: it comes back.
                flood = await _connect_not_reading(url)
                with contextlib.suppress(ConnectionClosed):
                    while sent < FLOOD_FRAMES:
                        await flood.send(frame)
                        sent += 1
                        if sent % 5000 == 0:
                            peak = max(peak, _rss_mib(process.pid))
                flood.transport.abort()
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://{side}/health") as response,
            ):
                assert response.status == 200
            peak = max(peak, _rss_mib(process.pid))
        assert peak - before < FLOOD_RSS_BOUND_MIB, (before, peak)
        await eventually(
            lambda: _rss_mib(process.pid) - before < FLOOD_RSS_BOUND_MIB,
            what=f"the server back within {FLOOD_RSS_BOUND_MIB} MiB of {before}",
        )
        async with connected_to(url) as other:
            await speaks_fine(other)
    finally:
        await stop(process)


async def test_voices_count_toward_the_rate_limit(start_server: ServerFactory) -> None:
    """Each voices is one request of RATE_LIMIT_REQUESTS; past it, a refusal for voices."""
    server = await start_server(rate_limit_requests=3)  # the handshake is the first
    async with connected(server) as client:
        for _ in range(2):
            await client.send({"type": "voices"})
            assert (await client.next_loose())["type"] == "voices"
        await client.send({"type": "voices"})
        refused = await client.next_loose()
        assert (refused["type"], refused["code"], refused["for"]) == (
            "error",
            "rate_limited",
            "voices",
        )
        assert refused["retry_after"] >= 1


async def test_voices_replies_pending_on_a_connection_are_bounded(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """While the voice list is being fetched, a few voices wait for it; more are refused
    with queue_full, and every one accepted gets its reply."""
    fake.voice_list_released.clear()  # fetched, but not answered until set
    server = await start_server(rate_limit_requests=0)
    async with connected(server) as client:
        for _ in range(VOICES_PENDING_MAX + 3):
            await client.send({"type": "voices"})
        replies = [await client.next_loose() for _ in range(3)]  # the refusals, at once
        fake.voice_list_released.set()
        replies += [await client.next_loose() for _ in range(VOICES_PENDING_MAX)]
    refused = [reply for reply in replies if reply["type"] == "error"]
    assert [reply["type"] for reply in replies].count("voices") == VOICES_PENDING_MAX
    assert {(reply["code"], reply["for"]) for reply in refused} == {("queue_full", "voices")}
    assert len(refused) == 3


async def test_made_up_voices_cannot_open_the_breaker(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """With the voice list unknown, made-up voices reach the service, which answers them
    with no audio: that is the request's fault, and the breaker stays closed for others.
    The list is fetched again in the background; then they are refused before any call."""
    fake.refuse_voices_status = 503
    server = await start_server(breaker_failures=2, rate_limit_requests=0)
    async with connected(server) as client:
        for attempt in range(3):
            await client.speak("Hello.", id=f"bad{attempt}", voice="en-US-DoesNotExistNeural")
            bad = await client.until_final(f"bad{attempt}")
            # The offline voice speaks instead, saying why.
            assert bad.messages[0]["fallback_reason"] == "no_audio", bad.messages[0]
        assert server.services.router.breaker.status.state == "closed"
        await client.speak("Hello.", id="good")
        good = await client.until_final("good")
        assert (good.messages[0]["engine"], good.final["type"]) == ("edge", "end")

        fake.refuse_voices_status = None
        await eventually(lambda: server.services.router.edge_voices, what="the voice list")
        calls = fake.handshakes
        await client.speak("Hello.", id="refused", voice="en-US-DoesNotExistNeural")
        refused = await client.until_final("refused")
        assert (refused.final["code"], refused.final["for"]) == ("invalid_voice", "speak")
        assert fake.handshakes == calls


#: Longest another client may wait for the first audio of a short offline utterance
#: while a slow reader has long ones playing (before the fix: 5 to 32 s).
OFFLINE_FIRST_AUDIO_BOUND = TIMEOUT / 5


async def test_a_slow_reader_never_holds_up_offline_speech(start_server: ServerFactory) -> None:
    """A client that does not read its long, slow offline utterances takes no one else's
    turn: other clients' offline utterances get their first audio within a second."""
    server = await start_server(**MANY_CLIENTS)
    text = ("A long sentence that the slowest offline voice reads aloud. " * 90)[:5000]
    slow = await _connect_not_reading(url_of(server))
    try:
        for id in ("s1", "s2", "s3"):
            await slow.send(
                orjson.dumps(
                    {
                        "type": "speak",
                        "id": id,
                        "text": text,
                        "voice": "espeak:en-us",
                        "rate": "-100%",
                    }
                ).decode()
            )
        await asyncio.sleep(0.5)  # the slow one has started, and stopped being read
        waits = []
        for round in range(6):
            async with connected(server) as other:
                sent = asyncio.get_running_loop().time()
                await other.speak("Am I heard at once?", id=f"o{round}", voice="espeak:fr")
                while not other.so_far(f"o{round}").audio:
                    await other.read_one()
                waits.append(asyncio.get_running_loop().time() - sent)
                result = await other.until_final(f"o{round}")
                assert result.final["type"] == "end"
        assert max(waits) < OFFLINE_FIRST_AUDIO_BOUND, waits
    finally:
        slow.transport.abort()
