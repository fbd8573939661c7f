"""The cache layer in front of the engines: disk replay and single flight.

For an Edge utterance, :class:`SpeechCache` first joins an identical synthesis
already in flight, then looks on disk, and only then synthesizes, sharing the
new synthesis with every identical request that arrives while it runs. A
synthesis that Edge completed without fallback is stored once it ended.
Offline-voice utterances are not cached: eSpeak is faster than a disk read.

Another audio format is made from the MP3, which costs 10 to 20 times the CPU
of an MP3 replay in an encoded format (bench/NOTES.md). For a kept format
(:attr:`~ttsstream.audio.formats.Format.kept`: Opus, WebM, AAC), the cache makes
it: one transcode of the MP3 per text and format at a time, which identical
requests join as they join a synthesis, and which goes on while any of them
listens; made whole, it is stored beside the MP3 on this instance's disk (never
in the cluster's shared tier: another instance makes it from the shared MP3, in
at most a couple of seconds of CPU), and a later request replays it as it is. What a
transcode keeps in memory is bounded (:data:`VARIANT_MAX_BYTES`); past that, it is
neither joined nor stored. The other formats (FLAC, WAV, PCM: cheap to make,
large to keep) are made by each listener's own pipe from the MP3 that comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol, cast

from ttsstream.audio.formats import MP3, Format
from ttsstream.audio.transcode import MadeChunk, Pipe
from ttsstream.cache.flight import SharedSynthesis
from ttsstream.cache.store import CacheEntry, DiskCache, SharedTier, cache_key, variant_key
from ttsstream.core.router import Speech, SpeechRouter, Started
from ttsstream.engines.base import AudioChunk, AudioFormat, SynthesisRequest, Voice, WordEvent
from ttsstream.engines.espeak import VOICE_PREFIX
from ttsstream.exceptions import UpstreamUnavailable
from ttsstream.stats import Stats

__all__ = [
    "FINISH_ALONE_SHARE",
    "MADE_PIECE_BYTES",
    "REPLAY_CHUNK_BYTES",
    "VARIANT_MAX_BYTES",
    "ClusterFlights",
    "FlightLost",
    "Lookahead",
    "SpeechCache",
]

logger = logging.getLogger("ttsstream.core.speech_cache")

#: Audio bytes per binary frame when replaying from disk (about 2.7 s of audio).
REPLAY_CHUNK_BYTES = 16 * 2**10
#: Longest a finished utterance waits to be stored, in seconds (see SpeechCache).
STORE_DELAY_MAX = 1.0
#: MP3 bytes a shared transcode makes into its format at a time: a replayed chunk
#: (REPLAY_CHUNK_BYTES) is made in four pieces, so that its first bytes leave after
#: about 4 ms of encoding rather than 15, and another client's work waits for a
#: thread that long at most.
MADE_PIECE_BYTES = 4 * 2**10
#: Most bytes of a kept format that one shared transcode holds in memory: all it made
#: (to be joined, and stored), or once past that, what its slowest listener has yet
#: to take (its transcode then waits for that listener). The longest text allowed by
#: default (5,000 characters, about 5 minutes) makes under 1.8 MB of Opus or AAC.
VARIANT_MAX_BYTES = 2 * 2**20
#: The share of a cached MP3 that a shared transcode must have made to go on alone
#: (and be stored) when its last listener leaves; before that, it stops.
FINISH_ALONE_SHARE = 0.5


#: Most times a request takes over a flight whose owner died before its first audio.
TAKEOVERS = 3


class FlightLost(Exception):
    """A flight of another instance ended before its end (its owner, or Redis, is gone)."""

    def __init__(self, *, audio_sent: bool) -> None:
        super().__init__("the instance speaking this text is gone")
        #: Whether this listener had already been given audio of it.
        self.audio_sent = audio_sent


class ClusterFlights(Protocol):
    """Flights shared by a cluster's instances (``cluster/`` implements them on Redis)."""

    async def claim(self, key: str) -> bool | None:
        """Whether this instance now owns the flight of ``key``: ``False`` if another
        does, ``None`` if that cannot be told (then the instance goes alone)."""

    def give_back(self, key: str) -> None:
        """Give back a claim of ``key`` that this instance will not fly, or a whole flight
        that leaves nothing to store (in the background)."""

    def publish(
        self, key: str, events: AsyncGenerator[Speech, None]
    ) -> AsyncGenerator[Speech, None]:
        """The owner's events, passed on as they are and shared with other instances.

        A flight that fails is given back at its end; a whole one holds its claim
        until it is settled: its entry put in the shared tier with ``settles``
        (:meth:`~ttsstream.cache.store.SharedTier.put`), or :meth:`give_back`."""

    def listen(self, key: str) -> AsyncIterator[Speech]:
        """Another instance's flight of ``key``, from its start, live.

        Raises:
            FlightLost: It ended before its end.
            ClientError: Its synthesis failed.
        """


