"""Rate and connection limits, client IPs and API keys, without sockets."""

from __future__ import annotations

import tracemalloc

import pytest
from websockets.datastructures import Headers

from tests.conftest import Clock
from ttsstream.config import Config
from ttsstream.core.admission import Admission
from ttsstream.core.auth import offered_keys, redact
from ttsstream.core.clientip import client_ip, parse_networks
from ttsstream.core.keyring import Keyring
from ttsstream.core.ratelimit import ConnectionCounter, MovingWindow
from ttsstream.exceptions import (
    EndpointNotFound,
    OriginNotAllowed,
    RateLimited,
    ServerFull,
    TooManyConnections,
    Unauthorized,
)
from ttsstream.stats import Stats


def test_window_allows_the_limit_then_says_when_to_retry() -> None:
    """limit hits pass; the next is refused with the whole seconds until the oldest expires."""
    clock = Clock()
    window = MovingWindow(3, 60, clock=clock)
    assert [window.hit("a") for _ in range(3)] == [None, None, None]
    clock.now += 10.2
    assert window.hit("a") == 50  # ceil(60 - 10.2)
    assert window.hit("b") is None  # other keys are separate


def test_window_slides() -> None:
    """Hits leave the window one by one as time passes; refused hits do not count."""
    clock = Clock()
    window = MovingWindow(2, 60, clock=clock)
    window.hit("a")
    clock.now += 30
    window.hit("a")
    assert window.hit("a") == 30
    clock.now += 30.5  # the first hit has left the window, the second has not
    assert window.hit("a") is None
    assert window.hit("a") == 30  # ceil(60 - 30.5 + ...) from the second hit at t=30
    clock.now += 60
    assert window.hit("a") is None and window.hit("a") is None


def test_zero_disables_limiting() -> None:
    """RATE_LIMIT_REQUESTS=0 lets everything through and tracks nothing."""
    window = MovingWindow(0, 60, clock=Clock())
    assert all(window.hit("a") is None for _ in range(1000))
    assert len(window) == 0


def test_memory_stays_bounded_under_a_flood_of_ips() -> None:
    """100,000 distinct IPs cost a bounded amount; they are purged once a window passed."""
    clock = Clock()
    window = MovingWindow(100, 60, clock=clock)
    tracemalloc.start()
    for index in range(100_000):
        window.hit(f"10.{index >> 16}.{(index >> 8) & 255}.{index & 255}")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(window) == 100_000
    assert peak < 40 * 2**20, f"{peak / 2**20:.1f} MiB for 100,000 IPs"
    clock.now += 61
    window.hit("192.0.2.1")
    assert len(window) == 1


def test_tracked_ips_have_a_hard_cap() -> None:
    """Past max_tracked, the IP seen longest ago is forgotten."""
    window = MovingWindow(1, 60, clock=Clock(), max_tracked=3)
    for ip in ("a", "b", "c", "d"):
        window.hit(ip)
    assert len(window) == 3
    assert window.hit("a") is None  # forgotten, so allowed again
    assert window.hit("d") == 60


def test_connection_caps() -> None:
    """Per-IP and global caps refuse with their own errors; releasing frees the slot."""
    counter = ConnectionCounter(per_ip=2, total=3)
    counter.acquire("a")
    counter.acquire("a")
    with pytest.raises(TooManyConnections):
        counter.acquire("a")
    counter.acquire("b")
    with pytest.raises(ServerFull):
        counter.acquire("c")
    counter.release("a")
    counter.acquire("c")
    assert (counter.of("a"), counter.of("b"), counter.of("c"), counter.total) == (1, 1, 1, 3)


TRUSTED = parse_networks(["127.0.0.1", "::1", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("203.0.113.5", {"X-Forwarded-For": "1.2.3.4"}, "203.0.113.5"),
        ("203.0.113.5", {"X-Real-IP": "1.2.3.4"}, "203.0.113.5"),
        ("127.0.0.1", {}, "127.0.0.1"),
        ("127.0.0.1", {"X-Forwarded-For": "198.51.100.7"}, "198.51.100.7"),
        ("127.0.0.1", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}, "198.51.100.7"),
        ("127.0.0.1", {"X-Forwarded-For": "198.51.100.7, 10.1.1.1"}, "198.51.100.7"),
        ("::1", {"X-Forwarded-For": "2001:db8::1"}, "2001:db8::1"),
        ("127.0.0.1", {"X-Real-IP": "198.51.100.9"}, "198.51.100.9"),
        ("127.0.0.1", {"X-Forwarded-For": "not-an-ip"}, "127.0.0.1"),
        ("127.0.0.1", {"X-Forwarded-For": "10.2.2.2"}, "127.0.0.1"),
        ("::ffff:127.0.0.1", {"X-Forwarded-For": "198.51.100.7"}, "198.51.100.7"),
    ],
)
def test_client_ip(peer: str, headers: dict[str, str], expected: str) -> None:
    """Forwarding headers count only from trusted proxies; the right-most untrusted hop wins."""
    assert client_ip(peer, Headers(headers), TRUSTED) == expected


