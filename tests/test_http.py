"""The HTTP door on the WebSocket's port: one port for both protocols, and its answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.conftest import (
    TIMEOUT,
    Client,
    ServerFactory,
    connected,
    eventually,
    speaks_fine,
    url_of,
)
from ttsstream import port
from ttsstream.server import STREAM_PATH, Server


def http_of(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


async def test_one_port_serves_http_with_keep_alive_and_websockets(server: Server) -> None:
    """Plain requests on one kept-alive connection and a WebSocket share the port."""
    opened = []

    async def on_connection(*_: object) -> None:
        opened.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_connection)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        for path, status in [("/", 200), ("/nope", 404), ("/clients/ttsstream.js", 200)]:
            async with session.get(http_of(server) + path) as response:
                assert response.status == status
                assert response.headers["Server"] == "ttsstream"  # no versions given away
                await response.read()
    assert len(opened) == 1  # one connection, kept alive
    async with connected(server) as client:
        await speaks_fine(client)


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("POST", "/v1/stream", 405, "method_not_allowed"),
        ("GET", "/v1/stream", 426, "upgrade_required"),
    ],
)
async def test_other_requests_get_json_errors(
    server: Server, method: str, path: str, status: int, code: str
) -> None:
    """Unknown paths, wrong methods and a WebSocket endpoint without an upgrade: JSON errors."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, http_of(server) + path) as response,
    ):
        assert response.status == status
        assert response.content_type == "application/json"
        body = orjson.loads(await response.read())
        assert body["error"] == code and body["message"]


async def test_a_refused_websocket_is_explained_over_http(start_server: ServerFactory) -> None:
    """GET /v1/stream without an upgrade is judged like a handshake: 401 without a key."""
    server = await start_server(api_keys=("k" * 16,))
    async with aiohttp.ClientSession() as session:
        async with session.get(http_of(server) + "/v1/stream") as response:
            assert response.status == 401
            assert orjson.loads(await response.read())["error"] == "unauthorized"
        async with session.get(http_of(server) + "/v1/stream?api_key=" + "k" * 16) as response:
            assert response.status == 426
    assert server.services.admission.connections.total == 0  # nothing left counted


async def test_a_slow_request_head_is_bounded_in_time_and_size(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head that never ends gets 408 after HEAD_TIMEOUT; one over 16 KiB gets 431."""
    monkeypatch.setattr(port, "HEAD_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "head_timeout"
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n" + b"X-Junk: " + b"j" * port.MAX_HEAD_BYTES + b"\r\n")
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "head_too_large"
    writer.close()
    async with connected(server) as client:
        await speaks_fine(client)


async def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request on a kept-alive socket; read its whole answer (Content-Length)."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, request)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT)
        assert chunk, "the server closed the connection"
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    async def more() -> None:
        nonlocal body
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT)
        assert chunk, "the server closed the connection"
        body += chunk

    if headers.get("transfer-encoding") == "chunked":
        decoded = b""
        while True:
            while b"\r\n" not in body:
                await more()
            size_line, body = body.split(b"\r\n", 1)
            size = int(size_line, 16)
            while len(body) < size + 2:
                await more()
            decoded, body = decoded + body[:size], body[size + 2 :]
            if size == 0:
                return int(lines[0].split()[1]), headers, decoded
    length = int(headers["content-length"])
    while len(body) < length:
        await more()
    return int(lines[0].split()[1]), headers, body


async def _kept_alive(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    return sock


async def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (end of stream or reset) within TIMEOUT."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), TIMEOUT) == b""
    except ConnectionError:
        return True


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def test_a_kept_alive_connection_becomes_a_websocket(server: Server) -> None:
    """The demo page's sequence on one connection (as a proxy's upstream keep-alive
    reuses it): GET /, its script, then the WebSocket handshake, which is accepted."""
    for _ in range(3):
        sock = await _kept_alive(server)
        for path in ("/", "/clients/ttsstream.js", "/nope"):
            status, headers, _ = await _exchange(sock, _get(path))
            assert status in (200, 404) and headers.get("connection") != "close"
        assert server.stats.http_connections == 1
        async with connect(url_of(server), sock=sock) as ws:
            client = Client(ws)
            client.hello = await client.recv_message()
            await speaks_fine(client)
            assert server.stats.http_connections == 0  # it is a WebSocket now
            assert server.stats.connections == 1
    assert server.services.admission.sockets.total == 0


async def test_a_post_body_then_a_websocket_on_one_connection(server: Server) -> None:
    """A request with a body, then the handshake: the front finds the next head."""
    sock = await _kept_alive(server)
    body = b'{"text": 5}'
    request = (
        b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    status, _, answer = await _exchange(sock, request)
    assert status == 400 and orjson.loads(answer)["error"] == "bad_message"
    async with connect(url_of(server), sock=sock) as ws:
        client = Client(ws)
        client.hello = await client.recv_message()
        await speaks_fine(client)


@pytest.mark.parametrize(
    "request_bytes",
    [
        # A later head over 16 KiB, in one piece and sent as one line after another.
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Junk: " + b"j" * (port.MAX_HEAD_BYTES + 1) + b"\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-J%d: %s\r\n" % (n, b"j" * 4000) for n in range(6))
        + b"\r\n",
    ],
)
async def test_a_later_head_is_bounded_in_size(server: Server, request_bytes: bytes) -> None:
    """The second request's head on a kept-alive connection is held to 16 KiB too."""
    sock = await _kept_alive(server)
    assert (await _exchange(sock, _get("/")))[0] == 200
    status, headers, body = await _exchange(sock, request_bytes)
    assert status == 431 and headers["server"] == "ttsstream"
    assert orjson.loads(body)["error"] == "head_too_large"
    assert await _closed_by_server(sock)
    sock.close()


