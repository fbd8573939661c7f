"""Byte ranges of a cached text: `<audio>` seeks, the browser's cache revalidates.

A cached text (`GET /tts`, `GET`/`POST /v1/audio/speech`) answers `Accept-Ranges:
bytes` and an `ETag`, a single `Range` with 206 and `Content-Range`, a range past its
end with 416, several ranges or an old `If-Range` with the whole entry, and an
`If-None-Match` of its tag with 304. An uncached text streams as before, without.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from multidict import CIMultiDict
from playwright.async_api import Browser, Request

from tests.conftest import TIMEOUT
from tests.fake_edge import FakeEdge
from tests.processes import serve_process, stop
from tests.test_browser import browser, open_demo  # noqa: F401 (a fixture)
from ttsstream.server import Server

TEXT = "A cached sentence, long enough to seek in, read aloud once and replayed after."


async def get(
    server: Server, headers: dict[str, str] | None = None, path: str | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    url = f"http://127.0.0.1:{server.port}{path or '/tts?text=' + quote(TEXT)}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers or {}) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


@pytest.fixture
async def cached(server: Server) -> tuple[Server, bytes, str]:
    """A server with TEXT cached: its whole audio and its tag."""
    status, headers, live = await get(server)
    assert status == 200 and "Accept-Ranges" not in headers  # live: streamed, no ranges
    assert headers.get("Transfer-Encoding") == "chunked"
    status, headers, whole = await get(server)
    assert status == 200 and headers["X-TTS-Cache"] == "hit"
    assert headers["Accept-Ranges"] == "bytes" and int(headers["Content-Length"]) == len(whole)
    assert whole == live
    return server, whole, headers["ETag"]


async def test_a_range_of_a_cached_text_is_206_with_those_bytes(
    cached: tuple[Server, bytes, str],
) -> None:
    server, whole, etag = cached
    total = len(whole)
    for asked, (start, end) in (
        ("bytes=100-199", (100, 200)),
        ("bytes=0-0", (0, 1)),
        (f"bytes={total - 10}-", (total - 10, total)),
        ("bytes=-50", (total - 50, total)),
        (f"bytes=10-{total * 2}", (10, total)),
    ):
        status, headers, body = await get(server, {"Range": asked})
        assert status == 206, asked
        assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{total}", asked
        assert body == whole[start:end] and int(headers["Content-Length"]) == end - start
        assert headers["ETag"] == etag and headers["Content-Type"] == "audio/mpeg"


async def test_what_a_range_cannot_answer(cached: tuple[Server, bytes, str]) -> None:
    server, whole, etag = cached
    total = len(whole)
    status, headers, body = await get(server, {"Range": f"bytes={total}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{total}" and body == b""
    for whole_answer in (
        {"Range": "bytes=0-10,20-30"},  # several ranges: the whole entry
        {"Range": "bytes=5-10", "If-Range": '"an-old-tag"'},
        {"Range": "pages=1-2"},
    ):
        status, _, body = await get(server, whole_answer)
        assert status == 200 and body == whole, whole_answer
    status, _, body = await get(server, {"Range": "bytes=5-9", "If-Range": etag})
    assert status == 206 and body == whole[5:10]


async def test_a_tag_the_client_holds_is_304(cached: tuple[Server, bytes, str]) -> None:
    server, whole, etag = cached
    status, headers, body = await get(server, {"If-None-Match": etag})
    assert status == 304 and body == b"" and headers["ETag"] == etag
    status, _, body = await get(server, {"If-None-Match": f'"other", W/{etag}'})
    assert status == 304
    status, _, body = await get(server, {"If-None-Match": '"other"'})
    assert status == 200 and body == whole


async def test_openai_speech_of_a_cached_text_answers_ranges(server: Server) -> None:
    body: dict[str, Any] = {"model": "tts-1", "voice": "alloy", "input": TEXT}
    url = f"http://127.0.0.1:{server.port}/v1/audio/speech"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as response:
            whole = await response.read()
            assert "Accept-Ranges" not in response.headers
        async with session.post(url, json=body, headers={"Range": "bytes=20-39"}) as response:
            assert response.status == 206
            assert await response.read() == whole[20:40]
        sse = {**body, "stream_format": "sse"}
        async with session.post(url, json=sse, headers={"Range": "bytes=20-39"}) as response:
            assert response.status == 200 and "Accept-Ranges" not in response.headers


async def test_an_audio_element_seeks_in_a_cached_text(
    browser: Browser,  # noqa: F811 (the fixture)
    fake: FakeEdge,
    tmp_path: Path,
) -> None:
    """Chromium plays `<audio src="/tts?text=…">` of a cached text from 3 s when asked:
    its clock is past 3 s at once, and what it fetched for that was a 206."""
    fake.tone = True
    process, url, _ = await serve_process(fake, tmp_path)
    try:
        base = url.replace("ws://", "http://").replace("/v1/stream", "")
        long_text = " ".join([TEXT] * 3)
        src = f"/tts?text={quote(long_text)}"
        async with aiohttp.ClientSession() as session, session.get(base + src) as response:
            assert response.status == 200 and len(await response.read()) > 0  # now cached
        page, problems = await open_demo(browser, base + "/")
        statuses: list[int] = []

        async def answered(request: Request) -> None:
            response = await request.response()
            if response is not None and "/tts?" in request.url:
                statuses.append(response.status)

        page.on("requestfinished", answered)
        await page.evaluate(
            """(src) => new Promise((resolve, reject) => {
                const audio = document.createElement('audio');
                audio.id = 'tts';
                audio.muted = true;
                audio.preload = 'metadata';
                audio.onloadedmetadata = () => { audio.currentTime = 3; audio.play(); };
                audio.onseeked = () => resolve();
                audio.onerror = () => reject(new Error('audio error'));
                audio.src = src;
                document.body.appendChild(audio);
            })""",
            src,
        )
        position = await page.evaluate("() => document.querySelector('#tts').currentTime")
        duration = await page.evaluate("() => document.querySelector('#tts').duration")
        assert 3 <= position < duration, (position, duration)
        await page.wait_for_function(
            "() => document.querySelector('#tts').currentTime > 3.2", timeout=TIMEOUT * 1000
        )
        assert 206 in statuses and problems == [], (statuses, problems)
    finally:
        await stop(process)
