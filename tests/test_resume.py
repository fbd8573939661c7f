"""Resuming a dropped connection (protocol v1): the TCP connection is cut (no close
frame), a new one sends ``resume`` with the session token of the first ``hello``, and
each utterance goes on from exactly the byte and the message the client had: the
audio received before and after, put together, is the audio of an uninterrupted run,
and no word event is lost or comes twice."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.conftest import TIMEOUT, ServerFactory, eventually, url_of
from tests.fake_edge import FakeEdge
from tests.test_tenants import ALPHA, BETA, write_keys
from ttsstream.server import Server
from ttsstream.ws.resume import Buffers, Logs, UtteranceLog

TEXT = "A sentence that keeps going while the phone changes networks, and then some more."


@dataclass
class Copy:
    """A client's copy of one utterance: its audio and its JSON messages."""

    id: str
    audio: bytearray = field(default_factory=bytearray)
    messages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return bool(self.messages) and self.messages[-1]["type"] in ("end", "error")

    @property
    def words(self) -> list[tuple[str, float]]:
        found = []
        for message in self.messages:
            if message["type"] == "word":
                found.append((message["text"], message["offset_ms"]))
            elif message["type"] == "words":
                found += [(word["text"], word["offset_ms"]) for word in message["words"]]
        return found

    def resume_at(self) -> dict[str, Any]:
        return {"id": self.id, "offset": len(self.audio), "frames": len(self.messages)}


