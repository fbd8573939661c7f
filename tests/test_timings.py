"""Timings reshaped per door: ElevenLabs' per-character alignment (whole, and chunk by
chunk as a context streams), its HTTP shape, Cartesia's word arrays; read back by
Pipecat's and LiveKit's own code."""

from __future__ import annotations

import random

import pytest

from ttsstream.core.timings import (
    CharacterTimes,
    CharacterTrack,
    character_times,
    http_alignment,
    word_arrays,
    ws_alignment,
)
from ttsstream.engines.base import WordEvent

TEXT = "Hello world. How are you? "
WORDS = [
    WordEvent("Hello", 100, 300, 0, 5),
    WordEvent("world", 450, 350, 6, 11),
    WordEvent("How", 1300, 200, 13, 16),
    WordEvent("are", 1520, 150, 17, 20),
    WordEvent("you", 1700, 250, 21, 24),
]


def _located_words(text: str, rng: random.Random) -> list[WordEvent]:
    """Word events for every word of ``text``, with pauses after sentences."""
    words: list[WordEvent] = []
    clock = 80.0
    position = 0
    for piece in text.split(" "):
        stripped = piece.strip(".,?!")
        if stripped:
            first = text.index(stripped, position)
            duration = 40.0 * len(stripped) + rng.uniform(0, 60)
            words.append(WordEvent(stripped, clock, duration, first, first + len(stripped)))
            clock += duration + rng.uniform(20, 90)
            position = first + len(stripped)
            if piece.endswith((".", "?", "!")):
                clock += rng.uniform(200, 500)
    return words


def _stream(
    text: str, words: list[WordEvent], audio_ms: float, *, per_message: bool, seed: int
) -> list[CharacterTimes | None]:
    """Run a track as a door would: the text in random appends, each word known before
    the audio reaches it, the audio in chunks of 20 to 400 ms; then the final take."""
    rng = random.Random(seed)
    track = CharacterTrack(per_message=per_message)
    pieces = []
    position = 0
    while position < len(text):
        size = rng.randint(1, 12)
        pieces.append(text[position : position + size])
        position += size
    sent = 0
    known = 0
    clock = 0.0
    messages: list[CharacterTimes | None] = []
    while clock < audio_ms:
        chunk_end = min(audio_ms, clock + rng.uniform(20, 400))
        while known < len(words) and words[known].offset_ms < chunk_end + 100:
            needed = words[known].char_end or 0
            while sent < len(pieces) and len("".join(pieces[:sent])) < needed:
                track.add_text(pieces[sent])
                sent += 1
            track.add_words([words[known]])
            known += 1
        if known == len(words):
            for piece in pieces[sent:]:
                track.add_text(piece)
            sent = len(pieces)
        messages.append(track.take(chunk_end))
        clock = chunk_end
    messages.append(track.take(audio_ms, final=True))
    return messages


def _absolute(messages: list[CharacterTimes | None], *, per_message: bool) -> list[int]:
    """Every character's start on the context's clock, as a client adds them up."""
    starts: list[int] = []
    base = 0
    for message in messages:
        if message is None:
            continue
        starts += [base + start for start in message.starts]
        if per_message:
            base += message.ends[-1]
    return starts


def test_a_word_shares_its_span_and_the_gaps_go_to_spaces_and_punctuation() -> None:
    """Each word's characters divide its span; a space or a period takes the gap after it."""
    times = character_times(TEXT, WORDS, audio_ms=2200)
    assert times.text == TEXT
    assert times.starts[:5] == (100, 160, 220, 280, 340)  # "Hello": 300 ms over 5
    assert times.ends[4] == 400
    assert (times.starts[5], times.ends[5]) == (400, 450)  # the space: the pause
    assert (times.starts[11], times.ends[12]) == (800, 1300)  # ". ": the pause after world
    assert times.ends[-1] == 2200  # the last space: up to the audio's end


