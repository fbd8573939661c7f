"""The ``ttsstream`` command: ``serve`` (the default) and ``say``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import orjson
from websockets.exceptions import InvalidHandshake, InvalidStatus, WebSocketException

from ttsstream import __version__, logs
from ttsstream.audio.formats import FORMAT_NAMES, format_for_path
from ttsstream.client import SpeechError, speak
from ttsstream.config import Config, load_config
from ttsstream.exceptions import ConfigError
from ttsstream.server import STREAM_PATH, run
from ttsstream.subtitles import to_srt

__all__ = ["main"]

_COMMANDS = ("serve", "say")
DEFAULT_URL = f"ws://127.0.0.1:8765{STREAM_PATH}"


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

    say = commands.add_parser("say", help="speak a text through a server, write MP3 and subtitles")
    say.add_argument("text", help="the text to speak")
    say.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="audio file to write; its extension picks the format (.mp3, .opus or .ogg, "
        ".webm, .aac, .flac, .wav, .pcm), else MP3",
    )
    say.add_argument(
        "--format",
        choices=FORMAT_NAMES,
        help="audio format, whatever the output file's extension",
    )
    say.add_argument("--voice", help="voice name (default: the server's)")
    say.add_argument("--rate", help='speaking rate such as "+10%%"')
    say.add_argument("--volume", help='volume such as "-20%%"')
    say.add_argument("--pitch", help='pitch such as "+5Hz"')
    say.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    say.add_argument("--api-key", help="API key, sent as X-API-Key (see TTS_API_KEY)")
    say.add_argument("--words", type=Path, help="write the word events as JSON to this file")
    say.add_argument("--srt", type=Path, help="write SRT subtitles to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*_COMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "serve")
    args = _parser().parse_args(args_list)
    if args.command == "say":
        return _say(args)
    return _serve(args)


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
    except OSError as exc:
        print(
            f"ttsstream: cannot listen on {config.host}:{config.port}: {exc.strerror}",
            file=sys.stderr,
        )
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


def _format_of(args: argparse.Namespace) -> str:
    """The format ``say`` asks for: ``--format``, else the output file's extension."""
    if args.format is not None:
        return str(args.format)
    by_name = format_for_path(str(args.output))
    return by_name.name if by_name is not None else "mp3"


def _say(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(
            speak(
                args.url,
                args.text,
                voice=args.voice,
                rate=args.rate,
                volume=args.volume,
                pitch=args.pitch,
                api_key=args.api_key,
                audio_format=_format_of(args),
            )
        )
    except SpeechError as exc:
        print(f"ttsstream say: {exc}", file=sys.stderr)
        return 1
    except InvalidStatus as exc:
        print(f"ttsstream say: server refused: HTTP {exc.response.status_code}", file=sys.stderr)
        return 1
    except (OSError, InvalidHandshake, WebSocketException, TimeoutError) as exc:
        print(f"ttsstream say: cannot talk to {args.url}: {exc}", file=sys.stderr)
        return 1
    args.output.write_bytes(result.audio)
    if args.words is not None:
        args.words.write_bytes(orjson.dumps(result.words, option=orjson.OPT_INDENT_2))
    if args.srt is not None:
        args.srt.write_text(to_srt(args.text, result.words), encoding="utf-8")
    start, end = result.start, result.end
    engine = start.get("engine", "?")
    if start.get("fallback"):
        engine += f" (fallback: {start.get('fallback_reason')})"
    print(
        f"{args.output}: {end.get('bytes')} bytes, {end.get('audio_ms')} ms of audio, "
        f"{end.get('words')} words, voice {start.get('voice')} by {engine}, "
        f"first audio after {end.get('ttfb_ms')} ms",
        file=sys.stderr,
    )
    return 0
