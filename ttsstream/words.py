"""Locate the words an engine reports in the text the client sent.

The Edge service reports its own normalised words ("Hello" for "Hello,"), and
edge-tts unescapes them, so each word is searched for in the original text from
a cursor that only moves forward: repeated words map to successive occurrences,
and a word that cannot be found gets ``None`` without moving the cursor.
"""

from __future__ import annotations

import re

__all__ = ["WordLocator"]

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
        pattern = re.compile(re.escape(word))
        found = self._search(pattern, end_of_window)
        if found is None:
            found = self._search(re.compile(re.escape(word), re.IGNORECASE), end_of_window)
        if found is None:
            return None, None
        self._cursor = found[1]
        return found

    def _search(self, pattern: re.Pattern[str], end: int) -> tuple[int, int] | None:
        first: tuple[int, int] | None = None
        for match in pattern.finditer(self._text, self._cursor, end):
            span = match.span()
            if span[0] == 0 or not self._text[span[0] - 1].isalnum():
                return span
            if first is None:
                first = span
        return first
