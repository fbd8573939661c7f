"""The demo page and the browser client in a real headless Chromium.

Debian's chromium (``/usr/bin/chromium``; ``.ci/run`` installs it) is driven by
Python playwright, against a real server process and the fake upstream sending
real MP3 audio. Headless Chromium plays to a fake audio output in real time.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from tests.conftest import TIMEOUT, eventually
from tests.fake_edge import FakeEdge
from tests.processes import serve_process, stop

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
#: Where the screenshot of the demo mid-utterance is kept (a test artifact).
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
PARAGRAPH = (
    "Streaming speech starts playing at once. Every word lights up while it is spoken, "
    "in step with the audio clock."
)
HIGHLIGHT = (0xFF, 0xD3, 0x3D)  # --highlight in demo.css


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Debian Chromium; the test fails if it is not installed."""
    assert Path(CHROMIUM).exists(), "install Debian's chromium (apt-get install chromium)"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        await launched.close()


@pytest.fixture
async def served(fake: FakeEdge, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """A real server process with the demo, the fake upstream sending real MP3."""
    fake.tone = True
    process, url, side = await serve_process(fake, tmp_path)
    yield {"url": url.replace("ws://", "http://").replace("/v1/stream", "/"), "side": side}
    await stop(process)


async def open_demo(browser: Browser, url: str, **context: Any) -> tuple[Page, list[str]]:
    page = await (await browser.new_context(**context)).new_page()
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    await page.goto(url)
    return page, problems


async def until(page: Page, expression: str, timeout: float = TIMEOUT) -> Any:
    # A function, not a bare expression: the page's CSP forbids eval.
    return await page.wait_for_function(f"() => ({expression})", timeout=timeout * 1000)


async def state(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(
        """() => {
            const u = window.demo.utterance;
            const current = document.querySelector('#spoken .word.current');
            return {
                time: u && u.audio ? u.audio.currentTime * 1000 : 0,
                paused: u && u.audio ? u.audio.paused : true,
                bytes: u ? u.bytesAppended : 0,
                words: u ? u.words.map(w => [w.offset_ms, w.duration_ms, w.text]) : [],
                current: current ? Number(current.dataset.index) : -1,
                currentText: current ? current.textContent : null,
                log: window.demo.wordLog,
                state: u ? u.state : null,
                figures: document.querySelector('#figures').textContent,
                error: document.querySelector('#error').textContent,
            };
        }"""
    )
    return result


async def test_demo_streams_and_highlights_in_step(
    browser: Browser, served: dict[str, str], fake: FakeEdge
) -> None:
    """The demo fills its voices, starts playing before the last byte was sent, highlights
    the word under the playback clock, in order, and shows it in a screenshot."""
    fake.pause_after_chunks = 25  # 2.4 s of audio, then the upstream waits
    page, problems = await open_demo(browser, served["url"])
    await until(page, "document.querySelectorAll('#voice option').length > 5")
    groups = await page.eval_on_selector_all("#voice optgroup", "gs => gs.map(g => g.label)")
    assert "en-US" in groups and "fr-FR" in groups
    offline = await page.eval_on_selector_all(
        "#voice option", "os => os.filter(o => o.textContent.includes('(offline)')).length"
    )
    assert offline > 10

    await page.fill("#text", PARAGRAPH)
    await page.click("#speak")
    await until(page, "window.demo.utterance && window.demo.utterance.audio.currentTime > 0.8")
    assert fake.paused.is_set() and not fake.records[0].completed  # playing before the end

    # Held still while it is read, drawn and measured: playing on (a slow screenshot)
    # it would pass the last word known so far, and no word would be highlighted.
    await page.evaluate("() => window.demo.utterance.audio.pause()")
    seen = await state(page)
    assert seen["current"] >= 0
    offset, duration, text = seen["words"][seen["current"]]
    assert seen["currentText"] == text
    # The highlighted word is the one under the playback clock (within a frame or two).
    assert offset - 100 <= seen["time"]
    following = (
        seen["words"][seen["current"] + 1][0]
        if seen["current"] + 1 < len(seen["words"])
        else offset + duration
    )
    assert seen["time"] <= following + 100

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo-mid-utterance.png"
    await page.screenshot(path=str(shot))
    box = await page.locator("#spoken .word.current").bounding_box()
    assert box is not None
    image = Image.open(shot).convert("RGB")
    x, y = int(box["x"] + 2), int(box["y"] + box["height"] / 2)
    pixels = [image.getpixel((x + dx, y)) for dx in range(0, max(1, int(box["width"]) - 4))]
    assert sum(1 for p in pixels if p == HIGHLIGHT) > len(pixels) / 3, "no highlight drawn"

    await page.evaluate("() => window.demo.utterance.audio.play()")
    fake.resume.set()
    await until(page, "window.demo.utterance.state === 'ended'")
    await until(page, "window.demo.utterance.audio.ended", timeout=TIMEOUT * 4)
    final = await state(page)
    log = final["log"]
    assert log == sorted(log) and log[0] == 0
    assert len(set(log)) >= len(final["words"]) - 2  # every word lit up, in order
    assert "live · edge" in final["figures"] and "first audio" in final["figures"]
    assert final["bytes"] == len(fake.records[0].audio)
    assert problems == []


async def test_stop_silences_and_appends_nothing_more(
    browser: Browser, served: dict[str, str], fake: FakeEdge
) -> None:
    """Stop pauses the audio at once and no more audio is appended after it."""
    fake.chunk_delay = 0.05  # audio keeps arriving while it plays
    page, problems = await open_demo(browser, served["url"])
    await page.fill("#text", " ".join([PARAGRAPH] * 3))
    await page.click("#speak")
    await until(page, "window.demo.utterance && window.demo.utterance.audio.currentTime > 0.3")
    await page.click("#stop")
    stopped = await state(page)
    await asyncio.sleep(0.6)
    later = await state(page)
    assert later["paused"] and later["bytes"] == stopped["bytes"]
    assert later["time"] - stopped["time"] < 50
    await until(page, "window.demo.utterance.state === 'cancelled'")
    assert later["bytes"] < sum(len(r.audio) for r in fake.records) or not fake.records[0].completed
    assert problems == []


async def test_cached_replay_plays(
    browser: Browser, served: dict[str, str], fake: FakeEdge, tmp_path: Path
) -> None:
    """Speaking the same text again replays it from the cache, and it plays."""
    page, problems = await open_demo(browser, served["url"])
    await page.fill("#text", "Once live, then cached.")
    for expected in ("live", "cached"):
        await page.click("#speak")
        await until(page, "window.demo.utterance && window.demo.utterance.state === 'ended'")
        await until(page, "window.demo.utterance.audio.currentTime > 0.3")
        assert (await state(page))["figures"].startswith(expected)
        # The first one's entry on the disk (the server's cache is in tmp_path).
        await eventually(lambda: list(tmp_path.glob("cache/*/*.tts")), what="the entry stored")
    assert len(fake.records) == 1
    assert problems == []


async def test_wrong_api_key_is_explained(browser: Browser, fake: FakeEdge, tmp_path: Path) -> None:
    """With a wrong key, the page says the server refused the key."""
    fake.tone = True
    process, url, _ = await serve_process(fake, tmp_path, TTS_API_KEY="right-key")
    try:
        page, problems = await open_demo(
            browser, url.replace("ws://", "http://").replace("/v1/stream", "/")
        )
        await until(page, "document.querySelector('#error').textContent.length > 0")
        assert (await state(page))["error"] == "the server needs an API key"
        await page.fill("#key", "wrong-key")
        await page.press("#key", "Enter")
        await until(page, "document.querySelector('#error').textContent.includes('refused')")
        assert (await state(page))["error"] == "the server refused the API key"
        await page.fill("#key", "right-key")
        await page.press("#key", "Tab")
        await until(page, "document.querySelectorAll('#voice option').length > 5")
        # The browser logs each refused WebSocket handshake itself; nothing else may fail.
        assert all("WebSocket connection" in p or "401" in p for p in problems), problems
    finally:
        await stop(process)


async def test_phone_width_layout(browser: Browser, served: dict[str, str]) -> None:
    """At a phone's width nothing overflows sideways and the controls stay usable."""
    page, problems = await open_demo(
        browser, served["url"], viewport={"width": 390, "height": 844}, is_mobile=True
    )
    await until(page, "document.querySelectorAll('#voice option').length > 5")
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    for selector in ("#text", "#voice", "#speak", "#stop", "#rate"):
        box = await page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    # Keyboard: Tab reaches the speak button, Enter speaks.
    await page.focus("#volume")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "speak"
    labels = await page.eval_on_selector_all(
        "input, select, textarea", "els => els.filter(e => !e.labels.length).map(e => e.id)"
    )
    assert labels == []
    assert problems == []


async def test_demo_can_be_turned_off(fake: FakeEdge, tmp_path: Path) -> None:
    """SERVE_DEMO=false: GET / is 404 and the WebSocket still works."""
    import aiohttp

    process, url, _ = await serve_process(fake, tmp_path, SERVE_DEMO="false")
    try:
        http = url.replace("ws://", "http://").replace("/v1/stream", "")
        async with aiohttp.ClientSession() as session:
            async with session.get(http + "/") as response:
                assert response.status == 404
            async with session.get(http + "/clients/ttsstream.js") as response:
                assert response.status == 404
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)


async def test_demo_files_are_served_with_safe_headers(served: dict[str, str]) -> None:
    """GET / and the module come with their types and a strict Content-Security-Policy."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(served["url"]) as page:
            assert page.status == 200 and page.content_type == "text/html"
            assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
            assert 'src="/clients/demo.js"' in await page.text()
        async with session.get(served["url"] + "clients/ttsstream.js") as module:
            assert module.status == 200 and module.content_type == "text/javascript"
            assert "export class TTSStreamClient" in await module.text()
        async with session.get(served["url"] + "clients/../pyproject.toml") as escape:
            assert escape.status == 404


async def test_an_audio_element_plays_tts_from_a_url(
    browser: Browser, served: dict[str, str], fake: FakeEdge
) -> None:
    """<audio src="/tts?text=…"> plays in a page: Chromium streams the GET and its
    playback clock advances, with the first audio before the upstream finished."""
    # About 5.8 s of audio, then the upstream waits: Chromium reads some 30 KB of a
    # stream of unknown length before it starts playing.
    fake.pause_after_chunks = 60
    page, problems = await open_demo(browser, served["url"])
    await page.evaluate(
        """() => {
            const audio = document.createElement('audio');
            audio.id = 'tts';
            const text = 'A sentence read aloud by an audio element, from a plain URL. '
                + 'It goes on for a while, so that the page plays its beginning long '
                + 'before the speech service has produced its end, as a reader would.';
            audio.src = '/tts?text=' + encodeURIComponent(text);
            document.body.appendChild(audio);
            audio.play();
        }"""
    )
    await until(page, "document.querySelector('#tts').currentTime > 1.0")
    assert fake.paused.is_set() and not fake.records[-1].completed  # still streaming
    fake.resume.set()
    error = await page.evaluate("() => document.querySelector('#tts').error")
    assert error is None and problems == []


async def test_the_client_plays_webm_opus_as_it_arrives(
    browser: Browser, served: dict[str, str], fake: FakeEdge
) -> None:
    """``new TTSStreamClient(url, {format: "webm"})`` in Chromium: Opus in WebM through
    Media Source Extensions, playing before the upstream has finished, to its end."""
    fake.pause_after_chunks = 40  # 3.8 s of audio, then the upstream waits
    page, problems = await open_demo(browser, served["url"])
    assert await page.evaluate("() => MediaSource.isTypeSupported('audio/webm; codecs=\"opus\"')")
    await page.evaluate(
        """async () => {
            const { TTSStreamClient } = await import('/clients/ttsstream.js');
            const url = location.origin.replace('http', 'ws') + '/v1/stream';
            const client = new TTSStreamClient(url, { format: 'webm' });
            const u = client.speak('Opus in WebM plays as it arrives, through Media Source '
                + 'Extensions, a third lighter than the MP3 it is made from, word by word.');
            window.webm = u;
            u.addEventListener('start', (e) => { window.webmStart = e.detail; });
        }"""
    )
    await until(page, "window.webm.audio.currentTime > 0.5")
    assert fake.paused.is_set() and not fake.records[-1].completed  # playing before the end
    start = await page.evaluate("() => window.webmStart")
    assert start["format_name"] == "webm" and start["format"] == "audio/webm; codecs=opus"
    fake.resume.set()
    await until(page, "window.webm.state === 'ended'")
    await until(page, "window.webm.audio.ended", timeout=TIMEOUT * 4)
    played = await page.evaluate("() => [window.webm.audio.currentTime, window.webm.end.audio_ms]")
    assert abs(played[0] * 1000 - played[1]) < 100
    assert await page.evaluate("() => window.webm.audio.error") is None
    assert problems == []


async def test_the_client_streams_text_written_on_a_timer(
    browser: Browser, served: dict[str, str], fake: FakeEdge
) -> None:
    """``client.stream()`` in Chromium, written a few characters at a time on a timer
    (as an LLM writes): it starts playing before the text is finished, plays every
    segment to the end as one utterance, and its words slice the whole text."""
    page, problems = await open_demo(browser, served["url"])
    # Four characters every 100 ms (unscaled): how far the writing has got when playing
    # begins measures the time that took.
    interval_ms = TIMEOUT * 20
    await page.evaluate(
        """async (interval) => {
            const { TTSStreamClient } = await import('/clients/ttsstream.js');
            const url = location.origin.replace('http', 'ws') + '/v1/stream';
            const client = new TTSStreamClient(url);
            const text = 'Streaming text plays while it is written. Each sentence follows '
                + 'the one before without a gap. The words light up in step.';
            const u = client.stream();
            window.streamed = u;
            window.written = 0;
            u.audio.addEventListener('playing', () => { window.writtenAtPlay = window.written; });
            const timer = setInterval(() => {
                if (window.written >= text.length) {
                    clearInterval(timer);
                    u.end();
                    return;
                }
                u.write(text.slice(window.written, window.written + 4));
                window.written += 4;
            }, interval);
        }""",
        interval_ms,
    )
    await until(page, "window.writtenAtPlay !== undefined")
    # Playing began soon after the first sentence was written, long before the rest.
    assert await page.evaluate("() => window.writtenAtPlay") < 90
    assert await page.evaluate("() => window.written") < 120
    await until(page, "window.streamed.state === 'ended'", timeout=TIMEOUT * 2)
    await until(page, "window.streamed.audio.ended", timeout=TIMEOUT * 4)
    result = await page.evaluate(
        """() => {
            const u = window.streamed;
            return {
                end: u.end,
                start: u.start,
                sliced: u.words.every(w => u.text.slice(w.char_start, w.char_end) === w.text),
                words: u.words.length,
                played: u.audio.currentTime * 1000,
                error: u.audio.error,
            };
        }"""
    )
    assert result["start"]["stream"] is True
    assert result["end"]["segments"] == 3 == len(fake.records)
    assert result["sliced"] and result["words"] == result["end"]["words"] > 20
    assert abs(result["played"] - result["end"]["audio_ms"]) < 100
    assert result["error"] is None
    assert problems == []
