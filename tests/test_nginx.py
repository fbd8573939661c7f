"""The shipped nginx config, for real: nginx in front of two server processes.

nginx (Debian's package; ``.ci/run`` installs it) runs in the foreground with a
config generated from ``nginx/ttsstream.conf``: only the listen ports, the
upstream instances, file paths, the certificate (made by openssl here) and the
proxy timeouts (shortened, with a shorter ping interval) are swapped; every
proxy directive is the shipped one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.conftest import TIMEOUT, Client, eventually
from tests.fake_edge import FakeEdge
from tests.processes import serve_process, stop
from tests.redis_server import RedisServer
from tests.test_resume import Listener

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "nginx" / "ttsstream.conf"
#: The instances on one host, as a host install copies it beside the site.
UPSTREAM = ROOT / "nginx" / "upstream.conf"


def shipped() -> str:
    """The site config and its upstream, as nginx reads them (both in http {})."""
    return UPSTREAM.read_text() + "\n" + SHIPPED.read_text()


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
#: The proxy read/send timeout of the test nginx, and the servers' ping interval below it.
READ_TIMEOUT = 2
PING_INTERVAL = 0.5
#: Handshakes + speaks per client IP per window, per instance.
LIMIT = 2


def certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def site_config(
    *,
    http_port: int,
    https_port: int,
    instances: list[int],
    cert: Path,
    key: Path,
    webroot: Path,
    read_timeout: int | None = None,
) -> str:
    """The shipped site config with ports, paths, TLS files and timeouts swapped."""
    text = shipped()
    swaps = {
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;": "",
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "listen [::]:443 ssl;": "",
        "/etc/letsencrypt/live/tts.example.com/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/tts.example.com/privkey.pem": str(key),
        "/var/www/letsencrypt": str(webroot),
    }
    if read_timeout is not None:
        swaps["proxy_read_timeout 75s;"] = f"proxy_read_timeout {read_timeout}s;"
        swaps["proxy_send_timeout 75s;"] = f"proxy_send_timeout {read_timeout}s;"
    for old, new in swaps.items():
        assert old in text, f"the shipped config no longer has {old!r}"
        text = text.replace(old, new)
    blocks = re.findall(r"(?:^    server 127\.0\.0\.1:\d+ .*;\n)+", text, re.MULTILINE)
    assert len(blocks) == 2, "the shipped upstreams: least busy, and by client"
    assert all(block.count("\n") >= 2 for block in blocks), "several instances each"
    replacement = "".join(
        f"    server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;\n" for port in instances
    )
    for block in blocks:
        text = text.replace(block, replacement)
    return text


def main_config(directory: Path, site: Path) -> Path:
    """An nginx.conf that runs in the foreground with everything under ``directory``."""
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / name).mkdir(exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    config = directory / "nginx.conf"
    config.write_text(
        f"""
{user}
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    include {site};
}}
"""
    )
    return config


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_nginx_accepts_the_shipped_config(tmp_path: Path) -> None:
    """`nginx -t` passes on nginx/ttsstream.conf and nginx/upstream.conf as shipped,
    with test certificates."""
    assert Path(NGINX).exists(), "install Debian's nginx (apt-get install nginx)"
    cert, key = certificate(tmp_path)
    site = tmp_path / "ttsstream.conf"
    text = shipped()
    text = text.replace("/etc/letsencrypt/live/tts.example.com/fullchain.pem", str(cert))
    text = text.replace("/etc/letsencrypt/live/tts.example.com/privkey.pem", str(key))
    site.write_text(text)
    config = main_config(tmp_path, site)
    result = subprocess.run(
        [NGINX, "-t", "-c", str(config), "-p", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


@dataclass
class Stack:
    """nginx in front of two ttsstream processes."""

    url: str
    tls: ssl.SSLContext
    side_ports: list[str]
    instances: list[asyncio.subprocess.Process]
    directory: Path

    async def client(self, source: str = "127.0.0.2", **options: Any) -> ClientConnection:
        return await connect(
            self.url, ssl=self.tls, local_addr=(source, 0), ping_interval=None, **options
        )

    async def stats(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            results = []
            for side in self.side_ports:
                async with session.get(f"http://{side}/stats") as response:
                    results.append(await response.json())
            return results


@contextlib.asynccontextmanager
async def nginx_in_front(
    fake: FakeEdge, tmp_path: Path, count: int, **settings: str
) -> AsyncIterator[Stack]:
    """nginx with the shipped site config in front of ``count`` ttsstream processes."""
    assert Path(NGINX).exists(), "install Debian's nginx (apt-get install nginx)"
    cache = tmp_path / "shared-cache"
    instances, ports, sides = [], [], []
    for index in range(count):
        workdir = tmp_path / f"instance{index}"
        workdir.mkdir()
        process, url, side = await serve_process(
            fake,
            workdir,
            **{
                "CACHE_DIR": str(cache),
                "RATE_LIMIT_REQUESTS": str(LIMIT),
                "PING_INTERVAL": str(PING_INTERVAL),
                **settings,
            },
        )
        instances.append(process)
        ports.append(int(url.rsplit(":", 1)[1].split("/")[0]))
        sides.append(side)

    cert, key = certificate(tmp_path)
    https_port, http_port = free_port(), free_port()
    site = tmp_path / "ttsstream.conf"
    site.write_text(
        site_config(
            http_port=http_port,
            https_port=https_port,
            instances=ports,
            cert=cert,
            key=key,
            webroot=tmp_path,
            read_timeout=READ_TIMEOUT,
        )
    )
    nginx = await asyncio.create_subprocess_exec(
        NGINX,
        "-c",
        str(main_config(tmp_path, site)),
        "-p",
        str(tmp_path),
        stderr=asyncio.subprocess.PIPE,
    )
    tls = ssl.create_default_context(cafile=str(cert))

    async def accepting() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", https_port)
        except OSError:
            return False
        writer.close()
        return True

    try:
        await eventually(accepting, what="nginx accepting")
        yield Stack(f"wss://127.0.0.1:{https_port}/v1/stream", tls, sides, instances, tmp_path)
    finally:
        nginx.send_signal(signal.SIGQUIT)
        await asyncio.wait_for(nginx.wait(), TIMEOUT)
        for process in instances:
            await stop(process)


@pytest.fixture
async def stack(fake: FakeEdge, tmp_path: Path) -> AsyncIterator[Stack]:
    async with nginx_in_front(fake, tmp_path, 2) as two:
        yield two


async def speaks(ws: ClientConnection, text: str = "Through nginx.") -> dict[str, Any]:
    client = Client(ws)
    client.hello = await client.recv_message()
    await client.speak(text)
    result = await client.until_final("u1")
    assert result.final["type"] == "end", result.final
    assert result.audio
    return result.final


async def test_speaks_through_nginx_to_both_instances(stack: Stack, fake: FakeEdge) -> None:
    """A client speaks through nginx over TLS, and least_conn spreads clients on both."""
    first = await stack.client("127.0.0.2")
    second = await stack.client("127.0.0.3")
    try:
        await speaks(first, "First client.")
        await speaks(second, "Second client.")
        stats = await stack.stats()
        assert [s["connections"] for s in stats] == [1, 1]
        assert [s["total_requests"] for s in stats] == [1, 1]
    finally:
        await first.close()
        await second.close()


async def test_limits_apply_per_client_not_per_nginx(stack: Stack) -> None:
    """The servers see each client's own address: one client runs out, another does not,
    and a forged X-Forwarded-For changes nothing. With two instances the effective
    limit is twice the per-instance one."""
    for _ in range(2 * LIMIT):  # LIMIT handshakes on each instance
        ws = await stack.client("127.0.0.2")
        await ws.close()
    with pytest.raises(InvalidStatus) as raised:
        await stack.client("127.0.0.2")
    assert raised.value.response.status_code == 429
    with pytest.raises(InvalidStatus) as raised:
        await stack.client("127.0.0.2", additional_headers={"X-Forwarded-For": "203.0.113.50"})
    assert raised.value.response.status_code == 429
    other = await stack.client("127.0.0.3")
    await other.close()
    access = "".join(line for line in (stack.directory / "access.log").read_text().splitlines(True))
    assert "127.0.0.2" in access and "127.0.0.3" in access  # nginx saw both clients


async def test_pinged_idle_connection_outlives_the_proxy_timeout(stack: Stack) -> None:
    """A connection idle for longer than proxy_read_timeout stays open: the server's pings
    cross nginx and reset its timer."""
    ws = await stack.client("127.0.0.4")
    try:
        client = Client(ws)
        client.hello = await client.recv_message()
        await asyncio.sleep(READ_TIMEOUT * 2.5)
        await client.speak("Still connected after the idle spell.")
        assert (await client.until_final("u1")).final["type"] == "end"
    finally:
        await ws.close()


async def test_plain_http_redirects_to_https(stack: Stack) -> None:
    """The port-80 server redirects to HTTPS and serves ACME challenges from the webroot."""
    conf = (stack.directory / "ttsstream.conf").read_text()
    http_port = re.search(r"listen 127\.0\.0\.1:(\d+);", conf).group(1)  # type: ignore[union-attr]
    challenge = stack.directory / ".well-known" / "acme-challenge"
    challenge.mkdir(parents=True)
    (challenge / "token").write_text("proof")
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{http_port}"
        async with session.get(base + "/demo?x=1", allow_redirects=False) as response:
            assert response.status == 301
            assert response.headers["Location"] == "https://127.0.0.1/demo?x=1"
        async with session.get(base + "/.well-known/acme-challenge/token") as response:
            assert (response.status, await response.text()) == (200, "proof")


async def test_demo_through_nginx_has_security_headers(stack: Stack) -> None:
    """The demo page comes through nginx with HSTS and the other security headers."""
    page = stack.url.replace("wss://", "https://").replace("/v1/stream", "/")
    async with aiohttp.ClientSession() as session, session.get(page, ssl=stack.tls) as response:
        assert response.status == 200
        assert "max-age=" in response.headers["Strict-Transport-Security"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert "media-src 'self' blob:" in response.headers["Content-Security-Policy"]
        assert "TTSStreamClient" in await response.text() or "demo.js" in await response.text()


async def test_http_speech_streams_through_nginx(stack: Stack, fake: FakeEdge) -> None:
    """POST /tts and /v1/audio/speech reach the instances through nginx, and the first
    audio bytes arrive while the upstream is paused (nginx buffers nothing)."""
    base = stack.url.replace("wss://", "https://").replace("/v1/stream", "")
    fake.pause_after_chunks = 2
    async with aiohttp.ClientSession() as session:
        async with session.post(
            base + "/tts", json={"text": "Streamed through the proxy."}, ssl=stack.tls
        ) as response:
            assert response.status == 200 and response.headers["X-TTS-Engine"] == "edge"
            first = await asyncio.wait_for(response.content.readany(), TIMEOUT)
            assert first and fake.paused.is_set() and not fake.records[0].completed
            fake.resume.set()
            audio = first + await response.read()
        assert audio == bytes(fake.records[0].audio)
        fake.pause_after_chunks = None
        async with session.post(
            base + "/v1/audio/speech",
            json={
                "model": "tts-1",
                "voice": "alloy",
                "input": "Server-sent.",
                "stream_format": "sse",
            },
            ssl=stack.tls,
        ) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            assert b"speech.audio.done" in await response.read()
        async with session.get(base + "/v1/models", ssl=stack.tls) as response:
            assert response.status == 200


async def test_a_long_get_of_text_passes_through_nginx(stack: Stack) -> None:
    """``<audio src="/tts?text=…">`` with 2,000 CJK characters (an 18 KB request line)
    reaches an instance through the shipped config and is spoken (nginx's default
    buffers answer 414)."""
    base = stack.url.replace("wss://", "https://").replace("/v1/stream", "")
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + "/tts?text=" + quote("語" * 2000), ssl=stack.tls) as response,
    ):
        assert response.status == 200 and response.content_type == "audio/mpeg"
        assert await response.read()


#: Times the demo page's sequence runs through nginx (before the fix: 426 in 5 of 5).
DEMO_VISITS = 5


async def test_the_demo_pages_sequence_through_nginx(stack: Stack) -> None:
    """The demo page's own requests through the shipped config: GET /, its stylesheet
    and script, then its WebSocket, which nginx sends on an upstream connection that
    plain requests kept alive; every handshake is accepted and speaks."""
    base = stack.url.replace("wss://", "https://").replace("/v1/stream", "")
    async with aiohttp.ClientSession() as session:
        for visit in range(DEMO_VISITS):
            for path in ("/", "/clients/demo.css", "/clients/demo.js", "/clients/ttsstream.js"):
                async with session.get(base + path, ssl=stack.tls) as response:
                    assert response.status == 200, path
                    await response.read()
            ws = await stack.client(f"127.0.0.{20 + visit}")  # within each client's LIMIT
            try:
                await speaks(ws, f"Visit number {visit}.")
            finally:
                await ws.close()
    stats = await stack.stats()
    assert sum(s["total_requests"] for s in stats) == DEMO_VISITS


async def test_a_cluster_behind_nginx_is_one_server(fake: FakeEdge, tmp_path: Path) -> None:
    """Three instances on one Redis behind the shipped nginx config: a client gets exactly
    RATE_LIMIT_REQUESTS handshakes whichever instances nginx picks, and identical texts
    spoken through nginx at once are one upstream synthesis."""
    redis = RedisServer(tmp_path)
    await redis.start()
    try:
        async with nginx_in_front(
            fake, tmp_path, 3, REDIS_URL=redis.url, MAX_CONNECTIONS_PER_IP="100"
        ) as cluster:
            admitted = 0
            for _ in range(3 * LIMIT):
                try:
                    ws = await cluster.client("127.0.0.2")
                    await ws.close()
                    admitted += 1
                except InvalidStatus as refused:
                    assert refused.response.status_code == 429
            assert admitted == LIMIT
            fake.pause_after_chunks = 2
            clients = [await cluster.client(f"127.0.0.{10 + n}") for n in range(6)]
            try:
                spoken = await asyncio.gather(
                    *(speaks(ws, "One text, one synthesis, three instances.") for ws in clients),
                    _resume_when_all_wait(fake, cluster, len(clients)),
                )
            finally:
                for ws in clients:
                    await ws.close()
            stats = await cluster.stats()
            assert [s["redis"]["state"] for s in stats] == ["up"] * 3
            assert max(s["redis"]["instances"] for s in stats) == 3  # the last one to start
            assert sum(1 for s in stats if s["total_requests"]) >= 2, "nginx spread them"
            assert len(fake.records) == 1
            assert len({end["bytes"] for end in spoken[:-1]}) == 1
    finally:
        await redis.stop()


async def _resume_when_all_wait(fake: FakeEdge, stack: Stack, count: int) -> dict[str, Any]:
    """Resume the fake's paused synthesis once ``count`` utterances wait for it."""
    await asyncio.wait_for(fake.paused.wait(), TIMEOUT)

    async def all_waiting() -> bool:
        return sum(int(stats["active_utterances"]) for stats in await stack.stats()) == count

    try:
        await eventually(all_waiting, what=f"{count} utterances under way")
    finally:
        fake.resume.set()
    return {}


