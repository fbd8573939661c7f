"""The segmenter of streaming input: a table of texts and their cuts, in several
languages, the same whether the text comes whole or one character at a time."""

from __future__ import annotations

import time

import pytest

from ttsstream.core.segmenter import Segment, Segmenter

#: Text appended (then no flush) → the segments cut, and what stays buffered.
CASES: list[tuple[str, str, list[str], str]] = [
    (
        "a sentence end once 20 characters are there",
        "Hello there! I was just thinking about you. And then",
        ["Hello there! I was just thinking about you."],
        " And then",
    ),
    (
        "a number's period is no sentence end",
        "The value of pi is 3.14 and that is enough. Next one",
        ["The value of pi is 3.14 and that is enough."],
        " Next one",
    ),
    (
        "an abbreviation is no sentence end",
        "We met Dr. Smith at the clinic today. Then we left",
        ["We met Dr. Smith at the clinic today."],
        " Then we left",
    ),
    (
        "nor is e.g.",
        "Bring fruit, e.g. apples or pears for everyone. Thanks",
        ["Bring fruit, e.g. apples or pears for everyone."],
        " Thanks",
    ),
    (
        "nor a URL's periods",
        "Visit https://example.com/a.b for the details now. Ok",
        ["Visit https://example.com/a.b for the details now."],
        " Ok",
    ),
    (
        "the first segment at a clause once 40 characters are there, later ones not",
        "When the first segment gets long enough, it may be cut at a comma, so speech "
        "starts sooner, not later",
        ["When the first segment gets long enough,"],
        " it may be cut at a comma, so speech starts sooner, not later",
    ),
    (
        "a newline",
        "A title line that is long\nThe body",
        ["A title line that is long\n"],
        "The body",
    ),
    (
        "an ellipsis ends a sentence",
        "I was thinking about it for hours... Then I knew",
        ["I was thinking about it for hours..."],
        " Then I knew",
    ),
    (
        "closing quotes stay with their sentence",
        'He said "this is really the end." Then he left',
        ['He said "this is really the end."'],
        " Then he left",
    ),
    (
        "a sentence under 20 characters waits for the next",
        "Yes. No. Maybe so, who knows? We will see. Fine",
        ["Yes. No. Maybe so, who knows?"],
        " We will see. Fine",
    ),
    (
        "French: an initial is no sentence end",
        "Bonjour à tous, je suis ravi d'être ici. M. Dupont arrive bientôt. Merci",
        ["Bonjour à tous, je suis ravi d'être ici.", " M. Dupont arrive bientôt."],
        " Merci",
    ),
    (
        "French: a space before the question mark",
        "Est-ce vraiment possible ? Oui, bien sûr, mon ami. Alors",
        ["Est-ce vraiment possible ?", " Oui, bien sûr, mon ami."],
        " Alors",
    ),
    (
        "German: an ordinal and z.B. are no sentence ends",
        "Am 3. Oktober feiern wir den Tag der Einheit. Das ist z.B. ein Feiertag. Ende",
        ["Am 3. Oktober feiern wir den Tag der Einheit.", " Das ist z.B. ein Feiertag."],
        " Ende",
    ),
    (
        "Chinese: full-width marks, no spaces",
        "今天天气非常好，我们一起去城市中心的大公园里散步吧。然后我们一起去吃饭，好不好？最后",
        ["今天天气非常好，我们一起去城市中心的大公园里散步吧。"],
        "然后我们一起去吃饭，好不好？最后",
    ),
    (
        "Japanese: corner brackets close a sentence",
        "今日はとても良い天気ですね、公園に行きましょう。「本当に楽しかったですね」と彼は言いました。はい",
        [
            "今日はとても良い天気ですね、公園に行きましょう。",
            "「本当に楽しかったですね」と彼は言いました。",
        ],
        "はい",
    ),
]


def cut_whole(text: str) -> tuple[list[Segment], Segmenter]:
    segmenter = Segmenter()
    return segmenter.append(text), segmenter


def cut_by_character(text: str) -> tuple[list[Segment], Segmenter]:
    segmenter = Segmenter()
    segments = []
    for char in text:
        segments += segmenter.append(char)
    return segments, segmenter


