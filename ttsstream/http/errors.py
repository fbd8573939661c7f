"""The one place where errors become HTTP responses: status, and the two body shapes.

``/tts`` answers with the protocol's shape ``{"error": code, "message": …}``;
OpenAI's endpoints (``/v1/…``) with OpenAI's ``{"error": {"message", "type",
"param", "code"}}``, so that its SDKs raise the right exception. The ``code`` is
always the protocol's stable code.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson

from ttsstream.exceptions import ClientError, HandshakeRefused, RateLimited, error_code

__all__ = ["Shape", "error_body", "status_of"]

#: Which body shape an endpoint answers errors with.
Shape = Literal["tts", "openai"]

_STATUS = {
    "bad_json": 400,
    "bad_message": 400,
    "empty_text": 400,
    "text_too_long": 400,
    "invalid_voice": 400,
    "invalid_parameter": 400,
    "unsupported_format": 400,
    "body_timeout": 408,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "shutting_down": 503,
    "upstream_unavailable": 503,
    "no_audio": 502,
    "upstream_bad_audio": 502,
    "upstream_timeout": 504,
    "internal": 500,
}

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


def status_of(exc: BaseException) -> int:
    """The HTTP status of an error."""
    if isinstance(exc, HandshakeRefused):
        return exc.status
    return _STATUS.get(error_code(exc), 500)


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
    status = status_of(exc)
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "server_error"),
                "param": exc.param if isinstance(exc, ClientError) else None,
                "code": code,
            }
        }
    )
