"""The audio formats the server sends, one table for every door (pure; no I/O).

Every engine produces the same source: 24 kHz mono MP3 at 48 kbit/s (Edge's
output; the offline voice encodes to it). ``mp3`` is that source untouched;
every other format is made from it as it streams (:mod:`ttsstream.audio.transcode`).

The table (:data:`FORMATS`) holds the base names, all at the source's 24 kHz. The
families for telephony and voice agents are parsed from their names by
:func:`format_named` (ElevenLabs' and Cartesia's names), each at its own rate:
``pcm_<rate>`` (16-bit), ``pcm_f32le_<rate>`` (32-bit float) and ``wav_<rate>``
at any of :data:`PCM_RATES`; ``ulaw_8000`` and ``alaw_8000`` (G.711, raw bytes);
``mp3_22050_32``, ``mp3_24000_48`` and ``mp3_44100_<kbps>`` (LAME);
``opus_48000_<kbps>`` (Ogg Opus), at any of :data:`ENCODED_KBPS`. A family name
at the source's own rate and format is the base format it equals:
``pcm_24000`` is ``pcm``, ``wav_24000`` is ``wav``, and ``mp3_24000_48`` is
``mp3`` (the source untouched, no transcode).

Every format keeps the source's timeline, so word offsets are the same in all
of them. The MP3 decoder's delay is part of that timeline (Edge's offsets
describe the MP3 as a decoder plays it) and carries into every format made from
its decoded samples. Resampling adds no delay: FFmpeg's resampler compensates
its filter's, and a click lands within 0.05 ms (under one sample) of its time
at every rate (measured with PyAV, 24 kHz and 22,050 Hz to each rate). Opus
signals its encoder's pre-skip in the stream (decoders remove it); FLAC, WAV, PCM
and G.711 add nothing. ADTS AAC cannot signal the AAC encoder's 1024 samples of
priming, which every decoder plays before the source: its word offsets move later
by as much (``priming_samples``, 42.7 ms), and the source's last partial frame
(under 43 ms of its trailing silence) is dropped rather than padded, so the audio
is at most the priming longer than the MP3. Dropping as many samples of the
source's start instead would keep the offsets, but the encoder would then need
128 ms of source before its first packet, one upstream chunk more than the 85 ms
it needs now. A raw MP3 stream cannot signal LAME's delay either (only a LAME tag,
written once the stream is whole, can): :data:`LAME_DELAY_SAMPLES` (576 of the
encoder's and the 529 every MP3 decoder adds, measured with PyAV at 22,050 and
44,100 Hz) move the words of ``mp3_<rate>_<kbps>`` later, 50.1 ms at 22,050 Hz
and 25.1 ms at 44,100 Hz; LAME pads the last frame, so the audio is at most
the priming and a frame longer than the MP3.

What is kept of a format (``Format.kept``): only the encoded formats (Opus, WebM,
AAC, and the ``mp3_<rate>_<kbps>`` and ``opus_48000_<kbps>`` families) are stored
beside the MP3 once made whole, and shared by identical requests while they are
made. They cost 1 to 3 µs of CPU per MP3 byte to make (an encoder runs) and are at
most 4 times the MP3's size (192 kbit/s against 48). FLAC, WAV, PCM and G.711 are
made again for every request: decoding (and resampling) costs a tenth of that
(FLAC a fifth), and most of them are 2 to 32 times the MP3's size, so keeping
them would cost more disk and memory than making them costs CPU; G.711 is as
small as the MP3 but as cheap to make as PCM.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Literal

from ttsstream.engines.base import MP3_24KHZ_48KBPS, AudioFormat

__all__ = [
    "ENCODED_KBPS",
    "FORMATS",
    "FORMAT_CHOICES",
    "FORMAT_FAMILIES",
    "FORMAT_NAMES",
    "G711_RATE",
    "LAME_DELAY_SAMPLES",
    "MP3",
    "OPUS_RATE",
    "PCM_RATES",
    "SAMPLE_RATE",
    "Format",
    "SampleEncoding",
    "format_for_path",
    "format_named",
    "wav_header",
]

#: The source's sample rate (Edge's MP3, and the offline voice's), and the base formats'.
SAMPLE_RATE = MP3_24KHZ_48KBPS.sample_rate
#: The rates of ``pcm_<rate>``, ``pcm_f32le_<rate>`` and ``wav_<rate>``, Hz (ElevenLabs').
PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
#: G.711's only rate, Hz (``ulaw_8000``, ``alaw_8000``).
G711_RATE = 8000
#: The bit rates of ``mp3_44100_<kbps>`` and ``opus_48000_<kbps>``, kbit/s.
ENCODED_KBPS = (32, 64, 96, 128, 192)
#: The other ``mp3_<rate>_<kbps>`` there are: (rate in Hz, kbit/s).
_OTHER_MP3 = ((22050, 32), (SAMPLE_RATE, 48))
#: Opus's rate inside, and what every decoder gives, Hz.
OPUS_RATE = 48_000
#: Samples a decoder plays before the source in an MP3 that LAME made: LAME's encoder
#: delay (576) and the MP3 decoder's (529), at any rate; measured with PyAV.
LAME_DELAY_SAMPLES = 576 + 529
#: Ogg's framing per 40 ms Opus packet, each in its own page (27-byte header and its
#: lacing values), bit/s: what ``opus_48000_<kbps>`` sends beyond its encoder's rate.
_OGG_PAGE_BPS = 25 * 30 * 8

#: What one sample is, in a format sent as samples: 16-bit signed or 32-bit float
#: little-endian, or one byte of G.711 (μ-law, A-law).
SampleEncoding = Literal["s16le", "f32le", "mulaw", "alaw"]
_SAMPLE_BYTES: dict[str, int] = {"s16le": 2, "f32le": 4, "mulaw": 1, "alaw": 1}


@dataclass(frozen=True, slots=True)
class Format:
    """One format the server can send."""

    #: The short name clients ask for (``format``, ``response_format``).
    name: str
    #: What is sent, as a MIME type (``start.format``, ``Content-Type``).
    mime_type: str
    #: The file name extension the CLI recognises.
    extension: str
    #: The rate a player plays it at, Hz (``start.sample_rate``); Opus is always
    #: decoded at 48 kHz, but ``opus`` and ``webm`` say they were made from 24 kHz.
    sample_rate: int = SAMPLE_RATE
    #: What a sample is on the wire, for a format sent as samples (PCM, WAV's data,
    #: G.711); ``None`` for a compressed one.
    sample: SampleEncoding | None = None
    #: Whether a WAV header of unknown length comes first (:func:`wav_header`).
    riff: bool = False
    #: FFmpeg's muxer, or ``None`` when none is needed (mp3, wav, pcm, G.711: the
    #: samples or the encoder's packets are sent as they are).
    container: str | None = None
    #: FFmpeg's encoder, or ``None`` when the samples are sent as they are.
    codec: str | None = None
    #: The encoder's target bit rate, bit/s (``None``: lossless, or the codec's own).
    bit_rate: int | None = None
    #: Muxer options that make the container streamable.
    container_options: dict[str, str] = field(default_factory=dict)
    #: Encoder options.
    codec_options: dict[str, str] = field(default_factory=dict)
    #: Encoder priming that the container cannot signal and every decoder plays before
    #: the source, in samples at ``sample_rate``: word offsets in this format move
    #: later by as much.
    priming_samples: int = 0
    #: Nominal bit rate of what is sent, bit/s.
    nominal_bps: int = 0
    #: Whether an utterance made whole in this format is stored beside the MP3 (on this
    #: instance's disk only), and made once for identical requests that overlap.
    kept: bool = False

    @property
    def priming_ms(self) -> float:
        """How much later every word is heard in this format than in the MP3."""
        return self.priming_samples * 1000 / self.sample_rate

    @property
    def transcoded(self) -> bool:
        """Whether the source is decoded to make it (every format but mp3)."""
        return self.name != "mp3"

    @property
    def bytes_per_sample(self) -> int | None:
        """Bytes per sample on the wire, for a format sent as samples; else ``None``."""
        return None if self.sample is None else _SAMPLE_BYTES[self.sample]

    @property
    def audio_format(self) -> AudioFormat:
        """The format as the rest of the server names a stream's encoding."""
        return AudioFormat(
            mime_type=self.mime_type,
            sample_rate=self.sample_rate,
            bitrate_bps=self.nominal_bps,
            name=self.name,
        )


