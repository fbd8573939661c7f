"""The offline engine: real eSpeak NG and LAME, no network."""

from __future__ import annotations

import array
import asyncio
import math
import time

import lameenc
import miniaudio
import pytest

from tests.conftest import TIMEOUT
from ttsstream.engines import espeak
from ttsstream.engines.base import AudioChunk, SynthesisEvent, SynthesisRequest, WordEvent
from ttsstream.engines.espeak import (
    ENCODER_DELAY_MS,
    EspeakEngine,
    _mp3_encoder,
    prosody_settings,
    text_slices,
)
from ttsstream.engines.words import tokens_of
from ttsstream.exceptions import InvalidVoice

LONG_TEXT = " ".join(
    ["The quick brown fox jumps over the lazy dog, and then it runs far away."] * 12
)


@pytest.fixture(scope="module")
def engine() -> EspeakEngine:
    """The process's eSpeak engine; the test fails if the local extra is missing."""
    loaded = EspeakEngine.load()
    assert loaded is not None, "the local extra (espeakng-loader, lameenc) must be installed"
    return loaded


async def speak(
    engine: EspeakEngine, text: str, voice: str = "espeak:en-us", **prosody: str
) -> list[SynthesisEvent]:
    request = SynthesisRequest(text=text, voice=voice, **prosody)
    return [event async for event in engine.synthesize(request)]


def audio_of(events: list[SynthesisEvent]) -> bytes:
    return b"".join(event.data for event in events if isinstance(event, AudioChunk))


def words_of(events: list[SynthesisEvent]) -> list[WordEvent]:
    return [event for event in events if isinstance(event, WordEvent)]


def decode(mp3: bytes) -> array.array[int]:
    decoded = miniaudio.decode(
        mp3, output_format=miniaudio.SampleFormat.SIGNED16, nchannels=1, sample_rate=24000
    )
    samples: array.array[int] = decoded.samples
    return samples


def rms(samples: array.array[int]) -> float:
    return math.sqrt(sum(s * s for s in samples) / len(samples))


