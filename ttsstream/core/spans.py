"""An SSML document spoken as one utterance: its spans one after another, its breaks as
exact silence, on one timeline.

Each :class:`~ttsstream.core.ssml.Spoken` span is one synthesis (its voice and
prosody) through the cache and its coalescing, so a line said before replays; the
next span's synthesis starts while the current one plays (as a streamed text's
segments do), so span boundaries add no gap. A :class:`~ttsstream.core.ssml.Pause`
is silent MP3 frames of Edge's own format (24 kHz, 48 kbit/s, 24 ms each: a break
is within 12 ms of its time), made in the utterance's format downstream like any
audio. Word offsets move by the playing time of everything before them; character
ranges go to the document's text content.

Every engine encodes to the same MP3 (``MP3_24KHZ_48KBPS``), so spans of several
voices, and of the offline voice, join into one stream.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import AsyncGenerator

import av

from ttsstream.core.router import Speech, Started
from ttsstream.core.speech_cache import SpeechCache
from ttsstream.core.ssml import Pause, Spoken, SsmlDocument
from ttsstream.core.streaming import LOOKAHEAD, Ahead
from ttsstream.engines.base import MP3_24KHZ_48KBPS, AudioChunk, SynthesisRequest, WordEvent

__all__ = ["FRAME_MS", "silence", "speak_spans"]

#: Playing time of one MP3 frame of Edge's format (576 samples at 24 kHz).
FRAME_MS = 24.0
_SAMPLES_PER_FRAME = 576


@functools.cache
def _silent_frame() -> bytes:
    """One MP3 frame of digital silence in Edge's format, made once with LAME (PyAV)."""
    codec = av.codec.CodecContext.create("libmp3lame", "w")
    codec.sample_rate = MP3_24KHZ_48KBPS.sample_rate
    codec.layout = "mono"
    codec.format = "s16p"
    codec.bit_rate = MP3_24KHZ_48KBPS.bitrate_bps
    codec.open()
    packets = []
    for _ in range(8):
        frame = av.AudioFrame(format="s16p", layout="mono", samples=_SAMPLES_PER_FRAME)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate = MP3_24KHZ_48KBPS.sample_rate
        packets += [bytes(packet) for packet in codec.encode(frame)]
    # A frame from the middle: past the encoder's start, before its flush.
    return packets[len(packets) // 2]


def silence(ms: int) -> tuple[bytes, float]:
    """Silent MP3 frames for ``ms`` milliseconds (rounded to whole frames) and their
    playing time."""
    frames = max(0, round(ms / FRAME_MS))
    return _silent_frame() * frames, frames * FRAME_MS


async def speak_spans(
    speech: SpeechCache,
    document: SsmlDocument,
    request: SynthesisRequest,
    *,
    words_ahead: bool = False,
) -> AsyncGenerator[Speech, None]:
    """Speak ``document`` as one utterance (see the module); ``request`` gives who asks
    (its client), its text and voice are the document's.

    Raises:
        ClientError: A span failed (the utterance ends with it, partial).
    """
    pieces = deque(document.pieces)
    spans = deque(piece for piece in document.pieces if isinstance(piece, Spoken))
    ahead: deque[tuple[Ahead, Spoken]] = deque()
    first: Started | None = None
    shift_ms = 0.0
    # Silence of breaks before the first span: sent once a span says who speaks.
    held: list[bytes] = []
    held_ms = 0.0
    pcm_rate = 0

    def start_ready() -> None:
        """Start the next spans' syntheses, in order (the current one and the next)."""
        while spans and len(ahead) < LOOKAHEAD:
            span = spans.popleft()
            span_request = dataclasses.replace(
                request,
                text=span.text,
                voice=span.voice,
                rate=span.rate,
                volume=span.volume,
                pitch=span.pitch,
            )
            ahead.append((Ahead(speech, span_request, words_ahead=words_ahead), span))

    try:
        while pieces:
            piece = pieces.popleft()
            if isinstance(piece, Pause):
                data, ms = silence(piece.ms)
                if first is None:
                    held.append(data)
                    held_ms += ms
                    continue
                if data:
                    yield _silent_chunk(data, pcm_rate, ms)
                shift_ms += ms
                continue
            start_ready()
            # Taken off the queue once spoken: until then it is one to close if the
            # utterance stops (a cancel).
            current, span = ahead[0]
            assert span is piece, "spans are spoken in their order"
            byte_count = 0
            async for event in current.events():
                if isinstance(event, Started):
                    if first is None:
                        first = event
                        yield dataclasses.replace(event, cached=False, audio_ms=None)
                        for data in held:
                            yield _silent_chunk(data, 0, 0.0)
                        shift_ms += held_ms
                elif isinstance(event, AudioChunk):
                    if event.pcm is not None:
                        pcm_rate = event.pcm_rate
                    byte_count += len(event.data)
                    yield event
                else:
                    yield _moved(span.source.in_original(event), shift_ms)
            shift_ms += MP3_24KHZ_48KBPS.duration_ms(byte_count)
            ahead.popleft()
            start_ready()
    finally:
        for pending, _ in ahead:
            await pending.aclose()


def _silent_chunk(data: bytes, pcm_rate: int, ms: float) -> AudioChunk:
    """Silence as an audio chunk (with its PCM, when the utterance's audio has PCM: the
    offline voice's, from which other formats are made)."""
    if pcm_rate:
        samples = round(ms * pcm_rate / 1000)
        return AudioChunk(data, pcm=bytes(2 * samples), pcm_rate=pcm_rate)
    return AudioChunk(data)


def _moved(word: WordEvent, shift_ms: float) -> WordEvent:
    return dataclasses.replace(word, offset_ms=word.offset_ms + shift_ms)
