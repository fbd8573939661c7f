"""Cut text that arrives in pieces into segments to speak (pure; no I/O).

A streaming utterance (an LLM's reply, say) gets its text in ``append``s of any
size, down to one character. Each segment is synthesized on its own, so a cut
decides both when speech can start and how natural it sounds. The rules:

- A segment ends at a sentence end once it has at least ``min_chars``
  characters: ``.``, ``!``, ``?`` or ``…`` followed by whitespace (closing quotes
  and brackets may come between), the full-width ``。！？`` (no space follows them
  in Chinese or Japanese), or a newline.
- The utterance's first segment may also end at a clause mark (``,;:—`` followed
  by whitespace, or the full-width ``，、；：``) once it has ``clause_chars``
  characters, so that speech starts sooner.
- No segment is longer than ``max_chars``: past it, the text is cut at the last
  whitespace (inside a word only when there is none, as in Chinese).
- :meth:`Segmenter.flush` cuts whatever is buffered, even mid-sentence.

A period is not a sentence end when the text cannot tell: when its token holds
another period (``e.g.``, ``U.S.``, ``example.com.``) or ``://``, is a single
letter (an initial), a number (``3.`` in "am 3. Oktober"), or a known
abbreviation (``Dr.``, ``Mr.``, ``z.B.``…). When in doubt the segmenter waits for
more text (a later sentence end, ``max_chars``, a flush, or the caller's
timeout). ``3.14`` never ends a sentence: no whitespace follows its period.

Every decision depends only on the text up to a short look-ahead, so the same
text gives the same cuts however it was split into appends, and each character
is examined a bounded number of times (linear in the text).

Written by hand: sentence splitters (``pysbd``, ``nltk``'s punkt, ``blingfire``)
work on whole texts and would be run again over the buffer on every append, and
none of them takes the first-clause and length rules.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Segment", "Segmenter"]

#: Marks that end a sentence when whitespace follows.
_SENTENCE_MARKS = frozenset(".!?…")
#: Marks that end a sentence by themselves (no space follows them in CJK text).
_WIDE_SENTENCE_MARKS = frozenset("。！？")
#: Clause marks (followed by whitespace), and their full-width forms (alone).
_CLAUSE_MARKS = frozenset(",;:—")
_WIDE_CLAUSE_MARKS = frozenset("，、；：")
#: What may stand between a sentence mark and the whitespace after it.
_CLOSERS = frozenset("\"'”’»)]}」』")
#: Abbreviations whose period ends no sentence (compared lowercased, without it).
_ABBREVIATIONS = frozenset(
    {
        # English
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd",
        "corp", "fig", "approx", "cf", "mt", "jan", "feb", "mar", "apr",
        "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
        # French
        "mme", "mlle", "m", "av", "env",
        # German
        "nr", "ca", "bzw", "vgl", "str", "hr", "fr", "dipl", "ing",
    }
)  # fmt: skip
#: Longest token looked back at for the abbreviation rules, in characters.
_TOKEN_MAX = 40


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of the utterance's text to synthesize."""

    text: str
    #: Where ``text`` starts in the whole text appended so far (code points).
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)