class Listener:
    """A v1 client that files frames per utterance (audio goes to the one that started
    last), and can be cut off and come back."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, **options: Any) -> None:
        self.url = url
        self.headers = headers or {}
        #: More of websockets' connect options (TLS, a source address).
        self.options = options
        self.ws: ClientConnection | None = None
        self.session = ""
        self.copies: dict[str, Copy] = {}
        self.current: str | None = None

    async def connect(self) -> dict[str, Any]:
        self.ws = await connect(
            self.url,
            max_size=None,
            compression=None,
            additional_headers=self.headers,
            **self.options,
        )
        hello = await self.message()
        assert hello["type"] == "hello"
        self.session = self.session or hello.get("session", "")
        return hello

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(orjson.dumps(message).decode())

    async def message(self) -> dict[str, Any]:
        assert self.ws is not None
        frame = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        assert isinstance(frame, str), "a JSON message was expected"
        parsed: dict[str, Any] = orjson.loads(frame)
        return parsed

    async def read(self) -> dict[str, Any] | bytes:
        """Read one frame and file it."""
        assert self.ws is not None
        frame = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        if isinstance(frame, bytes):
            assert self.current is not None, "audio outside any utterance"
            self.copies[self.current].audio += frame
            return frame
        message: dict[str, Any] = orjson.loads(frame)
        uid = message.get("id")
        if isinstance(uid, str) and message["type"] != "resumed":
            copy = self.copies.setdefault(uid, Copy(uid))
            copy.messages.append(message)
            if message["type"] == "start":
                self.current = uid
            if message["type"] in ("end", "error") and self.current == uid:
                self.current = None
        return message

    async def until(self, predicate: Any) -> None:
        while not predicate():
            await self.read()

    def cut(self) -> None:
        """The network goes away: the TCP connection ends without a closing handshake."""
        assert self.ws is not None
        self.ws.transport.abort()

    async def resume(self) -> dict[str, Any]:
        """Connect again and resume every utterance not ended."""
        await self.connect()
        waiting = [copy.resume_at() for copy in self.copies.values() if not copy.ended]
        await self.send({"type": "resume", "session": self.session, "utterances": waiting})
        answer = await self.message()
        if answer["type"] == "resumed":
            self.session = answer["session"]
            # Audio goes on into the utterance it was in.
            self.current = next(
                (c.id for c in self.copies.values() if c.messages and not c.ended), None
            )
        return answer

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


async def whole(server: Server, text: str, **fields: Any) -> Copy:
    """The utterance of ``text`` heard without a cut (a replay once it is cached)."""
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "w", "text": text, **fields})
    await listener.until(lambda: "w" in listener.copies and listener.copies["w"].ended)
    await listener.close()
    return listener.copies["w"]


async def cut_and_resume(server: Server, text: str, frames_before_cut: int, **fields: Any) -> Copy:
    """Speak ``text``, cut the connection after ``frames_before_cut`` frames of it,
    resume, and hear the rest."""
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "u", "text": text, **fields})
    for _ in range(frames_before_cut):
        await listener.read()
        if "u" in listener.copies and listener.copies["u"].ended:
            break
    listener.cut()
    answer = await listener.resume()
    assert answer["type"] == "resumed", answer
    copy = listener.copies.setdefault("u", Copy("u"))
    assert answer["lost"] == []
    await listener.until(lambda: copy.ended)
    await listener.close()
    return copy


@pytest.mark.parametrize("audio_format", ["mp3", "opus"])
async def test_a_live_utterance_cut_anywhere_resumes_byte_exact(
    start_server: ServerFactory, fake: FakeEdge, audio_format: str
) -> None:
    """Live (a new text each time), cut after a random number of frames: the audio before
    and after the cut is the audio of the same text heard whole, the words likewise."""
    fake.tone = True
    server = await start_server(rate_limit_requests=0, max_connections_per_ip=1000)
    chance = random.Random(35)
    for trial in range(6):
        text = f"{TEXT} Take {trial}."
        resumed = await cut_and_resume(
            server, text, chance.randrange(1, 30), format=audio_format, words="each"
        )
        assert resumed.messages[-1]["type"] == "end", resumed.messages[-1]
        reference = await whole(server, text, format=audio_format, words="each")
        assert bytes(resumed.audio) == bytes(reference.audio), trial
        assert resumed.words == reference.words, trial
        assert resumed.messages[-1]["bytes"] == len(resumed.audio)
    assert len(fake.records) == 6  # each text synthesized once: a resume asks nothing new


async def test_two_hundred_cached_replays_cut_at_random_resume_whole(
    start_server: ServerFactory,
) -> None:
    server = await start_server(rate_limit_requests=0, max_connections_per_ip=1000)
    references = {
        audio_format: await whole(server, TEXT, format=audio_format, words="batch")
        for audio_format in ("mp3", "opus")
    }
    chance = random.Random(200)
    for trial in range(200):
        audio_format = ("mp3", "opus")[trial % 2]
        reference = references[audio_format]
        resumed = await cut_and_resume(
            server, TEXT, chance.randrange(1, 12), format=audio_format, words="batch"
        )
        assert bytes(resumed.audio) == bytes(reference.audio), trial
        assert resumed.words == reference.words, trial
    parking = server.services.parking
    await eventually(lambda: parking.buffers.total == 0 and len(parking) == 0)


async def test_streamed_text_resumes_and_takes_appends_again(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A streaming utterance cut mid-way: resumed, it takes the rest of its text on the
    new connection and ends whole, as an uninterrupted run of the same text."""
    fake.tone = True
    server = await start_server(rate_limit_requests=0)
    pieces = ["The first sentence of a reply. ", "A second one follows it. ", "And the last."]
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "s", "stream": True, "text": pieces[0]})
    await listener.send({"type": "flush", "id": "s"})
    await listener.until(lambda: "s" in listener.copies and len(listener.copies["s"].audio) > 0)
    listener.cut()
    answer = await listener.resume()
    assert answer["type"] == "resumed" and [u["id"] for u in answer["utterances"]] == ["s"]
    assert answer["utterances"][0]["received"] == len(pieces[0])  # appends go on from here
    for piece in pieces[1:]:
        await listener.send({"type": "append", "id": "s", "text": piece})
    await listener.send({"type": "finish", "id": "s"})
    copy = listener.copies["s"]
    await listener.until(lambda: copy.ended)
    await listener.close()
    assert copy.messages[-1]["type"] == "end" and copy.messages[-1]["bytes"] == len(copy.audio)
    again = Listener(url_of(server))
    await again.connect()
    await again.send({"type": "speak", "id": "r", "stream": True, "text": pieces[0]})
    await again.send({"type": "flush", "id": "r"})
    for piece in pieces[1:]:
        await again.send({"type": "append", "id": "r", "text": piece})
    await again.send({"type": "finish", "id": "r"})
    await again.until(lambda: "r" in again.copies and again.copies["r"].ended)
    await again.close()
    assert bytes(copy.audio) == bytes(again.copies["r"].audio)


