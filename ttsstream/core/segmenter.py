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
- No segment is longer than ``max_chars`` (closers after a mark count too): past
  it, the text is cut at the last whitespace (inside a word only when there is
  none, as in Chinese).
- :meth:`Segmenter.flush` cuts whatever is buffered, even mid-sentence.
- A piece with nothing to speak (no letter or digit: ``. . .``, a line of dashes,
  emoji, blank lines) is cut like any other and dropped: it gives no segment, and
  the next segment starts after it (a segment's ``start`` keeps the offsets
  right). Merging it into the next segment instead would keep it buffered, and a
  client sending only such text would make the buffer grow without bound.

A period is not a sentence end when the text cannot tell: when its token holds
another period (``e.g.``, ``U.S.``, ``example.com.``) or ``://``, is a single
letter (an initial), a number (``3.`` in "am 3. Oktober"), or a known
abbreviation (``Dr.``, ``Mr.``, ``z.B.``…). When in doubt the segmenter waits for
more text (a later sentence end, ``max_chars``, a flush, or the caller's
timeout). ``3.14`` never ends a sentence: no whitespace follows its period.

Every decision depends only on the text up to a short look-ahead, so the same
text gives the same cuts however it was split into appends. Whatever the text,
at most ``max_chars`` characters stay buffered between appends, and each
character is examined a bounded number of times: an ``append`` costs time
linear in its text plus the buffer it copies (the scan resumes where the last
one stopped; nothing is sliced or stripped again per mark).

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
#: Every character that may end a segment.
_MARKS = _SENTENCE_MARKS | _WIDE_SENTENCE_MARKS | _CLAUSE_MARKS | _WIDE_CLAUSE_MARKS | {"\n"}
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
        #: Text not yet cut into a segment (at most ``max_chars`` between appends).
        self._pending = ""
        #: Where ``_pending`` starts in the whole text.
        self._offset = 0
        # Where the scan of _pending stands, so that an append goes on from there
        # (indices into _pending):
        #: The next index to examine (a cut needs what follows a mark).
        self._scanned = 0
        #: The segment's text before it is whitespace (its first non-space is not).
        self._lead = 0
        #: The last non-space character examined (negative: none in ``_pending``).
        self._last = -1
        #: Where the closers seen after the mark at ``_scanned`` end.
        self._closers_end = 0
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
        pending = self._pending + text
        segments: list[Segment] = []
        start = 0  # of the current segment in pending
        position = self._scanned
        while position < len(pending):
            char = pending[position]
            cut = self._cut_at(pending, start, position) if char in _MARKS else -1
            if cut is None:  # more text is needed to decide at this position
                self._closers_end = len(pending)
                break
            if cut < 0:  # no cut here
                if not char.isspace():
                    self._last = position
                position += 1
                if position - start <= self._max:
                    continue
                cut = self._longest(pending, start)
            piece = pending[start:cut]
            if self._speakable(piece):  # else dropped (see the module)
                segments.append(Segment(piece, self._offset + start))
                self._cut_any = True
            start = cut
            self._lead = max(self._lead, cut)
            position = max(position, cut)
        self._pending = pending[start:]
        self._offset += start
        self._scanned = position - start
        self._lead -= start
        self._last -= start
        self._closers_end -= start
        return segments

    def flush(self) -> list[Segment]:
        """Cut everything buffered (nothing if it has nothing to speak)."""
        text, start = self._pending, self._offset
        self._pending = ""
        self._offset += len(text)
        self._scanned = self._lead = self._closers_end = 0
        self._last = -1
        if not self._speakable(text):
            return []
        self._cut_any = True
        return [Segment(text, start)]

    def _cut_at(self, text: str, start: int, position: int) -> int | None:
        """Where a segment ends if the mark ``text[position]`` ends it (the index after
        the mark and any closers), ``-1`` if it does not, ``None`` if what follows is not
        here yet. No cut makes the segment longer than ``max_chars``.
        """
        char = text[position]
        limit = start + self._max  # the furthest cut
        if char == "\n":
            if position < limit and self._long(text, start, position, self._min):
                return position + 1
            return -1
        if char in _WIDE_SENTENCE_MARKS:
            if not self._long(text, start, position, self._min):
                return -1
            return self._after_closers(text, position + 1, limit)
        if char in _WIDE_CLAUSE_MARKS:
            if position < limit and self._first_clause(text, start, position):
                return position + 1
            return -1
        if char in _SENTENCE_MARKS:
            if not self._long(text, start, position, self._min):
                return -1
            end = self._after_closers(text, position + 1, limit)
            if end is None or end < 0:
                return end
            if not text[end].isspace():
                return -1
            if char == "." and self._doubtful_period(text, start, position):
                return -1
            return end
        if char in _CLAUSE_MARKS and position < limit and self._first_clause(text, start, position):
            if position + 1 >= len(text):
                return None
            return position + 1 if text[position + 1].isspace() else -1
        return -1

    def _long(self, text: str, start: int, position: int, least: int) -> bool:
        """Whether the segment up to the mark at ``position`` has ``least`` characters
        (ends trimmed).

        In constant time, amortised: the segment's first non-space is looked for from
        where the last look stopped, and its last is noted as the text is examined.
        """
        last = position if not text[position].isspace() else self._last
        if last < start:
            return False  # whitespace only
        lead = self._lead
        while text[lead].isspace():  # stops at ``last`` at the latest
            lead += 1
        self._lead = lead
        return last - lead + 1 >= least

    def _first_clause(self, text: str, start: int, position: int) -> bool:
        return not self._cut_any and self._long(text, start, position, self._clause)

    def _after_closers(self, text: str, index: int, limit: int) -> int | None:
        """The index after any closing quotes or brackets from ``index`` (just after a
        mark); ``-1`` when they run past ``limit``, the furthest cut; ``None`` when the
        text ends first (a closer may still come).

        The closers seen at the last append are not examined again.
        """
        # The closers up to _closers_end follow the mark the last append stopped at
        # (they were seen then); any later mark comes after them: no mark is a closer.
        index = max(index, self._closers_end)
        end = min(len(text), limit + 1)
        while index < end and text[index] in _CLOSERS:
            index += 1
        if index > limit:
            return -1
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
