"""The HTTP door on the WebSocket's port: one port for both protocols, and its answers."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.conftest import TIMEOUT, ServerFactory, connected, speaks_fine
from ttsstream import port
from ttsstream.server import Server


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
    """A head that never ends is dropped after HEAD_TIMEOUT; one over 16 KiB gets 431."""
    monkeypatch.setattr(port, "HEAD_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n" + b"X-Junk: " + b"j" * port.MAX_HEAD_BYTES + b"\r\n")
    answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "bad_request"
    writer.close()
    async with connected(server) as client:
        await speaks_fine(client)
