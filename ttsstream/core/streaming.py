"""Text that arrives while it is spoken: one streaming utterance, segment by segment.

A door feeds a :class:`StreamingText` (``append``, ``flush``, ``finish``); a
:class:`~ttsstream.core.cleanup.MarkdownCleaner` cleans it as it comes (the same
rules as a whole text's, whatever the pieces: ``**bold`` then ``text**`` is
"bold text"), the :class:`~ttsstream.core.segmenter.Segmenter` cuts the cleaned
text into segments, and :func:`speak_stream` speaks them one after another as one
utterance:

- Each segment is synthesized through the cache and its coalescing, like any
  text (a sentence said before replays from the cache).
- Lookahead: the next segment's synthesis starts as soon as it is cut, while
  the current one still streams (at most two per utterance), and its audio is
  passed on right after the current one's last byte.
- One timeline: word offsets move by the playing time of every earlier segment
  (their constant-bitrate audio, as decoded), and character ranges by where the
  segment starts in the whole text spoken (:attr:`StreamingText.source` takes
  them to the text appended).
- One voice: every segment is spoken by the engine and voice of the first. When
  the first fell back to the offline voice, the later ones are spoken by it too;
  when a later segment cannot be (Edge failed after the first was spoken by
  Edge), the utterance ends with the error, partial.

Timers of the text, driven by whoever waits for the next segment: text that does
not grow for ``STREAM_MAX_WAIT_MS`` is cut as it is, and an utterance that gets
no ``append``, ``flush`` or ``finish`` for ``STREAM_IDLE_TIMEOUT`` is finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from ttsstream.core.cleanup import MarkdownCleaner
from ttsstream.core.router import Speech, Started
from ttsstream.core.segmenter import Segment, Segmenter
from ttsstream.core.speech_cache import SpeechCache
from ttsstream.engines.base import AudioChunk, SynthesisRequest, WordEvent
from ttsstream.engines.words import CharMap
from ttsstream.exceptions import EmptyText, InvalidParameter, TextTooLong, UpstreamUnavailable

__all__ = ["LOOKAHEAD", "Ahead", "StreamCounts", "StreamingText", "speak_stream"]

#: Most segments of one utterance being synthesized at once (the current one and the next).
LOOKAHEAD = 2


@dataclass
class StreamCounts:
    """What :func:`speak_stream` spoke, for the utterance's ``end``."""

    segments: int = 0
    cached_segments: int = 0


class StreamingText:
    """The text of one streaming utterance, as its client sends it.

    Its timers run from creation until :meth:`close`.

    Args:
        segmenter: Cuts the text (cleaned).
        max_length: Most characters of the whole text.
        max_wait: Seconds buffered text may wait without growing before it is cut.
        idle_timeout: Seconds without a message before the text is finished.
        cleaner: Cleans the text as it comes; ``None``: it is spoken as it is.
    """

    def __init__(
        self,
        segmenter: Segmenter,
        *,
        max_length: int,
        max_wait: float,
        idle_timeout: float,
        cleaner: MarkdownCleaner | None = None,
    ) -> None:
        self._segmenter = segmenter
        self._cleaner = cleaner
        self._total = 0
        self._max_length = max_length
        self._max_wait = max_wait
        self._idle_timeout = idle_timeout
        self._ready: deque[Segment] = deque()
        self._changed = asyncio.Event()
        self._poke = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._last_message = self._last_growth = loop.time()
        #: No more text will come.
        self.finished = False
        self.counts = StreamCounts()
        #: Called whenever a segment was cut or the text finished (by the speaker).
        self.on_cut: Callable[[], None] | None = None
        self._timer = asyncio.create_task(self._watch(), name="stream-timer")

    @property
    def total(self) -> int:
        """Characters appended so far."""
        return self._total

    @property
    def source(self) -> CharMap | None:
        """Where each character of the text spoken (the segments' texts, and their
        ``start``) came from in the text appended; ``None``: it is that text."""
        return None if self._cleaner is None else self._cleaner.map

    @property
    def done(self) -> bool:
        """Finished, and every segment taken."""
        return self.finished and not self._ready

    def append(self, text: str) -> None:
        """Add ``text`` (verbatim).

        Raises:
            InvalidParameter: The text was finished already.
            TextTooLong: The whole text would pass its limit; the text is finished
                with what it had.
        """
        self._check_open()
        if self.total + len(text) > self._max_length:
            self.finish()
            raise TextTooLong(
                f"the streamed text would pass {self._max_length} characters; "
                "it ends with what was sent before"
            )
        now = asyncio.get_running_loop().time()
        self._last_message = now
        if text:
            self._last_growth = now
        self._poke.set()
        self._total += len(text)
        if self._cleaner is not None:
            text = self._cleaner.feed(text)
        self._cut(self._segmenter.append(text))

    def flush(self) -> None:
        """Cut what is buffered now, even mid-sentence.

        Raises:
            InvalidParameter: The text was finished already.
        """
        self._check_open()
        self._last_message = asyncio.get_running_loop().time()
        self._poke.set()
        self._cut(self._flushed())

    def finish(self) -> None:
        """No more text: what is buffered is the last segment. Finishing twice is no error."""
        if self.finished:
            return
        self.finished = True
        self._timer.cancel()
        self._cut(self._flushed())

    def take(self) -> Segment | None:
        """The next segment cut, if any (without waiting)."""
        return self._ready.popleft() if self._ready else None

    async def wait(self) -> None:
        """Return once a segment was cut (and maybe taken already, by ``on_cut``) or the
        text finished."""
        if self._ready or self.finished:
            return
        self._changed.clear()
        await self._changed.wait()

    def close(self) -> None:
        """Stop the timers (the utterance is over)."""
        self._timer.cancel()
        self.on_cut = None

    def _flushed(self) -> list[Segment]:
        """Everything buffered, cut: what the cleaner holds back too (decided as if
        the text ended there)."""
        if self._cleaner is None:
            return self._segmenter.flush()
        return self._segmenter.append(self._cleaner.feed(final=True)) + self._segmenter.flush()

    def _cut(self, segments: list[Segment]) -> None:
        self._ready.extend(segments)
        if segments or self.finished:
            self._changed.set()
            if self.on_cut is not None:
                self.on_cut()

    def _check_open(self) -> None:
        if self.finished:
            raise InvalidParameter("this streaming utterance is finished: no more text")

    async def _watch(self) -> None:
        """Cut text that stopped growing; finish a text its client stopped sending."""
        loop = asyncio.get_running_loop()
        while not self.finished:
            waiting = bool(self._segmenter.pending.strip())
            idle_at = self._last_message + self._idle_timeout
            cut_at = self._last_growth + self._max_wait if waiting else idle_at
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(min(idle_at, cut_at)):
                    await self._poke.wait()
                continue
            now = loop.time()
            if now >= self._last_message + self._idle_timeout:
                self.finish()
            elif waiting and now >= self._last_growth + self._max_wait:
                self._last_growth = now
                # What the cleaner holds back (a URL, a tag, a line's first marks: a
                # few characters, bounded) waits on: the text is paused, not over.
                self._cut(self._segmenter.flush())


