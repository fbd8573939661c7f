"""Which engine speaks an utterance, and how the Edge upstream is protected.

:class:`SpeechRouter` sends ``espeak:`` voices to the offline engine and every
other voice to Edge, with:

- a cap on simultaneous Edge syntheses (``UPSTREAM_CONCURRENCY``), shared fairly
  between clients (:class:`~ttsstream.core.slots.FairSlots`: at most
  ``UPSTREAM_CONCURRENCY_PER_IP`` each, a freed slot to the client holding the
  fewest), and in a cluster the cluster's permit too;
- one ``UPSTREAM_TIMEOUT`` deadline for the wait for a slot and every attempt up
  to the first audio: a request that gets no slot in time is spoken by the
  fallback (``upstream_timeout``) instead of waiting for other clients' work;
- retries with jittered exponential backoff while no audio was sent, within that
  deadline (``UPSTREAM_RETRIES``);
- a circuit breaker that stops calling Edge after repeated failures;
- fallback to the offline voice when Edge fails before any audio. Audio of two
  engines is never mixed: once Edge audio went out, a failure is an error.

``no_audio`` (the service answered, with no audio) is the request's failure, not
the service's: it does not count toward the breaker, so that no client can open
it for everyone with voices or texts the service refuses; nor does a wait for a
slot that outlasted the deadline (the server was busy, Edge did not fail). Edge's
voice list is kept fresh in the background (:meth:`SpeechRouter.keep_voices_fresh`),
so that unknown voices are refused before any call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import Protocol

from ttsstream.config import Config
from ttsstream.core.breaker import CircuitBreaker
from ttsstream.core.slots import FairSlots
from ttsstream.engines.base import (
    AudioChunk,
    AudioFormat,
    Engine,
    SynthesisEvent,
    SynthesisRequest,
    Voice,
    WordEvent,
)
from ttsstream.engines.edge import EdgeEngine
from ttsstream.engines.espeak import VOICE_PREFIX, EspeakEngine
from ttsstream.exceptions import (
    ConfigError,
    InvalidVoice,
    NoAudio,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ttsstream.stats import Stats

__all__ = ["AUTO", "SpeechRouter", "Started", "speech_router"]

logger = logging.getLogger("ttsstream.core.router")

#: ``FALLBACK_VOICE`` value: the offline voice for the requested voice's locale.
AUTO = VOICE_PREFIX + "auto"
#: The offline voice when no locale matches.
LAST_RESORT_VOICE = VOICE_PREFIX + "en-us"
#: First retry waits about this many seconds; each later one twice as long.
RETRY_BACKOFF_SECONDS = 0.1
#: Seconds before the first new try at a voice list that could not be fetched; each
#: later try waits twice as long, up to VOICES_RETRY_MAX_SECONDS.
VOICES_RETRY_SECONDS = 1.0
VOICES_RETRY_MAX_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Started:
    """The first event of every utterance: who speaks it, and why if it is a fallback."""

    engine: str
    voice: str
    audio_format: AudioFormat
    #: Error code of the Edge failure that made the offline voice speak, else ``None``.
    fallback_reason: str | None = None
    #: Replayed from the disk cache.
    cached: bool = False
    #: The whole utterance's playing time, when known before its audio (a stored
    #: format other than MP3, whose length in bytes does not tell).
    audio_ms: float | None = None
    #: Edge's time to first audio for this synthesis, ms: from asking it (an upstream
    #: slot held) to its first audio, retries included. ``None`` for a replay, the
    #: offline voice, or a synthesis made by another instance of the cluster. With
    #: the request's ``ttfb_ms`` it tells the server's time from the upstream's.
    upstream_ms: float | None = None


Speech = Started | AudioChunk | WordEvent


class SharedSlots(Protocol):
    """Upstream permits counted over a cluster (``cluster/`` implements it on Redis)."""

    async def take(self) -> str | None:
        """A permit, once there is room; ``None`` if none can be had (then the
        instance's own cap holds alone)."""

    def release(self, permit: str) -> None:
        """Give ``permit`` back (in the background)."""


class SpeechRouter:
    """Route utterances to engines, protecting the upstream and falling back.

    Args:
        edge: The online engine.
        offline: The offline engine, or ``None`` when it is not installed.
        fallback_voice: :data:`AUTO`, an ``espeak:<id>`` voice, or ``None`` for no fallback.
        breaker: Guards the online engine.
        retries: Further attempts after a failed one, while no audio was sent.
        concurrency: Most simultaneous online syntheses.
        per_client: Most of them one client (:attr:`SynthesisRequest.client`) holds
            at once; ``None`` for no cap of its own.
        shared_slots: The cluster's upstream permits (the same cap over every
            instance), or ``None`` for one instance.
        timeout: Seconds for the wait for a slot and all attempts together to
            produce the first audio.
        stats: Counters to update.
    """

    def __init__(
        self,
        *,
        edge: Engine,
        offline: EspeakEngine | None,
        fallback_voice: str | None = AUTO,
        breaker: CircuitBreaker | None = None,
        # Limits
        retries: int = 2,
        concurrency: int = 16,
        per_client: int | None = None,
        shared_slots: SharedSlots | None = None,
        # Timeouts
        timeout: float = 15.0,
        stats: Stats | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if per_client is not None and per_client < 1:
            raise ValueError("per_client must be >= 1")
        if fallback_voice not in (None, AUTO) and (
            offline is not None and not offline.has_voice(fallback_voice)
        ):
            raise ValueError(f"unknown fallback voice {fallback_voice!r}")
        self.edge = edge
        self.offline = offline
        self.fallback_voice = fallback_voice if offline is not None else None
        self.breaker = breaker or CircuitBreaker()
        self._retries = retries
        #: This instance's upstream slots, shared fairly between clients.
        self.slots = FairSlots(concurrency, per_client=per_client)
        #: A request waited too long for a slot, and a request still waits for one.
        self._waited_too_long = False
        #: The cluster's permits (Redis), if the server is in a cluster.
        self.shared_slots = shared_slots
        self._timeout = timeout
        self.stats = stats or Stats()
        #: Edge's voice list: how many voices it has (``None`` until fetched), and
        #: the error code of the last failed fetch (``None`` once one succeeded).
        self.edge_voices: int | None = None
        self.edge_voices_error: str | None = None
        #: While voice lists go out without Edge's voices, the error code of the fetch
        #: that failed (said once as it begins, once as it ends), else ``None``.
        self._voices_without_edge: str | None = None

    @property
    def online_engine(self) -> tuple[str, AudioFormat]:
        """The online engine's name and audio format (what cache keys are made of)."""
        return self.edge.name, self.edge.audio_format

    # Voices

    async def voices(self) -> list[Voice]:
        """Edge's voices and the offline ones; either alone when the other is unavailable.

        Raises:
            UpstreamError: Edge's list failed and there is no offline voice.
        """
        offline = await self.offline.voices() if self.offline is not None else []
        try:
            online = await self.edge.voices()
        except UpstreamError as exc:
            if not offline:
                raise
            if self._voices_without_edge is None:
                logger.warning(
                    "voice list: Edge unavailable (%s), offline voices only until it answers",
                    exc.code,
                )
            self._voices_without_edge = exc.code
            online = []
        else:
            if self._voices_without_edge is not None:
                logger.info("voice list: Edge's voices listed again")
            self._voices_without_edge = None
        return online + offline

    async def keep_voices_fresh(self, every: float) -> None:
        """Fetch Edge's voice list now and every ``every`` seconds, until cancelled.

        A failed fetch is tried again after 1 s, then twice as long each time up to
        5 minutes; meanwhile the last list known (if any) keeps checking voices.
        """
        retry = VOICES_RETRY_SECONDS
        while True:
            try:
                self.edge_voices = len(await self.edge.voices())
            except UpstreamError as exc:
                if self.edge_voices_error is None:
                    logger.warning(
                        "voice list not available (%s): %s; trying again with backoff",
                        exc.code,
                        "the last list is used" if self.edge_voices else "voices are not checked",
                    )
                self.edge_voices_error = exc.code
                await asyncio.sleep(retry / 2 + random.random() * retry / 2)
                retry = min(retry * 2, VOICES_RETRY_MAX_SECONDS)
                continue
            if self.edge_voices_error is not None:
                logger.info("voice list available again: %d voices", self.edge_voices)
            self.edge_voices_error = None
            retry = VOICES_RETRY_SECONDS
            await asyncio.sleep(every)

    async def check_voice(self, voice: str) -> None:
        """Refuse a voice no engine has (Edge's only when its list is known)."""
        if voice.startswith(VOICE_PREFIX):
            if self.offline is None:
                raise InvalidVoice("the offline voice is not installed on this server")
            await self.offline.check_voice(voice)
        else:
            await self.edge.check_voice(voice)

    async def aclose(self) -> None:
        """Close the engines (at shutdown, once no utterance is left)."""
        await self.edge.aclose()
        if self.offline is not None:
            await self.offline.aclose()

    # Speech

    async def synthesize(self, request: SynthesisRequest) -> AsyncGenerator[Speech, None]:
        """Speak ``request``: :class:`Started` first, then its audio and word events.

        Raises:
            ClientError: The utterance failed and no fallback could speak it.
        """
        if request.voice.startswith(VOICE_PREFIX):
            if self.offline is None:
                raise InvalidVoice("the offline voice is not installed on this server")
            yield Started(self.offline.name, request.voice, self.offline.audio_format)
            async with contextlib.aclosing(self.offline.synthesize(request)) as events:
                async for event in events:
                    yield event
            return

        deadline = asyncio.get_running_loop().time() + self._timeout
        failure: UpstreamError
        async with contextlib.AsyncExitStack() as slot:
            try:
                await slot.enter_async_context(self._upstream_slot(request.client, deadline))
                asked = time.perf_counter()
                stream, first = await self._first_audio(request, deadline)
            except UpstreamError as exc:
                failure = exc
            else:
                upstream_ms = (time.perf_counter() - asked) * 1000
                yield Started(
                    self.edge.name, request.voice, self.edge.audio_format, upstream_ms=upstream_ms
                )
                try:
                    for event in first:
                        yield event
                    async for event in stream:
                        yield event
                except UpstreamError as exc:
                    self.breaker.record_failure(exc.code, exc.message)
                    self.stats.upstream_failed(exc.code)
                    raise
                finally:
                    await stream.aclose()
                return
        # The fallback runs outside the Edge slot: it does not load the upstream.
        fallback = self._fallback_for(request.voice)
        if fallback is None or self.offline is None:
            raise failure
        # Per utterance: the access log has it (engine, fallback); the error log has
        # the upstream's changes of state (the breaker, the slots all taken).
        logger.debug("no edge audio (%s): fallback to %s", failure.message, fallback)
        self.stats.fallbacks += 1
        yield Started(self.offline.name, fallback, self.offline.audio_format, failure.code)
        async with contextlib.aclosing(
            self.offline.synthesize(replace(request, voice=fallback))
        ) as events:
            async for event in events:
                yield event

    @contextlib.asynccontextmanager
    async def _upstream_slot(self, client: str, deadline: float) -> AsyncIterator[None]:
        """Hold an upstream slot for ``client``: this instance's (its fair share) and, in
        a cluster, one of the cluster's permits, each taken before ``deadline``.

        Raises:
            UpstreamTimeout: No slot was free before ``deadline`` (nothing is held then).
        """
        try:
            async with asyncio.timeout_at(deadline):
                await self.slots.take(client)
        except TimeoutError:
            raise self._busy("this instance's") from None
        if self._waited_too_long and not self.slots.waiting:
            self._waited_too_long = False
            logger.info("upstream slots: no request waits for one any more")
        try:
            permit: str | None = None
            if self.shared_slots is not None:
                try:
                    async with asyncio.timeout_at(deadline):
                        permit = await self.shared_slots.take()
                except TimeoutError:
                    raise self._busy("the cluster's") from None
            try:
                yield
            finally:
                if permit is not None and self.shared_slots is not None:
                    self.shared_slots.release(permit)
        finally:
            self.slots.give_back(client)

    def _busy(self, whose: str) -> UpstreamTimeout:
        """What a request that got none of ``whose`` upstream slots in time fails with;
        logged once until no request waits for a slot any more."""
        if not self._waited_too_long:
            self._waited_too_long = True
            slots = self.slots
            logger.warning(
                "upstream slots: a request got none of %s within UPSTREAM_TIMEOUT "
                "(here %d of %d free, at most %d per client, %d waiting); "
                "such requests go to the fallback",
                whose,
                slots.free,
                slots.capacity,
                slots.per_client,
                slots.waiting,
            )
        return UpstreamTimeout("no upstream slot was free in time; the server is busy")

    async def _first_audio(
        self, request: SynthesisRequest, deadline: float
    ) -> tuple[AsyncGenerator[SynthesisEvent, None], list[SynthesisEvent]]:
        """Open Edge and read up to its first audio chunk, retrying until ``deadline``
        (the event loop's time).

        Returns:
            The open stream and the events read from it, ending with the first audio.

        Raises:
            UpstreamError: Every attempt failed, the deadline passed, or the breaker is open.
        """
        loop = asyncio.get_running_loop()
        failure: UpstreamError = UpstreamUnavailable(
            "the speech service is failing; requests to it are paused"
        )
        for attempt in range(self._retries + 1):
            if attempt > 0:
                backoff = RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1)
                delay = backoff / 2 + random.random() * backoff / 2
                if loop.time() + delay >= deadline:
                    break
                await asyncio.sleep(delay)
            if not self.breaker.allow():
                break
            self.stats.upstream_requests += 1
            stream = self.edge.synthesize(request)
            first: list[SynthesisEvent] = []
            try:
                async with asyncio.timeout_at(deadline):
                    async for event in stream:
                        first.append(event)
                        if isinstance(event, AudioChunk):
                            break
            except TimeoutError:
                failure = UpstreamTimeout("the speech service did not answer in time")
            except UpstreamError as exc:
                failure = exc
            except BaseException:
                self.breaker.abandon_trial()
                await stream.aclose()
                raise
            else:
                if first and isinstance(first[-1], AudioChunk):
                    self.breaker.record_success()
                    return stream, first
                failure = NoAudio("the speech service returned no audio")
            await stream.aclose()
            if isinstance(failure, NoAudio):
                # The service answered: this request, not the service, failed.
                self.breaker.abandon_trial()
            else:
                self.breaker.record_failure(failure.code, failure.message)
            self.stats.upstream_failed(failure.code)
            logger.debug("edge attempt %d failed: %s", attempt + 1, failure.code)
        raise failure

    def _fallback_for(self, voice: str) -> str | None:
        if self.offline is None or self.fallback_voice is None:
            return None
        if self.fallback_voice != AUTO:
            return self.fallback_voice
        locale = "-".join(voice.split("-")[:2])
        return self.offline.voice_for_locale(locale) or LAST_RESORT_VOICE


def speech_router(
    config: Config,
    *,
    stats: Stats | None = None,
    edge: Engine | None = None,
    with_offline: bool = True,
    shared_slots: SharedSlots | None = None,
) -> SpeechRouter:
    """Build the engines and the router that ``config`` describes.

    Args:
        config: The settings.
        shared_slots: The cluster's upstream permits, if the server is in a cluster.
        stats: Counters to update.
        edge: The online engine; by default Edge, as ``config`` says.
        with_offline: Load the offline voice when it is installed (tests turn it off
            to see a server without the ``local`` extra).

    Raises:
        ConfigError: ``DEFAULT_VOICE`` or ``FALLBACK_VOICE`` names an offline voice
            that is not available.
    """
    if edge is None:
        edge = EdgeEngine(
            wss_url=config.edge_wss_url,
            voices_url=config.edge_voices_url,
            proxy=config.edge_proxy,
            timeout=config.upstream_timeout,
            voices_ttl=config.voices_ttl,
        )
    offline = EspeakEngine.load() if with_offline else None
    for variable, voice in (
        ("DEFAULT_VOICE", config.default_voice),
        ("FALLBACK_VOICE", config.fallback_voice),
    ):
        if voice is None or voice == AUTO or not voice.startswith("espeak:"):
            continue
        if offline is None:
            raise ConfigError(variable, voice, "an Edge voice: the offline voice is not installed")
        if not offline.has_voice(voice):
            raise ConfigError(variable, voice, "an offline voice listed by the voices message")
    if offline is None:
        logger.warning("fallback: none (no offline voice); Edge failures reach clients as errors")
    else:
        logger.info("fallback: %s", config.fallback_voice or "none")
    return SpeechRouter(
        edge=edge,
        offline=offline,
        fallback_voice=config.fallback_voice,
        breaker=CircuitBreaker(
            failure_threshold=config.breaker_failures, cooldown=config.breaker_cooldown
        ),
        retries=config.upstream_retries,
        concurrency=config.upstream_concurrency,
        per_client=config.upstream_slots_per_ip,
        shared_slots=shared_slots,
        timeout=config.upstream_timeout,
        stats=stats,
    )
