"""The ``ttsstream`` command as users run it: a real server process and the ``say`` client."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import miniaudio
import pytest
from websockets.asyncio.client import connect

from tests.conftest import TIMEOUT
from tests.fake_edge import FakeEdge, spoken_words
from tests.processes import (
    CONSOLE_SCRIPT,
    LISTENING,
    environment,
    run,
    start_process,
    wait_listening,
)
from ttsstream.engines.words import tokens_of


class ServerProcess:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/v1/stream"


@pytest.fixture
async def served(fake: FakeEdge, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    """``python -m ttsstream serve`` as a separate process, wired to the fake upstream."""
    process = await start_process(
        [sys.executable, "-m", "ttsstream", "serve"], environment(fake), tmp_path
    )
    try:
        port = await wait_listening(process)
        yield ServerProcess(process, port)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), TIMEOUT)


async def test_say_writes_playable_mp3_words_and_srt(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """``ttsstream say`` against a real server process writes decodable MP3, words and SRT."""
    text = "Hello, world. This is ttsstream speaking!"
    status, stderr = await run(
        [
            str(CONSOLE_SCRIPT),
            "say",
            text,
            "-o",
            "out.mp3",
            "--url",
            served.url,
            "--voice",
            "en-US-GuyNeural",
            "--words",
            "words.json",
            "--srt",
            "subs.srt",
        ],
        cwd=tmp_path,
    )
    assert status == 0, stderr
    audio = (tmp_path / "out.mp3").read_bytes()
    assert audio == bytes(fake.records[0].audio)
    decoded = miniaudio.decode(audio, nchannels=1, sample_rate=24000)
    assert decoded.sample_rate == 24000
    assert decoded.duration == pytest.approx(len(audio) / 6 / 1000, abs=0.05)

    words = json.loads((tmp_path / "words.json").read_text())
    assert [w["text"] for w in words] == spoken_words(text)
    srt = (tmp_path / "subs.srt").read_text()
    blocks = srt.strip().split("\n\n")
    assert [block.split("\n")[2] for block in blocks] == [
        "Hello, world.",
        "This is ttsstream speaking!",
    ]
    assert blocks[0].split("\n")[1] == "00:00:00,100 --> " + _srt_time(
        words[1]["offset_ms"] + words[1]["duration_ms"]
    )
    assert fake.records[0].voice.endswith("(en-US, GuyNeural)")


async def test_say_picks_the_format_from_the_file_name(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """``-o speech.opus`` asks for Opus and writes Ogg Opus; ``--format wav`` wins over
    the extension; an unknown extension is MP3."""
    fake.tone = True
    for output, extra, magic in (
        ("speech.opus", [], b"OggS"),
        ("speech.flac", [], b"fLaC"),
        ("speech.bin", ["--format", "wav"], b"RIFF"),
        ("speech.audio", [], b"\xff\xf3"),
    ):
        status, stderr = await run(
            [
                str(CONSOLE_SCRIPT),
                "say",
                "Formats by name.",
                "-o",
                output,
                "--url",
                served.url,
                *extra,
            ],
            cwd=tmp_path,
        )
        assert status == 0, stderr
        assert (tmp_path / output).read_bytes().startswith(magic), output
    status, stderr = await run(
        [str(CONSOLE_SCRIPT), "say", "x", "-o", "x.mp3", "--format", "ogg", "--url", served.url],
        cwd=tmp_path,
    )
    assert status == 2 and "invalid choice: 'ogg'" in stderr


def _srt_time(ms: float) -> str:
    total = int(ms)
    hours, minutes, seconds = total // 3_600_000, total // 60_000 % 60, total // 1000 % 60
    return f"{hours:02}:{minutes:02}:{seconds:02},{total % 1000:03}"


async def test_say_reports_server_errors(served: ServerProcess, tmp_path: Path) -> None:
    """``say`` exits non-zero with the error code when the server refuses the text."""
    status, stderr = await run(
        [
            sys.executable,
            "-m",
            "ttsstream",
            "say",
            "Hi",
            "-o",
            "x.mp3",
            "--url",
            served.url,
            "--rate",
            "fast",
        ],
        cwd=tmp_path,
    )
    assert status == 1
    assert "invalid_parameter" in stderr
    assert not (tmp_path / "x.mp3").exists()


async def test_bad_configuration_exits_with_one_clear_line(fake: FakeEdge, tmp_path: Path) -> None:
    """A bad variable makes the server exit 2 with one line naming it and the accepted form."""
    status, stderr = await run(
        [sys.executable, "-m", "ttsstream"], cwd=tmp_path, env=environment(fake, PORT="eighty")
    )
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1
    assert "PORT" in lines[0] and "eighty" in lines[0] and "integer" in lines[0]


async def test_dotenv_file_and_positional_port(fake: FakeEdge, tmp_path: Path) -> None:
    """``ttsstream serve PORT`` listens there; settings come from .env in the working directory."""
    (tmp_path / ".env").write_text("MAX_TEXT_LENGTH=77\nLOG_LEVEL=DEBUG\n")
    env = environment(fake)
    del env["PORT"]
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    process = await start_process([str(CONSOLE_SCRIPT), "serve", str(port)], env, tmp_path)
    try:
        assert await wait_listening(process) == port
        async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            assert hello["max_text_length"] == 77
    finally:
        process.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(process.wait(), TIMEOUT)
    assert status == 0


async def test_no_internet_still_speaks_offline(tmp_path: Path) -> None:
    """With Edge unreachable, the default server speaks through the offline voice, and say
    writes an MP3 whose decoded duration matches end.audio_ms, with one event per word."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    env = {key: value for key, value in os.environ.items() if key not in ("FALLBACK_VOICE", "PORT")}
    env.update(
        HOST="127.0.0.1",
        PORT="0",
        HEALTH_PORT="0",
        EDGE_WSS_URL=f"ws://127.0.0.1:{dead}/edge/v1?TrustedClientToken=x",
        EDGE_VOICES_URL=f"http://127.0.0.1:{dead}/voices/list?trustedclienttoken=x",
    )
    process = await start_process([str(CONSOLE_SCRIPT), "serve"], env, tmp_path)
    try:
        port = await wait_listening(process)
        text = "No internet here, yet this sentence is spoken by the offline voice."
        status, stderr = await run(
            [
                str(CONSOLE_SCRIPT),
                "say",
                text,
                "-o",
                "offline.mp3",
                "--words",
                "words.json",
                "--url",
                f"ws://127.0.0.1:{port}/v1/stream",
            ],
            cwd=tmp_path,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)
    assert status == 0, stderr
    assert "by espeak (fallback: upstream_unavailable)" in stderr
    audio_ms = float(re.search(r"([0-9.]+) ms of audio", stderr).group(1))  # type: ignore[union-attr]
    audio = (tmp_path / "offline.mp3").read_bytes()
    decoded = miniaudio.decode(audio, nchannels=1, sample_rate=24000)
    assert decoded.duration * 1000 == pytest.approx(audio_ms, abs=1)
    assert audio_ms > 2000
    words = json.loads((tmp_path / "words.json").read_text())
    assert [w["text"] for w in words] == [t.text for t in tokens_of(text)]


