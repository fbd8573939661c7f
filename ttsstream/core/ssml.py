"""SSML that Edge can speak: a document parsed into spans (no I/O).

Microsoft's free Edge endpoint takes no SSML of a client's own (edge-tts escapes
the text and wraps it in one ``<voice><prosody>``), so a document is spoken as a
sequence of :class:`Spoken` spans, each one synthesis with its own voice and
prosody, and :class:`Pause` breaks between them, on one timeline
(:mod:`ttsstream.core.spans`). The subset, and what each element does, is the
table in ``docs/ssml.md``.

The XML is parsed with ``defusedxml`` (no DTD, no entity, no external reference:
billion laughs and XXE are refused before any expansion), after a bound on the
document's size; its depth, its spans and its breaks are bounded too. Every
refusal is a :class:`~ttsstream.exceptions.SsmlInvalid` (the document is not
well-formed or breaks a bound) or :class:`~ttsstream.exceptions.SsmlUnsupported`
(an element or attribute Edge cannot do), naming what.

Each span keeps where its text came from in the document's text content (the
concatenation of its text nodes, as a client sees it), so a word's
``char_start``/``char_end`` slice that text.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from num2words import num2words

from ttsstream.engines.words import CharMap
from ttsstream.exceptions import SsmlInvalid, SsmlUnsupported

__all__ = [
    "BREAK_STRENGTHS",
    "MAX_BREAK_MS",
    "MAX_DEPTH",
    "Pause",
    "Spoken",
    "SsmlDocument",
    "is_ssml",
    "parse_ssml",
]

#: Deepest element nesting accepted.
MAX_DEPTH = 32
#: Longest single break, and all breaks of a document together (milliseconds).
MAX_BREAK_MS = 5_000
MAX_BREAKS_TOTAL_MS = 60_000
#: Azure's break strengths, in milliseconds.
BREAK_STRENGTHS = {
    "none": 0,
    "x-weak": 250,
    "weak": 500,
    "medium": 750,
    "strong": 1000,
    "x-strong": 1250,
}
#: Edge's prosody bounds, where values are clamped.
RATE_RANGE = (-50, 200)  # percent
PITCH_RANGE = (-100, 100)  # hertz
VOLUME_RANGE = (-100, 100)  # percent
#: The pitch a relative pitch in percent or semitones is taken of (hertz).
BASE_PITCH_HZ = 200.0

_RATE_NAMES = {"x-slow": 0.5, "slow": 0.64, "medium": 1.0, "fast": 1.55, "x-fast": 2.0}
_PITCH_NAMES = {"x-low": -45.0, "low": -20.0, "medium": 0.0, "high": 20.0, "x-high": 45.0}
_VOLUME_NAMES = {
    "silent": 0.0,
    "x-soft": 20.0,
    "soft": 40.0,
    "medium": 60.0,
    "loud": 80.0,
    "x-loud": 100.0,
}
_EMPHASIS = {
    "reduced": (-10.0, -20.0),
    "none": (0.0, 0.0),
    "moderate": (-10.0, 20.0),
    "strong": (-20.0, 40.0),
}
_SSML_NS = "{http://www.w3.org/2001/10/synthesis}"
#: Elements spoken as their content (no effect of their own on Edge).
_TRANSPARENT = frozenset({"p", "s", "lang", "paragraph", "sentence"})
#: Optional elements Azure documents that are skipped, with their content.
_SKIPPED = frozenset({"bookmark", "mark"})
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
_TIME = re.compile(r"(\d+(?:\.\d+)?)(ms|s)")


@dataclass(frozen=True, slots=True)
class Prosody:
    """Voice and prosody in force: rate and volume as factors, pitch as a shift in Hz."""

    voice: str
    rate: float = 1.0
    pitch_hz: float = 0.0
    volume: float = 1.0

    @property
    def edge(self) -> tuple[str, str, str]:
        """Edge's ``rate``, ``volume``, ``pitch`` strings, clamped to what it takes."""
        rate = _clamp((self.rate - 1) * 100, RATE_RANGE)
        volume = _clamp((self.volume - 1) * 100, VOLUME_RANGE)
        pitch = _clamp(self.pitch_hz, PITCH_RANGE)
        return f"{rate:+d}%", f"{volume:+d}%", f"{pitch:+d}Hz"


