"""The ``ttsstream`` command as users run it: a real server process and the ``say`` client."""

from __future__ import annotations

import asyncio
import contextlib
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

from tests.conftest import TIMEOUT, eventually
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
    writes an MP3 whose decoded duration matches end.audio_ms, with one event per word;
    the error log says once that the upstream fails, not at every attempt."""
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
        for number in range(5):
            more, _ = await run(
                [
                    str(CONSOLE_SCRIPT),
                    "say",
                    f"Sentence {number}.",
                    "-o",
                    "more.mp3",
                    "--url",
                    f"ws://127.0.0.1:{port}/v1/stream",
                ],
                cwd=tmp_path,
            )
            assert more == 0
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)
    # The error log: one line per change of the upstream's state, not per attempt or
    # per utterance (six utterances, eight attempts here).
    assert process.stderr is not None
    warnings = [
        line.split(" WARNING ", 1)[1]
        for line in (await process.stderr.read()).decode().splitlines()
        if " WARNING " in line
    ]
    assert len(warnings) == len(set(warnings)) <= 3, warnings
    assert sum("upstream failing (upstream_unavailable" in w for w in warnings) == 1
    assert sum("upstream breaker open" in w for w in warnings) == 1
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


async def say(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> tuple[int, bytes, str]:
    """``ttsstream say …`` as a user runs it: status, standard output, standard error."""
    process = await asyncio.create_subprocess_exec(
        str(CONSOLE_SCRIPT),
        "say",
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), TIMEOUT * 2)
    assert process.returncode is not None
    return process.returncode, stdout, stderr.decode()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


async def test_say_checks_where_it_writes_before_speaking(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """An output, --words or --srt path in a missing directory (or a directory) is one
    line and exit 2, before anything is synthesized."""
    for extra in (
        ["-o", "/nonexistent/dir/x.mp3"],
        ["-o", "x.mp3", "--words", "missing/words.json"],
        ["-o", "x.mp3", "--srt", "missing/subs.srt"],
        ["-o", str(tmp_path)],
    ):
        status, _, stderr = await say("Hello.", *extra, "--url", served.url, cwd=tmp_path)
        assert status == 2, extra
        assert "cannot write" in one_line(stderr)
    assert fake.records == []
    assert not (tmp_path / "x.mp3").exists()


async def test_say_refuses_text_that_is_not_utf8_or_too_long(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """A non-UTF-8 argument or file is one line naming the byte (exit 2); a text over
    the server's max_text_length (from hello) says so before sending (exit 1)."""
    status, _, stderr = await say(
        os.fsdecode(b"caf\xe9"), "-o", "x.mp3", "--url", served.url, cwd=tmp_path
    )
    assert status == 2 and "not UTF-8 (byte 0xe9" in one_line(stderr)
    (tmp_path / "latin1.txt").write_bytes(b"d\xe9j\xe0 vu")
    status, _, stderr = await say(
        "-f", "latin1.txt", "-o", "x.mp3", "--url", served.url, cwd=tmp_path
    )
    assert status == 2 and "latin1.txt is not UTF-8 text (byte 0xe9 at 1)" in one_line(stderr)
    status, _, stderr = await say(
        "word " * 14_000, "-o", "x.mp3", "--url", served.url, cwd=tmp_path
    )
    assert status == 1
    assert "text too long (70000 characters, limit 5000)" in one_line(stderr)
    assert fake.records == []


