"""First frames first: cached replays asked for at once reach every client's ear early.

A replay waits for nothing (its entry is in memory, each write goes to a buffer with
room), so 200 clients asking at once for the same cached sentence were served one
whole utterance after another: the speaks are read over several passes of the
event loop, and the replays started in one pass wrote their second halves before
the next pass's readers had run. The last client's first byte came after about 200
whole replays, about 2× to 3× what a bare websockets server gives it
(bench/NOTES.md, "First frames first").

:class:`Turns` lets a replay that has written its first frame wait for its second
turn until every replay started meanwhile has written its own first frame and the
loop has gone :data:`QUIET_PASSES` passes without starting another one (a speak
read in one pass starts its replay two passes later: the reader's task, then the
speaker's), or at most :data:`LONGEST_WAIT` s, so that replays arriving without a
pause cannot hold the early ones back for long. A replay whose first frame has
waited longer than that (its client has audio unread: the write waits for it) holds
no one back. The waiters of a turn go on together. Written by hand: it is a count
and a list of futures on the running loop; asyncio has no barrier of this kind.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["LONGEST_WAIT", "QUIET_PASSES", "QUIET_S", "Turns"]

#: Passes of the event loop without a replay started, and none waiting for its first
#: frame, before the replays waiting for their second turn go on.
QUIET_PASSES = 3
#: Seconds without a replay started, too, once replays come together (another began
#: within this time before, or while one waits): when the loop has nothing else to do
#: its passes take microseconds, and a speak still on its way would miss them. A lone
#: replay waits for the passes alone.
QUIET_S = 0.001
#: Seconds at most a replay waits for its second turn (the first frame of a 24 kHz
#: MP3 is about 2.7 s of audio: the client plays meanwhile).
LONGEST_WAIT = 0.05


class Turns:
    """The replays waiting for their second turn; one per server (see the module)."""

    def __init__(
        self,
        quiet_passes: int = QUIET_PASSES,
        quiet_s: float = QUIET_S,
        longest: float = LONGEST_WAIT,
    ) -> None:
        self.quiet_passes = quiet_passes
        self.quiet_s = quiet_s
        self.longest = longest
        #: Replays started whose first frame is not written yet: when each started
        #: (time.perf_counter()), by the token :meth:`started` gave it, oldest first.
        self._pending: dict[int, float] = {}
        #: Replays started so far (a pass that saw none start is quiet).
        self._started = 0
        #: When the last one started, and the one before (time.perf_counter()).
        self._last_start = 0.0
        self._previous_start = -1.0
        #: Replays come together: the waiters wait for QUIET_S too.
        self._together = False
        self._seen = 0
        self._quiet = 0
        self._waiters: list[asyncio.Future[None]] = []
        #: The next pass's check, while one is due.
        self._checking = False
        self._timer: asyncio.TimerHandle | None = None

    @property
    def starts(self) -> int:
        """Replays started so far."""
        return self._started

    @property
    def pending(self) -> int:
        """Replays started whose first frame is not written yet."""
        return len(self._pending)

    def started(self) -> int:
        """A replay is about to write its first frame; the token for :meth:`first_sent`."""
        self._started += 1
        now = time.perf_counter()
        self._previous_start, self._last_start = self._last_start, now
        self._pending[self._started] = now
        return self._started

    def first_sent(self, token: int) -> None:
        """The replay :meth:`started` gave ``token`` wrote its first frame (or ended
        without one)."""
        del self._pending[token]
        if self._waiters and not self._checking and not self._first_awaited():
            self._check_soon()

    def _first_awaited(self) -> bool:
        """Whether a replay started less than :attr:`longest` ago waits for its first
        frame (one waiting longer holds no one back)."""
        if not self._pending:
            return False
        newest = next(reversed(self._pending.values()))
        return time.perf_counter() - newest < self.longest

    async def second_turn(self) -> None:
        """Wait, after the first frame, until the replays started meanwhile have written
        theirs and the loop is quiet (at most :attr:`longest` s)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if self._waiters and all(waiting.done() for waiting in self._waiters):
            self._release()  # its waiters were all cancelled: a turn of its own
        if not self._waiters:
            self._timer = loop.call_later(self.longest, self._release)
            self._seen = self._started
            self._quiet = 0
            self._together = self._last_start - self._previous_start < self.quiet_s
        self._waiters.append(waiter)
        if not self._checking and not self._first_awaited():
            self._check_soon()
        await waiter

    def _check_soon(self) -> None:
        self._checking = True
        asyncio.get_running_loop().call_soon(self._check)

    def _check(self) -> None:
        """Once per pass while replays wait and none waits for its first frame."""
        self._checking = False
        if all(waiter.done() for waiter in self._waiters) or self._first_awaited():
            return  # released (or all cancelled) already; or first_sent() checks again
        if self._started != self._seen:
            self._seen = self._started
            self._quiet = 0
            self._together = True
        else:
            self._quiet += 1
            if self._quiet >= self.quiet_passes:
                left = self._last_start + self.quiet_s - time.perf_counter()
                if left <= 0 or not self._together:
                    self._release()
                else:  # no pass to wait for: the loop may sleep meanwhile
                    self._checking = True
                    asyncio.get_running_loop().call_later(left, self._check)
                return
        self._check_soon()

    def _release(self) -> None:
        """The waiting replays' second turn."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