class Lookahead:
    """A request's cluster lookup, asked before it runs, in the round trip of its rate limit.

    A speak that will play at once is counted in the cluster's rate window and
    looked up in the shared tier (its entry, or its flight claimed) by one script:
    one wait for Redis instead of two, which is what cluster mode added to a speak
    (bench/NOTES.md). :meth:`SpeechCache.synthesize` takes the answer; :meth:`close`
    gives back a claim that no synthesis took (the speak was refused, cancelled, or
    its connection closed).
    """

    def __init__(self, key: str, shared: SharedTier, flights: ClusterFlights | None) -> None:
        #: The cache key looked up.
        self.key = key
        self._shared = shared
        self._flights = flights
        self._answer: tuple[CacheEntry | None, bool | None] | None = None

    async def hit(self, ip: str, limit: int, window: float) -> int | None:
        """Count a request of ``ip`` in the cluster's window and, if it is within it,
        look up :attr:`key`: the seconds to wait, or ``None``.

        Raises:
            LimiterUnavailable: The cluster cannot answer (then nothing was looked up).
        """
        retry_after, entry, claimed = await self._shared.hit_then_find_or_claim(
            ip, limit, window, self.key
        )
        if retry_after is None:
            self._answer = (entry, claimed)
        return retry_after

    def take(self) -> tuple[CacheEntry | None, bool | None] | None:
        """The entry and the claim found (once), or ``None`` if nothing was asked."""
        answer, self._answer = self._answer, None
        return answer

    def close(self) -> None:
        """Give back a claim that was not taken."""
        answer = self.take()
        if answer is not None and answer[1] and self._flights is not None:
            self._flights.give_back(self.key)