async def test_say_takes_the_key_from_the_environment_or_dotenv(
    fake: FakeEdge, tmp_path: Path
) -> None:
    """Without --api-key, say sends the first key of TTS_API_KEY from the environment or
    ./.env; without any, a 401 says how to pass one; with a wrong one, that the key
    from where it came was refused."""
    env = environment(fake, TTS_API_KEY="first-key,second-key")
    process = await start_process([sys.executable, "-m", "ttsstream", "serve"], env, tmp_path)
    try:
        url = f"ws://127.0.0.1:{await wait_listening(process)}/v1/stream"
        client_env = {k: v for k, v in os.environ.items() if k != "TTS_API_KEY"}
        workdir = tmp_path / "client"
        workdir.mkdir()
        status, _, stderr = await say(
            "Hi.", "-o", "x.mp3", "--url", url, cwd=workdir, env=client_env
        )
        assert status == 1
        line = one_line(stderr)
        assert "HTTP 401" in line and "--api-key" in line and "TTS_API_KEY" in line
        assert "needed" in line
        for wrong, key_env, key_from in (
            (["--api-key", "wrong"], client_env, "--api-key"),
            ([], {**client_env, "TTS_API_KEY": "wrong"}, "TTS_API_KEY in the environment"),
        ):
            for command in (["Hi.", "-o", "x.mp3"], ["--list-voices"]):
                status, _, stderr = await say(
                    *command, *wrong, "--url", url, cwd=workdir, env=key_env
                )
                line = one_line(stderr)
                assert status == 1 and "needed" not in line, line
                assert line.endswith(f"HTTP 401: the API key ({key_from}) was refused"), line
        (workdir / ".env").write_text("TTS_API_KEY=wrong\n")
        status, _, stderr = await say(
            "Hi.", "-o", "x.mp3", "--url", url, cwd=workdir, env=client_env
        )
        assert status == 1
        assert one_line(stderr).endswith("the API key (TTS_API_KEY in .env) was refused")
        status, _, stderr = await say(
            "Hi.",
            "-o",
            "x.mp3",
            "--url",
            url,
            cwd=workdir,
            env={**client_env, "TTS_API_KEY": "first-key,second-key"},
        )
        assert status == 0, stderr
        (workdir / ".env").write_text("TTS_API_KEY=first-key\n")
        status, _, stderr = await say(
            "Hi.", "-o", "y.mp3", "--url", url, cwd=workdir, env=client_env
        )
        assert status == 0, stderr
        assert (workdir / "y.mp3").read_bytes() == bytes(fake.records[0].audio)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)


async def test_say_takes_negative_values_files_stdout_and_lists_voices(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """--rate -50% (and --pitch/--volume below zero) reach Edge; -f FILE gives the text;
    -o - writes the audio to standard output with the summary on standard error;
    --list-voices --locale lists the server's voices of that locale."""
    (tmp_path / "text.txt").write_text("Déjà vu, from a file.", encoding="utf-8")
    status, stdout, stderr = await say(
        "-f",
        "text.txt",
        "-o",
        "-",
        "--rate",
        "-50%",
        "--pitch",
        "-5Hz",
        "--volume",
        "-10%",
        "--url",
        served.url,
        cwd=tmp_path,
    )
    assert status == 0, stderr
    record = fake.records[0]
    assert (record.rate, record.pitch, record.volume) == ("-50%", "-5Hz", "-10%")
    assert record.text == "Déjà vu, from a file."
    assert stdout == bytes(record.audio)
    assert one_line(stderr).startswith("standard output: ")
    status, stdout, stderr = await say(
        "-f", "-", "-o", "piped.mp3", "--url", served.url, cwd=tmp_path, stdin=b"From a pipe."
    )
    assert status == 0, stderr
    assert fake.records[-1].text == "From a pipe."

    status, stdout, stderr = await say(
        "--list-voices", "--locale", "en-US", "--url", served.url, cwd=tmp_path
    )
    assert status == 0, stderr
    rows = [line.split("\t") for line in stdout.decode().splitlines()]
    assert rows and [row for row in rows if not row[1].startswith("en-US")] == []
    assert "en-US-AriaNeural" in [row[0] for row in rows]
    status, stdout, _ = await say("--list-voices", "--url", served.url, cwd=tmp_path)
    locales = {line.split("\t")[1] for line in stdout.decode().splitlines()}
    assert len(locales) > 1


async def test_an_unknown_command_is_named(tmp_path: Path) -> None:
    """``ttsstream sya hello`` says the command is unknown and lists the commands."""
    status, stderr = await run([str(CONSOLE_SCRIPT), "sya", "hello"], cwd=tmp_path)
    assert status == 2
    line = stderr.strip()
    assert "unknown command 'sya'" in line and "serve" in line and "say" in line


async def test_a_taken_side_port_is_named_and_a_public_one_warned_about(
    fake: FakeEdge, tmp_path: Path
) -> None:
    """With HEALTH_PORT taken, the one-line error names HEALTH_PORT and its address (not
    the WebSocket's); a side port open to other hosts is a warning at start."""
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        status, stderr = await run(
            [sys.executable, "-m", "ttsstream"],
            cwd=tmp_path,
            env=environment(fake, HEALTH_PORT=str(port)),
        )
    finally:
        taken.close()
        await taken.wait_closed()
    assert status == 1
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"ttsstream: cannot listen on 127.0.0.1:{port} (HEALTH_PORT): ")
    assert "Traceback" not in stderr

    process = await start_process(
        [sys.executable, "-m", "ttsstream"], environment(fake, HEALTH_HOST="0.0.0.0"), tmp_path
    )
    assert process.stderr is not None
    said = ""
    try:
        while not LISTENING.search(said.encode()):
            said_now = await asyncio.wait_for(process.stderr.readline(), TIMEOUT)
            assert said_now, said
            said += said_now.decode()
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)
    assert "side port 0.0.0.0:" in said and "reachable from other hosts (HEALTH_HOST)" in said


