"""The Edge engine: Microsoft Edge's online neural voices through ``edge-tts``.

One ``edge_tts.Communicate`` per utterance, asking for word boundaries. This
module adds what edge-tts lacks for a server: deadlines on the first audio and on
every gap between chunks, detection of a stream that ends before ``turn.end``,
character ranges for words, a mapping of edge-tts's and aiohttp's exceptions
to :mod:`ttsstream.exceptions`, and the aiohttp sessions edge-tts connects with
(:class:`UpstreamSessions`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import warnings
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import edge_tts
import edge_tts.communicate
import edge_tts.voices
import yarl
from edge_tts.exceptions import EdgeTTSException, NoAudioReceived, SkewAdjustmentError

from ttsstream.config import EDGE_VOICE_PATTERN
from ttsstream.engines.base import (
    MP3_24KHZ_48KBPS,
    AudioChunk,
    AudioFormat,
    SynthesisEvent,
    SynthesisRequest,
    Voice,
    WordEvent,
)
from ttsstream.engines.words import WordLocator
from ttsstream.exceptions import (
    InvalidVoice,
    NoAudio,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = ["EdgeEngine", "UpstreamSessions"]

logger = logging.getLogger("ttsstream.engines.edge")

#: edge-tts reports times in 100-nanosecond ticks.
TICKS_PER_MS = 10_000


class UpstreamSessions:
    """Makes the aiohttp sessions edge-tts opens: one per utterance, as edge-tts does.

    edge-tts opens every session with ``trust_env=True``. aiohttp then looks for
    a proxy in the environment and for a ``~/.netrc`` entry on every request,
    each in a worker thread: two thread hops per utterance, which during a burst
    of new utterances wait for the event loop to let go of the GIL. At 100
    simultaneous utterances that delayed the last one's first audio by about 10 ms
    (``bench/NOTES.md``). Sessions made here read nothing from the environment:
    the proxy is :attr:`Config.edge_proxy`. They also share one connector, so
    Edge's host name is resolved once per aiohttp DNS-cache period (10 s)
    instead of in a worker thread per utterance.

    Args:
        proxy: An ``http://`` proxy URL, credentials allowed; ``None``: direct.
    """

    def __init__(self, proxy: str | None = None) -> None:
        self._proxy: yarl.URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        if proxy is not None:
            url = yarl.URL(proxy)
            self._proxy_auth = aiohttp.BasicAuth.from_url(url)
            self._proxy = url.with_user(None)
        self._connector: aiohttp.TCPConnector | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def ClientSession(
        self, *, connector: aiohttp.BaseConnector | None = None, **options: Any
    ) -> aiohttp.ClientSession:
        """A session for one request of edge-tts, taking the options it passes."""
        options["trust_env"] = False
        options["connector_owner"] = connector is not None
        if connector is None:
            connector = self._shared_connector()
        if self._proxy_auth is None:
            return aiohttp.ClientSession(connector=connector, proxy=self._proxy, **options)
        # aiohttp deprecates the session's proxy_auth for a proxy_headers argument of
        # each request, which edge-tts does not pass: the session's is the only way in.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return aiohttp.ClientSession(
                connector=connector, proxy=self._proxy, proxy_auth=self._proxy_auth, **options
            )

    def _shared_connector(self) -> aiohttp.TCPConnector:
        loop = asyncio.get_running_loop()
        if self._connector is None or self._connector.closed or self._loop is not loop:
            # No cap of its own: UPSTREAM_CONCURRENCY is the cap.
            self._connector = aiohttp.TCPConnector(limit=0)
            self._loop = loop
        return self._connector

    def __getattr__(self, name: str) -> Any:
        # Everything else edge-tts uses from aiohttp (WSMsgType, ClientTimeout, …).
        return getattr(aiohttp, name)

    def install(self) -> None:
        """Make edge-tts open its sessions here: it finds ``aiohttp`` by its module name."""
        for module in (edge_tts.communicate, edge_tts.voices):
            module.aiohttp = self  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        """Close the shared connector (at shutdown)."""
        connector, self._connector = self._connector, None
        if connector is not None and self._loop is asyncio.get_running_loop():
            await connector.close()


class EdgeEngine:
    """Speak with Edge's voices.

    Args:
        wss_url: The Read Aloud WebSocket endpoint, with its ``TrustedClientToken`` query.
        voices_url: The voice-list endpoint, likewise.
        proxy: An ``http://`` proxy for both, credentials allowed; ``None``: direct.
        timeout: Seconds allowed for connect + first audio and for each later gap.
        voices_ttl: Seconds the voice list is kept.
    """

    name = "edge"
    audio_format: AudioFormat = MP3_24KHZ_48KBPS

    def __init__(
        self,
        *,
        wss_url: str,
        voices_url: str,
        proxy: str | None = None,
        # Timeouts
        timeout: float = 15.0,
        voices_ttl: float = 24 * 3600.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        # edge-tts copies its URL constants into these modules at import; patching
        # edge_tts.constants alone would not redirect it.
        edge_tts.communicate.WSS_URL = wss_url  # type: ignore[attr-defined]
        edge_tts.voices.VOICE_LIST = voices_url  # type: ignore[attr-defined]
        self._sessions = UpstreamSessions(proxy)
        self._sessions.install()
        self._timeout = timeout
        self._voices_ttl = voices_ttl
        self._voices: list[Voice] | None = None
        self._voice_names: frozenset[str] = frozenset()
        self._voices_expire_at = 0.0
        self._voices_lock = asyncio.Lock()

    async def synthesize(self, request: SynthesisRequest) -> AsyncGenerator[SynthesisEvent, None]:
        """Stream one utterance from the Edge service; see :class:`.base.Engine`."""
        await self.check_voice(request.voice)
        try:
            communicate = edge_tts.Communicate(
                request.text,
                request.voice,
                rate=request.rate,
                volume=request.volume,
                pitch=request.pitch,
                boundary="WordBoundary",
                connect_timeout=max(1, math.ceil(self._timeout)),
            )
        except ValueError:
            raise InvalidVoice("unknown voice") from None

        locator = WordLocator(request.text)
        stream = communicate.stream()
        # edge-tts does not time out reads on an open socket: bound every wait.
        gaps = _GapDeadline(self._timeout)
        audio_bytes = 0
        try:
            while True:
                try:
                    chunk = await gaps.next(stream)
                except StopAsyncIteration:
                    break
                if chunk["type"] == "audio":
                    audio_bytes += len(chunk["data"])
                    yield AudioChunk(chunk["data"])
                elif chunk["type"] == "WordBoundary":
                    start, end = locator.locate(chunk["text"])
                    yield WordEvent(
                        text=chunk["text"],
                        offset_ms=chunk["offset"] / TICKS_PER_MS,
                        duration_ms=chunk["duration"] / TICKS_PER_MS,
                        char_start=start,
                        char_end=end,
                    )
        except TimeoutError:
            kind = "first audio" if audio_bytes == 0 else "next chunk"
            logger.debug("upstream timeout waiting for %s after %.1fs", kind, self._timeout)
            raise UpstreamTimeout("the speech service did not answer in time") from None
        except (EdgeTTSException, aiohttp.ClientError) as exc:
            raise _upstream_error(exc) from None
        finally:
            gaps.close()
            await stream.aclose()

        # edge-tts ends quietly when the service closes mid-stream: it only counts a
        # piece's audio once that piece's turn.end arrived, so a shortfall means a drop.
        completed = communicate.state.get("cumulative_audio_bytes", audio_bytes)
        if completed != audio_bytes:
            logger.debug(
                "upstream closed mid-stream: %d of %d bytes completed", completed, audio_bytes
            )
            raise UpstreamUnavailable("the speech service closed the stream early")

    async def aclose(self) -> None:
        """Release the upstream connector (at shutdown)."""
        await self._sessions.aclose()

    async def voices(self) -> list[Voice]:
        """Return Edge's voices, fetched at most once per ``voices_ttl``."""
        async with self._voices_lock:
            if self._voices is not None and time.monotonic() < self._voices_expire_at:
                return self._voices
            try:
                async with asyncio.timeout(self._timeout):
                    listed: list[Any] = await edge_tts.list_voices()
            except TimeoutError:
                # The router says once when lists go out without Edge's voices; a line
                # per timed-out fetch would repeat it at every request.
                logger.debug("voice list: timeout after %.1fs", self._timeout)
                raise UpstreamTimeout("the speech service did not answer in time") from None
            except (EdgeTTSException, aiohttp.ClientError, ValueError) as exc:
                raise _upstream_error(exc) from None
            voices = [
                Voice(
                    name=item["ShortName"],
                    locale=item["Locale"],
                    gender=item["Gender"],
                    engine=self.name,
                )
                for item in listed
            ]
            self._voices = voices
            self._voice_names = frozenset(
                str(name)
                for item in listed
                for name in (item["ShortName"], item.get("Name"))
                if name
            )
            self._voices_expire_at = time.monotonic() + self._voices_ttl
            logger.info("voice list: %d voices", len(voices))
            return voices

    async def check_voice(self, voice: str) -> None:
        """Refuse a malformed voice, or one missing from the voice list once it is known."""
        if EDGE_VOICE_PATTERN.fullmatch(voice) is None:
            raise InvalidVoice("unknown voice")
        # An expired list still tells which voices exist better than no list.
        if self._voices is not None and voice not in self._voice_names:
            raise InvalidVoice("unknown voice")


