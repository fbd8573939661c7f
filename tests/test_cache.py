"""The cache through a real server: replay, single flight, what is never stored, bad disks."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import weakref
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from tests.conftest import (
    MANY_CLIENTS,
    TIMEOUT,
    Client,
    ServerFactory,
    Utterance,
    connected,
    entries,
    eventually,
    url_of,
    wait_for_entries,
)
from tests.fake_edge import FakeEdge
from tests.processes import LISTENING, environment, run, start_process
from tests.redis_server import RedisServer
from ttsstream.audio.formats import FORMAT_NAMES, FORMATS
from ttsstream.cache.flight import SharedSynthesis
from ttsstream.core.speech_cache import REPLAY_CHUNK_BYTES
from ttsstream.engines.base import SynthesisRequest
from ttsstream.server import Server
from ttsstream.ws.session import Session

TEXT = "Caching makes the second time instant, with the very same words."


async def speak_once(server: Server, text: str = TEXT, id: str = "u1", **fields: Any) -> Utterance:
    async with connected(server) as client:
        await client.speak(text, id=id, **fields)
        return await client.until_final(id)


async def test_hit_replays_the_same_audio_and_words(server: Server, fake: FakeEdge) -> None:
    """A repeated request replays byte-identical audio and words without calling Edge."""
    live = await speak_once(server)
    await wait_for_entries(server, 1)
    hit = await speak_once(server)
    assert len(fake.records) == 1
    assert (live.messages[0]["cached"], hit.messages[0]["cached"]) == (False, True)
    assert (live.final["cached"], hit.final["cached"]) == (False, True)
    assert hit.messages[0]["engine"] == "edge" and hit.messages[0]["fallback"] is False
    assert bytes(hit.audio) == bytes(live.audio)
    assert hit.words == [{**w, "id": "u1"} for w in live.words]
    assert hit.final["bytes"] == live.final["bytes"]
    assert hit.final["audio_ms"] == live.final["audio_ms"]
    assert server.stats.cache_hits == 1 and server.stats.cache_misses == 1
    assert server.stats.cache_hit_rate == "50.0%"
    assert server.stats.cache_entries == 1


async def test_any_difference_misses(server: Server, fake: FakeEdge) -> None:
    """A different voice, rate, volume, pitch or text is synthesized anew."""
    await speak_once(server)
    await wait_for_entries(server, 1)
    for fields in (
        {"voice": "en-US-GuyNeural"},
        {"rate": "+10%"},
        {"volume": "-10%"},
        {"pitch": "+2Hz"},
        {"text": TEXT + " "},
    ):
        await speak_once(server, **{"text": TEXT, **fields})
    assert len(fake.records) == 6


async def test_replay_interleaves_words_before_their_audio(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A long hit comes in chunks of REPLAY_CHUNK_BYTES, each word before its audio."""
    server = await start_server()
    text = " ".join(["A rather long sentence that makes plenty of audio for chunking."] * 12)
    await speak_once(server, text)
    await wait_for_entries(server, 1)
    hit = await speak_once(server, text)
    sizes = [len(frame) for frame in hit.frames if isinstance(frame, bytes)]
    assert len(sizes) > 2 and max(sizes) == REPLAY_CHUNK_BYTES
    sent = 0
    for frame in hit.frames:
        if isinstance(frame, bytes):
            sent += len(frame)
        elif frame["type"] == "word":
            assert sent <= frame["offset_ms"] * 6
    assert len(hit.words) == len(fake.records[0].words)


