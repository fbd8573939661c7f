"""Audio formats: every format made from the source MP3 as it streams, on both doors.

Every output is decoded by PyAV's demuxers and decoders (independent of the
encoders' settings in :mod:`ttsstream.audio.formats`), and PCM is compared
exactly with a decode of the MP3.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import io
import json
import math
import statistics
import threading
import time
import tracemalloc
from typing import Any

import aiohttp
import av
import openai
import pytest

from tests.conftest import (
    MANY_CLIENTS,
    TIMEOUT,
    Client,
    ServerFactory,
    connected,
    entries,
    eventually,
    speaks_fine,
    wait_for_entries,
)
from tests.fake_edge import CORRUPT_FRAME, FRAME_BYTES, FakeEdge, mp3_frames, tone_frames
from ttsstream.audio import transcode
from ttsstream.audio.formats import FORMAT_NAMES, FORMATS, SAMPLE_RATE, format_for_path
from ttsstream.audio.transcode import MadeChunk, Transcoder, TranscodeWorkers
from ttsstream.cache.store import CacheEntry
from ttsstream.core import speech_cache
from ttsstream.core.router import Started
from ttsstream.engines.base import AudioChunk, SynthesisRequest
from ttsstream.server import Server

TEXT = "Formats stream as they are made, word after word after word."
#: Every format but the source's own.
MADE = [name for name in FORMAT_NAMES if name != "mp3"]
#: The formats made again for every request, never stored.
UNKEPT = [name for name in MADE if not FORMATS[name].kept]
#: PyAV's demuxer for each format's bytes.
DEMUXERS = {
    "mp3": "mp3",
    "opus": "ogg",
    "webm": "webm",
    "aac": "aac",
    "flac": "flac",
    "wav": "wav",
}


def decode(name: str, data: bytes) -> tuple[array.array[int], int]:
    """``data`` in format ``name`` decoded to 16-bit mono samples, and their rate."""
    if name == "pcm":
        return array.array("h", data), SAMPLE_RATE
    samples = array.array("h")
    with av.open(io.BytesIO(data), "r", format=DEMUXERS[name]) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.channels == 1, "mono"
        rate = stream.codec_context.sample_rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in container.decode(stream):
            for ready in resampler.resample(frame):
                samples.frombytes(bytes(ready.planes[0])[: ready.samples * 2])
    return samples, rate


def rms(samples: array.array[int]) -> float:
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


def longest_silence(samples: array.array[int], rate: int) -> float:
    """The longest run of digital silence (exact zeros) past the first and before the
    last 100 ms (where codecs prime and pad), in ms."""
    edge = rate // 10
    longest = run = 0
    for sample in samples[edge:-edge]:
        run = run + 1 if sample == 0 else 0
        longest = max(longest, run)
    return longest * 1000 / rate


def onset_ms(samples: array.array[int], rate: int, after_ms: float) -> float:
    """Where sound starts (5 ms windows over a threshold) from ``after_ms`` on."""
    window = rate // 200
    start = max(0, int(after_ms * rate / 1000))
    for i in range(start, len(samples) - window, window // 5):
        if rms(samples[i : i + window]) > 1500:
            return i * 1000 / rate
    raise AssertionError(f"no sound after {after_ms} ms")


def transcode_all(name: str, mp3: bytes, chunk: int) -> tuple[bytes, list[int], Transcoder]:
    transcoder = Transcoder(FORMATS[name])
    pieces = [transcoder.feed_mp3(mp3[i : i + chunk]) for i in range(0, len(mp3), chunk)]
    tail = transcoder.finish()
    return b"".join(pieces) + tail, [len(p) for p in pieces], transcoder


# The transcoder alone


@pytest.mark.parametrize("name", MADE)
def test_each_format_decodes_to_the_source_audio(name: str) -> None:
    """Decoded by an independent decoder: the MP3's duration within 60 ms, audible, no
    silence the source lacks, mono at the stated rate; bytes leave with every chunk."""
    mp3 = tone_frames(200)  # 4.8 s of a two-tone sound
    source, _ = decode("mp3", mp3)
    made, sizes, transcoder = transcode_all(name, mp3, 4 * FRAME_BYTES)
    samples, rate = decode(name, made)
    # Opus is always decoded at 48 kHz; its stream says it was made from 24 kHz.
    assert rate == (48_000 if FORMATS[name].codec == "libopus" else SAMPLE_RATE)
    assert abs(len(samples) / rate - len(source) / SAMPLE_RATE) < 0.060
    if FORMATS[name].priming_samples:
        # AAC: its priming plays first, and the source's last partial frame is dropped
        # rather than padded; what is made says exactly how long it plays.
        assert abs(transcoder.duration_ms - len(samples) * 1000 / rate) < 1
    else:
        assert abs(transcoder.duration_ms - len(source) * 1000 / SAMPLE_RATE) < 1
    assert rms(samples) > 0.5 * rms(source) > 1000
    assert longest_silence(samples, rate) <= longest_silence(source, SAMPLE_RATE) + 1
    # Streaming: all but the first couple of chunks yield bytes as they are fed.
    assert sum(1 for size in sizes if size) >= len(sizes) - 3
    if name in ("pcm", "wav"):
        assert samples == source, "PCM is the MP3's decode, exactly"
    if name == "wav":
        assert made[4:8] == b"\xff\xff\xff\xff" and made[40:44] == b"\xff\xff\xff\xff"


def test_a_corrupt_mp3_chunk_is_upstream_bad_audio() -> None:
    from ttsstream.exceptions import UpstreamBadAudio

    transcoder = Transcoder(FORMATS["opus"])
    transcoder.feed_mp3(tone_frames(10))
    with pytest.raises(UpstreamBadAudio):
        # The parser holds a frame until the next one begins: the error comes with it.
        transcoder.feed_mp3(CORRUPT_FRAME + tone_frames(10, 10))
    transcoder.close()
    assert transcode.open_transcoders == 0


@pytest.mark.parametrize("per_client", [1, 2])
async def test_transcode_workers_take_clients_in_turn(per_client: int) -> None:
    """A client with ten jobs queued runs at most ``per_client`` of them at once, and
    another client's single job runs after at most one more of them per thread."""
    workers = TranscodeWorkers(threads=2, per_client=per_client)
    ran: list[str] = []
    running: dict[str, int] = {"busy": 0}
    most = 0
    lock = threading.Lock()
    go = threading.Event()

    def job(name: str) -> str:
        nonlocal most
        with lock:
            running["busy"] += name.startswith("busy")
            most = max(most, running["busy"])
        go.wait(TIMEOUT)
        with lock:
            running["busy"] -= name.startswith("busy")
            ran.append(name)
        return name

    busy = [workers.submit("198.51.100.1", job, f"busy {number}") for number in range(10)]
    other = workers.submit("198.51.100.2", job, "other")
    assert workers.waiting == 9  # both threads taken: by per_client busy jobs, or one and other
    await eventually(lambda: running["busy"] >= per_client, what="the busy jobs running")
    go.set()
    assert await other.result == "other"
    await asyncio.gather(*(each.result for each in busy))
    assert most == per_client
    assert ran.index("other") <= 3, ran


