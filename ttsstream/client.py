"""A reference client of protocol v1: speak one text and collect what comes back."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.frames import CloseCode

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

    A connection that drops (the network went away) is opened again, with backoff,
    for as long as the server keeps it (its ``resume_window``), and the utterance
    resumed where it stopped: no audio is lost or comes twice, and a streamed text
    goes on from the last character the server had. The URL gets a random
    ``client`` of its own, the same on every reconnect, so that a proxy in front of
    several instances sends the resume to the one that holds it.

    Args:
        on_audio: Given each piece of audio as it arrives, in order, instead of
            keeping it in the result; it runs on the event loop, so it must not
            block (the server closes a client that stops reading).

    Raises:
        SpeechError: The server refused or failed the utterance, or it could not be
            resumed.
        websockets.exceptions.WebSocketException: The connection failed.
    """
    # Batched words: the same words in fewer frames; kept as one dict per word.
    request: dict[str, Any] = {"type": "speak", "id": UTTERANCE, "words": "batch"}
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
    url = _with_client(url, secrets.token_urlsafe(12))
    progress = _Progress(result, on_audio)
    feeder: _Feeder | None = None
    loop = asyncio.get_running_loop()
    deadline: float | None = None
    backoff = RECONNECT_FIRST
    try:
        while True:
            try:
                ws = await connect(
                    url,
                    additional_headers=headers,
                    open_timeout=open_timeout,
                    max_size=None,
                    compression=None,
                )
            except (OSError, TimeoutError, WebSocketException):
                if deadline is None or loop.time() + backoff > deadline:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_LAST)
                continue
            async with ws:
                hello = orjson.loads(await ws.recv())
                if not isinstance(hello, dict):
                    hello = {}
                if deadline is None:
                    limit = hello.get("max_text_length")
                    if isinstance(text, str) and isinstance(limit, int) and len(text) > limit:
                        # Refused here: a text past the frame size would only close the
                        # connection.
                        raise SpeechError(
                            "text_too_long",
                            f"text too long ({len(text)} characters, limit {limit})",
                        )
                    progress.session = hello.get("session")
                    progress.window = float(hello.get("resume_window") or 0)
                    await ws.send(orjson.dumps(request).decode())
                    if not isinstance(text, str):
                        feeder = _Feeder(text, limit if isinstance(limit, int) else 4096, result)
                        feeder.attach(ws, received=None)
                else:
                    try:
                        received = await _resume(ws, progress)
                    except _NotYet:
                        # The server has not seen the drop yet (it will, at its next
                        # ping): ask again, within the window.
                        if loop.time() + backoff > deadline:
                            raise SpeechError(
                                "resume_failed", "the server no longer has the utterance"
                            ) from None
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, RECONNECT_LAST)
                        continue
                    if feeder is not None:
                        feeder.attach(ws, received=received)
                    backoff = RECONNECT_FIRST
                try:
                    return await progress.collect(ws)
                except _Dropped:
                    if feeder is not None:
                        feeder.detach()
                    if progress.session is None or progress.window <= 0:
                        raise SpeechError(
                            "closed", "the connection dropped before the end"
                        ) from None
                    deadline = deadline or loop.time() + progress.window
    finally:
        if feeder is not None:
            await feeder.close()


#: The id of the utterance ``speak`` asks for.
UTTERANCE = "say"
#: Seconds before the first reconnect of a dropped connection, and the most between two.
RECONNECT_FIRST = 0.25
RECONNECT_LAST = 2.0


class _Dropped(Exception):
    """The connection ended without a closing handshake (the network went away)."""


class _NotYet(Exception):
    """The server knows no dropped connection by the session yet."""


