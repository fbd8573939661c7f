"""The offline engine: eSpeak NG through ctypes, encoded to MP3 with LAME.

eSpeak NG comes from the ``espeakng-loader`` wheel (the shared library and its
data, no system package) and LAME from ``lameenc``; both are the ``local`` extra.
The output has the Edge voices' format (MPEG-2 Layer III, 24 kHz, mono,
48 kbit/s), so clients see one format whichever engine speaks.

eSpeak NG is a process-wide singleton that crashes when called from two threads
at once, so every call into it runs on one dedicated thread. That thread only
hands PCM blocks and word marks to the event loop (``call_soon_threadsafe``); MP3
encoding runs in the default executor (lameenc releases the GIL), and the event
loop never waits on either.

The thread is shared fairly and never waits for a client. Each utterance is
rendered in slices of at most ``SLICE_CHARS`` characters, cut at sentence ends
where it can (:func:`text_slices`), and each utterance has at most one slice
waiting for the thread, so utterances take turns slice by slice: a new one waits
for at most one slice of each other utterance being rendered (about 0.2 s of
eSpeak's time at the slowest rate), not for whole utterances. An utterance whose
reader is more than ``AHEAD_MS`` of audio behind stops taking turns until its
reader catches up, so what it holds is bounded and a client that does not read
costs eSpeak nothing; the session closes such a client after ``SEND_TIMEOUT``,
as for Edge audio. A connection speaks one utterance at a time, so it has at
most one slice in the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import re
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ttsstream.engines.base import (
    MP3_24KHZ_48KBPS,
    AudioChunk,
    AudioFormat,
    SynthesisEvent,
    SynthesisRequest,
    Voice,
    WordEvent,
)
from ttsstream.engines.words import WordTimeline
from ttsstream.exceptions import InvalidVoice, NoAudio

__all__ = [
    "ENCODER_DELAY_MS",
    "VOICE_PREFIX",
    "EspeakEngine",
    "EspeakUnavailable",
    "prosody_settings",
    "text_slices",
]

logger = logging.getLogger("ttsstream.engines.espeak")

VOICE_PREFIX = "espeak:"

#: LAME puts this much silence before the first sample (measured: a click at
#: 1000 ms of PCM decodes at 1046 ms); word offsets are shifted by it.
ENCODER_DELAY_MS = 46.0

# Limits
#: Milliseconds of PCM per eSpeak callback.
BLOCK_MS = 100
#: Most characters of one utterance rendered before another utterance takes its turn
#: (about 0.2 s of eSpeak's time at the slowest rate, 0.1 s at the normal one).
SLICE_CHARS = 200
#: Milliseconds of audio an utterance may have rendered ahead of its reader; past it,
#: its next slice waits until the reader is back under half of it.
AHEAD_MS = 10_000.0

#: A sentence end: ., !, ? or … (closing quotes or brackets may follow) then
#: whitespace; a CJK full stop, exclamation or question mark; or a newline.
#: The word a slice's rendering reads past its end, to make the pause before it (a
#: word eSpeak marks: leading quotes or brackets may come first, not a lone dash).
_NEXT_WORD = re.compile(r"\s*[^\s\w]{0,3}\w\S{0,31}")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”“’‘»«)\]]*\s+|[。！？]+[」』）]*\s*|\n+")

# eSpeak NG's C API (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH = 1, 2, 3
_RATE_MIN, _RATE_MAX, _RATE_NORMAL = 80, 450, 175
_VOLUME_MAX, _VOLUME_NORMAL = 200, 100
_PITCH_MAX, _PITCH_NORMAL = 100, 50
_GENDERS = {1: "Male", 2: "Female"}


class EspeakUnavailable(Exception):
    """The ``local`` extra is not installed, or eSpeak NG failed to start."""


_shared: EspeakEngine | EspeakUnavailable | None = None


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


@dataclass(frozen=True, slots=True)
class EspeakVoice:
    """One eSpeak voice: its public id, the identifier eSpeak loads, its languages."""

    id: str
    identifier: str
    languages: tuple[tuple[int, str], ...]
    gender: str

    @property
    def name(self) -> str:
        return VOICE_PREFIX + self.id


def prosody_settings(rate: str, volume: str, pitch: str) -> tuple[int, int, int]:
    """Map Edge-style prosody to eSpeak's words per minute, amplitude and pitch.

    Rate is 175 × (1 + r/100) words per minute; volume is amplitude
    100 × (1 + v/100); pitch is 50 + hz/2 on eSpeak's 0–100 scale. Each is
    clamped to eSpeak's range.
    """
    r, v, hz = int(rate[:-1]), int(volume[:-1]), int(pitch[:-2])
    words_per_minute = round(_RATE_NORMAL * (1 + r / 100))
    amplitude = round(_VOLUME_NORMAL * (1 + v / 100))
    level = round(_PITCH_NORMAL + hz / 2)
    return (
        min(max(words_per_minute, _RATE_MIN), _RATE_MAX),
        min(max(amplitude, 0), _VOLUME_MAX),
        min(max(level, 0), _PITCH_MAX),
    )


def text_slices(text: str, limit: int = SLICE_CHARS) -> list[tuple[int, int]]:
    """Cut ``text`` into ``(start, end)`` slices of at most ``limit`` characters.

    Whole sentences are grouped up to the limit; a longer sentence is cut at its
    last whitespace before the limit, or at the limit when it has none (CJK text).
    The slices cover the whole text, in order.
    """
    ends = [match.end() for match in _SENTENCE_END.finditer(text)]
    if not ends or ends[-1] != len(text):
        ends.append(len(text))
    slices: list[tuple[int, int]] = []
    start = 0
    for index, end in enumerate(ends):
        following = ends[index + 1] if index + 1 < len(ends) else None
        if following is not None and following - start <= limit:
            continue  # the next sentence fits in this slice too
        while end - start > limit:
            space = text.rfind(" ", start + 1, start + limit + 1)
            cut = space + 1 if space > start else start + limit
            slices.append((start, cut))
            start = cut
        if end > start:
            slices.append((start, end))
            start = end
    return slices


#: What the eSpeak thread delivers once it rendered a slice.
_SLICE_END = "slice end"


@dataclass(eq=False)
class _Job:
    """One utterance, as the eSpeak thread sees it."""

    text: str
    slices: list[tuple[int, int]]
    identifier: bytes
    settings: tuple[int, int, int]
    deliver: Callable[[Any], None]
    #: Whether the event loop that reads this job still runs.
    loop_running: Callable[[], bool]
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: PCM samples rendered so far (only the eSpeak thread touches it).
    samples: int = 0


class _Turns:
    """One utterance's turns on the eSpeak thread, decided on the event loop.

    It asks for one slice at a time, and for the next once the last one is
    rendered, unless the reader is ``AHEAD_MS`` behind: then the next slice
    waits until the reader consumed half of that.
    """

    def __init__(self, engine: EspeakEngine, job: _Job, sample_rate: int) -> None:
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self._engine = engine
        self._job = job
        self._ms_per_byte = 1000 / 2 / sample_rate
        self._next = 0
        self._rendering = False
        self._buffered_ms = 0.0

    def start(self) -> None:
        self._ask()

    def arrived(self, item: Any) -> None:
        """On the event loop: what the thread delivered for this utterance."""
        if item is _SLICE_END:
            self._rendering = False
            if self._next == len(self._job.slices):
                self.items.put_nowait(None)  # the end of the utterance
            else:
                self._ask()
            return
        if isinstance(item, tuple):
            self._buffered_ms += len(item[0]) * self._ms_per_byte
        self.items.put_nowait(item)

    def consumed(self, pcm: bytes) -> None:
        """The reader took ``pcm``: ask for the next slice if it was waiting for that."""
        self._buffered_ms -= len(pcm) * self._ms_per_byte
        if self._buffered_ms < AHEAD_MS / 2:
            self._ask()

    def _ask(self) -> None:
        job = self._job
        if self._rendering or self._next == len(job.slices) or job.cancelled.is_set():
            return
        if self._buffered_ms >= AHEAD_MS:
            return  # the reader is far behind: its next slice waits for it
        self._rendering = True
        self._engine._thread.submit(self._engine._render_slice, job, self._next)
        self._next += 1


class EspeakEngine:
    """Speak offline with eSpeak NG. Create it with :meth:`load`."""

    name = "espeak"
    audio_format: AudioFormat = MP3_24KHZ_48KBPS

    def __init__(self) -> None:
        try:
            import espeakng_loader  # noqa: F401
            import lameenc  # noqa: F401
        except ImportError as exc:
            raise EspeakUnavailable(f"{exc.name} is not installed") from None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak")
        self._lib: Any = None
        self._sample_rate = 0
        #: The job being rendered, where its slice starts in its text and in its audio.
        self._job: _Job | None = None
        self._slice_start = 0
        self._slice_offset_ms = 0.0
        #: Where the next slice's word starts in this slice's text (None: the last slice),
        #: and the samples this slice delivered so far.
        self._stop_at: int | None = None
        self._call_samples = 0
        # Kept referenced: eSpeak holds the pointer for the life of the process.
        self._callback = _SynthCallback(self._on_block)
        self._voices = self._thread.submit(self._initialize).result()
        self._by_id = {voice.id: voice for voice in self._voices}

    @classmethod
    def load(cls) -> EspeakEngine | None:
        """The process's eSpeak engine, started on first use; ``None`` (said once) if unavailable.

        eSpeak NG is one per process, so every server in a process shares it.
        """
        global _shared
        if _shared is None:
            try:
                _shared = cls()
            except EspeakUnavailable as exc:
                _shared = exc
        if isinstance(_shared, EspeakUnavailable):
            logger.warning("no offline voice available (%s): install ttsstream[local]", _shared)
            return None
        return _shared

    # Voices

    async def voices(self) -> list[Voice]:
        """Every eSpeak voice, as ``espeak:<id>``."""
        return [
            Voice(
                name=voice.name,
                locale=_locale(voice.languages[0][1]),
                gender=voice.gender,
                engine="espeak",
            )
            for voice in self._voices
        ]

    async def check_voice(self, voice: str) -> None:
        """Refuse a name that is not ``espeak:<id>`` of a listed voice."""
        self._voice(voice)

    async def aclose(self) -> None:
        """Nothing to release: each utterance closes what it opened."""

    def has_voice(self, voice: str) -> bool:
        return voice.startswith(VOICE_PREFIX) and voice[len(VOICE_PREFIX) :] in self._by_id

    def voice_for_locale(self, locale: str) -> str | None:
        """The best voice for a locale such as ``fr-FR``: exact match first, then language."""
        wanted = locale.lower()
        for candidate in (wanted, wanted.split("-")[0]):
            matches = [
                (priority, index, voice)
                for index, voice in enumerate(self._voices)
                for priority, language in voice.languages
                if language == candidate
            ]
            if matches:
                return min(matches, key=lambda match: (match[0], match[1]))[2].name
        return None

    def _voice(self, name: str) -> EspeakVoice:
        voice = (
            self._by_id.get(name[len(VOICE_PREFIX) :]) if name.startswith(VOICE_PREFIX) else None
        )
        if voice is None:
            raise InvalidVoice("unknown voice")
        return voice

    # Synthesis

    async def synthesize(self, request: SynthesisRequest) -> AsyncGenerator[SynthesisEvent, None]:
        """Stream one utterance: MP3 chunks as eSpeak produces PCM, one word event per word.

        Audio is held back only until the word events that precede it are known,
        which takes eSpeak a few milliseconds, so words never follow their audio.
        """
        voice = self._voice(request.voice)
        loop = asyncio.get_running_loop()
        job = _Job(
            text=request.text,
            slices=text_slices(request.text, SLICE_CHARS),
            identifier=voice.identifier.encode(),
            settings=prosody_settings(request.rate, request.volume, request.pitch),
            deliver=lambda item: _call_soon(loop, turns.arrived, item),
            loop_running=lambda: not loop.is_closed(),
        )
        turns = _Turns(self, job, self._sample_rate)
        timeline = WordTimeline(request.text)
        encoder = _mp3_encoder(self._sample_rate)
        # Each MP3 chunk with the PCM it was encoded from (for other formats); the first
        # PCM gets the encoder's delay as silence, so both keep the MP3's timeline.
        held: deque[tuple[float, bytes, bytes]] = deque()
        lead = bytes(2 * round(ENCODER_DELAY_MS * self._sample_rate / 1000))
        pcm_ms = 0.0
        turns.start()
        try:
            while (item := await turns.items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                pcm, marks = item
                turns.consumed(pcm)
                for char_index, time_ms in marks:
                    for word in timeline.mark(char_index, time_ms):
                        if _is_word(word):
                            yield _delayed(word)
                if pcm:
                    pcm_ms += len(pcm) / 2 * 1000 / self._sample_rate
                    mp3 = await loop.run_in_executor(None, encoder.encode, pcm)
                    held.append((pcm_ms, bytes(mp3), lead + pcm))
                    lead = b""
                while held and held[0][0] <= timeline.known_until_ms:
                    _, mp3, pcm = held.popleft()
                    yield AudioChunk(mp3, pcm, self._sample_rate)
            if pcm_ms == 0:
                raise NoAudio("the offline voice produced no audio")
            for word in timeline.finish(pcm_ms):
                if _is_word(word):
                    yield _delayed(word)
            held.append((pcm_ms, bytes(await loop.run_in_executor(None, encoder.flush)), b""))
            for _, mp3, pcm in held:
                if mp3 or pcm:
                    yield AudioChunk(mp3, pcm, self._sample_rate)
        finally:
            # eSpeak stops at its next block; the thread then takes the next slice.
            job.cancelled.set()

    # On the eSpeak thread

    def _initialize(self) -> list[EspeakVoice]:
        import espeakng_loader

        try:
            lib = ctypes.CDLL(espeakng_loader.get_library_path())
            data_path = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as exc:
            raise EspeakUnavailable(f"eSpeak NG library failed to load: {exc}") from None
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, BLOCK_MS, data_path.encode(), _INITIALIZE_DONT_EXIT
        )
        if sample_rate <= 0:
            raise EspeakUnavailable("eSpeak NG failed to initialise")
        lib.espeak_SetSynthCallback(self._callback)
        self._lib, self._sample_rate = lib, sample_rate
        voices = _list_voices(lib)
        logger.info("offline voice: eSpeak NG, %d voices, %d Hz", len(voices), sample_rate)
        return voices

    def _render_slice(self, job: _Job, index: int) -> None:
        """Render slice ``index`` of ``job`` (its blocks, then _SLICE_END), unless cancelled."""
        if job.cancelled.is_set() or not job.loop_running():
            return
        lib = self._lib
        start, end = job.slices[index]
        # Unless this is the last slice, eSpeak also reads the next word, so that the
        # pause before it is the one it makes within a text (a text's end has a shorter
        # one); the audio is cut where that word starts (see _on_block).
        lookahead = _NEXT_WORD.match(job.text, end) if index + 1 < len(job.slices) else None
        text = job.text[start : lookahead.end() if lookahead else end].encode("utf-8") + b"\0"
        self._job, self._slice_start = job, start
        self._stop_at = end - start if lookahead else None
        self._call_samples = 0
        self._slice_offset_ms = job.samples * 1000 / self._sample_rate
        try:
            if lib.espeak_SetVoiceByName(job.identifier) != 0:
                raise InvalidVoice("unknown voice")
            for parameter, value in zip(
                (_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH), job.settings, strict=True
            ):
                lib.espeak_SetParameter(parameter, value, 0)
            lib.espeak_Synth(text, len(text), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        except Exception as exc:
            job.deliver(exc)
        else:
            job.deliver(_SLICE_END)
        finally:
            self._job = None

    def _on_block(self, wav: Any, sample_count: int, events: Any) -> int:
        """eSpeak's synchronous callback: one block of PCM and the events in it."""
        job = self._job
        if job is None or job.cancelled.is_set() or not job.loop_running():
            return 1
        sample_count = max(sample_count, 0)
        marks = []
        stop = False
        index = 0
        while events[index].type != _EVENT_LIST_TERMINATED:
            event = events[index]
            index += 1
            if event.type != _EVENT_WORD:
                continue
            # text_position counts characters from 1, in the slice; audio_position
            # milliseconds from the slice's start.
            if self._stop_at is not None and event.text_position - 1 >= self._stop_at:
                # The next slice's first word: keep the pause before it, stop there.
                starts_at = round(event.audio_position * self._sample_rate / 1000)
                sample_count = min(sample_count, max(0, starts_at - self._call_samples))
                stop = True
                break
            marks.append(
                (
                    self._slice_start + event.text_position - 1,
                    self._slice_offset_ms + float(event.audio_position),
                )
            )
        pcm = ctypes.string_at(wav, sample_count * 2) if sample_count and wav else b""
        self._call_samples += sample_count
        job.samples += sample_count
        job.deliver((pcm, marks))
        return 1 if stop else 0


