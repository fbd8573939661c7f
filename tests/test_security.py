"""Handshake security and abuse limits through a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State
from websockets.typing import Subprotocol

from tests.conftest import TIMEOUT, Client, Clock, ServerFactory, connected, eventually, url_of
from tests.fake_edge import FakeEdge
from tests.processes import LISTENING, environment, run, start_process
from ttsstream.server import Server
from ttsstream.stats import Stats

KEY = "s3cret-Key_123"
OTHER_KEY = "rotated-key-456"


async def refused(url: str, **options: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Open a handshake that must be refused; its status, JSON body and headers."""
    with pytest.raises(InvalidStatus) as raised:
        async with connect(url, **options):
            pass
    response = raised.value.response
    return response.status_code, orjson.loads(response.body), dict(response.headers.raw_items())


async def speaks(ws: ClientConnection) -> None:
    client = Client(ws)
    client.hello = await client.recv_message()
    await client.speak("Let me in.")
    assert (await client.until_final("u1")).final["type"] == "end"


@pytest.fixture
async def keyed(start_server: ServerFactory) -> Server:
    """A server that requires one of two keys."""
    return await start_server(api_keys=(KEY, OTHER_KEY))


@pytest.mark.parametrize(
    "options",
    [
        {"additional_headers": {"X-API-Key": KEY}},
        {"additional_headers": {"Authorization": f"Bearer {KEY}"}},
        {"additional_headers": {"X-API-Key": OTHER_KEY}},
        {"subprotocols": ["ttsstream.v1", f"key.{KEY}"]},
        {"path": f"?api_key={KEY}"},
    ],
    ids=["x-api-key", "bearer", "rotated", "subprotocol", "query"],
)
async def test_every_credential_form_is_accepted(keyed: Server, options: dict[str, Any]) -> None:
    """Each documented way of sending a key gets in and can speak."""
    url = url_of(keyed) + options.pop("path", "")
    async with connect(url, **options) as ws:
        if "subprotocols" in options:
            assert ws.subprotocol == "ttsstream.v1"  # never the key
            assert ws.response is not None
            assert ws.response.headers["Sec-WebSocket-Protocol"] == "ttsstream.v1"
        await speaks(ws)


#: Wrong keys a request that tries many at once offers beside a right one.
MANY_GUESSES = 500


@pytest.mark.parametrize(
    "options",
    [
        {"additional_headers": [("X-API-Key", KEY), ("X-API-Key", OTHER_KEY)]},
        {
            "additional_headers": [("X-API-Key", f"guess-{n}") for n in range(100)]
            + [("Authorization", f"Bearer {KEY}")]
        },
        {
            "subprotocols": ["ttsstream.v1"]
            + [f"key.guess-{n}" for n in range(MANY_GUESSES)]
            + [f"key.{KEY}"]
        },
        {
            "additional_headers": {"X-API-Key": "wrong"},
            "subprotocols": ["ttsstream.v1", f"key.{KEY}"],
        },
        {"additional_headers": {"Authorization": f"Bearer {KEY}"}, "path": f"?api_key={OTHER_KEY}"},
    ],
    ids=[
        "two-valid-headers",
        "many-headers",
        "many-subprotocols",
        "header-and-subprotocol",
        "bearer-and-query",
    ],
)
async def test_one_key_per_request(keyed: Server, options: dict[str, Any]) -> None:
    """A handshake that offers two different keys, in any forms, gets 400 ambiguous_key
    and no upgrade, even when one of them is right."""
    url = url_of(keyed) + options.pop("path", "")
    status, body, _ = await refused(url, **options)
    assert (status, body["error"]) == (400, "ambiguous_key")
    assert keyed.stats.auth_failures == 1