async def test_a_cancelled_job_never_runs_or_hands_back_what_it_made() -> None:
    """A job whose caller gave up is dropped if it waits for a thread; if it was running,
    what it made goes to ``discard`` (a transcoder is closed, not leaked)."""
    workers = TranscodeWorkers(threads=1)
    go = threading.Event()
    discarded: list[str] = []

    def make() -> str:
        go.wait(TIMEOUT)
        return "made"

    running = workers.submit("a", make, discard=discarded.append)
    waiting = workers.submit("a", discarded.append, "ran")
    running.result.cancel()
    waiting.result.cancel()
    freed = asyncio.Event()
    running.when_free(freed.set)
    go.set()
    await asyncio.wait_for(freed.wait(), TIMEOUT)
    follower = workers.submit("a", lambda: "next")
    assert await follower.result == "next"
    assert discarded == ["made"]


def test_formats_by_file_name() -> None:
    assert format_for_path("out.OPUS") is FORMATS["opus"]
    assert format_for_path("x/y.ogg") is FORMATS["opus"]
    assert format_for_path("speech.wav") is FORMATS["wav"]
    assert format_for_path("speech.txt") is None


# Through the server


async def speak_as(client: Client, name: str, id: str, **fields: Any) -> Any:
    await client.speak(TEXT, id=id, format=name, **{"words": "batch", **fields})
    return await client.until_final(id)


