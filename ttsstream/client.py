"""A reference client of protocol v1: speak one text and collect what comes back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

__all__ = ["SpeechError", "SpokenText", "list_voices", "speak"]


class SpeechError(Exception):
    """The server answered the ``speak`` with an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class SpokenText:
    """Everything the server sent about one utterance."""

    #: Its audio (empty when ``speak`` was given ``on_audio``).
    audio: bytearray = field(default_factory=bytearray)
    start: dict[str, Any] = field(default_factory=dict)
    words: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] = field(default_factory=dict)
    #: The text spoken (for streamed text: every piece, as sent).
    text: str = ""


async def speak(
    url: str,
    text: str | AsyncIterator[str],
    *,
    voice: str | None = None,
    rate: str | None = None,
    volume: str | None = None,
    pitch: str | None = None,
    api_key: str | None = None,
    audio_format: str | None = None,
    on_audio: Callable[[bytes], None] | None = None,
    # Timeouts
    open_timeout: float | None = 10,
) -> SpokenText:
    """Connect to ``url``, speak ``text``, and return its audio and word events.

    ``text`` may also be pieces that arrive over time (an LLM's reply, standard
    input): they are streamed (``append``) as they come, and spoken as they are
    complete sentences, as one utterance.

    Args:
        on_audio: Given each piece of audio as it arrives, in order, instead of
            keeping it in the result; it runs on the event loop, so it must not
            block (the server closes a client that stops reading).

    Raises:
        SpeechError: The server refused or failed the utterance.
        websockets.exceptions.WebSocketException: The connection failed.
    """
    # Batched words: the same words in fewer frames; kept as one dict per word.
    request: dict[str, Any] = {"type": "speak", "id": "say", "words": "batch"}
    result = SpokenText()
    if isinstance(text, str):
        request["text"] = result.text = text
    else:
        request["stream"] = True
    fields = (
        ("voice", voice),
        ("rate", rate),
        ("volume", volume),
        ("pitch", pitch),
        ("format", audio_format),
    )
    for name, value in fields:
        if value is not None:
            request[name] = value
    headers = {"X-API-Key": api_key} if api_key else None
    async with connect(
        url,
        additional_headers=headers,
        open_timeout=open_timeout,
        max_size=None,
        compression=None,
    ) as ws:
        hello = orjson.loads(await ws.recv())
        limit = hello.get("max_text_length") if isinstance(hello, dict) else None
        if isinstance(text, str) and isinstance(limit, int) and len(text) > limit:
            # Refused here: a text past the frame size would only close the connection.
            raise SpeechError(
                "text_too_long", f"text too long ({len(text)} characters, limit {limit})"
            )
        await ws.send(orjson.dumps(request).decode())
        feeder = None
        if not isinstance(text, str):
            feeder = asyncio.create_task(
                _append(ws, text, limit if isinstance(limit, int) else 4096, result)
            )
        try:
            return await _collect(ws, result, on_audio)
        finally:
            if feeder is not None:
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feeder


async def _append(
    ws: ClientConnection, pieces: AsyncIterator[str], limit: int, result: SpokenText
) -> None:
    """Send the pieces as they come (each ``append`` within ``limit``), then ``finish``."""
    async for piece in pieces:
        result.text += piece
        for start in range(0, len(piece), limit):
            message = {"type": "append", "id": "say", "text": piece[start : start + limit]}
            await ws.send(orjson.dumps(message).decode())
    await ws.send(orjson.dumps({"type": "finish", "id": "say"}).decode())


async def _collect(
    ws: ClientConnection, result: SpokenText, on_audio: Callable[[bytes], None] | None
) -> SpokenText:
    """Read the utterance's frames into ``result`` (its audio to ``on_audio`` if
    given) until its end."""
    async for frame in ws:
        if isinstance(frame, bytes):
            if on_audio is None:
                result.audio += frame
            else:
                on_audio(frame)
            continue
        message = orjson.loads(frame)
        kind = message.get("type")
        if kind == "start":
            result.start = message
        elif kind == "word":
            result.words.append(message)
        elif kind == "words":
            result.words.extend(
                {"type": "word", "id": message["id"], **word} for word in message["words"]
            )
        elif kind == "end":
            result.end = message
            return result
        elif kind == "error" and message.get("for") not in ("append", "flush", "finish"):
            raise SpeechError(message.get("code", "internal"), message.get("message", ""))
        # Anything else (hello, future message types) is ignored, as the protocol asks.
    raise SpeechError("closed", "the server closed the connection before the end")


async def list_voices(
    url: str, *, api_key: str | None = None, open_timeout: float | None = 10
) -> list[dict[str, Any]]:
    """The server's voices (``voices`` message), each a dict with ``name``, ``locale``,
    ``gender`` and ``engine``.

    Raises:
        SpeechError: The server answered with an error.
        websockets.exceptions.WebSocketException: The connection failed.
    """
    headers = {"X-API-Key": api_key} if api_key else None
    async with connect(
        url, additional_headers=headers, open_timeout=open_timeout, compression=None
    ) as ws:
        await ws.send(orjson.dumps({"type": "voices"}).decode())
        async for frame in ws:
            if isinstance(frame, bytes):
                continue
            message = orjson.loads(frame)
            if message.get("type") == "voices":
                voices: list[dict[str, Any]] = message.get("voices", [])
                return voices
            if message.get("type") == "error":
                raise SpeechError(message.get("code", "internal"), message.get("message", ""))
    raise SpeechError("closed", "the server closed the connection before answering")