async def test_the_same_key_in_several_forms_is_one_key(keyed: Server) -> None:
    """One key repeated in every form (headers, subprotocol, query) opens the server."""
    async with connect(
        url_of(keyed) + f"?api_key={KEY}",
        additional_headers=[
            ("X-API-Key", KEY),
            ("X-API-Key", KEY),
            ("Authorization", f"Bearer {KEY}"),
        ],
        subprotocols=[Subprotocol(p) for p in ("ttsstream.v1", f"key.{KEY}", f"key.{KEY}")],
    ) as ws:
        await speaks(ws)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"additional_headers": {"X-API-Key": "wrong"}},
        {"additional_headers": {"X-API-Key": KEY[:-1]}},
        {"additional_headers": {"Authorization": f"Basic {KEY}"}},
        {"subprotocols": ["ttsstream.v1", "key.wrong"]},
        {"path": "?api_key="},
        {"path": f"?apikey={KEY}"},
    ],
    ids=["none", "wrong", "prefix", "basic", "subprotocol", "empty_query", "misspelt"],
)
async def test_wrong_credentials_get_401_and_no_upgrade(
    keyed: Server, options: dict[str, Any]
) -> None:
    """Without a valid key the handshake is answered 401 with a JSON body."""
    url = url_of(keyed) + options.pop("path", "")
    status, body, headers = await refused(url, **options)
    assert status == 401
    assert body["error"] == "unauthorized"
    assert headers["Content-Type"] == "application/json"
    assert "Upgrade" not in headers
    assert keyed.stats.auth_failures == 1


async def test_keys_never_reach_the_logs(fake: FakeEdge, tmp_path: Path) -> None:
    """With LOG_LEVEL=DEBUG, no key, right or wrong, appears in anything the server prints."""
    wrong = "WrongGuess987"
    env = environment(
        fake, TTS_API_KEY=f"{KEY},{OTHER_KEY}", LOG_LEVEL="DEBUG", CACHE_DIR=str(tmp_path)
    )
    process = await start_process(
        [sys.executable, "-m", "ttsstream"], env, tmp_path, access_log=True
    )
    assert process.stderr is not None
    said = b""
    while not (match := LISTENING.search(said)):
        said += await asyncio.wait_for(process.stderr.readline(), TIMEOUT)
    url = f"ws://127.0.0.1:{match.group(1).decode()}/v1/stream"
    try:
        for options in (
            {"additional_headers": {"X-API-Key": KEY}},
            {"additional_headers": {"Authorization": f"Bearer {KEY}"}},
            {"subprotocols": ["ttsstream.v1", f"key.{OTHER_KEY}"]},
        ):
            async with connect(url, **options) as ws:
                await speaks(ws)
        async with connect(f"{url}?api_key={KEY}") as ws:
            await speaks(ws)
        for options in (
            {"additional_headers": {"X-API-Key": wrong}},
            {"subprotocols": ["ttsstream.v1", f"key.{wrong}"]},
        ):
            await refused(url, **options)
        await refused(f"{url}?api_key={wrong}")
    finally:
        process.send_signal(signal.SIGTERM)
        rest, out = await asyncio.wait_for(
            asyncio.gather(process.stderr.read(), process.stdout.read()),  # type: ignore[union-attr]
            TIMEOUT,
        )
        await process.wait()
    log = (said + rest + out).decode()
    assert "handshake_refused" in log and "unauthorized" in log and "api_key=[redacted]" in log
    assert "utterance" in log  # the log was really captured at DEBUG
    for secret in (KEY, OTHER_KEY, wrong):
        assert secret not in log


