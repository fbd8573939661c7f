"""Azure Speech's text to speech REST API on the main port, for apps written for Azure.

- ``POST /cognitiveservices/v1``: an SSML body (:mod:`ttsstream.core.ssml`), the
  format in ``X-Microsoft-OutputFormat`` (:mod:`ttsstream.protocols.azure`); the
  audio, streamed as it is made.
- ``GET /cognitiveservices/voices/list``: the voices in Azure's shape.
- ``POST /sts/v1.0/issueToken``: the token Azure's clients trade their key for; here
  the key itself, which then opens the API as ``Authorization: Bearer``.

The key: ``Ocp-Apim-Subscription-Key`` or ``Authorization: Bearer`` (or any of
ttsstream's forms). Errors before the first bytes are answered with their status
and Azure's ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

from aiohttp import web

from ttsstream.core.auth import offered_key
from ttsstream.exceptions import ClientError
from ttsstream.http.request import RequestHeaders, judge
from ttsstream.http.streams import Asked, HttpStreams, StreamBody, ssml_body
from ttsstream.protocols.azure import encode_voices, output_format
from ttsstream.services import Services

__all__ = ["AzureApi"]

SPEAK_PATH = "/cognitiveservices/v1"
VOICES_PATH = "/cognitiveservices/voices/list"
TOKEN_PATH = "/sts/v1.0/issueToken"


class AzureApi:
    """The handlers of Azure's text to speech REST API, over the server's services."""

    def __init__(self, services: Services) -> None:
        self._services = services
        #: The door: its streams, for a drain.
        self.streams = HttpStreams(services, "azure")

    def routes(self, app: web.Application) -> None:
        """Add the API's routes to ``app``."""
        app.router.add_post(SPEAK_PATH, self.speak)
        app.router.add_get(VOICES_PATH, self.voices)
        app.router.add_post(TOKEN_PATH, self.issue_token)
        for path in (SPEAK_PATH, VOICES_PATH, TOKEN_PATH):
            app.router.add_route("OPTIONS", path, self.streams.preflight)

    @property
    def doors(self) -> list[HttpStreams]:
        return [self.streams]

    async def speak(self, request: web.Request) -> web.StreamResponse:
        """``POST /cognitiveservices/v1``: the SSML body spoken, streamed."""

        async def read() -> Asked:
            audio_format = output_format(request.headers.get("X-Microsoft-OutputFormat"))
            utterances = self._services.utterances
            synthesis, document = utterances.ssml(await ssml_body(request))
            await utterances.accept(synthesis, document=document)
            return Asked(synthesis, audio_format, document=document)

        return await self.streams.serve(request, "azure", read, StreamBody)

    async def voices(self, request: web.Request) -> web.StreamResponse:
        """``GET /cognitiveservices/voices/list``."""
        refused = await self.streams.admit_list(request, "azure")
        if refused is not None:
            return refused
        try:
            voices = await self._services.speech.voices()
        except ClientError as exc:
            return self.streams.error(request, exc, "azure")
        return web.Response(
            body=encode_voices(voices),
            content_type="application/json",
            headers=self.streams.cors(request),
        )

    async def issue_token(self, request: web.Request) -> web.StreamResponse:
        """``POST /sts/v1.0/issueToken``: the token for ``Authorization: Bearer`` (the
        key the request proved; none on a server without keys)."""
        judged = await judge(self._services.admission, request)
        if judged.refused is not None:
            return self.streams.refused(judged, "azure")
        self._services.admission.release(judged.client, judged.principal)
        key = offered_key(RequestHeaders(request.headers), request.path_qs) or ""
        headers = {"Cache-Control": "no-store", **self.streams.cors(request)}
        return web.Response(text=key, content_type="text/plain", headers=headers)
