"""The seam between the core and its doors: ``Utterances.run`` through the cache into a
:class:`~ttsstream.core.utterance.Sink`, with neither door.

A recording sink stands for a door: what it records is every call a new door would
get, in the order it would get them (start, audio and words, end or fail, then
finished), for an utterance spoken live, one that fails, one cancelled, one whose
listener leaves, and one replayed from the cache.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TIMEOUT
from tests.fake_edge import FakeEdge, spoken_words
from ttsstream.config import Config
from ttsstream.core.context import ANONYMOUS, RequestContext
from ttsstream.core.router import Started
from ttsstream.core.turns import Turns
from ttsstream.core.utterance import REPLAY_BURST_BYTES, ListenerGone, Sink, Summary, cut_short
from ttsstream.engines.base import WordEvent
from ttsstream.exceptions import ClientError, ShuttingDown
from ttsstream.services import Services, build_services

TEXT = "The core speaks this sentence to a door it has never heard of."
#: A text whose replay is many frames of REPLAY_CHUNK_BYTES (about 280 KiB of audio).
LONG_TEXT = " ".join(["A rather long sentence that makes plenty of audio for chunking."] * 12)
#: The order of every call on every sink, so that sinks' calls can be put in one order.
_ORDER = itertools.count()
#: MP3 bytes per millisecond of audio at 48 kbit/s.
BYTES_PER_MS = 6


@dataclass
class Call:
    """One call the core made on the sink."""

    name: str
    value: Any = None
    #: When it came among the calls of all sinks.
    at: int = field(default_factory=lambda: next(_ORDER))


class RecordingSink:
    """A door in miniature: it records each call the core makes on it, in order.

    Args:
        cut: What the sink says of :attr:`cut` (the server stopped the utterance).
        gone: What it says of :attr:`gone` (the client's connection is closed).
        leaves_at_audio: Raise :class:`ListenerGone` at the first audio, as a door
            whose client stopped reading does.
    """

    def __init__(self, *, cut: bool = False, gone: bool = False, leaves_at_audio: bool = False):
        self.cut = cut_short() if cut else None
        self.gone = gone
        self.leaves_at_audio = leaves_at_audio
        self.calls: list[Call] = []
        #: What :meth:`hold` was told, in order (not in :attr:`calls`: doors that hold
        #: nothing back ignore it).
        self.holds: list[Call] = []
        #: Set once the first audio arrived.
        self.heard = asyncio.Event()

    def hold(self, on: bool) -> None:
        self.holds.append(Call("hold", on))

    async def start(self, started: Started) -> None:
        self.calls.append(Call("start", started))

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        self.calls.append(Call("audio", bytes(data)))
        self.heard.set()
        if self.leaves_at_audio:
            raise ListenerGone()

    async def word(self, word: WordEvent) -> None:
        self.calls.append(Call("word", word))

    async def words(self, words: Sequence[WordEvent]) -> None:
        self.calls.append(Call("words", list(words)))

    async def end(self, summary: Summary) -> None:
        self.calls.append(Call("end", summary))

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        self.calls.append(Call("fail", (exc, partial)))

    def finished(self) -> None:
        self.calls.append(Call("finished"))

    @property
    def names(self) -> list[str]:
        """The calls' names, each run of audio, word or words calls as one."""
        names: list[str] = []
        for call in self.calls:
            name = "stream" if call.name in ("audio", "word", "words") else call.name
            if not names or names[-1] != name or name != "stream":
                names.append(name)
        return names

    def first(self, name: str) -> Any:
        return next(call.value for call in self.calls if call.name == name)

    @property
    def audio_bytes(self) -> bytes:
        return b"".join(call.value for call in self.calls if call.name == "audio")

    @property
    def word_events(self) -> list[WordEvent]:
        found: list[WordEvent] = []
        for call in self.calls:
            if call.name == "word":
                found.append(call.value)
            elif call.name == "words":
                found += call.value
        return found


@pytest.fixture
async def services(fake: FakeEdge, tmp_path: Path) -> AsyncIterator[Services]:
    """A server's parts, wired to the fake and a disk cache, with no door in front."""
    config = Config(
        host="127.0.0.1",
        port=0,
        health_port=0,
        edge_wss_url=fake.wss_url,
        edge_voices_url=fake.voices_url,
        upstream_timeout=TIMEOUT,
        upstream_retries=0,
        cache_dir=tmp_path / "cache",
    )
    built = build_services(config, with_offline=False)
    assert built.store is not None
    built.store.open()
    yield built
    await built.speech.finish_stores()
    await built.router.aclose()


async def run(services: Services, sink: Sink, *, text: str = TEXT, words: str = "each") -> str:
    """What a door does with a request it accepted: run it into its sink."""
    utterances = services.utterances
    return await utterances.run(
        utterances.request(text=text, voice=None),
        sink,
        words=words,
        utterance_id="u1",
        received_at=time.perf_counter(),
        context=RequestContext(ANONYMOUS, "127.0.0.1", "contract", "contract"),
    )


async def test_an_utterance_starts_streams_its_audio_and_words_then_ends(
    services: Services, fake: FakeEdge
) -> None:
    """Start first, then audio with each word ahead of the audio it describes, then one
    end that sums it up, then finished; the outcome is ok and nothing stays active."""
    sink = RecordingSink()
    assert await run(services, sink) == "ok"
    assert sink.names == ["start", "stream", "end", "finished"]
    started = sink.first("start")
    assert (started.engine, started.voice, started.cached) == (
        "edge",
        services.config.default_voice,
        False,
    )
    (record,) = fake.records
    assert sink.audio_bytes == bytes(record.audio)
    sent = 0
    for call in sink.calls:
        if call.name == "audio":
            sent += len(call.value)
        elif call.name == "word":
            assert sent < call.value.offset_ms * BYTES_PER_MS, (call.value, sent)
    assert [word.text for word in sink.word_events] == spoken_words(TEXT)
    summary = sink.first("end")
    assert (summary.byte_count, summary.words, summary.cached) == (
        len(record.audio),
        len(spoken_words(TEXT)),
        False,
    )
    assert summary.audio_ms == pytest.approx(len(record.audio) / BYTES_PER_MS)
    assert summary.ttfb_ms > 0
    assert services.stats.active_utterances == 0
    assert services.stats.outcomes_by_interface["contract", "ok"] == 1


@pytest.mark.parametrize("mode", ["batch", "none"])
async def test_words_come_batched_or_not_at_all(
    services: Services, fake: FakeEdge, mode: str
) -> None:
    """Words mode ``batch``: each ``words`` call comes just before the audio it
    describes, and together they are every word; ``none``: no word at all."""
    sink = RecordingSink()
    assert await run(services, sink, words=mode) == "ok"
    assert not [call for call in sink.calls if call.name == "word"]
    if mode == "none":
        assert (sink.word_events, sink.first("end").words) == ([], 0)
        return
    for call, after in zip(sink.calls, sink.calls[1:], strict=False):
        if call.name == "words":
            assert after.name == "audio", sink.names
    assert [word.text for word in sink.word_events] == spoken_words(TEXT)
    assert sink.first("end").words == len(spoken_words(TEXT))


async def test_a_failure_before_any_audio_is_one_fail_then_finished(
    services: Services, fake: FakeEdge
) -> None:
    """An upstream that refuses: the sink is told once, not partial (no start, no end),
    and the outcome is the error's code."""
    fake.refuse_status = 503
    sink = RecordingSink()
    outcome = await run(services, sink)
    assert sink.names == ["fail", "finished"]
    exc, partial = sink.first("fail")
    assert isinstance(exc, ClientError) and not partial
    assert outcome == exc.code
    assert services.stats.active_utterances == 0


async def test_a_failure_mid_stream_is_partial(services: Services, fake: FakeEdge) -> None:
    """An upstream that drops after some audio: start, audio, then one partial fail and
    finished; no end."""
    fake.drop_after_chunks = 2
    sink = RecordingSink()
    outcome = await run(services, sink)
    assert sink.names == ["start", "stream", "fail", "finished"]
    exc, partial = sink.first("fail")
    assert isinstance(exc, ClientError) and partial
    assert outcome == exc.code


@pytest.mark.parametrize(
    ("cut", "gone", "outcome"),
    [
        (False, False, "cancelled"),  # the client's cancel
        (False, True, "disconnected"),  # the client's connection closed
        (True, False, "shutting_down"),  # the server stopped it (a drain ran out)
    ],
)
async def test_a_cancel_propagates_and_says_why(
    services: Services, fake: FakeEdge, cut: bool, gone: bool, outcome: str
) -> None:
    """Cancelling the task that runs an utterance cancels it: the cancellation
    propagates, the upstream closes, the sink gets no end (a fail saying so only when
    the server cut it) and finished; the outcome is counted as the sink says why."""
    fake.pause_after_chunks = 1
    sink = RecordingSink(cut=cut, gone=gone)
    running = asyncio.create_task(run(services, sink))
    await asyncio.wait_for(sink.heard.wait(), TIMEOUT)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    if cut:
        assert sink.names == ["start", "stream", "fail", "finished"]
        exc, partial = sink.first("fail")
        assert isinstance(exc, ShuttingDown) and partial
    else:
        assert sink.names == ["start", "stream", "finished"]
    await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)
    assert not fake.records[0].completed
    assert services.stats.outcomes_by_interface["contract", outcome] == 1
    assert services.stats.active_utterances == 0