def fundamental_hz(samples: array.array[int]) -> float:
    """Median pitch of the loudest 40 ms frames, by autocorrelation at 8 kHz (60–400 Hz)."""
    rate = 8000
    low = samples[::3]  # 24 kHz to 8 kHz; speech pitch is far below 4 kHz
    size = rate * 40 // 1000
    frames = [low[i : i + size] for i in range(0, len(low) - size, size)]
    frames.sort(key=lambda frame: -sum(abs(s) for s in frame))
    pitches = []
    for frame in frames[:20]:
        scores = {
            lag: sum(frame[i] * frame[i + lag] for i in range(size - lag))
            for lag in range(rate // 400, rate // 60)
        }
        pitches.append(rate / max(scores, key=lambda lag: scores[lag]))
    return sorted(pitches)[len(pitches) // 2]


async def test_voices_are_named_by_their_espeak_identifiers(engine: EspeakEngine) -> None:
    """Voices are espeak:<id> from espeak_ListVoices, with locale and engine."""
    voices = {voice.name: voice for voice in await engine.voices()}
    assert {"espeak:en-us", "espeak:en", "espeak:fr", "espeak:de", "espeak:cmn"} <= set(voices)
    assert voices["espeak:en-us"].locale == "en-US"
    assert voices["espeak:fr"].locale == "fr-FR"
    assert all(voice.engine == "espeak" for voice in voices.values())
    assert not any(name.startswith("espeak:mb") for name in voices)
    await engine.check_voice("espeak:fr")
    for bad in ("espeak:klingon", "en-us", "espeak:", "espeak:en-gb"):
        with pytest.raises(InvalidVoice):
            await engine.check_voice(bad)


def test_voice_for_locale_prefers_exact_then_language(engine: EspeakEngine) -> None:
    """fr-FR finds the French voice, en-US the American one, de-DE falls back to de."""
    assert engine.voice_for_locale("fr-FR") == "espeak:fr"
    assert engine.voice_for_locale("en-US") == "espeak:en-us"
    assert engine.voice_for_locale("en-GB") == "espeak:en"
    assert engine.voice_for_locale("de-DE") == "espeak:de"
    assert engine.voice_for_locale("zh-CN") == "espeak:cmn"
    assert engine.voice_for_locale("xx-YY") is None


async def test_speech_is_mp3_in_the_edge_format_with_a_word_per_word(engine: EspeakEngine) -> None:
    """The audio decodes as 24 kHz mono MP3 of bytes/6 ms; every word has one event, in order."""
    text = "Hello world, this is the offline voice speaking."
    events = await speak(engine, text)
    audio = audio_of(events)
    info = miniaudio.mp3_get_info(audio)
    assert (info.sample_rate, info.nchannels) == (24000, 1)
    assert len(decode(audio)) / 24 == pytest.approx(len(audio) / 6, abs=1)
    assert audio[:2] == b"\xff\xf3"  # MPEG-2 Layer III, as Edge sends
    words = words_of(events)
    assert [w.text for w in words] == [t.text for t in tokens_of(text)]
    assert all(text[w.char_start : w.char_end] == w.text for w in words)
    offsets = [w.offset_ms for w in words]
    assert offsets == sorted(offsets) and offsets[0] >= ENCODER_DELAY_MS
    assert all(w.duration_ms > 0 for w in words)
    assert offsets[-1] < len(audio) / 6


async def test_audio_streams_and_words_never_follow_their_audio(engine: EspeakEngine) -> None:
    """Audio comes in many chunks interleaved with words; none precedes a word it covers."""
    events = await speak(engine, LONG_TEXT)
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) > 20
    first_audio = events.index(chunks[0])
    assert any(isinstance(e, WordEvent) for e in events[first_audio:])
    sent_ms = 0.0
    for event in events:
        if isinstance(event, AudioChunk):
            sent_ms += len(event.data) / 6
        else:
            assert sent_ms <= event.offset_ms + 1


async def test_punctuation_is_no_word(engine: EspeakEngine) -> None:
    """Dashes, question marks, commas and ellipses standing alone (the protocol's own
    streaming example ends with the piece ", and warm.") give no word event; the
    words around them keep their places, and the audio goes on through them."""
    for text, spoken in (
        ("Wait — what ? Yes , well ... fine.", ["Wait", "what", "Yes", "well", "fine"]),
        (", and warm.", ["and", "warm"]),
        ("— ? , ...", []),
    ):
        events = await speak(engine, text)
        words = words_of(events)
        assert [w.text for w in words] == spoken, text
        assert all(text[w.char_start : w.char_end] == w.text for w in words)
        offsets = [w.offset_ms for w in words]
        assert offsets == sorted(offsets)
        assert audio_of(events)


async def test_symbols_it_speaks_are_words(engine: EspeakEngine) -> None:
    """A symbol eSpeak reads aloud (``&`` "and", ``%`` "percent", ``=``, ``+``) is a word
    event of its own: its speech is highlighted and counted, not taken for a pause."""
    for text, spoken in (
        ("salt & pepper", ["salt", "&", "pepper"]),
        ("fifty % off", ["fifty", "%", "off"]),
        ("a = b + c", ["a", "=", "b", "+", "c"]),
    ):
        words = words_of(await speak(engine, text))
        assert [w.text for w in words] == spoken, text


@pytest.mark.parametrize(
    "text",
    [
        "In 1984, 2,500 people paid $3.50 each on 12/31.",
        "A state-of-the-art, well-known mother-in-law.",
        "Don't, won't, it's, y'all'd've.",
        "“Curly quotes” and ‘single’ ones… — dashes – too.",
        "Naïve café Zoë façade, São Paulo, Ærøskøbing.",
        "日本語のテキストは空白がありません。",
        "中文没有空格但是有标点，对吧？",
        "Emoji 😀 in 👍 text.",
        ". , ; !",
    ],
)
async def test_hard_texts_give_one_event_per_word(engine: EspeakEngine, text: str) -> None:
    """Numbers, hyphens, contractions, quotes, non-ASCII, CJK: one event per word, in
    order; punctuation or an emoji alone between spaces is no word."""
    voice = "espeak:cmn" if text.startswith("中") else "espeak:en-us"
    events = await speak(engine, text, voice=voice)
    words = words_of(events)
    tokens = [token for token in tokens_of(text) if any(c.isalnum() for c in token.text)]
    assert [(w.char_start, w.char_end) for w in words] == [(t.start, t.end) for t in tokens]
    offsets = [w.offset_ms for w in words]
    assert offsets == sorted(offsets)
    assert audio_of(events)


async def test_rate_changes_duration(engine: EspeakEngine) -> None:
    """A faster rate gives shorter audio, a slower one longer."""
    text = "Rate changes how long this sentence takes to say."
    durations = {
        rate: len(decode(audio_of(await speak(engine, text, rate=rate)))) / 24
        for rate in ("-50%", "+0%", "+100%")
    }
    assert durations["+100%"] < durations["+0%"] * 0.8
    assert durations["-50%"] > durations["+0%"] * 1.3


async def test_volume_changes_loudness(engine: EspeakEngine) -> None:
    """A lower volume gives a lower RMS."""
    text = "Volume changes how loud this sentence is."
    loud = rms(decode(audio_of(await speak(engine, text, volume="+0%"))))
    quiet = rms(decode(audio_of(await speak(engine, text, volume="-60%"))))
    assert quiet < loud * 0.6


async def test_pitch_changes_frequency(engine: EspeakEngine) -> None:
    """A higher pitch gives a higher fundamental frequency."""
    text = "Pitch changes how high this voice sounds."
    high = fundamental_hz(decode(audio_of(await speak(engine, text, pitch="+80Hz"))))
    low = fundamental_hz(decode(audio_of(await speak(engine, text, pitch="-80Hz"))))
    assert high > low * 1.2, (high, low)


def test_prosody_mapping() -> None:
    """Rate maps to 175 × (1 + r/100) wpm, volume to amplitude, pitch to 0–100; all clamped."""
    assert prosody_settings("+0%", "+0%", "+0Hz") == (175, 100, 50)
    assert prosody_settings("+100%", "-50%", "+20Hz") == (350, 50, 60)
    assert prosody_settings("-90%", "+900%", "-500Hz") == (80, 200, 0)
    assert prosody_settings("+9000%", "-100%", "+500Hz") == (450, 0, 100)


def test_encoder_delay_is_what_lame_adds() -> None:
    """A click at 1000 ms of PCM decodes at 1000 ms + ENCODER_DELAY_MS."""
    pcm = array.array("h", [0] * 22050 * 2)
    pcm[22050] = 30000
    encoder = _mp3_encoder(22050)
    samples = decode(bytes(encoder.encode(pcm.tobytes())) + bytes(encoder.flush()))
    loudest = max(range(len(samples)), key=lambda i: abs(samples[i]))
    assert loudest / 24 == pytest.approx(1000 + ENCODER_DELAY_MS, abs=2)
    assert lameenc  # the extra is installed


async def test_cancelled_utterance_frees_the_engine(engine: EspeakEngine) -> None:
    """Closing a stream mid-way stops eSpeak: the next utterance completes promptly."""
    stream = engine.synthesize(SynthesisRequest(text=LONG_TEXT * 3, voice="espeak:en-us"))
    async for event in stream:
        if isinstance(event, AudioChunk):
            break
    await stream.aclose()
    events = await asyncio.wait_for(speak(engine, "Next one."), TIMEOUT)
    assert [w.text for w in words_of(events)] == ["Next", "one"]


async def test_parallel_utterances_are_all_complete(engine: EspeakEngine) -> None:
    """Utterances from many tasks at once share the one eSpeak thread and each is whole."""
    texts = [f"Parallel utterance number {i} is complete." for i in range(8)]
    results = await asyncio.wait_for(
        asyncio.gather(*(speak(engine, text) for text in texts)), TIMEOUT * 2
    )
    for text, events in zip(texts, results, strict=True):
        assert [w.text for w in words_of(events)] == [t.text for t in tokens_of(text)]
        assert len(decode(audio_of(events))) > 24000 * 1.0


async def test_event_loop_keeps_running_while_speaking(engine: EspeakEngine) -> None:
    """While several long utterances synthesize, the event loop never waits for eSpeak:
    it is late by well under the time eSpeak takes to render one slice (measured in
    the same run, so a loaded machine, slower at both, does not change the verdict)."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - before - 0.005)

    tick = asyncio.create_task(ticker())
    began = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(speak(engine, LONG_TEXT) for _ in range(4))), TIMEOUT * 4
    )
    # eSpeak's one thread renders the slices one after another.
    slice_seconds = (time.perf_counter() - began) / (4 * len(text_slices(LONG_TEXT)))
    done.set()
    await tick
    lags.sort()
    assert len(lags) > 10
    # A slice rendered on the loop would make the loop that late at every tick while
    # it runs. The 99th percentile bounds what a client would notice; one outlier may
    # be the OS.
    assert lags[int(len(lags) * 0.99)] < slice_seconds / 2, (lags[-5:], slice_seconds)


@pytest.mark.parametrize(
    ("text", "limit", "slices"),
    [
        # Whole sentences are grouped up to the limit.
        ("One. Two. Three.", 10, ["One. Two. ", "Three."]),
        ("Short one. Then another!", 200, ["Short one. Then another!"]),
        # French and German: spaces before marks, quotes, abbreviations that only look
        # like sentence ends cut at worst between words.
        (
            "Bonjour ! Comment ça va ? Très bien.",
            20,
            ["Bonjour ! ", "Comment ça va ? ", "Très bien."],
        ),
        ("„Guten Tag.“ Wie geht es Ihnen?", 16, ["„Guten Tag.“ ", "Wie geht es ", "Ihnen?"]),
        # A sentence longer than the limit is cut at its last space before it.
        ("alpha beta gamma delta epsilon", 12, ["alpha beta ", "gamma delta ", "epsilon"]),
        # Chinese and Japanese end sentences without spaces; a run with no mark at all
        # is cut at the limit.
        ("你好。今天天气很好！我们走吧？", 8, ["你好。", "今天天气很好！", "我们走吧？"]),
        ("日本語のテキストです。次の文。", 12, ["日本語のテキストです。", "次の文。"]),
        ("あいうえおかきくけこさしすせそ", 6, ["あいうえおか", "きくけこさし", "すせそ"]),
        ("Line one\nLine two", 10, ["Line one\n", "Line two"]),
    ],
)
def test_text_is_sliced_at_sentence_ends(text: str, limit: int, slices: list[str]) -> None:
    """Slices cover the text in order, keep to the limit, and end at sentence ends if they can."""
    cut = text_slices(text, limit)
    assert [text[start:end] for start, end in cut] == slices
    assert all(end - start <= limit for start, end in cut)


async def test_slices_sound_like_one_text(
    engine: EspeakEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendered in slices, a text keeps its pauses between sentences: every word starts
    within 30 ms of where it starts when rendered whole, at every rate."""
    text = (
        "Hello there, this is the first sentence. And here comes a second one! And that is the end."
    )
    for rate in ("-100%", "+0%", "+100%"):
        monkeypatch.setattr(espeak, "SLICE_CHARS", 10_000)
        whole = words_of(await speak(engine, text, rate=rate))
        monkeypatch.setattr(espeak, "SLICE_CHARS", 41)
        assert len(text_slices(text, espeak.SLICE_CHARS)) == 3
        sliced_events = await speak(engine, text, rate=rate)
        sliced = words_of(sliced_events)
        assert [w.text for w in sliced] == [w.text for w in whole]
        for a, b in zip(sliced, whole, strict=True):
            assert a.offset_ms == pytest.approx(b.offset_ms, abs=30), (rate, a, b)
        assert len(audio_of(sliced_events)) / 6 == pytest.approx(whole[-1].offset_ms, rel=0.5)


async def test_utterances_take_turns_slice_by_slice(engine: EspeakEngine) -> None:
    """A short utterance asked for while a long one renders gets its audio long before
    the long one is rendered: eSpeak's thread is shared a slice at a time."""
    long_one = engine.synthesize(
        SynthesisRequest(text=LONG_TEXT * 4, voice="espeak:en-us", rate="-100%")
    )
    await anext(long_one)  # rendering has started
    try:
        started = time.perf_counter()
        short = await asyncio.wait_for(speak(engine, "Me too."), TIMEOUT)
        short_took = time.perf_counter() - started
        rest = [event async for event in long_one]
        long_took = time.perf_counter() - started
        assert [w.text for w in words_of(short)] == ["Me", "too"]
        assert rest
        assert short_took < long_took / 4, (short_took, long_took)
    finally:
        await long_one.aclose()
