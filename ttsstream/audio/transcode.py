"""Making a format from the source MP3 as it streams, with PyAV (FFmpeg in the wheel).

A :class:`Transcoder` decodes each MP3 chunk as it arrives and hands the decoded
samples to the format's encoder and muxer at once; what the muxer writes is
returned to the caller for sending. Nothing waits for the end of the utterance:
muxers are set up to write as they go (:mod:`ttsstream.audio.formats`), and at
the end the encoder is flushed. The decoded samples go through FFmpeg's
resampler to the format's own rate and sample (``pcm_16000``, ``ulaw_8000``,
``mp3_44100_128``…) as they come; it is flushed at the end too, so no sample is
lost. The formats sent as samples (``pcm*``, ``wav*``) skip encoding (``wav`` is
a fixed header, written by hand, then the samples); LAME's MP3 and G.711 are the
encoder's packets, with no muxer. The offline voice's chunks carry the PCM they
were encoded from, which goes to :meth:`Transcoder.feed_pcm` (resampled from
eSpeak's 22,050 Hz straight to the format's rate), so its audio is not decoded
back from MP3.

A transcoder holds FFmpeg contexts: :meth:`Transcoder.close` frees them, whether
or not the utterance ended (a cancelled utterance's transcoder is closed by its
pipe). :data:`open_transcoders` counts the live ones (``/stats``).

:class:`Pipe` is what the utterance run uses: the source passes through it
untouched for ``mp3``; for the other formats each chunk is transcoded on a
worker thread when it is large enough for the hop to pay (:data:`OFF_LOOP_BYTES`;
FFmpeg's codecs run without the GIL), so that the event loop does not stall on
an encoder. A pipe also passes through bytes already made in its format (a
stored one, or a shared transcode's :class:`MadeChunk`).

The worker threads are shared fairly between clients (:class:`TranscodeWorkers`):
each piece of work waits in its client's queue, a free thread takes the next
client's in turn, and a client has at most :data:`PER_CLIENT_THREADS` running. One
client's dozen transcodes then delay another client's by one piece of work at
most, not by a dozen: its first Opus byte beside them was 4 to 8 times later than
without them when the threads took work in arrival order, and is now about as
soon (tests/test_formats.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import av
import av.error

from ttsstream.audio.formats import MP3, Format, wav_header
from ttsstream.engines.base import AudioChunk, AudioFormat
from ttsstream.exceptions import UpstreamBadAudio

__all__ = [
    "PER_CLIENT_THREADS",
    "WORKER_THREADS",
    "MadeChunk",
    "Pipe",
    "TranscodeJob",
    "TranscodeWorkers",
    "Transcoder",
    "open_transcoders",
    "transcode_workers",
]

logger = logging.getLogger("ttsstream.audio")

#: Transcoders alive now (made, not yet closed).
open_transcoders = 0
#: Source chunks of at least this many bytes are transcoded on a worker thread,
#: where FFmpeg's time for them passes the hop's (about 0.2 ms on the 2-core test
#: machine). Measured there per byte of MP3: 1.15 µs to Opus or AAC (decode and
#: encode), 1.3 to 2.3 µs to LAME's MP3, 0.3 µs to FLAC, 0.15 µs to PCM, WAV or
#: G.711 at any rate (decode and resample); the codecs run without the GIL, so the
#: worker threads use the other cores.
OFF_LOOP_BYTES = 256
#: The same, for FLAC.
_OFF_LOOP_BYTES_FLAC = 1024
#: The same, for the formats sent as samples (PCM, WAV, G.711).
_OFF_LOOP_BYTES_SAMPLES = 2048
#: Threads that transcode: the codecs run without the GIL, so they use the other core.
WORKER_THREADS = 2
#: Jobs of one client that run at once: one client's transcodes never hold every
#: thread (and the cores and the GIL with them), so another client's work finds
#: one free, and the event loop a core.
PER_CLIENT_THREADS = 1

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="transcode")
    return _executor


class TranscodeJob(Generic[T]):
    """One piece of transcoding work (a transcoder made, a chunk transcoded), queued
    for a worker thread; :attr:`result` is awaited by who asked for it."""

    def __init__(
        self,
        client: str,
        function: Callable[..., T],
        args: tuple[Any, ...],
        discard: Callable[[T], None] | None,
    ) -> None:
        #: Whose work it is.
        self.client = client
        self.function = function
        self.args = args
        #: What it returned; cancelling it before a thread takes the job drops the job.
        self.result: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        #: Whether a thread runs it now.
        self.running = False
        self._discard = discard
        self._when_free: list[Callable[[], None]] = []

    def when_free(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once no thread runs this job (at once if none does)."""
        if self.running:
            self._when_free.append(callback)
        else:
            callback()

    def _ended(self, done: Future[T] | None) -> None:
        """The job ran (``done``) or was dropped (``None``): hand over what it made."""
        self.running = False
        if done is not None:
            error = done.exception()
            if self.result.done():
                if error is None and self._discard is not None:
                    self._discard(done.result())  # nobody waits for it any more
            elif error is not None:
                self.result.set_exception(error)
            else:
                self.result.set_result(done.result())
        callbacks, self._when_free = self._when_free, []
        for callback in callbacks:
            callback()

    def _orphaned(self, done: Future[T]) -> None:
        """The job ran, but its loop is closed: free what it made (on its thread)."""
        if self._discard is not None and done.exception() is None:
            self._discard(done.result())
        callbacks, self._when_free = self._when_free, []
        for callback in callbacks:
            callback()