@dataclass(frozen=True, slots=True)
class Spoken:
    """A span spoken by one synthesis."""

    text: str
    voice: str
    rate: str
    volume: str
    pitch: str
    #: Where each of its characters came from in the document's text content.
    source: CharMap


@dataclass(frozen=True, slots=True)
class Pause:
    """Silence between spans."""

    ms: int


@dataclass(frozen=True, slots=True)
class SsmlDocument:
    """A parsed document: its spans and pauses in order, and its text content."""

    pieces: tuple[Spoken | Pause, ...]
    #: The document's text content, which word events' character ranges index.
    text: str

    @property
    def spans(self) -> int:
        return sum(isinstance(piece, Spoken) for piece in self.pieces)

    @property
    def characters(self) -> int:
        """What a quota counts: its text content, or what is spoken if more (an alias
        or a number in words may be longer than what it stands for)."""
        spoken = sum(len(piece.text) for piece in self.pieces if isinstance(piece, Spoken))
        return max(len(self.text), spoken)


def is_ssml(text: str) -> bool:
    """Whether ``text`` is an SSML document (it starts with ``<speak``, after a byte
    order mark and an ``<?xml …?>`` declaration)."""
    text = text.lstrip("\ufeff \t\r\n")
    if text.startswith("<?xml"):
        text = text.partition("?>")[2].lstrip()
    return text.startswith("<speak")


