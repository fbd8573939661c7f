"""Every exception ttsstream raises on purpose.

Each error a client can see carries its stable wire ``code`` (``docs/protocol.md``),
the same on every door. One place per door family turns an exception into what its
clients read: each WebSocket protocol's ``encode_error``
(:mod:`ttsstream.protocols.v1`, ``.elevenlabs``, ``.cartesia``), every HTTP door's
status and body (:mod:`ttsstream.http.errors`), and a refused handshake's answer
(:func:`ttsstream.core.admission.encode_refusal`).

.. code-block:: text

    TTSStreamError
    ├── ConfigError                 a setting is invalid (never reaches a client)
    │   └── KeysFileError               API_KEYS_FILE cannot be read or is not valid
    ├── HandshakeRefused            the handshake is answered with an HTTP error, no upgrade
    │   ├── EndpointNotFound            404 not_found
    │   ├── Unauthorized                401 unauthorized
    │   ├── AmbiguousKey                400 ambiguous_key (two different keys offered)
    │   ├── OriginNotAllowed            403 origin_not_allowed
    │   ├── TooManyConnections          429 too_many_connections (per IP)
    │   └── ServerFull                  503 server_full
    └── ClientError                 reported to the client as {"type":"error"}
        ├── RequestError            the client's message is at fault
        │   ├── BadJSON                 bad_json
        │   ├── BadMessage              bad_message
        │   ├── EmptyText               empty_text
        │   ├── TextTooLong             text_too_long
        │   ├── InvalidVoice            invalid_voice
        │   ├── InvalidParameter        invalid_parameter
        │   ├── SsmlInvalid             ssml_invalid (malformed or past a bound)
        │   ├── SsmlUnsupported         ssml_unsupported (an element Edge cannot speak)
        │   ├── UnsupportedFormat       unsupported_format
        │   ├── BodyTooLarge            body_too_large (HTTP)
        │   ├── BodyTimeout             body_timeout (HTTP)
        │   ├── UnsupportedMediaType    unsupported_media_type (HTTP)
        │   ├── QueueFull               queue_full
        │   ├── NotFound                not_found
        │   ├── RateLimited             rate_limited (429 with Retry-After at the handshake)
        │   │   └── QuotaExceeded           quota_exceeded (a tenant's characters per day/month)
        │   ├── VoiceNotAllowed         voice_not_allowed (not among the tenant's voices)
        │   ├── KeyRevoked              key_revoked (the key was revoked while in use)
        │   ├── KeyRefused              unauthorized (a key sent in a first message)
        │   ├── ResumeFailed            resume_failed (a session that cannot be resumed)
        │   ├── UsageUnavailable        usage_unavailable (GET /v1/usage while its store fails)
        │   └── ShuttingDown            shutting_down
        └── UpstreamError           the speech service failed
            ├── UpstreamUnavailable     upstream_unavailable
            ├── UpstreamTimeout         upstream_timeout
            ├── UpstreamBadAudio        upstream_bad_audio (its MP3 does not decode)
            └── NoAudio                 no_audio

Anything else that escapes a handler is reported as ``internal``.
"""

from __future__ import annotations

__all__ = [
    "HTTP_STATUS",
    "AmbiguousKey",
    "BadJSON",
    "BadMessage",
    "BodyTimeout",
    "BodyTooLarge",
    "ClientError",
    "ConfigError",
    "EmptyText",
    "EndpointNotFound",
    "HandshakeRefused",
    "InvalidParameter",
    "InvalidVoice",
    "KeyRefused",
    "KeyRevoked",
    "KeysFileError",
    "NoAudio",
    "NotFound",
    "OriginNotAllowed",
    "QueueFull",
    "QuotaExceeded",
    "RateLimited",
    "RequestError",
    "ResumeFailed",
    "ServerFull",
    "ShuttingDown",
    "SsmlInvalid",
    "SsmlUnsupported",
    "TTSStreamError",
    "TextTooLong",
    "TooManyConnections",
    "Unauthorized",
    "UnsupportedFormat",
    "UnsupportedMediaType",
    "UpstreamBadAudio",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UsageUnavailable",
    "VoiceNotAllowed",
    "error_code",
    "http_status",
]


