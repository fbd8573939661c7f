"""Upstream failures become stable error codes, and the connection keeps working.

These servers have no fallback voice and no retries, so each failure reaches the
client as it is; ``test_fallback.py`` covers what a default server does instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.conftest import (
    TIMEOUT,
    Client,
    ServerFactory,
    Utterance,
    connected,
    eventually,
    speaks_fine,
    url_of,
)
from tests.fake_edge import FakeEdge, spoken_words
from ttsstream.logs import fields_of
from ttsstream.server import Server

#: A short upstream deadline for the timeout tests, in seconds
#: (0.3 s unscaled: time enough for a connection's handshake and first audio).
SHORT = TIMEOUT * 0.06
#: Settings of every server here: failures are not retried nor spoken by a fallback.
AS_IS = {"fallback_voice": None, "upstream_retries": 0}
#: Two clients, told apart by the address their proxy (127.0.0.1, trusted) forwards:
#: one with long syntheses and a backlog, one that speaks now and then.
HEAVY, LIGHT = "10.0.0.1", "10.0.0.2"


@pytest.fixture
async def server(start_server: ServerFactory) -> Server:
    """A server that reports upstream failures as they are."""
    return await start_server(**AS_IS)


@pytest.mark.parametrize("status", [403, 429, 503])
async def test_refused_handshake_is_upstream_unavailable(
    client: Client, fake: FakeEdge, status: int
) -> None:
    """403, 429 and 503 from the upstream give upstream_unavailable, with no start."""
    fake.refuse_status = status
    await client.speak("Refused.")
    result = await client.until_final("u1")
    assert [m["type"] for m in result.messages] == ["error"]
    assert result.final["code"] == "upstream_unavailable"
    assert str(status) in result.final["message"]
    fake.refuse_status = None
    await speaks_fine(client)


async def test_unreachable_upstream_is_upstream_unavailable(start_server: ServerFactory) -> None:
    """A connect failure (nothing listening) gives upstream_unavailable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    server = await start_server(
        **AS_IS,
        edge_wss_url=f"ws://127.0.0.1:{free_port}/edge/v1?TrustedClientToken=x",
        edge_voices_url=f"http://127.0.0.1:{free_port}/voices/list?trustedclienttoken=x",
    )
    async with connected(server) as client:
        await client.speak("Nobody home.")
        result = await client.until_final("u1")
        assert result.final["code"] == "upstream_unavailable"
        assert "127.0.0.1" not in result.final["message"]


async def test_no_first_audio_in_time_is_upstream_timeout(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """When the first audio takes longer than UPSTREAM_TIMEOUT, the utterance fails in time."""
    server = await start_server(upstream_timeout=SHORT, **AS_IS)
    fake.first_audio_delay = SHORT * 10
    async with connected(server) as client:
        await client.speak("Slow to start.")
        result = await client.until_final("u1")
        assert result.final["code"] == "upstream_timeout"
        assert "partial" not in result.final["message"]
        assert result.audio == b""
        await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)
        fake.first_audio_delay = 0
        await speaks_fine(client)


