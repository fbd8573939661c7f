"""The ``ttsstream`` command: ``serve`` (the default), ``say`` and ``keys``."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import os
import queue
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson
from dotenv import dotenv_values
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from ttsstream import __version__, keys_cli, logs
from ttsstream.audio.formats import FORMAT_CHOICES, format_for_path, format_named
from ttsstream.client import SpeechError, list_voices, speak
from ttsstream.config import Config, load_config
from ttsstream.core.voices import in_locale
from ttsstream.exceptions import CannotListen, ConfigError
from ttsstream.server import STREAM_PATH, run
from ttsstream.subtitles import to_srt

__all__ = ["main"]

T = TypeVar("T")

_COMMANDS = ("serve", "say", "keys")
#: Options of ``say`` whose values may start with a minus sign.
_SIGNED = ("--rate", "--volume", "--pitch")
DEFAULT_URL = f"ws://127.0.0.1:8765{STREAM_PATH}"
#: Exit status when standard output's reader closed it early (``| head -1``): what a
#: shell reports for a Unix tool that SIGPIPE ended.
EXIT_READER_GONE = 128 + signal.SIGPIPE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttsstream",
        description="WebSocket streaming speech server for Microsoft Edge's neural voices.",
    )
    parser.add_argument("--version", action="version", version=f"ttsstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (the default command)")
    serve.add_argument("port_arg", nargs="?", type=int, metavar="PORT", help="port (as --port)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides PORT)")
    serve.add_argument("--host", help="address to listen on (overrides HOST)")

    say = commands.add_parser(
        "say",
        help="speak a text through a server, write audio and subtitles",
        description="Speak a text through a ttsstream server; write its audio, word "
        "events and subtitles. Values that start with a minus sign are taken as they "
        "are: --rate -50%%, --pitch -5Hz.",
    )
    say.add_argument(
        "text",
        nargs="?",
        help="the text to speak (or -f FILE); '-': standard input, spoken as it is read "
        "(some-llm-cli | ttsstream say - -o reply.mp3)",
    )
    say.add_argument(
        "-f", "--file", help="read the text from this UTF-8 file ('-': standard input)"
    )
    say.add_argument(
        "-o",
        "--output",
        help="audio file to write ('-': standard output); its extension picks the format "
        "(.mp3, .opus or .ogg, .webm, .aac, .flac, .wav, .pcm), else MP3",
    )
    say.add_argument(
        "--format",
        type=_format_name,
        metavar="F",
        help=f"audio format, whatever the output file's extension: {FORMAT_CHOICES}",
    )
    say.add_argument("--voice", help="voice name (default: the server's)")
    say.add_argument("--rate", help='speaking rate such as "+10%%" or "-50%%"')
    say.add_argument("--volume", help='volume such as "-20%%"')
    say.add_argument("--pitch", help='pitch such as "+5Hz" or "-5Hz"')
    say.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    say.add_argument(
        "--api-key",
        help="API key, sent as X-API-Key (default: the first of TTS_API_KEY, from the "
        "environment or .env)",
    )
    say.add_argument("--words", type=Path, help="write the word events as JSON to this file")
    say.add_argument("--srt", type=Path, help="write SRT subtitles to this file")
    say.add_argument("--list-voices", action="store_true", help="list the server's voices and exit")
    say.add_argument("--locale", help="with --list-voices: only these (en, en-US, …)")

    keys_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    first = args_list[0] if args_list else "-"
    if first not in _COMMANDS and not first.startswith("-") and not first.isdigit():
        print(
            f"ttsstream: unknown command {first!r} (commands: {', '.join(_COMMANDS)}; "
            "ttsstream --help)",
            file=sys.stderr,
        )
        return 2
    if not args_list or args_list[0] not in (*_COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "serve")
    args = _parser().parse_args(_signed_values(args_list))
    if args.command == "say":
        try:
            return _say(args)
        except BrokenPipeError:
            return _reader_gone()
    if args.command == "keys":
        try:
            return keys_cli.run(args)
        except BrokenPipeError:
            return _reader_gone()
    return _serve(args)


def _reader_gone() -> int:
    """Standard output's reader closed it: stop quietly, as Unix tools do.

    What is still buffered for it is dropped, so that the interpreter's exit does
    not try to write it again and complain.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_READER_GONE


