"""Streaming input: text that arrives while it is spoken (``speak`` with ``stream``,
then ``append``, ``flush`` and ``finish``), against the real server and the fake."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import (
    MANY_CLIENTS,
    TIMEOUT,
    Client,
    ServerFactory,
    connected,
    eventually,
    speaks_fine,
    url_of,
)
from tests.fake_edge import FakeEdge, spoken_words
from tests.test_formats import decode, onset_ms

PIECES = [
    "Hello there! I was just ",
    "thinking about the weather. It ",
    "is sunny today, and warm",
    " enough for a walk. See you",
]


async def test_appended_text_is_spoken_segment_by_segment_as_one_utterance(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Appends are cut at sentence ends and synthesized one segment each; the client
    gets one start (stream: true), one audio stream (every segment's audio in order),
    words whose offsets run on over the segments and whose ranges slice the whole
    text, and an end with the segment counts."""
    server = await start_server()
    whole = "".join(PIECES)
    async with connected(server) as client:
        await client.send({"type": "speak", "id": "s1", "stream": True, "text": PIECES[0]})
        for piece in PIECES[1:]:
            await client.send({"type": "append", "id": "s1", "text": piece})
        await client.send({"type": "finish", "id": "s1"})
        result = await client.until_final("s1")
        await speaks_fine(client)
    start = result.messages[0]
    assert start["type"] == "start" and start["stream"] is True
    end = result.final
    assert end["type"] == "end"
    texts = [
        "Hello there! I was just thinking about the weather.",
        " It is sunny today, and warm enough for a walk.",
        " See you",
    ]
    # (edge-tts sends each text without its leading space)
    assert [record.text for record in fake.records[:-1]] == [t.strip() for t in texts]
    assert (end["segments"], end["cached_segments"]) == (3, 0)
    assert bytes(result.audio) == b"".join(bytes(r.audio) for r in fake.records[:-1])
    assert end["bytes"] == len(result.audio)
    words = result.words
    assert end["words"] == len(words)
    for word in words:
        assert whole[word["char_start"] : word["char_end"]] == word["text"]
    offsets = [word["offset_ms"] for word in words]
    assert offsets == sorted(offsets)
    # The second segment's first word comes after the whole first segment's audio.
    first_ms = len(fake.records[0].audio) * 8 / 48
    second = next(w for w in words if w["char_start"] >= len(texts[0]))
    assert second["offset_ms"] >= first_ms