async def test_batched_replay_sends_all_words_at_once(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A hit with "words": "batch" is start, one words message, the audio, end."""
    server = await start_server()
    text = " ".join(["A rather long sentence that makes plenty of audio for chunking."] * 12)
    live = await speak_once(server, text)
    await wait_for_entries(server, 1)
    hit = await speak_once(server, text, words="batch")
    kinds = ["audio" if isinstance(frame, bytes) else frame["type"] for frame in hit.frames]
    frames = len(live.audio) // REPLAY_CHUNK_BYTES + 1
    assert kinds == ["start", "words"] + ["audio"] * frames + ["end"]
    assert hit.messages[0]["cached"] is True
    assert hit.batched_words == [
        {k: v for k, v in w.items() if k not in ("type", "id")} for w in live.words
    ]
    assert hit.final["words"] == len(live.words)
    assert bytes(hit.audio) == bytes(live.audio)


async def test_one_entry_replayed_in_every_words_mode_in_turn_is_each_mode_s(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A replay's events are made once per entry and words mode, and kept with the entry:
    replays of one entry in "batch", "each", "none" and "batch" again, in turns, are each
    as their mode says, with the same audio."""
    server = await start_server()
    text = " ".join(["A rather long sentence that makes plenty of audio for chunking."] * 6)
    live = await speak_once(server, text)
    await wait_for_entries(server, 1)
    frames = len(live.audio) // REPLAY_CHUNK_BYTES + 1
    for _ in range(2):
        for words in ("batch", "each", "none", "batch"):
            hit = await speak_once(server, text, words=words)
            kinds = ["audio" if isinstance(f, bytes) else f["type"] for f in hit.frames]
            assert bytes(hit.audio) == bytes(live.audio)
            assert kinds.count("audio") == frames and kinds[0] == "start" and kinds[-1] == "end"
            if words == "batch":
                assert kinds[1] == "words" and kinds.count("words") == 1
            elif words == "each":
                assert kinds.count("word") == len(live.words) and "words" not in kinds
            else:
                assert "word" not in kinds and "words" not in kinds
    assert len(fake.records) == 1


async def test_replay_is_written_in_held_back_bursts_and_left_released(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hit's frames are held back in websockets' outgoing data during a burst and
    written together at its release (the start message and the first audio frame,
    then the rest); nothing is left held after its end; live audio is never held."""
    seen: list[tuple[bool, int]] = []
    cork = Session.cork

    def spy(session: Session, on: bool) -> None:
        # The frames the protocol holds to send when the release comes.
        held = len(session._ws.protocol.writes)
        cork(session, on)
        seen.append((on, held if not on else 0))
        if not on:
            assert not session._ws.protocol.writes, "the release wrote what was held"

    monkeypatch.setattr(Session, "cork", spy)
    live = await speak_once(server)
    assert all(on is False and held == 0 for on, held in seen), "live audio is never held"
    await wait_for_entries(server, 1)
    seen.clear()
    hit = await speak_once(server)
    assert hit.messages[0]["cached"] is True
    assert bytes(hit.audio) == bytes(live.audio)
    assert seen[0][0] is True, "held before the start message"
    assert seen[1][0] is False and seen[1][1] >= 2, "start and first audio written together"
    assert seen[-1][0] is False, "released once the utterance ended"


async def held_before_first_audio(fake: FakeEdge, client: Client) -> None:
    """Start an utterance whose first audio the fake holds back until ``fake.resume``."""
    fake.pause_after_chunks = 0
    await client.speak("This one waits for its first audio.", id="waiting")
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    fake.pause_after_chunks = None  # later requests are not held


async def test_store_waits_while_an_utterance_waits_for_first_audio(
    server: Server, fake: FakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished utterance is stored once no other utterance waits for its first audio."""
    monkeypatch.setattr(
        "ttsstream.core.speech_cache.STORE_DELAY_MAX", 60.0
    )  # only the quiet can store it
    async with connected(server) as waiting:
        await held_before_first_audio(fake, waiting)
        finished = await speak_once(server)
        assert finished.final["type"] == "end"
        await asyncio.sleep(0.3)
        assert entries(server) == [], "stored while another utterance waited for first audio"
        # Meanwhile an identical request is answered from memory, as a cached entry.
        again = await speak_once(server, id="again")
        assert again.messages[0]["cached"] is True
        assert bytes(again.audio) == bytes(finished.audio)
        assert [w["text"] for w in again.words] == [w["text"] for w in finished.words]
        assert len(fake.records) == 2
        fake.resume.set()
        await waiting.until_final("waiting")
        await wait_for_entries(server, 2)
    hit = await speak_once(server)
    assert hit.messages[0]["cached"] is True and len(fake.records) == 2


async def test_store_waits_at_most_store_delay_max(
    server: Server, fake: FakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An utterance that never gets its first audio delays others' storing only so long."""
    monkeypatch.setattr("ttsstream.core.speech_cache.STORE_DELAY_MAX", 0.2)
    async with connected(server) as waiting:
        await held_before_first_audio(fake, waiting)
        await speak_once(server)
        await wait_for_entries(server, 1)
        assert not fake.records[0].completed, "the held utterance is still waiting"
        fake.resume.set()


async def test_drain_stores_what_waits_to_be_stored(
    server: Server, fake: FakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server shutting down stores finished utterances still waiting for their turn."""
    monkeypatch.setattr("ttsstream.core.speech_cache.STORE_DELAY_MAX", 60.0)
    async with connected(server) as waiting:
        await held_before_first_audio(fake, waiting)
        await speak_once(server)
        assert entries(server) == []
        await server.drain(0.2)  # the held utterance is cut; the finished one is stored
    assert len(entries(server)) == 1


async def test_concurrent_identical_requests_share_one_synthesis(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """50 identical requests at once call Edge once; all 50 get the same complete result."""
    server = await start_server(**MANY_CLIENTS)
    fake.chunk_delay = 0.005
    results = await asyncio.wait_for(
        asyncio.gather(*(speak_once(server) for _ in range(50))), TIMEOUT * 4
    )
    assert len(fake.records) == 1
    reference = bytes(fake.records[0].audio)
    for result in results:
        assert result.final["type"] == "end"
        assert bytes(result.audio) == reference
        assert len(result.words) == len(fake.records[0].words)
    assert server.stats.coalesced == 49


def _flight_referred_to_by_its_callback(finished: asyncio.Event) -> SharedSynthesis[bytes]:
    async def source() -> AsyncGenerator[bytes, None]:
        for _ in range(3):
            yield b"audio"

    def on_finished() -> None:
        if flight.done:  # refers back to the synthesis, as the cache's callbacks do
            finished.set()

    flight = SharedSynthesis(source(), on_finished=on_finished)
    return flight


async def test_finished_synthesis_is_freed_without_the_cycle_collector() -> None:
    """A finished synthesis and its events are freed by reference counting alone.

    Left to the cycle collector, finished syntheses piled up (tens of thousands of
    audio chunks at 100 clients) and made each full collection stop the loop for
    tens of milliseconds.
    """
    finished = asyncio.Event()
    flight = _flight_referred_to_by_its_callback(finished)
    assert [event async for event in flight.listen()] == [b"audio"] * 3
    await asyncio.wait_for(finished.wait(), TIMEOUT)
    await asyncio.sleep(0)  # the pump's task returns
    freed = weakref.ref(flight)
    gc.disable()
    try:
        del flight
        assert freed() is None
    finally:
        gc.enable()


async def test_a_bounded_flight_keeps_only_what_its_slowest_listener_lacks() -> None:
    """Past its bound a flight is neither joined nor stored: it drops what every listener
    took, and its source waits for the slowest listener, so it keeps at most the bound and
    one event however fast its source is; every listener still gets every event."""
    made = 0
    both_listen = asyncio.Event()

    async def source() -> AsyncGenerator[bytes, None]:
        nonlocal made
        await both_listen.wait()
        for number in range(100):
            made += 1
            yield bytes([number]) * 10

    completed: list[list[bytes]] = []

    async def on_complete(events: list[bytes]) -> None:
        completed.append(events)

    flight = SharedSynthesis(source(), on_complete=on_complete, size=len, max_kept=50)
    slow, fast = flight.listen(), flight.listen()
    firsts = [asyncio.ensure_future(anext(listener)) for listener in (slow, fast)]
    await asyncio.sleep(0)
    both_listen.set()
    slow_got, fast_got = [[await first] for first in firsts]

    async def read_fast() -> None:
        async for event in fast:
            fast_got.append(event)

    reading = asyncio.create_task(read_fast())
    while flight.whole:
        await asyncio.sleep(0)
    assert not flight.joinable
    async for event in slow:
        slow_got.append(event)
        for _ in range(5):
            await asyncio.sleep(0)  # the source and the fast listener run as far as they may
        assert flight.kept <= 50 + 10
        assert made <= len(slow_got) + 6
        assert len(fast_got) <= len(slow_got) + 6
    await reading
    assert slow_got == fast_got == [bytes([number]) * 10 for number in range(100)]
    assert completed == [] and flight.events == [] and flight.kept == 0


async def test_joiner_mid_stream_gets_everything(server: Server, fake: FakeEdge) -> None:
    """A request joining while the synthesis is paused mid-way still gets the whole audio."""
    fake.pause_after_chunks = 3
    async with connected(server) as first, connected(server) as second:
        await first.speak(TEXT)
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await second.speak(TEXT)
        while len(second.so_far("u1").audio) < len(fake.records[0].audio):
            await second.read_one()  # the part already produced arrives at once
        fake.resume.set()
        a, b = await first.until_final("u1"), await second.until_final("u1")
    assert bytes(a.audio) == bytes(b.audio) == bytes(fake.records[0].audio)
    assert a.words == b.words
    assert len(fake.records) == 1 and server.stats.coalesced == 1


async def test_slow_joiner_does_not_delay_a_fast_one(server: Server, fake: FakeEdge) -> None:
    """A listener that stops reading holds up neither the upstream nor the other listener."""
    text = " ".join(["Plenty of words to make a long stream of audio for this test."] * 60)
    slow_sock = socket.create_connection(("127.0.0.1", server.port))
    slow_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    async with connect(url_of(server), sock=slow_sock, max_queue=1) as slow_ws:
        slow = Client(slow_ws)
        await slow.recv_message()
        # Like a slow network: small buffers on both ends, so the server must wait for it.
        (slow_side,) = server.connections
        slow_side.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 32768
        )
        await slow.speak(text)
        async with connected(server) as fast:
            await fast.speak(text)
            result = await fast.until_final("u1")
            # The slow listener's connection is genuinely backed up at this point.
            backlog = max(c.transport.get_write_buffer_size() for c in server.connections)
        assert backlog > 0
        assert result.final["type"] == "end"
        assert fake.records[0].completed
        assert bytes(result.audio) == bytes(fake.records[0].audio)
        assert len(result.audio) > 1_000_000
        # The slow one still gets all of it once it reads.
        late = await slow.until_final("u1")
        assert bytes(late.audio) == bytes(result.audio)


async def test_cancelling_one_listener_keeps_the_others(server: Server, fake: FakeEdge) -> None:
    """A joiner that cancels leaves the synthesis running for the rest; when the last one
    leaves, the upstream stream closes."""
    fake.pause_after_chunks = 2
    async with connected(server) as a, connected(server) as b:
        await a.speak(TEXT)
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await b.speak(TEXT)
        await b.send({"type": "cancel", "id": "u1"})
        assert (await b.until_final("u1")).final["type"] == "cancelled"
        assert not fake.records[0].closed.is_set()
        fake.resume.set()
        assert (await a.until_final("u1")).final["type"] == "end"

    fake.pause_after_chunks, fake.resume = 2, asyncio.Event()
    fake.paused.clear()
    async with connected(server) as a, connected(server) as b:
        for client in (a, b):
            await client.speak("Another text for both.")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        for client in (a, b):
            await client.send({"type": "cancel", "id": "u1"})
            assert (await client.until_final("u1")).final["type"] == "cancelled"
        await asyncio.wait_for(fake.records[1].closed.wait(), TIMEOUT)
    assert not fake.records[1].completed
    await wait_for_entries(server, 1)  # the first text's entry (written by a thread)
    assert len(entries(server)) == 1  # the cancelled one was not stored


async def test_shared_failure_reaches_every_listener(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """When the shared synthesis fails mid-way, every listener gets the error."""
    server = await start_server()
    fake.drop_after_chunks = 3
    fake.chunk_delay = 0.01
    results = await asyncio.gather(*(speak_once(server) for _ in range(5)))
    assert len(fake.records) == 1
    assert all(r.final["code"] == "upstream_unavailable" for r in results)
    assert all("partial" in r.final["message"] for r in results)
    assert entries(server) == []


async def test_shared_fallback_reaches_every_listener_and_is_not_stored(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """When Edge refuses, all identical requests get the fallback voice; nothing is stored,
    and once Edge is back the text is synthesized by Edge."""
    server = await start_server(upstream_retries=0)
    fake.refuse_status = 503
    results = await asyncio.gather(*(speak_once(server) for _ in range(5)))
    assert all(r.messages[0]["fallback"] is True for r in results)
    assert all(r.final["type"] == "end" for r in results)
    assert entries(server) == []
    fake.refuse_status = None
    again = await speak_once(server)
    assert (again.messages[0]["engine"], again.messages[0]["cached"]) == ("edge", False)


async def test_cache_disabled_stores_and_shares_nothing(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """With CACHE_ENABLED=false every request goes to Edge and nothing is written."""
    server = await start_server(cache_enabled=False)
    await speak_once(server)
    await asyncio.gather(speak_once(server), speak_once(server))
    assert len(fake.records) == 3
    assert not server.config.cache_dir.exists()
    assert server.stats.cache_hits == server.stats.cache_misses == 0


async def test_corrupt_entry_is_synthesized_live_and_replaced(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A damaged entry is dropped, the request is spoken live, and a good entry replaces it.

    (Without the in-memory layer, which would keep serving its good copy.)"""
    server = await start_server(cache_memory_mb=0)
    live = await speak_once(server)
    await wait_for_entries(server, 1)
    (path,) = entries(server)
    path.write_bytes(path.read_bytes()[:-100])
    again = await speak_once(server)
    assert again.messages[0]["cached"] is False and again.final["type"] == "end"
    assert bytes(again.audio) == bytes(fake.records[1].audio)
    assert len(again.audio) == len(live.audio)
    assert server.stats.cache_errors == 1
    await wait_for_entries(server, 1)
    assert (await speak_once(server)).messages[0]["cached"] is True


async def test_formats_leave_the_mp3s_their_room(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Cached texts asked in every format keep their MP3s: FLAC, WAV and PCM are never
    stored, and the encoded formats stored beside them take at most a quarter of the cache
    (least recently used among themselves first)."""
    fake.tone = True
    texts = [f"{number}: " + "Long enough to weigh on a small cache. " * 8 for number in range(6)]
    first = await start_server()
    for text in texts:
        await speak_once(first, text)
    await wait_for_entries(first, len(texts))
    assert first.services.store is not None
    mp3_bytes = first.services.store.total_bytes
    # A second instance on the same disk, whose cache these MP3s fill.
    server = await start_server(cache_max_size_mb=mp3_bytes * 1.05 / 2**20)
    store = server.services.store
    assert store is not None and store.entries == len(texts)
    for name in ("flac", "wav", "pcm"):
        for text in texts:
            assert (await speak_once(server, text, format=name)).final["type"] == "end"
    # Nothing was stored, nothing evicted: every format was made from a cached MP3.
    assert len(fake.records) == len(texts)
    assert store.entries == len(entries(server)) == len(texts)
    for name in ("opus", "webm", "aac"):
        for text in texts:
            assert (await speak_once(server, text, format=name)).final["type"] == "end"
        # Written last of them (then evicted at once if that is its turn).
        last = server.services.speech.key_of(
            SynthesisRequest(text=texts[-1], voice=server.config.default_voice), FORMATS[name]
        )
        await eventually(functools.partial(store.holds, last), what="the last variant stored")
    assert store.variant_bytes <= store.variant_max_bytes
    largest = max(path.stat().st_size for path in entries(server) if "-" not in path.stem)
    assert store.total_bytes - store.variant_bytes >= (
        store.max_bytes - store.variant_max_bytes - largest
    )
    assert len([path for path in entries(server) if "-" not in path.stem]) >= 4


async def test_redis_keeps_only_the_mp3(
    start_server: ServerFactory, fake: FakeEdge, tmp_path: Path
) -> None:
    """A text asked in every format puts one entry in the cluster's Redis, its MP3: the
    other instances make the formats from it; the encoded ones are on this disk only."""
    redis = RedisServer(tmp_path)
    await redis.start()
    shared = aioredis.from_url(redis.url)
    try:
        server = await start_server(redis_url=redis.url)
        fake.tone = True
        for name in FORMAT_NAMES:
            assert (await speak_once(server, format=name)).final["type"] == "end"
        await wait_for_entries(server, 4)  # the MP3, and the Opus, WebM and AAC made of it
        # Written after all of those: once it is in Redis, so would they be.
        await speak_once(server, "Another text, to be shared after the first.")

        async def shared_entries() -> list[Any]:
            return list(await shared.keys("ttsstream:entry:*"))

        async def both_shared() -> bool:
            return len(await shared_entries()) >= 2

        await eventually(both_shared)
        assert len(await shared_entries()) == 2
        assert len(fake.records) == 2
    finally:
        await shared.aclose()
        await redis.stop()


def unshare_available() -> bool:
    return shutil.which("unshare") is not None


@pytest.mark.parametrize(
    ("mount", "what"),
    [("-o size=64k", "full"), ("-o ro", "read-only")],
    ids=["full_disk", "read_only"],
)
async def test_bad_disk_never_fails_a_request(
    fake: FakeEdge, tmp_path: Path, mount: str, what: str
) -> None:
    """On a full or read-only file system (a real tmpfs, mounted in a private namespace),
    requests are spoken live and the failure is logged."""
    assert unshare_available(), "util-linux unshare is needed for this test"
    cache = tmp_path / "cache"
    cache.mkdir()
    command = f"mount -t tmpfs {mount} tmpfs {cache} && exec {sys.executable} -m ttsstream serve"
    process = await start_process(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command],
        environment(fake, CACHE_DIR=str(cache), LOG_LEVEL="INFO"),
        tmp_path,
    )
    assert process.stderr is not None
    said = b""
    try:
        while not (match := LISTENING.search(said)):
            line = await asyncio.wait_for(process.stderr.readline(), TIMEOUT)
            assert line, said.decode()
            said += line
        url = f"ws://127.0.0.1:{match.group(1).decode()}/v1/stream"
        text = " ".join(["Long enough to overflow a tiny disk with its audio."] * 30)
        for _ in range(2):
            status, stderr = await run(
                [sys.executable, "-m", "ttsstream", "say", text, "-o", "out.mp3", "--url", url],
                cwd=tmp_path,
            )
            assert status == 0, stderr
            assert "by edge" in stderr
        assert (tmp_path / "out.mp3").read_bytes() == bytes(fake.records[-1].audio)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)
    log = said + await process.stderr.read()
    assert b"cache: " in log and b"failed" in log, log.decode()
    assert len(fake.records) == 2  # nothing could be cached, both were live
    assert process.returncode == 0


def test_unshare_is_installed() -> None:
    """The bad-disk tests need unshare (util-linux), present on Debian by default."""
    assert subprocess.run(["unshare", "--version"], capture_output=True).returncode == 0
    assert os.path.exists("/proc/self/ns/mnt")