class SpeechCache:
    """Replay known utterances, coalesce identical ones, store finished ones.

    Writing an entry costs the disk and the CPU a fraction of a millisecond,
    which matters when many utterances end at once: a finished utterance is
    written once no utterance is waiting for its first audio from Edge (at most
    STORE_DELAY_MAX later), so a burst of new requests is not slowed down by the
    entries of the previous burst. Until written, the entry answers lookups from
    memory, and the synthesis that made it (every event it kept) is let go.

    Args:
        router: Speaks what is not cached.
        store: The disk cache, or ``None`` when caching is off (then requests go
            straight to the router, without coalescing).
        stats: Counters to update.
    """

    def __init__(
        self,
        router: SpeechRouter,
        store: DiskCache | None,
        stats: Stats,
        *,
        shared: SharedTier | None = None,
        flights: ClusterFlights | None = None,
    ) -> None:
        self.router = router
        self.store = store
        #: The cluster's entries (Redis), looked at on a disk miss; written with the disk.
        self.shared = shared
        #: The cluster's flights (Redis): one synthesis per text over every instance.
        self.flights = flights
        self._stats = stats
        self._flights: dict[str, SharedSynthesis[Speech]] = {}
        #: Shared transcodes alive (joinable or not), for :attr:`made_bytes`.
        self._made_flights: weakref.WeakSet[SharedSynthesis[Speech]] = weakref.WeakSet()
        #: Live utterances (synthesized or joined) that have no audio yet.
        self._starting = 0
        #: Set while no utterance waits for its first audio (or once closing).
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._closing = False
        #: Finished entries waiting to be written, by key; lookups find them here.
        self._unwritten: dict[str, CacheEntry] = {}
        self._writes: set[asyncio.Task[None]] = set()

    async def voices(self) -> list[Voice]:
        return await self.router.voices()

    async def check_voice(self, voice: str) -> None:
        await self.router.check_voice(voice)

    def key_of(self, request: SynthesisRequest, made_as: Format = MP3) -> str:
        """The cache key of an Edge request (also what logs show instead of the text),
        or of its audio made into another format (:func:`~ttsstream.cache.store.variant_key`)."""
        engine, audio_format = self.router.online_engine
        key = cache_key(
            engine=engine,
            voice=request.voice,
            rate=request.rate,
            volume=request.volume,
            pitch=request.pitch,
            audio_format=audio_format,
            text=request.text,
        )
        return variant_key(key, made_as.name) if made_as.transcoded else key

    @property
    def made_bytes(self) -> int:
        """Bytes of kept formats that shared transcodes hold in memory now."""
        return sum(flight.kept for flight in self._made_flights)

    def look_ahead(self, request: SynthesisRequest) -> Lookahead | None:
        """A :class:`Lookahead` for the MP3 of ``request``, when its lookup will ask the
        cluster: it is an Edge request, and neither this instance's flights, memory nor
        disk have it."""
        if self.shared is None or self.store is None or request.voice.startswith(VOICE_PREFIX):
            return None
        key = self.key_of(request)
        if self._joinable_flight(key) is not None or key in self._unwritten:
            return None
        if self.store.holds(key):
            return None
        return Lookahead(key, self.shared, self.flights)

    async def synthesize(
        self,
        request: SynthesisRequest,
        *,
        words_ahead: bool = False,
        made_as: Format = MP3,
        lookahead: Lookahead | None = None,
    ) -> AsyncGenerator[Speech, None]:
        """Speak ``request`` from the cache, a shared synthesis, or a new one.

        With ``words_ahead``, a replay gives all its words before its first audio
        instead of each word just before the audio frame it is in. With
        ``made_as`` a kept format, the audio comes in that format
        (``Started.audio_format`` says so): its stored bytes, or a transcode shared
        with identical requests (words moved by the format's priming); with any
        other format, the MP3 comes, for the listener to make its format. A
        ``lookahead`` of the request that was answered stands for its lookup on disk
        and in the cluster.
        """
        if self.store is None or request.voice.startswith(VOICE_PREFIX):
            async with contextlib.aclosing(self.router.synthesize(request)) as events:
                async for event in events:
                    yield event
            return

        if made_as.kept:
            async with contextlib.aclosing(
                self._made(request, made_as, words_ahead=words_ahead)
            ) as events:
                async for event in events:
                    yield event
            return

        _, audio_format = self.router.online_engine
        key = self.key_of(request)
        flight = self._joinable_flight(key)
        answer = lookahead.take() if lookahead is not None and lookahead.key == key else None
        # The cluster flight's claim, if made with the lookup.
        claimed: bool | None = None if answer is None else answer[1]
        if flight is None:
            entry = self._unwritten.get(key)
            if entry is None and answer is not None:
                # Asked with the rate limit, just after the disk had missed.
                entry = answer[0]
                if entry is not None:  # another instance's: kept on this one's disk too
                    self._write(key, entry, share=False)
            elif entry is None:
                entry = await self.store.get(key)
                if entry is None and self.shared is not None:
                    # One round trip: the entry, or the cluster flight's claim.
                    entry, claimed = await self.shared.find_or_claim(key)
                    if entry is not None:
                        self._write(key, entry, share=False)
            if entry is not None and claimed and self.flights is not None:
                self.flights.give_back(key)  # this instance stored it since the lookahead
            if entry is not None:
                self._stats.cache_hits += 1
                for event in _replay(entry, audio_format, words_ahead=words_ahead):
                    yield event
                return
            # Another request may have started this synthesis during the disk read.
            flight = self._joinable_flight(key)
        self._stats.cache_misses += 1
        publish = False
        if flight is not None and claimed and self.flights is not None:
            self.flights.give_back(key)
        if flight is None and self.flights is not None:
            for attempt in range(TAKEOVERS):
                if attempt == 0 and claimed is not None:
                    owner: bool | None = claimed
                elif attempt > 0 and self.shared is not None:
                    # The flight may have ended whole and been stored since it was
                    # joined (its owner missed the ask): then its entry, not a new one.
                    entry, owner = await self.shared.find_or_claim(key)
                    if entry is not None:
                        self._write(key, entry, share=False)
                        for event in _replay(entry, audio_format, words_ahead=words_ahead):
                            yield event
                        return
                else:
                    owner = await self.flights.claim(key)
                if owner is not False:
                    publish = owner is True
                    break
                # Another instance is speaking this text: its events, live.
                self._stats.coalesced += 1
                try:
                    async for event in self.flights.listen(key):
                        yield event
                    return
                except FlightLost as lost:
                    if lost.audio_sent:
                        raise UpstreamUnavailable(
                            "the instance speaking this text stopped before its end"
                        ) from None
                    logger.warning("flight %s…: its owner stopped; asking again", key[:12])
            flight = self._joinable_flight(key)
        if flight is None:
            flight = self._start_flight(key, request, publish=publish)
        else:
            self._stats.coalesced += 1
        # Until its first audio, this utterance holds back the storing of others.
        self._starting += 1
        if not self._closing:
            self._quiet.clear()
        waiting = True
        try:
            async with contextlib.aclosing(flight.listen()) as events:
                async for event in events:
                    if waiting and isinstance(event, AudioChunk):
                        waiting = False
                        self._started()
                    yield event
        finally:
            if waiting:
                self._started()

    async def _made(
        self, request: SynthesisRequest, made_as: Format, *, words_ahead: bool
    ) -> AsyncGenerator[Speech, None]:
        """``request`` in ``made_as``: stored, or the transcode in flight, or a new one."""
        assert self.store is not None
        key = self.key_of(request, made_as)
        made = self._unwritten.get(key) or await self.store.get(key)
        if made is not None and made.audio_ms:
            self._stats.cache_hits += 1
            bitrate = round(len(made.audio) * 8 * 1000 / made.audio_ms)
            as_sent = dataclasses.replace(made_as.audio_format, bitrate_bps=max(1, bitrate))
            for event in _replay(made, as_sent, words_ahead=words_ahead):
                yield event
            return
        flight = self._joinable_flight(key)
        mp3: CacheEntry | None = None
        if flight is None:
            # The MP3 it is made from, if cached (read once: the transcode finds it hot).
            mp3_key = self.key_of(request)
            mp3 = self._unwritten.get(mp3_key) or await self.store.get(mp3_key)
            flight = self._joinable_flight(key)  # started by another request meanwhile?
        joined = flight is not None
        if flight is None:
            flight = self._start_made(
                key, request, made_as, cached_bytes=None if mp3 is None else len(mp3.audio)
            )
        else:
            self._stats.coalesced += 1
        async with contextlib.aclosing(flight.listen()) as events:
            async for event in events:
                if joined and isinstance(event, Started):
                    # The transcode's MP3 was counted for the request that started it.
                    if event.cached:
                        self._stats.cache_hits += 1
                    else:
                        self._stats.cache_misses += 1
                yield event

    def _start_made(
        self,
        key: str,
        request: SynthesisRequest,
        made_as: Format,
        *,
        cached_bytes: int | None,
    ) -> SharedSynthesis[Speech]:
        """A transcode of ``request``'s MP3 into ``made_as``, shared, stored once whole.

        Its work is done in the turn of the client that started it. Made from a
        cached MP3 of ``cached_bytes``, it goes on alone when its last listener
        leaves once it has made at least FINISH_ALONE_SHARE of it (the rest costs
        less than what was done), so that a response dropped near its end is still
        stored; sooner, it stops."""
        assert self.store is not None
        room = min(VARIANT_MAX_BYTES, self.store.variant_max_bytes)
        progress = _Progress()

        def go_on_alone() -> bool:
            return cached_bytes is not None and progress.fed >= cached_bytes * FINISH_ALONE_SHARE

        async def store(events: list[Speech]) -> None:
            entry = _made_entry_of(events)
            if entry is not None and len(entry.audio) <= room:
                self._write(key, entry, share=False)
            finished()

        def finished() -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]

        flight = SharedSynthesis(
            _made_from(self.synthesize(request), made_as, client=request.client, progress=progress),
            on_complete=store,
            on_finished=finished,
            size=_audio_bytes,
            max_kept=VARIANT_MAX_BYTES,
            go_on_alone=go_on_alone,
        )
        self._flights[key] = flight
        self._made_flights.add(flight)
        return flight

    def _joinable_flight(self, key: str) -> SharedSynthesis[Speech] | None:
        """The synthesis of ``key`` a request may join, if any (never a failed one)."""
        flight = self._flights.get(key)
        return flight if flight is not None and flight.joinable else None

    def _started(self) -> None:
        self._starting -= 1
        if not self._starting:
            self._quiet.set()

    async def finish_stores(self) -> None:
        """Write at once what waits to be written, and return once it is (at shutdown)."""
        self._closing = True
        self._quiet.set()
        if self._writes:
            await asyncio.wait(self._writes)

    def _write(
        self, key: str, entry: CacheEntry, *, share: bool = True, settles: bool = False
    ) -> None:
        """Keep ``entry`` in memory until it is written to disk (and the shared tier);
        with ``settles``, the cluster flight that made it is given back with it."""
        self._unwritten[key] = entry
        write = asyncio.create_task(self._write_later(key, entry, share=share, settles=settles))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)

    async def _write_later(
        self, key: str, entry: CacheEntry, *, share: bool, settles: bool
    ) -> None:
        assert self.store is not None
        settled = False
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STORE_DELAY_MAX):
                    await self._quiet.wait()
            data = await self.store.put(key, entry)
            if share and self.shared is not None:
                self.shared.put(key, entry, data, settles=settles)
                settled = settles
        finally:
            if settles and not settled and self.flights is not None:
                self.flights.give_back(key)
            if self._unwritten.get(key) is entry:
                del self._unwritten[key]

    def _start_flight(
        self, key: str, request: SynthesisRequest, *, publish: bool = False
    ) -> SharedSynthesis[Speech]:
        async def store(events: list[Speech]) -> None:
            entry = _entry_of(events)
            if entry is None:
                if publish and self.flights is not None:
                    self.flights.give_back(key)
                return
            self._write(key, entry, settles=publish)
            finished()

        def finished() -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]

        source = self.router.synthesize(request)
        if publish and self.flights is not None:
            source = self.flights.publish(key, source)
        flight = SharedSynthesis(source, on_complete=store, on_finished=finished)
        # A failed synthesis may still be here, closing its upstream: replace it.
        self._flights[key] = flight
        return flight