class TranscodeWorkers:
    """The worker threads, shared fairly between clients (one per event loop).

    Jobs wait in one queue per client; a free thread takes the first job of the
    client whose turn it is, and that client's turn comes again after every other
    waiting client's (round robin). A client has at most ``per_client`` jobs
    running at once, however many it has waiting. A client with many transcodes in
    progress thus gets a thread as often as one with a single transcode, no more,
    and never all of them.

    Args:
        threads: Jobs run at once (on :data:`WORKER_THREADS` threads shared by every loop).
        per_client: Jobs of one client run at once.
    """

    def __init__(self, threads: int = WORKER_THREADS, per_client: int = PER_CLIENT_THREADS) -> None:
        if threads < 1 or per_client < 1:
            raise ValueError("threads and per_client must be >= 1")
        self._threads = threads
        self._per_client = per_client
        self._running = 0
        #: Jobs running, by client.
        self._running_by_client: dict[str, int] = {}
        self._waiting: OrderedDict[str, deque[TranscodeJob[Any]]] = OrderedDict()

    @property
    def waiting(self) -> int:
        """Jobs queued, not yet running."""
        return sum(len(jobs) for jobs in self._waiting.values())

    def submit(
        self,
        client: str,
        function: Callable[..., T],
        *args: Any,
        discard: Callable[[T], None] | None = None,
    ) -> TranscodeJob[T]:
        """Queue ``function(*args)`` for ``client``'s turn.

        Args:
            client: Whose work it is (the client's IP address; ``""`` if unknown).
            function: Run on a worker thread.
            discard: Called on the loop with what ``function`` returned if nobody
                waits for it any more (its result was cancelled while it ran).
        """
        job = TranscodeJob(client, function, args, discard)
        self._waiting.setdefault(client, deque()).append(job)
        self._start_next()
        return job

    def _start_next(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running < self._threads:
            client = next(
                (
                    client
                    for client in self._waiting
                    if self._running_by_client.get(client, 0) < self._per_client
                ),
                None,
            )
            if client is None:
                return
            jobs = self._waiting[client]
            job = jobs.popleft()
            if jobs:
                self._waiting.move_to_end(client)  # its next job waits for the others'
            else:
                del self._waiting[client]
            if job.result.cancelled():
                job._ended(None)  # nobody waits for it: never run
                continue
            self._running += 1
            self._running_by_client[client] = self._running_by_client.get(client, 0) + 1
            job.running = True
            _threads().submit(job.function, *job.args).add_done_callback(
                functools.partial(self._ran_in_thread, loop, job)
            )

    def _ran_in_thread(
        self, loop: asyncio.AbstractEventLoop, job: TranscodeJob[Any], done: Future[Any]
    ) -> None:
        try:
            loop.call_soon_threadsafe(self._ran, job, done)
        except RuntimeError:
            # The loop was closed meanwhile (at exit): nobody will take what the job
            # made, which is freed here.
            job._orphaned(done)

    def _ran(self, job: TranscodeJob[Any], done: Future[Any]) -> None:
        self._running -= 1
        left = self._running_by_client[job.client] - 1
        if left:
            self._running_by_client[job.client] = left
        else:
            del self._running_by_client[job.client]
        job._ended(done)
        self._start_next()


_workers_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TranscodeWorkers] = (
    weakref.WeakKeyDictionary()
)