MP3 = Format(
    name="mp3",
    mime_type=MP3_24KHZ_48KBPS.mime_type,
    extension="mp3",
    nominal_bps=MP3_24KHZ_48KBPS.bitrate_bps,
)


def _pcm_mime(rate: int, sample: SampleEncoding) -> str:
    """``audio/pcm`` with its rate and sample (the Web's and Azure's form; ``audio/L16``
    is big-endian)."""
    if sample == "f32le":
        return f"audio/pcm;rate={rate};encoding=float;bits=32"
    return f"audio/pcm;rate={rate};encoding=signed-int;bits=16"


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        MP3,
        Format(
            name="opus",
            mime_type="audio/ogg; codecs=opus",
            extension="opus",
            container="ogg",
            codec="libopus",
            # 40 ms packets at 28 kbit/s, each in its own Ogg page (instead of pages of
            # 1 s): about 32 kbit/s on the wire, and every upstream chunk's audio leaves
            # with it but for the packet the muxer holds until the next one begins.
            bit_rate=28_000,
            codec_options={"frame_duration": "40"},
            container_options={"page_duration": "20000"},
            nominal_bps=32_000,
            kept=True,
        ),
        Format(
            name="webm",
            mime_type="audio/webm; codecs=opus",
            extension="webm",
            container="webm",
            codec="libopus",
            bit_rate=28_000,
            codec_options={"frame_duration": "40"},
            # No cues, no seeking back to fix sizes; a cluster every 100 ms at most.
            container_options={"live": "1", "cluster_time_limit": "100"},
            nominal_bps=32_000,
            kept=True,
        ),
        Format(
            name="aac",
            mime_type="audio/aac",
            extension="aac",
            container="adts",
            codec="aac",
            bit_rate=48_000,
            priming_samples=1024,
            nominal_bps=48_000,
            kept=True,
        ),
        Format(
            name="flac",
            mime_type="audio/flac",
            extension="flac",
            container="flac",
            codec="flac",
            nominal_bps=SAMPLE_RATE * 16,
        ),
        Format(
            name="wav",
            mime_type="audio/wav",
            extension="wav",
            sample="s16le",
            riff=True,
            nominal_bps=SAMPLE_RATE * 16,
        ),
        Format(
            name="pcm",
            mime_type=_pcm_mime(SAMPLE_RATE, "s16le"),
            extension="pcm",
            sample="s16le",
            nominal_bps=SAMPLE_RATE * 16,
        ),
    )
}

