"""The circuit breaker, with time given by the test."""

from __future__ import annotations

import pytest

from tests.conftest import Clock
from ttsstream.core.breaker import CircuitBreaker


def test_opens_after_consecutive_failures_only() -> None:
    """A success resets the count; N failures in a row open the breaker."""
    breaker = CircuitBreaker(failure_threshold=3, cooldown=30, clock=Clock())
    for _ in range(2):
        breaker.record_failure("upstream_unavailable")
    breaker.record_success()
    for _ in range(2):
        breaker.record_failure("upstream_unavailable")
    assert breaker.allow() and breaker.status.state == "closed"
    breaker.record_failure("no_audio")
    status = breaker.status
    assert (status.state, status.consecutive_failures, status.last_error) == ("open", 3, "no_audio")
    assert status.retry_in_seconds == 30
    assert not breaker.allow()


def test_half_open_lets_exactly_one_trial_through() -> None:
    """After the cooldown one request goes through; others wait for its verdict."""
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=30, clock=clock)
    breaker.record_failure("upstream_timeout")
    clock.now += 29.9
    assert not breaker.allow()
    assert breaker.status.retry_in_seconds == pytest.approx(0.1)
    clock.now += 0.1
    assert breaker.allow()
    assert breaker.status.state == "half-open"
    assert not breaker.allow()
    breaker.record_success()
    closed = breaker.status
    assert (closed.state, closed.consecutive_failures) == ("closed", 0)
    assert breaker.allow() and breaker.allow()


def test_failed_trial_reopens_for_a_full_cooldown() -> None:
    """A failing trial opens the breaker again, counted from the trial."""
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown=10, clock=clock)
    breaker.record_failure("upstream_unavailable")
    breaker.record_failure("upstream_unavailable")
    clock.now += 10
    assert breaker.allow()
    clock.now += 5
    breaker.record_failure("upstream_unavailable")
    assert breaker.status.state == "open"
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_abandoned_trial_lets_another_through() -> None:
    """A trial cancelled without a verdict does not wedge the breaker half-open."""
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown=1, clock=clock)
    breaker.record_failure("upstream_unavailable")
    clock.now += 1
    assert breaker.allow() and not breaker.allow()
    breaker.abandon_trial()
    assert breaker.allow()


def test_bad_arguments_are_refused() -> None:
    """A threshold below one or a negative cooldown is a ValueError."""
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown=-1)