def _list_voices(lib: Any) -> list[EspeakVoice]:
    listed = lib.espeak_ListVoices(None)
    voices: dict[str, EspeakVoice] = {}
    index = 0
    while listed[index]:
        raw = listed[index].contents
        index += 1
        identifier = raw.identifier.decode()
        if identifier.startswith("mb/"):
            continue  # MBROLA voices need a separate synthesizer this package does not ship.
        languages = []
        address = raw.languages
        while address and (priority := ctypes.c_ubyte.from_address(address).value):
            language = ctypes.string_at(address + 1)
            languages.append((priority, language.decode()))
            address += len(language) + 2
        public_id = identifier.rsplit("/", 1)[-1].lower()
        if languages and public_id not in voices:
            voices[public_id] = EspeakVoice(
                id=public_id,
                identifier=identifier,
                languages=tuple(languages),
                gender=_GENDERS.get(raw.gender, "Neutral"),
            )
    return sorted(voices.values(), key=lambda voice: voice.id)


def _locale(language: str) -> str:
    """eSpeak's "en-us" in the case Edge uses for locales: "en-US"."""
    parts = language.split("-")
    return "-".join(
        part.upper() if index > 0 and len(part) == 2 else part for index, part in enumerate(parts)
    )


def _mp3_encoder(sample_rate: int) -> Any:
    import lameenc

    encoder = lameenc.Encoder()
    encoder.set_channels(1)
    encoder.set_bit_rate(MP3_24KHZ_48KBPS.bitrate_bps // 1000)
    # LAME resamples eSpeak's 22050 Hz to the 24000 Hz the Edge voices use.
    encoder.set_in_sample_rate(sample_rate)
    encoder.set_out_sample_rate(MP3_24KHZ_48KBPS.sample_rate)
    encoder.set_quality(5)
    return encoder


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[Any], None], item: Any) -> None:
    """Hand ``item`` to the event loop from the eSpeak thread."""
    # The loop may have closed while eSpeak finished an abandoned utterance.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, item)


#: Symbols eSpeak reads aloud (``&`` "and", ``%`` "percent", ``=`` "equals"…): a piece of
#: them alone is a word. Other marks alone (``—``, ``?``, ``...``, an emoji) are no word,
#: as Edge reports none (their time stays a pause).
_SPOKEN_SYMBOLS = frozenset("&%=+@#$€£¥<>§°±×÷")


def _is_word(word: WordEvent) -> bool:
    """Whether a piece of the text between spaces is a word: one with a letter, a digit
    or a symbol eSpeak speaks."""
    return any(char.isalnum() or char in _SPOKEN_SYMBOLS for char in word.text)


def _delayed(word: WordEvent) -> WordEvent:
    return WordEvent(
        text=word.text,
        offset_ms=word.offset_ms + ENCODER_DELAY_MS,
        duration_ms=word.duration_ms,
        char_start=word.char_start,
        char_end=word.char_end,
    )
