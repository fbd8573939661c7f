"""The audio formats the server sends, one table for every door (pure; no I/O).

Every engine produces the same source: 24 kHz mono MP3 at 48 kbit/s (Edge's
output; the offline voice encodes to it). ``mp3`` is that source untouched;
every other format is made from it as it streams (:mod:`ttsstream.audio.transcode`).

Every format keeps the source's timeline, so word offsets are the same in all
of them. The MP3 decoder's delay is part of that timeline (Edge's offsets
describe the MP3 as a decoder plays it) and carries into every format made from
its decoded samples. Opus signals its encoder's pre-skip in the stream (decoders
remove it); FLAC, WAV and PCM add nothing. ADTS AAC cannot signal the AAC
encoder's 1024 samples of priming, which every decoder plays before the source:
its word offsets move later by as much (``priming_samples``, 42.7 ms), and the
source's last partial frame (under 43 ms of its trailing silence) is dropped
rather than padded, so the audio is at most the priming longer than the MP3.
Dropping as many samples of the source's start instead would keep the offsets,
but the encoder would then need 128 ms of source before its first packet, one
upstream chunk more than the 85 ms it needs now.

What is kept of a format (``Format.kept``): only the encoded formats (Opus, WebM,
AAC) are stored beside the MP3 once made whole, and shared by identical requests
while they are made. They cost about 1 µs of CPU per MP3 byte to make and are no
bigger than the MP3. FLAC, WAV and PCM are made again for every request: decoding
costs a tenth of that (FLAC a fifth), and they are 2 to 8 times the MP3's size, so
keeping them would cost more disk and memory than making them costs CPU.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import PurePath

from ttsstream.engines.base import MP3_24KHZ_48KBPS, AudioFormat

__all__ = [
    "FORMATS",
    "FORMAT_NAMES",
    "MP3",
    "SAMPLE_RATE",
    "Format",
    "format_for_path",
    "format_named",
    "wav_header",
]

#: Every format's sample rate: the source's, never resampled.
SAMPLE_RATE = MP3_24KHZ_48KBPS.sample_rate


@dataclass(frozen=True, slots=True)
class Format:
    """One format the server can send."""

    #: The short name clients ask for (``format``, ``response_format``).
    name: str
    #: What is sent, as a MIME type (``start.format``, ``Content-Type``).
    mime_type: str
    #: The file name extension the CLI recognises.
    extension: str
    #: FFmpeg's muxer, or ``None`` when no encoder is needed (mp3, wav, pcm).
    container: str | None = None
    #: FFmpeg's encoder.
    codec: str | None = None
    #: The encoder's target bit rate, bit/s (``None``: lossless, or the codec's own).
    bit_rate: int | None = None
    #: Muxer options that make the container streamable.
    container_options: dict[str, str] = field(default_factory=dict)
    #: Encoder options.
    codec_options: dict[str, str] = field(default_factory=dict)
    #: Encoder priming that the container cannot signal and every decoder plays before
    #: the source: word offsets in this format move later by as much.
    priming_samples: int = 0
    #: Nominal bit rate of what is sent, bit/s.
    nominal_bps: int = 0
    #: Whether an utterance made whole in this format is stored beside the MP3 (on this
    #: instance's disk only), and made once for identical requests that overlap.
    kept: bool = False

    @property
    def priming_ms(self) -> float:
        """How much later every word is heard in this format than in the MP3."""
        return self.priming_samples * 1000 / SAMPLE_RATE

    @property
    def transcoded(self) -> bool:
        """Whether the source is decoded to make it (every format but mp3)."""
        return self.name != "mp3"

    @property
    def audio_format(self) -> AudioFormat:
        """The format as the rest of the server names a stream's encoding."""
        return AudioFormat(
            mime_type=self.mime_type,
            sample_rate=SAMPLE_RATE,
            bitrate_bps=self.nominal_bps,
            name=self.name,
        )


MP3 = Format(
    name="mp3",
    mime_type=MP3_24KHZ_48KBPS.mime_type,
    extension="mp3",
    nominal_bps=MP3_24KHZ_48KBPS.bitrate_bps,
)

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
        Format(name="wav", mime_type="audio/wav", extension="wav", nominal_bps=SAMPLE_RATE * 16),
        Format(
            name="pcm",
            mime_type=f"audio/pcm;rate={SAMPLE_RATE};encoding=signed-int;bits=16",
            extension="pcm",
            nominal_bps=SAMPLE_RATE * 16,
        ),
    )
}

#: The short names, in the table's order (for error messages and docs).
FORMAT_NAMES = tuple(FORMATS)


def format_named(name: str) -> Format | None:
    """The format called ``name``, or ``None``."""
    return FORMATS.get(name)


def format_for_path(path: str) -> Format | None:
    """The format a file name's extension asks for (``.ogg`` is Opus), or ``None``."""
    suffix = PurePath(path).suffix.lower().lstrip(".")
    if suffix == "ogg":
        suffix = "opus"
    return FORMATS.get(suffix)


def wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A RIFF WAVE header for 16-bit mono PCM of unknown length, so it can stream.

    Both sizes are 0xFFFFFFFF, which players read as "until the end of the file".
    """
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )
