"""End to end: a real server, the real edge-tts client, the fake Edge service."""

from __future__ import annotations

import asyncio

from tests.conftest import TIMEOUT, Client
from tests.fake_edge import FakeEdge, spoken_words


async def test_hello_describes_the_server(client: Client) -> None:
    """The first message on a connection is hello with the protocol version and limits."""
    assert client.hello["type"] == "hello"
    assert client.hello["protocol"] == 1
    assert client.hello["server"].startswith("ttsstream/")
    assert client.hello["default_voice"] == "en-US-EmmaMultilingualNeural"
    assert client.hello["max_text_length"] == 5000


async def test_utterance_streams_audio_and_words(client: Client, fake: FakeEdge) -> None:
    """A multi-sentence text yields start, every word with its range, the exact audio, end."""
    text = "Hello, world! The cat sat on the mat. The cat sat again: 42 times, naïve café."
    await client.speak(text, voice="en-US-AriaNeural")
    result = await client.until_final("u1")

    start = result.messages[0]
    assert start == {
        "type": "start",
        "id": "u1",
        "voice": "en-US-AriaNeural",
        "format": "audio/mpeg",
        "format_name": "mp3",
        "sample_rate": 24000,
        "cached": False,
        "engine": "edge",
        "fallback": False,
        "fallback_reason": None,
    }
    (record,) = fake.records
    assert bytes(result.audio) == bytes(record.audio)
    assert record.voice == "Microsoft Server Speech Text to Speech Voice (en-US, AriaNeural)"

    words = result.words
    assert [w["text"] for w in words] == spoken_words(text)
    assert [w["offset_ms"] for w in words] == [offset / 1 for _, offset, _ in record.words]
    assert [w["duration_ms"] for w in words] == [d / 1 for _, _, d in record.words]
    for word in words:
        assert text[word["char_start"] : word["char_end"]] == word["text"]
    # Repeated words map to successive occurrences, not the first one again.
    cats = [w["char_start"] for w in words if w["text"] == "cat"]
    assert cats == [text.index("cat"), text.index("cat", text.index("cat") + 1)]

    end = result.final
    assert end["type"] == "end"
    assert end["bytes"] == len(record.audio)
    assert end["words"] == len(words)
    assert end["audio_ms"] == len(record.audio) / 6
    assert end["cached"] is False
    assert end["ttfb_ms"] > 0


async def test_batched_words_come_before_their_audio(client: Client, fake: FakeEdge) -> None:
    """With "words": "batch", the same words arrive in words messages, each before its audio."""
    text = "One two three. Four five six seven, eight nine ten eleven twelve."
    fake.frames_per_chunk = 40  # about a second of audio per chunk: several words each
    await client.speak(text, id="each")
    each = await client.until_final("each")
    await client.speak(text, id="batch", words="batch", rate="+1%")  # not a cache hit
    batch = await client.until_final("batch")

    assert batch.words == []
    assert batch.batched_words == [
        {k: v for k, v in w.items() if k not in ("type", "id")} for w in each.words
    ]
    sent = 0
    batches = 0
    for frame in batch.frames:
        if isinstance(frame, bytes):
            sent += len(frame)
        elif frame["type"] == "words":
            batches += 1
            # Every word describes audio not sent yet (6 bytes per ms at 48 kbit/s).
            assert all(sent <= word["offset_ms"] * 6 for word in frame["words"])
            assert frame["id"] == "batch"
    # Live words are batched up to the next audio chunk: fewer messages, more than one.
    assert 1 < batches < len(each.words)
    assert batch.final["words"] == len(each.words)
    assert bytes(batch.audio) == bytes(fake.records[1].audio)


async def test_words_none_sends_only_audio(client: Client, fake: FakeEdge) -> None:
    """With "words": "none", an utterance is start, audio and end, and end counts no words."""
    await client.speak("Just the audio, please.", words="none")
    result = await client.until_final("u1")
    assert [m["type"] for m in result.messages] == ["start", "end"]
    assert bytes(result.audio) == bytes(fake.records[0].audio)
    assert fake.records[0].words, "the upstream did report words"
    assert result.final["words"] == 0


async def test_first_audio_is_forwarded_before_upstream_finishes(
    client: Client, fake: FakeEdge
) -> None:
    """Audio reaches the client while the upstream is paused mid-stream."""
    fake.pause_after_chunks = 2
    await client.speak("One two three four five six seven eight nine ten.")
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
    sent_before_pause = bytes(fake.records[0].audio)
    assert sent_before_pause
    while len(client.so_far("u1").audio) < len(sent_before_pause):
        await client.read_one()
    assert client.so_far("u1").messages[0]["type"] == "start"
    assert bytes(client.so_far("u1").audio) == sent_before_pause
    assert not fake.records[0].completed
    fake.resume.set()
    result = await client.until_final("u1")
    assert result.final["type"] == "end"
    assert fake.records[0].completed
    assert bytes(result.audio) == bytes(fake.records[0].audio)


async def test_speak_without_id_gets_one_echoed_on_every_message(client: Client) -> None:
    """A speak with only text is spoken, and all its messages carry the id the server made."""
    await client.send({"type": "speak", "text": "No id given."})
    while client.current is None:
        await client.read_one()
    made = client.current
    assert 1 <= len(made) <= 64
    result = await client.until_final(made)
    assert [result.messages[0]["type"], result.final["type"]] == ["start", "end"]
    assert all(message["id"] == made for message in result.messages)