async def test_every_format_over_the_websocket_keeps_words_where_they_are_heard(
    server: Server, fake: FakeEdge
) -> None:
    """``start`` names the format (MIME and short name) and the real rate; ``end.audio_ms``
    is the playing time; each word's offset is where its sound starts, within 30 ms."""
    fake.voiced = True
    async with connected(server) as client:
        results = {name: await speak_as(client, name, f"u-{name}") for name in FORMAT_NAMES}
    assert server.stats.snapshot()["formats"] == {name: 1 for name in FORMAT_NAMES}
    mp3_ms = results["mp3"].final["audio_ms"]
    for name, result in results.items():
        start, end = result.messages[0], result.final
        assert end["type"] == "end", (name, end)
        assert start["format"] == FORMATS[name].mime_type and start["format_name"] == name
        assert start["sample_rate"] == SAMPLE_RATE
        samples, rate = decode(name, bytes(result.audio))
        heard_ms = len(samples) * 1000 / rate
        assert abs(heard_ms - mp3_ms) < 60, (name, heard_ms, mp3_ms)
        assert abs(end["audio_ms"] - heard_ms) < 60, (name, end["audio_ms"], heard_ms)
        words = result.batched_words
        assert len(words) == len(TEXT.split())
        for word in words:
            heard = onset_ms(samples, rate, word["offset_ms"] - 25)
            assert abs(heard - word["offset_ms"]) < 30, (name, word, heard)


async def test_a_format_streams_before_the_upstream_pause_ends(
    server: Server, fake: FakeEdge
) -> None:
    """Audio in every format arrives while the upstream is paused mid-utterance."""
    fake.tone = True
    fake.pause_after_chunks = 3
    async with connected(server) as client:
        for number, name in enumerate(MADE):
            fake.paused.clear()
            fake.resume.clear()
            await client.speak(TEXT + f" {number}.", id=name, format=name)
            while True:
                await client.read_one()
                if fake.paused.is_set() and len(client.so_far(name).audio) > 100:
                    break
            assert not fake.records[-1].completed
            fake.resume.set()
            assert (await client.until_final(name)).final["type"] == "end"


async def test_a_replay_is_made_in_any_format_then_stored(server: Server, fake: FakeEdge) -> None:
    """One cache entry (the MP3) serves every format: no new upstream request. An
    encoded format sent whole is stored beside it and replayed as it was sent; FLAC,
    WAV and PCM are made again each time, never stored."""
    fake.tone = True
    async with connected(server) as client:
        first = await speak_as(client, "mp3", "first")
        await wait_for_entries(server, 1)
        for name in UNKEPT:
            assert (await speak_as(client, name, name)).final["type"] == "end"
        made = await speak_as(client, "opus", "made")
        await wait_for_entries(server, 2)
        again = await speak_as(client, "opus", "again")
        with_each = await speak_as(client, "opus", "each", words="each")
    assert len(fake.records) == 1
    assert [path.name.split(".")[0][64:] for path in entries(server)] in (
        ["", "-opus"],
        ["-opus", ""],
    )
    assert made.messages[0]["cached"] is True and again.messages[0]["cached"] is True
    assert abs(made.final["audio_ms"] - first.final["audio_ms"]) < 60
    samples, rate = decode("opus", bytes(made.audio))
    assert rate == 48_000 and rms(samples) > 1000
    # The stored Opus: the same bytes, words and playing time, in one burst.
    assert bytes(again.audio) == bytes(made.audio) == bytes(with_each.audio)
    assert again.batched_words == made.batched_words
    assert [w["offset_ms"] for w in with_each.words] == [w["offset_ms"] for w in made.batched_words]
    assert again.final["audio_ms"] == made.final["audio_ms"]
    # Each word still comes before the audio it describes.
    sent_ms = 0.0
    per_byte = made.final["audio_ms"] / len(made.audio)
    for frame in with_each.frames:
        if isinstance(frame, bytes):
            sent_ms += len(frame) * per_byte
        elif frame["type"] == "word":
            assert frame["offset_ms"] >= sent_ms - 1
    async with (
        aiohttp.ClientSession() as session,
        session.post(http_of(server) + "/tts", json={"text": TEXT, "format": "opus"}) as response,
    ):
        assert response.headers["X-TTS-Cache"] == "hit"
        assert response.headers["Content-Length"] == str(len(made.audio))
        assert await response.read() == bytes(made.audio)