class TTSStreamError(Exception):
    """Base class of every ttsstream exception."""


class ConfigError(TTSStreamError):
    """A configuration variable has a value the server cannot use."""

    def __init__(self, variable: str, value: str, expected: str, *, source: str = "") -> None:
        super().__init__(variable, value, expected)
        self.variable = variable
        self.value = value
        self.expected = expected
        #: Where the value came from, when not the environment (``" (from .env)"``).
        self.source = source

    def __str__(self) -> str:
        return f"{self.variable}={self.value!r}{self.source} is invalid: expected {self.expected}"


class KeysFileError(ConfigError):
    """``API_KEYS_FILE`` cannot be read, or is not a valid tenants file."""

    def __init__(self, problem: str) -> None:
        super().__init__("API_KEYS_FILE", "", problem)
        self.problem = problem

    def __str__(self) -> str:
        return self.problem


class CannotListen(TTSStreamError):
    """A port the configuration names cannot be listened on."""

    def __init__(self, variable: str, address: str, port: int, reason: str) -> None:
        super().__init__(variable, address, port, reason)
        self.variable = variable
        self.address = address
        self.port = port
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot listen on {self.address}:{self.port} ({self.variable}): {self.reason}"


class HandshakeRefused(TTSStreamError):
    """A handshake the server answers with an HTTP error instead of upgrading."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class EndpointNotFound(HandshakeRefused):
    """The handshake asked for a path that is not an endpoint."""

    status = 404
    code = "not_found"


class Unauthorized(HandshakeRefused):
    """No valid API key came with the handshake."""

    status = 401
    code = "unauthorized"


class AmbiguousKey(HandshakeRefused):
    """The request offered two different API keys: one request tries one key."""

    status = 400
    code = "ambiguous_key"


class OriginNotAllowed(HandshakeRefused):
    """A browser handshake from an origin not in ``ALLOWED_ORIGINS``."""

    status = 403
    code = "origin_not_allowed"


class TooManyConnections(HandshakeRefused):
    """The client IP already has ``MAX_CONNECTIONS_PER_IP`` open connections."""

    status = 429
    code = "too_many_connections"


class ServerFull(HandshakeRefused):
    """The server already has ``MAX_CONNECTIONS`` open connections."""

    status = 503
    code = "server_full"


class ClientError(TTSStreamError):
    """An error reported to the client with a stable code and a short message.

    The message is safe to send: it never holds internals, keys or stack traces.
    """

    code = "internal"

    def __init__(self, message: str, *, utterance_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.utterance_id = utterance_id
        #: The ``type`` of the client message it answers, when known.
        self.message_type: str | None = None
        #: The request field at fault, when one is (OpenAI's error ``param``).
        self.param: str | None = None

    def __str__(self) -> str:
        return self.message


class RequestError(ClientError):
    """The client sent something the server refuses."""


class BadJSON(RequestError):
    """A text frame is not valid JSON."""

    code = "bad_json"


class BadMessage(RequestError):
    """A frame is valid JSON but not a valid protocol message."""

    code = "bad_message"


class EmptyText(RequestError):
    """A ``speak`` has no speakable text."""

    code = "empty_text"


class TextTooLong(RequestError):
    """A ``speak`` text is longer than ``MAX_TEXT_LENGTH`` characters."""

    code = "text_too_long"


class InvalidVoice(RequestError):
    """A ``speak`` names a voice that does not exist."""

    code = "invalid_voice"


class InvalidParameter(RequestError):
    """A field has the right type but a value outside its accepted form."""

    code = "invalid_parameter"


class SsmlInvalid(RequestError):
    """An SSML document that is not well-formed, not ``<speak>``, or past a bound
    (its size, depth, spans, breaks)."""

    code = "ssml_invalid"


class SsmlUnsupported(RequestError):
    """An SSML element or attribute Edge cannot speak (``mstts:*``, ``<audio>``…)."""

    code = "ssml_unsupported"


class UnsupportedFormat(RequestError):
    """An audio format the server does not produce (yet)."""

    code = "unsupported_format"


class BodyTooLarge(RequestError):
    """An HTTP request body over 64 KiB."""

    code = "body_too_large"


class BodyTimeout(RequestError):
    """An HTTP request body that did not arrive whole within its deadline."""

    code = "body_timeout"


class UnsupportedMediaType(RequestError):
    """An HTTP request body that is not JSON."""

    code = "unsupported_media_type"


class QueueFull(RequestError):
    """The connection already has the maximum number of queued utterances."""

    code = "queue_full"


class NotFound(RequestError):
    """A ``cancel`` names an utterance that is neither queued nor playing."""

    code = "not_found"


class RateLimited(RequestError):
    """The client IP made more than ``RATE_LIMIT_REQUESTS`` in ``RATE_LIMIT_WINDOW``."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, utterance_id: str | None = None) -> None:
        super().__init__(message, utterance_id=utterance_id)
        #: Whole seconds until a request would be allowed again.
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    """The key's tenant has spoken its characters for the day or the month; ``retry_after``
    is when the period resets."""

    code = "quota_exceeded"