def transcode_workers() -> TranscodeWorkers:
    """The running event loop's :class:`TranscodeWorkers`."""
    loop = asyncio.get_running_loop()
    workers = _workers_by_loop.get(loop)
    if workers is None:
        workers = _workers_by_loop[loop] = TranscodeWorkers()
    return workers


@dataclass(frozen=True, slots=True)
class MadeChunk(AudioChunk):
    """Bytes of a format already made from the MP3 (by a transcode that several
    listeners share), with the playing time of all that was made up to their end:
    the bytes of an encoded format do not tell it."""

    made_ms: float = 0.0


class _Collect:
    """The file object a muxer writes to: it keeps what was written until taken."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        if not self._parts:
            return b""
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class Transcoder:
    """One utterance's source audio, turned into ``target`` chunk by chunk (synchronous).

    The decoded source is resampled to the target's rate and sample as it comes
    (FFmpeg's resampler, which keeps the timeline: it adds no delay), then sent
    as samples, or encoded (with a muxer, or, for LAME and G.711, as the encoder's
    packets).

    Raises:
        UpstreamBadAudio: (from the feed methods) the source does not decode.
    """

    def __init__(self, target: Format) -> None:
        global open_transcoders
        assert target.transcoded, "mp3 is sent as it is"
        self.format = target
        self._rate = target.sample_rate
        #: Made at the first MP3 fed (never when PCM comes instead).
        self._decoder: Any = None
        self._out = _Collect()
        self._container: Any = None
        self._stream: Any = None
        #: An encoder whose packets are sent as they are, without a muxer (LAME, G.711).
        self._encoder: Any = None
        #: MP3 frames LAME made so far, and the samples each plays whatever it holds.
        self._packets = 0
        self._packet_samples = 0
        self._sample_bytes = target.bytes_per_sample or 0
        sample_format = "flt" if target.sample == "f32le" else "s16"
        if target.container is not None:
            self._container = av.open(
                self._out, "w", format=target.container, options=dict(target.container_options)
            )
            stream = self._container.add_stream(
                target.codec, rate=self._rate, options=dict(target.codec_options)
            )
            stream.layout = "mono"
            if target.bit_rate is not None:
                stream.bit_rate = target.bit_rate
            self._stream = stream
            sample_format = stream.format.name
        elif target.codec is not None:
            encoder: Any = av.CodecContext.create(target.codec, "w")
            formats = [each.name for each in encoder.codec.audio_formats]
            # LAME takes the MP3 decoder's own planar floats.
            encoder.format = "fltp" if "fltp" in formats else formats[0]
            encoder.sample_rate = self._rate
            encoder.layout = "mono"
            if target.bit_rate is not None:
                encoder.bit_rate = target.bit_rate
            encoder.options = dict(target.codec_options)
            encoder.open()
            self._encoder = encoder
            sample_format = encoder.format.name
            if target.sample is None:
                self._packet_samples = int(encoder.frame_size)
        self._sample_format = sample_format
        #: From the decoded MP3 (24 kHz planar floats) to the target's rate and sample.
        self._resampler: Any = av.AudioResampler(
            format=sample_format, layout="mono", rate=self._rate
        )
        #: From PCM fed as it is (the offline voice's 22,050 Hz), made at the first.
        self._pcm_resampler: Any = None
        #: Samples given to the encoder (or sent as samples) so far, at the target's rate.
        self.samples = 0
        self._header = wav_header(self._rate, target.sample or "s16le") if target.riff else b""
        self._priming = target.priming_samples
        #: For AAC (priming the container cannot signal, with a muxer): whole encoder
        #: frames only, so that the last partial one is dropped (under 43 ms of the
        #: source's trailing silence) rather than padded, and the audio is at most its
        #: priming longer than the source.
        self._frames: Any = av.AudioFifo() if self._priming and self._stream is not None else None
        self._frame_size = (
            self._stream.codec_context.frame_size if self._frames is not None else 0
        ) or self._priming
        self._closed = False
        open_transcoders += 1

    @property
    def duration_ms(self) -> float:
        """The playing time of what was made so far (the source's samples taken, and
        the priming a decoder plays before them; for LAME, the frames made, each
        playing as many samples whatever it holds)."""
        if self._packet_samples:
            return self._packets * self._packet_samples * 1000 / self._rate
        return (self.samples + self._priming) * 1000 / self._rate

    def feed_mp3(self, data: bytes | memoryview) -> bytes:
        """Decode MP3 bytes (any cut) and return what the format has ready."""
        if self._decoder is None:
            self._decoder = av.CodecContext.create("mp3float", "r")
        try:
            frames = [
                frame
                for packet in self._decoder.parse(bytes(data))
                for frame in self._decoder.decode(packet)
            ]
        except av.error.FFmpegError as exc:
            raise UpstreamBadAudio(f"the speech service's audio does not decode: {exc}") from None
        return self._encode(frames)

    def feed_pcm(self, pcm: bytes, sample_rate: int) -> bytes:
        """Take 16-bit mono PCM at ``sample_rate`` and return what the format has ready.

        It is resampled straight to the target's rate and sample (once, not through
        the source's 24 kHz).
        """
        samples = len(pcm) // 2
        if samples == 0:
            return self._take()
        frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
        frame.sample_rate = sample_rate
        frame.planes[0].update(pcm if len(pcm) == samples * 2 else pcm[: samples * 2])
        if self._pcm_resampler is None:
            self._pcm_resampler = av.AudioResampler(
                format=self._sample_format, layout="mono", rate=self._rate
            )
        return self._encode(self._pcm_resampler.resample(frame), resampled=True)

    def finish(self) -> bytes:
        """Flush the decoder, the resamplers and the encoder; the last bytes. The
        transcoder is closed."""
        frames = []
        if self._decoder is not None:
            with contextlib.suppress(av.error.FFmpegError):
                frames = list(self._decoder.decode(None))
        out = self._encode(frames) + self._encode(self._resampler.resample(None), resampled=True)
        if self._pcm_resampler is not None:
            out += self._encode(self._pcm_resampler.resample(None), resampled=True)
        if self._stream is not None:
            self._container.mux(self._stream.encode(None))
        if self._encoder is not None:
            self._write_packets(self._encoder.encode(None))
        self.close()
        return out + self._out.take()

    def close(self) -> None:
        """Free the FFmpeg contexts (idempotent)."""
        global open_transcoders
        if self._closed:
            return
        self._closed = True
        open_transcoders -= 1
        if self._container is not None:
            try:
                self._container.close()
            except (av.error.FFmpegError, ValueError) as exc:  # a muxer that never started
                logger.debug("transcoder: closing the muxer: %s", exc)
        self._decoder = self._container = self._stream = self._encoder = None
        self._resampler = self._pcm_resampler = self._frames = None

    def _encode(self, frames: list[Any], *, resampled: bool = False) -> bytes:
        resampler = self._resampler
        for frame in frames:
            # A resampler with nothing to do hands back what it gets, a flush's None too.
            for ready in [frame] if resampled else resampler.resample(frame):
                if ready is not None:
                    self._send(ready)
        return self._take()

    def _send(self, frame: Any) -> None:
        """Send one frame at the target's rate and sample, or encode it."""
        if self._encoder is not None:
            self.samples += frame.samples
            self._write_packets(self._encoder.encode(frame))
        elif self._stream is None:
            self.samples += frame.samples
            self._out.write(memoryview(frame.planes[0])[: frame.samples * self._sample_bytes])
        elif self._frames is None:
            self.samples += frame.samples
            self._container.mux(self._stream.encode(frame))
        else:
            self._frames.write(frame)
            while (whole := self._frames.read(self._frame_size)) is not None:
                self.samples += whole.samples
                self._container.mux(self._stream.encode(whole))

    def _write_packets(self, packets: list[Any]) -> None:
        for packet in packets:
            self._packets += 1
            self._out.write(memoryview(packet))

    def _take(self) -> bytes:
        data = self._out.take()
        if self._header and (data or self.samples == 0):
            data, self._header = self._header + data, b""
        return data


class Pipe:
    """The step between an utterance's source audio and its listener.

    ``mp3`` passes through untouched, and so do bytes already made in ``target``
    (stored, or a shared transcode's :class:`MadeChunk`); any other source goes
    through a :class:`Transcoder`, large chunks on a worker thread in ``client``'s
    turn (:class:`TranscodeWorkers`).
    """

    def __init__(
        self,
        target: Format = MP3,
        transcoder: Transcoder | None = None,
        *,
        known_ms: float | None = None,
        client: str = "",
    ) -> None:
        self.format = target
        self._transcoder = transcoder
        #: The playing time of bytes of ``target`` that pass through, when their
        #: length does not tell it (stored, or made by a shared transcode).
        self._known_ms = known_ms
        self._client = client
        self._off_loop_bytes = (
            _OFF_LOOP_BYTES_SAMPLES
            if target.sample is not None
            else _OFF_LOOP_BYTES_FLAC
            if target.codec == "flac"
            else OFF_LOOP_BYTES
        )
        #: The chunk being transcoded on a worker thread (or waiting for one), if any.
        self._busy: TranscodeJob[bytes] | None = None

    @property
    def transcoding(self) -> bool:
        """Whether the pipe makes its format (rather than passing bytes through)."""
        return self._transcoder is not None

    @property
    def word_shift_ms(self) -> float:
        """How much later the words are heard in what the pipe makes (AAC's priming)."""
        return self.format.priming_ms if self._transcoder is not None else 0.0

    @classmethod
    async def open(
        cls,
        target: Format,
        source: AudioFormat,
        audio_ms: float | None = None,
        *,
        client: str = "",
    ) -> Pipe:
        """A pipe from ``source`` (the MP3, or bytes of ``target`` already made, lasting
        ``audio_ms`` if known) to ``target``; an encoder is set up on a worker thread
        (FLAC's takes 5 ms), in ``client``'s turn."""
        if not target.transcoded or source.name == target.name:
            return cls(target, known_ms=audio_ms, client=client)
        made = transcode_workers().submit(client, Transcoder, target, discard=Transcoder.close)
        # Cancelled meanwhile: a transcoder made all the same is closed (``discard``).
        transcoder: Transcoder = await made.result
        return cls(target, transcoder, client=client)

    def duration_ms(self, byte_count: int) -> float:
        """The playing time of what was sent (``byte_count`` bytes of it)."""
        if self._transcoder is not None:
            return self._transcoder.duration_ms
        if self._known_ms is not None:
            return self._known_ms
        return MP3.audio_format.duration_ms(byte_count)

    async def feed(self, chunk: AudioChunk) -> bytes | memoryview:
        """The bytes to send for the next source chunk (possibly none yet).

        A chunk that carries its PCM (the offline voice's) is made from that PCM,
        not from a decode of its MP3.
        """
        transcoder = self._transcoder
        if transcoder is None:
            if isinstance(chunk, MadeChunk):
                self._known_ms = chunk.made_ms
            return chunk.data
        if chunk.pcm is not None:
            if len(chunk.pcm) < 4 * self._off_loop_bytes:
                return transcoder.feed_pcm(chunk.pcm, chunk.pcm_rate)
            self._busy = transcode_workers().submit(
                self._client, transcoder.feed_pcm, chunk.pcm, chunk.pcm_rate
            )
        elif len(chunk.data) < self._off_loop_bytes:
            return transcoder.feed_mp3(chunk.data)
        else:
            self._busy = transcode_workers().submit(
                self._client, transcoder.feed_mp3, bytes(chunk.data)
            )
        return await self._busy.result

    async def finish(self) -> bytes:
        """The last bytes to send, once the source has ended."""
        if self._transcoder is None:
            return b""
        return self._transcoder.finish()

    def close(self) -> None:
        """Free the transcoder, whatever happened (idempotent).

        A chunk still being transcoded (the utterance was cancelled meanwhile)
        keeps it until that chunk is done; then it is freed on the event loop. A
        chunk still waiting for a thread is dropped.
        """
        transcoder, busy = self._transcoder, self._busy
        if transcoder is None:
            return
        if busy is None:
            transcoder.close()
            return
        busy.result.cancel()
        busy.when_free(transcoder.close)
