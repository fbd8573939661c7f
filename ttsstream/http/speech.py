"""The HTTP speech API: ``/tts`` and OpenAI's ``/v1/audio/speech``, streamed, and
OpenAI's model and voice lists.

Both endpoints run the same utterance as a WebSocket ``speak``
(:class:`~ttsstream.core.utterance.Utterances`), with the same admission, cache,
shared syntheses, fallback and limits; only the sink differs. Audio is written
as it arrives (:class:`~ttsstream.http.streams.StreamBody`): the status and
headers go out with the first audio bytes, so an error before them is a proper
status and body. A cached text is answered at once with its ``Content-Length``.
After the first bytes, a failure ends the stream early: the connection is
dropped before the chunked body's end (SSE: a last ``error`` event), and the
access log says so.

OpenAI's routes are served under ``/v1`` and without it (``/audio/speech``,
``/models``…): clients are configured with either base URL. With
``PUBLIC_LISTS`` the lists answer without a key.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from typing import Any, Literal

import orjson
from aiohttp import web

from ttsstream.audio.formats import MP3
from ttsstream.core.fields import (
    cleanup_field,
    format_field,
    prosody_fields,
    text_field,
    voice_field,
    without_nulls,
)
from ttsstream.core.router import Started
from ttsstream.core.ssml import SsmlDocument, is_ssml
from ttsstream.core.usage import Tally
from ttsstream.core.utterance import Summary
from ttsstream.engines.base import SynthesisRequest, WordEvent, word_fields
from ttsstream.exceptions import (
    BadMessage,
    ClientError,
    EndpointNotFound,
    InvalidParameter,
    InvalidVoice,
    UnsupportedFormat,
    UsageUnavailable,
)
from ttsstream.http.errors import error_body
from ttsstream.http.openai import (
    MODELS,
    model_named,
    model_object,
    read_speech_call,
    voice_listing,
    voice_table,
)
from ttsstream.http.request import judge
from ttsstream.http.streams import (
    SSML_TYPE,
    Asked,
    BodyArgs,
    HttpStreams,
    StreamBody,
    json_body,
    ssml_body,
)
from ttsstream.services import Services

__all__ = ["SpeechApi"]

#: OpenAI's routes are served under this prefix and without it.
_OPENAI_PREFIXES = ("/v1", "")
#: Where a client learns the voices, as an unknown voice's error says.
_VOICES_PATH = "/v1/audio/voices"
#: A month of ``GET /v1/usage?month=``.
_MONTH = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


class SpeechApi:
    """The handlers of the HTTP speech API, over the server's services.

    Args:
        services: The server's parts.
    """

    def __init__(self, services: Services) -> None:
        self._services = services
        self._config = services.config
        self._voices = voice_table(services.config.voice_map)
        #: The door: its streams, for a drain.
        self.streams = HttpStreams(services, "http")

    def routes(self, app: web.Application) -> None:
        """Add the API's routes to ``app``."""
        app.router.add_post("/tts", self.tts)
        # No HEAD: it would synthesize a body only to drop it.
        app.router.add_get("/tts", self.tts, allow_head=False)
        app.router.add_route("OPTIONS", "/tts", self.streams.preflight)
        for prefix in _OPENAI_PREFIXES:
            app.router.add_post(prefix + "/audio/speech", self.openai_speech)
            app.router.add_get(prefix + "/models", self.models)
            app.router.add_get(prefix + "/models/{model}", self.model)
            app.router.add_get(prefix + "/audio/models", self.audio_models)
            app.router.add_get(prefix + "/audio/voices", self.voices)
            for path in ("/audio/speech", "/models", "/models/{model}", "/audio/models"):
                app.router.add_route("OPTIONS", prefix + path, self.streams.preflight)
            app.router.add_route("OPTIONS", prefix + "/audio/voices", self.streams.preflight)
        app.router.add_get("/v1/usage", self.usage)
        app.router.add_route("OPTIONS", "/v1/usage", self.streams.preflight)

    # The door

    @property
    def doors(self) -> list[HttpStreams]:
        return [self.streams]

    # Endpoints

    async def tts(self, request: web.Request) -> web.StreamResponse:
        """``POST /tts`` (JSON body) or ``GET /tts?text=…``: the audio, streamed."""

        async def read() -> Asked:
            utterances = self._services.utterances
            if request.method == "POST" and request.content_type == SSML_TYPE:
                # An SSML body; the format in the query (?format=opus).
                audio_format = format_field(request.query.get("format"), unknown=UnsupportedFormat)
                synthesis, document = utterances.ssml(await ssml_body(request))
                await self._accept(synthesis, document)
                return Asked(synthesis, audio_format, document=document)
            fields: Any = await json_body(request) if request.method == "POST" else request.query
            if not isinstance(fields, dict) and request.method == "POST":
                raise BadMessage("the body must be a JSON object")
            if isinstance(fields, dict):
                fields = without_nulls(fields)
            audio_format = format_field(fields.get("format"), unknown=UnsupportedFormat)
            ssml = fields.get("ssml")
            if ssml is not None:
                if not isinstance(ssml, str) or "text" in fields:
                    raise BadMessage('"ssml" is an SSML document, and comes without "text"')
                synthesis, document = utterances.ssml(ssml, voice=voice_field(fields.get("voice")))
                await self._accept(synthesis, document)
                return Asked(synthesis, audio_format, document=document)
            text = text_field(fields.get("text"), max_length=self._config.max_text_length)
            prosody = prosody_fields(fields)
            synthesis = utterances.request(
                text=text,
                voice=voice_field(fields.get("voice")),
                cleanup=cleanup_field(fields.get("cleanup")),
                **prosody,
            )
            await self._accept(synthesis)
            return Asked(synthesis, audio_format)

        return await self.streams.serve(request, "tts", read, _Body)

    async def openai_speech(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/audio/speech``: OpenAI's contract, audio or server-sent events."""

        async def read() -> Asked:
            body = await json_body(request)
            if not isinstance(body, dict):
                raise BadMessage("the body must be a JSON object")
            call = read_speech_call(
                body, voices=self._voices, max_text_length=self._config.max_text_length
            )
            utterances = self._services.utterances
            if self._config.ssml_in_openai and is_ssml(call.text):
                synthesis, document = utterances.ssml(call.text, voice=call.voice)
                await self._accept(synthesis, document)
                return Asked(synthesis, call.format, call.sse, call.timestamps, document=document)
            synthesis = utterances.request(
                text=call.text, voice=call.voice, rate=call.rate, cleanup=call.cleanup
            )
            await self._accept(synthesis)
            return Asked(synthesis, call.format, call.sse, call.timestamps)

        return await self.streams.serve(
            request,
            "openai",
            read,
            _Body,
            words=lambda asked: "batch" if asked.timestamps else "none",
        )

    async def usage(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/usage[?month=2026-12]``: the calling key's own usage in a month (this
        one by default), by door, with its limits and what is left of its quotas."""
        judged = await judge(self._services.admission, request)
        if judged.refused is not None:
            return self.streams.refused(judged, "tts")
        self._services.admission.release(judged.client, judged.principal)
        month = request.query.get("month")
        if month is not None and not _MONTH.fullmatch(month):
            return self.streams.error(
                request, InvalidParameter("month must be a month such as 2026-12"), "tts"
            )
        services = self._services
        principal = services.keys.current(judged.principal)
        usage = services.usage
        try:
            report = await usage.report(principal.name, month)
            quota = await usage.remaining(principal)
        except Exception:
            refusal = UsageUnavailable("the stored usage cannot be read now; try again later")
            return self.streams.error(request, refusal, "tts")
        tenants = report["tenants"]
        assert isinstance(tenants, dict)
        counts = tenants.get(principal.name) or {**Tally().as_dict(), "doors": {}}
        return self.streams.json(
            request,
            {
                "tenant": principal.name,
                "month": report["month"],
                **counts,
                "limits": services.admission.limits_of(principal),
                "quota": quota,
            },
        )

    async def models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models``: OpenAI's model names, in OpenAI's list shape (any name is
        accepted by ``/v1/audio/speech``; these are the ones known)."""
        refused = await self.streams.admit_list(request, "openai")
        if refused is not None:
            return refused
        return self.streams.json(
            request, {"object": "list", "data": [model_object(model) for model in MODELS]}
        )

    async def model(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models/{model}``: a listed model's object; 404 for another name."""
        refused = await self.streams.admit_list(request, "openai")
        if refused is not None:
            return refused
        name = request.match_info["model"]
        model = model_named(name)
        if model is None:
            unknown = EndpointNotFound(f'no model "{name}" is listed: GET /v1/models lists them')
            return self.streams.error(request, unknown, "openai")
        return self.streams.json(request, model_object(model))

    async def audio_models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/audio/models``: the model names as Open WebUI reads them
        (``{"models": [{"id": …}]}``)."""
        refused = await self.streams.admit_list(request, "openai")
        if refused is not None:
            return refused
        return self.streams.json(request, {"models": [{"id": model} for model in MODELS]})

    async def voices(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/audio/voices[?locale=…]``: every name ``voice`` accepts, OpenAI's names
        (with what they map to) first, each with its ``id`` and a ``name`` for people."""
        refused = await self.streams.admit_list(request, "openai")
        if refused is not None:
            return refused
        try:
            voices = await self._services.speech.voices()
        except ClientError as exc:
            return self.streams.error(request, exc, "openai")
        listing = voice_listing(voices, self._voices, locale=request.query.get("locale"))
        return self.streams.json(request, listing)

    async def _accept(
        self, synthesis: SynthesisRequest, document: SsmlDocument | None = None
    ) -> None:
        """Accept an utterance; an unknown voice's error names it, and where the list is.

        Raises:
            ClientError: As :meth:`Utterances.accept`; ``param`` is ``voice`` for a voice.
        """
        try:
            await self._services.utterances.accept(synthesis, document=document)
        except InvalidVoice as exc:
            exc.message = (
                f'{exc.message}: "{synthesis.voice}" (GET {_VOICES_PATH} lists them; '
                "OpenAI's names such as alloy are for /v1/audio/speech)"
            )
            exc.param = "voice"
            raise


class _Body(StreamBody):
    """A ``/tts`` or ``/v1/audio/speech`` body: the audio bytes as they come, or OpenAI's
    server-sent events."""

    def __init__(self, asked: Asked, args: BodyArgs) -> None:
        super().__init__(asked, args)
        self._text_length = len(asked.synthesis.text)
        self._sse = asked.sse
        self._timestamps = asked.timestamps
        #: A replay's audio (slices of the cache entry), written at once with its length
        #: at the end.
        self._replay: list[bytes | memoryview] | None = None

    async def start(self, started: Started) -> None:
        await super().start(started)
        # A stored entry (the MP3, or a format made from it once and stored beside it).
        stored = started.audio_format.name == MP3.name or started.audio_ms is not None
        if started.cached and not self._sse and stored:
            self._replay = []

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        if self._replay is not None:
            self._replay.append(data)
            return
        if self._sse:
            encoded = base64.b64encode(data).decode()
            await self._write(_event({"type": "speech.audio.delta", "audio": encoded}))
        else:
            await self._write(data)

    async def words(self, words: Sequence[WordEvent]) -> None:
        if self._sse and self._timestamps:
            await self._write(
                _event({"type": "speech.words", "words": [word_fields(word) for word in words]})
            )

    async def end(self, summary: Summary) -> None:
        if self._replay is not None:
            # The entry's own slices, with its length: no copy, no chunked encoding; a
            # byte range of it when asked (an <audio> element seeking).
            chunks, self._replay = self._replay, None
            await self._answer_stored(chunks, summary.byte_count)
            return
        elif self._sse:
            text_length = self._text_length
            await self._write(
                _event(
                    {
                        "type": "speech.audio.done",
                        "usage": {
                            "input_tokens": text_length,
                            "output_tokens": round(summary.audio_ms),
                            "total_tokens": text_length + round(summary.audio_ms),
                        },
                    }
                )
            )
        await self._end()

    async def _answer_stored(self, chunks: list[bytes | memoryview], total: int) -> None:
        """A stored entry, whole or the byte range asked (``Range``), with its ``ETag``;
        304 when the client has it (``If-None-Match``), 416 for a range past its end."""
        request = self._request
        digest = hashlib.blake2b(digest_size=16)
        for chunk in chunks:
            digest.update(chunk)
        etag = f'"{digest.hexdigest()}"'
        extra = {"Accept-Ranges": "bytes", "ETag": etag}
        held = _etags(request.headers.get("If-None-Match"))
        if etag in held or "*" in held:
            self.response = web.Response(status=304, headers={**self.headers(), **extra})
            del self.response.headers["Content-Type"]
            return
        wanted = _range(request, etag, total)
        if wanted is None:
            await self._begin(content_length=total, extra=extra)
            for chunk in chunks:
                await self._write(chunk)
        elif wanted == "unsatisfiable":
            self.response = web.Response(
                status=416,
                headers={**self.headers(), **extra, "Content-Range": f"bytes */{total}"},
            )
            return
        else:
            start, stop = wanted
            extra["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
            await self._begin(content_length=stop - start, status=206, extra=extra)
            offset = 0
            for chunk in chunks:
                end = offset + len(chunk)
                if end > start and offset < stop:
                    await self._write(
                        chunk[max(0, start - offset) : min(len(chunk), stop - offset)]
                    )
                offset = end
        await self._end()

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        if self._stream is not None and self._sse:
            error = orjson.loads(error_body(exc, "openai"))["error"]
            await self._write(_event({"type": "error", "error": error}))
            await self._stream.write_eof()
            return
        await super().fail(exc, partial=partial)

    @property
    def content_type(self) -> str:
        return "text/event-stream" if self._sse else super().content_type

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self._sse:
            headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return headers


def _event(message: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(message) + b"\n\n"


def _etags(header: str | None) -> set[str]:
    """The entity tags of an ``If-None-Match`` (weak ones compared as strong: RFC 9110's
    weak comparison, which it asks for)."""
    if header is None:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


def _range(
    request: web.BaseRequest, etag: str, total: int
) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The byte range ``[start, stop)`` a request asks of an entry of ``total`` bytes;
    ``None`` for the whole (no ``Range``, several ranges, a malformed one, or an
    ``If-Range`` that is not this entry's tag: RFC 9110 lets a server answer those with
    the whole); ``"unsatisfiable"`` for a range past its end (416)."""
    header = request.headers.get("Range")
    if header is None or "," in header:
        return None
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        return None
    try:
        wanted = request.http_range  # aiohttp's parser: bytes=a-b, a-, -n
    except ValueError:
        return None
    start, stop = wanted.start, wanted.stop
    if start is None:
        return None
    if start < 0:  # the last -start bytes
        start = max(0, total + start)
        stop = total
    if start >= total:
        return "unsatisfiable"
    return start, min(total if stop is None else stop, total)
