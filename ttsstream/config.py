"""The one configuration object: every setting, read and validated once at start.

Settings come from the environment, and from a ``.env`` file in the working
directory for variables the environment does not set. Nothing else in ttsstream
reads the environment.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

from ttsstream.exceptions import ConfigError

__all__ = [
    "CLEANUP_MODES",
    "EDGE_VOICE_PATTERN",
    "OFFLINE_VOICE_PATTERN",
    "Config",
    "Network",
    "load_config",
    "parse_networks",
]

#: How a text may be cleaned before it is spoken (``TEXT_CLEANUP``, ``cleanup``):
#: Markdown, HTML marks and emoji left out, or the text spoken as it is.
CLEANUP_MODES = ("markdown", "none")
#: A trusted network (``TRUSTED_PROXIES``).
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Sequence[str]) -> tuple[Network, ...]:
    """Parse IPs and CIDRs (``10.0.0.0/8``, ``::1``).

    Raises:
        ValueError: An entry is neither.
    """
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


#: edge-tts's accepted voice forms: "en-US-AriaNeural" or its long Microsoft name.
EDGE_VOICE_PATTERN = re.compile(
    r"[a-z]{2,}-[A-Z]{2,}-.+Neural|Microsoft Server Speech Text to Speech Voice \(.+,.+\)"
)
#: The offline voices: "espeak:" and an eSpeak NG voice id such as "en-us".
OFFLINE_VOICE_PATTERN = re.compile(r"espeak:[a-z0-9][a-z0-9_-]*")
_VOICE_FORM = "an Edge voice such as en-US-AriaNeural, or an offline voice such as espeak:en-us"
_FALLBACK_FORM = "espeak:auto, an offline voice such as espeak:en-us, or none"
_VOICE_MAP_FORM = "name=voice pairs separated by commas, such as alloy=en-US-AvaNeural"
_CLEANUP_FORM = " or ".join(CLEANUP_MODES)

_EDGE_BASE = "speech.platform.bing.com/consumer/speech/synthesize/readaloud"
_EDGE_TOKEN = "6A5AA1D4EAFF4E9FB37E23D68491D6F4"
DEFAULT_EDGE_WSS_URL = f"wss://{_EDGE_BASE}/edge/v1?TrustedClientToken={_EDGE_TOKEN}"
DEFAULT_EDGE_VOICES_URL = f"https://{_EDGE_BASE}/voices/list?trustedclienttoken={_EDGE_TOKEN}"

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: With UPSTREAM_CONCURRENCY_PER_IP=0, one IP holds at most UPSTREAM_CONCURRENCY
#: divided by this (a quarter)…
UPSTREAM_SHARE_DIVISOR = 4
#: …but at least this many upstream slots (a streaming utterance holds two: the
#: segment playing and the next).
UPSTREAM_SLOTS_PER_IP_MIN = 2


@dataclass(frozen=True, kw_only=True)
class Config:
    """Every setting of a ttsstream server. Invalid values raise :class:`ConfigError`."""

    # Listening
    host: str = "0.0.0.0"
    port: int = 8765
    #: The HTTP side port for /health, /ready, /stats, /metrics, /voices (0: any free port).
    health_port: int = 8766
    #: Where the side port listens: loopback unless said otherwise (/stats, /metrics
    #: and /voices have no authentication).
    health_host: str = "127.0.0.1"
    #: Serve the demo page (GET /) and the browser client (GET /clients/…) on PORT.
    serve_demo: bool = True

    # Speech
    default_voice: str = "en-US-EmmaMultilingualNeural"
    edge_wss_url: str = DEFAULT_EDGE_WSS_URL
    edge_voices_url: str = DEFAULT_EDGE_VOICES_URL
    #: An http:// proxy for every connection to Edge, credentials allowed
    #: (http://user:password@host:port); None: connect directly. Never in repr.
    edge_proxy: str | None = field(default=None, repr=False)
    #: Offline voice that speaks when Edge fails before any audio: "espeak:auto"
    #: (the requested voice's locale), "espeak:<id>", or None for no fallback.
    fallback_voice: str | None = "espeak:auto"
    #: What is left out of a text before it is spoken, unless a request says:
    #: "markdown" (Markdown marks, link targets, code blocks, HTML, emoji) or "none".
    text_cleanup: str = "markdown"

    # Upstream protection
    #: Further Edge attempts after a failed one, while no audio was sent.
    upstream_retries: int = 2
    #: Consecutive Edge failures that open the circuit breaker.
    breaker_failures: int = 5
    #: Seconds the breaker stays open before one trial request.
    breaker_cooldown: float = 30.0
    #: Most simultaneous Edge syntheses for the whole server.
    upstream_concurrency: int = 16
    #: Most of them one client IP holds at once; 0: a quarter of UPSTREAM_CONCURRENCY,
    #: at least 2 (:attr:`upstream_slots_per_ip`). UPSTREAM_CONCURRENCY or more: no cap.
    upstream_concurrency_per_ip: int = 0

    # Cache
    cache_enabled: bool = True
    cache_dir: Path = Path("cache")
    #: Total size of the cache in megabytes (2**20 bytes) above which entries are evicted.
    cache_max_size_mb: float = 500.0
    #: Megabytes of the most used entries also kept in memory (0: read every hit from disk).
    cache_memory_mb: float = 32.0

    # Timeouts
    #: Seconds allowed for connect + first audio, and for any gap between upstream chunks.
    upstream_timeout: float = 15.0
    #: Seconds the voice list is kept before it is fetched again.
    voices_ttl: float = 24 * 3600.0

    # Limits
    #: Most characters in one ``speak`` text.
    max_text_length: int = 5000
    #: Most utterances waiting on one connection behind the one being spoken.
    queue_size: int = 16

    # Streaming input (text that arrives while it is spoken)
    #: Fewest characters of a segment before a sentence end cuts it.
    stream_min_chars: int = 20
    #: Most characters of a segment (cut at the last space past it).
    stream_max_chars: int = 300
    #: Milliseconds buffered text waits without growing before it is cut as it is.
    stream_max_wait_ms: float = 1000.0
    #: Most characters of one streaming utterance's whole text.
    max_stream_text_length: int = 100_000
    #: Seconds without append, flush or finish before the server finishes the utterance.
    stream_idle_timeout: float = 20.0

    # Access
    #: Keys that open the server (several during a rotation); empty: no authentication.
    #: Never in repr, so never in a log line.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    #: Most spans and breaks of one SSML document (each span is one synthesis).
    max_ssml_spans: int = 64
    #: ``/v1/audio/speech`` takes an ``input`` that starts with ``<speak`` as SSML.
    ssml_in_openai: bool = True
    #: The tenants' keys and limits (TOML; :mod:`ttsstream.core.tenants`), reloaded on
    #: SIGHUP and when it changes; None: only ``TTS_API_KEY``.
    api_keys_file: Path | None = None
    #: Where the tenants' usage is kept on one instance (SQLite); None: beside the keys
    #: file (``usage.sqlite3``), or nowhere without one. In a cluster, Redis keeps it.
    usage_db: Path | None = None
    #: Exact origins browsers may connect from; None allows every origin.
    allowed_origins: tuple[str, ...] | None = None
    #: Proxies whose X-Forwarded-For / X-Real-IP are believed: IPs or CIDRs.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    #: The model and voice lists of the HTTP API answer without a key (Open WebUI asks
    #: for them without one); speech always needs the key. False: the lists need it too.
    public_lists: bool = True

    # HTTP speech API
    #: OpenAI voice names (``alloy``…) mapped to voices, over the default table.
    voice_map: tuple[tuple[str, str], ...] = ()

    # Limits per client IP
    #: Handshakes + speak messages allowed per IP in any RATE_LIMIT_WINDOW; 0: no limit.
    rate_limit_requests: int = 100
    rate_limit_window: float = 60.0
    max_connections_per_ip: int = 20
    max_connections: int = 10_000

    # Cluster
    #: Redis shared by the instances of one cluster (``redis://[:password@]host:port/db``,
    #: ``rediss://`` for TLS); None: one instance, nothing shared. Never in repr.
    redis_url: str | None = field(default=None, repr=False)
    #: Prefix of every key in Redis, so that several deployments can share one.
    redis_prefix: str = "ttsstream:"
    #: Seconds after which a dead instance's leases (its presence) lapse.
    redis_lease_seconds: float = 15.0
    #: Seconds a cache entry stays in Redis for the other instances after it was written.
    cache_shared_ttl: float = 7 * 24 * 3600.0

    # Connection hygiene
    #: Seconds between pings to each client (a proxy's read timeout must be longer);
    #: a client that does not answer within as long is closed.
    ping_interval: float = 20.0
    #: Seconds without a client message, and nothing queued or playing, before closing.
    idle_timeout: float = 300.0
    #: Seconds a dropped WebSocket's utterances are kept (still spoken) for the client to
    #: resume them on a new connection; 0: no resume.
    resume_window: float = 30.0
    #: Megabytes of frames kept for resuming, per connection.
    resume_buffer_mb: float = 8.0
    #: Megabytes of frames kept for resuming, all connections together.
    resume_total_mb: float = 256.0
    #: Seconds a client may leave its audio unread (send buffer full) before 1008.
    send_timeout: float = 30.0

    #: Run on uvloop when it is installed (a faster event loop); false: asyncio's own.
    uvloop: bool = True

    # Shutdown
    #: Seconds utterances in progress get to finish after SIGTERM before connections close.
    drain_timeout: float = 30.0

    # Logs
    log_level: str = "INFO"
    #: "text" or "json" (one object per line).
    log_format: str = "text"
    #: Directory for access.log and error.log; None: stdout and stderr.
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        for variable, (name, minimum, strict) in _LOWER_BOUNDS.items():
            value = getattr(self, name)
            # Written so that NaN fails too.
            if not (value > minimum if strict else value >= minimum):
                raise ConfigError(variable, str(value), _VARIABLES[variable][2])
        for variable, port in (("PORT", self.port), ("HEALTH_PORT", self.health_port)):
            if port > 65535:
                raise ConfigError(variable, str(port), _VARIABLES[variable][2])
        if self.stream_max_chars < self.stream_min_chars:
            raise ConfigError(
                "STREAM_MAX_CHARS",
                str(self.stream_max_chars),
                f"an integer >= STREAM_MIN_CHARS ({self.stream_min_chars})",
            )
        if self.port == self.health_port != 0:
            raise ConfigError(
                "HEALTH_PORT", str(self.health_port), f"a port other than PORT ({self.port})"
            )
        if self.text_cleanup not in CLEANUP_MODES:
            raise ConfigError("TEXT_CLEANUP", self.text_cleanup, _CLEANUP_FORM)
        if self.log_format not in ("text", "json"):
            raise ConfigError("LOG_FORMAT", self.log_format, "text or json")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigError("LOG_LEVEL", self.log_level, "one of " + ", ".join(_LOG_LEVELS))
        if not self.host:
            raise ConfigError("HOST", self.host, "an IP address or host name")
        if not (
            EDGE_VOICE_PATTERN.fullmatch(self.default_voice)
            or OFFLINE_VOICE_PATTERN.fullmatch(self.default_voice)
        ):
            raise ConfigError("DEFAULT_VOICE", self.default_voice, _VOICE_FORM)
        if self.fallback_voice is not None and not OFFLINE_VOICE_PATTERN.fullmatch(
            self.fallback_voice
        ):
            raise ConfigError("FALLBACK_VOICE", self.fallback_voice, _FALLBACK_FORM)
        _check_url("EDGE_WSS_URL", self.edge_wss_url, ("ws", "wss"))
        _check_url("EDGE_VOICES_URL", self.edge_voices_url, ("http", "https"))
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url)
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                raise ConfigError("REDIS_URL", _without_password(self.redis_url), _REDIS_FORM)
        if not self.redis_prefix or not self.redis_prefix.isprintable():
            raise ConfigError(
                "REDIS_PREFIX", self.redis_prefix, "printable text such as ttsstream:"
            )
        if self.edge_proxy is not None:
            parts = urlsplit(self.edge_proxy)
            if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
                raise ConfigError("EDGE_PROXY", _without_password(self.edge_proxy), _PROXY_FORM)
        if any(not key.isprintable() or " " in key or "," in key for key in self.api_keys):
            raise ConfigError("TTS_API_KEY", "[redacted]", _KEYS_FORM)
        if any(key.lower() in ("undefined", "null") for key in self.api_keys):
            # What JavaScript clients send as "Bearer undefined" when they have no key is
            # taken for no key: such a key would work in one form and not another.
            raise ConfigError(
                "TTS_API_KEY", "[redacted]", _KEYS_FORM + ', not "undefined" or "null"'
            )
        for origin in self.allowed_origins or ():
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ConfigError("ALLOWED_ORIGINS", origin, _ORIGINS_FORM)
        try:
            parse_networks(self.trusted_proxies)
        except ValueError:
            raise ConfigError(
                "TRUSTED_PROXIES", ",".join(self.trusted_proxies), _PROXIES_FORM
            ) from None

    @property
    def trusted_networks(self) -> tuple[Network, ...]:
        """:attr:`trusted_proxies`, parsed."""
        return parse_networks(self.trusted_proxies)

    @property
    def upstream_slots_per_ip(self) -> int:
        """Most Edge syntheses one client IP holds at once: UPSTREAM_CONCURRENCY_PER_IP,
        or for 0 a quarter of UPSTREAM_CONCURRENCY but at least 2 (a streaming
        utterance holds two), never more than UPSTREAM_CONCURRENCY."""
        share = self.upstream_concurrency_per_ip or max(
            UPSTREAM_SLOTS_PER_IP_MIN, self.upstream_concurrency // UPSTREAM_SHARE_DIVISOR
        )
        return min(share, self.upstream_concurrency)

    @property
    def health_address(self) -> str:
        """Where the side port listens."""
        return self.health_host

    @property
    def cache_max_bytes(self) -> int:
        """:attr:`cache_max_size_mb` in bytes."""
        return int(self.cache_max_size_mb * 2**20)

    @property
    def log_level_number(self) -> int:
        """The ``logging`` level for :attr:`log_level`."""
        return logging.getLevelNamesMapping()[self.log_level]


def _check_url(variable: str, url: str, schemes: tuple[str, ...]) -> None:
    expected = f"a {' or '.join(s + '://' for s in schemes)} URL with a query string"
    parts = urlsplit(url)
    # edge-tts appends "&ConnectionId=…" and "&Sec-MS-GEC=…", so a query must already be there.
    if parts.scheme not in schemes or not parts.netloc or not parts.query:
        raise ConfigError(variable, url, expected)


_KEYS_FORM = "keys separated by commas, without spaces"
_PROXY_FORM = "an http:// URL such as http://proxy.internal:3128 or http://user:password@host:port"
_REDIS_FORM = "a URL such as redis://host:6379/0, redis://:password@host:6379 or rediss://…"
_ORIGINS_FORM = "* or origins such as https://app.example.com separated by commas"
_PROXIES_FORM = "IP addresses or CIDRs such as 127.0.0.1,10.0.0.0/8 separated by commas"


def _without_password(url: str) -> str:
    """``url`` as an error line may show it: the credentials replaced."""
    scheme, _, rest = url.partition("://")
    _, at, host = rest.rpartition("@")
    return f"{scheme}://[redacted]@{host}" if at else url


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _voice_map(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _list(text):
        name, equals, voice = item.partition("=")
        name, voice = name.strip().lower(), voice.strip()
        if (
            not equals
            or not name
            or not (EDGE_VOICE_PATTERN.fullmatch(voice) or OFFLINE_VOICE_PATTERN.fullmatch(voice))
        ):
            raise ValueError(item)
        pairs.append((name, voice))
    return tuple(pairs)


def _origins(text: str) -> tuple[str, ...] | None:
    items = _list(text)
    return None if "*" in items else tuple(item.rstrip("/") for item in items)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(text)
    return value in _TRUE


def _optional_text(text: str) -> str | None:
    text = text.strip()
    return None if text.lower() == "none" else text


def _optional_path(text: str) -> Path | None:
    text = text.strip()
    return Path(text) if text else None


def _integer(text: str) -> int:
    return int(text.strip())


def _number(text: str) -> float:
    value = float(text.strip())
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return value


# Environment variable -> (Config field, parser, accepted form for the error line).
# Numbers with a lower bound: variable -> (Config field, minimum, whether the minimum
# itself is refused). The error line shows the form given in _VARIABLES.
_LOWER_BOUNDS: dict[str, tuple[str, float, bool]] = {
    "PORT": ("port", 0, False),
    "HEALTH_PORT": ("health_port", 0, False),
    "UPSTREAM_RETRIES": ("upstream_retries", 0, False),
    "BREAKER_FAILURES": ("breaker_failures", 1, False),
    "BREAKER_COOLDOWN": ("breaker_cooldown", 0, False),
    "UPSTREAM_CONCURRENCY": ("upstream_concurrency", 1, False),
    "UPSTREAM_CONCURRENCY_PER_IP": ("upstream_concurrency_per_ip", 0, False),
    "UPSTREAM_TIMEOUT": ("upstream_timeout", 0, True),
    "VOICES_TTL": ("voices_ttl", 0, True),
    "MAX_TEXT_LENGTH": ("max_text_length", 1, False),
    "QUEUE_SIZE": ("queue_size", 0, False),
    "STREAM_MIN_CHARS": ("stream_min_chars", 1, False),
    "STREAM_MAX_CHARS": ("stream_max_chars", 1, False),
    "STREAM_MAX_WAIT_MS": ("stream_max_wait_ms", 0, True),
    "MAX_STREAM_TEXT_LENGTH": ("max_stream_text_length", 1, False),
    "STREAM_IDLE_TIMEOUT": ("stream_idle_timeout", 0, True),
    "CACHE_MEMORY_MB": ("cache_memory_mb", 0, False),
    "CACHE_MAX_SIZE_MB": ("cache_max_size_mb", 0, False),
    "RATE_LIMIT_REQUESTS": ("rate_limit_requests", 0, False),
    "RATE_LIMIT_WINDOW": ("rate_limit_window", 0, True),
    "MAX_CONNECTIONS_PER_IP": ("max_connections_per_ip", 1, False),
    "MAX_CONNECTIONS": ("max_connections", 1, False),
    "PING_INTERVAL": ("ping_interval", 0, True),
    "REDIS_LEASE_SECONDS": ("redis_lease_seconds", 1, False),
    "CACHE_SHARED_TTL": ("cache_shared_ttl", 1, False),
    "IDLE_TIMEOUT": ("idle_timeout", 0, True),
    "MAX_SSML_SPANS": ("max_ssml_spans", 1, False),
    "RESUME_WINDOW": ("resume_window", 0, False),
    "RESUME_BUFFER_MB": ("resume_buffer_mb", 0, True),
    "RESUME_TOTAL_MB": ("resume_total_mb", 0, True),
    "SEND_TIMEOUT": ("send_timeout", 0, True),
    "DRAIN_TIMEOUT": ("drain_timeout", 0, False),
}

_VARIABLES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "HOST": ("host", str.strip, "an IP address or host name"),
    "PORT": ("port", _integer, "an integer from 0 to 65535"),
    "DEFAULT_VOICE": ("default_voice", str.strip, _VOICE_FORM),
    "FALLBACK_VOICE": ("fallback_voice", _optional_text, _FALLBACK_FORM),
    "TEXT_CLEANUP": ("text_cleanup", lambda s: s.strip().lower(), _CLEANUP_FORM),
    "UPSTREAM_RETRIES": ("upstream_retries", _integer, "an integer >= 0"),
    "BREAKER_FAILURES": ("breaker_failures", _integer, "an integer >= 1"),
    "BREAKER_COOLDOWN": ("breaker_cooldown", _number, "seconds >= 0, such as 30"),
    "UPSTREAM_CONCURRENCY": ("upstream_concurrency", _integer, "an integer >= 1"),
    "UPSTREAM_CONCURRENCY_PER_IP": (
        "upstream_concurrency_per_ip",
        _integer,
        "an integer >= 0 (0: a quarter of UPSTREAM_CONCURRENCY, at least 2)",
    ),
    "EDGE_WSS_URL": ("edge_wss_url", str.strip, "a ws:// or wss:// URL with a query string"),
    "EDGE_VOICES_URL": (
        "edge_voices_url",
        str.strip,
        "a http:// or https:// URL with a query string",
    ),
    "EDGE_PROXY": ("edge_proxy", _optional_text, _PROXY_FORM),
    "CACHE_ENABLED": ("cache_enabled", _boolean, "true or false"),
    "CACHE_DIR": ("cache_dir", lambda s: Path(s.strip()), "a directory path"),
    "CACHE_MAX_SIZE_MB": ("cache_max_size_mb", _number, "megabytes >= 0, such as 500"),
    "CACHE_MEMORY_MB": ("cache_memory_mb", _number, "megabytes >= 0, such as 32"),
    "UPSTREAM_TIMEOUT": ("upstream_timeout", _number, "seconds > 0, such as 15 or 2.5"),
    "VOICES_TTL": ("voices_ttl", _number, "seconds > 0, such as 86400"),
    "MAX_TEXT_LENGTH": ("max_text_length", _integer, "an integer >= 1"),
    "QUEUE_SIZE": ("queue_size", _integer, "an integer >= 0"),
    "STREAM_MIN_CHARS": ("stream_min_chars", _integer, "an integer >= 1"),
    "STREAM_MAX_CHARS": ("stream_max_chars", _integer, "an integer >= STREAM_MIN_CHARS"),
    "STREAM_MAX_WAIT_MS": ("stream_max_wait_ms", _number, "milliseconds > 0, such as 1000"),
    "MAX_STREAM_TEXT_LENGTH": ("max_stream_text_length", _integer, "an integer >= 1"),
    "STREAM_IDLE_TIMEOUT": ("stream_idle_timeout", _number, "seconds > 0, such as 20"),
    "TTS_API_KEY": ("api_keys", _list, _KEYS_FORM),
    "MAX_SSML_SPANS": ("max_ssml_spans", _integer, "an integer >= 1"),
    "SSML_IN_OPENAI": ("ssml_in_openai", _boolean, "true or false"),
    "API_KEYS_FILE": ("api_keys_file", _optional_path, "a file path (TOML), or empty"),
    "USAGE_DB": ("usage_db", _optional_path, "a file path, or empty"),
    "ALLOWED_ORIGINS": ("allowed_origins", _origins, _ORIGINS_FORM),
    "TRUSTED_PROXIES": ("trusted_proxies", _list, _PROXIES_FORM),
    "PUBLIC_LISTS": ("public_lists", _boolean, "true or false"),
    "VOICE_MAP": ("voice_map", _voice_map, _VOICE_MAP_FORM),
    "RATE_LIMIT_REQUESTS": ("rate_limit_requests", _integer, "an integer >= 0"),
    "RATE_LIMIT_WINDOW": ("rate_limit_window", _number, "seconds > 0, such as 60"),
    "MAX_CONNECTIONS_PER_IP": ("max_connections_per_ip", _integer, "an integer >= 1"),
    "MAX_CONNECTIONS": ("max_connections", _integer, "an integer >= 1"),
    "PING_INTERVAL": ("ping_interval", _number, "seconds > 0, such as 20"),
    "REDIS_URL": ("redis_url", _optional_text, _REDIS_FORM),
    "REDIS_PREFIX": ("redis_prefix", str.strip, "printable text such as ttsstream:"),
    "REDIS_LEASE_SECONDS": ("redis_lease_seconds", _number, "seconds >= 1, such as 15"),
    "CACHE_SHARED_TTL": ("cache_shared_ttl", _number, "seconds >= 1, such as 604800"),
    "IDLE_TIMEOUT": ("idle_timeout", _number, "seconds > 0, such as 300"),
    "RESUME_WINDOW": ("resume_window", _number, "seconds >= 0, such as 30 (0: no resume)"),
    "RESUME_BUFFER_MB": ("resume_buffer_mb", _number, "megabytes > 0, such as 8"),
    "RESUME_TOTAL_MB": ("resume_total_mb", _number, "megabytes > 0, such as 256"),
    "SEND_TIMEOUT": ("send_timeout", _number, "seconds > 0, such as 30"),
    "HEALTH_PORT": ("health_port", _integer, "an integer from 0 to 65535"),
    "HEALTH_HOST": ("health_host", str.strip, "an IP address or host name"),
    "SERVE_DEMO": ("serve_demo", _boolean, "true or false"),
    "UVLOOP": ("uvloop", _boolean, "true or false"),
    "DRAIN_TIMEOUT": ("drain_timeout", _number, "seconds >= 0, such as 30"),
    "LOG_FORMAT": ("log_format", lambda s: s.strip().lower(), "text or json"),
    "LOG_DIR": ("log_dir", lambda s: Path(s.strip()), "a directory path"),
    "LOG_LEVEL": ("log_level", lambda s: s.strip().upper(), "one of " + ", ".join(_LOG_LEVELS)),
}
assert {name for name, _, _ in _VARIABLES.values()} == {f.name for f in fields(Config)}


#: Variables that may hold a password or key: errors show them redacted, never as typed.
_SECRETS = frozenset({"TTS_API_KEY", "EDGE_PROXY", "REDIS_URL"})


def load_config(
    environ: Mapping[str, str] | None = None,
    *,
    env_file: Path | None = Path(".env"),
    **overrides: Any,
) -> Config:
    """Build the configuration from the environment, a ``.env`` file and overrides.

    Args:
        environ: Variables to read; defaults to ``os.environ``.
        env_file: A dotenv file whose variables apply where ``environ`` has none;
            ``None`` or a missing file adds nothing.
        overrides: ``Config`` fields set from the command line; they win over both.

    Raises:
        ConfigError: A variable has a value outside its accepted form.
    """
    merged: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    environ_used = os.environ if environ is None else environ
    merged.update(environ_used)

    values: dict[str, Any] = {}
    for variable, (name, parse, form) in _VARIABLES.items():
        raw = merged.get(variable)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[name] = parse(raw)
        except ValueError:
            shown = "[redacted]" if variable == "TTS_API_KEY" else raw
            source = "" if variable in environ_used else f" (from {env_file})"
            raise ConfigError(variable, shown, form, source=source) from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config(**values)
    except ConfigError as exc:
        # Shown as typed (not as parsed: "-1", not "-1.0"), and where it came from.
        raw = merged.get(exc.variable)
        overridden = (
            _VARIABLES[exc.variable][0] in overrides if exc.variable in _VARIABLES else False
        )
        if raw is not None and not overridden:
            if exc.variable not in _SECRETS:  # those are shown without their secrets
                exc.value = raw
            if exc.variable not in environ_used:
                exc.source = f" (from {env_file})"
        raise
