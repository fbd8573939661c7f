"""A protocol-faithful fake of Microsoft Edge's Read Aloud service, on 127.0.0.1.

The real ``edge-tts`` client reaches it through ``EDGE_WSS_URL``/``EDGE_VOICES_URL``.
It checks what edge-tts sends (``speech.config`` then ``ssml``, each a text frame of
CRLF headers, a blank line and a body; the DRM query parameters) and answers as the
service does (see ``edge_tts/communicate.py``):

- text ``Path:turn.start``;
- text ``Path:audio.metadata`` with one ``WordBoundary`` per word (XML-escaped text,
  times in 100 ns ticks), each sent ahead of the audio it describes;
- binary audio frames: 2-byte big-endian header length, CRLF-terminated headers
  (``Path:audio`` and ``Content-Type:audio/mpeg``, not first), then MP3 bytes; a
  last audio frame with no Content-Type and no data;
- text ``Path:turn.end``;

and closes the connection without audio for a voice that is not on its list.

The audio is real MPEG-2 Layer III at 24 kHz, mono, 48 kbit/s (silent frames that
carry a counter in their ancillary bytes, so every frame differs), so its byte
rate matches the real service's exactly (6 bytes per millisecond).

Faults for tests: refuse the handshake with any status, delay the first audio,
pause (deaf to the client for a while, so that its closing waits) or stall
mid-stream, drop the connection mid-stream, send no audio.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import email.utils
import functools
import http
import itertools
import json
import math
import string
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = [
    "CORRUPT_FRAME",
    "FRAME_BYTES",
    "FRAME_MS",
    "FakeEdge",
    "SynthesisRecord",
    "mp3_frames",
    "serve_forever",
    "spoken_words",
    "voiced_frames",
]

TOKEN = "6A5AA1D4EAFF4E9FB37E23D68491D6F4"
WSS_PATH = "/consumer/speech/synthesize/readaloud/edge/v1"
VOICES_PATH = "/consumer/speech/synthesize/readaloud/voices/list"
TICKS_PER_MS = 10_000

# MPEG-2 Layer III, 24 kHz, mono, 48 kbit/s: 576 samples (24 ms) in 144 bytes.
FRAME_MS = 24
FRAME_BYTES = 144
_FRAME_HEADER = bytes([0xFF, 0xF3, 0x64, 0xC0])  # sync, MPEG-2, L3, no CRC; 48k, 24kHz; mono
_SIDE_INFO_BYTES = 9  # all zero: no main data, so the frame decodes to silence

#: Leading silence before the first word, and timing of the words, in milliseconds.
LEAD_MS = 100
WORD_BASE_MS = 120
WORD_PER_CHAR_MS = 45
WORD_GAP_MS = 30
TAIL_MS = 250

VOICES = [
    {
        "Name": f"Microsoft Server Speech Text to Speech Voice ({locale}, {short})",
        "ShortName": f"{locale}-{short}",
        "Gender": gender,
        "Locale": locale,
        "SuggestedCodec": "audio-24khz-48kbitrate-mono-mp3",
        "FriendlyName": f"Microsoft {short} Online (Natural) - {locale}",
        "Status": "GA",
        "VoiceTag": {"ContentCategories": ["General"], "VoicePersonalities": ["Friendly"]},
    }
    for locale, short, gender in [
        ("en-US", "EmmaMultilingualNeural", "Female"),
        ("en-US", "AriaNeural", "Female"),
        ("en-US", "GuyNeural", "Male"),
        ("fr-FR", "DeniseNeural", "Female"),
        ("de-DE", "ConradNeural", "Male"),
        # The voices OpenAI's names map to by default (the real list has them too).
        ("en-US", "AvaNeural", "Female"),
        ("en-US", "AndrewNeural", "Male"),
        ("en-GB", "RyanNeural", "Male"),
        ("en-US", "EmmaNeural", "Female"),
        ("en-US", "BrianNeural", "Male"),
        ("en-GB", "SoniaNeural", "Female"),
        ("en-US", "ChristopherNeural", "Male"),
        ("en-US", "JennyNeural", "Female"),
        ("en-US", "MichelleNeural", "Female"),
        ("en-US", "AvaMultilingualNeural", "Female"),
        ("en-US", "AndrewMultilingualNeural", "Male"),
    ]
]


@functools.cache
def _tone() -> bytes:
    """A minute of an audible two-tone sound, encoded by LAME in the Edge format."""

    rate = 24_000
    samples = array.array(
        "h",
        (
            int(9000 * math.sin(2 * math.pi * (440 if (i // 6000) % 2 else 330) * i / rate))
            for i in range(rate * 60)
        ),
    )
    audio = _lame(samples.tobytes())
    assert len(audio) % FRAME_BYTES == 0, "CBR 48 kbit/s at 24 kHz: 144-byte frames"
    return audio


def _lame(pcm: bytes) -> bytes:
    """24 kHz mono 16-bit PCM as MP3 in the Edge format (48 kbit/s CBR), by LAME."""
    import lameenc

    encoder = lameenc.Encoder()
    encoder.set_channels(1)
    encoder.set_bit_rate(48)
    encoder.set_in_sample_rate(24_000)
    encoder.set_out_sample_rate(24_000)
    encoder.set_quality(7)
    return bytes(encoder.encode(pcm)) + bytes(encoder.flush())


def tone_frames(count: int, start: int = 0) -> bytes:
    """``count`` frames of real, audible MP3 from the start of the tone (for browsers)."""
    audio = _tone()
    return audio[start * FRAME_BYTES : (start + count) * FRAME_BYTES]


#: LAME's delay: a decoder plays 1,105 samples (576 of the encoder's, 529 of its own)
#: before the first sample given to the encoder.
LAME_DELAY_SAMPLES = 1105
#: What the fake sends as a corrupt audio message: an MP3 frame header (MPEG-1 Layer
#: III, free bit rate) then bytes that no decoder takes as that frame's content.
CORRUPT_FRAME = b"\xff\xfb\x00\x00" + bytes(range(256)) * 3


@functools.lru_cache(maxsize=32)
def voiced_frames(timeline: tuple[tuple[str, int, int], ...], total_frames: int) -> bytes:
    """``total_frames`` frames of MP3 in which each word of ``timeline`` is a tone.

    ``timeline`` holds ``(word, offset_ms, duration_ms)``. The samples are encoded
    LAME_DELAY_SAMPLES early, so that a decoder hears each word from its offset, as
    a listener of the real service does.
    """

    rate = 24_000
    samples = array.array("h", bytes(2 * (total_frames * 576 + LAME_DELAY_SAMPLES)))
    for number, (_, offset_ms, duration_ms) in enumerate(timeline):
        pitch = 300 + 60 * (number % 5)
        first = offset_ms * rate // 1000
        for i in range(first, first + duration_ms * rate // 1000):
            samples[i] = int(9000 * math.sin(2 * math.pi * pitch * i / rate))
    audio = _lame(samples[LAME_DELAY_SAMPLES:].tobytes())
    assert len(audio) >= total_frames * FRAME_BYTES
    return audio[: total_frames * FRAME_BYTES]


def mp3_frames(count: int, start: int = 0) -> bytes:
    """Return ``count`` valid silent MP3 frames, numbered from ``start`` in their padding."""
    frames = bytearray()
    for number in range(start, start + count):
        ancillary = number.to_bytes(4, "big") * (
            (FRAME_BYTES - len(_FRAME_HEADER) - _SIDE_INFO_BYTES) // 4
        )
        frame = _FRAME_HEADER + bytes(_SIDE_INFO_BYTES) + ancillary
        frames += frame.ljust(FRAME_BYTES, b"\x00")
    return bytes(frames)


_STRIP = string.punctuation + "“”‘’«»…¿¡—–"


def spoken_words(text: str) -> list[str]:
    """The words the service reports for ``text``: whitespace-split, punctuation trimmed."""
    return [word for token in text.split() if (word := token.strip(_STRIP))]


@dataclass
class SynthesisRecord:
    """What one upstream connection asked for and was sent."""

    query: dict[str, list[str]]
    headers: Headers
    config: dict[str, Any] = field(default_factory=dict)
    ssml: str = ""
    voice: str = ""
    rate: str = ""
    volume: str = ""
    pitch: str = ""
    text: str = ""
    words: list[tuple[str, int, int]] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    completed: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class FakeEdge:
    """The fake service; an async context manager listening on 127.0.0.1.

    Set the fault attributes before a request; they apply to every later connection.
    """

    def __init__(self, *, port: int = 0, reuse_port: bool = False) -> None:
        #: Where to listen (0: any free port); with ``reuse_port``, SO_REUSEPORT, so
        #: that several processes serve one port (the kernel spreads the connections
        #: over them: benchmarks whose load one process cannot carry).
        self._listen_port = port
        self._reuse_port = reuse_port
        # Faults
        self.refuse_status: int | None = None
        #: Refuse only this many more handshakes (with refuse_status), then accept.
        self.refuse_count: int | None = None
        self.refuse_voices_status: int | None = None
        #: Cleared, the voice list is not answered until it is set again.
        self.voice_list_released = asyncio.Event()
        self.voice_list_released.set()
        self.first_audio_delay = 0.0
        self.chunk_delay = 0.0
        #: When set, audio is paced at this multiple of real time (4: a second of audio
        #: every 250 ms), as the real service streams it.
        self.realtime_factor: float | None = None
        self.frames_per_chunk = 4
        self.pause_after_chunks: int | None = None
        self.resume = asyncio.Event()
        #: Seconds the service reads nothing once paused, so a client closing then
        #: waits that long for the closing handshake (a slow teardown).
        self.deaf_when_paused = 0.0
        self.stall_after_chunks: int | None = None
        self.drop_after_chunks: int | None = None
        self.drop_abruptly = False
        self.no_audio = False
        #: Send real, audible MP3 (a tone) instead of numbered silent frames.
        self.tone = False
        #: Send real MP3 in which each word is a tone and the time between words is
        #: silence, so that where a word is heard can be measured in decoded audio.
        self.voiced = False
        #: Corrupt the audio message after this many: bytes that no MP3 decoder takes.
        self.corrupt_after_chunks: int | None = None
        self.voices: list[dict[str, Any]] = list(VOICES)
        # Records
        #: Keep a record of every synthesis (tests read them). A long-running fake
        #: (benchmarks) turns this off: thousands of kept records make its garbage
        #: collector pause for 100 ms and more, stalling every stream it serves.
        self.keep_records = True
        #: One per synthesis, added once its request (config and SSML) is whole.
        self.records: list[SynthesisRecord] = []
        self.voice_list_requests = 0
        self.handshakes = 0
        self.active = 0
        self.max_active = 0
        self.paused = asyncio.Event()
        #: Every way the client broke the protocol; a test's fixture asserts there is none.
        self.violations: list[str] = []
        self._server: Server | None = None
        self._frame_numbers = itertools.count()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def wss_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{WSS_PATH}?TrustedClientToken={TOKEN}"

    @property
    def voices_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{VOICES_PATH}?trustedclienttoken={TOKEN}"

    @property
    def environ(self) -> dict[str, str]:
        return {"EDGE_WSS_URL": self.wss_url, "EDGE_VOICES_URL": self.voices_url}

    async def __aenter__(self) -> FakeEdge:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self._listen_port,
            process_request=self._process_request,
            reuse_port=self._reuse_port or None,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.resume.set()
        self.voice_list_released.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if urlsplit(request.path).path == VOICES_PATH:
            await self.voice_list_released.wait()
        try:
            return self._answer_handshake(connection, request)
        except AssertionError as exc:
            self.violations.append(f"handshake: {exc}")
            return connection.respond(http.HTTPStatus.BAD_REQUEST, "protocol violation\n")

    def _answer_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path == VOICES_PATH:
            self.voice_list_requests += 1
            if self.refuse_voices_status is not None:
                return connection.respond(self.refuse_voices_status, "refused\n")
            _require_drm(query, "trustedclienttoken")
            body = json.dumps(self.voices).encode()
            return Response(
                200,
                "OK",
                Headers(
                    [
                        ("Date", email.utils.formatdate(usegmt=True)),
                        ("Content-Type", "application/json; charset=utf-8"),
                        ("Content-Length", str(len(body))),
                    ]
                ),
                body,
            )
        if url.path != WSS_PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        _require_drm(query, "TrustedClientToken")
        assert "ConnectionId" in query, "edge-tts sends a ConnectionId"
        assert request.headers.get("Origin", "").startswith("chrome-extension://")
        self.handshakes += 1
        if self.refuse_status is not None and self.refuse_count != 0:
            if self.refuse_count is not None:
                self.refuse_count -= 1
            # Like the real service, with a Date header that edge-tts uses to fix its clock.
            return connection.respond(self.refuse_status, "refused\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        record = SynthesisRecord(
            query=parse_qs(urlsplit(ws.request.path).query), headers=ws.request.headers
        )
        # Seen even while the handler is paused or stalled, as a real service would.
        watcher = asyncio.create_task(ws.wait_closed())
        watcher.add_done_callback(lambda _: record.closed.set())
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self._synthesize(ws, record)
        except AssertionError as exc:
            self.violations.append(f"synthesis: {exc}")
        except ConnectionClosed:
            pass  # the client went away mid-synthesis, as clients may
        finally:
            self.active -= 1
        # The service leaves the socket open; edge-tts closes it after turn.end.
        with contextlib.suppress(Exception):
            await ws.wait_closed()
        record.closed.set()

    async def _synthesize(self, ws: ServerConnection, record: SynthesisRecord) -> None:
        headers, body = _split_text_message(await ws.recv())
        assert headers["Path"] == "speech.config", headers
        record.config = json.loads(body)
        options = record.config["context"]["synthesis"]["audio"]["metadataoptions"]
        word_boundaries = options["wordBoundaryEnabled"] == "true"
        assert record.config["context"]["synthesis"]["audio"]["outputFormat"] == (
            "audio-24khz-48kbitrate-mono-mp3"
        )

        headers, body = _split_text_message(await ws.recv())
        assert headers["Path"] == "ssml", headers
        assert headers["Content-Type"] == "application/ssml+xml"
        request_id = headers["X-RequestId"]
        record.ssml = body
        speak = ET.fromstring(body)
        ns = "{http://www.w3.org/2001/10/synthesis}"
        voice = speak.find(f"{ns}voice")
        assert voice is not None
        prosody = voice.find(f"{ns}prosody")
        assert prosody is not None
        record.voice = voice.attrib["name"]
        record.rate = prosody.attrib["rate"]
        record.volume = prosody.attrib["volume"]
        record.pitch = prosody.attrib["pitch"]
        record.text = prosody.text or ""
        # Recorded only once the request is whole: a test that sees a record may read
        # everything that was asked.
        if self.keep_records:
            self.records.append(record)
        if record.voice not in {voice["Name"] for voice in self.voices}:
            # The service closes without a word for a voice it does not have; edge-tts
            # then raises NoAudioReceived.
            await ws.close()
            return

        await ws.send(_text_message(request_id, "turn.start", '{"context":{"serviceTag":"fake"}}'))
        if self.no_audio:
            await ws.send(_text_message(request_id, "turn.end", "{}"))
            return

        # Lay the words out in time, then the audio that covers them.
        timeline: list[tuple[str, int, int]] = []
        cursor_ms = LEAD_MS
        for word in spoken_words(record.text):
            duration_ms = WORD_BASE_MS + WORD_PER_CHAR_MS * len(word)
            timeline.append((word, cursor_ms, duration_ms))
            cursor_ms += duration_ms + WORD_GAP_MS
        total_frames = math.ceil((cursor_ms + TAIL_MS) / FRAME_MS)
        record.words = timeline if word_boundaries else []

        if self.first_audio_delay:
            await _first(asyncio.sleep(self.first_audio_delay), ws.wait_closed())
        next_word = 0
        chunks_sent = 0
        frame = 0
        while frame < total_frames:
            count = min(self.frames_per_chunk, total_frames - frame)
            chunk_end_ms = (frame + count) * FRAME_MS
            # Metadata goes out ahead of the audio it describes, as the real service does.
            while (
                word_boundaries
                and next_word < len(timeline)
                and timeline[next_word][1] < chunk_end_ms
            ):
                word, offset_ms, duration_ms = timeline[next_word]
                await ws.send(_metadata_message(request_id, word, offset_ms, duration_ms))
                next_word += 1
            if self.pause_after_chunks is not None and chunks_sent == self.pause_after_chunks:
                self.paused.set()
                if self.deaf_when_paused:
                    ws.transport.pause_reading()
                    await asyncio.sleep(self.deaf_when_paused)
                    ws.transport.resume_reading()
                await _first(self.resume.wait(), ws.wait_closed())
            if self.stall_after_chunks is not None and chunks_sent == self.stall_after_chunks:
                await ws.wait_closed()
                return
            if self.drop_after_chunks is not None and chunks_sent == self.drop_after_chunks:
                if self.drop_abruptly:
                    ws.transport.abort()
                else:
                    await ws.close()
                return
            if self.voiced:
                audio = voiced_frames(tuple(timeline), total_frames)[
                    frame * FRAME_BYTES : (frame + count) * FRAME_BYTES
                ]
            elif self.tone:
                audio = tone_frames(count, frame)
            else:
                audio = mp3_frames(count, next(self._frame_numbers))
            if self.corrupt_after_chunks is not None and chunks_sent == self.corrupt_after_chunks:
                audio = CORRUPT_FRAME
            await ws.send(_audio_message(request_id, audio))
            if self.keep_records:
                record.audio += audio
            chunks_sent += 1
            frame += count
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            if self.realtime_factor and frame < total_frames:
                # Paced as it is made; the end follows the last audio at once, as the
                # real service sends turn.end as soon as synthesis is done.
                await asyncio.sleep(count * FRAME_MS / 1000 / self.realtime_factor)
        await ws.send(_audio_message(request_id, b""))
        await ws.send(_text_message(request_id, "turn.end", "{}"))
        record.completed = True


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.create_task(wait) for wait in waits]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


def _require_drm(query: dict[str, list[str]], token_name: str) -> None:
    assert query.get(token_name) == [TOKEN], query
    gec = query.get("Sec-MS-GEC", [""])[0]
    assert len(gec) == 16 + 1 + 64 and gec[16] == "-", "Sec-MS-GEC is <16 hex>-<64 hex>"
    assert query.get("Sec-MS-GEC-Version", [""])[0].startswith("2-")


def _split_text_message(message: str | bytes) -> tuple[dict[str, str], str]:
    assert isinstance(message, str), "edge-tts sends requests as text frames"
    head, _, body = message.partition("\r\n\r\n")
    headers = dict(line.split(":", 1) for line in head.split("\r\n"))
    return headers, body


def _text_message(request_id: str, path: str, body: str) -> str:
    return (
        f"X-RequestId:{request_id}\r\n"
        "Content-Type:application/json; charset=utf-8\r\n"
        f"Path:{path}\r\n\r\n{body}"
    )


def _metadata_message(request_id: str, word: str, offset_ms: int, duration_ms: int) -> str:
    # The service reports the word as it appears in the SSML, so XML-escaped.
    escaped = escape(word)
    metadata = {
        "Metadata": [
            {
                "Type": "WordBoundary",
                "Data": {
                    "Offset": offset_ms * TICKS_PER_MS,
                    "Duration": duration_ms * TICKS_PER_MS,
                    "text": {
                        "Text": escaped,
                        "Length": len(escaped),
                        "BoundaryType": "WordBoundary",
                    },
                },
            }
        ]
    }
    return _text_message(request_id, "audio.metadata", json.dumps(metadata, ensure_ascii=False))


def _audio_message(request_id: str, audio: bytes) -> bytes:
    headers = f"X-RequestId:{request_id}\r\n"
    if audio:
        headers += "Content-Type:audio/mpeg\r\n"
    headers += f"X-StreamId:{uuid.uuid4().hex.upper()}\r\nPath:audio\r\n"
    encoded = headers.encode()
    return len(encoded).to_bytes(2, "big") + encoded + audio


def serve_forever(
    first_audio_delay: float = 0.0,
    realtime_factor: float | None = None,
    *,
    port: int = 0,
    reuse_port: bool = False,
) -> None:
    """Run the fake on its own (benchmarks): print its two URLs, serve until killed.

    Args:
        first_audio_delay: Seconds before the first audio of each synthesis.
        realtime_factor: Pace the audio at this multiple of real time.
        port: The port to listen on (0: any free one).
        reuse_port: Listen with SO_REUSEPORT: start the first process with port 0,
            the others with the port it printed, and the kernel spreads the
            connections over all of them.
    """

    async def main() -> None:
        async with FakeEdge(port=port, reuse_port=reuse_port) as fake:
            fake.first_audio_delay = first_audio_delay
            fake.realtime_factor = realtime_factor
            fake.keep_records = False
            print(fake.wss_url, fake.voices_url, flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
