"""Single flight: one synthesis, any number of listeners, each at its own pace.

A :class:`SharedSynthesis` reads its source in a task of its own and keeps every
event in order. Each listener replays the events from the first one and then
follows live, so a listener that joins mid-stream still gets the whole
utterance, and a slow listener never holds up the source or the others. The
source is closed when its last listener leaves. What it holds is bounded by the
utterance itself, that is by ``MAX_TEXT_LENGTH``.

A synthesis whose last listener left is abandoned (unless ``go_on_alone`` says
it is worth finishing, to be stored): it stops being joinable at that moment
(``on_finished`` runs then, so a registry forgets it before its upstream has
closed), and a new identical request starts a new synthesis. A listener never
receives another task's cancellation: a synthesis stopped while listened to (at
shutdown) fails them with an ordinary :class:`UpstreamUnavailable`.

What a synthesis keeps may be bounded (``max_kept``, for a transcode's output,
which unlike the MP3 may be made faster than it is listened to): past the bound
it is no longer whole, so it is neither joined nor stored; it drops the events
every listener has taken, and its source waits while the slowest listener is
more than the bound behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Generic, TypeVar

from ttsstream.exceptions import UpstreamUnavailable

__all__ = ["SharedSynthesis"]

T = TypeVar("T")


class SharedSynthesis(Generic[T]):
    """Broadcast one async generator's events to many listeners.

    Args:
        source: The synthesis; started at once in its own task.
        on_complete: Awaited with every event once the source ended without error
            (to store the result), before the synthesis stops being joinable; not
            when it went past ``max_kept``.
        on_finished: Called when the synthesis is over and no longer joinable.
        size: An event's size, counted against ``max_kept`` (bytes of audio, say).
        max_kept: Most of ``size`` kept at once; ``None`` keeps every event.
        go_on_alone: Asked when the last listener leaves before the end: whether the
            source goes on without listeners (still joinable, then ``on_complete``)
            rather than being stopped. Never past ``max_kept``.
    """

    def __init__(
        self,
        source: AsyncGenerator[T, None],
        *,
        on_complete: Callable[[list[T]], Awaitable[None]] | None = None,
        on_finished: Callable[[], None] | None = None,
        size: Callable[[T], int] | None = None,
        max_kept: int | None = None,
        go_on_alone: Callable[[], bool] | None = None,
    ) -> None:
        if max_kept is not None and (size is None or max_kept < 0):
            raise ValueError("max_kept needs size, and must be >= 0")
        #: The events kept: every one from the first while :attr:`whole`, else those
        #: that some listener has yet to take.
        self.events: list[T] = []
        self.done = False
        #: The last listener left before the end: never to be joined again.
        self.abandoned = False
        #: Every event since the first is kept (it never went past ``max_kept``).
        self.whole = True
        #: The size of the events kept.
        self.kept = 0
        self.error: Exception | None = None
        self.listeners = 0
        self._source = source
        self._on_complete = on_complete
        self._on_finished = on_finished
        self._size = size
        self._max_kept = max_kept
        self._go_on_alone = go_on_alone
        #: How many events were dropped from the front of :attr:`events`.
        self._dropped = 0
        #: Each listener's position: the number of the next event it takes.
        self._positions: dict[object, int] = {}
        self._changed = asyncio.Event()
        self._taken = asyncio.Event()
        self._task = asyncio.create_task(self._pump())

    @property
    def joinable(self) -> bool:
        """Whether a new listener may join: neither abandoned, past its bound, nor failed
        (a synthesis that succeeded is replayed from memory until its registry lets it go)."""
        return not self.abandoned and self.whole and (not self.done or self.error is None)

    async def listen(self) -> AsyncGenerator[T, None]:
        """Every event from the first, then live ones; raises the source's error if it failed."""
        assert self.joinable, "an abandoned, failed or partly dropped synthesis is never joined"
        self.listeners += 1
        me = object()
        self._positions[me] = 0
        try:
            while True:
                while (position := self._positions[me]) < self._dropped + len(self.events):
                    event = self.events[position - self._dropped]
                    self._positions[me] = position + 1
                    if not self.whole:
                        self._drop_taken()
                    yield event
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                await self._changed.wait()
        finally:
            self.listeners -= 1
            del self._positions[me]
            if self.listeners == 0 and not self.done and not self._goes_on_alone():
                self.abandoned = True
                self._release()
                self._task.cancel()
            elif not self.whole:
                self._drop_taken()

    def _goes_on_alone(self) -> bool:
        return self.whole and self._go_on_alone is not None and self._go_on_alone()

    def _drop_taken(self) -> None:
        """Drop the events every listener has taken, and let the source go on if it waits."""
        taken = min(self._positions.values(), default=self._dropped + len(self.events))
        count = taken - self._dropped
        if count <= 0:
            return
        assert self._size is not None
        self.kept -= sum(self._size(event) for event in self.events[:count])
        del self.events[:count]
        self._dropped = taken
        self._taken.set()
        self._taken.clear()

    async def _pump(self) -> None:
        try:
            async for event in self._source:
                self.events.append(event)
                self._wake()
                if self._size is None or self._max_kept is None:
                    continue
                self.kept += self._size(event)
                if self.kept > self._max_kept and self.whole:
                    # Past the bound: neither joined nor stored from now on.
                    self.whole = False
                    self._release()
                    if not self.listeners:
                        self.abandoned = True  # it went on alone to be stored: no longer
                        break
                    self._drop_taken()
                while self.kept > self._max_kept:
                    await self._taken.wait()
        except asyncio.CancelledError:
            # Abandoned (nobody hears this) or stopped at shutdown: the listeners
            # left get an ordinary error, never this task's cancellation.
            self.error = UpstreamUnavailable("the synthesis was stopped")
        except Exception as exc:
            self.error = exc
        finally:
            # Listeners learn the outcome before the upstream has closed.
            self.done = True
            self._wake()
            await self._source.aclose()
        try:
            if self.error is None and self.whole and self._on_complete is not None:
                await self._on_complete(self.events)
        finally:
            self._release()
            # The callbacks usually refer back to this synthesis: without the cycle,
            # its events are freed with the last listener, not by a full collection.
            self._on_complete = None

    def _release(self) -> None:
        """No longer joinable: call ``on_finished`` (once)."""
        on_finished, self._on_finished = self._on_finished, None
        if on_finished is not None:
            on_finished()

    def _wake(self) -> None:
        # Event.set wakes every current waiter; clearing at once re-arms it for the next event.
        self._changed.set()
        self._changed.clear()

    async def aclose(self) -> None:
        """Stop the source (used at shutdown)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