async def cache_mp3(server: Server, text: str, mp3: bytes) -> None:
    """Store ``mp3`` as the cached MP3 of ``text`` in the default voice."""
    voice = server.config.default_voice
    key = server.services.speech.key_of(SynthesisRequest(text=text, voice=voice))
    assert server.services.store is not None
    await server.services.store.put(key, CacheEntry("edge", voice, mp3, words=()))


def count_transcoders(monkeypatch: pytest.MonkeyPatch) -> list[Transcoder]:
    """Every :class:`Transcoder` made from now on (the list fills as they are)."""
    made: list[Transcoder] = []

    class Counted(Transcoder):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(transcode, "Transcoder", Counted)
    return made


async def test_identical_format_requests_share_one_transcode(
    server: Server, fake: FakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests for one text in Opus share one transcode, which goes on for the one
    left when the other cancels mid-way, and is stored once whole."""
    made = count_transcoders(monkeypatch)
    fake.tone = True
    fake.pause_after_chunks = 2
    async with connected(server) as first, connected(server) as second:
        await first.speak(TEXT, id="first", format="opus")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await second.speak(TEXT, id="second", format="opus")
        while not second.so_far("second").audio:
            await second.read_one()  # what was made so far, at once
        await first.send({"type": "cancel", "id": "first"})
        assert (await first.until_final("first")).final["type"] == "cancelled"
        fake.resume.set()
        heard = await second.until_final("second")
    assert heard.final["type"] == "end"
    assert len(made) == 1 and len(fake.records) == 1
    assert server.stats.coalesced == 1
    await wait_for_entries(server, 2)
    async with connected(server) as client:
        again = await speak_as(client, "opus", "again", words="each")
    assert again.messages[0]["cached"] is True
    assert bytes(again.audio) == bytes(heard.audio)
    assert [w["offset_ms"] for w in again.words] == [w["offset_ms"] for w in heard.words]
    assert len(made) == 1


async def test_a_transcode_keeps_at_most_its_bound_for_a_slow_listener(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long cached text in Opus for a listener that stops taking it: the shared transcode
    runs ahead up to VARIANT_MAX_BYTES, then holds at most that and a chunk while it waits
    for the listener; it is not stored, and the listener still gets all of it."""
    bound = 32 * 2**10
    monkeypatch.setattr(speech_cache, "VARIANT_MAX_BYTES", bound)
    made = count_transcoders(monkeypatch)
    server = await start_server()
    text = "A minute of sound, for a listener who reads slowly."
    mp3 = tone_frames(2400)
    await cache_mp3(server, text, mp3)
    speech = server.services.speech
    request = SynthesisRequest(text=text, voice=server.config.default_voice)
    #: Opus made of a piece of MP3 is smaller than that piece.
    chunk_most = speech_cache.MADE_PIECE_BYTES
    audio = bytearray()
    async with contextlib.aclosing(speech.synthesize(request, made_as=FORMATS["opus"])) as events:
        assert isinstance(await anext(events), Started)
        await eventually(lambda: speech.made_bytes > bound, what="the transcode at its bound")
        async for event in events:
            assert speech.made_bytes <= bound + chunk_most
            if isinstance(event, AudioChunk):
                audio += event.data
    assert speech.made_bytes == 0
    samples, rate = decode("opus", bytes(audio))
    assert abs(len(samples) / rate - len(mp3) / FRAME_BYTES * 0.024) < 0.06
    async with connected(server) as client:
        await client.speak(text, id="again", format="opus")
        again = await client.until_final("again")
    # Made again (an Ogg stream's serial number is drawn anew each time).
    assert len(again.audio) == len(audio) and bytes(again.audio) != bytes(audio)
    assert len(made) == 2, "too long to be stored: made again"


async def test_a_transcode_left_past_half_way_is_finished_and_stored(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that leaves a cached text's Opus past half of it still has it stored
    (the transcode finishes alone), while one that leaves at its start stops it."""
    made = count_transcoders(monkeypatch)
    server = await start_server()
    speech, store = server.services.speech, server.services.store
    assert store is not None
    opus = FORMATS["opus"]
    mp3 = tone_frames(2400)
    whole_ms = len(mp3) / FRAME_BYTES * 24
    early, late = (
        SynthesisRequest(text=f"Left {when}.", voice=server.config.default_voice)
        for when in ("early", "late")
    )
    for request in (early, late):
        await cache_mp3(server, request.text, mp3)

    async def first_event(request: SynthesisRequest) -> Started:
        async with contextlib.aclosing(speech.synthesize(request, made_as=opus)) as events:
            started = await anext(events)
            assert isinstance(started, Started)
            return started

    await first_event(early)
    async with contextlib.aclosing(speech.synthesize(late, made_as=opus)) as events:
        async for event in events:
            if isinstance(event, MadeChunk) and event.made_ms > 0.6 * whole_ms:
                break
    await eventually(
        lambda: not speech.made_bytes and store.holds(speech.key_of(late, opus)),
        what="the late transcode finished and stored",
    )
    assert len(made) == 2
    assert (await first_event(late)).audio_ms == pytest.approx(whole_ms, abs=30)  # stored
    assert (await first_event(early)).audio_ms is None  # made again
    assert len(made) == 3


async def test_one_clients_transcodes_leave_others_their_turn(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Another client's first Opus byte, while one client has twelve long Opus transcodes
    running, stays within twice what it is without them (it was 4 to 8 times)."""
    server = await start_server(**MANY_CLIENTS)
    loads = [f"Five minutes of sound, number {number}." for number in range(12)]
    others = [f"Ten seconds of sound, number {number}." for number in range(10)]
    for text in loads:
        await cache_mp3(server, text, tone_frames(2400) * 5)
    for text in others:
        await cache_mp3(server, text, tone_frames(400))
    url = http_of(server) + "/tts"

    async with aiohttp.ClientSession() as session:

        async def first_byte(text: str) -> float:
            began = time.perf_counter()
            async with session.post(
                url,
                json={"text": text, "format": "opus"},
                headers={"X-Forwarded-For": "198.51.100.2"},
            ) as response:
                assert response.status == 200
                assert await response.content.readany()
                return time.perf_counter() - began

        async def load(text: str, started: asyncio.Event) -> None:
            async with session.post(
                url,
                json={"text": text, "format": "opus"},
                headers={"X-Forwarded-For": "198.51.100.1"},
            ) as response:
                while await response.content.readany():
                    started.set()

        alone = [await first_byte(text) for text in others[:5]]
        started = [asyncio.Event() for _ in loads]
        loading = [asyncio.create_task(load(*each)) for each in zip(loads, started, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*(each.wait() for each in started)), TIMEOUT)
            beside = [await first_byte(text) for text in others[5:]]
            still_loading = sum(not task.done() for task in loading)
        finally:
            for task in loading:
                task.cancel()
            await asyncio.gather(*loading, return_exceptions=True)
    assert still_loading == len(loads), "the load ran throughout"
    assert statistics.median(beside) <= 2 * statistics.median(alone) + TIMEOUT / 50, (
        alone,
        beside,
    )


async def test_pcm_streams_of_a_long_text_keep_no_copy_of_their_output(
    start_server: ServerFactory,
) -> None:
    """20 PCM streams at once of one cached long MP3: the process's Python memory grows by
    less than 3 streams' whole output at any moment (each stream used to keep all of its
    output, to be stored)."""
    server = await start_server(**MANY_CLIENTS)
    text = "A long text, heard by twenty clients in PCM."
    mp3 = mp3_frames(4000)  # 96 s
    pcm_bytes = 4000 * 576 * 2
    await cache_mp3(server, text, mp3)
    url = http_of(server) + "/tts"
    async with aiohttp.ClientSession() as session:

        async def listen() -> int:
            async with session.post(url, json={"text": text, "format": "pcm"}) as response:
                got = 0
                while chunk := await response.content.readany():
                    got += len(chunk)
                return got

        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            heard = await asyncio.wait_for(
                asyncio.gather(*(listen() for _ in range(20))), TIMEOUT * 4
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert heard == [pcm_bytes] * 20
    assert peak - before < 3 * pcm_bytes, (peak - before) / pcm_bytes


async def test_an_unknown_format_is_refused_and_nothing_is_lost(server: Server) -> None:
    async with connected(server) as client:
        await client.speak(TEXT, id="bad", format="ogg-vorbis")
        error = (await client.until_final("bad")).final
        assert error["code"] == "invalid_parameter" and "format" in error["message"]
        await client.speak(TEXT, id="bad2", format=3)
        assert (await client.until_final("bad2")).final["code"] == "bad_message"
        await speaks_fine(client)


async def test_a_corrupt_upstream_frame_ends_the_utterance_not_the_server(
    server: Server, fake: FakeEdge
) -> None:
    """A frame no decoder takes: the transcoded utterance ends with upstream_bad_audio
    (partial), the connection and the next utterance are fine, nothing leaks."""
    fake.tone = True
    fake.corrupt_after_chunks = 2
    async with connected(server) as client:
        result = await speak_as(client, "opus", "bad")
        assert result.final["code"] == "upstream_bad_audio"
        assert result.final["partial"] is True
        fake.corrupt_after_chunks = None
        assert (await speak_as(client, "opus", "good", rate="+5%")).final["type"] == "end"
    assert transcode.open_transcoders == 0


async def test_cancelled_transcodes_free_their_encoders(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """1,000 utterances cancelled mid-transcode leave no transcoder open, and memory flat."""
    server = await start_server(rate_limit_requests=0)
    fake.tone = True
    fake.keep_records = False  # what the fake keeps is not the server's
    fake.realtime_factor = 20
    before = _rss()
    async with connected(server) as client:
        for round_ in range(1000):
            id = f"c{round_}"
            # Chunks of 144 bytes, transcoded on the event loop, or of 2,880 on a worker.
            fake.frames_per_chunk = 1 if round_ % 2 else 20
            await client.speak(f"Cancel me {round_ % 50}.", id=id, format=MADE[round_ % 6])
            while not client.so_far(id).audio:
                await client.read_one()
            await client.send({"type": "cancel", "id": id})
            assert (await client.until_final(id)).final["type"] in ("cancelled", "end")
            if round_ == 99:
                warm = _rss()
        await speaks_fine(client)
    await eventually(lambda: transcode.open_transcoders == 0, what="every transcoder closed")
    assert _rss() - warm < 20 * 2**20, (before, warm, _rss())


def test_transcoders_closed_early_leave_nothing_behind() -> None:
    """6,000 transcoders, closed mid-stream or finished: the process does not grow."""
    source = tone_frames(20)
    for number in range(6000):
        transcoder = Transcoder(FORMATS[MADE[number % len(MADE)]])
        transcoder.feed_mp3(source)
        if number % 2:
            transcoder.close()
        else:
            transcoder.finish()
        if number == 999:
            warm = _rss()
    assert transcode.open_transcoders == 0
    assert _rss() - warm < 2 * 2**20


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


# HTTP


def http_of(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_the_openai_sdk_gets_every_response_format(server: Server, fake: FakeEdge) -> None:
    """Each of OpenAI's response formats, asked through the official client, decodes."""
    fake.tone = True
    client = openai.AsyncOpenAI(base_url=http_of(server) + "/v1", api_key="x", max_retries=0)
    for name in ("mp3", "opus", "aac", "flac", "wav", "pcm"):
        async with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=TEXT, response_format=name
        ) as response:
            assert response.headers["content-type"] == FORMATS[name].mime_type
            audio = b"".join([chunk async for chunk in response.iter_bytes()])
        samples, _ = decode(name, audio)
        assert rms(samples) > 1000, name
    assert len(fake.records) == 1, "one synthesis (then the cache) serves every format"


async def test_http_formats_and_their_errors(server: Server, fake: FakeEdge) -> None:
    """``format`` on /tts, ``webm`` on the OpenAI route; an unknown one is 400
    unsupported_format on both, naming the field."""
    fake.tone = True
    async with aiohttp.ClientSession() as session:
        async with session.post(
            http_of(server) + "/tts", json={"text": TEXT, "format": "wav"}
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "audio/wav"
            samples, rate = decode("wav", await response.read())
            assert rate == SAMPLE_RATE and rms(samples) > 1000
        async with session.get(
            http_of(server) + "/tts", params={"text": TEXT, "format": "webm"}
        ) as response:
            assert response.headers["Content-Type"] == "audio/webm; codecs=opus"
            assert rms(decode("webm", await response.read())[0]) > 1000
        async with session.post(
            http_of(server) + "/v1/audio/speech",
            json={
                "model": "tts-1",
                "voice": "alloy",
                "input": TEXT,
                "response_format": "wav",
                "stream_format": "sse",
            },
        ) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            events = [
                json.loads(line[6:])
                for line in (await response.text()).splitlines()
                if line.startswith("data: ")
            ]
            audio = b"".join(
                base64.b64decode(event["audio"])
                for event in events
                if event["type"] == "speech.audio.delta"
            )
            assert events[-1]["type"] == "speech.audio.done"
            samples, rate = decode("wav", audio)
            assert audio[:4] == b"RIFF" and rate == SAMPLE_RATE and rms(samples) > 1000
        # Counted by format as a WebSocket utterance is.
        assert server.stats.outcomes_by_interface["http", "ok"] == 3
        assert server.stats.snapshot()["formats"] == {"wav": 2, "webm": 1}
        async with session.post(
            http_of(server) + "/tts", json={"text": TEXT, "format": "mp4"}
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "unsupported_format"
        async with session.post(
            http_of(server) + "/v1/audio/speech",
            json={"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "ogg"},
        ) as response:
            assert response.status == 400
            error = (await response.json())["error"]
            assert error["code"] == "unsupported_format" and error["param"] == "response_format"


async def test_the_offline_voice_speaks_every_format_from_its_pcm(
    start_server: ServerFactory,
) -> None:
    """The offline voice's audio in each format is made from eSpeak's PCM (not from a
    decode of its MP3): as long as its MP3, with its words where they are heard."""
    server = await start_server()
    async with connected(server) as client:
        mp3 = await speak_as(client, "mp3", "o-mp3", voice="espeak:en")
        mp3_samples, _ = decode("mp3", bytes(mp3.audio))
        for name in MADE:
            result = await speak_as(client, name, f"o-{name}", voice="espeak:en")
            assert result.final["type"] == "end", (name, result.final)
            assert result.messages[0]["engine"] == "espeak"
            samples, rate = decode(name, bytes(result.audio))
            assert rms(samples) > 300, name
            heard_ms = len(samples) * 1000 / rate
            priming = FORMATS[name].priming_ms  # AAC's, before the source
            assert abs(heard_ms - len(mp3_samples) / 24) < 60, (name, heard_ms)
            assert abs(result.final["audio_ms"] - heard_ms) < 60, name
            # eSpeak's own timing varies by some milliseconds between runs.
            offsets = [word["offset_ms"] - priming for word in result.batched_words]
            assert offsets == pytest.approx([w["offset_ms"] for w in mp3.batched_words], abs=30)
            if name == "pcm":
                # Resampled from eSpeak's 22,050 Hz by FFmpeg, not LAME's MP3 decoded.
                assert samples != mp3_samples[: len(samples)]
                # The same speech: where the first word's sound starts agrees.
                first = mp3.batched_words[0]["offset_ms"]
                assert (
                    abs(
                        onset_ms(samples, rate, first - 40)
                        - onset_ms(mp3_samples, 24_000, first - 40)
                    )
                    < 15
                )


def test_pcm_is_encoded_without_any_mp3_decoder() -> None:
    """A transcoder fed PCM never makes an MP3 decoder."""
    transcoder = Transcoder(FORMATS["opus"])
    tone = array.array("h", (int(8000 * math.sin(i / 5)) for i in range(22_050)))
    made = transcoder.feed_pcm(tone.tobytes(), 22_050) + transcoder.finish()
    assert transcoder._decoder is None
    samples, rate = decode("opus", made)
    assert abs(len(samples) / rate - 1.0) < 0.03 and rms(samples) > 3000
