"""Locating reported words in the client's text."""

from __future__ import annotations

from ttsstream.words import SEARCH_WINDOW, WordLocator


def locate_all(text: str, words: list[str]) -> list[tuple[int | None, int | None]]:
    locator = WordLocator(text)
    return [locator.locate(word) for word in words]


def test_words_with_punctuation_are_found_without_it() -> None:
    """'Hello,' in the text is found for the reported word 'Hello'."""
    text = "Hello, world! (Yes.)"
    spans = locate_all(text, ["Hello", "world", "Yes"])
    assert [text[s:e] for s, e in spans] == ["Hello", "world", "Yes"]


def test_repeated_words_map_to_successive_occurrences() -> None:
    """The second 'the' maps to the second occurrence, not the first."""
    text = "the cat and the hat"
    assert locate_all(text, ["the", "cat", "and", "the", "hat"]) == [
        (0, 3),
        (4, 7),
        (8, 11),
        (12, 15),
        (16, 19),
    ]


def test_match_prefers_a_word_start() -> None:
    """'a' is found as the word 'a', not inside 'that'."""
    text = "that a"
    assert locate_all(text, ["that", "a"]) == [(0, 4), (5, 6)]
    assert locate_all("cat a", ["a"]) == [(4, 5)]


def test_case_insensitive_fallback_and_non_ascii() -> None:
    """Case differences and non-ASCII words are found, with code point indices."""
    text = "Ça va? NAÏVE café 😀 déjà"
    spans = locate_all(text, ["ça", "va", "naïve", "café", "déjà"])
    assert [text[s:e] for s, e in spans] == ["Ça", "va", "NAÏVE", "café", "déjà"]
    assert spans[-1] == (20, 24)


def test_unknown_word_is_null_and_does_not_move_the_cursor() -> None:
    """A word not in the text gets (None, None) and the next word is still found."""
    text = "I have 2 apples"
    assert locate_all(text, ["I", "have", "two", "apples"]) == [
        (0, 1),
        (2, 6),
        (None, None),
        (9, 15),
    ]


def test_search_is_bounded_to_a_window() -> None:
    """A chance match far ahead of the cursor is not taken."""
    text = "x " * SEARCH_WINDOW + "far"
    assert locate_all(text, ["far"]) == [(None, None)]
    assert locate_all(text, ["x", "x"]) == [(0, 1), (2, 3)]


def test_blank_word_is_null() -> None:
    """An empty reported word maps to nothing."""
    assert locate_all("a b", ["", "  "]) == [(None, None), (None, None)]
