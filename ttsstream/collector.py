"""The cycle collector under many live streams: what is alive is frozen every second.

Nothing the server makes at work needs the cycle collector: its objects die by
reference counting (at 1,000 paced clients, 14 full collections in a minute found
0 objects, gen-0 and gen-1 ones nothing either). The collector still walks every
tracked object it has not been told to skip: a live stream's flight (its audio
chunks and word events), tasks, coroutines, resume logs, the entries kept in
memory, about 330,000 objects at 1,000 clients; the event loop stopped for 12 %
of the time, up to 426 ms at once (bench/NOTES.md, 2026-12-07).

:class:`Freezer` moves what is alive into the permanent generation every
``FREEZE_EVERY`` s (``gc.freeze()``, a list splice), so a collection walks only
what was made since the last freeze. A frozen object freed by reference counting
leaves as any other. What would stay is garbage in a cycle formed after its
objects were frozen: everything is unfrozen and collected once (one full
collection's pause, instead of one every few seconds) when the frozen objects grew
by a quarter since the last time, at most every ``SWEEP_EVERY`` s.
"""

from __future__ import annotations

import asyncio
import gc

__all__ = ["FREEZE_EVERY", "SWEEP_EVERY", "SWEEP_GROWTH", "Freezer"]

#: Seconds between two freezes of what is alive.
FREEZE_EVERY = 1.0
#: Seconds at least between two full collections of everything, frozen objects
#: included; and the share by which the frozen objects must have grown since the last
#: one (as CPython's own rule for a full collection: 25 %). What a cycle holds after
#: its objects were frozen adds to them, so it is collected once it is a quarter of
#: what is alive; an idle server, whose frozen objects do not grow, is not swept.
#: (Every 600 s and always, bench/soak.py's cancels and dropped connections grew RSS
#: 15 MB a minute; every 60 s, 3 MB a minute over 180 s, flat by its verdict.)
SWEEP_EVERY = 60.0
SWEEP_GROWTH = 0.25


class Freezer:
    """Freeze what is alive every ``every`` s, and collect everything at most every
    ``sweep_every`` s once the frozen objects grew by ``sweep_growth`` (a share), on
    the running loop from :meth:`start` to :meth:`stop`."""

    def __init__(
        self,
        every: float = FREEZE_EVERY,
        sweep_every: float = SWEEP_EVERY,
        sweep_growth: float = SWEEP_GROWTH,
    ) -> None:
        if every <= 0 or sweep_every <= 0 or sweep_growth < 0:
            raise ValueError("every and sweep_every must be > 0, sweep_growth >= 0")
        self.every = every
        self.sweep_every = sweep_every
        self.sweep_growth = sweep_growth
        #: Freezes and full sweeps so far.
        self.ticks = 0
        self.sweeps = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._sweep_at = 0.0
        #: Objects frozen just after the last sweep (or the start).
        self._frozen_after_sweep = 0

    def start(self) -> None:
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._sweep_at = self._loop.time() + self.sweep_every
        gc.freeze()
        self._frozen_after_sweep = gc.get_freeze_count()
        self._handle = self._loop.call_later(self.every, self._tick)

    def stop(self) -> None:
        """Stop freezing, and give what is frozen back to the collector."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            gc.unfreeze()

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        # Counting the frozen objects walks them all (gc.get_freeze_count() is a list's
        # length, counted): only when a sweep is due. A freeze is a list splice.
        due = now >= self._sweep_at
        if due:
            self._sweep_at = now + self.sweep_every  # counted again a period later
        if due and gc.get_freeze_count() > self._frozen_after_sweep * (1 + self.sweep_growth):
            self.sweeps += 1
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._frozen_after_sweep = gc.get_freeze_count()
        else:
            gc.freeze()
        self.ticks += 1
        self._handle = self._loop.call_later(self.every, self._tick)