async def test_the_voice_agent_websockets_pass_through_nginx(stack: Stack) -> None:
    """ElevenLabs' stream-input and Cartesia's /tts/websocket are upgraded through the
    shipped config (its API location forwards the upgrade), and speak to the end."""
    base = stack.url.removesuffix("/v1/stream")
    elevenlabs = base + "/v1/text-to-speech/en-US-AriaNeural/stream-input"
    async with connect(elevenlabs, ssl=stack.tls, ping_interval=None) as ws:
        for text in (" ", "Through nginx, as ElevenLabs. ", ""):
            await ws.send(orjson.dumps({"text": text}).decode())
        audio = 0
        while not (message := orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))).get(
            "isFinal"
        ):
            audio += len(message.get("audio") or "")
        assert audio > 0
    cartesia = base + "/tts/websocket?cartesia_version=2025-04-16"
    async with connect(cartesia, ssl=stack.tls, ping_interval=None) as ws:
        request = {
            "context_id": "n",
            "model_id": "sonic-2",
            "transcript": "Through nginx, as Cartesia.",
            "continue": False,
            "voice": {"mode": "id", "id": "en-US-AriaNeural"},
            "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000},
        }
        await ws.send(orjson.dumps(request).decode())
        kinds = []
        while (kind := orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"]) != "done":
            kinds.append(kind)
        assert "chunk" in kinds


async def test_a_resume_through_nginx_reaches_the_instance_holding_it(
    stack: Stack, fake: FakeEdge
) -> None:
    """Two instances behind the shipped config: a client that names itself (?client=)
    is cut off mid-utterance, comes back through nginx from another address (a new
    network), and resumes (its instance holds the dropped connection) with the audio
    whole; the same client lands on the same instance each time."""
    fake.tone = True
    url = f"{stack.url}?client=phone-{secrets.token_hex(4)}"
    for round_number in range(3):
        await _cut_and_resumed_through(stack, fake, url, round_number)
    stats = await stack.stats()
    # Every round's connections on one instance, none on the other.
    assert sorted(s["total_requests"] for s in stats) == [0, 3]


async def _cut_and_resumed_through(stack: Stack, fake: FakeEdge, url: str, number: int) -> None:
    fake.pause_after_chunks, fake.resume = 4, asyncio.Event()
    fake.paused.clear()
    # Each connection from its own address: the per-IP limit here is 2 per window.
    listener = Listener(url, ssl=stack.tls, local_addr=(f"127.0.0.{10 + 2 * number}", 0))
    await listener.connect()
    uid = f"r{number}"
    await listener.send({"type": "speak", "id": uid, "text": f"Cut off, and back: {number}."})
    await eventually(lambda: fake.paused.is_set(), what="under way")
    await listener.until(lambda: uid in listener.copies and bool(listener.copies[uid].audio))
    listener.cut()
    fake.resume.set()
    listener.options["local_addr"] = (f"127.0.0.{11 + 2 * number}", 0)  # a new network
    answer = await listener.resume()
    assert answer["type"] == "resumed" and answer["lost"] == [], answer
    copy = listener.copies[uid]
    await listener.until(lambda: copy.ended)
    await listener.close()
    assert bytes(copy.audio) == bytes(fake.records[-1].audio)


async def test_azures_route_passes_through_nginx(stack: Stack) -> None:
    """POST /cognitiveservices/v1 (SSML) and the token route reach an instance."""
    base = stack.url.replace("wss://", "https://").removesuffix("/v1/stream")
    ssml = "<speak version='1.0'><voice name='en-US-AriaNeural'>Through nginx.</voice></speak>"
    headers = {
        "Content-Type": "application/ssml+xml",
        "X-Microsoft-OutputFormat": "audio-24khz-48kbitrate-mono-mp3",
    }
    connector = aiohttp.TCPConnector(ssl=stack.tls, local_addr=("127.0.0.5", 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(base + "/cognitiveservices/v1", data=ssml, headers=headers) as r:
            assert r.status == 200 and r.content_type == "audio/mpeg"
            assert await r.read()
        async with session.post(base + "/sts/v1.0/issueToken") as response:
            assert response.status == 200