class Segmenter:
    """Turn appended text into segments, as soon as each can be cut.

    Args:
        min_chars: Fewest characters a segment has before a sentence end cuts it.
        max_chars: Most characters a segment has.
        clause_chars: Fewest characters before a clause mark cuts the first segment.
    """

    def __init__(self, *, min_chars: int = 20, max_chars: int = 300, clause_chars: int = 40):
        if not 0 < min_chars <= max_chars:
            raise ValueError("segment lengths must be 0 < min_chars <= max_chars")
        self._min = min_chars
        self._max = max_chars
        self._clause = min(clause_chars, max_chars)
        #: Text not yet cut into a segment.
        self._pending = ""
        #: Where ``_pending`` starts in the whole text.
        self._offset = 0
        #: How far ``_pending`` was examined (a cut needs what follows a mark).
        self._scanned = 0
        #: Whether a segment was cut already (the clause rule is for the first).
        self._cut_any = False

    @property
    def pending(self) -> str:
        """The text appended but not yet cut."""
        return self._pending

    @property
    def total(self) -> int:
        """Characters appended so far."""
        return self._offset + len(self._pending)

    def append(self, text: str) -> list[Segment]:
        """Add ``text``; the segments that can be cut now, in order."""
        self._pending += text
        segments: list[Segment] = []
        start = 0  # of the current segment in _pending
        position = self._scanned
        pending = self._pending
        while position < len(pending):
            cut = self._cut_at(pending, start, position)
            if cut is None:  # more text is needed to decide at this position
                break
            if cut < 0:  # no cut here
                position += 1
                if position - start > self._max:
                    cut = self._longest(pending, start)
                else:
                    continue
            if self._speakable(pending[start:cut]):  # else it stays with the next one
                segments.append(Segment(pending[start:cut], self._offset + start))
                self._cut_any = True
                start = cut
            position = max(position, cut)
        self._pending = pending[start:]
        self._offset += start
        self._scanned = position - start
        return segments

    def flush(self) -> list[Segment]:
        """Cut everything buffered (nothing if it has nothing to speak)."""
        text, start = self._pending, self._offset
        self._pending = ""
        self._offset += len(text)
        self._scanned = 0
        if not self._speakable(text):
            return []
        self._cut_any = True
        return [Segment(text, start)]

    def _cut_at(self, text: str, start: int, position: int) -> int | None:
        """Where a segment ends if ``text[position]`` ends it (the index after the mark
        and any closers), ``-1`` if it does not, ``None`` if what follows is not here yet.
        """
        char = text[position]
        if char == "\n":
            return position + 1 if self._long(text, start, position, self._min) else -1
        if char in _WIDE_SENTENCE_MARKS:
            if not self._long(text, start, position, self._min):
                return -1
            return self._after_closers(text, position + 1)
        if char in _WIDE_CLAUSE_MARKS:
            return position + 1 if self._first_clause(text, start, position) else -1
        if char in _SENTENCE_MARKS:
            if not self._long(text, start, position, self._min):
                return -1
            end = self._after_closers(text, position + 1)
            if end is None:
                return None
            if not text[end].isspace():
                return -1
            if char == "." and self._doubtful_period(text, start, position):
                return -1
            return end
        if char in _CLAUSE_MARKS and self._first_clause(text, start, position):
            if position + 1 >= len(text):
                return None
            return position + 1 if text[position + 1].isspace() else -1
        return -1

    @staticmethod
    def _long(text: str, start: int, position: int, least: int) -> bool:
        """Whether the segment up to ``position`` has ``least`` characters (ends trimmed)."""
        return len(text[start : position + 1].strip()) >= least

    def _first_clause(self, text: str, start: int, position: int) -> bool:
        return not self._cut_any and self._long(text, start, position, self._clause)

    @staticmethod
    def _after_closers(text: str, index: int) -> int | None:
        """The index after any closing quotes or brackets from ``index``; ``None`` when
        the text ends there (a closer may still come)."""
        while index < len(text) and text[index] in _CLOSERS:
            index += 1
        return None if index >= len(text) else index

    @staticmethod
    def _doubtful_period(text: str, start: int, position: int) -> bool:
        """Whether the period at ``position`` may end no sentence (see the module)."""
        begin = max(start, position - _TOKEN_MAX)
        token_start = position
        while token_start > begin and not text[token_start - 1].isspace():
            token_start -= 1
        token = text[token_start:position].lstrip("\"'“‘«([{")
        if not token:
            return False
        if token.endswith("..") or token.endswith("…"):
            return False  # an ellipsis: the sentence is over
        if "." in token or "://" in token:
            return True
        if len(token) == 1 and token.isalpha():
            return True  # an initial
        if token.isdigit():
            return True  # "am 3. Oktober", "No. 3."
        return token.lower() in _ABBREVIATIONS

    def _longest(self, text: str, start: int) -> int:
        """The cut of a segment at its longest: after the last whitespace that keeps it
        within ``max_chars``, else at ``max_chars``."""
        limit = start + self._max
        for index in range(limit, start, -1):
            if text[index - 1].isspace():
                return index
        return limit

    @staticmethod
    def _speakable(text: str) -> bool:
        return any(char.isalnum() for char in text)