def _signed_values(args: list[str]) -> list[str]:
    """``--rate -50%`` as ``--rate=-50%``: argparse would take "-50%" for an option."""
    joined: list[str] = []
    values = iter(args)
    for arg in values:
        if arg in _SIGNED:
            value = next(values, None)
            if value is not None and value.startswith("-"):
                joined.append(f"{arg}={value}")
                continue
            joined.append(arg)
            if value is not None:
                joined.append(value)
            continue
        joined.append(arg)
    return joined


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(
            port=args.port if args.port is not None else args.port_arg, host=args.host
        )
    except ConfigError as exc:
        print(f"ttsstream: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        logs.configure(
            level=config.log_level_number, log_format=config.log_format, log_dir=config.log_dir
        )
    except OSError as exc:
        print(f"ttsstream: cannot write logs to {config.log_dir}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        _event_loop(config)(run(config))
    except ConfigError as exc:
        print(f"ttsstream: configuration error: {exc}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"ttsstream: {exc}", file=sys.stderr)
        return 1
    finally:
        logs.shutdown()
    return 0


def _event_loop(config: Config) -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop's runner when it is installed and UVLOOP is not false, else asyncio's."""
    if config.uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            runner: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
            return runner
    return asyncio.run


def _format_name(value: str) -> str:
    """``--format``'s value, if it names a format (``pcm_16000`` as much as ``opus``)."""
    if format_named(value) is None:
        # argparse's own words for a value outside its choices.
        raise argparse.ArgumentTypeError(
            f"invalid choice: {value!r} (choose from {FORMAT_CHOICES})"
        )
    return value


def _format_of(args: argparse.Namespace) -> str:
    """The format ``say`` asks for: ``--format``, else the output file's extension."""
    if args.format is not None:
        return str(args.format)
    by_name = format_for_path(str(args.output))
    return by_name.name if by_name is not None else "mp3"


class _Usage(Exception):
    """A ``say`` invocation that cannot work: one line, exit status 2."""


def _say(args: argparse.Namespace) -> int:
    try:
        api_key, key_from = _api_key(args)
        if args.list_voices:
            return _list_voices(args, api_key, key_from)
        text = _text_of(args)
        if args.output is None:
            raise _Usage("an output file is needed: -o FILE (or -o - for standard output)")
        for path in (args.output, args.words, args.srt):
            if path is not None and str(path) != "-":
                _check_writable(Path(path))
    except _Usage as exc:
        print(f"ttsstream say: {exc}", file=sys.stderr)
        return 2
    output = _AudioOutput(args.output)
    try:
        result = _talk(
            speak(
                args.url,
                text,
                voice=args.voice,
                rate=args.rate,
                volume=args.volume,
                pitch=args.pitch,
                api_key=api_key,
                audio_format=_format_of(args),
                on_audio=output.put,
            ),
            args.url,
            key_from=key_from,
            output=output,
        )
        output.close()
    except _OutputFailed as exc:
        if isinstance(exc.error, BrokenPipeError) and args.output == "-":
            return _reader_gone()
        print(f"ttsstream say: {exc}", file=sys.stderr)
        return 1
    if result is None:
        return 1
    if args.words is not None:
        args.words.write_bytes(orjson.dumps(result.words, option=orjson.OPT_INDENT_2))
    if args.srt is not None:
        args.srt.write_text(to_srt(result.text, result.words), encoding="utf-8")
    start, end = result.start, result.end
    engine = start.get("engine", "?")
    if start.get("fallback"):
        engine += f" (fallback: {start.get('fallback_reason')})"
    print(
        f"{output.shown}: {end.get('bytes')} bytes, {end.get('audio_ms')} ms of audio, "
        f"{end.get('words')} words, voice {start.get('voice')} by {engine}, "
        f"first audio after {end.get('ttfb_ms')} ms",
        file=sys.stderr,
    )
    return 0


class _OutputFailed(Exception):
    """The audio could not be written where ``say`` was told to write it."""

    def __init__(self, shown: str, error: OSError) -> None:
        super().__init__(shown, error)
        self.shown = shown
        self.error = error

    def __str__(self) -> str:
        return f"cannot write {self.shown}: {self.error.strerror or self.error}"


class _AudioOutput:
    """Where ``say`` writes the audio as it arrives: standard output (``-``) or a file.

    A thread of its own writes it, so that a reader slower than the server (a
    player playing in real time) never keeps ``say`` from reading the connection,
    which the server would close; what the reader has not taken yet waits in
    memory. A file is created at the first audio, so a refused text leaves none.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.shown = "standard output" if path == "-" else path
        #: Bytes of audio handed over so far.
        self.received = 0
        self._pieces: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._write_all, name="audio", daemon=True)
        self._thread.start()

    def put(self, audio: bytes) -> None:
        """Hand ``audio`` over to be written; never blocks.

        Raises:
            _OutputFailed: An earlier write failed (the reader is gone, the disk is full).
        """
        if self._error is not None:
            raise _OutputFailed(self.shown, self._error)
        self.received += len(audio)
        self._pieces.put(audio)

    def close(self) -> None:
        """Return once all the audio handed over is written, and the file closed.

        Raises:
            _OutputFailed: A write failed.
        """
        self._pieces.put(None)
        self._thread.join()
        if self._error is not None:
            raise _OutputFailed(self.shown, self._error)

    def _write_all(self) -> None:
        output: BinaryIO | None = None
        try:
            while (audio := self._pieces.get()) is not None:
                if output is None:
                    output = self._open()
                output.write(audio)
                output.flush()
        except OSError as exc:
            self._error = exc
        finally:
            if output is not None and self.path != "-":
                try:
                    output.close()
                except OSError as exc:
                    self._error = self._error or exc

    def _open(self) -> BinaryIO:
        """Standard output, or the file (closed by :meth:`_write_all`)."""
        return sys.stdout.buffer if self.path == "-" else open(self.path, "wb")


async def _stdin_pieces() -> AsyncIterator[str]:
    """Standard input as it is read (UTF-8; a bad byte becomes U+FFFD).

    Read on a daemon thread, not the loop's executor: a reply the server refused
    must end ``say`` at once, not wait for standard input to be closed.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()
    # The descriptor itself: a thread blocked in sys.stdin.buffer would hold its lock
    # and abort the interpreter's exit.
    stdin = sys.stdin.fileno()

    def reader() -> None:
        with contextlib.suppress(RuntimeError, OSError):  # the loop may be gone
            while data := os.read(stdin, 4096):
                loop.call_soon_threadsafe(chunks.put_nowait, data)
            loop.call_soon_threadsafe(chunks.put_nowait, b"")

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while data := await chunks.get():
        if text := decoder.decode(data):
            yield text
    if tail := decoder.decode(b"", final=True):
        yield tail


def _api_key(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The key to send (``--api-key``, else the first key of ``TTS_API_KEY`` from the
    environment, else from ``./.env``) and where it came from; ``None``s for none."""
    if args.api_key:
        return args.api_key, "--api-key"
    value, key_from = os.environ.get("TTS_API_KEY"), "TTS_API_KEY in the environment"
    if value is None and Path(".env").is_file():
        value, key_from = dotenv_values(".env").get("TTS_API_KEY"), "TTS_API_KEY in .env"
    keys = [key.strip() for key in (value or "").split(",") if key.strip()]
    return (keys[0], key_from) if keys else (None, None)


def _text_of(args: argparse.Namespace) -> str | AsyncIterator[str]:
    """The text to speak, from the argument or ``-f``, checked to be UTF-8; or, for
    ``-``, standard input as it is read."""
    if (args.text is None) == (args.file is None):
        raise _Usage("give the text to speak, or -f FILE (not both)")
    if args.text == "-":
        return _stdin_pieces()
    if args.file is not None:
        try:
            data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        except OSError as exc:
            raise _Usage(f"cannot read {args.file}: {exc.strerror}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Usage(
                f"{args.file} is not UTF-8 text (byte 0x{data[exc.start]:02x} at {exc.start})"
            ) from None
    text: str = args.text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Python keeps undecodable bytes of an argument as surrogates (0xDC80 + byte).
        byte = ord(text[exc.start]) - 0xDC00
        raise _Usage(
            f"the text is not UTF-8 (byte 0x{byte:02x} at character {exc.start}): use a "
            "UTF-8 terminal, or -f FILE with UTF-8 text"
        ) from None
    return text


def _check_writable(path: Path) -> None:
    """Refuse before synthesizing what could not be written after."""
    folder = path.parent
    if path.is_dir():
        raise _Usage(f"cannot write {path}: it is a directory")
    if not folder.is_dir():
        raise _Usage(f"cannot write {path}: no directory {folder}")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _Usage(f"cannot write {path}: permission denied")


def _talk(
    work: Coroutine[Any, Any, T],
    url: str,
    *,
    key_from: str | None,
    output: _AudioOutput | None = None,
) -> T | None:
    """Run ``work`` against the server at ``url``, with a key from ``key_from`` (if
    any); ``None`` if it failed (said in one line on standard error, with the audio
    ``output`` got before, if any)."""
    try:
        return asyncio.run(work)
    except (SpeechError, InvalidHandshake, WebSocketException, OSError) as exc:
        line = _failure(exc, url, key_from)
        if output is not None and output.received:
            line += f" ({output.shown} has the {output.received} bytes of audio before it)"
        print(f"ttsstream say: {line}", file=sys.stderr)
        return None


def _failure(exc: BaseException, url: str, key_from: str | None) -> str:
    """One line for what went wrong talking to the server."""
    if isinstance(exc, SpeechError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"cannot talk to {url}: timed out"
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        hint = {
            # The server answers 401 to a missing key and to a wrong one alike.
            401: f": the API key ({key_from}) was refused"
            if key_from is not None
            else ": an API key is needed (--api-key KEY, or TTS_API_KEY in the environment "
            "or .env)",
            403: ": the API key or the origin was refused",
            429: ": too many requests from this address; try again later",
        }.get(status, "")
        return f"server refused: HTTP {status}{hint}"
    return f"cannot talk to {url}: {exc}"


def _list_voices(args: argparse.Namespace, api_key: str | None, key_from: str | None) -> int:
    voices = _talk(list_voices(args.url, api_key=api_key), args.url, key_from=key_from)
    if voices is None:
        return 1
    shown = [voice for voice in voices if in_locale(str(voice.get("locale", "")), args.locale)]
    for voice in sorted(shown, key=lambda v: str(v.get("name"))):
        print(
            f"{voice.get('name')}\t{voice.get('locale')}\t{voice.get('gender')}\t"
            f"{voice.get('engine')}"
        )
    sys.stdout.flush()  # a closed standard output is found here, not at exit
    print(f"{len(shown)} voices", file=sys.stderr)
    return 0
