"""One utterance's word timings reshaped into what each door sends (pure; no I/O).

The core computes timings once: :class:`~ttsstream.engines.base.WordEvent`\\ s with
times in milliseconds from the start of the utterance's audio and character ranges
into the text the client sent. Doors reshape them:

- ElevenLabs wants a time per *character*. The characters of a located word share
  its span in proportion; the characters between words (spaces, punctuation, text
  the engine skipped) share the gap between the word before and the word after;
  those before the first word share the silence before it, those after the last
  word the rest of the audio. :func:`character_times` does this for a whole text;
  :class:`CharacterTrack` does it message by message while the text, the words and
  the audio still arrive, so that every character is sent exactly once, in order.
- Cartesia wants arrays of words with start and end times in seconds
  (:func:`word_arrays`).

Times are integers in milliseconds where ElevenLabs' WebSocket sends them, floats
in seconds where its HTTP API and Cartesia do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ttsstream.engines.base import WordEvent

__all__ = [
    "CharacterTimes",
    "CharacterTrack",
    "character_times",
    "http_alignment",
    "word_arrays",
    "ws_alignment",
]


@dataclass(frozen=True, slots=True)
class CharacterTimes:
    """Characters and their spans in milliseconds, each ``starts[i] <= ends[i]``."""

    chars: tuple[str, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    @property
    def text(self) -> str:
        """The characters joined."""
        return "".join(self.chars)


@dataclass(frozen=True, slots=True)
class _Span:
    """A located word: its characters ``[first, last)`` spoken from ``start`` to ``end`` ms."""

    first: int
    last: int
    start: float
    end: float


def _spans(words: Iterable[WordEvent], text_length: int) -> list[_Span]:
    """The words that can be placed, in text order, each after the one before in time.

    A word that is not located, lies outside the text, or overlaps the previous
    word's characters is left out (its characters become gap characters).
    """
    spans: list[_Span] = []
    for word in words:
        first, last = word.char_start, word.char_end
        if first is None or last is None or not 0 <= first < last <= text_length:
            continue
        previous = spans[-1] if spans else None
        if previous is not None and first < previous.last:
            continue
        floor = previous.end if previous is not None else 0.0
        start = max(word.offset_ms, floor)
        spans.append(_Span(first, last, start, max(start, word.offset_ms + word.duration_ms)))
    return spans


def _share(count: int, start: float, end: float) -> list[tuple[float, float]]:
    """``count`` consecutive equal parts of ``[start, end]``."""
    step = (end - start) / count if count else 0.0
    return [(start + step * k, start + step * (k + 1)) for k in range(count)]


def character_times(text: str, words: Iterable[WordEvent], *, audio_ms: float) -> CharacterTimes:
    """Every character of ``text`` with its span on the utterance's timeline.

    Args:
        text: The text the client sent.
        words: Its word events (character ranges into ``text``).
        audio_ms: The length of the utterance's audio; the last characters end there.

    Returns:
        One span per character of ``text``, in order, non-decreasing, within
        ``[0, max(audio_ms, last word's end)]``.
    """
    spans = _spans(words, len(text))
    times: list[tuple[float, float]] = []
    cursor, clock = 0, 0.0
    for span in spans:
        times += _share(span.first - cursor, clock, span.start)
        times += _share(span.last - span.first, span.start, span.end)
        cursor, clock = span.last, span.end
    times += _share(len(text) - cursor, clock, max(clock, audio_ms))
    return CharacterTimes(
        tuple(text),
        tuple(round(start) for start, _ in times),
        tuple(round(end) for _, end in times),
    )


class CharacterTrack:
    """The characters of one context (or one HTTP response), handed out audio chunk by
    audio chunk.

    Feed it the text as the client sends it (:meth:`add_text`), the word events as
    the engine gives them (:meth:`add_words`, char ranges into the whole text so
    far), and for every chunk of audio sent, where that chunk ends on the
    context's timeline (:meth:`take`). Each :meth:`take` returns the characters
    not yet given whose time has come (they start before the chunk's end), so that
    the characters of all takes, joined, are the text, once the last take is
    ``final``.

    A character's time is known once its word is known; a character between words
    once the word after it is known. A run of spaces and punctuation after the
    last known word, not followed by a known word yet, is given as soon as the
    audio passes that word's end, sharing the time up to the chunk's end: words
    come before the audio they describe, so the next word does not start earlier.
    A letter or digit no known word covers waits for a later word or the final take.

    The last character of each take ends where its chunk ends, so that a client that
    moves its clock by each message's last character's end (Pipecat) stays on the
    audio's clock.

    Args:
        per_message: Times count from the end of the previous take that gave
            characters (ElevenLabs documents alignment times "relative to the
            returned chunk"; Pipecat adds them to a running sum of each message's
            last end); else from the start of the context (LiveKit reads them so).
        whole: The text is all there from the start (an HTTP request): the spaces and
            punctuation after its last word wait for the final take, so that the last
            character ends where the audio does, trailing silence included (Pipecat's
            HTTP service moves its clock by the last character's end).
    """

    def __init__(self, *, per_message: bool = True, whole: bool = False) -> None:
        self._per_message = per_message
        self._whole = whole
        self._text: list[str] = []
        self._length = 0
        self._spans: list[_Span] = []
        #: Characters already given.
        self._given = 0
        #: Index in ``_spans`` of the first word not wholly given.
        self._next_span = 0
        #: Where the characters given so far end, ms on the context's timeline.
        self._given_until = 0
        #: Where the times of the next take count from (per message).
        self._base = 0

    @property
    def given(self) -> int:
        """How many characters have been given."""
        return self._given

    @property
    def text(self) -> str:
        """The text so far."""
        return "".join(self._text)

    def add_text(self, text: str) -> None:
        """More text of the context, as the client sent it."""
        if text:
            self._text.append(text)
            self._length += len(text)

    def add_words(self, words: Iterable[WordEvent]) -> None:
        """More word events, in the order spoken."""
        previous = self._spans[-1] if self._spans else None
        for span in _spans(words, self._length):
            if previous is not None and span.first < previous.last:
                continue
            if previous is not None and span.start < previous.end:
                span = _Span(span.first, span.last, previous.end, max(previous.end, span.end))
            self._spans.append(span)
            previous = span

    def take(self, audio_end_ms: float, *, final: bool = False) -> CharacterTimes | None:
        """The characters for the chunk of audio that ends at ``audio_end_ms``.

        Args:
            audio_end_ms: Where the chunk ends on the context's timeline.
            final: No more text, words or audio come: give every character left.

        Returns:
            The characters and their times (per message or per context, see the
            class), or ``None`` when none is due (the chunk is silence, or the middle
            of a word whose first character was already given).
        """
        text = "".join(self._text)
        self._text = [text]
        end = max(round(audio_end_ms), self._given_until)
        spans = self._spans
        times: list[tuple[float, float]] = []
        position = self._given
        index = self._next_span
        clock = float(spans[index - 1].end) if index else 0.0
        while position < len(text):
            span = spans[index] if index < len(spans) else None
            if span is not None and span.first <= position:  # inside a known word
                shares = _share(span.last - span.first, span.start, span.end)
                part = shares[position - span.first :]
                due = [share for share in part if share[0] < end or final]
                times += due
                position += len(due)
                if len(due) < len(part):
                    break
                clock = span.end
                index += 1
                continue
            gap_end = span.first if span is not None else len(text)
            if span is not None:
                gap_times = _share(gap_end - position, clock, span.start)
            elif final:
                gap_times = _share(gap_end - position, clock, max(clock, end))
            else:
                # Spaces and punctuation after the last known word: up to the chunk's end.
                run = position
                while run < gap_end and not text[run].isalnum():
                    run += 1
                if run == position or clock >= end or (self._whole and run == len(text)):
                    break
                gap_times = _share(run - position, clock, end)
                gap_end = run
            due = [share for share in gap_times if share[0] < end or final]
            times += due
            position += len(due)
            if len(due) < len(gap_times) or (span is None and not final):
                break
        if not times:
            return None
        chars = text[self._given : position]
        self._given, self._next_span = position, index
        return self._shape(chars, times, end)

    def _shape(self, chars: str, times: list[tuple[float, float]], end: int) -> CharacterTimes:
        """Round to whole ms, keep them in order and within the chunk, and make them
        count from the base when per message."""
        starts: list[int] = []
        floor = self._given_until
        for start, _ in times:
            floor = min(max(floor, round(start)), end)
            starts.append(floor)
        ends = [*starts[1:], end]
        self._given_until = end
        base = self._base if self._per_message else 0
        if self._per_message:
            self._base = end
        return CharacterTimes(
            tuple(chars),
            tuple(start - base for start in starts),
            tuple(stop - base for stop in ends),
        )


def ws_alignment(times: CharacterTimes | None) -> dict[str, Any] | None:
    """ElevenLabs' WebSocket ``alignment`` (and ``normalizedAlignment``) object."""
    if times is None:
        return None
    return {
        "chars": list(times.chars),
        "charStartTimesMs": list(times.starts),
        "charDurationsMs": [
            end - start for start, end in zip(times.starts, times.ends, strict=True)
        ],
    }


def http_alignment(times: CharacterTimes | None) -> dict[str, Any] | None:
    """ElevenLabs' HTTP ``alignment`` (and ``normalized_alignment``) object, in seconds."""
    if times is None:
        return None
    return {
        "characters": list(times.chars),
        "character_start_times_seconds": [start / 1000 for start in times.starts],
        "character_end_times_seconds": [end / 1000 for end in times.ends],
    }


def word_arrays(words: Sequence[WordEvent], *, shift_ms: float = 0.0) -> dict[str, list[Any]]:
    """Cartesia's ``word_timestamps``: words with start and end in seconds.

    Args:
        words: The word events to send.
        shift_ms: Added to every time (where the words' audio starts on the
            client's clock, when that is not the utterance's start).
    """
    return {
        "words": [word.text for word in words],
        "start": [round((word.offset_ms + shift_ms) / 1000, 6) for word in words],
        "end": [round((word.offset_ms + word.duration_ms + shift_ms) / 1000, 6) for word in words],
    }
