"""Resilience through a real server: fallback to the offline voice, retries, breaker, cap."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

from tests.conftest import MANY_CLIENTS, TIMEOUT, Client, Clock, ServerFactory, connected
from tests.fake_edge import FakeEdge
from ttsstream.config import Config
from ttsstream.core.breaker import BreakerStatus, CircuitBreaker
from ttsstream.core.router import speech_router
from ttsstream.engines.words import tokens_of
from ttsstream.exceptions import ConfigError
from ttsstream.server import Server

TEXT = "The service failed, so the offline voice speaks instead."
#: A short upstream deadline for the timeout cases, in seconds
#: (0.3 s unscaled: time enough for a connection's handshake and first audio).
SHORT = TIMEOUT * 0.06


async def assert_fallback(client: Client, reason: str, voice: str = "espeak:en-us") -> None:
    """The utterance u1 was spoken whole by the offline voice, for ``reason``."""
    result = await client.until_final("u1")
    start, end = result.messages[0], result.final
    assert start["type"] == "start", result.messages
    assert (start["engine"], start["fallback"], start["fallback_reason"]) == (
        "espeak",
        True,
        reason,
    )
    assert start["voice"] == voice
    assert end["type"] == "end", end
    assert end["bytes"] == len(result.audio) > 0
    assert [w["text"] for w in result.words] == [t.text for t in tokens_of(TEXT)]


def unreachable() -> dict[str, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return {
        "edge_wss_url": f"ws://127.0.0.1:{port}/edge/v1?TrustedClientToken=x",
        "edge_voices_url": f"http://127.0.0.1:{port}/voices/list?trustedclienttoken=x",
    }


@pytest.mark.parametrize(
    ("fault", "settings", "reason"),
    [
        ({"refuse_status": 403}, {}, "upstream_unavailable"),
        ({"refuse_status": 429}, {}, "upstream_unavailable"),
        ({"refuse_status": 503}, {}, "upstream_unavailable"),
        ({"no_audio": True}, {}, "no_audio"),
        ({"first_audio_delay": SHORT * 10}, {"upstream_timeout": SHORT}, "upstream_timeout"),
        ({}, "unreachable", "upstream_unavailable"),
    ],
    ids=["403", "429", "503", "no_audio", "first_audio_timeout", "connect_failure"],
)
async def test_edge_failure_before_audio_falls_back(
    start_server: ServerFactory,
    fake: FakeEdge,
    fault: dict[str, Any],
    settings: dict[str, Any] | str,
    reason: str,
) -> None:
    """Each kind of Edge failure before audio is spoken by the offline voice, with its reason."""
    for name, value in fault.items():
        setattr(fake, name, value)
    extra = unreachable() if settings == "unreachable" else settings
    assert isinstance(extra, dict)
    server = await start_server(upstream_retries=0, **extra)
    async with connected(server) as client:
        await client.speak(TEXT, voice="en-US-AriaNeural")
        await assert_fallback(client, reason)


async def test_fallback_voice_follows_the_locale(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """espeak:auto picks the offline voice of the requested voice's locale."""
    fake.refuse_status = 503
    async with connected(await start_server(upstream_retries=0)) as client:
        await client.speak(TEXT, voice="fr-FR-DeniseNeural")
        await assert_fallback(client, "upstream_unavailable", voice="espeak:fr")


async def test_fixed_fallback_voice(start_server: ServerFactory, fake: FakeEdge) -> None:
    """FALLBACK_VOICE=espeak:de speaks every fallback with that voice."""
    fake.refuse_status = 503
    server = await start_server(upstream_retries=0, fallback_voice="espeak:de")
    async with connected(server) as client:
        await client.speak(TEXT, voice="en-US-AriaNeural")
        await assert_fallback(client, "upstream_unavailable", voice="espeak:de")


async def test_no_fallback_after_edge_audio_was_sent(client: Client, fake: FakeEdge) -> None:
    """Once Edge audio went out, a failure ends the utterance with an error: no mixed audio."""
    fake.drop_after_chunks = 2
    await client.speak(TEXT)
    result = await client.until_final("u1")
    assert result.messages[0]["engine"] == "edge"
    assert result.final["code"] == "upstream_unavailable"
    assert "partial" in result.final["message"]
    assert bytes(result.audio) == bytes(fake.records[0].audio)


async def test_offline_voice_can_be_asked_for(client: Client, fake: FakeEdge) -> None:
    """A speak naming espeak:<id> is spoken offline, not as a fallback, without Edge."""
    await client.speak(TEXT, voice="espeak:en-us", rate="+20%")
    result = await client.until_final("u1")
    assert (result.messages[0]["engine"], result.messages[0]["fallback"]) == ("espeak", False)
    assert result.final["type"] == "end"
    assert fake.handshakes == 0


async def test_retries_happen_before_fallback(start_server: ServerFactory, fake: FakeEdge) -> None:
    """A refused first attempt is retried and Edge speaks; every retry is one more call."""
    fake.refuse_status, fake.refuse_count = 503, 2
    async with connected(await start_server(upstream_retries=2)) as client:
        await client.speak(TEXT)
        result = await client.until_final("u1")
        assert result.messages[0]["engine"] == "edge"
        assert result.final["type"] == "end"
    assert fake.handshakes == 3


async def test_retries_are_bounded(start_server: ServerFactory, fake: FakeEdge) -> None:
    """With UPSTREAM_RETRIES=2 a refusing upstream is called three times, then fallback."""
    fake.refuse_status = 503
    async with connected(await start_server(upstream_retries=2)) as client:
        await client.speak(TEXT)
        await assert_fallback(client, "upstream_unavailable")
    assert fake.handshakes == 3