async def test_segments_said_before_replay_from_the_cache(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A sentence of an earlier reply is a cached segment of a later one."""
    server = await start_server()
    sentence = "This sentence comes back in every reply. "
    async with connected(server) as client:
        for number, id in enumerate(("a", "b")):
            await client.send({"type": "speak", "id": id, "stream": True})
            await client.send({"type": "append", "id": id, "text": sentence})
            await client.send({"type": "append", "id": id, "text": f"Then part {number}."})
            await client.send({"type": "finish", "id": id})
            end = (await client.until_final(id)).final
            assert end["type"] == "end"
    assert (end["segments"], end["cached_segments"]) == (2, 1)
    assert [r.text for r in fake.records] == [
        sentence.strip(),
        "Then part 0.",
        "Then part 1.",
    ]


async def test_refused_appends_answer_for_themselves_and_end_nothing(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """append to an unknown id: not_found; after finish: invalid_parameter; both "for"
    the append, with the id, and the utterance still ends well; flush twice is fine."""
    server = await start_server()
    async with connected(server) as client:
        await client.send({"type": "append", "id": "nobody", "text": "Hi."})
        refusal = await client.recv_message()
        assert (refusal["code"], refusal["for"], refusal["id"]) == (
            "not_found",
            "append",
            "nobody",
        )
        await client.send({"type": "speak", "id": "s", "stream": True})
        await client.send({"type": "append", "id": "s", "text": "Something to say now"})
        await client.send({"type": "flush", "id": "s"})
        await client.send({"type": "flush", "id": "s"})
        await client.send({"type": "finish", "id": "s"})
        await client.send({"type": "append", "id": "s", "text": "Too late."})
        result = await client.until_final("s")
        assert result.final["type"] == "end" and result.final["segments"] == 1
        late = client.refusals
        assert len(late) == 1 and (late[0]["code"], late[0]["for"], late[0]["id"]) == (
            "invalid_parameter",
            "append",
            "s",
        )
    assert [r.text for r in fake.records] == ["Something to say now"]


async def test_waiting_text_is_spoken_and_a_silent_stream_finished(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Text without a sentence end that stops growing is spoken after
    STREAM_MAX_WAIT_MS; a stream nobody finishes ends after STREAM_IDLE_TIMEOUT."""
    server = await start_server(stream_max_wait_ms=200.0, stream_idle_timeout=0.6)
    async with connected(server) as client:
        await client.send({"type": "speak", "id": "s", "stream": True, "text": "Well, let me"})
        async with asyncio.timeout(TIMEOUT):
            result = await client.until_final("s")
    assert result.final["type"] == "end"
    assert [r.text for r in fake.records] == ["Well, let me"]


async def two_segments_under_way(client: Client, fake: FakeEdge) -> None:
    """Open the streaming utterance "s" with two sentences; return once both are being
    synthesized (the current one paused by the fake after its first chunk)."""
    await client.send({"type": "speak", "id": "s", "stream": True})
    await client.send(
        {
            "type": "append",
            "id": "s",
            "text": "The first sentence is long enough. The second one too, surely. ",
        }
    )
    await active_upstreams(fake, 2)


async def active_upstreams(fake: FakeEdge, count: int) -> None:
    """Wait until the fake has ``count`` syntheses open."""
    await eventually(lambda: fake.active == count, what=f"{count} syntheses open")


async def test_cancel_mid_stream_closes_every_upstream(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A cancel while a segment streams and the next is synthesized ahead ends the
    utterance with cancelled and leaves no upstream request open."""
    server = await start_server()
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await two_segments_under_way(client, fake)
        await client.send({"type": "cancel", "id": "s"})
        result = await client.until_final("s")
        assert result.final["type"] == "cancelled"
        await client.send({"type": "append", "id": "s", "text": "Anyone there?"})
        refusal = await client.recv_message()
        assert (refusal["code"], refusal["for"], refusal["id"]) == ("not_found", "append", "s")
        fake.resume.set()
        await active_upstreams(fake, 0)
        await speaks_fine(client)


async def test_the_readme_example_speaks_a_reply(
    start_server: ServerFactory, fake: FakeEdge, tmp_path: Path
) -> None:
    """The README's "speak an LLM reply" example, run as written against a server,
    writes the reply's audio: every segment's, in order."""
    server = await start_server()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("Speak an LLM reply as it is written", 1)[1]
    code = example.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("ws://localhost:8765/v1/stream", url_of(server))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=tmp_path, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 0, stderr.decode()
    assert [r.text for r in fake.records] == [
        "Sure! The weather today is sunny and warm.",
        "Enjoy it.",
    ]
    assert (tmp_path / "reply.mp3").read_bytes() == b"".join(bytes(r.audio) for r in fake.records)


async def test_edge_failing_before_the_first_audio_makes_the_offline_voice_speak_it_all(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Edge refusing from the start: the whole streamed reply is spoken by the offline
    voice (start says so), every segment, in one voice."""
    server = await start_server(upstream_retries=0)
    fake.refuse_status = 503
    async with connected(server) as client:
        await client.send({"type": "speak", "id": "s", "stream": True, "text": PIECES[0]})
        for piece in PIECES[1:]:
            await client.send({"type": "append", "id": "s", "text": piece})
        await client.send({"type": "finish", "id": "s"})
        result = await client.until_final("s")
    start = result.messages[0]
    assert start["engine"] == "espeak" and start["fallback"] is True
    assert result.final["type"] == "end" and result.final["segments"] == 3
    assert len(result.audio) == result.final["bytes"] > 0


async def test_edge_failing_after_the_first_segment_ends_the_reply_partial(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A later segment that Edge fails is not spoken by another voice: the reply ends
    with the error, partial (a listener never hears the speaker change)."""
    server = await start_server(upstream_retries=0)
    async with connected(server) as client:
        await client.send(
            {"type": "speak", "id": "s", "stream": True, "text": "The first sentence is spoken. "}
        )
        await eventually(lambda: fake.records and fake.records[0].completed)
        fake.refuse_status = 503
        await client.send({"type": "append", "id": "s", "text": "The second one fails here."})
        await client.send({"type": "finish", "id": "s"})
        result = await client.until_final("s")
    assert result.messages[0]["engine"] == "edge"
    assert result.final["type"] == "error" and result.final["partial"] is True
    assert result.final["code"] == "upstream_unavailable"
    assert bytes(result.audio) == bytes(fake.records[0].audio)


async def test_limits_of_a_streamed_text(start_server: ServerFactory, fake: FakeEdge) -> None:
    """The opening speak counts once toward the rate limit, its appends not at all; a
    text past MAX_STREAM_TEXT_LENGTH is refused (text_too_long, for the append) and
    the utterance ends with what it had; finished with nothing to say: empty_text."""
    server = await start_server(rate_limit_requests=3, max_stream_text_length=80)
    async with connected(server) as client:  # the handshake: 1 request
        await client.send({"type": "speak", "id": "s", "stream": True})  # 2
        for _ in range(10):
            await client.send({"type": "append", "id": "s", "text": "Some words. "})
        result = await client.until_final("s")
        assert result.final["type"] == "end"
        assert [r["code"] for r in client.refusals][:1] == ["text_too_long"]
        assert client.refusals[0]["for"] == "append" and client.refusals[0]["id"] == "s"
        assert sum(len(r.text) for r in fake.records) <= 80
        await client.send({"type": "speak", "id": "e", "stream": True, "text": "  "})  # 3
        await client.send({"type": "append", "id": "e", "text": "x" * 5001})
        too_long = await client.recv_message()
        assert (too_long["code"], too_long["for"]) == ("text_too_long", "append")
        await client.send({"type": "finish", "id": "e"})
        empty = await client.until_final("e")
        assert (empty.final["type"], empty.final["code"]) == ("error", "empty_text")
        await client.speak("Over the limit.", id="x")  # 4
        assert (await client.until_final("x")).final["code"] == "rate_limited"


async def test_a_client_leaving_mid_stream_leaves_no_upstream_open(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Disconnecting while a segment streams and the next is synthesized ahead closes
    both upstream requests."""
    server = await start_server()
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await two_segments_under_way(client, fake)
    fake.resume.set()
    await active_upstreams(fake, 0)
    assert len(fake.records) == 2


@pytest.mark.parametrize("audio_format", ["mp3", "pcm"])
async def test_after_twenty_segments_words_are_where_they_are_heard(
    start_server: ServerFactory, fake: FakeEdge, audio_format: str
) -> None:
    """Twenty segments, each word a tone in the fake: in the decoded whole stream, every
    word's offset_ms is where its sound starts, within 40 ms, and its characters slice
    the whole text to the word."""
    fake.voiced = True
    server = await start_server()
    sentences = [f"Sentence number {number} is here. " for number in range(20)]
    whole = "".join(sentences)
    async with connected(server) as client:
        await client.send(
            {"type": "speak", "id": "s", "stream": True, "words": "batch", "format": audio_format}
        )
        for sentence in sentences:
            await client.send({"type": "append", "id": "s", "text": sentence})
        await client.send({"type": "finish", "id": "s"})
        result = await client.until_final("s")
    assert result.final["type"] == "end" and result.final["segments"] == 20
    samples, rate = decode(audio_format, bytes(result.audio))
    words = result.batched_words
    assert len(words) == len(whole.split())
    for word in words:
        assert whole[word["char_start"] : word["char_end"]] == word["text"].rstrip(".")
        heard = onset_ms(samples, rate, word["offset_ms"] - 25)
        assert abs(heard - word["offset_ms"]) < 40, (word, heard)
    heard_ms = len(samples) * 1000 / rate
    assert abs(heard_ms - result.final["audio_ms"]) < 60


async def test_no_gap_between_segments_at_real_time_pacing(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """The fake streams audio about as fast as it plays (1.2 times real time; Edge is
    faster) after half a second of latency, and the text arrives faster than speech:
    for every segment, its first audio byte reaches the client before a listener, who
    started playing at the very first byte, reaches the end of the audio before it.
    Without the lookahead, each segment's latency would be a gap. (At exactly real
    time the margin is the last chunk of the segment before, 16 ms in one run.) The
    listener waits, as a player does, for audio of a segment that comes late: on a
    loaded machine that is the fake's pace, not a gap between segments."""
    fake.realtime_factor = 1.2
    fake.first_audio_delay = TIMEOUT / 10
    server = await start_server()
    sentences = ["The first sentence is this one. ", "A second sentence follows. "]
    sentences += ["And the third one ends it all."]
    arrivals: list[tuple[float, int]] = []  # (when, bytes so far) for every audio frame
    loop = asyncio.get_running_loop()
    async with connected(server) as client:
        await client.send({"type": "speak", "id": "s", "stream": True, "words": "none"})
        for sentence in sentences:
            await client.send({"type": "append", "id": "s", "text": sentence})
        await client.send({"type": "finish", "id": "s"})
        received = 0
        while True:
            frame = await client.recv()
            if isinstance(frame, bytes):
                arrivals.append((loop.time(), received))
                received += len(frame)
            elif frame["type"] in ("end", "error"):
                assert frame["type"] == "end"
                break
    sizes = [len(record.audio) for record in fake.records]
    assert len(sizes) == 3 and sum(sizes) == received
    # When the listener has played all it was sent, as each frame arrives.
    played_by = []
    played_until = arrivals[0][0]
    ends = [before for _, before in arrivals[1:]] + [received]
    for (when, before), after in zip(arrivals, ends, strict=True):
        played_by.append(played_until)
        played_until = max(played_until, when) + (after - before) * 8 / 48_000  # 48 kbit/s
    margins = []
    boundary = 0
    for size in sizes[:-1]:
        boundary += size
        first = next(index for index, (_, before) in enumerate(arrivals) if before >= boundary)
        margins.append(played_by[first] - arrivals[first][0])
    assert min(margins) > 0, margins


async def test_at_most_two_segments_are_synthesized_at_once(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Six sentences cut at once: the one playing and the next are synthesized, never
    more; all six are spoken, in order."""
    server = await start_server()
    fake.first_audio_delay = 0.05
    sentences = [f"This is sentence number {number} of six. " for number in range(6)]
    async with connected(server) as client:
        await client.send({"type": "speak", "id": "s", "stream": True, "text": "".join(sentences)})
        await client.send({"type": "finish", "id": "s"})
        result = await client.until_final("s")
    assert result.final["type"] == "end" and result.final["segments"] == 6
    assert fake.max_active == 2
    assert [r.text for r in fake.records] == [s.strip() for s in sentences]


#: Text with nothing to speak, of the kinds issue 31 reported.
UNSPEAKABLE = ". . . . ,,,, - \n😀😀. "
#: How much slower than before another client may be answered while that text streams
#: (or TIMEOUT / STALL_FLOOR_DIVISOR, if more: a tiny baseline must not make it flaky).
STALL_RATIO = 10
STALL_FLOOR_DIVISOR = 10


async def test_a_long_stream_with_nothing_to_speak_stalls_no_other_client(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """While one client streams MAX_STREAM_TEXT_LENGTH characters with nothing to speak
    in appends of max_text_length, another client's speak of a cached text and /health
    answer about as fast as before; that text reaches no upstream and ends empty_text."""
    server = await start_server(**MANY_CLIENTS)
    health_url = f"http://127.0.0.1:{server.ops.port}/health"
    cached = "This sentence is spoken from the cache."
    loop = asyncio.get_running_loop()
    async with (
        connected(server) as other,
        connected(server) as streamer,
        aiohttp.ClientSession() as http,
    ):

        async def spoken(id: str) -> float:
            """Seconds to the end of a speak of the cached text."""
            started = loop.time()
            await other.speak(cached, id=id)
            end = (await other.until_final(id)).final
            assert end["type"] == "end" and end["cached"] is True, end
            return loop.time() - started

        async def answered() -> float:
            """Seconds to /health's answer."""
            started = loop.time()
            async with http.get(health_url) as response:
                assert response.status == 200
                await response.read()
            return loop.time() - started

        async def latencies(id: str) -> tuple[float, float]:
            """The seconds of ``spoken`` and ``answered``, asked at once."""
            return await asyncio.gather(spoken(id), answered())

        await other.speak(cached, id="first")  # synthesized; then replayed from the cache
        assert (await other.until_final("first")).final["type"] == "end"
        before = [await latencies(f"before {number}") for number in range(5)]
        floor = TIMEOUT / STALL_FLOOR_DIVISOR
        speak_bound = max(STALL_RATIO * max(s for s, _ in before), floor)
        health_bound = max(STALL_RATIO * max(h for _, h in before), floor)

        async def stream() -> dict[str, Any]:
            """Stream the text with nothing to speak, finish it: its last message."""
            length = server.config.max_stream_text_length
            piece = streamer.hello["max_text_length"]
            text = (UNSPEAKABLE * (length // len(UNSPEAKABLE) + 1))[:length]
            await streamer.send({"type": "speak", "id": "s", "stream": True})
            for start in range(0, length, piece):
                await streamer.send(
                    {"type": "append", "id": "s", "text": text[start : start + piece]}
                )
            await streamer.send({"type": "finish", "id": "s"})
            return (await streamer.until_final("s")).final

        streaming = asyncio.create_task(stream())
        during: list[tuple[float, float]] = []
        try:
            while not streaming.done():
                during.append(await latencies(f"during {len(during)}"))
                speak_s, health_s = during[-1]
                assert speak_s < speak_bound and health_s < health_bound, (before, during)
            final = await streaming
        finally:
            streaming.cancel()
    assert (final["type"], final["code"]) == ("error", "empty_text")
    assert streamer.refusals == []
    assert [record.text for record in fake.records] == [cached]


#: An LLM's reply as it streams: Markdown, a code block, a table, links and emoji.
MARKDOWN_REPLY = (
    "## Plan for today\n\n"
    "Here is **the plan** for today 😀:\n\n"
    "1. Buy [fresh bread](https://bakery.example.com/menu?day=1) at the market.\n"
    "2. Call *Anna* about the **garden\nparty** tomorrow.\n\n"
    "```python\nprint('never spoken')\n```\n\n"
    "| Item | Price |\n|---|---|\n| Bread | 3 euros |\n\n"
    "Details are at https://www.example.org/details/today. Have fun! 👍\n"
)


def token_pieces(text: str, size: int) -> list[str]:
    """``text`` in pieces of ``size`` characters, as an LLM's tokens come."""
    return [text[at : at + size] for at in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 4, 9])
async def test_a_markdown_reply_streamed_in_tokens_is_spoken_clean(
    start_server: ServerFactory, fake: FakeEdge, size: int
) -> None:
    """Appends of a Markdown reply, split inside its marks (``**the pl`` then ``an**``),
    reach Edge without any mark, link target, code or emoji, by the default cleanup;
    every word's range slices the reply as appended to text holding the word."""
    server = await start_server()
    async with connected(server) as client:
        await client.send({"type": "speak", "id": "m", "stream": True})
        for piece in token_pieces(MARKDOWN_REPLY, size):
            await client.send({"type": "append", "id": "m", "text": piece})
        await client.send({"type": "finish", "id": "m"})
        result = await client.until_final("m")
    assert result.final["type"] == "end"
    spoken = " ".join(record.text for record in fake.records)
    for mark in ("**", "#", "`", "](", "http", "www.", "|", "😀", "👍", "print", "menu"):
        assert mark not in spoken, (mark, spoken)
    for kept in ("the plan", "fresh bread", "garden", "party", "example.org", "Bread, 3 euros"):
        assert kept in spoken, (kept, spoken)
    words = result.words
    assert len(words) == sum(len(spoken_words(record.text)) for record in fake.records)
    for word in words:
        assert word["text"] in MARKDOWN_REPLY[word["char_start"] : word["char_end"]], word


async def test_a_stream_asking_for_no_cleanup_is_cut_as_it_is(
    start_server: ServerFactory,
) -> None:
    """Through the core, a streamed text opened with cleanup "none" is segmented as it
    came (its marks kept, no map); with "markdown" its segments are clean and index the
    text appended through its map."""
    utterances = (await start_server()).services.utterances
    texts = {}
    for mode in ("none", "markdown"):
        stream = utterances.open_stream(cleanup=mode)
        stream.append("## Title\n**Bold** text, and more words here.")
        stream.finish()
        segments = []
        while (segment := stream.take()) is not None:
            segments.append(segment)
        stream.close()
        texts[mode] = ("".join(s.text for s in segments), stream.source)
    assert texts["none"] == ("## Title\n**Bold** text, and more words here.", None)
    spoken, source = texts["markdown"]
    assert spoken == "Title.\nBold text, and more words here."
    assert source is not None and source.original(len("Title.\n"), len("Title.\nBold")) == (
        len("## Title\n**"),
        len("## Title\n**Bold"),
    )