async def test_a_first_head_over_the_limit_in_one_read_is_refused(server: Server) -> None:
    """A whole 24 KB head arriving at once is refused, not only one that trickles."""
    sock = await _kept_alive(server)
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * 24_000 + b"\r\n\r\n"
    status, _, body = await _exchange(sock, request)
    assert status == 431 and orjson.loads(body)["error"] == "head_too_large"
    sock.close()


async def test_a_later_head_has_a_deadline(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second head sent a byte at a time gets 408 HEAD_TIMEOUT after its first byte,
    and its connection closes."""
    monkeypatch.setattr(port, "HEAD_TIMEOUT", 0.3)
    sock = await _kept_alive(server)
    loop = asyncio.get_running_loop()
    assert (await _exchange(sock, _get("/")))[0] == 200
    answer = b""
    with contextlib.suppress(ConnectionError):
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 10_000:
            await loop.sock_sendall(sock, bytes([byte]))
            with contextlib.suppress(TimeoutError):
                answer += await asyncio.wait_for(loop.sock_recv(sock, 65536), 0.05)
            if answer:
                break
    with contextlib.suppress(ConnectionError):  # the rest of the answer, then its end
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "head_timeout"
    sock.close()


async def test_idle_http_connections_are_counted_capped_and_closed(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 kept-alive connections from one client: MAX_CONNECTIONS_PER_IP of them are
    served and counted in /stats, the rest refused (429 while MAX_LINGERING_REFUSALS
    wait to be read, dropped past that); the served ones close after IDLE_TIMEOUT,
    and nothing stays counted."""
    monkeypatch.setattr(port, "REFUSAL_LINGER", TIMEOUT)  # every answer is read in time
    server = await start_server(
        trusted_proxies=("10.255.255.1",),  # 127.0.0.1 is a client like any other here
        max_connections_per_ip=5,
        # Time enough to open 300 connections and ask on each (on a loaded machine too),
        # within TIMEOUT.
        idle_timeout=TIMEOUT * 0.4,
        rate_limit_requests=0,
    )
    socks = [await _kept_alive(server) for _ in range(300)]
    served, answered, dropped = [], 0, 0
    for sock in socks:
        try:
            status, _, body = await _exchange(sock, _get("/nope"))
        except (AssertionError, ConnectionError):
            dropped += 1
            continue
        if status == 404:
            served.append(sock)
        else:
            assert status == 429 and orjson.loads(body)["error"] == "too_many_connections"
            answered += 1
    assert len(served) == 5
    assert answered == port.MAX_LINGERING_REFUSALS and dropped == 295 - answered
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.ops.port}/stats") as response:
            assert (await response.json())["http_connections"] == 5
        async with session.get(f"http://127.0.0.1:{server.ops.port}/metrics") as response:
            assert "ttsstream_http_connections 5.0" in await response.text()
    loop = asyncio.get_running_loop()
    for sock in served:  # closed by the server once idle
        assert await asyncio.wait_for(loop.sock_recv(sock, 1), TIMEOUT) == b""
    for sock in socks:
        sock.close()
    await eventually(
        lambda: server.services.admission.sockets.total == 0, what="every connection uncounted"
    )
    assert server.stats.http_connections == 0
    async with connected(server) as client:
        await speaks_fine(client)