async def test_queued_utterances_play_after_the_resumed_one(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    server = await start_server(rate_limit_requests=0)
    fake.pause_after_chunks = 3
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "a", "text": TEXT})
    await listener.send({"type": "speak", "id": "b", "text": "Then this one."})
    await listener.until(lambda: "a" in listener.copies and len(listener.copies["a"].audio) > 0)
    listener.cut()
    listener.copies.setdefault("b", Copy("b"))
    await eventually(lambda: len(server.services.parking) == 1, what="parked")
    fake.resume.set()
    answer = await listener.resume()
    assert [u["id"] for u in answer["utterances"]] == ["a", "b"], answer
    await listener.until(lambda: listener.copies["b"].ended)
    await listener.close()
    a, b = listener.copies["a"], listener.copies["b"]
    assert a.ended and bytes(a.audio) == bytes(fake.records[0].audio)
    assert b.messages[-1]["type"] == "end" and bytes(b.audio) == bytes(fake.records[1].audio)


async def test_a_resume_that_cannot_be_served_says_why_and_the_connection_goes_on(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """An unknown token, another tenant's, an expired one: resume_failed with its reason;
    the new connection then speaks as a fresh one."""
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}, "beta": {"key": BETA}})
    server = await start_server(api_keys_file=path, resume_window=TIMEOUT)
    url = url_of(server)
    alpha = Listener(url, {"X-API-Key": ALPHA})
    await alpha.connect()
    await alpha.send({"type": "speak", "id": "u", "text": TEXT})
    await alpha.until(lambda: "u" in alpha.copies)
    alpha.cut()
    await eventually(lambda: len(server.services.parking) == 1, what="parked")
    beta = Listener(url, {"X-API-Key": BETA})
    beta.session = alpha.session
    answer = await beta.resume()
    assert (answer["type"], answer["code"], answer["reason"]) == (
        "error",
        "resume_failed",
        "not_yours",
    )
    stranger = Listener(url, {"X-API-Key": ALPHA})
    stranger.session = "no-such-session"
    answer = await stranger.resume()
    assert (answer["code"], answer["reason"]) == ("resume_failed", "unknown")
    await stranger.send({"type": "speak", "id": "fresh", "text": "Starting afresh."})
    await stranger.until(lambda: "fresh" in stranger.copies and stranger.copies["fresh"].ended)
    assert stranger.copies["fresh"].messages[-1]["type"] == "end"
    await stranger.close()
    await beta.close()
    # Parked past its window, it is gone, and so is what it held.
    parking = server.services.parking
    await eventually(lambda: len(parking) == 0, timeout=TIMEOUT * 3, what="expired")
    await eventually(lambda: parking.buffers.total == 0)
    late = Listener(url, {"X-API-Key": ALPHA})
    late.session = alpha.session
    answer = await late.resume()
    assert (answer["code"], answer["reason"]) == ("resume_failed", "unknown")
    await late.close()


async def test_a_resume_flood_leaks_nothing(start_server: ServerFactory) -> None:
    """Resumes of guessed sessions, each a new connection's first message: each refused,
    nothing kept; a resume that is not a connection's first message is a bad message."""
    server = await start_server(rate_limit_requests=0, max_connections_per_ip=1000)
    for number in range(100):
        listener = Listener(url_of(server))
        await listener.connect()
        await listener.send({"type": "resume", "session": f"guess-{number}", "utterances": []})
        answer = await listener.message()
        assert (answer["code"], answer["reason"]) == ("resume_failed", "unknown")
        if number == 0:
            await listener.send({"type": "resume", "session": "again", "utterances": []})
            assert (await listener.message())["code"] == "bad_message"
        await listener.close()
    assert len(server.services.parking) == 0 and server.services.parking.buffers.total == 0