@pytest.mark.parametrize(
    ("text", "cuts", "rest"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("feed", [cut_whole, cut_by_character], ids=["whole", "by character"])
def test_cuts(text: str, cuts: list[str], rest: str, feed: object) -> None:
    """The table's cuts, whole or one character per append; each segment's start
    indexes the text appended so far, and a flush gives what was left."""
    assert callable(feed)
    segments, segmenter = feed(text)
    assert [segment.text for segment in segments] == cuts
    assert segmenter.pending == rest
    for segment in segments:
        assert text[segment.start : segment.end] == segment.text
    last = segmenter.flush()
    assert [segment.text for segment in last] == [rest]
    assert text[last[0].start :] == rest
    assert segmenter.pending == "" and segmenter.total == len(text)


def test_pieces_of_any_size_give_the_same_cuts() -> None:
    """Every text of the table, appended in pieces of 1 to 7 characters, is cut as it
    is when whole."""
    for _, text, cuts, rest in CASES:
        for size in range(1, 8):
            segmenter = Segmenter()
            segments = []
            for start in range(0, len(text), size):
                segments += segmenter.append(text[start : start + size])
            assert [s.text for s in segments] == cuts, (text, size)
            assert segmenter.pending == rest


def test_no_segment_exceeds_max_chars_and_words_stay_whole() -> None:
    """A long text without sentence ends is cut at spaces, never past max_chars; text
    without spaces is cut at max_chars."""
    text = " ".join(f"word{number}" for number in range(400))
    segments, segmenter = cut_by_character(text)
    segments += segmenter.flush()
    assert "".join(s.text for s in segments) == text
    assert all(len(s.text) <= 300 for s in segments)
    for segment in segments[:-1]:
        assert segment.text.endswith(" ")  # cut after a space: no word split
    unspaced = "字" * 700
    segments, segmenter = cut_whole(unspaced)
    assert [len(s.text) for s in segments] == [300, 300]
    assert len(segmenter.pending) == 100


def test_flush_cuts_mid_sentence_and_only_what_can_be_spoken() -> None:
    """flush cuts whatever is buffered, even mid-sentence; twice, or with only spaces
    or punctuation, it cuts nothing; offsets keep counting what was appended."""
    segmenter = Segmenter()
    assert segmenter.append("Half a sent") == []
    assert [s.text for s in segmenter.flush()] == ["Half a sent"]
    assert segmenter.flush() == []
    assert segmenter.append(" … ") == []
    assert segmenter.flush() == []
    later = segmenter.append("ence that goes on and on. And")
    assert [(s.text, s.start) for s in later] == [("ence that goes on and on.", 14)]
    # After a first cut, a clause mark no longer cuts.
    assert segmenter.append(", with more and more words than forty characters, still ") == []


def test_ten_thousand_one_character_appends_take_linear_time() -> None:
    """The time per appended character stays flat as the text grows (10,000 against
    40,000 characters, the best of three runs each): no rescanning of the buffer."""
    sentence = "This is one sentence of a long reply, with a clause or two. "

    def per_character(count: int) -> float:
        text = (sentence * (count // len(sentence) + 1))[:count]
        best = float("inf")
        for _ in range(3):
            segmenter = Segmenter()
            started = time.perf_counter()
            for char in text:
                segmenter.append(char)
            best = min(best, (time.perf_counter() - started) / count)
        return best

    small, large = per_character(10_000), per_character(40_000)
    assert large < small * 3, (small, large)


#: The longest segment in the tests that use it (the default).
MAX_CHARS = 300
#: Ordinary text: the baseline of the timing tests.
PROSE = "This is one sentence of a long reply, with a clause or two. "
#: Every kind of text with nothing to speak, mixed.
UNSPEAKABLE_MIX = '. ,,,, - \n😀😀. \n\n"")) —。，」 '
#: Text that made the segmenter rescan its whole buffer, or grow it without bound
#: (issue 31): an opening, then a unit repeated.
PATHOLOGICAL: dict[str, tuple[str, str]] = {
    "spaced periods": ("", ". "),
    "commas": ("", ",,,, "),
    "dashes and newlines": ("", "- \n"),
    "emoji sentences": ("", "😀😀. "),
    "blank lines": ("", "\n"),
    "quotes after a sentence": ("This sentence is surely long enough. ", '"'),
    "brackets right after a sentence": ("This sentence is surely long enough.", ")"),
    "no whitespace": ("", "😀"),
    "full-width marks": ("", "。」，"),
    "a mix": ("", UNSPEAKABLE_MIX),
    "a mix between sentences": ("", "Some words to say. " + UNSPEAKABLE_MIX * 200),
}
#: Characters of the long texts, and of each append (MAX_STREAM_TEXT_LENGTH, and the
#: protocol's max_text_length).
LONG_TEXT = 100_000
LONG_APPEND = 5_000


def test_a_piece_with_nothing_to_speak_is_dropped() -> None:
    """A line of dashes long enough to be cut is dropped, not spoken with the next
    sentence, which starts after it; its offset still indexes the whole text."""
    text = "- - - - - - - - - - - -\nHello there, this is a new line. And"
    segmenter = Segmenter()
    segments = segmenter.append(text)
    assert [(s.text, s.start) for s in segments] == [("Hello there, this is a new line.", 24)]
    assert text[segments[0].start : segments[0].end] == segments[0].text
    assert segmenter.pending == " And"


def test_no_mark_cuts_a_segment_past_max_chars() -> None:
    """A newline as the segment's character max_chars + 1 does not cut there (as
    character max_chars it does); closers after a period count too: past max_chars,
    the text is cut at the last space, as any long text."""
    segmenter = Segmenter(min_chars=1, max_chars=5)
    assert [s.text for s in segmenter.append("abcd\nfg")] == ["abcd\n"]
    segmenter = Segmenter(min_chars=1, max_chars=5)
    assert [s.text for s in segmenter.append("abcde\nfg")] == ["abcde"]
    assert segmenter.pending == "\nfg"
    sentence = "This sentence is long enough."
    segmenter = Segmenter(max_chars=MAX_CHARS)
    segments = segmenter.append(sentence + '"' * 400 + " more")
    assert [s.text for s in segments] == ["This sentence is long ", "enough." + '"' * 293]
    assert segmenter.pending == '"' * 107 + " more"


def repeated(opening: str, unit: str, length: int) -> str:
    """``opening``, then ``unit`` repeated, ``length`` characters in all."""
    return (opening + unit * (length // len(unit) + 1))[:length]


def seconds_to_cut(text: str, size: int, **settings: int) -> float:
    """The best of three times to append ``text`` in ``size``-character pieces and flush."""
    best = float("inf")
    for _ in range(3):
        segmenter = Segmenter(**settings)
        started = time.perf_counter()
        for start in range(0, len(text), size):
            segmenter.append(text[start : start + size])
        segmenter.flush()
        best = min(best, time.perf_counter() - started)
    return best


def assert_accounts_for(text: str, segments: list[Segment]) -> None:
    """Each segment is the text at its offsets, in order, within MAX_CHARS, and what lies
    between them (what was dropped) has no letter or digit."""
    end = 0
    for segment in segments:
        assert segment.start >= end
        assert not any(char.isalnum() for char in text[end : segment.start])
        assert text[segment.start : segment.end] == segment.text
        assert len(segment.text) <= MAX_CHARS
        end = segment.end
    assert not any(char.isalnum() for char in text[end:])


@pytest.mark.parametrize(("opening", "unit"), PATHOLOGICAL.values(), ids=list(PATHOLOGICAL))
def test_a_long_pathological_text_stays_bounded_and_takes_linear_time(
    opening: str, unit: str
) -> None:
    """100,000 characters of the kind in 5,000-character appends: at most max_chars stay
    buffered after every append, the segments and the dropped pieces account for the
    text, and it takes at most ten times as long as prose."""
    text = repeated(opening, unit, LONG_TEXT)
    segmenter = Segmenter(max_chars=MAX_CHARS)
    segments = []
    for start in range(0, len(text), LONG_APPEND):
        segments += segmenter.append(text[start : start + LONG_APPEND])
        assert len(segmenter.pending) <= MAX_CHARS
    segments += segmenter.flush()
    assert_accounts_for(text, segments)
    if any(char.isalnum() for char in unit):
        assert len(segments) >= LONG_TEXT // len(unit) // 2
    prose = seconds_to_cut(repeated("", PROSE, LONG_TEXT), LONG_APPEND, max_chars=MAX_CHARS)
    pathological = seconds_to_cut(text, LONG_APPEND, max_chars=MAX_CHARS)
    assert pathological < 10 * prose, (prose, pathological)


#: A wide max_chars for the test of one-character appends: rescanning a buffer that
#: long on each append would cost far more than the append.
WIDE_MAX_CHARS = 2_000


@pytest.mark.parametrize(
    "unit",
    [
        "This sentence is surely long enough." + ")" * (WIDE_MAX_CHARS - 100) + " ",
        ". ",
        "\n",
        "😀",
        UNSPEAKABLE_MIX,
    ],
    ids=[
        "closers right after sentences",
        "spaced periods",
        "blank lines",
        "no whitespace",
        "a mix",
    ],
)
def test_one_character_appends_of_any_text_take_linear_time(unit: str) -> None:
    """20,000 one-character appends of the kind take at most ten times as long as
    prose, with max_chars 2,000: no append examines again what an earlier one did
    (closers after a mark, say)."""
    count = 20_000
    prose = seconds_to_cut(repeated("", PROSE, count), 1, max_chars=WIDE_MAX_CHARS)
    pathological = seconds_to_cut(repeated("", unit, count), 1, max_chars=WIDE_MAX_CHARS)
    assert pathological < 10 * prose, (prose, pathological)