#: The base names, in the table's order (the formats every door lists first).
FORMAT_NAMES = tuple(FORMATS)
#: The families :func:`format_named` parses, as docs and errors name them.
FORMAT_FAMILIES = (
    "pcm_<rate>",
    "pcm_f32le_<rate>",
    "wav_<rate>",
    "ulaw_8000",
    "alaw_8000",
    "wav_ulaw_8000",
    "wav_alaw_8000",
    "mp3_22050_32",
    "mp3_24000_48",
    "mp3_44100_<kbps>",
    "opus_48000_<kbps>",
)
#: Every name a client may ask for, in a line (for error messages and ``--help``).
FORMAT_CHOICES = (
    ", ".join(FORMAT_NAMES + FORMAT_FAMILIES)
    + f" (rate: {', '.join(map(str, PCM_RATES))}; kbps: {', '.join(map(str, ENCODED_KBPS))})"
)

_FAMILY_NAME = re.compile(
    r"(?P<family>pcm_f32le|pcm|wav_ulaw|wav_alaw|wav|ulaw|alaw)_(?P<rate>[1-9][0-9]{3,4})"
    r"|(?P<codec>mp3|opus)_(?P<codec_rate>[1-9][0-9]{3,4})_(?P<kbps>[1-9][0-9]{1,2})",
    re.ASCII,
)


def format_named(name: str) -> Format | None:
    """The format called ``name``: a base name, or a family's (``pcm_16000``); else ``None``.

    Args:
        name: What a client asked for.

    Returns:
        The format (the same object for the same name), or ``None`` if no format has
        that name, a rate or bit rate its family lacks included.
    """
    found = FORMATS.get(name)
    if found is not None:
        return found
    match = _FAMILY_NAME.fullmatch(name)
    if match is None:
        return None
    if match["family"] is not None:
        family, rate = match["family"], int(match["rate"])
        if family in ("ulaw", "alaw"):
            return _g711(family) if rate == G711_RATE else None
        if family in ("wav_ulaw", "wav_alaw"):
            return _g711(family.removeprefix("wav_"), riff=True) if rate == G711_RATE else None
        return _sampled(family, rate) if rate in PCM_RATES else None
    codec, rate, kbps = match["codec"], int(match["codec_rate"]), int(match["kbps"])
    if codec == "opus":
        return _opus(kbps) if rate == OPUS_RATE and kbps in ENCODED_KBPS else None
    if (rate == 44100 and kbps in ENCODED_KBPS) or (rate, kbps) in _OTHER_MP3:
        return _mp3(rate, kbps)
    return None


# One Format per valid name, made at its first use: only names checked above reach
# these, so the caches hold at most as many as there are names.