async def test_a_connection_replaying_a_cached_text_keeps_its_audio_once(
    start_server: ServerFactory,
) -> None:
    """Twenty replays of one cached text on a connection: its resume logs count the
    entry's audio once (the replays' frames are views of it), not twenty times, beside
    the replays' start and end messages."""
    server = await start_server(rate_limit_requests=0)
    text = "One cached sentence, replayed over and over on one connection."
    first = await whole(server, text)  # spoken live, then cached
    audio = len(first.audio)
    await eventually(lambda: server.services.stats.cache_entries >= 1)
    listener = Listener(url_of(server))
    await listener.connect()
    for n in range(20):
        await listener.send({"type": "speak", "id": f"r{n}", "text": text, "words": "none"})
        await listener.until(
            lambda n=n: f"r{n}" in listener.copies and listener.copies[f"r{n}"].ended
        )
        assert listener.copies[f"r{n}"].messages[0]["cached"] is True
    total = server.services.parking.buffers.total
    assert audio <= total < 2 * audio, (total, audio)
    await listener.close()


async def test_a_resumed_connection_is_one_open_connection(start_server: ServerFactory) -> None:
    """Parked, resumed, closed: the stats count one open WebSocket connection while the
    client is away and after it came back (not the new socket and the parked
    connection both), and none once it closed."""
    server = await start_server(rate_limit_requests=0)
    stats = server.services.stats
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "u", "text": "Counted once, away or back."})
    await listener.read()
    listener.cut()
    await eventually(lambda: len(server.services.parking) == 1, what="parked")
    assert stats.connections == 1
    answer = await listener.resume()
    assert answer["type"] == "resumed", answer
    assert stats.connections == 1
    await listener.until(lambda: listener.copies["u"].ended)
    assert stats.connections == 1
    await listener.close()
    await eventually(lambda: stats.connections == 0, what="closed")


async def test_a_parked_connection_counts_toward_the_caps(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """MAX_CONNECTIONS_PER_IP 2: a parked connection and a new one are two, a third is
    refused; the resume's connection takes the parked one's place."""
    server = await start_server(max_connections_per_ip=2, rate_limit_requests=0)
    fake.pause_after_chunks = 2
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "u", "text": TEXT})
    await listener.until(lambda: "u" in listener.copies)
    listener.cut()
    admission = server.services.admission
    await eventually(lambda: len(server.services.parking) == 1, what="parked")
    await eventually(lambda: admission.connections.total == 1, what="the parked one counted")
    other = Listener(url_of(server))
    await other.connect()
    with pytest.raises(InvalidStatus) as refused:
        await Listener(url_of(server)).connect()
    assert refused.value.response.status_code == 429
    await other.close()
    await eventually(lambda: admission.connections.total == 1)
    answer = await listener.resume()
    assert answer["type"] == "resumed"
    await eventually(lambda: admission.connections.total == 1, what="the parked one released")
    fake.resume.set()
    copy = listener.copies["u"]
    await listener.until(lambda: copy.ended)
    await listener.close()
    assert bytes(copy.audio) == bytes(fake.records[0].audio)


async def test_a_clean_close_is_not_parked(start_server: ServerFactory, fake: FakeEdge) -> None:
    """A client that closes (1000) or a server that closes (idle, too slow) parks nothing:
    its utterance ends as before."""
    server = await start_server()
    fake.pause_after_chunks = 2
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "u", "text": TEXT})
    await listener.until(lambda: "u" in listener.copies)
    await listener.close()
    await eventually(lambda: server.stats.active_utterances == 0)
    assert len(server.services.parking) == 0
    fake.resume.set()


async def test_resume_off_says_so(start_server: ServerFactory) -> None:
    server = await start_server(resume_window=0)
    listener = Listener(url_of(server))
    hello = await listener.connect()
    assert "session" not in hello
    await listener.send({"type": "resume", "session": "anything", "utterances": []})
    answer = await listener.message()
    assert (answer["code"], answer["reason"]) == ("resume_failed", "disabled")
    await listener.close()


