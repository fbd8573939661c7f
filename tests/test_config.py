"""The configuration object: defaults, environment, .env, and clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ttsstream.config import _LOWER_BOUNDS, DEFAULT_EDGE_WSS_URL, Config, load_config
from ttsstream.exceptions import ConfigError


def test_defaults() -> None:
    """With nothing set, the documented defaults apply."""
    config = load_config({}, env_file=None)
    assert config == Config()
    assert (config.host, config.port) == ("0.0.0.0", 8765)
    assert config.default_voice == "en-US-EmmaMultilingualNeural"
    assert config.max_text_length == 5000
    assert config.edge_wss_url == DEFAULT_EDGE_WSS_URL
    assert config.upstream_timeout == 15.0
    assert config.queue_size == 16
    assert config.log_level == "INFO"


def test_environment_values_are_parsed() -> None:
    """Each variable sets its field, converted to its type."""
    config = load_config(
        {
            "HOST": "127.0.0.1",
            "PORT": "9000",
            "DEFAULT_VOICE": "en-US-AriaNeural",
            "MAX_TEXT_LENGTH": "100",
            "EDGE_WSS_URL": "ws://127.0.0.1:1/edge/v1?TrustedClientToken=x",
            "EDGE_VOICES_URL": "http://127.0.0.1:1/voices/list?trustedclienttoken=x",
            "UPSTREAM_TIMEOUT": "2.5",
            "VOICES_TTL": "60",
            "QUEUE_SIZE": "3",
            "LOG_LEVEL": "debug",
        },
        env_file=None,
    )
    assert config.port == 9000 and config.host == "127.0.0.1"
    assert config.max_text_length == 100 and config.queue_size == 3
    assert config.upstream_timeout == 2.5 and config.voices_ttl == 60
    assert config.log_level == "DEBUG"


def test_dotenv_file_applies_where_the_environment_is_silent(tmp_path: Path) -> None:
    """A .env value is used unless the real environment sets the same variable."""
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=9100\nMAX_TEXT_LENGTH=70\n")
    config = load_config({"PORT": "9200"}, env_file=env_file)
    assert config.port == 9200
    assert config.max_text_length == 70


def test_command_line_overrides_win(tmp_path: Path) -> None:
    """--port beats both the environment and .env."""
    assert load_config({"PORT": "9200"}, env_file=None, port=9300).port == 9300


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_TEXT_LENGTH", "0"),
        ("MAX_TEXT_LENGTH", "1.5"),
        ("UPSTREAM_TIMEOUT", "0"),
        ("UPSTREAM_TIMEOUT", "nan"),
        ("UPSTREAM_TIMEOUT", "soon"),
        ("QUEUE_SIZE", "-1"),
        ("LOG_LEVEL", "LOUD"),
        ("DEFAULT_VOICE", "Aria"),
        ("EDGE_WSS_URL", "http://example.com/edge/v1?TrustedClientToken=x"),
        ("EDGE_WSS_URL", "wss://example.com/edge/v1"),
        ("EDGE_VOICES_URL", "ftp://example.com/list?x=1"),
        ("EDGE_PROXY", "socks5://proxy.internal:1080"),
        ("EDGE_PROXY", "proxy.internal:3128"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("REDIS_URL", "127.0.0.1:6379"),
        ("REDIS_LEASE_SECONDS", "0.5"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    """A bad value raises ConfigError naming the variable and the accepted form."""
    with pytest.raises(ConfigError) as raised:
        load_config({variable: value}, env_file=None)
    assert raised.value.variable == variable
    assert str(raised.value).startswith(f"{variable}=")
    assert "expected" in str(raised.value)


def test_edge_proxy_credentials_stay_out_of_errors_and_repr() -> None:
    """A proxy password shows neither in a refused value's error line nor in the repr."""
    with pytest.raises(ConfigError) as raised:
        load_config({"EDGE_PROXY": "https://user:hunter2@proxy.internal:3128"}, env_file=None)
    assert "hunter2" not in str(raised.value)
    assert "proxy.internal:3128" in str(raised.value)
    config = load_config({"EDGE_PROXY": "http://user:hunter2@proxy.internal:3128"}, env_file=None)
    assert config.edge_proxy == "http://user:hunter2@proxy.internal:3128"
    assert "hunter2" not in repr(config)


def test_redis_password_stays_out_of_errors_and_repr() -> None:
    with pytest.raises(ConfigError) as raised:
        load_config({"REDIS_URL": "http://:hunter2@redis.internal:6379"}, env_file=None)
    assert "hunter2" not in str(raised.value) and "REDIS_URL" in str(raised.value)
    config = load_config({"REDIS_URL": "rediss://:hunter2@redis.internal:6380/2"}, env_file=None)
    assert config.redis_url == "rediss://:hunter2@redis.internal:6380/2"
    assert config.redis_prefix == "ttsstream:" and config.redis_lease_seconds == 15.0
    assert "hunter2" not in repr(config)