async def test_key_not_in_in_process_log_records(
    keyed: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """No log record of any logger holds the key, in its message or its arguments."""
    caplog.set_level(logging.DEBUG)
    async with connect(url_of(keyed) + f"?api_key={KEY}") as ws:
        await speaks(ws)
    await refused(url_of(keyed), subprotocols=["ttsstream.v1", f"key.{KEY}x"])
    assert caplog.records
    server_records = [r for r in caplog.records if r.name.startswith("ttsstream")]
    assert server_records  # (the test's own client logs its request line; that is not ours)
    for record in server_records:
        assert KEY not in record.getMessage()
        assert KEY not in repr(record.args)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://app.example.com", True),
        ("https://app.example.com/", True),
        ("https://evil.example.com", False),
        ("http://app.example.com", False),
        ("null", False),
        (None, True),
    ],
)
async def test_origins(start_server: ServerFactory, origin: str | None, allowed: bool) -> None:
    """Listed origins and origin-less clients get in; any other browser origin gets 403."""
    server = await start_server(allowed_origins=("https://app.example.com",))
    headers = {"Origin": origin} if origin is not None else {}
    if allowed:
        async with connect(url_of(server), origin=None, additional_headers=headers) as ws:
            await speaks(ws)
    else:
        status, body, _ = await refused(url_of(server), additional_headers=headers)
        assert (status, body["error"]) == (403, "origin_not_allowed")
        assert server.stats.origin_rejected == 1


async def test_star_allows_every_origin(start_server: ServerFactory) -> None:
    """ALLOWED_ORIGINS=* is the same as no list."""
    server = await start_server(allowed_origins=None)
    headers = {"Origin": "https://anywhere.example"}
    async with connect(url_of(server), additional_headers=headers) as ws:
        await speaks(ws)


async def limited_server(start_server: ServerFactory, **settings: Any) -> tuple[Server, Clock]:
    clock = Clock()
    server = await start_server(**settings)
    server.services.admission.limiter._clock = clock  # the test moves time; nothing sleeps
    return server, clock


async def test_speak_and_handshake_limits_say_when_to_retry(
    start_server: ServerFactory,
) -> None:
    """Past RATE_LIMIT_REQUESTS, speak gets rate_limited with retry_after and the connection
    stays; a handshake gets 429 with the same Retry-After; the window slides."""
    server, clock = await limited_server(start_server, rate_limit_requests=3, rate_limit_window=60)
    async with connected(server) as client:  # 1: the handshake
        await client.speak("One.", id="a")  # 2
        await client.until_final("a")
        clock.now += 10
        await client.speak("Two.", id="b")  # 3
        await client.until_final("b")
        clock.now += 5
        await client.speak("Three.", id="c")  # refused
        error = (await client.until_final("c")).final
        assert (error["code"], error["retry_after"]) == ("rate_limited", 45)

        status, body, headers = await refused(url_of(server))
        assert (status, body["error"], headers["Retry-After"]) == (429, "rate_limited", "45")

        clock.now += 45.5  # the handshake's hit has left the window
        await client.speak("Four.", id="d")
        assert (await client.until_final("d")).final["type"] == "end"
    assert server.stats.rate_limited == 2


async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    start_server: ServerFactory,
) -> None:
    """Behind a trusted proxy each forwarded client has its own limit; from an untrusted peer
    the header changes nothing."""
    trusted, _ = await limited_server(start_server, rate_limit_requests=1)
    for ip in ("198.51.100.1", "198.51.100.2"):
        async with connect(url_of(trusted), additional_headers={"X-Forwarded-For": ip}):
            pass
    status, _, _ = await refused(url_of(trusted), additional_headers={"X-Forwarded-For": ip})
    assert status == 429

    untrusted, _ = await limited_server(
        start_server, rate_limit_requests=1, trusted_proxies=("192.0.2.1",)
    )
    async with connect(url_of(untrusted), additional_headers={"X-Forwarded-For": "1.1.1.1"}):
        pass
    status, _, _ = await refused(
        url_of(untrusted), additional_headers={"X-Forwarded-For": "2.2.2.2"}
    )
    assert status == 429  # both were 127.0.0.1, whatever they claimed