def _upstream_error(exc: BaseException) -> UpstreamError:
    """Map an edge-tts or aiohttp exception to the error the client sees, and log it (at
    DEBUG: the breaker logs the upstream's changes of state, once each)."""
    if isinstance(exc, SkewAdjustmentError) and exc.__cause__ is not None:
        # edge-tts retries a 403 after correcting its clock from the Date header;
        # without one it raises this instead of the 403 itself.
        exc = exc.__cause__
    if isinstance(exc, NoAudioReceived):
        logger.debug("upstream sent no audio")
        return NoAudio("the speech service returned no audio")
    if isinstance(exc, aiohttp.ClientResponseError):
        logger.debug("upstream refused: HTTP %s (%s)", exc.status, type(exc).__name__)
        return UpstreamUnavailable(f"the speech service refused the request (HTTP {exc.status})")
    if isinstance(exc, aiohttp.ClientError):
        logger.debug("upstream unreachable: %s", type(exc).__name__)
        return UpstreamUnavailable("could not reach the speech service")
    logger.debug("upstream protocol error: %s: %s", type(exc).__name__, exc)
    return UpstreamUnavailable("the speech service sent an invalid response")


class _GapDeadline:
    """A deadline on every wait for the upstream's next message, one timer per deadline.

    Written by hand because ``asyncio.timeout`` around each ``anext`` arms and
    cancels a timer per chunk, and that was 11 % of the event loop's busy time
    at 100 live utterances (py-spy; bench/NOTES.md). Here a wait only notes when
    it began; one timer per utterance wakes when the earliest possible deadline
    passes and either re-arms for the wait in progress or cancels the waiting
    task, which :meth:`next` turns into :class:`TimeoutError` exactly as
    ``asyncio.timeout`` does (a cancellation from anyone else stays one).
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._since: float | None = None
        self._fired = False
        self._timer: asyncio.TimerHandle | None = None

    async def next(self, stream: AsyncIterator[Any]) -> Any:
        """``anext(stream)``, raising :class:`TimeoutError` if it waits ``seconds``."""
        if self._fired:
            raise TimeoutError
        task = self._task
        if task is None:  # one task reads an utterance's stream from start to end
            task = self._task = asyncio.current_task()
            assert task is not None
        cancelling = task.cancelling()
        self._since = now = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._seconds, self._check)
        try:
            return await anext(stream)
        except asyncio.CancelledError:
            if self._fired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            self._since = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        since, now = self._since, self._loop.time()
        if since is None:  # between waits: the next wait arms a timer again
            return
        if now - since < self._seconds:
            self._timer = self._loop.call_at(since + self._seconds, self._check)
            return
        self._fired = True
        assert self._task is not None
        self._task.cancel()