async def test_a_listener_that_leaves_is_told_nothing_more(
    services: Services, fake: FakeEdge
) -> None:
    """A sink that raises ListenerGone ends its utterance as disconnected: no end, no
    fail, only finished; the upstream closes."""
    fake.pause_after_chunks = 1
    sink = RecordingSink(leaves_at_audio=True)
    assert await run(services, sink) == "disconnected"
    assert sink.names == ["start", "stream", "finished"]
    await asyncio.wait_for(fake.records[0].closed.wait(), TIMEOUT)


async def test_the_same_request_again_is_a_cached_replay(
    services: Services, fake: FakeEdge
) -> None:
    """A second identical request is replayed from the cache through the same calls:
    start says cached, the same audio and words, an end that says cached; Edge is
    asked once."""
    live, replay = RecordingSink(), RecordingSink()
    assert await run(services, live) == "ok"
    assert await run(services, replay) == "ok"
    assert replay.names == ["start", "stream", "end", "finished"]
    assert replay.first("start").cached and replay.first("end").cached
    assert replay.audio_bytes == live.audio_bytes
    assert [(w.text, w.offset_ms) for w in replay.word_events] == [
        (w.text, w.offset_ms) for w in live.word_events
    ]
    assert len(fake.records) == 1
    assert (services.stats.cache_hits, services.stats.cache_misses) == (1, 1)