async def _say_dash(
    served: ServerProcess, tmp_path: Path, *options: str
) -> asyncio.subprocess.Process:
    """``ttsstream say - -o reply.mp3 OPTIONS`` against ``served``, its standard input
    and error piped."""
    return await asyncio.create_subprocess_exec(
        str(CONSOLE_SCRIPT),
        "say",
        "-",
        "-o",
        "reply.mp3",
        *options,
        "--url",
        served.url,
        cwd=tmp_path,
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_say_dash_streams_standard_input_as_it_is_read(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """``some-llm | ttsstream say - -o reply.mp3``: text is spoken as it arrives on
    standard input (its first sentence before the input ends), as one utterance, with
    subtitles over the whole text."""
    process = await _say_dash(served, tmp_path, "--srt", "reply.srt")
    assert process.stdin is not None
    process.stdin.write(b"The first sentence comes right away. The sec")
    await process.stdin.drain()
    await eventually(lambda: fake.records, what="the first sentence spoken, the input still open")
    assert fake.records[0].text == "The first sentence comes right away."
    process.stdin.write("ond one follows later. Déjà".encode())
    process.stdin.close()
    _, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
    assert process.returncode == 0, stderr.decode()
    assert [r.text for r in fake.records] == [
        "The first sentence comes right away.",
        "The second one follows later.",
        "Déjà",
    ]
    audio = (tmp_path / "reply.mp3").read_bytes()
    assert audio == b"".join(bytes(r.audio) for r in fake.records)
    srt = (tmp_path / "reply.srt").read_text()
    assert "The second one follows later." in srt and "Déjà" in srt


async def test_say_dash_ends_at_a_refusal_while_standard_input_stays_open(
    served: ServerProcess, tmp_path: Path
) -> None:
    """A streamed reply the server refuses ends ``say -`` at once with the error, even
    though standard input is still open (a reader left blocked on it must not keep
    the command alive)."""
    process = await _say_dash(served, tmp_path, "--rate", "fast")
    assert process.stdin is not None and process.stderr is not None
    try:
        status = await asyncio.wait_for(process.wait(), TIMEOUT)
    finally:
        process.stdin.close()
        if process.returncode is None:
            process.kill()
    assert status == 1
    assert "invalid_parameter" in (await process.stderr.read()).decode()
    assert not (tmp_path / "reply.mp3").exists()


async def say_to_a_gone_reader(*args: str, cwd: Path) -> tuple[int, str]:
    """``ttsstream say …`` whose standard output's reader is gone before it writes (a
    ``| head -1`` that has its line): status and standard error."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        async with say_running(*args, cwd=cwd, stdout=write_end) as process:
            os.close(write_end)
            write_end = -1
            _, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
    finally:
        if write_end >= 0:
            os.close(write_end)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_list_voices_stops_quietly_when_its_reader_is_gone(
    fake: FakeEdge, tmp_path: Path
) -> None:
    """``say --list-voices | head -1``: standard output's reader gone, say stops with
    the status a shell gives a tool SIGPIPE ended (141) and says nothing, whether it
    finds out mid-list (Edge's hundreds of voices) or at its last write (one voice)."""
    fake.voices = [
        {
            **fake.voices[0],
            "ShortName": f"en-US-Voice{number}Neural",
            "Name": f"Microsoft Server Speech Text to Speech Voice (en-US, Voice{number}Neural)",
        }
        for number in range(500)
    ] + fake.voices
    process = await start_process(
        [sys.executable, "-m", "ttsstream", "serve"], environment(fake), tmp_path
    )
    try:
        url = f"ws://127.0.0.1:{await wait_listening(process)}/v1/stream"
        for locale in ([], ["--locale", "fr-FR"]):
            status, stderr = await say_to_a_gone_reader(
                "--list-voices", *locale, "--url", url, cwd=tmp_path
            )
            assert (status, stderr) == (128 + signal.SIGPIPE, ""), locale
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)


#: About 2,000 characters, as in the report: a text whose whole audio takes a while.
LONG_TEXT = " ".join(["This sentence is spoken while the next ones are still made."] * 33)


@contextlib.asynccontextmanager
async def say_running(
    *args: str, cwd: Path, stdout: int = asyncio.subprocess.PIPE
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``ttsstream say …`` while the test reads what it writes; killed if it outlives
    the test."""
    process = await asyncio.create_subprocess_exec(
        str(CONSOLE_SCRIPT),
        "say",
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


async def test_say_writes_standard_output_as_the_audio_arrives(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """``say … -o - | player``: the first audio reaches standard output while Edge is
    paused mid-utterance, not once the utterance ends; all of it in the end."""
    fake.pause_after_chunks = 2
    async with say_running(LONG_TEXT, "-o", "-", "--url", served.url, cwd=tmp_path) as process:
        assert process.stdout is not None
        try:
            first = await asyncio.wait_for(process.stdout.read(2**16), TIMEOUT)
            record = fake.records[0]
            assert first and fake.paused.is_set() and not record.completed
            assert bytes(record.audio).startswith(first)
        finally:
            fake.resume.set()
        rest, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
    assert process.returncode == 0, stderr.decode()
    assert first + rest == bytes(record.audio)


async def test_say_writes_its_file_as_the_audio_arrives(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """``-o FILE`` too: its first audio is written while Edge is paused mid-utterance
    (the file is a named pipe here, read as say writes it)."""
    fake.pause_after_chunks = 2
    fifo = tmp_path / "out.mp3"
    os.mkfifo(fifo)
    # Read and write: say's open never waits for a reader, and no end of file comes
    # between its writes.
    pipe = os.fdopen(os.open(fifo, os.O_RDWR | os.O_NONBLOCK), "rb", buffering=0)
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe
    )
    try:
        async with say_running(
            LONG_TEXT,
            "-o",
            "out.mp3",
            "--url",
            served.url,
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
        ) as process:
            try:
                audio = await asyncio.wait_for(reader.read(2**16), TIMEOUT)
                record = fake.records[0]
                assert audio and fake.paused.is_set() and not record.completed
                assert bytes(record.audio).startswith(audio)
            finally:
                fake.resume.set()
            while not (record.completed and len(audio) == len(record.audio)):
                audio += await asyncio.wait_for(reader.read(2**16), TIMEOUT)
            _, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT * 2)
        assert process.returncode == 0, stderr.decode()
        assert audio == bytes(record.audio)
    finally:
        transport.close()


async def test_say_keeps_the_audio_written_before_a_failure(
    served: ServerProcess, fake: FakeEdge, tmp_path: Path
) -> None:
    """An utterance that fails after some audio (Edge drops mid-stream) leaves that
    audio in the file, and the one error line says how much there is (exit 1)."""
    fake.drop_after_chunks = 2
    status, _, stderr = await say(LONG_TEXT, "-o", "cut.mp3", "--url", served.url, cwd=tmp_path)
    assert status == 1
    partial = (tmp_path / "cut.mp3").read_bytes()
    assert partial and partial == bytes(fake.records[0].audio)
    line = one_line(stderr)
    assert "upstream_unavailable" in line
    assert line.endswith(f"(cut.mp3 has the {len(partial)} bytes of audio before it)")


async def test_say_to_standard_output_stops_quietly_when_its_reader_is_gone(
    served: ServerProcess, tmp_path: Path
) -> None:
    """``say … -o - | player`` whose player quit: status 141, nothing said."""
    status, stderr = await say_to_a_gone_reader(
        "Nobody listens.", "-o", "-", "--url", served.url, cwd=tmp_path
    )
    assert (status, stderr) == (128 + signal.SIGPIPE, "")