def _entry_of(events: list[Speech]) -> CacheEntry | None:
    """The cache entry for a finished synthesis, or ``None`` if it must not be stored."""
    if not events or not isinstance(events[0], Started):
        return None
    started = events[0]
    if started.engine != "edge" or started.fallback_reason is not None or started.cached:
        return None
    audio = b"".join(event.data for event in events if isinstance(event, AudioChunk))
    if not audio:
        return None
    words = tuple(event for event in events if isinstance(event, WordEvent))
    return CacheEntry(engine=started.engine, voice=started.voice, audio=audio, words=words)


@dataclasses.dataclass(slots=True)
class _Progress:
    """How far a shared transcode is."""

    #: MP3 bytes made into the format so far.
    fed: int = 0


async def _made_from(
    source: AsyncGenerator[Speech, None], target: Format, *, client: str, progress: _Progress
) -> AsyncGenerator[Speech, None]:
    """``source``'s events with its MP3 made into ``target`` as it comes: its bytes in
    :class:`MadeChunk` events (one per MADE_PIECE_BYTES of MP3, possibly empty), its
    words moved by the format's priming; ``progress`` follows it."""
    pipe: Pipe | None = None
    try:
        async with contextlib.aclosing(source) as events:
            async for event in events:
                if isinstance(event, Started):
                    pipe = await Pipe.open(target, event.audio_format, client=client)
                    yield dataclasses.replace(
                        event, audio_format=target.audio_format, audio_ms=None
                    )
                elif isinstance(event, AudioChunk):
                    assert pipe is not None
                    for piece in _pieces(event):
                        made = bytes(await pipe.feed(piece))
                        progress.fed += len(piece.data)
                        yield MadeChunk(made, made_ms=pipe.duration_ms(0))
                elif target.priming_samples:
                    yield dataclasses.replace(event, offset_ms=event.offset_ms + target.priming_ms)
                else:
                    yield event
        if pipe is not None:
            tail = await pipe.finish()
            yield MadeChunk(tail, made_ms=pipe.duration_ms(0))
    finally:
        if pipe is not None:
            pipe.close()


