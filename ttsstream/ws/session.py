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
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ttsstream import __version__
from ttsstream.core.router import Started
from ttsstream.core.services import Services
from ttsstream.core.speech_cache import Lookahead
from ttsstream.core.streaming import StreamingText
from ttsstream.core.utterance import ListenerGone, Summary, cut_short
from ttsstream.engines.base import SynthesisRequest, WordEvent
from ttsstream.exceptions import (
    ClientError,
    InvalidParameter,
    NotFound,
    QueueFull,
)
from ttsstream.protocols.v1 import (
    Append,
    Cancel,
    Finish,
    Flush,
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
#: Frames longer than this many characters (or bytes) are followed by one pass of the
#: event loop, so that a client sending large frames back to back (appends of 5,000
#: characters) holds the loop for one frame at a time, not for all it has sent.
YIELD_AFTER_FRAME_CHARS = 1024
#: Seconds a closing session waits for its upstream streams to close before giving up.
UPSTREAM_CLOSE_TIMEOUT = 5.0


@dataclass(eq=False)
class Utterance:
    """A ``speak`` accepted on this connection, queued or playing."""

    request: Speak
    #: What to say, as the speak policy accepted it.
    synthesis: SynthesisRequest
    received_at: float
    #: Its end or error is being sent: too late to cancel.
    finishing: bool = False
    #: Cut by a shutdown before its end.
    cut: bool = False
    #: The text of a streaming utterance, which its appends feed.
    stream: StreamingText | None = None
    #: Its lookup, asked of the cluster with its rate limit (it was to play at once).
    lookahead: Lookahead | None = None

    @property
    def id(self) -> str:
        return self.request.id


class Session:
    """Serve one WebSocket connection until it closes.

    Args:
        websocket: The connection, already past the handshake.
        services: The server's parts.
        client_ip: The client's address, as admission determined it.
    """

    def __init__(self, websocket: ServerConnection, *, services: Services, client_ip: str) -> None:
        self._ws = websocket
        self._config = services.config
        self._speech = services.speech
        self._utterances = services.utterances
        self._admission = services.admission
        self._stats = services.stats
        self.client_ip = client_ip
        self._last_activity = asyncio.get_running_loop().time()
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
        #: ``voices`` requests not answered yet: the locale each asks for.
        self._voices_wanted: deque[str | None] = deque()
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
                if len(frame) > YIELD_AFTER_FRAME_CHARS:
                    # Frames already received come back without a pause: after a large
                    # one, let other clients' work run before the next (bench/NOTES.md).
                    await asyncio.sleep(0)
        except (ConnectionClosed, ClientTooSlow):
            pass
        finally:
            watchdog.cancel()
            for utterance in self._pending:
                self._forget(utterance)
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
    def closed(self) -> bool:
        """Whether the connection is closed (the client left, or was closed)."""
        return self._ws.state is State.CLOSED

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
                self._stats.total_requests += 1
                await self._enqueue(message)
            elif isinstance(message, Cancel):
                await self._cancel(message.id)
            elif isinstance(message, ListVoices):
                await self._ask_voices(message.locale)
            else:
                self._feed(message)
        except ClientError as exc:
            exc.message_type = message.kind
            if isinstance(message, Speak) and not message.id_given:
                exc.utterance_id = None  # the id the server made for it was never announced
            await self._refuse(exc)

    async def _refuse(self, exc: ClientError) -> None:
        """Answer a refused message with an error ``for`` it, which ends no utterance."""
        self._stats.errors += 1
        await self._send(
            encode_error(exc, utterance_id=exc.utterance_id, refused=exc.message_type or "unknown")
        )

    def _new_id(self) -> str:
        return "s-" + secrets.token_hex(6)

    def _feed(self, message: Append | Flush | Finish) -> None:
        """Pass an ``append``, ``flush`` or ``finish`` to its open streaming utterance.

        A refusal answers the message (``for`` it) and ends no utterance.
        """
        current = self._current
        candidates = [*self._pending, *([current] if current is not None else [])]
        utterance = next((u for u in candidates if u.id == message.id), None)
        stream = utterance.stream if utterance is not None and not utterance.finishing else None
        if stream is None:
            raise NotFound("no open streaming utterance has this id", utterance_id=message.id)
        try:
            if isinstance(message, Append):
                stream.append(message.text)
            elif isinstance(message, Flush):
                stream.flush()
            else:
                stream.finish()
        except ClientError as exc:
            exc.utterance_id = message.id
            raise

    async def _enqueue(self, request: Speak) -> None:
        # Before admission, which may ask Redis: the time to first audio includes it.
        received_at = time.perf_counter()
        synthesis = self._utterances.request(
            text=request.text,
            voice=request.voice,
            rate=request.rate,
            volume=request.volume,
            pitch=request.pitch,
            cleanup=request.cleanup,
        )
        # A speak that plays at once is looked up in the cluster with its rate limit.
        lookahead = (
            self._utterances.look_ahead(synthesis)
            if self._current is None
            and not self._pending
            and not request.stream
            and not request.format.transcoded
            else None
        )
        try:
            await self._accept(request, synthesis, lookahead)
        except BaseException:
            if lookahead is not None:
                lookahead.close()
            raise
        stream = None
        if request.stream:
            stream = self._utterances.open_stream(cleanup=request.cleanup)
            if request.text:
                stream.append(request.text)
        self._ids.add(request.id)
        self._idle.clear()
        self._pending.append(
            Utterance(
                request=request,
                synthesis=synthesis,
                received_at=received_at,
                stream=stream,
                lookahead=lookahead,
            )
        )
        self._wakeup.set()

    async def _accept(
        self, request: Speak, synthesis: SynthesisRequest, lookahead: Lookahead | None
    ) -> None:
        """The speak policy and this connection's own checks; raise why not."""
        await self._admission.check_rate(self.client_ip, request.id, lookahead=lookahead)
        await self._utterances.accept(synthesis, utterance_id=request.id)
        if request.id in self._ids:
            raise InvalidParameter(
                f"id {request.id!r} is already queued or playing", utterance_id=request.id
            )
        # The first pending utterance is about to play when nothing is playing yet.
        waiting = len(self._pending) - (1 if self._current is None and self._pending else 0)
        if waiting >= self._config.queue_size:
            raise QueueFull(
                f"{self._config.queue_size} "
                + ("utterance is" if self._config.queue_size == 1 else "utterances are")
                + " already waiting",
                utterance_id=request.id,
            )

    async def _cancel(self, utterance_id: str | None) -> None:
        current = self._current
        playing = current if current is not None and not current.finishing else None
        if utterance_id is None:
            queued = list(self._pending)
            self._pending.clear()
            if playing is not None:
                await self._cancel_playing(playing)
            for utterance in queued:
                self._forget(utterance)
                await self._send(encode_cancelled(utterance.id))
            return
        if playing is not None and playing.id == utterance_id:
            await self._cancel_playing(playing)
            return
        for utterance in self._pending:
            if utterance.id == utterance_id:
                self._pending.remove(utterance)
                self._forget(utterance)
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
        speaker = self._speaker
        assert speaker is not None
        current = self._current
        queued = list(self._pending)
        self._pending.clear()
        if current is not None and not current.finishing:
            # The utterance run tells the client, then the speaker ends.
            current.cut = True
            speaker.cancel()
            self._track(speaker)
            await asyncio.wait({speaker}, timeout=UPSTREAM_CLOSE_TIMEOUT)
        for utterance in queued:
            self._forget(utterance)
            self._stats.errors += 1
            await self._send(encode_error(cut_short(), utterance_id=utterance.id))
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
                await self._utterances.run(
                    utterance.synthesis,
                    _Frames(self, utterance),
                    words=utterance.request.words,
                    audio_format=utterance.request.format,
                    utterance_id=utterance.id,
                    received_at=utterance.received_at,
                    client_ip=self.client_ip,
                    connection=self.connection_id,
                    interface="ws",
                    stream=utterance.stream,
                    lookahead=utterance.lookahead,
                )
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

    def _forget(self, utterance: Utterance) -> None:
        """A queued utterance will not play: its id is free, its text's timers stop."""
        self._ids.discard(utterance.id)
        if utterance.stream is not None:
            utterance.stream.close()
        if utterance.lookahead is not None:
            utterance.lookahead.close()

    def _played(self, utterance: Utterance) -> None:
        """The utterance is over (spoken, failed or cancelled): the next one may play."""
        if utterance.stream is not None:
            utterance.stream.close()
        if utterance.lookahead is not None:
            utterance.lookahead.close()
        self._current = None
        self._ids.discard(utterance.id)
        self._last_activity = asyncio.get_running_loop().time()

    async def _ask_voices(self, locale: str | None) -> None:
        """Take a ``voices`` request: it counts toward the rate limit, and waits its turn."""
        await self._admission.check_rate(self.client_ip)
        if len(self._voices_wanted) >= VOICES_PENDING_MAX:
            raise QueueFull(f"{VOICES_PENDING_MAX} voices replies are already pending")
        self._voices_wanted.append(locale)
        if len(self._voices_wanted) == 1:
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
                    await self._send(encode_voices(voices, locale=self._voices_wanted[0]))
                self._voices_wanted.popleft()
        finally:
            self._voices_wanted.clear()

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
        # Not TCP, or already closed (asyncio's socket then raises OSError, uvloop's
        # ValueError).
        with contextlib.suppress(OSError, ValueError):
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


class ClientTooSlow(ListenerGone):
    """The client did not read what was sent to it within SEND_TIMEOUT."""

    outcome = "too_slow"


class _Frames:
    """One utterance's events as protocol v1 frames on its connection (a :class:`Sink`)."""

    def __init__(self, session: Session, utterance: Utterance) -> None:
        self._session = session
        self._utterance = utterance
        self._id = utterance.id

    @property
    def cut(self) -> bool:
        return self._utterance.cut

    @property
    def gone(self) -> bool:
        return self._session.closed

    async def start(self, started: Started) -> None:
        if started.cached:
            # A replay is written in one burst, as a few full TCP segments.
            self._session._cork(True)
        await self._send(
            encode_start(
                self._id,
                voice=started.voice,
                engine=started.engine,
                mime_type=started.audio_format.mime_type,
                format_name=started.audio_format.name,
                sample_rate=started.audio_format.sample_rate,
                cached=started.cached,
                fallback_reason=started.fallback_reason,
                stream=self._utterance.stream is not None,
            )
        )

    async def audio(self, data: bytes | memoryview) -> None:
        await self._send(data, text=False)

    async def word(self, word: WordEvent) -> None:
        await self._send(encode_word(self._id, word))

    async def words(self, words: Sequence[WordEvent]) -> None:
        await self._send(encode_words(self._id, words))

    async def end(self, summary: Summary) -> None:
        self._utterance.finishing = True
        await self._send(
            encode_end(
                self._id,
                byte_count=summary.byte_count,
                audio_ms=summary.audio_ms,
                words=summary.words,
                cached=summary.cached,
                ttfb_ms=summary.ttfb_ms,
                segments=summary.segments,
            )
        )

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        self._utterance.finishing = True
        await self._send(encode_error(exc, utterance_id=self._id, partial=partial))

    def finished(self) -> None:
        self._session._cork(False)

    async def _send(self, message: bytes | memoryview, *, text: bool = True) -> None:
        try:
            await self._session._send(message, text=text)
        except ConnectionClosed:
            raise ListenerGone() from None


def _cancelling() -> bool:
    """Whether the running task is being cancelled (rather than seeing another's cancel)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _quietly(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a reply coroutine; a client that left or was closed meanwhile is not an error."""
    with contextlib.suppress(ConnectionClosed, ClientTooSlow):
        await coroutine