def test_every_credential_form_is_read() -> None:
    """X-API-Key, Bearer, the key subprotocol and ?api_key= are all offered keys."""
    headers = Headers(
        [
            ("X-API-Key", "k1"),
            ("Authorization", "Bearer k2"),
            ("Authorization", "Basic nope"),
            ("Sec-WebSocket-Protocol", "ttsstream.v1, key.k3"),
        ]
    )
    assert offered_keys(headers, "/v1/stream?x=1&api_key=k4") == ["k1", "k2", "k3", "k4"]
    assert offered_keys(Headers(), "/v1/stream") == []


def test_keys_accept_any_listed_key_only() -> None:
    """Any of TTS_API_KEY's keys (several during a rotation) is accepted; anything else,
    or a prefix or extension of one, is not."""
    keys = Keyring(["old-key", "new-key"])
    assert keys.required
    assert keys.find("new-key") is not None and keys.find("old-key") is not None
    assert keys.find("new-ke") is None and keys.find("new-key2") is None
    assert not Keyring([]).required
    assert "new-key" not in repr(keys)


def test_redact_hides_keys_in_paths_and_subprotocols() -> None:
    """Query keys and key subprotocols are replaced in anything logged."""
    assert redact("/v1/stream?api_key=s3cret&x=1") == "/v1/stream?api_key=[redacted]&x=1"
    assert redact("ttsstream.v1, key.s3cret") == "ttsstream.v1, key.[redacted]"


async def test_admission_decides_from_headers_and_peer_alone() -> None:
    """One policy object admits or refuses from a path, plain headers and the peer:
    endpoint, rate limit, origin, key, connection cap, client IP behind a trusted proxy."""
    clock = Clock()
    stats = Stats()
    admission = Admission(
        Config(
            api_keys=("secret",),
            allowed_origins=("https://app.example",),
            rate_limit_requests=4,
            max_connections_per_ip=1,
        ),
        stats,
        clock=clock,
    )
    keyed = Headers({"X-API-Key": "secret", "Origin": "https://app.example"})
    assert admission.client_ip(Headers({"X-Forwarded-For": "9.9.9.9"}), "127.0.0.1") == "9.9.9.9"
    assert admission.client_ip(Headers({"X-Forwarded-For": "9.9.9.9"}), "8.8.8.8") == "8.8.8.8"
    refusals: list[tuple[str, Headers, bool, type[Exception]]] = [
        ("/v1/stream", keyed, False, EndpointNotFound),
        ("/v1/stream", Headers({"X-API-Key": "wrong"}), True, Unauthorized),
        (
            "/v1/stream",
            Headers({"X-API-Key": "secret", "Origin": "https://evil"}),
            True,
            OriginNotAllowed,
        ),
    ]
    for path, headers, endpoint, refusal in refusals:
        with pytest.raises(refusal):
            await admission.admit(path, headers, "1.1.1.1", endpoint=endpoint)
    await admission.admit("/v1/stream?api_key=secret", Headers(), "1.1.1.1", endpoint=True)
    with pytest.raises(TooManyConnections):
        await admission.admit("/v1/stream", keyed, "1.1.1.1", endpoint=True)
    admission.release("1.1.1.1")
    with pytest.raises(RateLimited) as limited:  # the fifth in the window (not the 404)
        await admission.admit("/v1/stream", keyed, "1.1.1.1", endpoint=True)
    answer = admission.answer(limited.value, headers=keyed, client="1.1.1.1", path="/v1/stream")
    assert answer.status == 429
    assert dict(answer.headers)["Retry-After"] == str(limited.value.retry_after)
    assert dict(answer.headers)["Access-Control-Allow-Origin"] == "https://app.example"
    assert stats.rate_limited == 1
    with pytest.raises(RateLimited):
        await admission.check_rate("1.1.1.1")
    await admission.check_rate("2.2.2.2")  # another client has its own window