async def test_replays_for_several_listeners_take_turns(services: Services, fake: FakeEdge) -> None:
    """Three listeners asking at once for one long cached text: each one's first audio
    comes before any one's end, and no replay writes more than REPLAY_BURST_BYTES before
    the others' turn; each still gets all its audio in order, each word before the audio
    it describes, and nothing is held back across a turn."""
    live = RecordingSink()
    assert await run(services, live, text=LONG_TEXT) == "ok"
    assert len(live.audio_bytes) > 4 * REPLAY_BURST_BYTES
    sinks = [RecordingSink() for _ in range(3)]
    # Started together on one loop: each run is ready before any has written a frame.
    outcomes = await asyncio.gather(*(run(services, sink, text=LONG_TEXT) for sink in sinks))
    assert outcomes == ["ok"] * 3
    firsts = [next(call.at for call in sink.calls if call.name == "audio") for sink in sinks]
    ends = [next(call.at for call in sink.calls if call.name == "end") for sink in sinks]
    assert max(firsts) < min(ends), "a replay ran to its end before another's first audio"
    for sink in sinks:
        assert sink.names == ["start", "stream", "end", "finished"]
        assert sink.first("start").cached
        assert sink.audio_bytes == live.audio_bytes
        assert [(w.text, w.offset_ms) for w in sink.word_events] == [
            (w.text, w.offset_ms) for w in live.word_events
        ]
        sent = 0
        for call in sink.calls:
            if call.name == "audio":
                sent += len(call.value)
            elif call.name == "word":
                assert sent <= call.value.offset_ms * BYTES_PER_MS, (call.value, sent)
    # Turns: runs of one sink's calls in the order of all of them.
    calls = sorted(((call, n) for n, sink in enumerate(sinks) for call in sink.calls), key=_at)
    turns = [list(turn) for _, turn in itertools.groupby(calls, key=lambda pair: pair[1])]
    assert len(turns) > 2 * len(sinks)
    for turn in turns[:-1]:  # the last may be the rest of the last replay, alone
        audio = sum(len(call.value) for call, _ in turn if call.name == "audio")
        assert audio <= REPLAY_BURST_BYTES, [call.name for call, _ in turn]
    # What a sink was told to hold back it was told to release before another's turn.
    for n, sink in enumerate(sinks):
        assert [hold.value for hold in sink.holds] == [True, False] * (len(sink.holds) // 2)
        others = [call.at for call, m in calls if m != n]
        for on, off in zip(sink.holds[::2], sink.holds[1::2], strict=True):
            assert not [at for at in others if on.at < at < off.at]


async def test_replays_asked_for_over_several_passes_give_first_frames_first(
    services: Services, fake: FakeEdge
) -> None:
    """Replays that start a few passes of the loop apart (as speaks read one after
    another do): every one's first audio comes before any one's second frame, and each
    still gets all its audio and its end."""
    live = RecordingSink()
    assert await run(services, live, text=LONG_TEXT) == "ok"
    # No bound by the clock: a stalled machine must not release the first replay early.
    services.utterances.turns = Turns(longest=TIMEOUT)
    sinks = [RecordingSink() for _ in range(4)]

    async def later(passes: int, sink: RecordingSink) -> str:
        for _ in range(passes):  # a reader's task, then a speaker's
            await asyncio.sleep(0)
        return await run(services, sink, text=LONG_TEXT)

    outcomes = await asyncio.gather(*(later(2 * n, sink) for n, sink in enumerate(sinks)))
    assert outcomes == ["ok"] * len(sinks)
    audio = [[call.at for call in sink.calls if call.name == "audio"] for sink in sinks]
    assert all(len(ats) > 2 for ats in audio)
    assert max(ats[0] for ats in audio) < min(ats[1] for ats in audio)
    for sink in sinks:
        assert sink.names == ["start", "stream", "end", "finished"]
        assert sink.audio_bytes == live.audio_bytes
    assert services.utterances.turns.pending == 0


async def test_a_replay_that_ends_mid_burst_releases_what_it_held(
    services: Services, fake: FakeEdge
) -> None:
    """A replay cancelled after its first frame, and one whose listener leaves at it:
    each sink is told to release what it held (its last hold is off) before finished."""
    assert await run(services, RecordingSink(), text=LONG_TEXT) == "ok"
    cancelled, left = RecordingSink(), RecordingSink(leaves_at_audio=True)
    task = asyncio.create_task(run(services, cancelled, text=LONG_TEXT))
    await cancelled.heard.wait()  # its first frame written: its turn ended
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await run(services, left, text=LONG_TEXT) == "disconnected"
    for sink in (cancelled, left):
        assert sink.first("start").cached
        assert sink.holds and sink.holds[0].value is True and sink.holds[-1].value is False
        assert [hold.value for hold in sink.holds] == [True, False] * (len(sink.holds) // 2)
        assert sink.holds[-1].at < sink.calls[-1].at and sink.calls[-1].name == "finished"
    assert "end" not in cancelled.names


async def test_a_live_utterance_holds_nothing_back(services: Services, fake: FakeEdge) -> None:
    """Only a replay asks its sink to hold back partial writes: live audio is never held."""
    live, replay = RecordingSink(), RecordingSink()
    assert await run(services, live) == "ok"
    assert await run(services, replay) == "ok"
    assert live.holds == []
    assert [hold.value for hold in replay.holds][:1] == [True]
    assert replay.holds[-1].value is False


def _at(pair: tuple[Call, int]) -> int:
    return pair[0].at
