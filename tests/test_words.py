"""Locating reported words in the client's text."""

from __future__ import annotations

from ttsstream.engines.base import WordEvent
from ttsstream.engines.words import (
    SEARCH_WINDOW,
    CharMap,
    WordLocator,
    WordTimeline,
    tokens_of,
)


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


def starts(events: list[WordEvent]) -> list[float]:
    return [e.offset_ms for e in events]


def test_tokens_trim_punctuation_but_keep_inner_marks() -> None:
    """Tokens are whitespace-separated, trimmed of surrounding punctuation, with their ranges."""
    text = "“Hello,” she said — don't state-of-the-art 3.50."
    tokens = tokens_of(text)
    assert [t.text for t in tokens] == [
        "Hello",
        "she",
        "said",
        "—",
        "don't",
        "state-of-the-art",
        "3.50",
    ]
    assert all(text[t.start : t.end] == t.text for t in tokens)


def test_timeline_gives_each_marked_word_its_time_and_duration() -> None:
    """Marks at word starts become events whose durations reach the next word."""
    timeline = WordTimeline("one two three")
    assert timeline.mark(0, 0.0) == []
    first = timeline.mark(4, 300.0)
    assert [(e.text, e.offset_ms, e.duration_ms) for e in first] == [("one", 0.0, 300.0)]
    assert timeline.known_until_ms == 300.0
    second = timeline.mark(8, 500.0) + timeline.finish(900.0)
    assert [(e.text, e.offset_ms, e.duration_ms) for e in second] == [
        ("two", 300.0, 200.0),
        ("three", 500.0, 400.0),
    ]
    assert timeline.known_until_ms == float("inf")


def test_timeline_interpolates_merged_words() -> None:
    """A word the engine merged into its neighbour ("of the") gets an interpolated time."""
    timeline = WordTimeline("of the cat")
    timeline.mark(0, 100.0)  # "of the" as one mark
    events = timeline.mark(7, 400.0) + timeline.finish(600.0)
    assert [e.text for e in events] == ["of", "the", "cat"]
    # Times are rounded to the microsecond, as the wire format gives them.
    assert starts(events) == [100.0, round(100.0 + 300 * 3 / 7, 3), 400.0]


def test_timeline_ignores_repeated_and_backward_marks() -> None:
    """A number split into several marks still gives one event; a mark going back is ignored."""
    timeline = WordTimeline("call 1234 now")
    events = []
    for char_index, time_ms in [(0, 0), (5, 200), (6, 350), (7, 500), (0, 600), (10, 700)]:
        events += timeline.mark(char_index, time_ms)
    events += timeline.finish(900)
    assert [e.text for e in events] == ["call", "1234", "now"]
    assert starts(events) == [0, 200, 700]


def test_timeline_without_marks_spreads_words_over_the_audio() -> None:
    """When the engine reports no marks at all, the words share the whole duration."""
    events = WordTimeline("a bb ccc").finish(900.0)
    assert [e.text for e in events] == ["a", "bb", "ccc"]
    assert starts(events) == [0.0, 200.0, 500.0]
    assert sum(e.duration_ms for e in events) == 900.0


def test_timeline_of_empty_text() -> None:
    """A text with no words gives no events and holds no audio back."""
    timeline = WordTimeline("   ")
    assert timeline.mark(0, 10.0) == [] and timeline.finish(100.0) == []
    assert timeline.known_until_ms == float("inf")


def test_char_map_moves_ranges_through_copied_and_standing_pieces() -> None:
    """Copied pieces map character by character; a piece standing for a span maps to
    the whole span; ranges outside the text map to nothing."""
    source = CharMap()
    source.copy(2, 4)  # "Bold" of "**Bold**"
    source.copy(6, 0)
    source.copy(8, 1)  # " " (not contiguous: a new piece)
    source.stand_for(9, 14, 1)  # "&" for "&amp;"
    source.copy(14, 1)  # "T"
    assert source.length == 7
    assert source.original(0, 4) == (2, 6)
    assert source.original(5, 7) == (9, 15)
    assert source.original(6, 8) is None
    word = WordEvent("Bold", 10.0, 5.0, 0, 4)
    assert source.in_original(word) == WordEvent("Bold", 10.0, 5.0, 2, 6)
    unknown = WordEvent("two", 10.0, 5.0, None, None)
    assert source.in_original(unknown) is unknown
