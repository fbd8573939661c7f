"""The one place where errors become HTTP responses: status, and the body shapes.

``/tts`` (and every path that is not OpenAI's) answers with the protocol's shape
``{"error": code, "message": …}``; OpenAI's paths (:func:`shape_of`: ``/v1/…``
but the WebSocket's ``/v1/stream``, and the same routes without ``/v1``) with
OpenAI's ``{"error": {"message", "type", "param", "code"}}``, so that its SDKs
raise the right exception: the endpoints' own errors, refusals, and aiohttp's
404, 405 and 413 or a later request head's 431 (:func:`in_shape_of`).
ElevenLabs' paths answer ``{"detail": {"status", "message"}}`` and Cartesia's
``{"error", "message", "status_code"}``. The ``code`` is always the protocol's
stable code.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from aiohttp import web

from ttsstream.exceptions import ClientError, HandshakeRefused, RateLimited, http_status

__all__ = ["Shape", "error_body", "in_shape_of", "openai_body", "shape_of", "status_of"]

#: Which body shape an endpoint answers errors with.
Shape = Literal["tts", "openai", "elevenlabs", "cartesia", "azure"]


#: OpenAI's error ``type`` by status class.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}

#: The WebSocket's endpoint: its refusals keep the protocol's shape (the browser client
#: reads them), though under ``/v1/``.
_STREAM_PATH = "/v1/stream"
#: OpenAI's routes are served under ``/v1`` and without it (clients are configured with
#: either base URL): the folders of OpenAI's paths.
_OPENAI_ROOTS = ("/v1", "/audio", "/models")
#: ElevenLabs' paths (its API is served under the same ``/v1`` as OpenAI's).
_ELEVENLABS_ROOTS = ("/v1/text-to-speech/", "/v1/voices")
#: ttsstream's own paths under ``/v1`` (its error shape, not OpenAI's).
_TTSSTREAM_PATHS = ("/v1/usage",)
#: Azure's paths.
_AZURE_ROOTS = ("/cognitiveservices/", "/sts/")
#: Cartesia's paths.
_CARTESIA_ROOTS = ("/tts/bytes", "/tts/sse", "/tts/websocket", "/voices")


def shape_of(path: str) -> Shape:
    """The error shape of a request for ``path``: OpenAI's for OpenAI's paths, ElevenLabs'
    and Cartesia's for theirs."""
    if path == _STREAM_PATH:
        return "tts"
    if path in _TTSSTREAM_PATHS:
        return "tts"
    if path.startswith(_AZURE_ROOTS):
        return "azure"
    if path.startswith(_ELEVENLABS_ROOTS):
        return "elevenlabs"
    if path.startswith(_CARTESIA_ROOTS):
        return "cartesia"
    if path in _OPENAI_ROOTS or path.startswith(tuple(root + "/" for root in _OPENAI_ROOTS)):
        return "openai"
    return "tts"


def in_shape_of(path: str, response: web.StreamResponse) -> web.StreamResponse:
    """``response``, its error body in ``path``'s shape: an answer made without knowing
    the path (aiohttp's 404, 405, 413; a later head's 431) is made in the protocol's
    shape, which an OpenAI path turns into OpenAI's."""
    shape = shape_of(path)
    if (
        response.status < 400
        or shape == "tts"
        or not isinstance(response, web.Response)
        or not isinstance(response.body, bytes)
    ):
        return response
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return response
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code, message = body["error"], str(body.get("message"))
        if shape == "openai":
            response.body = openai_body(response.status, code, message)
        else:
            response.body = _shaped(shape, response.status, code, message)
    return response


def status_of(exc: BaseException) -> int:
    """The HTTP status of an error."""
    return http_status(exc)


def error_body(exc: BaseException, shape: Shape) -> bytes:
    """The JSON body of an error, in the endpoint's shape; it reveals no internals."""
    code = exc.code if isinstance(exc, ClientError | HandshakeRefused) else "internal"
    message = (
        exc.message
        if isinstance(exc, ClientError | HandshakeRefused)
        else ("internal server error")
    )
    if shape == "tts":
        body: dict[str, Any] = {"error": code, "message": message}
        if isinstance(exc, RateLimited):
            body["retry_after"] = exc.retry_after
        return orjson.dumps(body)
    if shape in ("elevenlabs", "cartesia", "azure"):
        return _shaped(shape, status_of(exc), code, message)
    return openai_body(
        status_of(exc), code, message, param=exc.param if isinstance(exc, ClientError) else None
    )


def openai_body(status: int, code: str, message: str, *, param: str | None = None) -> bytes:
    """OpenAI's error body: ``type`` by ``status``, ``code`` the protocol's."""
    default = "invalid_request_error" if status < 500 else "server_error"
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, default),
                "param": param,
                "code": code,
            }
        }
    )


def _shaped(shape: Shape, status: int, code: str, message: str) -> bytes:
    """ElevenLabs' ``{"detail": {"status", "message"}}`` (what its SDK raises with), or
    Cartesia's ``{"error", "message", "status_code"}``; ``code`` is the protocol's."""
    if shape == "elevenlabs":
        return orjson.dumps({"detail": {"status": code, "message": message}})
    if shape == "azure":
        return orjson.dumps({"error": {"code": code, "message": message}})
    return orjson.dumps({"error": code, "message": message, "status_code": status})