async def test_connection_caps(start_server: ServerFactory) -> None:
    """The next connection past MAX_CONNECTIONS_PER_IP gets 429, past MAX_CONNECTIONS 503;
    closed connections free their slots."""
    server = await start_server(max_connections_per_ip=2, max_connections=3)
    a = await connect(url_of(server), additional_headers={"X-Forwarded-For": "198.51.100.1"})
    b = await connect(url_of(server), additional_headers={"X-Forwarded-For": "198.51.100.1"})
    status, body, _ = await refused(
        url_of(server), additional_headers={"X-Forwarded-For": "198.51.100.1"}
    )
    assert (status, body["error"]) == (429, "too_many_connections")
    c = await connect(url_of(server), additional_headers={"X-Forwarded-For": "198.51.100.2"})
    status, body, _ = await refused(
        url_of(server), additional_headers={"X-Forwarded-For": "198.51.100.3"}
    )
    assert (status, body["error"]) == (503, "server_full")
    await a.close()
    await eventually(lambda: server.services.admission.connections.total < 3, what="a place freed")
    async with connect(url_of(server), additional_headers={"X-Forwarded-For": "198.51.100.1"}) as d:
        await speaks(d)
    await b.close()
    await c.close()


async def test_idle_connection_is_closed_but_a_speaking_one_is_not(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """No message for IDLE_TIMEOUT closes with 1000 "idle"; a long utterance is not idleness."""
    idle_timeout = TIMEOUT * 0.06  # short, yet time enough to send a speak after the hello
    server = await start_server(idle_timeout=idle_timeout)
    fake.pause_after_chunks = 1
    async with connected(server) as client:
        await client.speak("A slow utterance outlasts the idle timeout.")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await asyncio.sleep(idle_timeout * 2)
        fake.resume.set()
        assert (await client.until_final("u1")).final["type"] == "end"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.ws.recv(), TIMEOUT)
        assert (client.ws.close_code, client.ws.close_reason) == (1000, "idle")


async def test_client_that_does_not_read_is_closed_with_1008(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """A client that leaves its audio unread past SEND_TIMEOUT is closed with 1008."""
    server = await start_server(send_timeout=0.5)
    text = " ".join(["A long text whose audio this client will never read."] * 60)
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    async with connect(url_of(server), sock=sock, max_queue=1) as ws:
        (server_side,) = server.connections
        server_side.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 32768
        )
        await ws.send(json.dumps({"type": "speak", "text": text}))
        await eventually(lambda: server_side.state is not State.OPEN, what="the server closing it")
        received = 0
        with pytest.raises(ConnectionClosed):
            while True:
                frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
                received += len(frame)
        assert ws.close_code == 1008 and ws.close_reason == "client too slow"
        assert 0 < received < len(fake.records[0].audio)
        await asyncio.wait_for(server_side.wait_closed(), TIMEOUT)


@pytest.mark.parametrize(
    "text",
    [
        "<speak>Hello</speak>",
        "</prosody></voice><voice name='en-US-GuyNeural'><prosody rate='+90%'>Hijacked",
        "Tom &amp; Jerry & co &lt;3 &#x41; &unknown;",
        "<![CDATA[ x ]]> <!-- comment --> <?xml version='1.0'?>",
        "\" ' > < &",
    ],
)
async def test_markup_in_text_is_spoken_literally(
    client: Client, fake: FakeEdge, text: str
) -> None:
    """SSML or XML in the text reaches the upstream as plain text: voice and prosody stay."""
    await client.speak(text, voice="en-US-AriaNeural", rate="+0%", cleanup="none")
    result = await client.until_final("u1")
    assert result.final["type"] in ("end", "error")
    (record,) = fake.records
    assert record.voice == "Microsoft Server Speech Text to Speech Voice (en-US, AriaNeural)"
    assert (record.rate, record.volume, record.pitch) == ("+0%", "+0%", "+0Hz")
    assert record.text == text


async def test_fuzzing_never_breaks_the_server(
    start_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Thousands of random and hostile frames over many connections: the server still speaks,
    never closes with 1011 and logs no unhandled exception."""
    caplog.set_level(logging.WARNING)
    server = await start_server(rate_limit_requests=0, max_connections_per_ip=1000)
    rng = random.Random(20261126)
    close_codes: list[int | None] = []

    def hostile() -> str | bytes | list[str]:
        kind = rng.randrange(9)
        if kind == 0:
            return rng.randbytes(rng.randrange(1, 2000))
        if kind == 1:
            return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(1, 300)))
        if kind == 2:
            depth = rng.choice([10, 1000, 5000, 20000])
            return "[" * depth + "]" * depth
        if kind == 3:
            return json.dumps({"type": "speak", "text": "x" * rng.choice([1, 5001, 60000])})
        if kind == 4:
            field = rng.choice(["type", "id", "text", "voice", "rate", "volume", "pitch"])
            value: object = rng.choice([None, 1, 1.5, True, [], {}, "", "x" * 100, "\u0000", "+1%"])
            return json.dumps({"type": "speak", "text": "hi", field: value})
        if kind == 5:
            return json.dumps({"type": rng.choice(["cancel", "voices", "nope"]), "id": "x"})
        if kind == 6:
            return ['{"type":', '"speak",', '"text":"frag"}']  # a fragmented message
        if kind == 7:
            return "x" * rng.choice([70_000, 200_000])  # over the frame limit
        return rng.randbytes(8).hex()

    sent = 0

    async def fuzz(connection_number: int) -> None:
        nonlocal sent
        frames = 0
        while frames < 300:
            ws = await connect(url_of(server), max_size=None)
            try:
                while frames < 300:
                    frame = hostile()
                    frames += 1
                    if connection_number % 3 == 0 and isinstance(frame, bytes):
                        # Invalid UTF-8 in a text frame: websockets closes with 1007.
                        await ws.send(frame, text=True)
                    else:
                        await ws.send(frame)
                    with contextlib.suppress(TimeoutError):
                        while True:
                            await asyncio.wait_for(ws.recv(), 0.001)
            except ConnectionClosed:
                pass
            finally:
                await ws.close()
                close_codes.append(ws.close_code)
        sent += frames

    await asyncio.wait_for(asyncio.gather(*(fuzz(n) for n in range(12))), TIMEOUT * 12)
    assert sent == 3600
    assert 1011 not in close_codes
    assert set(close_codes) <= {1000, 1007, 1009}, close_codes
    async with connected(server) as client:
        await client.speak("Still standing.")
        assert (await client.until_final("u1")).final["type"] == "end"
    unhandled = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert unhandled == [], [r.getMessage() for r in unhandled]


def test_stats_count_refusals() -> None:
    """The refusal counters exist on the one stats object."""
    snapshot = Stats(rate_limited=2, auth_failures=3, origin_rejected=1).snapshot()
    assert (snapshot["rate_limited"], snapshot["auth_failures"], snapshot["origin_rejected"]) == (
        2,
        3,
        1,
    )


async def test_say_sends_its_api_key(keyed: Server, tmp_path: Path) -> None:
    """ttsstream say --api-key gets in; without it the server's 401 is reported."""

    base = [
        sys.executable,
        "-m",
        "ttsstream",
        "say",
        "Keyed.",
        "-o",
        "k.mp3",
        "--url",
        url_of(keyed),
    ]
    status, stderr = await run([*base, "--api-key", KEY], cwd=tmp_path)
    assert status == 0, stderr
    status, stderr = await run(base, cwd=tmp_path)
    assert status == 1 and "HTTP 401" in stderr


async def test_refusals_tell_allowed_browser_pages_why(start_server: ServerFactory) -> None:
    """A refused handshake from an allowed origin carries CORS headers, so the browser
    client can read the status and say why; a refused origin gets none."""
    server = await start_server(api_keys=(KEY,), allowed_origins=("https://app.example.com",))
    _, _, headers = await refused(
        url_of(server), additional_headers={"Origin": "https://app.example.com"}
    )
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert headers["Vary"] == "Origin"
    status, _, headers = await refused(
        url_of(server), additional_headers={"Origin": "https://evil.example.com"}
    )
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
