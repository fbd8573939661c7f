"""SRT subtitles from word events."""

from __future__ import annotations

from typing import Any

from ttsstream.subtitles import MAX_CUE_WORDS, to_srt


def words_of(text: str) -> list[dict[str, Any]]:
    result = []
    cursor = 0
    for index, token in enumerate(text.split()):
        word = token.strip(".,!?")
        start = text.index(word, cursor)
        cursor = start + len(word)
        result.append(
            {
                "text": word,
                "offset_ms": 100.0 + 500 * index,
                "duration_ms": 400.0,
                "char_start": start,
                "char_end": start + len(word),
            }
        )
    return result


def test_cues_end_at_sentences_and_keep_punctuation() -> None:
    """Each sentence is its own cue, with its punctuation and exact times."""
    text = "Hello, world. How are you?"
    srt = to_srt(text, words_of(text))
    assert srt == (
        "1\n00:00:00,100 --> 00:00:01,000\nHello, world.\n\n"
        "2\n00:00:01,100 --> 00:00:02,500\nHow are you?\n\n"
    )


def test_long_sentences_split_into_short_cues() -> None:
    """No cue holds more than MAX_CUE_WORDS words."""
    text = " ".join(f"w{i}" for i in range(MAX_CUE_WORDS * 2 + 1))
    blocks = to_srt(text, words_of(text)).strip().split("\n\n")
    assert len(blocks) == 3
    assert [len(b.split("\n")[2].split()) for b in blocks] == [MAX_CUE_WORDS, MAX_CUE_WORDS, 1]


def test_words_without_ranges_are_joined() -> None:
    """Words the server could not locate are still subtitled, by their reported text."""
    words = [
        {"text": "one", "offset_ms": 0, "duration_ms": 100, "char_start": None, "char_end": None},
        {"text": "two", "offset_ms": 150, "duration_ms": 100, "char_start": None, "char_end": None},
    ]
    assert to_srt("1 2", words) == "1\n00:00:00,000 --> 00:00:00,250\none two\n\n"


def test_no_words_no_cues() -> None:
    """An utterance without word events gives an empty subtitle file."""
    assert to_srt("", []) == ""
