"""One utterance, whichever door asked for it: the speak policy and the run.

:meth:`Utterances.request` makes the synthesis request (the default voice, the
text cleaned as ``TEXT_CLEANUP`` or the request says) and
:meth:`Utterances.accept` applies the policy every door shares (no new work while
draining, the voice check; the door has counted the rate limit).
:meth:`Utterances.run` speaks it through the cache and sends
its events to a :class:`Sink`: it measures the first audio, moves word events
into the text the client sent (from the cleaned text spoken), holds them back for
a batch, counts the outcome and writes the utterance's one access-log line. It
knows nothing of sockets: the WebSocket session is one sink (frames), the HTTP
speech API another (a chunked body, server-sent events).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ttsstream.audio.formats import MP3, Format
from ttsstream.audio.transcode import Pipe
from ttsstream.config import Config
from ttsstream.core.cleanup import CleanedRequest, MarkdownCleaner, clean, speakable
from ttsstream.core.context import RequestContext
from ttsstream.core.fields import WORD_MODES
from ttsstream.core.router import Started
from ttsstream.core.segmenter import Segmenter
from ttsstream.core.spans import speak_spans
from ttsstream.core.speech_cache import Lookahead, SpeechCache
from ttsstream.core.ssml import Spoken, SsmlDocument, parse_ssml
from ttsstream.core.streaming import StreamingText, speak_stream
from ttsstream.core.turns import Turns
from ttsstream.core.usage import Charge, Usage
from ttsstream.engines.base import AudioChunk, SynthesisRequest, WordEvent
from ttsstream.exceptions import (
    ClientError,
    EmptyText,
    QuotaExceeded,
    ShuttingDown,
    VoiceNotAllowed,
    error_code,
)
from ttsstream.logs import access
from ttsstream.stats import Stats

__all__ = [
    "REPLAY_BURST_BYTES",
    "WORD_MODES",
    "ListenerGone",
    "Sink",
    "Summary",
    "Utterances",
    "cut_short",
]

logger = logging.getLogger("ttsstream.core.utterance")

#: Audio bytes a replay writes before it lets other clients' work run (four frames of
#: REPLAY_CHUNK_BYTES); it lets them run after its first frame too. Nothing in a replay
#: waits (its entry is in memory, every write goes to a buffer with room), so without
#: these turns one replay runs to its end before the next client's speak is looked at:
#: the last of 200 clients asking at once for a long cached text waited behind 199 whole
#: utterances (bench/NOTES.md, "Fair bursts").
REPLAY_BURST_BYTES = 64 * 2**10


class ListenerGone(Exception):
    """The client stopped taking the utterance's events; :attr:`outcome` says how."""

    #: What the access log and the stats call it.
    outcome = "disconnected"


@dataclass(frozen=True, slots=True)
class Summary:
    """What an utterance that ended well consisted of."""

    byte_count: int
    audio_ms: float
    words: int
    cached: bool
    ttfb_ms: float
    #: A streaming utterance's segments: (spoken, of them replayed from the cache).
    segments: tuple[int, int] | None = None


class Sink(Protocol):
    """Where an utterance's events go. Sending raises :class:`ListenerGone` once the
    client has stopped listening."""

    @property
    def cut(self) -> ClientError | None:
        """Why the server cut the utterance, if it did (a drain ran out of time:
        ``shutting_down``; its key was revoked: ``key_revoked``)."""

    @property
    def gone(self) -> bool:
        """Whether the client's connection is closed (a cancel is then its disconnect)."""

    async def start(self, started: Started) -> None:
        """Who speaks the utterance; first of all."""

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        """The next audio bytes; ``end_ms`` is where they end on the utterance's timeline
        (the playing time of all audio sent so far, as the format's own encoder counts
        it: a door that times its characters reads it here, never from a bit rate)."""

    async def word(self, word: WordEvent) -> None:
        """One word boundary (words mode ``each``)."""

    async def words(self, words: Sequence[WordEvent]) -> None:
        """Word boundaries, just before the audio they describe (words mode ``batch``)."""

    async def end(self, summary: Summary) -> None:
        """The utterance is complete: nothing else follows."""

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        """The utterance failed (``partial``: some audio was sent); nothing else follows."""

    def hold(self, on: bool) -> None:
        """Hold back partial writes (``on``) while a burst of frames is written without a
        wait (a replay), then send them (off) before the run lets other work run: a door
        may cork its socket meanwhile, or ignore it. Always given in pairs, off last."""

    def finished(self) -> None:
        """Called last, whatever happened: release what :meth:`start` took."""