@pytest.mark.parametrize("audio_format", ["mp3", "opus"])
async def test_streamed_utterances_cut_at_random_resume_whole(
    start_server: ServerFactory, fake: FakeEdge, audio_format: str
) -> None:
    """Twenty streaming utterances (three segments on one timeline), each cut at a random
    frame and resumed: each one's audio and words are those of the same text streamed
    without a cut. (Appends after a resume: the test above.)"""
    fake.tone = True
    server = await start_server(rate_limit_requests=0, max_connections_per_ip=1000)
    pieces = ["A streamed reply begins here. ", "It carries on for a while. ", "Then it ends."]
    sent: dict[str, bytes] = {}

    async def streamed(uid: str, cut_after: int | None) -> tuple[Copy, int]:
        listener = Listener(url_of(server))
        await listener.connect()
        speak = {"type": "speak", "id": uid, "stream": True, "format": audio_format}
        await listener.send({**speak, "text": pieces[0], "words": "batch"})
        for piece in pieces[1:]:
            await listener.send({"type": "append", "id": uid, "text": piece})
        await listener.send({"type": "finish", "id": uid})
        frames = 0
        if cut_after is not None:
            for _ in range(cut_after):
                await listener.read()
            listener.cut()
            answer = await listener.resume()
            assert answer["type"] == "resumed", answer
        copy = listener.copies.setdefault(uid, Copy(uid))
        while not copy.ended:
            await listener.read()
            frames += 1
        # What the server sent of it, as it keeps it for a resume (while its connection
        # is open).
        sent[uid] = b"".join(
            bytes(frame)
            for connection in server._websockets["ws"]
            for log in [connection._logs.by_id.get(uid)]
            if log is not None
            for frame, text, _ in log.frames
            if not text
        )
        await listener.close()
        return copy, frames

    await streamed("live", None)  # its segments cached: then every run is made alike
    reference, frames = await streamed("whole", None)
    chance = random.Random(20)
    for trial in range(20):
        uid = f"cut{trial}"
        copy, _ = await streamed(uid, chance.randrange(1, frames))
        assert copy.messages[-1]["type"] == "end", (trial, copy.messages[-1])
        assert copy.words == reference.words, trial
        # The client has all the server sent, once. (An Ogg stream made again has a new
        # serial number: Opus is compared with what was sent, MP3 with the uninterrupted
        # run too.)
        assert bytes(copy.audio) == sent[uid], trial
        assert len(sent[uid]) == copy.messages[-1]["bytes"], trial
        if audio_format == "mp3":
            assert bytes(copy.audio) == bytes(reference.audio), trial