@pytest.mark.parametrize(
    "request_bytes",
    [
        # A POST asking for an upgrade: answered, not dropped.
        b"POST /tts HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b'Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{"text": "Hello"}',
        # A handshake with bytes behind it before its answer.
        b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        b"garbage",
    ],
)
@pytest.mark.parametrize("later", [False, True], ids=["first", "later"])
async def test_a_bad_upgrade_is_answered(server: Server, request_bytes: bytes, later: bool) -> None:
    """An upgrade that cannot be taken, as a connection's first request or a later one,
    gets a JSON 400, then the connection closes."""
    sock = await _kept_alive(server)
    if later:
        assert (await _exchange(sock, _get("/")))[0] == 200
    status, _, body = await _exchange(sock, request_bytes)
    assert status == 400 and orjson.loads(body)["error"] == "bad_request"
    assert await _closed_by_server(sock)
    sock.close()


async def test_malformed_requests_log_one_line_without_traceback(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Many requests that are not HTTP: each gets a JSON 400; the log gets one line."""
    caplog.set_level(logging.INFO)
    for _ in range(50):
        sock = await _kept_alive(server)
        status, headers, body = await _exchange(sock, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        assert status == 400 and orjson.loads(body)["error"] == "bad_request"
        assert headers["server"] == "ttsstream"  # no versions given away
        sock.close()
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


_HANDSHAKE = (
    b"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_a_handshake_inside_a_pipelined_body_is_body(server: Server) -> None:
    """Pipelined requests whose body holds what looks like a chunked end and a handshake:
    aiohttp frames them, so the handshake's bytes stay body and nothing is upgraded."""
    sock = await _kept_alive(server)
    loop = asyncio.get_running_loop()
    part = b"xxxx0\r\n\r\n"
    await loop.sock_sendall(
        sock,
        b"POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
        b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(part) + len(_HANDSHAKE), part),
    )
    received = b""

    async def answered(count: int) -> None:
        nonlocal received
        while received.count(b"HTTP/1.1 404") < count:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT)
            assert chunk
            received += chunk

    await answered(2)  # both requests are handled; the body's rest comes apart
    await loop.sock_sendall(sock, _HANDSHAKE + _get("/nope"))
    await answered(3)  # the request after the body is HTTP too
    assert b"101 Switching Protocols" not in received
    assert server.stats.connections == 0
    sock.close()


async def test_a_body_in_pieces_after_a_refusal_still_lets_the_connection_upgrade(
    start_server: ServerFactory,
) -> None:
    """A request refused before its body was read (401), the body arriving in two
    pieces, then a handshake with the key on the same connection: it is accepted."""
    key = "k" * 16
    server = await start_server(api_keys=(key,))
    sock = await _kept_alive(server)
    loop = asyncio.get_running_loop()
    body = orjson.dumps({"text": "hello " * 3000})
    await loop.sock_sendall(
        sock,
        b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:1400]),
    )
    await asyncio.sleep(0.05)  # the second piece comes in a later read
    status, _, answer = await _exchange(sock, body[1400:])
    assert status == 401 and orjson.loads(answer)["error"] == "unauthorized"
    async with connect(url_of(server, f"{STREAM_PATH}?api_key={key}"), sock=sock) as ws:
        client = Client(ws)
        client.hello = await client.recv_message()
        await speaks_fine(client)