def _pieces(chunk: AudioChunk) -> list[AudioChunk]:
    """``chunk`` cut into pieces of MADE_PIECE_BYTES of MP3 (one, if it carries PCM)."""
    data = chunk.data
    if chunk.pcm is not None or len(data) <= MADE_PIECE_BYTES:
        return [chunk]
    return [
        AudioChunk(data[offset : offset + MADE_PIECE_BYTES])
        for offset in range(0, len(data), MADE_PIECE_BYTES)
    ]


def _audio_bytes(event: Speech) -> int:
    """What an event weighs in a shared transcode's bound: its audio bytes."""
    return len(event.data) if isinstance(event, AudioChunk) else 0


def _made_entry_of(events: list[Speech]) -> CacheEntry | None:
    """The entry of an utterance made whole into another format from Edge's MP3, or
    ``None`` if it must not be stored (the offline voice spoke it)."""
    if not events or not isinstance(events[0], Started):
        return None
    started = events[0]
    if started.engine != "edge" or started.fallback_reason is not None:
        return None
    chunks = [event for event in events if isinstance(event, MadeChunk)]
    audio = b"".join(chunk.data for chunk in chunks)
    if not audio:
        return None
    words = tuple(event for event in events if isinstance(event, WordEvent))
    return CacheEntry(
        engine=started.engine,
        voice=started.voice,
        audio=audio,
        words=words,
        audio_ms=chunks[-1].made_ms,
    )


