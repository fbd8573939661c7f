"""A circuit breaker for the Edge upstream (pure; time comes from an injectable clock).

.. code-block:: text

    closed ──(N consecutive failures)──▶ open ──(cooldown over)──▶ half-open
      ▲                                   ▲                            │
      └──────────(trial succeeds)─────────┼────────────────────────────┤
                                          └──────(trial fails)─────────┘

While open, nothing is sent upstream; in half-open, exactly one trial request is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["BreakerStatus", "CircuitBreaker"]

logger = logging.getLogger("ttsstream.core.breaker")

BreakerState = Literal["closed", "open", "half-open"]


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A snapshot of the breaker, for health checks and logs."""

    state: BreakerState
    consecutive_failures: int
    #: Error code of the last failure, or ``None``.
    last_error: str | None
    #: Seconds until an open breaker lets a trial through; ``None`` unless open.
    retry_in_seconds: float | None


class CircuitBreaker:
    """Stop calling a failing upstream for a while, then probe it with one request.

    Args:
        failure_threshold: Consecutive failures that open the breaker.
        cooldown: Seconds the breaker stays open before a trial.
        clock: Monotonic time in seconds; tests pass their own.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown < 0:
            raise ValueError("cooldown must be >= 0")
        self._threshold = failure_threshold
        self._cooldown = cooldown
        self._clock = clock
        self._state: BreakerState = "closed"
        self._failures = 0
        self._last_error: str | None = None
        self._opened_at = 0.0
        self._trial_out = False

    @property
    def status(self) -> BreakerStatus:
        retry_in = None
        if self._state == "open":
            retry_in = max(0.0, self._opened_at + self._cooldown - self._clock())
        return BreakerStatus(self._state, self._failures, self._last_error, retry_in)

    def allow(self) -> bool:
        """Whether a request may go upstream now; in half-open, only the one trial may."""
        if self._state == "open" and self._clock() >= self._opened_at + self._cooldown:
            self._change("half-open")
        if self._state == "closed":
            return True
        if self._state == "half-open" and not self._trial_out:
            self._trial_out = True
            return True
        return False

    def record_success(self) -> None:
        """The upstream answered: close the breaker."""
        failures, self._failures = self._failures, 0
        self._trial_out = False
        if self._state != "closed":
            self._change("closed")
        elif failures:
            logger.info("upstream answering again (after %d failures)", failures)

    def record_failure(self, code: str, detail: str = "") -> None:
        """The upstream failed with error ``code`` (``detail``: what failed, for the log).

        The log has one line per change of the upstream's state, not one per
        attempt: the first failure, the breaker opening or closing, recovery.
        """
        self._failures += 1
        self._last_error = code
        self._trial_out = False
        if self._failures == 1 and self._state == "closed":
            logger.warning(
                "upstream failing (%s%s); the breaker opens after %d in a row",
                code,
                f": {detail}" if detail else "",
                self._threshold,
            )
        if self._state == "half-open" or (
            self._state == "closed" and self._failures >= self._threshold
        ):
            self._opened_at = self._clock()
            self._change("open")

    def abandon_trial(self) -> None:
        """A request let through ended without a verdict (cancelled): allow another trial."""
        self._trial_out = False

    def _change(self, state: BreakerState) -> None:
        self._state = state
        logger.log(
            logging.INFO if state == "closed" else logging.WARNING,
            "upstream breaker %s (consecutive_failures=%d last_error=%s)",
            state,
            self._failures,
            self._last_error,
        )