async def test_stalled_stream_is_upstream_timeout_with_partial_audio(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A stream that stops mid-way fails with upstream_timeout saying the audio is partial."""
    server = await start_server(upstream_timeout=SHORT, **AS_IS)
    fake.stall_after_chunks = 2
    async with connected(server) as client:
        await client.speak("This stream will stall after a little audio has been sent.")
        result = await client.until_final("u1")
        assert result.messages[0]["type"] == "start"
        assert result.final["code"] == "upstream_timeout"
        assert "partial" in result.final["message"]
        assert bytes(result.audio) == bytes(fake.records[0].audio)
        await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)
        fake.stall_after_chunks = None
        await speaks_fine(client)


@pytest.mark.parametrize("abruptly", [False, True], ids=["close", "abort"])
async def test_dropped_stream_is_an_error_not_a_short_success(
    client: Client, fake: FakeEdge, abruptly: bool
) -> None:
    """An upstream that goes away mid-stream gives upstream_unavailable (partial), never end."""
    fake.drop_after_chunks = 2
    fake.drop_abruptly = abruptly
    await client.speak("This stream will be dropped after a little audio has been sent.")
    result = await client.until_final("u1")
    assert result.final["type"] == "error"
    assert result.final["code"] == "upstream_unavailable"
    assert "partial" in result.final["message"]
    assert len(result.audio) > 0
    fake.drop_after_chunks = None
    await speaks_fine(client)


async def test_no_audio_is_no_audio(client: Client, fake: FakeEdge) -> None:
    """A turn that ends without audio gives no_audio."""
    fake.no_audio = True
    await client.speak("Silence.")
    result = await client.until_final("u1")
    assert result.final["code"] == "no_audio"
    fake.no_audio = False
    await speaks_fine(client)


async def test_long_text_is_split_and_stitched(client: Client, fake: FakeEdge) -> None:
    """A text over 4096 bytes goes out on several upstream connections and comes back as one."""
    sentence = "Curiosity & patience make the journey café-worthy, said Zoë. "
    text = (sentence * 80)[:4900]
    assert len(text.encode()) > 4096
    await client.speak(text)
    result = await client.until_final("u1")
    assert result.final["type"] == "end"
    assert len(fake.records) >= 2
    assert bytes(result.audio) == b"".join(bytes(r.audio) for r in fake.records)
    words = result.words
    assert [w["text"] for w in words] == spoken_words(text)
    offsets = [w["offset_ms"] for w in words]
    assert offsets == sorted(offsets)
    # The second piece's words are shifted by the first piece's audio duration.
    first_piece = len(fake.records[0].words)
    first_audio_ms = len(fake.records[0].audio) / 6
    assert offsets[first_piece] == pytest.approx(first_audio_ms + fake.records[1].words[0][1])
    assert all(text[w["char_start"] : w["char_end"]] == w["text"] for w in words)
    assert result.final["audio_ms"] == pytest.approx(len(result.audio) / 6)


async def test_prosody_and_voice_reach_the_upstream(client: Client, fake: FakeEdge) -> None:
    """voice, rate, volume and pitch are passed to the upstream's SSML; text is escaped."""
    await client.speak(
        "Tom & Jerry <b>bold</b>",
        voice="fr-FR-DeniseNeural",
        rate="+25%",
        volume="-10%",
        pitch="-5Hz",
        cleanup="none",  # the markup is spoken as sent, so it must be escaped
    )
    result = await client.until_final("u1")
    assert result.final["type"] == "end"
    (record,) = fake.records
    assert record.voice == "Microsoft Server Speech Text to Speech Voice (fr-FR, DeniseNeural)"
    assert (record.rate, record.volume, record.pitch) == ("+25%", "-10%", "-5Hz")
    assert record.text == "Tom & Jerry <b>bold</b>"  # plain text, not markup
    assert [w["text"] for w in result.words] == spoken_words("Tom & Jerry <b>bold</b>")


async def test_logs_never_hold_the_text(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """The utterance log line has its length, not its words."""
    caplog.set_level(logging.DEBUG, logger="ttsstream")
    text = "Confidential medical details here."
    await client.speak(text)
    await client.until_final("u1")
    (line,) = [fields_of(r) for r in caplog.records if r.name == "ttsstream.access"]
    assert (line["chars"], line["outcome"], len(line["key"])) == (34, "ok", 12)
    everything = caplog.text + repr([fields_of(r) for r in caplog.records])
    assert "Confidential" not in everything and "medical" not in everything


async def test_utterances_share_a_connector_and_need_no_worker_thread(
    start_server: ServerFactory, fake: FakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edge's host is resolved once for all utterances, and nothing else takes a thread hop.

    edge-tts alone looks for an environment proxy and a ~/.netrc entry in a worker
    thread on every request, and resolves the host in one more: under a burst of
    utterances those hops wait for the event loop's GIL.
    """
    by_name = {
        "edge_wss_url": fake.wss_url.replace("127.0.0.1", "localhost"),
        "edge_voices_url": fake.voices_url.replace("127.0.0.1", "localhost"),
    }
    server = await start_server(**AS_IS, **by_name)
    loop = asyncio.get_running_loop()
    hops: list[Callable[..., Any]] = []
    run_in_executor = loop.run_in_executor

    def counting(executor: Any, function: Callable[..., Any], *args: Any) -> Any:
        if executor is None:
            hops.append(function)
        return run_in_executor(executor, function, *args)

    monkeypatch.setattr(loop, "run_in_executor", counting)
    async with connected(server) as client:
        for number in range(3):
            await client.speak(f"Sentence number {number}.", id=f"n{number}")
            result = await client.until_final(f"n{number}")
            assert result.final["type"] == "end" and result.audio
    assert len(fake.records) == 3
    names = [getattr(function, "__name__", repr(function)) for function in hops]
    assert names.count("getaddrinfo") <= 1, names
    assert [name for name in names if name != "getaddrinfo"] == []


@contextlib.asynccontextmanager
async def forward_proxy(seen: list[dict[str, str]]) -> AsyncIterator[int]:
    """A plain HTTP forward proxy on 127.0.0.1: records each request head, then relays."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, target, version = request_line.split(" ")
        headers = dict(line.split(": ", 1) for line in header_lines if line)
        seen.append({"target": target, **headers})
        url = urlsplit(target)
        upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port)
        path = url.path + (f"?{url.query}" if url.query else "")
        forwarded = [f"{method} {path} {version}"] + [
            line for line in header_lines if line and not line.startswith("Proxy-")
        ]
        upstream_writer.write(("\r\n".join(forwarded) + "\r\n\r\n").encode("latin-1"))
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with proxy:
        yield proxy.sockets[0].getsockname()[1]


async def test_edge_proxy_carries_every_upstream_connection(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """With EDGE_PROXY, the voice list and each utterance go through the proxy, with its
    credentials."""
    seen: list[dict[str, str]] = []
    async with forward_proxy(seen) as port:
        server = await start_server(**AS_IS, edge_proxy=f"http://me:s3cret@127.0.0.1:{port}")
        async with connected(server) as client:
            await client.speak("Through the proxy.")
            result = await client.until_final("u1")
            assert result.final["type"] == "end" and result.audio
    assert fake.voice_list_requests >= 1 and len(fake.records) == 1
    credentials = "Basic " + base64.b64encode(b"me:s3cret").decode()
    assert {urlsplit(request["target"]).path for request in seen} == {
        urlsplit(fake.wss_url).path,
        urlsplit(fake.voices_url).path,
    }
    assert all(request.get("Proxy-Authorization") == credentials for request in seen)


async def _paced(gaps: list[float]) -> AsyncIterator[int]:
    for number, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield number


async def _drain(deadline: Any, stream: AsyncIterator[int]) -> list[int]:
    seen = []
    try:
        while True:
            seen.append(await deadline.next(stream))
    except StopAsyncIteration:
        return seen
    finally:
        deadline.close()


async def test_gap_deadline_bounds_each_wait_not_the_whole_stream() -> None:
    """Many short gaps outlast the deadline together and pass; one long gap fails it."""
    from ttsstream.engines.edge import _GapDeadline

    seconds = TIMEOUT / 25  # each gap of a tenth of it passes, however late its wake-up
    short = seconds / 10
    assert await _drain(_GapDeadline(seconds), _paced([short] * 20)) == list(range(20))
    seen: list[int] = []
    deadline = _GapDeadline(seconds)
    stream = _paced([short, short, seconds * 5, short])
    with pytest.raises(TimeoutError):
        while True:
            seen.append(await deadline.next(stream))
    deadline.close()
    assert seen == [0, 1]


async def test_gap_deadline_leaves_a_foreign_cancel_a_cancel() -> None:
    """Cancelling the reader is a cancellation, never a timeout, and leaves no timer."""
    from ttsstream.engines.edge import _GapDeadline

    seconds = TIMEOUT / 25
    deadline = _GapDeadline(seconds)
    task = asyncio.create_task(_drain(deadline, _paced([TIMEOUT])))
    await asyncio.sleep(0)  # the task waits for its stream, its deadline armed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadline._timer is None
    await asyncio.sleep(seconds * 1.5)  # past the deadline: nothing fires into anything
    assert not deadline._fired


# Upstream slots shared between clients


@contextlib.asynccontextmanager
async def connected_from(server: Server, ip: str) -> AsyncIterator[Client]:
    """A client of ``server`` whose address, as its trusted proxy forwards it, is ``ip``."""
    async with connect(
        url_of(server),
        additional_headers={"X-Forwarded-For": ip},
        max_size=None,
        compression=None,
    ) as ws:
        client = Client(ws)
        client.hello = await client.recv_message()
        yield client


async def until(check: Callable[[], bool]) -> None:
    """Wait until ``check()`` holds (at most TIMEOUT)."""
    await eventually(check)


async def first_audio(client: Client, id: str = "u1") -> Utterance:
    """What has come of utterance ``id`` up to its first audio."""
    while not client.so_far(id).audio:
        await client.read_one()
    return client.so_far(id)


@contextlib.asynccontextmanager
async def speaking_from(server: Server, ip: str, text: str, door: str) -> AsyncIterator[None]:
    """A request of client ``ip`` to speak ``text`` through ``door`` (``ws``, ``http``:
    ``POST /tts``, or ``openai``: ``POST /v1/audio/speech``), kept open (its audio
    unread) until the block ends."""
    if door == "ws":
        async with connected_from(server, ip) as client:
            await client.speak(text)
            yield
        return
    path, body = (
        ("/tts", {"text": text})
        if door == "http"
        else ("/v1/audio/speech", {"model": "tts-1", "voice": "alloy", "input": text})
    )
    url = f"http://127.0.0.1:{server.port}{path}"

    async def post() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers={"X-Forwarded-For": ip}),
        ):
            await asyncio.Event().wait()

    request = asyncio.create_task(post())
    try:
        yield
    finally:
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request


@pytest.mark.parametrize("door", ["ws", "http", "openai"])
async def test_a_client_at_its_share_leaves_the_other_slots_to_others(
    start_server: ServerFactory, fake: FakeEdge, door: str
) -> None:
    """UPSTREAM_CONCURRENCY=2, one per IP: while one client's synthesis holds a slot (Edge
    paused) and two more of its texts wait (asked over any door), another client gets
    the free slot and its first audio at once, before anything of the first client's
    moves."""
    server = await start_server(**AS_IS, upstream_concurrency=2, upstream_concurrency_per_ip=1)
    slots = server.services.router.slots
    fake.pause_after_chunks = 1
    async with contextlib.AsyncExitStack() as stack:
        for number in range(3):
            text = f"Heavy text number {number}."
            await stack.enter_async_context(speaking_from(server, HEAVY, text, door))
        await until(lambda: fake.paused.is_set() and slots.waiting == 2)
        assert slots.held_by(HEAVY) == 1 and slots.free == 1
        light = await stack.enter_async_context(connected_from(server, LIGHT))
        await light.speak("Light text.")
        started = await first_audio(light)
        assert started.messages[0]["engine"] == "edge"
        # The first client's synthesis is still paused, its backlog still waiting.
        assert not fake.records[0].completed and slots.waiting == 2
        assert [record.text for record in fake.records][1:] == ["Light text."]


async def test_a_freed_slot_goes_to_another_client_before_a_backlog(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """UPSTREAM_CONCURRENCY=1: one client's synthesis holds the slot and two more of its
    texts wait; another client's text, asked after them, is spoken next."""
    server = await start_server(**AS_IS, upstream_concurrency=1)
    slots = server.services.router.slots
    fake.pause_after_chunks = 1
    async with contextlib.AsyncExitStack() as stack:
        heavy = [await stack.enter_async_context(connected_from(server, HEAVY)) for _ in range(3)]
        await heavy[0].speak("Heavy text number 0.")
        await until(fake.paused.is_set)
        for number, client in enumerate(heavy[1:], 1):
            await client.speak(f"Heavy text number {number}.")
        await until(lambda: slots.waiting == 2)
        light = await stack.enter_async_context(connected_from(server, LIGHT))
        await light.speak("Light text.")
        await until(lambda: slots.waiting == 3)
        fake.pause_after_chunks = None
        fake.resume.set()
        for client in (*heavy, light):
            assert (await client.until_final("u1")).final["type"] == "end"
    texts = [record.text for record in fake.records]
    assert texts[:2] == ["Heavy text number 0.", "Light text."]
    assert sorted(texts[2:]) == ["Heavy text number 1.", "Heavy text number 2."]


#: A text whose synthesis lasts a while (about 240 chunks of audio).
LONG_TEXT = " ".join(f"word{number}" for number in range(60))


@pytest.mark.parametrize("fallback_voice", ["espeak:auto", None], ids=["fallback", "none"])
async def test_the_wait_for_a_slot_counts_toward_upstream_timeout(
    start_server: ServerFactory,
    fake: FakeEdge,
    fallback_voice: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While another client's long synthesis holds the only slot, a request is spoken by
    the offline voice (or fails with upstream_timeout) once UPSTREAM_TIMEOUT has passed,
    not when the slot frees; Edge is not blamed for it, the operator is told."""
    caplog.set_level(logging.WARNING, logger="ttsstream.core.router")
    deadline = TIMEOUT / 10
    server = await start_server(
        upstream_concurrency=1,
        upstream_retries=0,
        upstream_timeout=deadline,
        fallback_voice=fallback_voice,
    )
    # The holder streams on, each gap well within UPSTREAM_TIMEOUT.
    fake.chunk_delay = deadline / 10
    loop = asyncio.get_running_loop()
    async with connected_from(server, HEAVY) as heavy, connected_from(server, LIGHT) as light:
        await heavy.speak(LONG_TEXT)
        await first_audio(heavy)
        asked = loop.time()
        await light.speak("Light text.")
        result = await light.until_final("u1")
        waited = loop.time() - asked
        assert not fake.records[0].completed  # the slot is still held
    assert waited >= deadline
    if fallback_voice is None:
        assert result.final["code"] == "upstream_timeout" and result.audio == b""
    else:
        start = result.messages[0]
        assert (start["engine"], start["fallback_reason"]) == ("espeak", "upstream_timeout")
        assert result.final["type"] == "end" and result.audio
    assert len(fake.records) == 1  # the request never reached Edge
    services = server.services
    assert services.stats.upstream_errors == 0
    assert services.stats.fallbacks == (0 if fallback_voice is None else 1)
    assert services.router.breaker.status.consecutive_failures == 0
    assert services.router.slots.held_by(LIGHT) == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "ttsstream.core.router"]
    assert warning.startswith("upstream slots: a request got none of this instance's")


async def test_a_cancelled_wait_for_a_slot_takes_nothing(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """An utterance cancelled while it waits for the only slot takes none, keeps none
    once the holder is done, and the next utterance runs alone on Edge."""
    server = await start_server(**AS_IS, upstream_concurrency=1)
    slots = server.services.router.slots
    fake.pause_after_chunks = 1
    async with connected_from(server, HEAVY) as heavy, connected_from(server, LIGHT) as light:
        await heavy.speak("Holding the slot.")
        await until(fake.paused.is_set)
        await light.speak("Waiting for it.")
        await until(lambda: slots.waiting == 1)
        await light.send({"type": "cancel", "id": "u1"})
        assert (await light.until_final("u1")).final["type"] == "cancelled"
        await until(lambda: slots.waiting == 0)
        assert (slots.free, slots.held_by(HEAVY), slots.held_by(LIGHT)) == (0, 1, 0)
        fake.pause_after_chunks = None
        fake.resume.set()
        assert (await heavy.until_final("u1")).final["type"] == "end"
        await until(lambda: slots.free == 1)
        await speaks_fine(light)
    assert len(fake.records) == 2 and fake.max_active == 1
