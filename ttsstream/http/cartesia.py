"""Cartesia's HTTP API on the main port, for clients written for Cartesia (its SDK,
Pipecat's ``CartesiaHttpTTSService``, LiveKit's plugin).

- ``POST /tts/bytes``: the audio, streamed as it is made, with the
  ``Content-Type`` of the ``output_format`` asked.
- ``POST /tts/sse``: Cartesia's server-sent events, streamed: ``chunk`` (base64
  audio), ``timestamps`` (words in seconds, just before the audio they describe,
  when ``add_timestamps`` asked), then ``done``; a failure after the first event
  is a last ``error`` event.
- ``GET /voices``: the voices as the SDK's paginated ``voices.list()`` reads them.

The body is read by :func:`~ttsstream.protocols.cartesia.parse_http_request`.
Errors before the first bytes (refusals, bad bodies, unknown voices) are answered
with their status and Cartesia's error shape (:func:`~ttsstream.http.errors.error_body`,
``"cartesia"``). ``Cartesia-Version`` is accepted whatever it says.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import orjson
from aiohttp import web

from ttsstream.core.utterance import Summary
from ttsstream.engines.base import SynthesisRequest, WordEvent
from ttsstream.exceptions import BadMessage, ClientError, InvalidVoice
from ttsstream.http.streams import Asked, BodyArgs, HttpStreams, StreamBody, json_body
from ttsstream.protocols.actions import Speak
from ttsstream.protocols.cartesia import (
    encode_chunk,
    encode_done,
    encode_error,
    encode_timestamps,
    encode_voices,
    parse_http_request,
    sse_event,
)
from ttsstream.services import Services

__all__ = ["CartesiaApi"]

#: Where a client learns the voices, as an unknown voice's error says.
_VOICES_PATH = "/voices"


class CartesiaApi:
    """The handlers of Cartesia's HTTP API, over the server's services.

    Args:
        services: The server's parts.
    """

    def __init__(self, services: Services) -> None:
        self._services = services
        self._config = services.config
        #: The door: its streams, for a drain.
        self.streams = HttpStreams(services, "cartesia")

    def routes(self, app: web.Application) -> None:
        """Add the API's routes to ``app``."""
        app.router.add_post("/tts/bytes", self.tts_bytes)
        app.router.add_post("/tts/sse", self.tts_sse)
        app.router.add_get(_VOICES_PATH, self.voices)
        for path in ("/tts/bytes", "/tts/sse", _VOICES_PATH):
            app.router.add_route("OPTIONS", path, self.streams.preflight)

    # The door

    @property
    def doors(self) -> list[HttpStreams]:
        return [self.streams]

    # Endpoints

    async def tts_bytes(self, request: web.Request) -> web.StreamResponse:
        """``POST /tts/bytes``: the audio, streamed."""
        return await self._speak(request, sse=False)

    async def tts_sse(self, request: web.Request) -> web.StreamResponse:
        """``POST /tts/sse``: the audio and words as Cartesia's server-sent events."""
        return await self._speak(request, sse=True)

    async def voices(self, request: web.Request) -> web.StreamResponse:
        """``GET /voices``: one page of the voices (``limit``, ``starting_after``,
        ``ending_before``, filters ``q``, ``gender``, ``language``)."""
        refused = await self.streams.admit_list(request, "cartesia")
        if refused is not None:
            return refused
        try:
            page = encode_voices(await self._services.speech.voices(), dict(request.query))
        except ClientError as exc:
            return self.streams.error(request, exc, "cartesia")
        return web.Response(
            body=page, content_type="application/json", headers=self.streams.cors(request)
        )

    async def _speak(self, request: web.Request, *, sse: bool) -> web.StreamResponse:
        asked_for: list[Speak] = []

        async def read() -> Asked:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise BadMessage("the body must be a JSON object")
            speak = parse_http_request(
                orjson.dumps(body),
                max_text_length=self._config.max_text_length,
                make_id=lambda: "c-" + secrets.token_hex(6),
                timestamps=sse,
                aliases=[name for name, _ in self._config.voice_map],
            )
            asked_for.append(speak)
            synthesis = self._services.utterances.request(
                text=speak.text,
                voice=speak.voice,
                rate=speak.rate,
                volume=speak.volume,
                pitch=speak.pitch,
                cleanup=speak.cleanup,
            )
            await self._accept(synthesis, speak)
            return Asked(synthesis, speak.format, sse, speak.words == "batch", text=speak.text)

        def body(asked: Asked, args: BodyArgs) -> StreamBody:
            if not asked.sse:
                return StreamBody(asked, args)
            (speak,) = asked_for
            return _Events(asked, args, context_id=speak.id if speak.id_given else None)

        return await self.streams.serve(
            request,
            "cartesia",
            read,
            body,
            words=lambda asked: "batch" if asked.timestamps else "none",
        )

    async def _accept(self, synthesis: SynthesisRequest, speak: Speak) -> None:
        """Accept an utterance; an unknown voice's error names it, and where the list is."""
        try:
            await self._services.utterances.accept(synthesis)
        except InvalidVoice as exc:
            exc.message = f'{exc.message}: "{speak.voice}" (GET {_VOICES_PATH} lists them)'
            exc.param = "voice"
            raise


class _Events(StreamBody):
    """A ``/tts/sse`` body: Cartesia's events as they come."""

    def __init__(self, asked: Asked, args: BodyArgs, *, context_id: str | None) -> None:
        super().__init__(asked, args)
        self._context_id = context_id
        #: The transcript as sent (what the words' character ranges index).
        self._text = asked.text

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        await self._write(sse_event("chunk", encode_chunk(self._context_id, data)))

    async def words(self, words: Sequence[WordEvent]) -> None:
        timestamps = encode_timestamps(self._context_id, words, self._text)
        await self._write(sse_event("timestamps", timestamps))

    async def end(self, summary: Summary) -> None:
        await self._write(sse_event("done", encode_done(self._context_id)))
        await self._end()

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        if self._stream is None:
            await super().fail(exc, partial=partial)
            return
        if isinstance(exc, ClientError):
            exc.utterance_id = self._context_id
        error = encode_error(
            exc, context_id=self._context_id, request_id=self._request_id, partial=partial
        )
        await self._write(sse_event("error", error))
        await self._end()

    @property
    def content_type(self) -> str:
        return "text/event-stream"

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return headers