class VoiceNotAllowed(RequestError):
    """The key's tenant may not use this voice (its ``voices`` patterns)."""

    code = "voice_not_allowed"


class KeyRevoked(RequestError):
    """The key this connection or stream was admitted with was revoked (or its rotation's
    grace period ended) while it was open."""

    code = "key_revoked"


class ResumeFailed(RequestError):
    """A ``resume`` cannot be served: its session expired or is unknown, is another
    key's, or resuming is off; ``reason`` says which. The client starts afresh."""

    code = "resume_failed"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: ``unknown`` (never issued, or expired and forgotten), ``not_yours``,
        #: ``disabled``.
        self.reason = reason


class UsageUnavailable(ClientError):
    """The stored usage cannot be read now (its SQLite file or Redis is failing)."""

    code = "usage_unavailable"


class KeyRefused(RequestError):
    """The key a protocol's first message carries (ElevenLabs' ``xi_api_key``) opens
    nothing, or none came; the connection is closed after the error."""

    code = "unauthorized"


class ShuttingDown(RequestError):
    """The server is draining before a restart and takes no new utterance."""

    code = "shutting_down"


class UpstreamError(ClientError):
    """The speech engine failed to produce the utterance."""


class UpstreamUnavailable(UpstreamError):
    """The upstream refused the request, could not be reached, or broke the stream."""

    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """No first audio within the deadline, or the stream stalled."""

    code = "upstream_timeout"


class UpstreamBadAudio(UpstreamError):
    """The engine's MP3 does not decode, so another format cannot be made from it."""

    code = "upstream_bad_audio"


class NoAudio(UpstreamError):
    """The upstream finished without sending any audio."""

    code = "no_audio"


#: The HTTP status of each error code, on every door that answers with one (the
#: HTTP doors, Cartesia's ``status_code``); a refused handshake has its own ``status``.
HTTP_STATUS = {
    "bad_json": 400,
    "bad_message": 400,
    "empty_text": 400,
    "text_too_long": 400,
    "invalid_voice": 400,
    "invalid_parameter": 400,
    "unsupported_format": 400,
    "ssml_invalid": 400,
    "ssml_unsupported": 400,
    "unauthorized": 401,
    "key_revoked": 401,
    "resume_failed": 400,
    "voice_not_allowed": 403,
    "not_found": 404,
    "body_timeout": 408,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "queue_full": 429,
    "shutting_down": 503,
    "upstream_unavailable": 503,
    "no_audio": 502,
    "upstream_bad_audio": 502,
    "upstream_timeout": 504,
    "usage_unavailable": 503,
    "internal": 500,
}


def http_status(exc: BaseException) -> int:
    """The HTTP status of an error (500 for anything unexpected)."""
    if isinstance(exc, HandshakeRefused):
        return exc.status
    return HTTP_STATUS.get(error_code(exc), 500)


def error_code(exc: BaseException) -> str:
    """The stable wire code for ``exc`` (``internal`` for anything unexpected)."""
    return exc.code if isinstance(exc, ClientError) else "internal"
