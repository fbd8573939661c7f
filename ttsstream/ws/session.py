"""One client connection: read its frames, speak its utterances one at a time.

A session has two tasks. The reader parses frames and answers at once (errors,
cancels; ``voices`` requests are answered one at a time by a task of their own);
the speaker takes utterances from a bounded queue in the order received and
streams each one's events to the client. Every binary
frame between an utterance's ``start`` and its ``end``/``cancelled``/``error``
therefore belongs to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ttsstream import __version__
from ttsstream.cache.speech_cache import SpeechCache
from ttsstream.config import Config
from ttsstream.core.admission import Admission
from ttsstream.core.router import Started
from ttsstream.core.stats import Stats
from ttsstream.engines.base import AudioChunk, SynthesisRequest, WordEvent
from ttsstream.exceptions import (
    ClientError,
    InvalidParameter,
    NotFound,
    QueueFull,
    ShuttingDown,
)
from ttsstream.logs import access
from ttsstream.ws.protocol import (
    Cancel,
    ClientMessage,
    ListVoices,
    Speak,
    encode_cancelled,
    encode_end,
    encode_error,
    encode_hello,
    encode_start,
    encode_voices,
    encode_word,
    encode_words,
    error_code,
    parse_client_message,
)

__all__ = ["Session"]

logger = logging.getLogger("ttsstream.ws.session")

#: Below this many bytes waiting in the write buffer, a frame is written at once,
#: without waiting for a drain (websockets waits only above its 32 KiB write limit).
SEND_BUFFER_LOW = 16 * 2**10
#: Linux's socket option to hold back partial segments; None elsewhere.
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)
#: Seconds a client closed for not reading has to read what is queued and the close frame.
SLOW_CLIENT_CLOSE_TIMEOUT = 10.0
#: ``voices`` requests of one connection waiting for their reply; more are refused
#: (``queue_full``). One reply is written at a time, like audio: a client that does
#: not read its replies holds one of them, never one per request.
VOICES_PENDING_MAX = 4
#: Seconds a closing session waits for its upstream streams to close before giving up.
UPSTREAM_CLOSE_TIMEOUT = 5.0


@dataclass(eq=False)
class Utterance:
    """A ``speak`` accepted on this connection, queued or playing."""

    request: Speak
    voice: str
    received_at: float
    #: Its end or error is being sent: too late to cancel.
    finishing: bool = False
    #: Some of its audio was sent.
    audio_sent: bool = False
    #: Cut by a shutdown before its end.
    cut: bool = False

    @property
    def id(self) -> str:
        return self.request.id


class Session:
    """Serve one WebSocket connection until it closes.

    Args:
        websocket: The connection, already past the handshake.
        config: The server's configuration.
        speech: Speaks the utterances.
        client_ip: The client's address, as the server determined it.
        admission: Counts this client's ``speak`` and ``voices`` against its rate limit.
        stats: Counters to update.
    """

    def __init__(
        self,
        websocket: ServerConnection,
        *,
        config: Config,
        speech: SpeechCache,
        client_ip: str = "",
        admission: Admission | None = None,
        stats: Stats | None = None,
    ) -> None:
        self._ws = websocket
        self._config = config
        self._speech = speech
        self.client_ip = client_ip
        self._admission = admission
        self._stats = stats or Stats()
        self._last_activity = asyncio.get_running_loop().time()
        #: The server is shutting down: no new utterance is accepted.
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.connection_id = websocket.id.hex[:12]
        self._pending: deque[Utterance] = deque()
        self._wakeup = asyncio.Event()
        self._current: Utterance | None = None
        self._speaker: asyncio.Task[None] | None = None
        #: TCP_CORK is on: a cached utterance is being written in one burst.
        self._corked = False
        self._ids: set[str] = set()
        #: ``voices`` requests not answered yet.
        self._voices_wanted = 0
        # Tasks that outlive the frame that started them: voice lists, upstreams closing.
        self._background: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Greet the client, then serve its frames until the connection closes."""
        self._speaker = asyncio.create_task(self._speak_in_order())
        watchdog = asyncio.create_task(self._close_when_idle())
        try:
            await self._send(
                encode_hello(
                    server=f"ttsstream/{__version__}",
                    default_voice=self._config.default_voice,
                    max_text_length=self._config.max_text_length,
                )
            )
            async for frame in self._ws:
                self._last_activity = asyncio.get_running_loop().time()
                await self._on_frame(frame)
        except (ConnectionClosed, ClientTooSlow):
            pass
        finally:
            watchdog.cancel()
            # Closing the upstream of an utterance being spoken may take a while:
            # the speaker is waited for with the other background tasks, for a bounded time.
            self._speaker.cancel()
            self._track(self._speaker)
            await asyncio.wait({watchdog})
            await self._close_background()

    async def _close_when_idle(self) -> None:
        """Close with 1000 "idle" after IDLE_TIMEOUT without a message or an utterance."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._last_activity + self._config.idle_timeout
            if loop.time() < deadline:
                await asyncio.sleep(deadline - loop.time())
                continue
            if self._current is not None or self._pending:
                # Speaking is not idleness: count from the end of the last utterance.
                self._last_activity = loop.time()
                continue
            logger.info(
                "conn=%s closed: idle for %.0fs", self.connection_id, self._config.idle_timeout
            )
            await self._ws.close(1000, "idle")
            return

    @property
    def utterances_in_progress(self) -> int:
        """Utterances queued or playing."""
        return len(self._pending) + (self._current is not None)

    async def wait_idle(self) -> None:
        """Return once no utterance is queued or playing."""
        await self._idle.wait()

    async def _on_frame(self, frame: str | bytes) -> None:
        try:
            message = parse_client_message(
                frame,
                max_text_length=self._config.max_text_length,
                make_id=self._new_id,
            )
        except ClientError as exc:
            if exc.message_type == "speak":
                self._stats.total_requests += 1  # a refused speak is a request too
            await self._refuse(exc)
            return
        try:
            if isinstance(message, Speak):
                await self._enqueue(message)
            elif isinstance(message, Cancel):
                await self._cancel(message.id)
            elif isinstance(message, ListVoices):
                self._ask_voices()
        except ClientError as exc:
            exc.message_type = _TYPES[type(message)]
            await self._refuse(exc)

    async def _refuse(self, exc: ClientError) -> None:
        """Answer a refused message with an error ``for`` it, which ends no utterance."""
        self._stats.errors += 1
        await self._send(
            encode_error(exc, utterance_id=exc.utterance_id, refused=exc.message_type or "unknown")
        )

    def _new_id(self) -> str:
        return "s-" + secrets.token_hex(6)

    async def _enqueue(self, request: Speak) -> None:
        self._stats.total_requests += 1
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down; reconnect in a moment", utterance_id=request.id
            )
        self._check_rate(request.id)
        if request.id in self._ids:
            raise InvalidParameter(
                f"id {request.id!r} is already queued or playing", utterance_id=request.id
            )
        voice = request.voice or self._config.default_voice
        try:
            await self._speech.check_voice(voice)
        except ClientError as exc:
            exc.utterance_id = request.id
            raise
        # The first pending utterance is about to play when nothing is playing yet.
        waiting = len(self._pending) - (1 if self._current is None and self._pending else 0)
        if waiting >= self._config.queue_size:
            raise QueueFull(
                f"{self._config.queue_size} utterances are already waiting",
                utterance_id=request.id,
            )
        self._ids.add(request.id)
        self._idle.clear()
        self._pending.append(
            Utterance(request=request, voice=voice, received_at=time.perf_counter())
        )
        self._wakeup.set()

    async def _cancel(self, utterance_id: str | None) -> None:
        current = self._current
        playing = current if current is not None and not current.finishing else None
        if utterance_id is None:
            queued = list(self._pending)
            self._pending.clear()
            if playing is not None:
                await self._cancel_playing(playing)
            for utterance in queued:
                self._ids.discard(utterance.id)
                await self._send(encode_cancelled(utterance.id))
            return
        if playing is not None and playing.id == utterance_id:
            await self._cancel_playing(playing)
            return
        for utterance in self._pending:
            if utterance.id == utterance_id:
                self._pending.remove(utterance)
                self._ids.discard(utterance.id)
                await self._send(encode_cancelled(utterance.id))
                return
        raise NotFound("no queued or playing utterance has this id", utterance_id=utterance_id)

    async def cut(self) -> None:
        """End what is playing or queued with ``shutting_down`` (the server stops now).

        The playing utterance's error says whether its audio is partial; queued
        ones never started. Nothing more of them is sent. A client that left or
        does not read is no error here.
        """
        with contextlib.suppress(ConnectionClosed, ClientTooSlow):
            await self._cut()

    async def _cut(self) -> None:
        assert self._speaker is not None
        stopped = ShuttingDown("the server is shutting down before this utterance ended")
        current = self._current
        queued = list(self._pending)
        self._pending.clear()
        if current is not None and not current.finishing:
            current.cut = True
            self._speaker.cancel()
            self._track(self._speaker)
            self._played(current)
            self._stats.errors += 1
            await self._send(
                encode_error(stopped, utterance_id=current.id, partial=current.audio_sent)
            )
        for utterance in queued:
            self._ids.discard(utterance.id)
            self._stats.errors += 1
            await self._send(encode_error(stopped, utterance_id=utterance.id))
        self._idle.set()

    async def _cancel_playing(self, utterance: Utterance) -> None:
        """Stop the speaker where it is and hand the queue to a new one.

        The speaker stops at its next await and sends nothing more of the
        utterance; closing its upstream may take a moment, which the next
        utterance need not wait for. ``cancelled`` is sent before this returns,
        so replies keep the order of requests.
        """
        assert self._speaker is not None
        self._speaker.cancel()
        self._track(self._speaker)
        self._played(utterance)
        try:
            await self._send(encode_cancelled(utterance.id))
        finally:
            self._speaker = asyncio.create_task(self._speak_in_order())

    async def _speak_in_order(self) -> None:
        """Speak the queue, one utterance at a time, in this task (no task per utterance)."""
        while True:
            while not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            utterance = self._pending.popleft()
            self._current = utterance
            try:
                await self._speak(utterance, self._request_of(utterance))
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                # Not this task's cancellation: whatever ended one utterance, the
                # next one is still spoken.
                logger.error(
                    "conn=%s: a foreign cancellation reached the speaker", self.connection_id
                )
            except Exception:
                logger.exception("conn=%s utterance=%r failed", self.connection_id, utterance.id)
            finally:
                if self._current is utterance:  # else a cancel already moved on
                    self._played(utterance)

    def _played(self, utterance: Utterance) -> None:
        """The utterance is over (spoken, failed or cancelled): the next one may play."""
        self._current = None
        self._ids.discard(utterance.id)
        self._last_activity = asyncio.get_running_loop().time()

    async def _speak(self, utterance: Utterance, synthesis: SynthesisRequest) -> None:
        request = utterance.request
        # Batched words go out just before the audio they describe; a replay may
        # then give all of them at once.
        batch = request.words == "batch"
        events = self._speech.synthesize(synthesis, words_ahead=batch)
        held: list[WordEvent] = []
        started: Started | None = None
        byte_count = 0
        words = 0
        ttfb_ms: float | None = None
        outcome = "ok"
        self._stats.active_utterances += 1
        try:
            async for event in events:
                if isinstance(event, Started):
                    started = event
                    if event.cached:
                        # A replay is written in one burst, as a few full TCP segments.
                        self._cork(True)
                    await self._send(
                        encode_start(
                            utterance.id,
                            voice=event.voice,
                            engine=event.engine,
                            mime_type=event.audio_format.mime_type,
                            sample_rate=event.audio_format.sample_rate,
                            cached=event.cached,
                            fallback_reason=event.fallback_reason,
                        )
                    )
                elif isinstance(event, AudioChunk):
                    words += await self._send_held(utterance.id, held)
                    if ttfb_ms is None:
                        ttfb_ms = (time.perf_counter() - utterance.received_at) * 1000
                        self._stats.observe_first_audio(_source(started), ttfb_ms / 1000)
                    await self._send(event.data, text=False)
                    utterance.audio_sent = True
                    byte_count += len(event.data)
                    self._stats.bytes_sent += len(event.data)
                elif batch:
                    held.append(event)
                elif request.words == "each":
                    await self._send(encode_word(utterance.id, event))
                    words += 1
            assert started is not None, "every utterance begins with Started"
            words += await self._send_held(utterance.id, held)
            utterance.finishing = True
            await self._send(
                encode_end(
                    utterance.id,
                    byte_count=byte_count,
                    audio_ms=started.audio_format.duration_ms(byte_count),
                    words=words,
                    cached=started.cached,
                    ttfb_ms=ttfb_ms or 0.0,
                )
            )
        except asyncio.CancelledError as exc:
            if _cancelling():
                outcome = "shutting_down" if utterance.cut else "cancelled"
                raise
            # Another task's cancellation that leaked this far is a failure of this
            # utterance, not a cancel of it.
            outcome = await self._failed(utterance, exc, partial=byte_count > 0)
        except ConnectionClosed:
            outcome = "disconnected"
        except ClientTooSlow:
            outcome = "too_slow"
        except Exception as exc:
            outcome = await self._failed(utterance, exc, partial=byte_count > 0)
        finally:
            self._cork(False)
            self._stats.active_utterances -= 1
            self._stats.finished(outcome)
            audio_format = started.audio_format if started else None
            access(
                "utterance",
                ip=self.client_ip,
                conn=self.connection_id,
                id=utterance.id,
                voice=started.voice if started else utterance.voice,
                engine=started.engine if started else None,
                chars=len(request.text),
                key=self._speech.key_of(synthesis)[:12],
                cached=bool(started and started.cached),
                fallback=started.fallback_reason if started else None,
                ttfb_ms=None if ttfb_ms is None else round(ttfb_ms, 1),
                audio_ms=round(audio_format.duration_ms(byte_count), 1) if audio_format else 0.0,
                bytes=byte_count,
                words=words,
                outcome=outcome,
            )
            await events.aclose()

    async def _failed(self, utterance: Utterance, exc: BaseException, *, partial: bool) -> str:
        """Tell the client why ``utterance`` failed; its outcome code."""
        if not isinstance(exc, ClientError):
            logger.error(
                "conn=%s utterance=%r failed", self.connection_id, utterance.id, exc_info=exc
            )
        utterance.finishing = True
        self._stats.errors += 1
        with contextlib.suppress(ConnectionClosed, ClientTooSlow):
            await self._send(encode_error(exc, utterance_id=utterance.id, partial=partial))
        return error_code(exc)

    async def _send_held(self, utterance_id: str, held: list[WordEvent]) -> int:
        """Send the words held back as one ``words`` message, empty ``held``; how many."""
        count = len(held)
        if count:
            await self._send(encode_words(utterance_id, held))
            held.clear()
        return count

    def _request_of(self, utterance: Utterance) -> SynthesisRequest:
        request = utterance.request
        return SynthesisRequest(
            text=request.text,
            voice=utterance.voice,
            rate=request.rate,
            volume=request.volume,
            pitch=request.pitch,
        )

    def _ask_voices(self) -> None:
        """Take a ``voices`` request: it counts toward the rate limit, and waits its turn."""
        self._check_rate()
        if self._voices_wanted >= VOICES_PENDING_MAX:
            raise QueueFull(f"{VOICES_PENDING_MAX} voices replies are already pending")
        self._voices_wanted += 1
        if self._voices_wanted == 1:
            self._spawn(self._answer_voices())

    async def _answer_voices(self) -> None:
        """Answer the pending ``voices`` requests one after another, each once written."""
        try:
            while self._voices_wanted:
                try:
                    voices = await self._speech.voices()
                except ClientError as exc:
                    exc.message_type = "voices"
                    await self._refuse(exc)
                else:
                    await self._send(encode_voices(voices))
                self._voices_wanted -= 1
        finally:
            self._voices_wanted = 0

    def _check_rate(self, utterance_id: str | None = None) -> None:
        """Count one request of this client against its rate limit."""
        if self._admission is not None:
            self._admission.check_rate(self.client_ip, utterance_id)

    async def _send(self, message: bytes | memoryview, *, text: bool = True) -> None:
        """Send one frame; a client that leaves it unread past SEND_TIMEOUT is closed (1008).

        websockets waits while its write buffer is over its limit, so the memory held
        for a client that does not read stays bounded; this bounds the time too.
        """
        ws = self._ws
        if ws.transport.get_write_buffer_size() < SEND_BUFFER_LOW and ws.state is State.OPEN:
            # The common case, with room in the buffer: write the frame now.
            # broadcast() is websockets' synchronous send, without send()'s await
            # and drain, which cost more than the write itself for small frames;
            # the buffer check above is the backpressure it lacks.
            try:
                broadcast((ws,), message, text=text, raise_exceptions=True)
                return
            except ExceptionGroup:
                # The write failed: the connection is broken. Once aborted,
                # send() below raises ConnectionClosed as for any closed connection.
                ws.transport.abort()
        # Waiting for the client to read: what is held back must go out first.
        self._cork(False)
        try:
            async with asyncio.timeout(self._config.send_timeout):
                await self._ws.send(message, text=text)
        except TimeoutError:
            logger.warning(
                "conn=%s closed: client left its audio unread for %.1fs",
                self.connection_id,
                self._config.send_timeout,
            )
            self._spawn(self._close_slow_client())
            raise ClientTooSlow() from None

    def _cork(self, on: bool) -> None:
        """Hold back partial TCP segments (Linux TCP_CORK) while frames go out in a burst.

        Each frame is a write; corked, the frames of a cached utterance leave as a
        few full segments when uncorked instead of one or more segments each, which
        costs the kernel (and the client) less. Only around writes that do not
        wait: corked data is otherwise held for up to 200 ms.
        """
        if on == self._corked or _TCP_CORK is None:
            return
        sock = self._ws.transport.get_extra_info("socket")
        if sock is None:
            return
        with contextlib.suppress(OSError):  # not TCP, or already closed
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, int(on))
            self._corked = on

    async def _close_slow_client(self) -> None:
        """Close with 1008; if the client does not even read that, drop the TCP connection."""
        try:
            # The close frame waits behind the unread audio, which a client that
            # reads again gets first; websockets' close waits for that drain.
            async with asyncio.timeout(SLOW_CLIENT_CLOSE_TIMEOUT):
                await self._ws.close(1008, "client too slow")
        except TimeoutError:
            self._ws.transport.abort()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(_quietly(coroutine))
        self._track(task)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_background(self) -> None:
        if not self._background:
            return
        for task in self._background:
            task.cancel()
        _, late = await asyncio.wait(self._background, timeout=UPSTREAM_CLOSE_TIMEOUT)
        if late:
            logger.warning(
                "conn=%s: %d upstream streams did not close", self.connection_id, len(late)
            )


#: The wire ``type`` of each parsed client message, for the ``for`` of its refusals.
_TYPES: dict[type[ClientMessage], str] = {Speak: "speak", Cancel: "cancel", ListVoices: "voices"}


class ClientTooSlow(Exception):
    """The client did not read what was sent to it within SEND_TIMEOUT."""


def _cancelling() -> bool:
    """Whether the running task is being cancelled (rather than seeing another's cancel)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _source(started: Started | None) -> str:
    """Where an utterance's audio came from, for the time-to-first-audio histogram."""
    if started is not None and started.cached:
        return "cached"
    if started is not None and started.fallback_reason is not None:
        return "fallback"
    return "live"


async def _quietly(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a reply coroutine; a client that left or was closed meanwhile is not an error."""
    with contextlib.suppress(ConnectionClosed, ClientTooSlow):
        await coroutine
