"""Turn word events into SRT subtitles (pure; no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from edge_tts.srt_composer import Subtitle, compose

__all__ = ["MAX_CUE_WORDS", "to_srt"]

#: Most words on one subtitle cue.
MAX_CUE_WORDS = 8
_SENTENCE_ENDS = frozenset(".!?…。！？")


def to_srt(text: str, words: Sequence[Mapping[str, Any]]) -> str:
    """Group ``word`` messages into SRT cues.

    A cue holds at most :data:`MAX_CUE_WORDS` words and ends at the end of a
    sentence. Its text is the stretch of ``text`` from its first word up to the
    next cue's first word, so punctuation is kept, when the words' ``char_start``
    is known; otherwise the words joined by spaces.
    """
    groups: list[list[Mapping[str, Any]]] = [[]]
    for index, word in enumerate(words):
        groups[-1].append(word)
        after = words[index + 1] if index + 1 < len(words) else None
        tail = _text_between(text, word, after)
        if len(groups[-1]) == MAX_CUE_WORDS or _SENTENCE_ENDS & set(tail):
            groups.append([])
    groups = [group for group in groups if group]

    cues = []
    for index, group in enumerate(groups):
        after = groups[index + 1][0] if index + 1 < len(groups) else None
        first, last = group[0], group[-1]
        start, stop = first.get("char_start"), _start_of(after, len(text))
        if isinstance(start, int) and stop is not None and start < stop:
            content = " ".join(text[start:stop].split())
        else:
            content = " ".join(str(word["text"]) for word in group)
        cues.append(
            Subtitle(
                index=None,
                start=timedelta(milliseconds=float(first["offset_ms"])),
                end=timedelta(milliseconds=float(last["offset_ms"]) + float(last["duration_ms"])),
                content=content,
            )
        )
    return compose(cues)


def _start_of(word: Mapping[str, Any] | None, default: int) -> int | None:
    if word is None:
        return default
    start = word.get("char_start")
    return start if isinstance(start, int) else None


def _text_between(text: str, word: Mapping[str, Any], after: Mapping[str, Any] | None) -> str:
    """The word and what follows it up to the next word, as written in ``text``."""
    start, end = word.get("char_start"), word.get("char_end")
    if not isinstance(start, int) or not isinstance(end, int):
        return str(word["text"])
    stop = _start_of(after, len(text))
    return text[start : stop if stop is not None and stop >= end else end + 1]