class Ahead:
    """One synthesis running ahead of its turn into a queue of events (the next segment
    of a streamed text, the next span of an SSML document)."""

    def __init__(
        self, speech: SpeechCache, request: SynthesisRequest, *, words_ahead: bool
    ) -> None:
        self.request = request
        self._events: asyncio.Queue[Speech | BaseException | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(speech, words_ahead))

    async def _run(self, speech: SpeechCache, words_ahead: bool) -> None:
        try:
            async with contextlib.aclosing(
                speech.synthesize(self.request, words_ahead=words_ahead)
            ) as events:
                async for event in events:
                    self._events.put_nowait(event)
        except Exception as exc:
            self._events.put_nowait(exc)
            return
        self._events.put_nowait(None)

    async def events(self) -> AsyncGenerator[Speech, None]:
        while (event := await self._events.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            yield event

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class _Segment(Ahead):
    """A streamed text's segment, synthesized ahead."""

    def __init__(
        self, speech: SpeechCache, request: SynthesisRequest, segment: Segment, *, words_ahead: bool
    ) -> None:
        self.segment = segment
        super().__init__(speech, request, words_ahead=words_ahead)


async def speak_stream(
    speech: SpeechCache,
    request: SynthesisRequest,
    text: StreamingText,
    *,
    words_ahead: bool = False,
) -> AsyncGenerator[Speech, None]:
    """Speak ``text`` segment by segment as one utterance (see the module).

    ``request`` gives the voice and prosody; its text is not used.

    Raises:
        EmptyText: The text was finished without anything to speak.
        UpstreamUnavailable: A later segment could not be spoken in the first one's voice.
        ClientError: A segment failed.
    """
    ahead: deque[_Segment] = deque()
    first: Started | None = None
    voice = request.voice
    shift_ms = 0.0

    def start_ready() -> None:
        """Start the syntheses of the segments cut so far, up to LOOKAHEAD at once."""
        while len(ahead) < LOOKAHEAD and (segment := text.take()) is not None:
            segment_request = dataclasses.replace(request, text=segment.text, voice=voice)
            ahead.append(_Segment(speech, segment_request, segment, words_ahead=words_ahead))

    text.on_cut = start_ready
    try:
        while True:
            start_ready()
            if not ahead:
                if text.done:
                    break
                await text.wait()
                continue
            current = ahead[0]
            if current.request.voice != voice:  # started before the first fell back
                await current.aclose()
                current = ahead[0] = _Segment(
                    speech,
                    dataclasses.replace(current.request, voice=voice),
                    current.segment,
                    words_ahead=words_ahead,
                )
            byte_count = 0
            segment_format = None
            async for event in current.events():
                if isinstance(event, Started):
                    if first is None:
                        first = event
                        voice = event.voice
                        yield dataclasses.replace(event, cached=False)
                    elif event.engine != first.engine or event.voice != first.voice:
                        raise UpstreamUnavailable(
                            "the speech service failed in the middle of the streamed text"
                        )
                    segment_format = event.audio_format
                    text.counts.segments += 1
                    text.counts.cached_segments += event.cached
                elif isinstance(event, AudioChunk):
                    byte_count += len(event.data)
                    yield event
                else:
                    yield _shifted(event, shift_ms, current.segment.start)
            if segment_format is not None:
                shift_ms += segment_format.duration_ms(byte_count)
            ahead.popleft()
        if first is None:
            raise EmptyText("the streamed text had nothing to speak")
    finally:
        text.close()
        for pending in ahead:
            await pending.aclose()


def _shifted(word: WordEvent, shift_ms: float, chars: int) -> WordEvent:
    return dataclasses.replace(
        word,
        offset_ms=word.offset_ms + shift_ms,
        char_start=None if word.char_start is None else word.char_start + chars,
        char_end=None if word.char_end is None else word.char_end + chars,
    )