def test_config_is_frozen() -> None:
    """Settings cannot change after start."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().port = 1  # type: ignore[misc]


@pytest.mark.parametrize("variable", sorted(_LOWER_BOUNDS))
def test_every_number_is_checked_at_its_lower_bound(variable: str) -> None:
    """The minimum is accepted (unless the bound is strict) and just below it is refused."""
    _, minimum, strict = _LOWER_BOUNDS[variable]
    below = str(minimum - 1) if not strict else "0"
    # A segment's most characters may be as low as its fewest.
    others = {"STREAM_MIN_CHARS": "1"} if variable == "STREAM_MAX_CHARS" else {}
    with pytest.raises(ConfigError) as raised:
        load_config({variable: below, **others}, env_file=None)
    assert raised.value.variable == variable
    if not strict:
        load_config({variable: str(minimum), **others}, env_file=None)
    else:
        load_config({variable: "0.5", **others}, env_file=None)


def test_errors_show_the_value_as_typed_and_where_it_came_from(tmp_path: Path) -> None:
    """A bad value is shown as the user typed it (not as parsed), with its file when it
    came from .env; PORT equal to HEALTH_PORT is refused."""
    with pytest.raises(ConfigError) as caught:
        load_config({"CACHE_MAX_SIZE_MB": "-1"}, env_file=None)
    assert "CACHE_MAX_SIZE_MB='-1' is invalid" in str(caught.value)
    dotenv = tmp_path / ".env"
    dotenv.write_text("CACHE_MAX_SIZE_MB=-1\nQUEUE_SIZE=many\n")
    with pytest.raises(ConfigError) as caught:
        load_config({"QUEUE_SIZE": "4"}, env_file=dotenv)
    assert f"CACHE_MAX_SIZE_MB='-1' (from {dotenv}) is invalid" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config({}, env_file=dotenv)
    assert f"QUEUE_SIZE='many' (from {dotenv}) is invalid" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config({"PORT": "9000", "HEALTH_PORT": "9000"}, env_file=None)
    assert "HEALTH_PORT='9000'" in str(caught.value) and "other than PORT" in str(caught.value)
    assert load_config({"PORT": "0", "HEALTH_PORT": "0"}, env_file=None).port == 0


def test_the_side_port_is_on_loopback_unless_told() -> None:
    """HEALTH_HOST defaults to 127.0.0.1 whatever HOST is (the side port has no keys)."""
    config = load_config({"HOST": "0.0.0.0"}, env_file=None)
    assert config.health_address == "127.0.0.1"
    assert load_config({"HEALTH_HOST": "10.0.0.5"}, env_file=None).health_address == "10.0.0.5"


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("EDGE_PROXY", "socks5://user:hunter2@proxy:1080", "hunter2"),
        ("REDIS_URL", "mysql://:hunter2@db:3306/0", "hunter2"),
        ("TTS_API_KEY", "has space", "has space"),
    ],
)
def test_errors_from_dotenv_keep_secrets_out(
    tmp_path: Path, variable: str, value: str, secret: str
) -> None:
    """A bad secret-bearing value from .env is named with its file, never shown as typed."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"{variable}={value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config({}, env_file=dotenv)
    assert secret not in str(caught.value)
    assert f"(from {dotenv})" in str(caught.value)


def test_a_segment_may_not_be_longer_at_least_than_at_most() -> None:
    """STREAM_MAX_CHARS below STREAM_MIN_CHARS is refused, naming both."""
    with pytest.raises(ConfigError) as raised:
        load_config({"STREAM_MIN_CHARS": "50", "STREAM_MAX_CHARS": "40"}, env_file=None)
    assert raised.value.variable == "STREAM_MAX_CHARS"
    assert "STREAM_MIN_CHARS (50)" in str(raised.value)


@pytest.mark.parametrize("key", ["undefined", "null", "NULL"])
def test_a_key_that_clients_send_for_none_is_refused(key: str) -> None:
    """TTS_API_KEY=undefined (or null) is refused at start: "Bearer undefined" is what
    clients send without a key, so such a key would work in one form and not another."""
    with pytest.raises(ConfigError) as raised:
        load_config({"TTS_API_KEY": f"a-real-key-0123456789,{key}"}, env_file=None)
    assert raised.value.variable == "TTS_API_KEY"
    assert "a-real-key" not in str(raised.value)  # keys are never shown
