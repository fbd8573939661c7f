"""What every WebSocket connection shares, whichever protocol it speaks.

A connection has two tasks. The reader turns frames into actions through its
protocol (:mod:`ttsstream.protocols`) and carries them out at once (refusals,
cancels; voice lists are answered one at a time by a task of their own); the
speaker takes utterances from a bounded queue in the order received and streams
each one's events to the client through the protocol's sink. Every frame of an
utterance therefore goes out between its start and its end.

What a protocol's connection adds (:class:`Connection`'s hooks): how a frame
becomes actions, how an utterance's events become frames (its sink), and how a
refusal, a cancel, a cut and a voice list are written. What it inherits: timed
writes and the slow-client close (``SEND_TIMEOUT``), the idle watchdog
(``IDLE_TIMEOUT``), tracked background tasks, the queue (``QUEUE_SIZE``) and the
cancel of utterances by id, the feeding of streaming utterances, and its part in
a drain (:class:`Connections`, a :class:`~ttsstream.doors.Door`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from ttsstream.core.context import Principal, RequestContext
from ttsstream.core.speech_cache import Lookahead
from ttsstream.core.ssml import SsmlDocument
from ttsstream.core.streaming import StreamingText
from ttsstream.core.utterance import ListenerGone, Sink, cut_short
from ttsstream.engines.base import SynthesisRequest, Voice
from ttsstream.exceptions import (
    BadMessage,
    ClientError,
    InvalidParameter,
    KeyRefused,
    KeyRevoked,
    NotFound,
    QueueFull,
    ResumeFailed,
)
from ttsstream.protocols.actions import (
    Action,
    Append,
    Cancel,
    CloseSocket,
    Finish,
    Flush,
    ListVoices,
    Reply,
    Resume,
    Speak,
)
from ttsstream.services import Services
from ttsstream.ws.resume import Logs, new_token

__all__ = ["ClientTooSlow", "Connection", "Connections", "Utterance"]

logger = logging.getLogger("ttsstream.ws")

#: Below this many bytes waiting in the write buffer, a frame is written at once,
#: without waiting for a drain (websockets waits only above its 32 KiB write limit).
SEND_BUFFER_LOW = 16 * 2**10
#: Seconds a client closed for not reading has to read what is queued and the close frame.
SLOW_CLIENT_CLOSE_TIMEOUT = 10.0
#: Voice-list requests of one connection waiting for their reply; more are refused
#: (``queue_full``). One reply is written at a time, like audio: a client that does
#: not read its replies holds one of them, never one per request.
VOICES_PENDING_MAX = 4
#: Frames longer than this many characters (or bytes) are followed by one pass of the
#: event loop, so that a client sending large frames back to back (appends of 5,000
#: characters) holds the loop for one frame at a time, not for all it has sent.
YIELD_AFTER_FRAME_CHARS = 1024
#: Seconds a closing session waits for its upstream streams to close before giving up.
UPSTREAM_CLOSE_TIMEOUT = 5.0
#: Seconds a connection admitted without a key (its protocol takes the key in its first
#: message) has to send that message; then it is closed, its slot free again.
FIRST_MESSAGE_TIMEOUT = 10.0


@dataclass(eq=False)
class Utterance:
    """A ``speak`` (or a protocol's context) accepted on this connection, queued or playing."""

    request: Speak
    #: What to say, as the speak policy accepted it.
    synthesis: SynthesisRequest
    received_at: float
    #: Its end or error is being sent: too late to cancel.
    finishing: bool = False
    #: Why the server cut it before its end (a shutdown), if it did.
    cut: ClientError | None = None
    #: The text of a streaming utterance, which its appends feed.
    stream: StreamingText | None = None
    #: Its lookup, asked of the cluster with its rate limit (it was to play at once).
    lookahead: Lookahead | None = None
    #: An SSML utterance's spans.
    document: SsmlDocument | None = None

    @property
    def id(self) -> str:
        return self.request.id


class Connection:
    """Serve one WebSocket connection until it closes (subclassed per protocol).

    Args:
        websocket: The connection, already past the handshake.
        services: The server's parts.
        context: Who was admitted, from where (its ``connection`` is this one's id).
        path: The request's path and query.
        params: The values of the route's ``{name}`` parts (a voice id…).
        key_pending: The handshake brought no key and the server needs one: the
            first message must (:meth:`first_message_key`), else the connection closes.
    """

    #: The door's stats label (``ws``, ``elevenlabs``…).
    label: ClassVar[str] = "ws"
    #: Utterances spoken at the same time (their frames interleave: a protocol whose
    #: every message names its utterance, as ElevenLabs' and Cartesia's contexts do).
    #: 1: one after another, in the order received (protocol v1's promise).
    parallel: ClassVar[int] = 1
    #: A dropped connection's utterances may be resumed on a new one (``resume``).
    resumable: ClassVar[bool] = False

    def __init__(
        self,
        websocket: ServerConnection,
        *,
        services: Services,
        context: RequestContext,
        path: str = "/",
        params: Mapping[str, str] | None = None,
        key_pending: bool = False,
    ) -> None:
        self._ws = websocket
        self._config = services.config
        self._speech = services.speech
        self._utterances = services.utterances
        self._admission = services.admission
        self._stats = services.stats
        self.context = context
        self.client_ip = context.client_ip
        self.connection_id = context.connection
        self.path = path
        self.params: Mapping[str, str] = params or {}
        self.key_pending = key_pending
        self._last_activity = asyncio.get_running_loop().time()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending: deque[Utterance] = deque()
        self._wakeup = asyncio.Event()
        #: The utterances being spoken, by the speaker task speaking each.
        self._playing: dict[asyncio.Task[None], Utterance] = {}
        #: The tasks that speak the queue (``parallel`` of them).
        self._speakers: set[asyncio.Task[None]] = set()
        #: Frames are held back in websockets' outgoing data: a cached utterance is
        #: being written in a burst (see :meth:`cork`).
        self._corked = False
        self._ids: set[str] = set()
        #: Voice-list requests not answered yet: the locale each asks for.
        self._voices_wanted: deque[str | None] = deque()
        # Tasks that outlive the frame that started them: voice lists, upstreams closing.
        self._background: set[asyncio.Task[None]] = set()
        # Resuming (ttsstream.ws.resume): the frames of each utterance as sent, and
        # whether a live socket takes them.
        parking = services.parking
        self._parking = parking if self.resumable and parking.enabled else None
        #: The token a new connection resumes this one with (``None``: it cannot be).
        self.session = new_token() if self._parking is not None else None
        self._logs = Logs()
        self._frames_received = 0
        self._watchdog: asyncio.Task[None] | None = None
        self._attached = True
        self._resumed = asyncio.Event()
        self._giving_up = asyncio.Event()
        #: Resolved once this connection stops using its socket (a resume's shell waits).
        self._socket_lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # What a protocol's connection says

    def greeting(self) -> bytes | None:
        """The frame sent on connect, if the protocol has one."""
        return None

    def parse(self, frame: str | bytes) -> Sequence[Action]:
        """The actions one client frame asks for.

        Raises:
            ClientError: The frame is refused (its ``utterance_id`` and
                ``message_type`` say which message, where known).
        """
        raise NotImplementedError

    def sink(self, utterance: Utterance) -> Sink:
        """Where the utterance's events go: its frames on this connection."""
        raise NotImplementedError

    def words_mode(self, utterance: Utterance) -> str:
        """How the run gives the utterance's word boundaries (``each``, ``batch``, ``none``)."""
        return utterance.request.words

    def encode_refusal(self, exc: ClientError) -> bytes | None:
        """The frame answering a refused message (it ends no utterance)."""
        raise NotImplementedError

    def encode_cancelled(self, utterance_id: str) -> bytes | None:
        """The frame saying the utterance was cancelled (``None``: the protocol sends none)."""
        return None

    def encode_cut(self, utterance_id: str) -> bytes | None:
        """The frame telling a queued utterance it was cut by a shutdown."""
        return None

    def encode_voices(self, voices: Sequence[Voice], locale: str | None) -> bytes:
        """The frame answering a voice-list request."""
        raise NotImplementedError

    def refused(self, action: Action, exc: ClientError) -> None:
        """An action of a parsed frame was refused (a speak over the rate limit, the
        queue full…): the protocol may forget what the frame opened."""

    def first_message_key(self) -> str | None:
        """The key the first message carried (parsed already), for a protocol that takes
        one there; ``None``: none."""
        return None

    # The connection's life

    async def run(self) -> None:
        """Greet the client, then serve its frames until the connection closes (or, if it
        dropped and is resumed, until the new one closes)."""
        for _ in range(self.parallel):
            self._new_speaker()
        watchdog = self._watchdog = asyncio.create_task(self._close_when_idle())
        try:
            greeting = self.greeting()
            if greeting is not None:
                await self.send(greeting)
            while True:
                try:
                    async for frame in self._ws:
                        self._frames_received += 1
                        self._last_activity = asyncio.get_running_loop().time()
                        await self._on_frame(frame)
                        if len(frame) > YIELD_AFTER_FRAME_CHARS:
                            # Frames already received come back without a pause: after a
                            # large one, let other clients' work run before the next
                            # (bench/NOTES.md).
                            await asyncio.sleep(0)
                except (ConnectionClosed, ClientTooSlow):
                    pass
                if not await self._wait_for_resume():
                    break
                if watchdog.done():
                    watchdog = self._watchdog = asyncio.create_task(self._close_when_idle())
        finally:
            self._lose_socket()
            if self._parking is not None:
                self._parking.buffers.release(self._logs)
            watchdog.cancel()
            for utterance in self._pending:
                self._forget(utterance)
            # Closing the upstream of an utterance being spoken may take a while: the
            # speakers are waited for with the other background tasks, for a bounded time.
            for speaker in self._speakers:
                speaker.cancel()
                self._track(speaker)
            await asyncio.wait({watchdog})
            await self._close_background()

    async def _close_when_idle(self) -> None:
        """Close with 1000 "idle" after IDLE_TIMEOUT without a message or an utterance."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._last_activity + self.idle_timeout
            if loop.time() < deadline:
                await asyncio.sleep(deadline - loop.time())
                continue
            if self._playing or self._pending:
                # Speaking is not idleness: count from the end of the last utterance.
                self._last_activity = loop.time()
                continue
            logger.info("conn=%s closed: idle for %.0fs", self.connection_id, self.idle_timeout)
            await self._ws.close(1000, "idle")
            return

    @property
    def idle_timeout(self) -> float:
        """Seconds without a message or an utterance before the connection is closed:
        ``IDLE_TIMEOUT``, or ``FIRST_MESSAGE_TIMEOUT`` while the key is still to come."""
        return FIRST_MESSAGE_TIMEOUT if self.key_pending else self._config.idle_timeout

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (the client left, or was closed)."""
        return self._ws.state is State.CLOSED

    @property
    def utterances_in_progress(self) -> int:
        """Utterances queued or playing."""
        return len(self._pending) + len(self._playing)

    async def wait_idle(self) -> None:
        """Return once no utterance is queued or playing."""
        await self._idle.wait()

    async def _on_frame(self, frame: str | bytes) -> None:
        try:
            actions = self.parse(frame)
        except ClientError as exc:
            if exc.message_type == "speak":
                self._stats.total_requests += 1  # a refused speak is a request too
            await self._refuse(exc)
            if self.key_pending:
                await self.close(1008, "unauthorized")
            return
        if self.key_pending:
            # The handshake had no key: the first message brings it, or the connection ends.
            self.key_pending = False
            try:
                request = self._ws.request
                origin = request.headers.get("Origin") if request is not None else None
                principal = self._admission.check_key(self.first_message_key(), origin)
            except KeyRefused as exc:
                await self._refuse(exc)
                await self.close(1008, "unauthorized")
                return
            self.context = dataclasses.replace(self.context, principal=principal)
        for action in actions:
            if not await self._carry_out(action):
                return

    async def _carry_out(self, action: Action) -> bool:
        """Do what one action asks; whether the frame's next actions may follow."""
        try:
            if isinstance(action, Speak):
                self._stats.total_requests += 1
                await self.enqueue(action)
            elif isinstance(action, Cancel):
                await self.cancel(action.id)
            elif isinstance(action, ListVoices):
                await self._ask_voices(action.locale)
            elif isinstance(action, Reply):
                await self.send(action.data)
            elif isinstance(action, CloseSocket):
                self._spawn(self._close_when_done(action))
            elif isinstance(action, Resume):
                await self._take_over(action)
            else:
                self.feed(action)
        except ClientError as exc:
            self.refused(action, exc)
            exc.message_type = exc.message_type or action.kind
            if isinstance(action, Speak) and not action.id_given:
                exc.utterance_id = None  # the id the server made for it was never announced
            await self._refuse(exc)
            return False
        return True

    # Resuming

    async def send_utterance(
        self, utterance_id: str, message: bytes | memoryview, *, text: bool = True
    ) -> None:
        """:meth:`send_for` of one utterance's frame, kept for a resume; while the client
        is away (or being caught up) it is only kept."""
        if self._parking is not None:
            self._parking.buffers.add(self._logs, self._logs.open(utterance_id), message, text)
            if not self._attached:
                return
            try:
                await self.send(message, text=text)
            except ConnectionClosed:
                return  # kept: the reader sees the drop and parks the connection
            return
        await self.send_for(message, text=text)

    async def _wait_for_resume(self) -> bool:
        """The socket dropped: park this connection (its utterances go on into their
        logs) until a ``resume`` brings a new socket (``True``), or the window ends."""
        parking = self._parking
        if parking is None or not parking.enabled or self.session is None:
            return False
        # Only a connection that ended without a closing handshake (the network went away).
        if self._ws.close_code != CloseCode.ABNORMAL_CLOSURE:
            return False  # the client closed, or the server did: nothing to come back to
        live = [log for log in self._logs.by_id.values() if not log.dropped]
        if not (live or self._pending or self._playing):
            return False
        principal, client = self.context.principal, self.client_ip
        # Parked, it counts as a connection (in the dropped one's place: not refused).
        await self._admission.hold(client, principal)
        if not parking.park(self.session, self):
            self._admission.release(client, principal)
            return False
        self._attached = False
        self._lose_socket()
        self._resumed.clear()
        logger.info("conn=%s dropped: parked for %.0fs", self.connection_id, parking.window)
        try:
            resumed = asyncio.create_task(self._resumed.wait())
            given_up = asyncio.create_task(self._giving_up.wait())
            try:
                await asyncio.wait(
                    {resumed, given_up}, timeout=parking.window, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                resumed.cancel()
                given_up.cancel()
        finally:
            parking.unpark(self.session)
            self._admission.release(client, principal)
        if not self._resumed.is_set():
            logger.info("conn=%s not resumed", self.connection_id)
        return self._resumed.is_set()

    def give_up_parking(self) -> None:
        """Stop waiting for a resume (the server stops)."""
        self._giving_up.set()

    def _lose_socket(self) -> None:
        if not self._socket_lost.done():
            self._socket_lost.set_result(None)

    async def _take_over(self, resume: Resume) -> None:
        """Hand this socket to the parked connection ``resume`` names; then wait, as its
        shell, until that connection stops using it.

        Raises:
            ResumeFailed: None is parked under that token for this key.
        """
        parking = self._parking
        if parking is None:
            raise ResumeFailed("this server does not resume connections", reason="disabled")
        if self._frames_received != 1 or self._logs.by_id or self._pending or self._playing:
            raise BadMessage("resume is a new connection's first message")
        parked = parking.claim(resume.session, self.context.principal)
        if self._watchdog is not None:
            self._watchdog.cancel()  # the parked connection watches the socket now
        # One socket, one open connection: the parked one counts it while it uses it.
        self._stats.connections -= 1
        try:
            lost = await parked.attach(self._ws, self.context, resume)
            self._attached = False  # a shell: nothing of its own is sent any more
            self._parking = None
            await asyncio.shield(lost)
        finally:
            self._stats.connections += 1

    async def attach(
        self, websocket: ServerConnection, context: RequestContext, resume: Resume
    ) -> asyncio.Future[None]:
        """Take ``websocket`` (a new connection's) for this parked one: answer ``resumed``,
        send each utterance's frames from where the client's copy stopped, then go on
        live; the future resolves once this connection stops using the socket."""
        old_id = self.connection_id
        self._ws = websocket
        self.context = dataclasses.replace(
            self.context, client_ip=context.client_ip, connection=context.connection
        )
        self.client_ip = context.client_ip
        self.connection_id = context.connection
        self._socket_lost = asyncio.get_running_loop().create_future()
        lost = self._socket_lost
        self._resumed.set()
        logger.info("conn=%s resumed on %s", old_id, context.connection)
        with contextlib.suppress(ConnectionClosed, ClientTooSlow):
            # Dropped again while catching up: the reader parks it again.
            await self._catch_up(resume)
        return lost

    async def _catch_up(self, resume: Resume) -> None:
        asked = {at.id: at for at in resume.utterances}
        held = {utterance.id: utterance for utterance in self._utterances_held()}

        def received(uid: str) -> int | None:
            """A streaming utterance's characters of text received (``None``: not one)."""
            utterance = held.get(uid)
            stream = utterance.stream if utterance is not None else None
            return stream.total if stream is not None else None

        resumed: list[tuple[str, int, int | None]] = []
        lost: list[str] = []
        plan: list[list[Any]] = []
        for uid, at in asked.items():
            log = self._logs.by_id.get(uid)
            if log is None and uid in held and at.offset == 0 and not at.frames:
                resumed.append((uid, 0, received(uid)))  # it plays in its turn, from its start
                continue
            if log is None or log.dropped:
                lost.append(uid)
                continue
            try:
                index, skip = log.start(at.offset, at.frames)
            except ValueError:
                lost.append(uid)
                continue
            resumed.append((uid, at.offset, received(uid)))
            plan.append([log, index, skip])
        for uid, log in list(self._logs.by_id.items()):
            if uid in asked:
                continue
            if log.ended_at is None and not log.dropped:
                resumed.append((uid, 0, received(uid)))  # begun while away, unknown to it
                plan.append([log, 0, 0])
        # What cannot be resumed stops here, so that the client may ask it again.
        for uid in lost:
            await self._drop_lost(uid)
        assert self.session is not None
        buffers = self._parking.buffers if self._parking is not None else None
        known = set(self._logs.by_id)
        planned = {id(item[0]) for item in plan}
        for item in plan:
            if buffers is not None:
                buffers.pin(item[0])  # not dropped while it is being caught up
        try:
            await self.send(self.encode_resumed(self.session, resumed, lost))
            while True:
                sent = False
                # Utterances that began while catching up: from their start.
                for uid, log in list(self._logs.by_id.items()):
                    if uid not in known and id(log) not in planned:
                        planned.add(id(log))
                        plan.append([log, 0, 0])
                        if buffers is not None:
                            buffers.pin(log)
                for item in plan:
                    log, index, skip = item
                    while index < len(log.frames) and not log.dropped:
                        frame, text, _ = log.frames[index]
                        await self.send(memoryview(frame)[skip:] if skip else frame, text=text)
                        index, skip, sent = index + 1, 0, True
                    item[1], item[2] = index, 0
                if not sent:
                    break
            # No await between the last check and this: every later frame goes out live.
            self._attached = True
            self._wakeup.set()  # the queue goes on
        finally:
            if buffers is not None:
                for item in plan:
                    buffers.unpin(self._logs, item[0])

    async def _drop_lost(self, utterance_id: str) -> None:
        """Stop an utterance reported lost on a resume (its frames were dropped)."""
        for utterance in list(self._pending):
            if utterance.id == utterance_id:
                self._pending.remove(utterance)
                self._forget(utterance)
        for utterance in list(self._playing.values()):
            if utterance.id == utterance_id and not utterance.finishing:
                await self._cancel_playing(utterance)

    def encode_resumed(
        self, session: str, resumed: Sequence[tuple[str, int, int | None]], lost: Sequence[str]
    ) -> bytes:
        """The answer to a ``resume`` (a resumable protocol says how)."""
        raise NotImplementedError

    async def _refuse(self, exc: ClientError) -> None:
        """Answer a refused message with the protocol's refusal, which ends no utterance."""
        self._stats.errors += 1
        frame = self.encode_refusal(exc)
        if frame is not None:
            await self.send(frame)

    async def _close_when_done(self, close: CloseSocket) -> None:
        """Finish the texts still open, let every utterance end, then close."""
        for utterance in self._utterances_held():
            if utterance.stream is not None:
                utterance.stream.finish()
        await self._idle.wait()
        await self._ws.close(close.code, close.reason)

    def _utterances_held(self) -> list[Utterance]:
        return [*self._playing.values(), *self._pending]

    def feed(self, message: Append | Flush | Finish) -> None:
        """Pass an append, a flush or a finish to its open streaming utterance.

        Raises:
            NotFound: No open streaming utterance has its id.
            ClientError: The streaming text refuses it (too long…).
        """
        utterance = next((u for u in self._utterances_held() if u.id == message.id), None)
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

    def has_utterance(self, utterance_id: str) -> bool:
        """Whether an utterance with this id is queued or playing."""
        return utterance_id in self._ids

    async def enqueue(self, request: Speak) -> None:
        """Accept an utterance (the rate limit, the speak policy, this connection's
        queue) and queue it; raise why not."""
        # Before admission, which may ask Redis: the time to first audio includes it.
        received_at = time.perf_counter()
        document = None
        if request.ssml:
            try:
                synthesis, document = self._utterances.ssml(request.text, voice=request.voice)
            except ClientError as exc:
                exc.utterance_id = request.id
                raise
        else:
            synthesis = self._utterances.request(
                text=request.text,
                voice=request.voice,
                rate=request.rate,
                volume=request.volume,
                pitch=request.pitch,
                cleanup=request.cleanup,
                client=self.client_ip,
            )
        # A speak that plays at once is looked up in the cluster with its rate limit.
        lookahead = (
            self._utterances.look_ahead(synthesis)
            if len(self._playing) + len(self._pending) < self.parallel
            and not request.stream
            and document is None
            and not request.format.transcoded
            else None
        )
        try:
            await self._accept(request, synthesis, lookahead, document)
        except BaseException:
            if lookahead is not None:
                lookahead.close()
            raise
        stream = None
        if request.stream:
            stream = self._utterances.open_stream(
                cleanup=request.cleanup,
                min_chars=request.min_chars,
                max_wait_ms=request.max_wait_ms,
            )
            if request.text:
                stream.append(request.text)
        self._ids.add(request.id)
        if self._parking is not None:
            self._parking.buffers.discard(self._logs, request.id)  # an earlier one's
        self._idle.clear()
        self._pending.append(
            Utterance(
                request=request,
                synthesis=synthesis,
                received_at=received_at,
                stream=stream,
                lookahead=lookahead,
                document=document,
            )
        )
        self._wakeup.set()

    async def _accept(
        self,
        request: Speak,
        synthesis: SynthesisRequest,
        lookahead: Lookahead | None,
        document: SsmlDocument | None = None,
    ) -> None:
        """The speak policy and this connection's own checks; raise why not."""
        # The tenant's limits as the keys file says now (it may have been reloaded).
        principal = self._admission.keys.current(self.context.principal)
        if principal is not self.context.principal:
            self.context = dataclasses.replace(self.context, principal=principal)
        await self._admission.check_rate(
            self.client_ip, request.id, lookahead=lookahead, principal=self.context.principal
        )
        await self._utterances.accept(synthesis, utterance_id=request.id, document=document)
        if request.id in self._ids:
            raise InvalidParameter(
                f"id {request.id!r} is already queued or playing", utterance_id=request.id
            )
        await self._utterances.allow(
            synthesis,
            self.context,
            utterance_id=request.id,
            streamed=request.stream,
            document=document,
        )
        # Pending utterances about to play in a free speaker are not waiting; this one
        # would wait if no speaker is left for it (QUEUE_SIZE=0: none may wait).
        free = self.parallel - len(self._playing)
        if len(self._pending) + 1 - free > self._config.queue_size:
            raise QueueFull(
                f"{self._config.queue_size} "
                + ("utterance is" if self._config.queue_size == 1 else "utterances are")
                + " already waiting",
                utterance_id=request.id,
            )

    async def cancel(self, utterance_id: str | None) -> None:
        """Cancel one utterance, or every one of the connection's (``None``).

        Raises:
            NotFound: No queued or playing utterance has the id.
        """
        playing = [u for u in self._playing.values() if not u.finishing]
        if utterance_id is None:
            queued = list(self._pending)
            self._pending.clear()
            for utterance in playing:
                await self._cancel_playing(utterance)
            for utterance in queued:
                self._forget(utterance)
                await self._send_cancelled(utterance.id)
            return
        for utterance in playing:
            if utterance.id == utterance_id:
                await self._cancel_playing(utterance)
                return
        for utterance in self._pending:
            if utterance.id == utterance_id:
                self._pending.remove(utterance)
                self._forget(utterance)
                await self._send_cancelled(utterance.id)
                return
        raise NotFound("no queued or playing utterance has this id", utterance_id=utterance_id)

    async def _send_cancelled(self, utterance_id: str) -> None:
        frame = self.encode_cancelled(utterance_id)
        if frame is None:
            return
        if self._parking is None:
            await self.send(frame)
            return
        # Kept with the utterance's frames: a client that missed it gets it on a resume.
        await self.send_utterance(utterance_id, frame)
        log = self._logs.by_id.get(utterance_id)
        if log is not None and log.ended_at is None:
            self._parking.buffers.ended(self._logs, log)

    async def cut(self) -> None:
        """End what is playing or queued with ``shutting_down`` (the server stops now).

        The playing utterance's error says whether its audio is partial; queued
        ones never started. Nothing more of them is sent. A client that left or
        does not read is no error here.
        """
        with contextlib.suppress(ConnectionClosed, ClientTooSlow):
            await self._cut()

    async def _cut(self) -> None:
        queued = list(self._pending)
        self._pending.clear()
        cutting = {task for task, u in self._playing.items() if not u.finishing}
        for speaker in cutting:
            # The utterance run tells the client, then the speaker ends.
            self._playing[speaker].cut = cut_short()
            speaker.cancel()
            self._track(speaker)
        if cutting:
            await asyncio.wait(cutting, timeout=UPSTREAM_CLOSE_TIMEOUT)
        for utterance in queued:
            self._forget(utterance)
            self._stats.errors += 1
            frame = self.encode_cut(utterance.id)
            if frame is not None:
                await self.send(frame)
        self._idle.set()

    async def _cancel_playing(self, utterance: Utterance) -> None:
        """Stop the speaker where it is and hand the queue to a new one.

        The speaker stops at its next await and sends nothing more of the
        utterance; closing its upstream may take a moment, which the next
        utterance need not wait for. The cancel's frame is sent before this
        returns, so replies keep the order of requests.
        """
        speaker = next(task for task, u in self._playing.items() if u is utterance)
        speaker.cancel()
        self._track(speaker)
        self._speakers.discard(speaker)
        self._played(utterance)
        try:
            await self._send_cancelled(utterance.id)
        finally:
            self._new_speaker()

    def _new_speaker(self) -> None:
        self._speakers.add(asyncio.create_task(self._speak_in_order()))

    async def _speak_in_order(self) -> None:
        """Speak the queue, one utterance at a time, in this task (no task per utterance;
        ``parallel`` such tasks share the queue)."""
        me = asyncio.current_task()
        assert me is not None
        while True:
            # While the client is away, what is queued waits (nothing spoken to nobody).
            while not self._pending or not self._attached:
                if not self._playing:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            utterance = self._pending.popleft()
            self._playing[me] = utterance
            try:
                await self._utterances.run(
                    utterance.synthesis,
                    self.sink(utterance),
                    words=self.words_mode(utterance),
                    audio_format=utterance.request.format,
                    utterance_id=utterance.id,
                    received_at=utterance.received_at,
                    context=self.context,
                    stream=utterance.stream,
                    lookahead=utterance.lookahead,
                    document=utterance.document,
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
                if self._playing.get(me) is utterance:  # else a cancel already moved on
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
        for speaker, playing in list(self._playing.items()):
            if playing is utterance:
                del self._playing[speaker]
        self._ids.discard(utterance.id)
        if self._parking is not None:
            log = self._logs.by_id.get(utterance.id)
            if log is not None:
                buffers = self._parking.buffers
                buffers.ended(self._logs, log)
                buffers.prune(self._logs, time.monotonic() - self._parking.window)
        self._last_activity = asyncio.get_running_loop().time()

    async def _ask_voices(self, locale: str | None) -> None:
        """Take a voice-list request: it counts toward the rate limit, and waits its turn."""
        await self._admission.check_rate(self.client_ip, principal=self.context.principal)
        if len(self._voices_wanted) >= VOICES_PENDING_MAX:
            raise QueueFull(f"{VOICES_PENDING_MAX} voices replies are already pending")
        self._voices_wanted.append(locale)
        if len(self._voices_wanted) == 1:
            self._spawn(self._answer_voices())

    async def _answer_voices(self) -> None:
        """Answer the pending voice-list requests one after another, each once written."""
        try:
            while self._voices_wanted:
                try:
                    voices = await self._speech.voices()
                except ClientError as exc:
                    exc.message_type = "voices"
                    await self._refuse(exc)
                else:
                    await self.send(self.encode_voices(voices, self._voices_wanted[0]))
                self._voices_wanted.popleft()
        finally:
            self._voices_wanted.clear()

    async def close(self, code: int, reason: str) -> None:
        """Close the connection (a protocol's own close: a bad key, a socket it was asked
        to close)."""
        await self._ws.close(code, reason)

    async def end_revoked(self) -> None:
        """Its key was revoked: say so (``key_revoked``) and close (1008); what was
        playing ends with the connection."""
        with contextlib.suppress(ListenerGone, ConnectionClosed):
            await self._refuse(KeyRevoked("this connection's API key was revoked"))
        await self.close(1008, "key revoked")

    async def send(self, message: bytes | memoryview, *, text: bool = True) -> None:
        """Send one frame; a client that leaves it unread past SEND_TIMEOUT is closed (1008).

        websockets waits while its write buffer is over its limit, so the memory held
        for a client that does not read stays bounded; this bounds the time too.

        Raises:
            ConnectionClosed: The connection is closed.
            ClientTooSlow: The client did not read within SEND_TIMEOUT.
        """
        ws = self._ws
        if ws.transport.get_write_buffer_size() < SEND_BUFFER_LOW and ws.state is State.OPEN:
            # The common case, with room in the buffer: write the frame now, or, held
            # back, frame it into websockets' outgoing data (its Sans-I/O protocol),
            # written with the rest of the burst by cork(False). broadcast() is
            # websockets' synchronous send, without send()'s await and drain, which
            # cost more than the write itself for small frames; the buffer check
            # above is the backpressure it lacks.
            try:
                if not self._corked:
                    broadcast((ws,), message, text=text, raise_exceptions=True)
                elif text:
                    ws.protocol.send_text(message)
                else:
                    ws.protocol.send_binary(message)
                return
            except Exception:
                # The write failed: the connection is broken. Once aborted,
                # send() below raises ConnectionClosed as for any closed connection.
                ws.transport.abort()
        # Waiting for the client to read: what is held back must go out first.
        self.cork(False)
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

    async def send_for(self, message: bytes | memoryview, *, text: bool = True) -> None:
        """:meth:`send` for a sink: a closed connection is a listener gone."""
        try:
            await self.send(message, text=text)
        except ConnectionClosed:
            raise ListenerGone() from None

    def cork(self, on: bool) -> None:
        """Hold back the frames of a burst (``on``), then write them at once (off).

        Each frame is otherwise a write (a system call, and one or more TCP segments);
        held back, the frames of a cached utterance's burst leave in one write (one
        ``writev``) when released. Only around writes that do not wait. (It used
        Linux's TCP_CORK: two ``setsockopt`` calls per burst besides a write per
        frame, a quarter of a replay's time in a burst of 200 at once; bench/NOTES.md,
        "First frames first".)
        """
        if on == self._corked or (on and len(self._playing) > 1):
            # Never while another utterance streams beside the burst: its frames
            # would wait for the release.
            return
        self._corked = on
        if not on:
            self._write_held()

    def _write_held(self) -> None:
        """Write what websockets' protocol holds to send (as its ``send_data`` does, in
        one ``writelines``)."""
        ws = self._ws
        data = ws.protocol.data_to_send()
        if not data or ws.transport.is_closing():
            return
        try:
            ws.transport.writelines([chunk for chunk in data if chunk])
            if not all(data):  # the protocol half-closes the connection, or closes it
                if ws.transport.can_write_eof():
                    ws.transport.write_eof()
                else:
                    ws.transport.close()
        except Exception:  # a broken connection: the reader sees it closed
            ws.transport.abort()

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


class Connections:
    """The open connections of one WebSocket door (a :class:`~ttsstream.doors.Door`)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._open: set[Connection] = set()
        #: Connections being closed because their key was revoked.
        self._ending: set[asyncio.Task[None]] = set()

    def add(self, connection: Connection) -> None:
        self._open.add(connection)

    def discard(self, connection: Connection) -> None:
        self._open.discard(connection)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    @property
    def in_progress(self) -> int:
        return sum(connection.utterances_in_progress for connection in self._open)

    async def wait_idle(self) -> None:
        waits = [asyncio.create_task(c.wait_idle()) for c in self._open]
        try:
            if waits:
                await asyncio.wait(waits)
        finally:
            for task in waits:
                task.cancel()

    async def cut(self) -> None:
        cuts = [asyncio.create_task(c.cut()) for c in self._open if c.utterances_in_progress]
        if cuts:
            await asyncio.wait(cuts)

    def revoke(self, holds: Callable[[Principal], bool]) -> int:
        """End the connections whose key no longer opens the server (``key_revoked``);
        how many."""
        ended = 0
        for connection in list(self._open):
            if not holds(connection.context.principal):
                connection.give_up_parking()
            if not holds(connection.context.principal) and not connection.closed:
                task = asyncio.create_task(connection.end_revoked())
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)
                ended += 1
        return ended


def _cancelling() -> bool:
    """Whether the running task is being cancelled (rather than seeing another's cancel)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _quietly(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a reply coroutine; a client that left or was closed meanwhile is not an error."""
    with contextlib.suppress(ConnectionClosed, ClientTooSlow):
        await coroutine
