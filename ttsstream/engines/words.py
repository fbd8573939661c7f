"""Locate the words an engine reports in the text the client sent (pure; no I/O).

:class:`WordLocator` serves engines that report words (Edge);
:class:`WordTimeline` serves engines that report positions (eSpeak). Both locate
words in the text spoken; when that is the client's text cleaned
(:mod:`ttsstream.core.cleanup`), a :class:`CharMap` takes their ranges back to
the client's text.

The Edge service reports its own normalised words ("Hello" for "Hello,"), and
edge-tts unescapes them, so each word is searched for in the original text from
a cursor that only moves forward: repeated words map to successive occurrences,
and a word that cannot be found gets ``None`` without moving the cursor.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ttsstream.engines.base import WordEvent

__all__ = ["CharMap", "Token", "WordLocator", "WordTimeline", "tokens_of"]

#: How far past the cursor a word may be found, in characters. Bounded so that a
#: word the upstream invented (a number spelled out, say) cannot jump the cursor
#: over many real words to a distant chance match.
SEARCH_WINDOW = 200


class WordLocator:
    """Map successive reported words to ``(start, end)`` code point ranges of ``text``."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._cursor = 0

    def locate(self, word: str) -> tuple[int, int] | tuple[None, None]:
        """Return where ``word`` is, from the cursor on, and advance past it.

        Matching is exact first, then case-insensitive; a match that starts a word
        is preferred to one inside another word.
        """
        word = word.strip()
        if not word:
            return None, None
        end_of_window = min(len(self._text), self._cursor + SEARCH_WINDOW + len(word))
        found = self._find(word, end_of_window)
        if found is None:
            found = self._search(re.compile(re.escape(word), re.IGNORECASE), end_of_window)
        if found is None:
            return None, None
        self._cursor = found[1]
        return found

    def _find(self, word: str, end: int) -> tuple[int, int] | None:
        """The exact match, with ``str.find``: a pattern per word would be compiled for
        every word of a new text (``re``'s cache keeps 512), about 1 % of the server's
        time under load (bench/NOTES.md)."""
        text, size = self._text, len(word)
        at = text.find(word, self._cursor, end)
        if at < 0:
            return None
        if self._starts_word(at):  # the usual case, answered without a generator
            return at, at + size

        def spans(at: int) -> Iterator[tuple[int, int]]:
            while at >= 0:
                yield at, at + size
                at = text.find(word, at + size, end)  # as a pattern's, not overlapping

        return self._best(spans(at))

    def _search(self, pattern: re.Pattern[str], end: int) -> tuple[int, int] | None:
        return self._best(m.span() for m in pattern.finditer(self._text, self._cursor, end))

    def _best(self, spans: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
        """The first span that starts a word, else the first span."""
        first: tuple[int, int] | None = None
        for span in spans:
            if self._starts_word(span[0]):
                return span
            if first is None:
                first = span
        return first

    def _starts_word(self, at: int) -> bool:
        return at == 0 or not self._text[at - 1].isalnum()


_TRIM = "\"'“”‘’«»„‚‹›()[]{}<>.,;:!?¡¿…—–-*_/\\|~`"


@dataclass(frozen=True, slots=True)
class Token:
    """One whitespace-separated word of a text, trimmed of surrounding punctuation."""

    text: str
    start: int
    end: int


def tokens_of(text: str) -> list[Token]:
    """Split ``text`` at whitespace; trim each piece's punctuation unless nothing would be left."""
    tokens = []
    for match in re.finditer(r"\S+", text):
        piece = match.group()
        lead = len(piece) - len(piece.lstrip(_TRIM))
        trimmed = piece.strip(_TRIM)
        if trimmed:
            tokens.append(Token(trimmed, match.start() + lead, match.start() + lead + len(trimmed)))
        else:
            tokens.append(Token(piece, match.start(), match.end()))
    return tokens


class WordTimeline:
    """Give every whitespace-separated word of a text exactly one timed word event.

    An engine reports marks (character index, time) for the words it speaks, but
    may merge words ("of the"), split one (numbers), or skip some. Each mark
    anchors the word containing it; words without a mark get times interpolated
    between their neighbours' anchors in proportion to their length. A word is
    emitted once the next anchor fixes its duration, so events come in order
    and none is revised.
    """

    def __init__(self, text: str) -> None:
        self.tokens = tokens_of(text)
        self._starts = [token.start for token in self.tokens]
        self._emitted = 0
        self._anchor_index = 0
        self._anchor_ms = 0.0
        self._anchored = False

    @property
    def known_until_ms(self) -> float:
        """Every word that starts before this time has been emitted."""
        if self._emitted == len(self.tokens):
            return float("inf")
        return self._anchor_ms if self._anchored else 0.0

    def mark(self, char_index: int, time_ms: float) -> list[WordEvent]:
        """Anchor the word at ``char_index`` at ``time_ms``; return the words this fixes."""
        index = bisect.bisect_right(self._starts, char_index) - 1
        if index < 0:
            index = 0  # a mark on leading whitespace or punctuation belongs to the first word
        elif char_index >= self.tokens[index].end and index + 1 < len(self.tokens):
            index += 1  # a mark between words belongs to the next one
        if (
            not self.tokens
            or index < self._anchor_index
            or (self._anchored and index == self._anchor_index)
        ):
            return []  # a second mark within a word, or one going backwards
        time_ms = max(time_ms, self._anchor_ms)
        words = self._interpolate(index, time_ms)
        self._anchor_index, self._anchor_ms, self._anchored = index, time_ms, True
        return words

    def finish(self, end_ms: float) -> list[WordEvent]:
        """Emit the remaining words, spread up to ``end_ms``, the end of the audio."""
        return self._interpolate(len(self.tokens), max(end_ms, self._anchor_ms))

    def _interpolate(self, until: int, until_ms: float) -> list[WordEvent]:
        """Emit words ``self._emitted .. until - 1``, which lie between the anchor and ``until``."""
        first = self._emitted
        if first >= until:
            return []
        weights = [len(token.text) + 1 for token in self.tokens[first:until]]
        span = until_ms - self._anchor_ms
        starts, elapsed = [], 0
        for weight in weights:
            starts.append(self._anchor_ms + span * elapsed / sum(weights))
            elapsed += weight
        starts.append(until_ms)
        self._emitted = until
        return [
            WordEvent(
                text=token.text,
                offset_ms=starts[k],
                duration_ms=starts[k + 1] - starts[k],
                char_start=token.start,
                char_end=token.end,
            )
            for k, token in enumerate(self.tokens[first:until])
        ]


class CharMap:
    """Where each character of a cleaned text came from in the text it was made of.

    Built piece by piece as the text is cleaned: a piece is copied (each of its
    characters is one character of the original) or stands for a span of the
    original (``":"`` for a list number's ``"."``, ``"&"`` for ``"&amp;"``). The
    pieces are kept, not every character, so a long text that was mostly copied
    costs a few entries.
    """

    __slots__ = ("_copied", "_ends", "_sources", "_starts", "length", "original_length")

    def __init__(self) -> None:
        #: Where each piece starts in the cleaned text, and in the original.
        self._starts: list[int] = []
        self._sources: list[int] = []
        #: Where a piece that stands for a span ends in the original (copied: unused).
        self._ends: list[int] = []
        self._copied: list[bool] = []
        #: Characters of the cleaned text so far.
        self.length = 0
        #: Characters of the original text so far (those held back by the cleaner too).
        self.original_length = 0

    def copy(self, source: int, length: int) -> None:
        """The next ``length`` characters are the original's from ``source`` on."""
        if (
            self._copied
            and self._copied[-1]
            and self._sources[-1] + (self.length - self._starts[-1]) == source
        ):
            self.length += length  # the last piece goes on
            return
        self._add(source, source + length, length, copied=True)

    def stand_for(self, source: int, source_end: int, length: int) -> None:
        """The next ``length`` characters stand for the original's ``source:source_end``."""
        self._add(source, source_end, length, copied=False)

    def _add(self, source: int, source_end: int, length: int, *, copied: bool) -> None:
        if length <= 0:
            return
        self._starts.append(self.length)
        self._sources.append(source)
        self._ends.append(source_end)
        self._copied.append(copied)
        self.length += length

    def original(self, start: int, end: int) -> tuple[int, int] | None:
        """Where the cleaned range ``start:end`` came from in the original (from the
        first character's source to the last one's end), or ``None`` outside the text."""
        if not 0 <= start < end <= self.length:
            return None
        return self._span(start)[0], self._span(end - 1)[1]

    def _span(self, index: int) -> tuple[int, int]:
        piece = bisect.bisect_right(self._starts, index) - 1
        if self._copied[piece]:
            source = self._sources[piece] + index - self._starts[piece]
            return source, source + 1
        return self._sources[piece], self._ends[piece]

    def in_original(self, word: WordEvent) -> WordEvent:
        """``word`` with its character range moved into the original text."""
        if word.char_start is None or word.char_end is None:
            return word
        span = self.original(word.char_start, word.char_end)
        start, end = span if span is not None else (None, None)
        return dataclasses.replace(word, char_start=start, char_end=end)