def _replay(
    entry: CacheEntry, audio_format: AudioFormat, *, words_ahead: bool
) -> tuple[Speech, ...]:
    """The events of a stored utterance: each word before the audio it describes.

    Words come just before the audio frame they are in, or all before the first
    frame with ``words_ahead``. Made once per entry, format and words mode (kept in
    :attr:`CacheEntry.replays`; the events are immutable, the audio slices of the
    entry's bytes): about 20 µs of a cached replay's work before its first frame
    otherwise (bench/NOTES.md, "the cost of one cached replay").
    """
    made = entry.replays.get((audio_format, words_ahead))
    if made is None:
        made = entry.replays[audio_format, words_ahead] = tuple(
            _replay_events(entry, audio_format, words_ahead=words_ahead)
        )
    return cast("tuple[Speech, ...]", made)


def _replay_events(
    entry: CacheEntry, audio_format: AudioFormat, *, words_ahead: bool
) -> list[Speech]:
    events: list[Speech] = [
        Started(
            entry.engine,
            entry.voice,
            audio_format,
            fallback_reason=None,
            cached=True,
            audio_ms=entry.audio_ms,
        )
    ]
    words = list(entry.words)
    next_word = len(words) if words_ahead else 0
    if words_ahead:
        events.extend(words)
    audio = memoryview(entry.audio)
    for offset in range(0, len(audio), REPLAY_CHUNK_BYTES):
        chunk = audio[offset : offset + REPLAY_CHUNK_BYTES]
        chunk_end_ms = audio_format.duration_ms(offset + len(chunk))
        while next_word < len(words) and words[next_word].offset_ms < chunk_end_ms:
            events.append(words[next_word])
            next_word += 1
        events.append(AudioChunk(chunk))
    events.extend(words[next_word:])
    return events
