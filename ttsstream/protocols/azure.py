"""Azure Speech's REST contract, as far as Edge can serve it (no I/O).

Apps written for Azure's text to speech send SSML to ``POST /cognitiveservices/v1``
with the format in ``X-Microsoft-OutputFormat`` and a key in
``Ocp-Apim-Subscription-Key`` (or a token from ``POST /sts/v1.0/issueToken`` as
``Authorization: Bearer``), and list voices with ``GET
/cognitiveservices/voices/list``. This module maps Azure's format names to
ttsstream's formats and writes the voice list and the errors in Azure's shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from ttsstream.audio.formats import Format, format_named
from ttsstream.engines.base import Voice
from ttsstream.exceptions import UnsupportedFormat

__all__ = ["DEFAULT_OUTPUT_FORMAT", "OUTPUT_FORMATS", "encode_voices", "output_format"]

#: Azure's output format names, and the ttsstream format each is served as (Edge's
#: own MP3 where Azure asks another MP3 rate: an MP3 decoder plays any).
OUTPUT_FORMATS = {
    "audio-16khz-32kbitrate-mono-mp3": "mp3",
    "audio-16khz-64kbitrate-mono-mp3": "mp3",
    "audio-16khz-128kbitrate-mono-mp3": "mp3",
    "audio-24khz-48kbitrate-mono-mp3": "mp3",
    "audio-24khz-96kbitrate-mono-mp3": "mp3",
    "audio-24khz-160kbitrate-mono-mp3": "mp3",
    "audio-48khz-96kbitrate-mono-mp3": "mp3_44100_96",
    "audio-48khz-192kbitrate-mono-mp3": "mp3_44100_192",
    "raw-8khz-8bit-mono-mulaw": "ulaw_8000",
    "raw-8khz-8bit-mono-alaw": "alaw_8000",
    "raw-8khz-16bit-mono-pcm": "pcm_8000",
    "raw-16khz-16bit-mono-pcm": "pcm_16000",
    "raw-22050hz-16bit-mono-pcm": "pcm_22050",
    "raw-24khz-16bit-mono-pcm": "pcm_24000",
    "raw-44100hz-16bit-mono-pcm": "pcm_44100",
    "raw-48khz-16bit-mono-pcm": "pcm_48000",
    "riff-8khz-16bit-mono-pcm": "wav_8000",
    "riff-16khz-16bit-mono-pcm": "wav_16000",
    "riff-22050hz-16bit-mono-pcm": "wav_22050",
    "riff-24khz-16bit-mono-pcm": "wav_24000",
    "riff-44100hz-16bit-mono-pcm": "wav_44100",
    "riff-48khz-16bit-mono-pcm": "wav_48000",
    "riff-8khz-8bit-mono-mulaw": "wav_ulaw_8000",
    "riff-8khz-8bit-mono-alaw": "wav_alaw_8000",
    "ogg-16khz-16bit-mono-opus": "opus",
    "ogg-24khz-16bit-mono-opus": "opus",
    "ogg-48khz-16bit-mono-opus": "opus",
    "webm-16khz-16bit-mono-opus": "webm",
    "webm-24khz-16bit-mono-opus": "webm",
    "webm-24khz-16bit-24kbps-mono-opus": "webm",
}
#: What a request without ``X-Microsoft-OutputFormat`` gets: Edge's own MP3.
DEFAULT_OUTPUT_FORMAT = "audio-24khz-48kbitrate-mono-mp3"


def output_format(name: str | None) -> Format:
    """The format an ``X-Microsoft-OutputFormat`` asks for (case-insensitive).

    Raises:
        UnsupportedFormat: Azure has no such format, or Edge cannot make it.
    """
    key = (name or DEFAULT_OUTPUT_FORMAT).strip().lower()
    found = OUTPUT_FORMATS.get(key)
    audio_format = format_named(found) if found is not None else None
    if audio_format is None:
        raise UnsupportedFormat(
            f"X-Microsoft-OutputFormat {name!r} is not one this server makes "
            f"(such as {DEFAULT_OUTPUT_FORMAT}, riff-24khz-16bit-mono-pcm, "
            "raw-16khz-16bit-mono-pcm, ogg-48khz-16bit-mono-opus)"
        )
    return audio_format


def encode_voices(voices: Sequence[Voice]) -> bytes:
    """The voice list in Azure's shape (``ShortName`` is what ``<voice name>`` takes)."""
    listed = []
    for voice in voices:
        short = voice.name
        display = short.rsplit("-", 1)[-1].removesuffix("Neural") if "-" in short else short
        listed.append(
            {
                "Name": (
                    f"Microsoft Server Speech Text to Speech Voice ({voice.locale}, "
                    f"{short.rsplit('-', 1)[-1]})"
                    if voice.engine == "edge"
                    else short
                ),
                "DisplayName": display,
                "LocalName": display,
                "ShortName": short,
                "Gender": voice.gender,
                "Locale": voice.locale,
                "LocaleName": voice.locale,
                "SampleRateHertz": "24000",
                "VoiceType": "Neural" if voice.engine == "edge" else "Standard",
                "Status": "GA",
            }
        )
    return orjson.dumps(listed)