async def test_refused_connections_hold_few_file_descriptors(
    start_server: ServerFactory,
) -> None:
    """Connections over MAX_CONNECTIONS that send nothing: at most MAX_LINGERING_REFUSALS
    wait for their heads, the others are dropped at once."""
    server = await start_server(max_connections=2, rate_limit_requests=0)
    held = [await _kept_alive(server) for _ in range(2)]
    refused = [await _kept_alive(server) for _ in range(3 * port.MAX_LINGERING_REFUSALS)]
    fronts = server._front.fronts
    await eventually(
        lambda: server.services.admission.sockets.total == 2 and fronts.lingering,
        what="two connections held, refusals lingering",
    )
    assert 0 < fronts.lingering <= port.MAX_LINGERING_REFUSALS
    loop = asyncio.get_running_loop()
    for sock in refused:  # answered 503 then closed, or dropped at once
        answer = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT):
                answer += chunk
        assert answer == b"" or answer.startswith(b"HTTP/1.1 503 ")
        sock.close()
    for sock in held:
        sock.close()


async def test_closing_the_server_ends_every_connection(start_server: ServerFactory) -> None:
    """A connection mid-way through its first head and a kept-alive HTTP connection are
    both closed, and uncounted, when the server has closed."""
    server = await start_server()
    loop = asyncio.get_running_loop()
    partial = await _kept_alive(server)
    await loop.sock_sendall(partial, b"GET / HTTP/1.1\r\nHost: x\r\n")
    kept = await _kept_alive(server)
    assert (await _exchange(kept, _get("/")))[0] == 200
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    assert server.services.admission.sockets.total == 0
    assert server.stats.http_connections == 0
    for sock in (partial, kept):
        assert await _closed_by_server(sock)
        sock.close()


async def test_a_page_can_read_why_its_connection_was_refused(start_server: ServerFactory) -> None:
    """A connection over MAX_CONNECTIONS_PER_IP from an allowed origin's page gets its
    429 with the headers that let the page read it (the browser client asks why its
    WebSocket failed); another origin's gets none."""
    page = "https://app.example"
    server = await start_server(
        trusted_proxies=("10.255.255.1",),
        max_connections_per_ip=1,
        allowed_origins=(page,),
        rate_limit_requests=0,
    )
    held = await _kept_alive(server)
    for origin, readable in ((page, True), ("https://other.example", False)):
        sock = await _kept_alive(server)
        request = f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\r\n".encode()
        status, headers, body = await _exchange(sock, request)
        assert status == 429 and orjson.loads(body)["error"] == "too_many_connections"
        assert (headers.get("access-control-allow-origin") == origin) is readable
        assert headers["server"] == "ttsstream"
        sock.close()
    held.close()


def _cjk_tts_get(characters: int) -> bytes:
    """``GET /tts?text=`` of ``characters`` CJK characters, percent-encoded (9 bytes each)."""
    text = quote("語" * characters)
    return f"GET /tts?text={text} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


@pytest.mark.parametrize("later", [False, True], ids=["first", "later"])
async def test_a_get_of_the_longest_text_fits_the_request_line(
    start_server: ServerFactory, later: bool
) -> None:
    """``<audio src="/tts?text=…">`` with MAX_TEXT_LENGTH CJK characters is spoken, as a
    connection's first request or a later one; a line past the limit gets 431
    head_too_large in JSON (whose length is its Content-Length), and no traceback."""
    server = await start_server(max_text_length=2000)
    limit = port.request_line_limit(2000)
    sock = await _kept_alive(server)
    if later:
        assert (await _exchange(sock, _get("/")))[0] == 200
    status, headers, body = await _exchange(sock, _cjk_tts_get(2000))
    assert status == 200 and headers["content-type"] == "audio/mpeg" and body
    too_long = b"GET /tts?text=" + b"a" * limit + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    status, headers, body = await _exchange(sock, too_long)
    assert status == 431 and int(headers["content-length"]) == len(body)
    assert orjson.loads(body)["error"] == "head_too_large"
    assert await _closed_by_server(sock)
    sock.close()


async def test_a_head_over_the_limit_in_pieces_is_answered_in_json(server: Server) -> None:
    """Header fields past 16 KiB sent a line at a time: 431 head_too_large, a body as
    long as its Content-Length."""
    sock = await _kept_alive(server)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: x\r\n")
    answer = b""
    with contextlib.suppress(ConnectionError):
        for n in range(10):
            await loop.sock_sendall(sock, b"X-J%d: %s\r\n" % (n, b"j" * 4000))
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), TIMEOUT):
            answer += chunk
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 431 ")
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    assert length == len(body) and orjson.loads(body)["error"] == "head_too_large"
    sock.close()