def test_unlocated_and_overlapping_words_leave_their_characters_to_the_gaps() -> None:
    """A word without a range, or one over the previous word's characters, places nothing."""
    words = [
        WordEvent("Hello", 100, 300, 0, 5),
        WordEvent("ello", 150, 100, 1, 5),
        WordEvent("?", 500, 10, None, None),
        WordEvent("world", 600, 300, 6, 11),
    ]
    times = character_times("Hello world", words, audio_ms=1000)
    assert times.starts[0] == 100
    assert times.starts[6] == 600
    assert list(times.starts) == sorted(times.starts)


def test_no_words_spreads_the_text_over_the_audio() -> None:
    """Without any word event the characters still cover the text, in order, within the audio."""
    times = character_times("Hi there", [], audio_ms=800)
    assert times.text == "Hi there"
    assert times.starts[0] == 0 and times.ends[-1] == 800


@pytest.mark.parametrize("per_message", [True, False])
@pytest.mark.parametrize("seed", range(20))
def test_a_streamed_context_gives_each_character_once_in_order_within_the_audio(
    per_message: bool, seed: int
) -> None:
    """Joined, the takes are the text; times never go back and stay within the audio."""
    rng = random.Random(seed)
    text = rng.choice(
        [
            "Hello world. How are you today? I am fine, thanks! ",
            "One, two, three. Four five six seven eight nine ten.",
            "A short one",
            "Well... it depends; really - on what you mean?! Yes. ",
        ]
    )
    words = _located_words(text, rng)
    audio_ms = words[-1].offset_ms + words[-1].duration_ms + rng.uniform(0, 400)
    messages = _stream(text, words, audio_ms, per_message=per_message, seed=seed)
    assert "".join(m.text for m in messages if m is not None) == text
    starts = _absolute(messages, per_message=per_message)
    assert starts == sorted(starts)
    assert starts[0] >= 0 and starts[-1] <= round(audio_ms)
    for message in messages:
        if message is not None:
            assert all(s <= e for s, e in zip(message.starts, message.ends, strict=True))


def test_each_message_ends_where_its_audio_ends() -> None:
    """Per message, the last character ends at its chunk's end: Pipecat's running clock
    (the sum of each message's last end) is the audio's clock."""
    track = CharacterTrack()
    track.add_text(TEXT[:13])
    track.add_words(WORDS[:2])
    assert track.take(200) == CharacterTimes(("H", "e"), (100, 160), (160, 200))
    late = track.take(700)
    assert late is not None and late.text == "llo worl" and late.ends[-1] == 500
    assert track.take(900) is not None  # "d. ": the word's end and the pause after it
    assert track.take(1100) is None  # silence: no character is due
    track.add_text(TEXT[13:])
    track.add_words(WORDS[2:])
    how = track.take(1400)
    assert how is not None and how.text == "Ho" and how.starts[0] == 1300 - 900


def test_a_letter_no_known_word_covers_waits() -> None:
    """Text not spoken yet is not given with the audio before it."""
    track = CharacterTrack()
    track.add_text("Hello world")
    track.add_words(WORDS[:1])
    first = track.take(1000)
    assert first is not None and first.text == "Hello "
    assert track.take(1200) is None
    rest = track.take(1300, final=True)
    assert rest is not None and rest.text == "world"


def _pipecat_words(messages: list[CharacterTimes | None]) -> list[tuple[str, float]]:
    """Words and their start times, computed as Pipecat's ElevenLabsTTSService does."""
    from pipecat.services.elevenlabs.tts_base import (
        _select_alignment,
        _strip_utterance_leading_spaces,
        calculate_word_times,
    )

    cumulative, partial, partial_start = 0.0, "", 0.0
    started = False
    words: list[tuple[str, float]] = []
    for message in messages:
        msg = {"alignment": ws_alignment(message), "normalizedAlignment": ws_alignment(message)}
        raw = _select_alignment(
            msg,
            normalized_key="normalizedAlignment",
            alignment_key="alignment",
            prefer_normalized=False,
        )
        if not raw:
            continue
        alignment = _strip_utterance_leading_spaces(
            raw, ("chars", "charStartTimesMs", "charDurationsMs"), not started
        )
        started = True
        found, partial, partial_start = calculate_word_times(
            alignment, cumulative, partial, partial_start
        )
        words += found
        starts, durations = alignment["charStartTimesMs"], alignment["charDurationsMs"]
        if starts and durations:
            cumulative += (starts[-1] + durations[-1]) / 1000
    return words