async def test_without_the_local_extra_the_server_says_so_and_runs(
    fake: FakeEdge, tmp_path: Path
) -> None:
    """When eSpeak cannot be imported, the server starts, says there is no offline voice,
    and still speaks with Edge."""
    blocked = (
        "import sys; sys.modules['espeakng_loader'] = None; "
        "from ttsstream.cli import main; sys.exit(main(['serve']))"
    )
    process = await start_process([sys.executable, "-c", blocked], environment(fake), tmp_path)
    try:
        assert process.stderr is not None
        said = b""
        while not LISTENING.search(said):
            said += await asyncio.wait_for(process.stderr.readline(), TIMEOUT)
        assert b"no offline voice available" in said
        port = int(LISTENING.search(said).group(1))  # type: ignore[union-attr]
        status, stderr = await run(
            [
                sys.executable,
                "-m",
                "ttsstream",
                "say",
                "Edge still works.",
                "-o",
                "x.mp3",
                "--url",
                f"ws://127.0.0.1:{port}/v1/stream",
            ],
            cwd=tmp_path,
        )
        assert status == 0, stderr
        assert "by edge" in stderr
        status, stderr = await run(
            [
                sys.executable,
                "-m",
                "ttsstream",
                "say",
                "Offline?",
                "-o",
                "y.mp3",
                "--voice",
                "espeak:en-us",
                "--url",
                f"ws://127.0.0.1:{port}/v1/stream",
            ],
            cwd=tmp_path,
        )
        assert status == 1 and "invalid_voice" in stderr
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)
