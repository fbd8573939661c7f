"""ElevenLabs' HTTP text-to-speech API on the main port, for clients written for
ElevenLabs (its SDK, Pipecat's ``ElevenLabsHttpTTSService``, LiveKit's plugin).

- ``POST /v1/text-to-speech/{voice_id}`` and ``/stream``: the audio, streamed as it
  is made (``output_format`` in the query; Edge's own MP3 when absent).
- ``/with-timestamps``: one JSON object, ``audio_base64`` with the ``alignment`` of
  every character (seconds), once the audio is whole.
- ``/stream/with-timestamps``: one JSON object per line as the audio comes, each with
  the characters its audio covers (seconds from the response's start).
- ``GET /v1/voices``: every voice, ``voice_id`` being the name the path takes;
  ``GET /v2/voices`` (the SDK's ``voices.search()``): the same in one page, ``search``
  filtering.

The request's rules are :mod:`ttsstream.protocols.elevenlabs`'; admission, the
utterance and the drain are :class:`~ttsstream.http.streams.HttpStreams`'; errors
are ElevenLabs' ``{"detail": {"status", "message"}}`` (:mod:`ttsstream.http.errors`).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from ttsstream.core.timings import CharacterTrack
from ttsstream.core.utterance import Summary
from ttsstream.engines.base import WordEvent
from ttsstream.exceptions import ClientError
from ttsstream.http.streams import Asked, BodyArgs, HttpStreams, Reader, StreamBody, json_body
from ttsstream.protocols.elevenlabs import (
    encode_voices,
    encode_voices_page,
    encode_with_timestamps,
    parse_speech_body,
)
from ttsstream.services import Services

__all__ = ["ElevenLabsApi"]

#: Where the API is served.
_TTS_PATH = "/v1/text-to-speech/{voice_id}"
_VOICES_PATH = "/v1/voices"
_VOICES_V2_PATH = "/v2/voices"


class ElevenLabsApi:
    """The handlers of ElevenLabs' HTTP API, over the server's services.

    Args:
        services: The server's parts.
    """

    def __init__(self, services: Services) -> None:
        self._services = services
        self._config = services.config
        #: The door: its streams, for a drain.
        self.streams = HttpStreams(services, "elevenlabs")

    def routes(self, app: web.Application) -> None:
        """Add the API's routes to ``app``."""
        for suffix in ("", "/stream"):
            app.router.add_post(_TTS_PATH + suffix, self.audio)
            app.router.add_post(_TTS_PATH + suffix + "/with-timestamps", self.timestamps)
        for path in (_TTS_PATH, _TTS_PATH + "/stream"):
            for tail in ("", "/with-timestamps"):
                app.router.add_route("OPTIONS", path + tail, self.streams.preflight)
        for path in (_VOICES_PATH, _VOICES_V2_PATH):
            app.router.add_get(path, self.voices)
            app.router.add_route("OPTIONS", path, self.streams.preflight)

    @property
    def doors(self) -> list[HttpStreams]:
        return [self.streams]

    async def audio(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/text-to-speech/{voice_id}[/stream]``: the audio bytes, streamed."""
        return await self.streams.serve(request, "elevenlabs", self._reader(request), StreamBody)

    async def timestamps(self, request: web.Request) -> web.StreamResponse:
        """``…/with-timestamps`` (one object) and ``…/stream/with-timestamps`` (lines)."""
        lines = request.path.endswith("/stream/with-timestamps")
        body = _Lines if lines else _Whole
        return await self.streams.serve(
            request,
            "elevenlabs",
            self._reader(request, timestamps=True),
            body,
            words=lambda asked: "batch",
        )

    async def voices(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/voices`` and ``/v2/voices``: ElevenLabs' shapes, every voice this
        server has."""
        refused = await self.streams.admit_list(request, "elevenlabs")
        if refused is not None:
            return refused
        try:
            voices = await self._services.speech.voices()
        except ClientError as exc:
            return self.streams.error(request, exc, "elevenlabs")
        body = (
            encode_voices_page(voices, request.query)
            if request.path == _VOICES_V2_PATH
            else encode_voices(voices)
        )
        return web.Response(
            body=body,
            content_type="application/json",
            headers=self.streams.cors(request),
        )

    def _reader(self, request: web.Request, *, timestamps: bool = False) -> Reader:
        async def read() -> Asked:
            asked = parse_speech_body(
                await json_body(request),
                voice_id=request.match_info["voice_id"],
                query=request.query,
                max_text_length=self._config.max_text_length,
            )
            utterances = self._services.utterances
            synthesis = utterances.request(text=asked.text, voice=asked.voice, rate=asked.rate)
            try:
                await utterances.accept(synthesis)
            except ClientError as exc:
                exc.param = exc.param or ("voice_id" if exc.code == "invalid_voice" else None)
                raise
            return Asked(synthesis, asked.format, timestamps=timestamps, text=asked.text)

        return read


class _Timed(StreamBody):
    """A body that gives characters with their times: the text the client sent, its
    words as they come, and how far the audio has got."""

    def __init__(self, asked: Asked, args: BodyArgs) -> None:
        super().__init__(asked, args)
        self._track = CharacterTrack(per_message=False, whole=True)
        self._track.add_text(asked.text or asked.synthesis.text)
        #: Where the audio sent so far ends, ms from the response's start.
        self._audio_ms = 0.0

    @property
    def content_type(self) -> str:
        return "application/json"

    async def words(self, words: Sequence[WordEvent]) -> None:
        self._track.add_words(words)


class _Whole(_Timed):
    """``/with-timestamps``: one JSON object once the audio is whole."""

    def __init__(self, asked: Asked, args: BodyArgs) -> None:
        super().__init__(asked, args)
        self._audio: list[bytes] = []

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        self._audio.append(bytes(data))
        self._audio_ms = end_ms

    async def end(self, summary: Summary) -> None:
        times = self._track.take(summary.audio_ms, final=True)
        await self._write(encode_with_timestamps(b"".join(self._audio), times))
        await self._end()


class _Lines(_Timed):
    """``/stream/with-timestamps``: one JSON object per line as the audio comes."""

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        self._audio_ms = end_ms
        times = self._track.take(self._audio_ms)
        await self._write(encode_with_timestamps(bytes(data), times) + b"\n")

    async def end(self, summary: Summary) -> None:
        times = self._track.take(max(self._audio_ms, summary.audio_ms), final=True)
        if times is not None:
            await self._write(encode_with_timestamps(b"", times) + b"\n")
        await self._end()