@pytest.mark.parametrize("seed", range(10))
def test_pipecat_places_every_word_where_it_is_spoken(seed: int) -> None:
    """Pipecat's word times from our messages are the words' own (to the ms), so an
    interruption at any moment keeps the words spoken by then, give or take one."""
    rng = random.Random(seed)
    text = "Hello world. How are you today? I am fine, thanks for asking. "
    words = _located_words(text, rng)
    audio_ms = words[-1].offset_ms + words[-1].duration_ms + 300
    messages = _stream(text, words, audio_ms, per_message=True, seed=seed)
    found = _pipecat_words(messages)
    assert [w for w, _ in found] == text.split()
    for (_, start), truth in zip(found, words, strict=True):
        assert start * 1000 == pytest.approx(truth.offset_ms, abs=2)
    for _ in range(50):
        moment = rng.uniform(0, audio_ms) / 1000
        heard = sum(1 for _, start in found if start <= moment)
        spoken = sum(1 for word in words if word.offset_ms / 1000 <= moment)
        assert abs(heard - spoken) <= 1


def test_pipecat_stays_on_time_across_silent_chunks() -> None:
    """A chunk with no character (a pause) carries no alignment, and the next one's times
    count from the last one that did: Pipecat's clock does not fall behind."""
    messages = _stream(TEXT, WORDS, 2200, per_message=True, seed=3)
    assert any(m is None for m in messages)
    found = _pipecat_words(messages)
    assert [round(start * 1000) for _, start in found] == [100, 450, 1300, 1520, 1700]


@pytest.mark.parametrize("seed", range(5))
def test_livekit_reads_context_times_as_the_words_own(seed: int) -> None:
    """LiveKit's plugin joins every message's characters and times as they are (the
    context's clock): its timed words start where ours do."""
    from livekit.plugins.elevenlabs.tts import _to_timed_words

    rng = random.Random(seed)
    text = "Hello world. How are you today? "
    words = _located_words(text, rng)
    audio_ms = words[-1].offset_ms + words[-1].duration_ms + 200
    messages = _stream(text, words, audio_ms, per_message=False, seed=seed)
    chars = "".join(m.text for m in messages if m is not None)
    starts = [s for m in messages if m is not None for s in m.starts]
    durations = [
        e - s for m in messages if m is not None for s, e in zip(m.starts, m.ends, strict=True)
    ]
    timed, _ = _to_timed_words(chars, starts, durations, flush=True)
    spoken = [w for w in timed if w.strip()]
    assert [str(w).strip() for w in spoken] == text.split()
    for word, truth in zip(spoken, words, strict=True):
        assert isinstance(word.start_time, float)
        assert word.start_time * 1000 == pytest.approx(truth.offset_ms, abs=2)


def test_http_alignment_is_in_seconds_with_end_times() -> None:
    """The HTTP shape names characters and gives start and end in seconds."""
    times = CharacterTimes(("H", "i"), (100, 150), (150, 300))
    assert http_alignment(times) == {
        "characters": ["H", "i"],
        "character_start_times_seconds": [0.1, 0.15],
        "character_end_times_seconds": [0.15, 0.3],
    }
    assert ws_alignment(times) == {
        "chars": ["H", "i"],
        "charStartTimesMs": [100, 150],
        "charDurationsMs": [50, 150],
    }
    assert http_alignment(None) is None and ws_alignment(None) is None


def test_cartesia_word_arrays_are_in_seconds() -> None:
    """Cartesia's word_timestamps: parallel arrays of words, starts and ends in seconds."""
    assert word_arrays(WORDS[:2], shift_ms=1000) == {
        "words": ["Hello", "world"],
        "start": [1.1, 1.45],
        "end": [1.4, 1.8],
    }