class Utterances:
    """The speak policy and the utterance run, shared by every door.

    Args:
        config: The settings (default voice).
        speech: Speaks through the cache.
        stats: Counters to update.
    """

    def __init__(
        self, config: Config, speech: SpeechCache, stats: Stats, usage: Usage | None = None
    ) -> None:
        self._config = config
        #: Charges, quotas and tallies per tenant.
        self.usage = usage if usage is not None else Usage()
        self._default_voice = config.default_voice
        #: ``VOICE_MAP``: names a client may give for a voice (OpenAI's, an ElevenLabs or
        #: Cartesia voice id hard-coded in an app), lower case, on every door.
        self._aliases = dict(config.voice_map)
        self._default_cleanup = config.text_cleanup
        self._speech = speech
        self._stats = stats
        #: The server is shutting down: no new utterance is accepted.
        self.draining = False
        #: Replays' first frames before their second halves (see :mod:`ttsstream.core.turns`).
        self.turns = Turns()

    def request(
        self,
        *,
        text: str,
        voice: str | None,
        rate: str = "+0%",
        volume: str = "+0%",
        pitch: str = "+0Hz",
        cleanup: str | None = None,
        client: str = "",
    ) -> CleanedRequest:
        """What an utterance asks for (its fields already valid in form), with the
        default voice when it names none and a ``VOICE_MAP`` name mapped; :meth:`accept`
        it before it runs.

        Its text is cleaned once, here (``cleanup``: one of
        :data:`~ttsstream.core.cleanup.CLEANUP_MODES`, ``None`` for ``TEXT_CLEANUP``):
        the request's text is what is spoken and what the cache key is made of.
        ``client``: who asks (for its share of Edge), when the door knows it already
        (:meth:`run` sets it otherwise).
        """
        mode = cleanup or self._default_cleanup
        spoken, source = clean(text, mode)
        if voice:
            voice = self._aliases.get(voice.lower(), voice)
        return CleanedRequest(
            text=spoken,
            voice=voice or self._default_voice,
            rate=rate,
            volume=volume,
            pitch=pitch,
            cleanup=mode,
            source=source,
            client=client,
        )

    def ssml(
        self, document: str, *, voice: str | None = None
    ) -> tuple[SynthesisRequest, SsmlDocument]:
        """What an SSML utterance asks for: the document's spans (``VOICE_MAP`` names
        mapped), and a request standing for it (its text content, its first voice);
        :meth:`accept` it with its voices before it runs.

        Raises:
            SsmlInvalid: The document is malformed or past a bound.
            SsmlUnsupported: It has an element Edge cannot speak.
        """
        config = self._config
        default = self._aliases.get(voice.lower(), voice) if voice else self._default_voice
        parsed = parse_ssml(
            document,
            default_voice=default,
            max_chars=config.max_text_length,
            max_spans=config.max_ssml_spans,
        )
        pieces = tuple(
            dataclasses.replace(piece, voice=self._aliases.get(piece.voice.lower(), piece.voice))
            if isinstance(piece, Spoken)
            else piece
            for piece in parsed.pieces
        )
        parsed = dataclasses.replace(parsed, pieces=pieces)
        voice = next(piece.voice for piece in pieces if isinstance(piece, Spoken))
        return SynthesisRequest(text=parsed.text, voice=voice), parsed

    async def accept(
        self,
        request: SynthesisRequest,
        *,
        utterance_id: str | None = None,
        document: SsmlDocument | None = None,
    ) -> None:
        """Accept an utterance, or raise why not.

        The door has counted the request (``total_requests``) and against the
        client's rate limit.

        Raises:
            ShuttingDown: The server is draining.
            InvalidVoice: No engine has the voice.
        """
        if self.draining:
            raise ShuttingDown(
                "the server is shutting down; reconnect in a moment", utterance_id=utterance_id
            )
        try:
            for voice in _voices(request, document):
                await self._speech.check_voice(voice)
        except ClientError as exc:
            exc.utterance_id = utterance_id
            raise

    async def allow(
        self,
        request: SynthesisRequest,
        context: RequestContext,
        *,
        utterance_id: str | None = None,
        streamed: bool = False,
        document: SsmlDocument | None = None,
    ) -> None:
        """The tenant's own rules for an utterance about to be accepted: its voices, and
        its quota (:meth:`run` charges the characters; see :mod:`ttsstream.core.usage`).
        Every door calls it last before accepting an utterance.

        Raises:
            VoiceNotAllowed: The tenant may not use the voice.
            QuotaExceeded: The text would pass the tenant's characters per day or month.
        """
        principal = context.principal
        tenant = principal.tenant
        for voice in _voices(request, document):
            if tenant is not None and not tenant.allows_voice(voice):
                raise VoiceNotAllowed(
                    f"the key of {principal.name!r} may not use the voice {voice!r}",
                    utterance_id=utterance_id,
                )
        try:
            await self.usage.charge(
                principal, 0 if streamed else _text_chars(request, document), check_only=True
            )
        except ClientError as exc:
            exc.utterance_id = utterance_id
            raise

    def look_ahead(self, request: SynthesisRequest) -> Lookahead | None:
        """The lookup of an utterance not yet accepted, to be asked of the cluster with
        its rate limit (:meth:`Admission.check_rate`), if it will ask the cluster.

        Only for an utterance that plays at once, in MP3: the answer is taken by its
        run, or given back with :meth:`Lookahead.close`.
        """
        return self._speech.look_ahead(request)

    def open_stream(
        self,
        cleanup: str | None = None,
        *,
        min_chars: int | None = None,
        max_wait_ms: int | None = None,
    ) -> StreamingText:
        """The text of a new streaming utterance (its timers run until it is spoken),
        cleaned piece by piece as ``cleanup`` says (``None``: ``TEXT_CLEANUP``; pass
        the :attr:`~ttsstream.core.cleanup.CleanedRequest.cleanup` of its request).

        ``min_chars`` and ``max_wait_ms`` are a protocol's own chunking (``None``:
        ``STREAM_MIN_CHARS``, ``STREAM_MAX_WAIT_MS``), held within the segmenter's bounds.
        """
        config = self._config
        mode = cleanup or self._default_cleanup
        shortest = config.stream_min_chars if min_chars is None else min_chars
        shortest = max(1, min(shortest, config.stream_max_chars))
        wait_ms = config.stream_max_wait_ms if max_wait_ms is None else max_wait_ms
        return StreamingText(
            Segmenter(min_chars=shortest, max_chars=config.stream_max_chars),
            max_length=config.max_stream_text_length,
            max_wait=max(0, wait_ms) / 1000,
            idle_timeout=config.stream_idle_timeout,
            cleaner=MarkdownCleaner() if mode == "markdown" else None,
        )

    async def run(
        self,
        request: SynthesisRequest,
        sink: Sink,
        *,
        words: str = "each",
        audio_format: Format = MP3,
        utterance_id: str,
        received_at: float,
        context: RequestContext,
        stream: StreamingText | None = None,
        lookahead: Lookahead | None = None,
        document: SsmlDocument | None = None,
    ) -> str:
        """Speak ``request`` into ``sink``; its outcome (``ok``, ``cancelled``, an error code…).

        A cancellation of the calling task is the client's cancel and propagates (when
        the sink says the server cut it, the sink is told ``shutting_down`` first; when
        it says the client's connection is closed, the outcome is ``disconnected``);
        every other way it ends is told to the sink (unless the listener is gone).

        Args:
            request: What to say.
            sink: Where the events go.
            words: One of :data:`WORD_MODES`.
            audio_format: What the audio is sent as (made from the source as it streams).
            utterance_id: The utterance's id, for the access log.
            received_at: When the request arrived (``time.perf_counter()``).
            context: Who asked, from where, on which connection and door (its share
                of the upstream, the stats, the access log, its tenant's usage: its
                text's characters are charged as it starts, and given back if none of
                its audio was sent).
            stream: The text of a streaming utterance (then ``request`` gives its voice
                and prosody, not its text).
            lookahead: Its lookup, asked already (see :meth:`look_ahead`).
            document: An SSML utterance's spans (then ``request`` stands for it: see
                :meth:`ssml`).
        """
        client_ip = context.client_ip
        if request.client != client_ip:  # for its share of Edge
            request = dataclasses.replace(request, client=client_ip)
        stats = self._stats
        batch = words == "batch"
        each = words == "each"
        # Words are located in the text spoken; the client's text is what they index.
        cleaned = request if isinstance(request, CleanedRequest) else None
        if stream is not None:
            source = stream.source
        else:
            source = cleaned.source if cleaned is not None else None
        # Batched words go out just before the audio they describe; a replay may
        # then give all of them at once.
        if document is not None:
            source = None  # its spans' words index the document's text already
            events = speak_spans(self._speech, document, request, words_ahead=batch)
        elif stream is None:
            events = self._speech.synthesize(
                request, words_ahead=batch, made_as=audio_format, lookahead=lookahead
            )
        else:
            events = speak_stream(self._speech, request, stream, words_ahead=batch)
        pipe: Pipe | None = None
        held: list[WordEvent] = []
        started: Started | None = None
        byte_count = 0
        word_count = 0
        ttfb_ms: float | None = None
        outcome = "ok"
        charged = False
        charge: Charge | None = None
        # A replay's writes are held back in bursts (see REPLAY_BURST_BYTES).
        held_back = False
        burst = 0
        # A replay's token in self.turns until its first frame is written.
        turn: int | None = None
        stats.active_utterances += 1
        try:
            try:
                charge = await self.usage.charge(
                    context.principal,
                    0 if stream is not None else _text_chars(request, document),
                )
            except QuotaExceeded as exc:
                exc.utterance_id = utterance_id
                if lookahead is not None:
                    lookahead.close()
                raise
            charged = True
            if (
                stream is None
                and cleaned is not None
                and cleaned.cleanup != "none"
                and not speakable(request.text)
            ):
                if lookahead is not None:
                    lookahead.close()
                raise EmptyText("the text has nothing to speak once its markup is left out")
            async for event in events:
                if isinstance(event, Started):
                    pipe = await Pipe.open(
                        audio_format, event.audio_format, event.audio_ms, client=client_ip
                    )
                    started = event
                    if pipe.transcoding:
                        started = dataclasses.replace(event, audio_format=audio_format.audio_format)
                    if started.cached and not pipe.transcoding:
                        # A replay's frames go out in bursts, without a wait between
                        # them; one transcoded on each play waits for the encoder.
                        sink.hold(True)
                        held_back = True
                        if turn is None:
                            turn = self.turns.started()
                    await sink.start(started)
                elif isinstance(event, AudioChunk):
                    assert pipe is not None
                    data = await pipe.feed(event)
                    if held:
                        word_count += len(held)
                        await sink.words(held)
                        held = []
                    if not data:
                        continue
                    if ttfb_ms is None:
                        ttfb_ms = (time.perf_counter() - received_at) * 1000
                        stats.observe_first_audio(_source(started), ttfb_ms / 1000)
                    await sink.audio(data, end_ms=pipe.duration_ms(byte_count + len(data)))
                    byte_count += len(data)
                    stats.bytes_sent += len(data)
                    if held_back:
                        burst += len(data)
                        if burst == byte_count or burst >= REPLAY_BURST_BYTES:
                            # Other clients' turn: what is held back goes out first, or
                            # it would wait for this replay's end.
                            sink.hold(False)
                            held_back = False
                            if turn is not None:
                                # The other replays' first frames before this one's rest.
                                self.turns.first_sent(turn)
                                turn = None
                                await self.turns.second_turn()
                            else:
                                await asyncio.sleep(0)
                            sink.hold(True)
                            held_back = True
                            burst = 0
                else:
                    if source is not None:
                        event = source.in_original(event)
                    if pipe is not None and pipe.word_shift_ms:
                        event = dataclasses.replace(
                            event, offset_ms=event.offset_ms + pipe.word_shift_ms
                        )
                    if batch:
                        held.append(event)
                    elif each:
                        await sink.word(event)
                        word_count += 1
            assert started is not None and pipe is not None, "every utterance begins with Started"
            if held:
                word_count += len(held)
                await sink.words(held)
            if tail := await pipe.finish():
                ttfb_ms = ttfb_ms or (time.perf_counter() - received_at) * 1000
                await sink.audio(tail, end_ms=pipe.duration_ms(byte_count + len(tail)))
                byte_count += len(tail)
                stats.bytes_sent += len(tail)
            await sink.end(
                Summary(
                    byte_count=byte_count,
                    audio_ms=pipe.duration_ms(byte_count),
                    words=word_count,
                    cached=started.cached,
                    ttfb_ms=ttfb_ms or 0.0,
                    segments=(
                        None
                        if stream is None
                        else (stream.counts.segments, stream.counts.cached_segments)
                    ),
                )
            )
            if held_back:
                held_back = False
                sink.hold(False)
        except asyncio.CancelledError as exc:
            if _cancelling():
                outcome = "cancelled"
                cut = sink.cut
                if cut is not None:
                    # The server stops now, or the key was revoked: the client learns
                    # its utterance was cut, and why.
                    outcome = error_code(cut)
                    await self._failed(sink, cut, utterance_id, partial=byte_count > 0)
                elif sink.gone:
                    # Cancelled because the client left, not by its cancel.
                    outcome = ListenerGone.outcome
                raise
            # Another task's cancellation that leaked this far is a failure of this
            # utterance, not a cancel of it.
            outcome = error_code(exc)
            await self._failed(sink, exc, utterance_id, partial=byte_count > 0)
        except ListenerGone as gone:
            outcome = gone.outcome
        except Exception as exc:
            outcome = error_code(exc)
            await self._failed(sink, exc, utterance_id, partial=byte_count > 0)
        finally:
            if turn is not None:
                self.turns.first_sent(turn)
            if pipe is not None:
                pipe.close()
            stats.active_utterances -= 1
            stats.finished(outcome, context.door)
            if charged:
                self._tally(
                    request, stream, document, context, charge, started, pipe, byte_count, outcome
                )
            stats.formats[audio_format.name] += 1
            access(
                "utterance",
                interface=context.door,
                ip=client_ip,
                conn=context.connection,
                id=utterance_id,
                voice=started.voice if started else request.voice,
                engine=started.engine if started else None,
                chars=_sent_chars(request, stream),
                key=(
                    "ssml"
                    if document is not None
                    else self._speech.key_of(request)[:12]
                    if stream is None
                    else "stream"
                ),
                cached=bool(started and started.cached),
                fallback=started.fallback_reason if started else None,
                ttfb_ms=None if ttfb_ms is None else round(ttfb_ms, 1),
                upstream_ms=(
                    round(started.upstream_ms, 1)
                    if started is not None and started.upstream_ms is not None
                    else None
                ),
                format=audio_format.name,
                audio_ms=round(pipe.duration_ms(byte_count), 1) if pipe else 0.0,
                bytes=byte_count,
                words=word_count,
                outcome=outcome,
            )
            # The sink last, after the utterance's own cleanup: whatever it raises (a
            # bug, which propagates), the utterance is over and counted.
            try:
                if held_back:
                    sink.hold(False)
                sink.finished()
            finally:
                await events.aclose()
        return outcome

    def _tally(
        self,
        request: SynthesisRequest,
        stream: StreamingText | None,
        document: SsmlDocument | None,
        context: RequestContext,
        charge: Charge | None,
        started: Started | None,
        pipe: Pipe | None,
        byte_count: int,
        outcome: str,
    ) -> None:
        """The utterance's characters kept (some audio was sent) or given back, and its
        counts in its tenant's usage."""
        usage = self.usage
        heard = byte_count > 0
        if stream is not None:
            characters = stream.total if heard else 0
            usage.add_charge(charge, characters)
        else:
            characters = _text_chars(request, document) if heard else 0
            if not heard:
                usage.refund(charge)
        usage.record(
            context,
            characters=characters,
            cached=bool(started and started.cached),
            audio_ms=pipe.duration_ms(byte_count) if pipe is not None and heard else 0.0,
            error=outcome not in _NOT_ERRORS,
        )

    async def _failed(
        self, sink: Sink, exc: BaseException, utterance_id: str, *, partial: bool
    ) -> None:
        """Tell the sink why the utterance failed."""
        if not isinstance(exc, ClientError):
            logger.error("utterance=%r failed", utterance_id, exc_info=exc)
        self._stats.errors += 1
        with contextlib.suppress(ListenerGone):
            await sink.fail(exc, partial=partial)