async def test_a_cancel_answered_while_away_comes_on_the_resume(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A cancel whose answer the drop lost: the resumed connection sends `cancelled`."""
    server = await start_server(rate_limit_requests=0)
    fake.pause_after_chunks = 2
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "u", "text": TEXT})
    await listener.until(lambda: "u" in listener.copies and bool(listener.copies["u"].audio))
    await listener.send({"type": "cancel", "id": "u"})
    await eventually(lambda: server.stats.active_utterances == 0, what="the cancel done")
    listener.cut()  # its answer not read
    answer = await listener.resume()
    assert answer["type"] == "resumed", answer
    copy = listener.copies["u"]
    while not copy.messages or copy.messages[-1]["type"] != "cancelled":
        await listener.read()
    await listener.close()
    fake.resume.set()


async def test_after_review_reused_ids_new_speaks_and_a_new_network(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """An id used again is a new utterance (its own frames, not the earlier one's); a
    speak sent right after the resume is spoken; resumed from another address, the
    connection counts come back to nothing (the parked one released on its own IP)."""
    fake.tone = True
    server = await start_server(rate_limit_requests=0)
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "a", "text": "The first one, short."})
    await listener.until(lambda: "a" in listener.copies and listener.copies["a"].ended)
    listener.copies.pop("a")
    await listener.send({"type": "speak", "id": "a", "text": TEXT})
    await listener.until(lambda: "a" in listener.copies and bool(listener.copies["a"].audio))
    listener.cut()
    listener.options["local_addr"] = ("127.0.0.2", 0)  # a new network
    answer = await listener.resume()
    assert answer["type"] == "resumed" and answer["lost"] == [], answer
    await listener.send({"type": "speak", "id": "b", "text": "Right after the resume."})
    await listener.until(lambda: "b" in listener.copies and listener.copies["b"].ended)
    await listener.close()
    a, b = listener.copies["a"], listener.copies["b"]
    assert a.ended and bytes(a.audio) == bytes(fake.records[1].audio)
    assert b.messages[-1]["type"] == "end" and bytes(b.audio) == bytes(fake.records[2].audio)
    admission = server.services.admission
    await eventually(lambda: admission.connections.total == 0, what="every count released")
    assert admission.connections.by_ip() == {}


async def test_a_resumed_connection_is_not_closed_as_idle_while_it_speaks(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """The new socket's own watchdog gives way to the resumed connection's: an utterance
    playing longer than IDLE_TIMEOUT after a resume ends whole."""
    server = await start_server(rate_limit_requests=0, idle_timeout=2.0)
    fake.realtime_factor = 1.0  # about 6 s of audio, streamed in real time
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "u", "text": TEXT * 2})
    await listener.until(lambda: "u" in listener.copies and bool(listener.copies["u"].audio))
    listener.cut()
    assert (await listener.resume())["type"] == "resumed"
    copy = listener.copies["u"]
    await listener.until(lambda: copy.ended)
    await listener.close()
    assert copy.messages[-1]["type"] == "end" and bytes(copy.audio) == bytes(fake.records[0].audio)


async def test_a_lost_utterance_stops_and_may_be_asked_again(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Its frames passed RESUME_BUFFER_MB: the resume says lost, the utterance stops (no
    audio of it without a start), and the same id may be asked again at once."""
    fake.tone = True
    server = await start_server(rate_limit_requests=0, resume_buffer_mb=0.004)
    fake.pause_after_chunks = 8
    listener = Listener(url_of(server))
    await listener.connect()
    await listener.send({"type": "speak", "id": "u", "text": TEXT * 3})
    await listener.until(lambda: "u" in listener.copies and bool(listener.copies["u"].audio))
    listener.cut()
    await eventually(lambda: len(server.services.parking) == 1, what="parked")
    answer = await listener.resume()
    assert answer["lost"] == ["u"], answer
    fake.resume.set()
    listener.copies.pop("u")
    await listener.send({"type": "speak", "id": "u", "text": "Asked again."})
    await listener.until(lambda: "u" in listener.copies and listener.copies["u"].ended)
    await listener.close()
    again = listener.copies["u"]
    assert again.messages[0]["type"] == "start" and again.messages[-1]["type"] == "end"
    assert bytes(again.audio) == bytes(fake.records[-1].audio)


# The logs' bookkeeping alone (ttsstream.ws.resume.Buffers), without a server.


def _ended_log(buffers: Buffers, logs: Logs, uid: str, size: int) -> UtteranceLog:
    log = logs.open(uid)
    buffers.add(logs, log, b"x" * size, False)
    buffers.ended(logs, log)
    return log


def test_a_connection_over_its_bound_drops_its_own_oldest_log_not_another_s() -> None:
    buffers = Buffers(per_connection=100, total=10_000)
    other, mine = Logs(), Logs()
    theirs = _ended_log(buffers, other, "t", 50)  # the oldest of all: not mine to drop
    first = _ended_log(buffers, mine, "a", 40)
    second = _ended_log(buffers, mine, "b", 40)
    growing = mine.open("c")
    buffers.add(mine, growing, b"y" * 30, False)  # 110 > 100: my oldest goes
    assert first.dropped and not second.dropped and not theirs.dropped
    assert (mine.size, other.size, buffers.total) == (70, 50, 120)
    buffers.pin(second)  # being caught up: not dropped to make room
    buffers.add(mine, growing, b"y" * 40, False)  # nothing of mine to drop: the growing one
    assert growing.dropped and not second.dropped and not theirs.dropped
    buffers.unpin(mine, second)
    assert buffers.total == mine.size + other.size == 90


def test_over_the_total_the_oldest_ended_log_of_any_connection_goes() -> None:
    buffers = Buffers(per_connection=1_000, total=100)
    other, mine = Logs(), Logs()
    theirs = _ended_log(buffers, other, "t", 60)
    log = mine.open("a")
    buffers.add(mine, log, b"x" * 50, False)
    assert theirs.dropped and not log.dropped and buffers.total == 50


def test_prune_forgets_what_ended_before_the_window_and_keeps_the_rest() -> None:
    buffers = Buffers(per_connection=10**6, total=10**6)
    logs = Logs()
    old = [_ended_log(buffers, logs, f"old-{n}", 10) for n in range(50)]
    kept = _ended_log(buffers, logs, "recent", 10)
    playing = logs.open("playing")
    buffers.add(logs, playing, b"x" * 10, False)
    # A queued utterance cancelled while "recent" played: its log began later, ended
    # earlier; it goes at a later prune.
    cancelled = _ended_log(buffers, logs, "cancelled", 10)
    for log in old:
        log.ended_at = 1.0
    kept.ended_at, cancelled.ended_at = 100.0, 2.0
    buffers.prune(logs, 50.0)
    assert list(logs.by_id) == ["recent", "playing", "cancelled"]
    assert all(log.dropped for log in old) and not kept.dropped and not playing.dropped
    assert buffers.total == logs.size == 30
    kept.ended_at = 20.0
    buffers.prune(logs, 50.0)
    assert list(logs.by_id) == ["playing"] and cancelled.dropped
    buffers.release(logs)
    assert buffers.total == logs.size == 0 and not logs.by_id and not logs.kept


def _replay_log(buffers: Buffers, logs: Logs, uid: str, entry: bytes, frame: int) -> UtteranceLog:
    """An ended log of a cached replay: its audio frames are views of the entry's bytes."""
    log = logs.open(uid)
    buffers.add(logs, log, b'{"type":"start"}', True)
    view = memoryview(entry)
    for start in range(0, len(entry), frame):
        buffers.add(logs, log, view[start : start + frame], False)
    buffers.add(logs, log, b'{"type":"end"}', True)
    buffers.ended(logs, log)
    return log


def test_replays_of_one_cached_entry_count_its_bytes_once() -> None:
    """Logs of many replays of one cached entry count its audio once per connection
    and once in all (the bytes are the entry's, shared), beside their messages; the
    count goes back to nothing as they are forgotten."""
    entry = bytes(range(256)) * 40  # 10 KiB
    messages = len(b'{"type":"start"}') + len(b'{"type":"end"}')
    buffers = Buffers(per_connection=10**6, total=10**6)
    mine, other = Logs(), Logs()
    for n in range(50):
        _replay_log(buffers, mine, f"m{n}", entry, 4096)
    _replay_log(buffers, other, "o", entry, 4096)
    assert mine.size == len(entry) + 50 * messages
    assert other.size == len(entry) + messages
    assert buffers.total == len(entry) + 51 * messages
    buffers.discard(mine, "m0")
    assert mine.size == len(entry) + 49 * messages  # the others still hold the entry
    buffers.release(mine)
    assert mine.size == 0 and buffers.total == other.size
    buffers.release(other)
    assert buffers.total == 0 and not mine.shared and not other.shared


def test_replays_of_a_cached_entry_do_not_push_out_a_live_utterance_s_log() -> None:
    """A connection replaying one cached sentence over and over (a closed loop) keeps
    another's live utterance resumable: counted as sent, the replays passed the bound
    at once and dropped the oldest ended logs of every connection."""
    buffers = Buffers(per_connection=100_000, total=100_000)
    listener, looping = Logs(), Logs()
    live = _ended_log(buffers, listener, "live", 40_000)
    entry = b"\xff" * 30_000
    for n in range(200):  # 6 MB of audio sent, one entry of 30 KB kept
        _replay_log(buffers, looping, f"r{n}", entry, 16_384)
    assert not live.dropped
    assert buffers.total == listener.size + looping.size < 100_000
