"""Formats at their own rates: pcm_<rate>, pcm_f32le_<rate>, wav_<rate>, G.711, LAME's
MP3 and Opus at 48 kHz, parsed by name and made as the MP3 streams, on both doors.

Every output is decoded by PyAV's demuxers and decoders (G.711 by its pcm_mulaw
and pcm_alaw decoders), independent of the encoders' settings, and compared with
a decode of the source MP3: its length in samples at the stated rate, where each
word's sound starts, and its samples.
"""

from __future__ import annotations

import array
import io
import math
import struct
from typing import Any

import aiohttp
import av
import pytest

from tests.conftest import Client, ServerFactory, connected, speaks_fine, wait_for_entries
from tests.fake_edge import FakeEdge, tone_frames
from ttsstream.audio import transcode
from ttsstream.audio.formats import (
    ENCODED_KBPS,
    FORMATS,
    LAME_DELAY_SAMPLES,
    MP3,
    PCM_RATES,
    SAMPLE_RATE,
    Format,
    format_named,
    wav_header,
)
from ttsstream.audio.transcode import Pipe, Transcoder
from ttsstream.core.fields import format_field
from ttsstream.engines.base import AudioChunk
from ttsstream.exceptions import InvalidParameter, UnsupportedFormat
from ttsstream.server import Server

TEXT = "Formats stream as they are made, word after word after word."
#: Every name of every new family (a family name at the source's rate is a base format).
FAMILY_NAMES = [
    *(f"pcm_{rate}" for rate in PCM_RATES),
    *(f"pcm_f32le_{rate}" for rate in PCM_RATES),
    *(f"wav_{rate}" for rate in PCM_RATES),
    "ulaw_8000",
    "alaw_8000",
    "wav_ulaw_8000",
    "wav_alaw_8000",
    "mp3_22050_32",
    "mp3_24000_48",
    *(f"mp3_44100_{kbps}" for kbps in ENCODED_KBPS),
    *(f"opus_48000_{kbps}" for kbps in ENCODED_KBPS),
]
#: The names heard through the server: every rate of each sampled family, every
#: encoded one but some bit rates (they differ by a number given to the encoder).
SERVED = [
    *(f"pcm_{rate}" for rate in PCM_RATES),
    *(f"pcm_f32le_{rate}" for rate in (8000, 16000, 44100)),
    *(f"wav_{rate}" for rate in (8000, 22050, 48000)),
    "ulaw_8000",
    "alaw_8000",
    "wav_ulaw_8000",
    "wav_alaw_8000",
    "mp3_22050_32",
    "mp3_44100_32",
    "mp3_44100_192",
    "opus_48000_32",
    "opus_48000_192",
]
#: How far a decoded stream's length (less its priming) may be from the MP3's, ms.
DURATION_SLACK_MS = 30
#: How far a word's sound may start from its offset, ms (5 ms analysis windows).
ONSET_SLACK_MS = 30
_DEMUXERS = {"audio/mpeg": "mp3", "audio/ogg; codecs=opus": "ogg", "audio/wav": "wav"}


def named(name: str) -> Format:
    found = format_named(name)
    assert found is not None, name
    return found


def decode_as(target: Format, data: bytes) -> tuple[array.array[int], int]:
    """``data`` in ``target`` decoded to 16-bit mono samples, and the rate they play at."""
    samples = array.array("h")
    if target.sample in ("s16le", "f32le") and not target.riff:
        if target.sample == "s16le":
            return array.array("h", data), target.sample_rate
        floats = array.array("f", data)
        samples.extend(round(max(-1.0, min(1.0, f)) * 32767) for f in floats)
        return samples, target.sample_rate
    if target.sample in ("mulaw", "alaw") and not target.riff:
        decoder: Any = av.CodecContext.create(f"pcm_{target.sample}", "r")
        decoder.sample_rate = target.sample_rate
        decoder.layout = "mono"
        for frame in decoder.decode(av.Packet(data)):
            samples.frombytes(bytes(frame.planes[0])[: frame.samples * 2])
        return samples, decoder.sample_rate
    with av.open(io.BytesIO(data), "r", format=_DEMUXERS[target.mime_type]) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.channels == 1, "mono"
        rate = stream.codec_context.sample_rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in container.decode(stream):
            for ready in resampler.resample(frame):
                samples.frombytes(bytes(ready.planes[0])[: ready.samples * 2])
    return samples, rate


