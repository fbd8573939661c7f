"""Utterances on one connection: order, queue, cancel, and bad input that loses nothing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import (
    TIMEOUT,
    Client,
    ServerFactory,
    connected,
    connected_to,
    eventually,
    speaks_fine,
    url_of,
)
from tests.fake_edge import FakeEdge, spoken_words
from tests.processes import serve_process, stop
from ttsstream.config import Config
from ttsstream.core.context import ANONYMOUS, RequestContext
from ttsstream.core.router import Started
from ttsstream.core.utterance import Summary
from ttsstream.engines.base import (
    MP3_24KHZ_48KBPS,
    SynthesisEvent,
    SynthesisRequest,
    Voice,
    WordEvent,
)
from ttsstream.exceptions import ClientError
from ttsstream.logs import fields_of
from ttsstream.protocols.v1 import MAX_FRAME_BYTES
from ttsstream.server import Server
from ttsstream.services import build_services


async def test_utterances_are_spoken_one_at_a_time_in_order(client: Client, fake: FakeEdge) -> None:
    """Three speaks sent at once play in order, each with its own audio between start and end."""
    texts = {"a": "First one.", "b": "Second, longer one here.", "c": "Third."}
    for id, text in texts.items():
        await client.speak(text, id=id)
    results = [await client.until_final(id) for id in texts]
    for result, record in zip(results, fake.records, strict=True):
        assert result.messages[0]["type"] == "start"
        assert result.final["type"] == "end"
        assert bytes(result.audio) == bytes(record.audio)
        assert [w["text"] for w in result.words] == spoken_words(texts[result.id])


async def test_word_events_never_follow_their_audio(client: Client) -> None:
    """Each word arrives before the audio at its offset was sent (6 bytes per ms)."""
    await client.speak("Words arrive ahead of the audio they describe, always.")
    result = await client.until_final("u1")
    sent = 0
    for frame in result.frames:
        if isinstance(frame, bytes):
            sent += len(frame)
        elif frame["type"] == "word":
            assert sent <= frame["offset_ms"] * MP3_24KHZ_48KBPS.bitrate_bps / 8000


async def test_cancel_playing_utterance_closes_upstream(client: Client, fake: FakeEdge) -> None:
    """Cancelling mid-stream answers cancelled, sends no more of its audio, closes the upstream."""
    fake.pause_after_chunks = 1
    await client.speak("A long sentence that will be cut short by a cancel.")
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    await client.send({"type": "cancel", "id": "u1"})
    result = await client.until_final("u1")
    assert result.final == {"type": "cancelled", "id": "u1"}
    assert result.messages[0]["type"] == "start"
    await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)
    assert not fake.records[0].completed
    fake.pause_after_chunks = None
    await speaks_fine(client)  # no audio of u1 arrives after its cancelled


async def test_cancel_queued_utterance(client: Client, fake: FakeEdge) -> None:
    """A queued utterance is cancelled at once and never starts; the playing one finishes."""
    fake.pause_after_chunks = 1
    await client.speak("Playing now.", id="p")
    await client.speak("Waiting.", id="q")
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    await client.send({"type": "cancel", "id": "q"})
    queued = await client.until_final("q")
    assert queued.messages == [{"type": "cancelled", "id": "q"}]
    fake.resume.set()
    playing = await client.until_final("p")
    assert playing.final["type"] == "end"
    await speaks_fine(client)
    assert len(fake.records) == 2  # p and the check; q never reached the upstream


async def test_cancel_without_id_cancels_everything_in_order(
    client: Client, fake: FakeEdge
) -> None:
    """cancel without id cancels the playing utterance, then the queued ones, in order."""
    fake.pause_after_chunks = 1
    for id in ("a", "b", "c"):
        await client.speak(f"Utterance {id}.", id=id)
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    await client.send({"type": "cancel"})
    assert (await client.until_final("a")).final["type"] == "cancelled"
    assert await client.recv_message() == {"type": "cancelled", "id": "b"}
    assert await client.recv_message() == {"type": "cancelled", "id": "c"}
    fake.pause_after_chunks = None
    await speaks_fine(client)


async def test_cancel_unknown_id_is_not_found(client: Client) -> None:
    """Cancelling an id that is neither queued nor playing answers not_found."""
    await client.send({"type": "cancel", "id": "ghost"})
    error = await client.recv_message()
    assert error["type"] == "error"
    assert (error["id"], error["code"]) == ("ghost", "not_found")
    await speaks_fine(client)


async def test_queue_is_bounded(start_server: ServerFactory, fake: FakeEdge) -> None:
    """Past QUEUE_SIZE waiting utterances, a speak gets queue_full; the others still play."""
    server = await start_server(queue_size=2)
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await client.speak("Playing.", id="p")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await client.speak("One.", id="q1")
        await client.speak("Two.", id="q2")
        await client.speak("Three.", id="q3")
        error = await client.until_final("q3")
        assert error.final["code"] == "queue_full"
        fake.resume.set()
        for id in ("p", "q1", "q2"):
            assert (await client.until_final(id)).final["type"] == "end"


async def test_duplicate_id_is_refused_while_in_use(client: Client, fake: FakeEdge) -> None:
    """A speak reusing a queued or playing id is refused; after it ended the id is free again."""
    fake.pause_after_chunks = 1
    await client.speak("First.", id="same")
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    await client.speak("Second.", id="same")
    # Read raw frames: the refusal and the playing utterance share the id.
    types = []
    while "error" not in types:
        frame = await client.recv()
        types.append("audio" if isinstance(frame, bytes) else frame["type"])
        if types[-1] == "error":
            assert isinstance(frame, dict) and frame["code"] == "invalid_parameter"
    fake.resume.set()
    while types[-1] != "end":
        frame = await client.recv()
        types.append("audio" if isinstance(frame, bytes) else frame["type"])
    assert types.count("start") == 1 and types[0] == "start"
    await speaks_fine(client, id="same")
    assert len(fake.records) == 2


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("garbage{{{", "bad_json"),
        ("[" * 100_00 + "]" * 100_00, "bad_json"),
        (b"\x00\xff binary", "bad_message"),
        ('{"type":"sing","id":"x"}', "bad_message"),
        ('{"type":"speak","id":"x"}', "bad_message"),
        ('{"type":"speak","id":"x","text":"   "}', "empty_text"),
        ('{"type":"speak","id":"x","text":"' + "y" * 60_000 + '"}', "text_too_long"),
        ('{"type":"speak","id":"x","text":"hi","rate":"fast"}', "invalid_parameter"),
        ('{"type":"speak","id":"x","text":"hi","voice":"Bob"}', "invalid_voice"),
    ],
)
async def test_bad_frames_get_their_error_and_the_connection_survives(
    client: Client, fake: FakeEdge, frame: str | bytes, code: str
) -> None:
    """Each hostile or malformed frame gets its error code; nothing reaches the upstream."""
    await client.send(frame)
    error = await client.recv_message()
    assert error["type"] == "error"
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert fake.records == []
    await speaks_fine(client)


async def test_unknown_voice_is_refused_before_the_upstream(client: Client, fake: FakeEdge) -> None:
    """With the voice list known, an unlisted voice gets invalid_voice and no upstream call."""
    await client.send({"type": "voices"})
    voices = await client.recv_message()
    assert voices["type"] == "voices"
    await client.speak("Hi.", voice="en-US-NobodyNeural")
    error = await client.until_final("u1")
    assert error.final["code"] == "invalid_voice"
    assert fake.records == []


async def test_voices_lists_edge_and_offline_voices(client: Client, fake: FakeEdge) -> None:
    """voices lists the upstream's voices and the offline ones; asking again does not refetch."""
    await client.send({"type": "voices"})
    first = await client.next_loose()
    await client.send({"type": "voices"})
    second = await client.next_loose()
    assert first == second
    assert {"name", "locale", "gender", "engine"} == set(first["voices"][0])
    edge = {v["name"] for v in first["voices"] if v["engine"] == "edge"}
    offline = {v["name"] for v in first["voices"] if v["engine"] == "espeak"}
    assert edge == {voice["ShortName"] for voice in fake.voices}
    assert {"espeak:en-us", "espeak:fr", "espeak:de"} <= offline
    assert fake.voice_list_requests == 1


async def test_voice_list_failure_leaves_offline_voices(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """When Edge's list cannot be fetched, voices lists the offline voices alone."""
    fake.refuse_voices_status = 503
    async with connected(await start_server()) as client:
        await client.send({"type": "voices"})
        voices = await client.next_loose()
        assert voices["type"] == "voices" and voices["voices"]
        assert {v["engine"] for v in voices["voices"]} == {"espeak"}


async def test_voice_list_failure_without_offline_voice(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Without an offline voice, a failed voice list answers upstream_unavailable."""
    fake.refuse_voices_status = 503
    async with connected(await start_server(with_offline=False)) as client:
        await client.send({"type": "voices"})
        error = await client.next_loose()
        assert (error["type"], error["id"], error["code"]) == (
            "error",
            None,
            "upstream_unavailable",
        )
        # Voices cannot be checked, so a well-formed voice is passed on to the upstream.
        await speaks_fine(client)


async def test_oversized_frame_closes_with_1009(client: Client) -> None:
    """A frame larger than 64 KiB closes the connection with 1009 (message too big)."""
    await client.ws.send("x" * (MAX_FRAME_BYTES + 1))
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.ws.recv(), TIMEOUT)
    assert client.ws.close_code == 1009


async def test_other_paths_get_404(server: Server) -> None:
    """A handshake on any path but /v1/stream is refused with 404 and a JSON body."""
    with pytest.raises(InvalidStatus) as raised:
        async with connect(url_of(server, "/v2/other")):
            pass
    response = raised.value.response
    assert response.status_code == 404
    assert orjson.loads(response.body)["error"] == "not_found"


async def test_shutdown_closes_with_1001(client: Client, server: Server) -> None:
    """Closing the server closes open connections with 1001 (going away)."""
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.ws.recv(), TIMEOUT)
    assert client.ws.close_code == 1001


class BrokenEngine:
    """An engine whose synthesis fails with an unexpected exception."""

    name = "broken"
    audio_format = MP3_24KHZ_48KBPS

    async def synthesize(self, request: SynthesisRequest) -> AsyncGenerator[SynthesisEvent, None]:
        raise RuntimeError("secret internal detail")
        yield  # pragma: no cover

    async def aclose(self) -> None:
        pass

    async def voices(self) -> list[Voice]:
        return []

    async def check_voice(self, voice: str) -> None:
        return None


async def test_unexpected_failure_is_internal_and_reveals_nothing() -> None:
    """A bug in an engine gives internal with no detail, and the connection keeps working."""
    config = Config(host="127.0.0.1", port=0, health_port=0)
    services = build_services(config, edge=BrokenEngine(), with_offline=False)
    async with Server(services) as server, connected(server) as client:
        for id in ("a", "b"):
            await client.speak("Hi.", id=id)
            error = await client.until_final(id)
            assert error.final["code"] == "internal"
            assert "secret" not in error.final["message"]
        await client.send({"type": "voices"})
        assert await client.recv_message() == {"type": "voices", "voices": []}


async def test_client_disconnect_closes_its_upstream(server: Server, fake: FakeEdge) -> None:
    """When a client goes away mid-utterance, its upstream stream is closed at once."""
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await client.speak("Nobody will hear the end of this sentence.")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)
    assert not fake.records[0].completed


class FaultySink:
    """A sink with a bug: its audio, its failure and its end all raise."""

    cut: ClientError | None = None
    gone = False

    async def start(self, started: Started) -> None:
        pass

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        raise RuntimeError("audio")

    async def word(self, word: WordEvent) -> None:
        pass

    async def words(self, words: Sequence[WordEvent]) -> None:
        pass

    async def end(self, summary: Summary) -> None:
        pass

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        raise RuntimeError("fail")

    def hold(self, on: bool) -> None:
        pass

    def finished(self) -> None:
        raise RuntimeError("finished")


async def test_whatever_a_sink_raises_the_utterance_is_cleaned_up(
    server: Server, fake: FakeEdge, caplog: pytest.LogCaptureFixture
) -> None:
    """A sink that raises everywhere does not keep its utterance active: it is counted,
    has its access-log line and its upstream is closed (the bug still propagates)."""
    caplog.set_level(logging.INFO, logger="ttsstream.access")
    utterances = server.services.utterances
    fake.pause_after_chunks = 1
    with pytest.raises(RuntimeError):
        await utterances.run(
            utterances.request(text="A sink with a bug.", voice=None),
            FaultySink(),
            utterance_id="faulty",
            received_at=time.perf_counter(),
            context=RequestContext(ANONYMOUS, "127.0.0.1", "test", "ws"),
        )
    assert server.stats.active_utterances == 0
    (line,) = [fields_of(r) for r in caplog.records if r.name == "ttsstream.access"]
    assert (line["id"], line["outcome"]) == ("faulty", "internal")
    await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)


async def test_a_client_that_leaves_mid_utterance_is_disconnected_not_cancelled(
    server: Server, fake: FakeEdge, caplog: pytest.LogCaptureFixture
) -> None:
    """A client whose connection closes while its utterance waits for the upstream is
    logged and counted ``disconnected``, as one that stops reading is; a cancel it sent
    is still ``cancelled``."""
    caplog.set_level(logging.INFO, logger="ttsstream.access")
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await client.speak("Nobody will hear the end of this sentence.", id="left")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    fake.paused.clear()
    async with connected(server) as client:
        await client.speak("This one is cancelled by its client.", id="called-off")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await client.send({"type": "cancel", "id": "called-off"})
        assert (await client.until_final("called-off")).final["type"] == "cancelled"

    def outcomes() -> dict[str, str]:
        lines = [fields_of(r) for r in caplog.records if r.name == "ttsstream.access"]
        return {line["id"]: line["outcome"] for line in lines if "outcome" in line}

    await eventually(lambda: len(outcomes()) == 2, what="both access-log lines")
    assert outcomes() == {"left": "disconnected", "called-off": "cancelled"}
    assert server.stats.outcomes_by_interface["ws", "disconnected"] == 1


async def test_refusals_of_a_speak_without_id_carry_a_null_id(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Whatever refuses a speak sent without an id (its text, its voice, a full queue),
    the error's id is null, never a server-made id the client was never told; a
    queue of one says "1 utterance is"."""
    server = await start_server(queue_size=1)
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await client.send({"type": "voices"})
        assert (await client.next_loose())["type"] == "voices"
        await client.send({"type": "speak", "text": "   "})
        await client.send({"type": "speak", "text": "Hi.", "voice": "en-US-NobodyNeural"})
        refusals = [await client.next_loose() for _ in range(2)]
        assert [(r["code"], r["id"]) for r in refusals] == [
            ("empty_text", None),
            ("invalid_voice", None),
        ]
        await client.speak("Playing.", id="p")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await client.speak("Waiting.", id="w")
        await client.send({"type": "speak", "text": "One too many."})
        full = await client.next_loose()
        assert (full["code"], full["id"]) == ("queue_full", None)
        assert full["message"] == "1 utterance is already waiting"
        fake.resume.set()
        for id in ("p", "w"):
            assert (await client.until_final(id)).final["type"] == "end"


#: Cached replays a test drops the connection of, per format.
DROPPED_REPLAYS = 15


async def test_a_replay_dropped_mid_way_still_ends_its_utterance(
    fake: FakeEdge, tmp_path: Path
) -> None:
    """A client that drops its TCP connection during cached replays (Opus, then MP3) leaves
    no utterance active, gets one access-log line per utterance saying ``disconnected``,
    and no error in the server's log (a process: its event loop is uvloop's, as deployed)."""
    fake.tone = True
    logs = tmp_path / "logs"
    process, url, side = await serve_process(
        fake,
        tmp_path,
        LOG_DIR=str(logs),
        LOG_FORMAT="json",
        RATE_LIMIT_REQUESTS="0",
        MAX_CONNECTIONS_PER_IP="1000",
        RESUME_WINDOW="0",  # dropped for good (tests/test_resume.py: dropped and resumed)
    )
    text = "A replay that nobody stays to hear, long enough to take a few frames. " * 8
    try:
        # Only the MP3 is stored: each Opus replay is made from it as it is sent.
        async with connected_to(url) as client:
            await client.speak(text, id="stored")
            assert (await client.until_final("stored")).final["type"] == "end"
        await eventually(lambda: list((tmp_path / "cache").glob("*/*.tts")), what="stored")
        dropped = {
            f"{name}-{number}" for name in ("opus", "mp3") for number in range(DROPPED_REPLAYS)
        }
        for id in sorted(dropped):
            async with connected_to(url) as client:
                await client.speak(text, id=id, format=id.split("-")[0])
                start = await client.recv_message()
                assert (start["type"], start["cached"]) == ("start", True)
                client.ws.transport.abort()
        stats: dict[str, Any] = {}
        lines: list[dict[str, Any]] = []
        async with aiohttp.ClientSession() as session:

            async def all_ended() -> bool:
                nonlocal stats, lines
                async with session.get(f"http://{side}/stats") as response:
                    stats = await response.json()
                logged = map(orjson.loads, (logs / "access.log").read_bytes().splitlines())
                lines = [line for line in logged if line.get("id") in dropped]
                return bool(stats["active_utterances"] == 0 and len(lines) == len(dropped))

            await eventually(all_ended, what="every dropped replay ended and logged")
        assert stats["active_utterances"] == 0, stats
        assert sorted(line["id"] for line in lines) == sorted(dropped)
        # Some replays may be written whole before the connection drops.
        assert {line["outcome"] for line in lines} <= {"disconnected", "ok"}
        errors = (logs / "error.log").read_text()
        assert "Traceback" not in errors and '"level":"ERROR"' not in errors, errors
    finally:
        await stop(process)


async def test_queue_size_zero_lets_one_play_and_none_wait(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """With QUEUE_SIZE=0 the first speak plays (it waits for nothing) and a second while
    it plays gets queue_full (before, every speak was refused)."""
    server = await start_server(queue_size=0)
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await client.speak("Playing.", id="p")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await client.speak("Waiting.", id="w")
        assert (await client.until_final("w")).final["code"] == "queue_full"
        fake.resume.set()
        assert (await client.until_final("p")).final["type"] == "end"