def _with_client(url: str, client: str) -> str:
    """``url`` with ``client=<client>`` in its query (a proxy's affinity key)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "client"] + [("client", client)]
    return urlunsplit(parts._replace(query=urlencode(query)))


async def _resume(ws: ClientConnection, progress: _Progress) -> int | None:
    """Resume the utterance on a new connection; the characters of a streamed text the
    server has (``None``: not streamed).

    Raises:
        SpeechError: The server cannot resume it (``resume_failed``).
    """
    at = {"id": UTTERANCE, "offset": progress.audio, "frames": progress.frames}
    resume = {"type": "resume", "session": progress.session, "utterances": [at]}
    await ws.send(orjson.dumps(resume).decode())
    answer = orjson.loads(await ws.recv())
    if answer.get("type") != "resumed":
        if answer.get("code") == "resume_failed" and answer.get("reason") == "unknown":
            raise _NotYet()
        raise SpeechError(answer.get("code", "resume_failed"), answer.get("message", ""))
    if UTTERANCE in answer.get("lost", []):
        raise SpeechError("resume_failed", "the server no longer has the utterance")
    progress.session = answer.get("session", progress.session)
    for entry in answer.get("utterances", []):
        if entry.get("id") == UTTERANCE and isinstance(entry.get("received"), int):
            received: int = entry["received"]
            return received
    return None


class _Progress:
    """What has arrived of the utterance: its result, and how much (for a resume)."""

    def __init__(self, result: SpokenText, on_audio: Callable[[bytes], None] | None) -> None:
        self.result = result
        self.on_audio = on_audio
        #: Audio bytes and JSON messages of the utterance received.
        self.audio = 0
        self.frames = 0
        self.session: str | None = None
        self.window = 0.0

    async def collect(self, ws: ClientConnection) -> SpokenText:
        """Read the utterance's frames until its end.

        Raises:
            SpeechError: The server failed it, or closed the connection.
            _Dropped: The connection dropped without a close.
        """
        result = self.result
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                if isinstance(frame, bytes):
                    self.audio += len(frame)
                    if self.on_audio is None:
                        result.audio += frame
                    else:
                        self.on_audio(frame)
                    continue
                message = orjson.loads(frame)
                kind = message.get("type")
                if message.get("id") == UTTERANCE and "for" not in message:
                    self.frames += 1
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
                # Anything else (hello, future message types) is ignored, as the protocol
                # asks.
        if ws.close_code == CloseCode.ABNORMAL_CLOSURE:
            raise _Dropped()
        raise SpeechError("closed", "the server closed the connection before the end")


class _Feeder:
    """Sends a streamed text's pieces as they come (``append``\\ s within ``limit``),
    then ``finish``, on whichever connection is current; after a resume, from the last
    character the server had."""

    def __init__(self, pieces: AsyncIterator[str], limit: int, result: SpokenText) -> None:
        self._limit = limit
        self._result = result
        self._sent = 0
        self._done = False
        self._wake = asyncio.Event()
        self._reader = asyncio.create_task(self._read(pieces))
        self._sender: asyncio.Task[None] | None = None

    async def _read(self, pieces: AsyncIterator[str]) -> None:
        async for piece in pieces:
            self._result.text += piece
            self._wake.set()
        self._done = True
        self._wake.set()

    def attach(self, ws: ClientConnection, *, received: int | None) -> None:
        """Send on ``ws`` from now on (from character ``received``, after a resume)."""
        if received is not None:
            self._sent = min(received, self._sent)
        self._wake.set()  # what is not sent yet goes out at once
        self._sender = asyncio.create_task(self._send(ws))

    def detach(self) -> None:
        if self._sender is not None:
            self._sender.cancel()

    async def _send(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self._wake.wait()
                self._wake.clear()
                text = self._result.text
                while self._sent < len(text):
                    piece = text[self._sent : self._sent + self._limit]
                    message = {"type": "append", "id": UTTERANCE, "text": piece}
                    await ws.send(orjson.dumps(message).decode())
                    self._sent += len(piece)
                if self._done and self._sent >= len(self._result.text):
                    await ws.send(orjson.dumps({"type": "finish", "id": UTTERANCE}).decode())
                    return

    async def close(self) -> None:
        for task in (self._reader, self._sender):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


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