def parse_ssml(
    document: str,
    *,
    default_voice: str,
    max_chars: int,
    max_spans: int,
    max_bytes: int | None = None,
) -> SsmlDocument:
    """Parse ``document`` into spans.

    Args:
        default_voice: The voice where the document names none.
        max_chars: Most characters of text content.
        max_spans: Most spans and pauses.
        max_bytes: Most bytes of the document itself (default: 16 × ``max_chars``).

    Raises:
        SsmlInvalid: Not well-formed, not ``<speak>``, or past a bound.
        SsmlUnsupported: An element Edge cannot speak.
    """
    limit = max_bytes if max_bytes is not None else 16 * max_chars + 1024
    if len(document.encode()) > limit:
        raise SsmlInvalid(f"the SSML document is longer than {limit} bytes")
    try:
        root = fromstring(document, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise SsmlInvalid(f"the SSML document is refused: {type(exc).__name__}") from None
    except ElementTree.ParseError as exc:
        raise SsmlInvalid(f"the SSML document is not well-formed XML: {exc}") from None
    if _name(root) != "speak":
        raise SsmlInvalid("an SSML document's root element is <speak>")
    builder = _Builder(max_chars=max_chars, max_spans=max_spans)
    builder.walk(root, Prosody(default_voice), depth=0)
    builder.flush()
    pieces = builder.pieces
    if not any(isinstance(piece, Spoken) for piece in pieces):
        raise SsmlInvalid("the SSML document has nothing to speak")
    return SsmlDocument(tuple(pieces), "".join(builder.text))


@dataclass
class _Run:
    """Text gathered for the span being built: each part spoken, where it came from in
    the document's text content, and whether it is that text (else it stands for it)."""

    prosody: Prosody
    parts: list[tuple[str, int, int, bool]] = field(default_factory=list)

    def spoken(self) -> tuple[str, CharMap]:
        """The span's text with its white space made single spaces and its ends trimmed
        (a line is the same line however the document is indented: one cache entry),
        and where each character came from."""
        pieces: list[str] = []
        source = CharMap()
        pending_space: tuple[int, int] | None = None
        for text, start, end, copied in self.parts:
            if not copied:
                words = " ".join(text.split())
                if not words:
                    continue
                if pending_space is not None and pieces:
                    pieces.append(" ")
                    source.stand_for(*pending_space, 1)
                pending_space = None
                pieces.append(words)
                source.stand_for(start, end, len(words))
                continue
            for match in re.finditer(r"\s+|\S+", text):
                at = start + match.start()
                if match.group().isspace():
                    pending_space = (at, at + len(match.group()))
                    continue
                if pending_space is not None and pieces:
                    pieces.append(" ")
                    source.stand_for(*pending_space, 1)
                pending_space = None
                pieces.append(match.group())
                source.copy(at, len(match.group()))
        return "".join(pieces), source


class _Builder:
    def __init__(self, *, max_chars: int, max_spans: int) -> None:
        self.max_chars = max_chars
        self.max_spans = max_spans
        self.pieces: list[Spoken | Pause] = []
        #: The document's text content, piece by piece.
        self.text: list[str] = []
        self.text_length = 0
        #: Characters spoken (aliases and numbers in words counted as said).
        self.spoken_length = 0
        self.breaks_ms = 0
        self._run: _Run | None = None

    def walk(self, element: ElementTree.Element, prosody: Prosody, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise SsmlInvalid(f"SSML elements nest deeper than {MAX_DEPTH}")
        name = _name(element)
        if name == "break":
            self._break(element)
            self._tail(element, prosody)
            return
        if name in _SKIPPED:
            self._tail(element, prosody)
            return
        inner = self._enter(element, name, prosody)
        if name == "sub":
            alias = element.get("alias")
            if alias is None:
                raise SsmlInvalid("<sub> needs an alias")
            self._stand_for(_text_of(element, depth), alias, inner)
        elif name == "say-as":
            written = _text_of(element, depth)
            self._stand_for(written, _say_as(element, written, inner.voice), inner)
        elif name == "phoneme":
            # Edge takes no phonemes: the text is spoken as written.
            self._say(_text_of(element, depth), inner)
        else:
            self._say(element.text, inner)
            for child in element:
                self.walk(child, inner, depth + 1)
        self._tail(element, prosody)

    def _enter(self, element: ElementTree.Element, name: str, prosody: Prosody) -> Prosody:
        """The prosody inside ``element``."""
        if name == "speak" or name in _TRANSPARENT or name in ("sub", "say-as", "phoneme"):
            return prosody
        if name == "voice":
            voice = element.get("name")
            if not voice:
                raise SsmlInvalid("<voice> needs a name")
            return Prosody(voice.strip(), prosody.rate, prosody.pitch_hz, prosody.volume)
        if name == "prosody":
            unknown = set(element.attrib) - {"rate", "pitch", "volume", "contour", "range"}
            if unknown:
                raise SsmlUnsupported(f"<prosody> has no attribute {sorted(unknown)[0]!r} on Edge")
            return Prosody(
                prosody.voice,
                _rate(element.get("rate"), prosody.rate),
                _pitch(element.get("pitch"), prosody.pitch_hz),
                _volume(element.get("volume"), prosody.volume),
            )
        if name == "emphasis":
            level = element.get("level", "moderate")
            if level not in _EMPHASIS:
                raise SsmlInvalid(f"<emphasis level={level!r}> is not one of {sorted(_EMPHASIS)}")
            slower, louder = _EMPHASIS[level]
            return Prosody(
                prosody.voice,
                prosody.rate * (1 + slower / 100),
                prosody.pitch_hz,
                prosody.volume * (1 + louder / 100),
            )
        raise SsmlUnsupported(f"<{_qualified(element)}> is not supported on Edge (docs/ssml.md)")

    def _break(self, element: ElementTree.Element) -> None:
        time, strength = element.get("time"), element.get("strength")
        if time is not None:
            match = _TIME.fullmatch(time.strip())
            if match is None:
                raise SsmlInvalid(f'<break time="{time}"> is not a time such as 500ms or 2s')
            value = float(match.group(1)) * (1 if match.group(2) == "ms" else 1000)
            if not math.isfinite(value) or value > MAX_BREAK_MS:
                raise SsmlInvalid(f"a <break> is at most {MAX_BREAK_MS} ms")
            ms = round(value)
        elif strength is not None:
            if strength not in BREAK_STRENGTHS:
                raise SsmlInvalid(
                    f"<break strength={strength!r}> is not one of {list(BREAK_STRENGTHS)}"
                )
            ms = BREAK_STRENGTHS[strength]
        else:
            ms = BREAK_STRENGTHS["medium"]
        if ms > MAX_BREAK_MS:
            raise SsmlInvalid(f"a <break> is at most {MAX_BREAK_MS} ms")
        self.breaks_ms += ms
        if self.breaks_ms > MAX_BREAKS_TOTAL_MS:
            raise SsmlInvalid(
                f"the breaks of a document are at most {MAX_BREAKS_TOTAL_MS} ms in all"
            )
        if ms == 0:
            return
        self.flush()
        if self.pieces and isinstance(self.pieces[-1], Pause):
            self.pieces[-1] = Pause(self.pieces[-1].ms + ms)
        else:
            self._add(Pause(ms))

    def _tail(self, element: ElementTree.Element, prosody: Prosody) -> None:
        self._say(element.tail, prosody)

    def _say(self, text: str | None, prosody: Prosody) -> None:
        """Speak ``text`` as written (it is text content of the document)."""
        if not text:
            return
        start = self._content(text)
        run = self._run_for(prosody)
        run.parts.append((text, start, start + len(text), True))

    def _stand_for(self, written: str, spoken: str, prosody: Prosody) -> None:
        """Speak ``spoken`` for the document's text ``written`` (an alias, an expansion)."""
        start = self._content(written)
        if not spoken:
            return
        run = self._run_for(prosody)
        run.parts.append((spoken, start, start + len(written), False))

    def _content(self, text: str) -> int:
        """Add ``text`` to the document's text content; where it starts there."""
        start = self.text_length
        self.text.append(text)
        self.text_length += len(text)
        if self.text_length > self.max_chars:
            raise SsmlInvalid(
                f"the SSML document has more than {self.max_chars} characters of text"
            )
        return start

    def _run_for(self, prosody: Prosody) -> _Run:
        run = self._run
        if run is not None and run.prosody != prosody:
            self.flush()
            run = None
        if run is None:
            run = self._run = _Run(prosody)
        return run

    def flush(self) -> None:
        """End the span being built (a voice or prosody change, a break, the end)."""
        run, self._run = self._run, None
        if run is None:
            return
        text, source = run.spoken()
        # Text with no word (a lone "." between elements) is not a synthesis of its own:
        # Edge would send no audio for it.
        if not any(char.isalnum() for char in text):
            return
        self.spoken_length += len(text)
        if self.spoken_length > self.max_chars:
            raise SsmlInvalid(
                f"the SSML document speaks more than {self.max_chars} characters "
                "(its aliases and numbers in words included)"
            )
        rate, volume, pitch = run.prosody.edge
        self._add(Spoken(text, run.prosody.voice, rate, volume, pitch, source))

    def _add(self, piece: Spoken | Pause) -> None:
        if len(self.pieces) >= self.max_spans:
            raise SsmlInvalid(f"the SSML document has more than {self.max_spans} spans and breaks")
        self.pieces.append(piece)


def _name(element: ElementTree.Element) -> str:
    tag = element.tag if isinstance(element.tag, str) else ""
    return tag.removeprefix(_SSML_NS) if tag.startswith(_SSML_NS) else tag


def _qualified(element: ElementTree.Element) -> str:
    tag = element.tag if isinstance(element.tag, str) else "?"
    if tag.startswith("{http://www.w3.org/2001/mstts}"):
        return "mstts:" + tag.split("}", 1)[1]
    return _name(element)


def _text_of(element: ElementTree.Element, depth: int) -> str:
    """The text of an element that holds text only."""
    if len(element):
        raise SsmlInvalid(f"<{_name(element)}> holds text only, not elements")
    return element.text or ""


def _clamp(value: float, bounds: tuple[int, int]) -> int:
    """``value`` rounded within ``bounds`` (an infinite one at its bound, NaN as 0)."""
    if math.isnan(value):
        return 0
    return round(max(bounds[0], min(bounds[1], value)))


def _number(text: str, what: str) -> float:
    if not _NUMBER.fullmatch(text):
        raise SsmlInvalid(f"{what} {text!r} is not a value Azure defines")
    value = float(text)
    if not math.isfinite(value):
        raise SsmlInvalid(f"{what} {text!r} is not finite")
    return value


def _rate(value: str | None, current: float) -> float:
    """A rate: a name, a multiplier (``1.5``), or a relative percent (``+10%``)."""
    if value is None or value == "default":
        return current if value is None else 1.0
    value = value.strip()
    if value in _RATE_NAMES:
        return _RATE_NAMES[value]
    if value.endswith("%"):
        return current * (1 + _number(value[:-1], "rate") / 100)
    return current * _number(value, "rate")


def _pitch(value: str | None, current: float) -> float:
    """A pitch shift in Hz: a name, ``+10Hz``, ``+5%``, ``-2st``."""
    if value is None or value == "default":
        return current if value is None else 0.0
    value = value.strip()
    if value in _PITCH_NAMES:
        return BASE_PITCH_HZ * _PITCH_NAMES[value] / 100
    if value.lower().endswith("hz"):
        number = value[:-2]
        if number.startswith(("+", "-")):
            return current + _number(number, "pitch")
        return _number(number, "pitch") - BASE_PITCH_HZ  # absolute: of a 200 Hz voice
    if value.endswith("%"):
        return current + BASE_PITCH_HZ * _number(value[:-1], "pitch") / 100
    if value.endswith("st"):
        return current + BASE_PITCH_HZ * (2 ** (_number(value[:-2], "pitch") / 12) - 1)
    raise SsmlInvalid(f"pitch {value!r} is not a name, Hz, % or st")


def _volume(value: str | None, current: float) -> float:
    """A volume factor: a name, an absolute 0–100, ``+10%``, ``-6dB``."""
    if value is None or value == "default":
        return current if value is None else 1.0
    value = value.strip()
    if value in _VOLUME_NAMES:
        return _VOLUME_NAMES[value] / 100
    if value.endswith("%"):
        return current * (1 + _number(value[:-1], "volume") / 100)
    if value.lower().endswith("db"):
        return current * 10 ** (_number(value[:-2], "volume") / 20)
    return max(0.0, min(100.0, _number(value, "volume"))) / 100


#: The languages say-as expands numbers and dates in (num2words'), by the voice's prefix.
_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "ja", "ko")
_MONTHS_EN = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def _language(voice: str) -> str | None:
    """The language of a voice name (``en-US-AriaNeural``, ``espeak:de``, Azure's long
    ``Microsoft Server Speech Text to Speech Voice (de-DE, KatjaNeural)``), if say-as
    expands in it."""
    _, paren, inside = voice.partition("(")
    if paren:
        voice = inside
    name = voice.removeprefix("espeak:").split("-", 1)[0].strip().lower()
    return name if name in _LANGUAGES else None


def _say_as(element: ElementTree.Element, written: str, voice: str) -> str:
    """What ``written`` is said as, by ``interpret-as``."""
    kind = element.get("interpret-as")
    text = written.strip()
    language = _language(voice)
    if kind == "characters" or kind == "spell-out":
        return " ".join(char for char in text if not char.isspace())
    if kind == "digits" or kind == "number_digit":
        return " ".join(char for char in text if char.isdigit())
    if kind == "telephone":
        return " ".join(" ".join(part) for part in re.findall(r"\d+", text))
    if kind in ("cardinal", "number", "ordinal"):
        if language is None or not _NUMBER.fullmatch(text.replace(",", "")):
            return written
        digits = text.replace(",", "")
        value: int | float = int(digits) if re.fullmatch(r"[+-]?\d+", digits) else float(digits)
        to = "ordinal" if kind == "ordinal" else "cardinal"
        try:
            return str(num2words(value, to=to, lang=language))
        except Exception:  # a number num2words cannot say (1.5th, -3rd, 10**60 in Russian)
            return written
    if kind == "date":
        try:
            day = dt.date.fromisoformat(text)
        except ValueError:
            return written
        if language != "en":
            return written
        return f"{_MONTHS_EN[day.month - 1]} {num2words(day.day, to='ordinal')}, {day.year}"
    if kind == "time":
        match = re.fullmatch(r"(\d{1,2}):(\d{2})(?::\d{2})?", text)
        if match is None or language != "en":
            return written
        hours, minutes = int(match.group(1)), int(match.group(2))
        if minutes == 0:
            return f"{num2words(hours)} o'clock"
        return f"{num2words(hours)} {'oh ' if minutes < 10 else ''}{num2words(minutes)}"
    if kind is None:
        raise SsmlInvalid("<say-as> needs an interpret-as")
    return written  # another interpretation: spoken as written