@functools.cache
def _sampled(family: str, rate: int) -> Format:
    """``pcm_<rate>``, ``pcm_f32le_<rate>`` or ``wav_<rate>``."""
    if rate == SAMPLE_RATE and family in ("pcm", "wav"):
        return FORMATS[family]
    sample: SampleEncoding = "f32le" if family == "pcm_f32le" else "s16le"
    bits = _SAMPLE_BYTES[sample] * 8
    if family == "wav":
        return Format(
            name=f"wav_{rate}",
            mime_type="audio/wav",
            extension="wav",
            sample_rate=rate,
            sample=sample,
            riff=True,
            nominal_bps=rate * bits,
        )
    return Format(
        name=f"{family}_{rate}",
        mime_type=_pcm_mime(rate, sample),
        extension="pcm",
        sample_rate=rate,
        sample=sample,
        nominal_bps=rate * bits,
    )


@functools.cache
def _g711(law: str, *, riff: bool = False) -> Format:
    """``ulaw_8000`` or ``alaw_8000``: G.711's bytes, no header (RFC 4856's types);
    ``riff``: ``wav_ulaw_8000`` or ``wav_alaw_8000``, after a WAVE header saying so."""
    mulaw = law == "ulaw"
    return Format(
        name=f"wav_{law}_{G711_RATE}" if riff else f"{law}_{G711_RATE}",
        mime_type="audio/wav" if riff else f"audio/{'PCMU' if mulaw else 'PCMA'};rate={G711_RATE}",
        extension="wav" if riff else "ul" if mulaw else "al",
        riff=riff,
        sample_rate=G711_RATE,
        sample="mulaw" if mulaw else "alaw",
        codec="pcm_mulaw" if mulaw else "pcm_alaw",
        nominal_bps=G711_RATE * 8,
    )


@functools.cache
def _mp3(rate: int, kbps: int) -> Format:
    """``mp3_<rate>_<kbps>``: LAME's frames as they come (no ID3 tag, no LAME tag)."""
    if (rate, kbps) == (SAMPLE_RATE, MP3_24KHZ_48KBPS.bitrate_bps // 1000):
        return MP3
    return Format(
        name=f"mp3_{rate}_{kbps}",
        mime_type=MP3.mime_type,
        extension="mp3",
        sample_rate=rate,
        codec="libmp3lame",
        bit_rate=kbps * 1000,
        priming_samples=LAME_DELAY_SAMPLES,
        nominal_bps=kbps * 1000,
        kept=True,
    )


@functools.cache
def _opus(kbps: int) -> Format:
    """``opus_48000_<kbps>``: Ogg Opus encoded from 48 kHz, as ``opus`` is streamed."""
    return Format(
        name=f"opus_{OPUS_RATE}_{kbps}",
        mime_type="audio/ogg; codecs=opus",
        extension="opus",
        sample_rate=OPUS_RATE,
        container="ogg",
        codec="libopus",
        bit_rate=kbps * 1000,
        codec_options={"frame_duration": "40"},
        container_options={"page_duration": "20000"},
        nominal_bps=kbps * 1000 + _OGG_PAGE_BPS,
        kept=True,
    )


def format_for_path(path: str) -> Format | None:
    """The format a file name's extension asks for (``.ogg`` is Opus), or ``None``."""
    suffix = PurePath(path).suffix.lower().lstrip(".")
    if suffix == "ogg":
        suffix = "opus"
    return FORMATS.get(suffix)


def wav_header(sample_rate: int = SAMPLE_RATE, sample: SampleEncoding = "s16le") -> bytes:
    """A RIFF WAVE header for mono samples of unknown length, so it can stream.

    Both sizes are 0xFFFFFFFF, which players read as "until the end of the file".

    Args:
        sample_rate: The samples' rate, Hz.
        sample: What a sample is: 16-bit PCM (the 44-byte header), or G.711 μ-law or
            A-law (WAVE_FORMAT_MULAW 7, WAVE_FORMAT_ALAW 6: 8 bits, with the 18-byte
            ``fmt`` chunk a format other than PCM has, as FFmpeg writes it).

    Returns:
        The bytes that come before the samples.
    """
    unknown = 0xFFFFFFFF
    if sample in ("mulaw", "alaw"):
        tag = 7 if sample == "mulaw" else 6
        fmt = struct.pack("<IHHIIHHH", 18, tag, 1, sample_rate, sample_rate, 1, 8, 0)
    else:
        size = _SAMPLE_BYTES[sample]
        tag = 3 if sample == "f32le" else 1
        fmt = struct.pack("<IHHIIHH", 16, tag, 1, sample_rate, sample_rate * size, size, size * 8)
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + fmt
        + b"data"
        + struct.pack("<I", unknown)
    )