async def breaker_server(start_server: ServerFactory, clock: Clock, **settings: Any) -> Server:
    server = await start_server(upstream_retries=0, **settings)
    server.services.router.breaker = CircuitBreaker(failure_threshold=2, cooldown=30, clock=clock)
    return server


async def test_breaker_opens_sends_to_fallback_and_closes(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """After 2 failures Edge is not called; after the cooldown one trial closes the breaker."""
    clock = Clock()
    server = await breaker_server(start_server, clock)
    fake.refuse_status = 503
    async with connected(server) as client:
        for id in ("a", "b"):
            await client.speak(TEXT, id=id)
            assert (await client.until_final(id)).messages[0]["fallback"] is True
        assert fake.handshakes == 2
        assert server.services.router.breaker.status.state == "open"

        fake.refuse_status = None  # Edge is back, but the breaker does not know yet.
        await client.speak(TEXT)
        await assert_fallback(client, "upstream_unavailable")
        assert fake.handshakes == 2

        clock.now += 30
        await client.speak(TEXT, id="trial")
        trial = await client.until_final("trial")
        assert (trial.messages[0]["engine"], trial.final["type"]) == ("edge", "end")
        assert server.services.router.breaker.status == BreakerStatus(
            "closed", 0, "upstream_unavailable", None
        )
        assert fake.handshakes == 3


async def test_open_breaker_without_fallback_fails_fast(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """With no fallback voice, an open breaker answers upstream_unavailable at once."""
    clock = Clock()
    server = await breaker_server(start_server, clock, fallback_voice=None)
    fake.refuse_status = 503
    async with connected(server) as client:
        for id in ("a", "b", "c"):
            await client.speak(TEXT, id=id)
            assert (await client.until_final(id)).final["code"] == "upstream_unavailable"
    assert fake.handshakes == 2


async def test_concurrency_cap_holds_under_load(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """50 parallel utterances never run more than UPSTREAM_CONCURRENCY Edge syntheses at once."""
    fake.chunk_delay = 0.01
    server = await start_server(upstream_concurrency=5, **MANY_CLIENTS)

    async def one(index: int) -> dict[str, Any]:
        async with connected(server) as client:
            await client.speak(f"Parallel utterance {index} speaks.")
            result = await client.until_final("u1")
            return result.final

    finals = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), TIMEOUT * 4)
    assert all(final["type"] == "end" for final in finals)
    assert len(fake.records) == 50
    assert fake.max_active == 5


def test_offline_voice_settings_are_checked_at_start() -> None:
    """An offline DEFAULT_VOICE without the offline engine, or an unknown FALLBACK_VOICE,
    stops the server at start with a ConfigError naming the variable."""
    with pytest.raises(ConfigError) as raised:
        speech_router(Config(default_voice="espeak:en-us"), with_offline=False)
    assert raised.value.variable == "DEFAULT_VOICE"
    with pytest.raises(ConfigError) as raised:
        speech_router(Config(fallback_voice="espeak:klingon"))
    assert raised.value.variable == "FALLBACK_VOICE"
    assert speech_router(Config(fallback_voice="espeak:de")).fallback_voice == "espeak:de"
    assert speech_router(Config(), with_offline=False).fallback_voice is None


async def test_words_are_words_whichever_engine_speaks(client: Client) -> None:
    """The protocol's streaming example gives the same words by Edge and by the offline
    voice: words, never punctuation (its last piece, ", and warm.", gave eSpeak a
    word ","), and end counts them."""
    pieces = ["Hello there! I was just ", "thinking about the weather. It ", "is sunny"]
    spoken = {}
    for id, voice in (("edge", "en-US-AriaNeural"), ("espeak", "espeak:en-us")):
        await client.send({"type": "speak", "id": id, "stream": True, "voice": voice})
        for piece in pieces:
            await client.send({"type": "append", "id": id, "text": piece})
        await client.send({"type": "flush", "id": id})
        await client.send({"type": "append", "id": id, "text": ", and warm."})
        await client.send({"type": "finish", "id": id})
        result = await client.until_final(id)
        assert result.messages[0]["engine"] == id
        assert (result.final["type"], result.final["segments"]) == ("end", 3), result.final
        spoken[id] = [word["text"] for word in result.words]
        assert result.final["words"] == len(spoken[id])
    words = ["Hello", "there", "I", "was", "just", "thinking", "about", "the", "weather"]
    assert spoken["edge"] == spoken["espeak"] == [*words, "It", "is", "sunny", "and", "warm"]


async def test_a_voice_list_without_edge_is_said_once(
    start_server: ServerFactory, fake: FakeEdge, caplog: pytest.LogCaptureFixture
) -> None:
    """While Edge's voice list fails, voice lists hold the offline voices, and the log
    says so once, not at every request; once when Edge's voices are back."""
    caplog.set_level(logging.INFO, logger="ttsstream.core.router")
    fake.refuse_voices_status = 503
    async with connected(await start_server()) as client:
        for _ in range(5):
            await client.send({"type": "voices"})
            voices = (await client.next_loose())["voices"]
            assert voices and {voice["engine"] for voice in voices} == {"espeak"}
        fake.refuse_voices_status = None
        for _ in range(2):
            await client.send({"type": "voices"})
            voices = (await client.next_loose())["voices"]
            assert {voice["engine"] for voice in voices} == {"edge", "espeak"}
    said = [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "ttsstream.core.router" and record.getMessage().startswith("voice list: ")
    ]
    assert said == [
        (
            "WARNING",
            "voice list: Edge unavailable (upstream_unavailable), offline voices only "
            "until it answers",
        ),
        ("INFO", "voice list: Edge's voices listed again"),
    ], said