def rms(samples: array.array[int]) -> float:
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


def onset_ms(samples: array.array[int], rate: int, after_ms: float) -> float:
    """Where sound starts (5 ms windows over a threshold) from ``after_ms`` on."""
    window = rate // 200
    start = max(0, int(after_ms * rate / 1000))
    for i in range(start, len(samples) - window, max(1, window // 5)):
        if rms(samples[i : i + window]) > 1500:
            return i * 1000 / rate
    raise AssertionError(f"no sound after {after_ms} ms")


def click_pcm(rate: int, seconds: float, at_s: float) -> bytes:
    """Silence with one short click (a half sine, 1 ms) centred at ``at_s``."""
    samples = array.array("h", bytes(2 * int(rate * seconds)))
    width = rate // 1000
    first = round(at_s * rate) - width // 2
    for k in range(width):
        samples[first + k] = int(20000 * math.sin(math.pi * (k + 0.5) / width))
    return samples.tobytes()


def peak_ms(samples: array.array[int], rate: int) -> float:
    peak = max(range(len(samples)), key=lambda i: abs(samples[i]))
    return peak * 1000 / rate


def http_of(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


# The names (pure)


@pytest.mark.parametrize(
    ("name", "rate", "sample", "mime_type", "kept"),
    [
        ("pcm_16000", 16000, "s16le", "audio/pcm;rate=16000;encoding=signed-int;bits=16", False),
        ("pcm_8000", 8000, "s16le", "audio/pcm;rate=8000;encoding=signed-int;bits=16", False),
        ("pcm_f32le_44100", 44100, "f32le", "audio/pcm;rate=44100;encoding=float;bits=32", False),
        ("wav_22050", 22050, "s16le", "audio/wav", False),
        ("ulaw_8000", 8000, "mulaw", "audio/PCMU;rate=8000", False),
        ("alaw_8000", 8000, "alaw", "audio/PCMA;rate=8000", False),
        ("wav_ulaw_8000", 8000, "mulaw", "audio/wav", False),
        ("mp3_22050_32", 22050, None, "audio/mpeg", True),
        ("mp3_44100_128", 44100, None, "audio/mpeg", True),
        ("opus_48000_64", 48000, None, "audio/ogg; codecs=opus", True),
    ],
)
def test_format_named_parses_each_family(
    name: str, rate: int, sample: str | None, mime_type: str, kept: bool
) -> None:
    """A family name gives a format of that name, rate, sample and MIME type, which
    ``start`` and ``Content-Type`` say, stored only if it is encoded."""
    found = named(name)
    assert (found.name, found.sample_rate, found.sample, found.mime_type, found.kept) == (
        name,
        rate,
        sample,
        mime_type,
        kept,
    )
    assert found.audio_format.sample_rate == rate and found.audio_format.name == name
    assert found.transcoded
    assert format_named(name) is found, "one object per name"


def test_every_family_name_parses_to_itself() -> None:
    """Each of the 40 family names is a format of that name (or, at the source's rate
    and sample, the base format it equals)."""
    aliases = {"pcm_24000": "pcm", "wav_24000": "wav", "mp3_24000_48": "mp3"}
    for name in FAMILY_NAMES:
        assert named(name).name == aliases.get(name, name)


def test_family_names_at_the_source_rate_are_the_base_formats() -> None:
    """``pcm_24000`` is ``pcm`` (the same bytes), ``wav_24000`` is ``wav``, and
    ``mp3_24000_48`` is the source untouched, never transcoded."""
    assert format_named("pcm_24000") is FORMATS["pcm"]
    assert format_named("wav_24000") is FORMATS["wav"]
    assert format_named("mp3_24000_48") is MP3
    assert not MP3.transcoded
    assert named("pcm_f32le_24000").sample_rate == SAMPLE_RATE


@pytest.mark.parametrize(
    "name",
    [
        "pcm_12345",
        "pcm_016000",
        "pcm_160000",
        "pcm_",
        "pcm_f32le",
        "PCM_16000",
        "pcm_16000 ",
        "pcm_١٦٠٠٠",
        "wav_11025",
        "ulaw_16000",
        "alaw_44100",
        "mp3_44100_48",
        "mp3_22050_64",
        "mp3_48000_128",
        "mp3_44100",
        "opus_24000_64",
        "opus_48000_48",
        "opus_48000_064",
        "flac_16000",
    ],
)
def test_format_named_refuses_what_no_family_has(name: str) -> None:
    """A rate or bit rate a family lacks, a malformed name, or a family that does not
    exist names no format."""
    assert format_named(name) is None


def test_the_error_for_an_unknown_format_lists_the_families() -> None:
    """``format_field`` refuses ``pcm_12345`` with the door's error, naming the families
    and their rates in one short line rather than every name."""
    with pytest.raises(InvalidParameter) as refused:
        format_field("pcm_12345")
    message = str(refused.value)
    assert refused.value.param == "format"
    for part in ("pcm_<rate>", "pcm_f32le_<rate>", "ulaw_8000", "mp3_44100_<kbps>", "16000"):
        assert part in message
    assert "pcm_16000" not in message and len(message) < 400
    with pytest.raises(UnsupportedFormat):
        format_field("pcm_12345", unknown=UnsupportedFormat)
    assert format_field("ulaw_8000") is format_named("ulaw_8000")


# The transcoder alone


@pytest.mark.parametrize("rate", PCM_RATES)
def test_resampling_keeps_time_and_every_sample(rate: int) -> None:
    """A click fed at 24 kHz is heard at the same time in ``pcm_<rate>`` (within its
    peak's sample: the resampler adds no delay), and one second of source makes exactly one
    second of samples once flushed."""
    transcoder = Transcoder(named(f"pcm_{rate}"))
    made = transcoder.feed_pcm(click_pcm(SAMPLE_RATE, 1.0, 0.5), SAMPLE_RATE)
    made += transcoder.finish()
    samples = array.array("h", made)
    assert len(samples) == rate
    assert abs(peak_ms(samples, rate) - 500) <= 1.5 * 1000 / rate
    assert transcoder.duration_ms == pytest.approx(1000)


@pytest.mark.parametrize("name", ["mp3_22050_32", "mp3_44100_32", "mp3_44100_192"])
def test_lames_delay_is_the_priming_that_moves_the_words(name: str) -> None:
    """A click fed to LAME's MP3 is heard LAME_DELAY_SAMPLES later (within its peak's sample),
    which is the format's priming, by which its words move; ``duration_ms`` is what a
    decoder plays."""
    target = named(name)
    transcoder = Transcoder(target)
    made = transcoder.feed_pcm(click_pcm(SAMPLE_RATE, 1.0, 0.5), SAMPLE_RATE)
    made += transcoder.finish()
    samples, rate = decode_as(target, made)
    assert rate == target.sample_rate
    assert target.priming_samples == LAME_DELAY_SAMPLES
    delay_ms = peak_ms(samples, rate) - 500
    assert abs(delay_ms - target.priming_ms) <= 1.5 * 1000 / rate, (delay_ms, target.priming_ms)
    assert transcoder.duration_ms == pytest.approx(len(samples) * 1000 / rate)


def test_g711_is_the_pcm_of_its_rate_companded() -> None:
    """μ-law and A-law decode (by their own decoders, not each other's) to the samples
    of ``pcm_8000`` within G.711's quantisation, one byte per sample."""
    mp3 = tone_frames(100)
    pcm = array.array("h", transcode_whole("pcm_8000", mp3))
    for law in ("ulaw_8000", "alaw_8000"):
        made = transcode_whole(law, mp3)
        assert len(made) == len(pcm)
        samples, rate = decode_as(named(law), made)
        assert rate == 8000 and len(samples) == len(pcm)
        error = array.array("h", (a - b for a, b in zip(samples, pcm, strict=True)))
        assert rms(error) < 0.05 * rms(pcm), law
    # In WAVE (Azure's riff-8khz-8bit-mono-mulaw): a header saying so, then those bytes.
    for law in ("ulaw", "alaw"):
        raw = transcode_whole(f"{law}_8000", mp3)
        made = transcode_whole(f"wav_{law}_8000", mp3)
        assert made[:4] == b"RIFF" and made[8:16] == b"WAVEfmt "
        tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", made[20:36])
        assert (tag, channels, rate, byte_rate, align, bits) == (
            7 if law == "ulaw" else 6,
            1,
            8000,
            8000,
            1,
            8,
        )
        assert made.endswith(raw) and made[-len(raw) - 8 : -len(raw) - 4] == b"data"
        samples, rate = decode_as(named(f"wav_{law}_8000"), made)
        assert rate == 8000 and len(samples) == len(pcm)
    # Read with the other law's decoder, the bytes are not that audio.
    wrong, _ = decode_as(named("alaw_8000"), transcode_whole("ulaw_8000", mp3))
    error = array.array("h", (a - b for a, b in zip(wrong, pcm, strict=True)))
    assert rms(error) > 0.5 * rms(pcm)


def test_f32le_is_the_pcm_of_its_rate_as_floats() -> None:
    """``pcm_f32le_16000`` holds the samples of ``pcm_16000`` as floats (four bytes each)."""
    mp3 = tone_frames(100)
    pcm = array.array("h", transcode_whole("pcm_16000", mp3))
    floats = array.array("f", transcode_whole("pcm_f32le_16000", mp3))
    assert len(floats) == len(pcm)
    assert max(abs(f * 32768 - s) for f, s in zip(floats, pcm, strict=True)) <= 1.01


def test_a_wav_at_a_rate_says_that_rate() -> None:
    """``wav_16000`` begins with a streaming WAV header at 16 kHz (byte rate 32,000)
    that an independent demuxer reads, then the samples of ``pcm_16000``."""
    mp3 = tone_frames(100)
    made = transcode_whole("wav_16000", mp3)
    assert made[:4] == b"RIFF" and made[4:8] == b"\xff\xff\xff\xff"
    assert int.from_bytes(made[24:28], "little") == 16000
    assert int.from_bytes(made[28:32], "little") == 32000
    assert made[44:] == transcode_whole("pcm_16000", mp3)
    samples, rate = decode_as(named("wav_16000"), made)
    assert rate == 16000 and samples == array.array("h", made[44:])


def transcode_whole(name: str, mp3: bytes, chunk: int = 2880) -> bytes:
    transcoder = Transcoder(named(name))
    pieces = [transcoder.feed_mp3(mp3[i : i + chunk]) for i in range(0, len(mp3), chunk)]
    return b"".join(pieces) + transcoder.finish()


@pytest.mark.parametrize("name", SERVED)
async def test_a_pipe_knows_the_playing_time_of_what_it_sent(name: str) -> None:
    """``Pipe.duration_ms`` is the playing time of the bytes sent (bytes per sample
    and rate for the formats sent as samples), and bytes leave with every chunk."""
    target = named(name)
    pipe = await Pipe.open(target, MP3.audio_format)
    mp3 = tone_frames(200)
    sent = b""
    sizes = []
    for offset in range(0, len(mp3), 576):
        made = bytes(await pipe.feed(AudioChunk(mp3[offset : offset + 576])))
        sizes.append(len(made))
        sent += made
    sent += await pipe.finish()
    pipe.close()
    samples, rate = decode_as(target, sent)
    assert abs(pipe.duration_ms(len(sent)) - len(samples) * 1000 / rate) < 1, name
    if target.sample is not None:
        header = len(wav_header(target.sample_rate, target.sample)) if target.riff else 0
        assert target.bytes_per_sample is not None
        played_ms = (len(sent) - header) / target.bytes_per_sample * 1000 / target.sample_rate
        assert pipe.duration_ms(len(sent)) == pytest.approx(played_ms)
    assert sum(1 for size in sizes if size) >= len(sizes) - 3
    assert transcode.open_transcoders == 0


# Through the server


async def speak_as(client: Client, name: str, id: str, **fields: Any) -> Any:
    await client.speak(TEXT, id=id, format=name, **{"words": "batch", **fields})
    return await client.until_final(id)


async def test_every_rate_over_the_websocket_plays_as_long_with_words_where_heard(
    server: Server, fake: FakeEdge
) -> None:
    """``start`` names each format and its own rate; decoded at that rate it lasts as
    long as the MP3 (within 30 ms, less LAME's priming), PCM to the sample; ``end``
    says so; the words' offsets are the MP3's (moved by LAME's priming) and each is
    where its sound starts."""
    fake.voiced = True
    async with connected(server) as client:
        mp3 = await speak_as(client, "mp3", "u-mp3")
        mp3_samples, _ = decode_as(MP3, bytes(mp3.audio))
        mp3_ms = len(mp3_samples) * 1000 / SAMPLE_RATE
        mp3_offsets = [word["offset_ms"] for word in mp3.batched_words]
        for name in SERVED:
            target = named(name)
            result = await speak_as(client, name, f"u-{name}")
            start, end = result.messages[0], result.final
            assert end["type"] == "end", (name, end)
            # pcm_24000 is pcm: start names it so.
            assert (start["format"], start["format_name"], start["sample_rate"]) == (
                target.mime_type,
                target.name,
                target.sample_rate,
            )
            samples, rate = decode_as(target, bytes(result.audio))
            assert rate == target.sample_rate, name
            heard_ms = len(samples) * 1000 / rate
            assert abs(heard_ms - target.priming_ms - mp3_ms) < DURATION_SLACK_MS, (name, heard_ms)
            assert abs(end["audio_ms"] - heard_ms) < DURATION_SLACK_MS, (name, end, heard_ms)
            if target.sample is not None:
                # Plays at the right speed: as many samples as the MP3's at this rate.
                assert abs(len(samples) - len(mp3_samples) * rate / SAMPLE_RATE) <= 1, name
            offsets = [word["offset_ms"] for word in result.batched_words]
            # Offsets are sent to the microsecond.
            shifted = [offset + target.priming_ms for offset in mp3_offsets]
            assert offsets == pytest.approx(shifted, abs=0.001), name
            for offset in offsets:
                heard = onset_ms(samples, rate, offset - 25)
                assert abs(heard - offset) < ONSET_SLACK_MS, (name, offset, heard)
        await speaks_fine(client)
    assert transcode.open_transcoders == 0


async def test_rates_on_http(server: Server, fake: FakeEdge) -> None:
    """``GET /tts?format=ulaw_8000`` (and ``alaw_8000``, ``wav_16000``, ``pcm_16000``,
    ``mp3_44100_64``) and OpenAI's ``response_format`` answer with the format's own
    MIME type and audio as long as the MP3's."""
    fake.tone = True
    url = http_of(server) + "/tts"
    async with aiohttp.ClientSession() as session:
        async with session.get(url, params={"text": TEXT}) as response:
            mp3_samples, _ = decode_as(MP3, await response.read())
        mp3_ms = len(mp3_samples) * 1000 / SAMPLE_RATE
        for name in (
            "ulaw_8000",
            "alaw_8000",
            "wav_ulaw_8000",
            "wav_16000",
            "pcm_16000",
            "mp3_44100_64",
        ):
            target = named(name)
            async with session.get(url, params={"text": TEXT, "format": name}) as response:
                assert response.status == 200, name
                assert response.headers["Content-Type"] == target.mime_type
                samples, rate = decode_as(target, await response.read())
            assert rate == target.sample_rate and rms(samples) > 1000, name
            heard_ms = len(samples) * 1000 / rate
            assert abs(heard_ms - target.priming_ms - mp3_ms) < DURATION_SLACK_MS, name
        speech = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": "pcm_16000"}
        async with session.post(http_of(server) + "/v1/audio/speech", json=speech) as response:
            assert response.headers["Content-Type"] == named("pcm_16000").mime_type
            samples = array.array("h", await response.read())
        assert abs(len(samples) - len(mp3_samples) * 16000 / SAMPLE_RATE) <= 1


async def test_an_unknown_rate_is_refused_on_both_doors(server: Server) -> None:
    """``pcm_12345`` is refused as any unknown format is (WebSocket ``invalid_parameter``,
    HTTP 400 ``unsupported_format``), with the families in the message."""
    async with connected(server) as client:
        await client.speak(TEXT, id="bad", format="pcm_12345")
        error = (await client.until_final("bad")).final
        assert error["code"] == "invalid_parameter" and "pcm_<rate>" in error["message"]
        await speaks_fine(client)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            http_of(server) + "/tts", params={"text": TEXT, "format": "pcm_12345"}
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"] == "unsupported_format"


async def test_encoded_rates_are_stored_and_sampled_ones_made_each_time(
    server: Server, fake: FakeEdge
) -> None:
    """LAME's MP3 and Opus at 48 kHz sent whole are stored beside the MP3 and replayed as
    they were sent, words moved by the priming as before; PCM, WAV and G.711 at any rate
    are never stored."""
    fake.tone = True
    async with connected(server) as client:
        await speak_as(client, "mp3", "first")
        await wait_for_entries(server, 1)
        for name in ("pcm_16000", "pcm_f32le_8000", "wav_8000", "ulaw_8000", "alaw_8000"):
            assert (await speak_as(client, name, name)).final["type"] == "end"
        made = {}
        for count, name in enumerate(("mp3_44100_128", "opus_48000_64"), start=2):
            made[name] = await speak_as(client, name, name)
            await wait_for_entries(server, count)
        for name, first in made.items():
            again = await speak_as(client, name, f"{name}-again")
            assert again.messages[0]["cached"] is True
            assert bytes(again.audio) == bytes(first.audio)
            assert again.batched_words == first.batched_words
            assert again.final["audio_ms"] == pytest.approx(first.final["audio_ms"], abs=0.1)
    assert len(fake.records) == 1
    assert sorted(path.name.split(".")[0][64:] for path in server_entries(server)) == [
        "",
        "-mp3_44100_128",
        "-opus_48000_64",
    ]


def server_entries(server: Server) -> list[Any]:
    return sorted(server.config.cache_dir.glob("*/*.tts"))


async def test_the_offline_voice_speaks_at_telephone_rates(start_server: ServerFactory) -> None:
    """The offline voice, in ``pcm_8000`` and ``ulaw_8000`` (made from eSpeak's 22,050 Hz
    PCM straight to 8 kHz), lasts as long as its MP3 with its words where they were."""
    server = await start_server()
    async with connected(server) as client:
        mp3 = await speak_as(client, "mp3", "o-mp3", voice="espeak:en")
        mp3_samples, _ = decode_as(MP3, bytes(mp3.audio))
        mp3_ms = len(mp3_samples) * 1000 / SAMPLE_RATE
        for name in ("pcm_8000", "ulaw_8000"):
            target = named(name)
            result = await speak_as(client, name, f"o-{name}", voice="espeak:en")
            assert result.final["type"] == "end", (name, result.final)
            start = result.messages[0]
            assert start["engine"] == "espeak" and start["sample_rate"] == 8000
            samples, rate = decode_as(target, bytes(result.audio))
            assert rate == 8000 and rms(samples) > 300, name
            heard_ms = len(samples) * 1000 / rate
            assert abs(heard_ms - mp3_ms) < DURATION_SLACK_MS, (name, heard_ms, mp3_ms)
            assert abs(result.final["audio_ms"] - heard_ms) < 1, name
            # eSpeak's own timing varies by some milliseconds between runs.
            offsets = [word["offset_ms"] for word in result.batched_words]
            assert offsets == pytest.approx(
                [w["offset_ms"] for w in mp3.batched_words], abs=ONSET_SLACK_MS
            )
            first = mp3.batched_words[0]["offset_ms"]
            assert (
                abs(
                    onset_ms(samples, rate, first - 40)
                    - onset_ms(mp3_samples, SAMPLE_RATE, first - 40)
                )
                < 15
            ), name