def cut_short() -> ShuttingDown:
    """What an utterance the server stops before its end (a drain ran out of time) is told."""
    return ShuttingDown("the server is shutting down before this utterance ended")


def _cancelling() -> bool:
    """Whether the running task is being cancelled (rather than seeing another's cancel)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _sent_chars(request: SynthesisRequest, stream: StreamingText | None) -> int:
    """Characters of the text the client sent, for the access log."""
    if stream is not None:
        return stream.total
    return _text_chars(request)


def _voices(request: SynthesisRequest, document: SsmlDocument | None) -> list[str]:
    """Every voice an utterance speaks with, once each."""
    if document is None:
        return [request.voice]
    return list(dict.fromkeys(p.voice for p in document.pieces if isinstance(p, Spoken)))


def _text_chars(request: SynthesisRequest, document: SsmlDocument | None = None) -> int:
    """Characters of a whole text as the client sent it (what its tenant is charged; an
    SSML document's: its text content, or what it speaks if more)."""
    if document is not None:
        return document.characters
    if isinstance(request, CleanedRequest):
        return request.original_length
    return len(request.text)


#: Outcomes that are not errors in a tenant's usage (the client ended them).
_NOT_ERRORS = frozenset({"ok", "cancelled", "disconnected"})


def _source(started: Started | None) -> str:
    """Where an utterance's audio came from, for the time-to-first-audio histogram."""
    if started is not None and started.cached:
        return "cached"
    if started is not None and started.fallback_reason is not None:
        return "fallback"
    return "live"
