"""The instance's upstream slots, shared fairly between clients (no I/O).

Each Edge synthesis holds one of ``UPSTREAM_CONCURRENCY`` slots from its first
attempt to its last byte, which for a 5,000-character text is a minute or more.
Taken in arrival order, one client with a few long texts could hold every slot
and make every other client wait for its syntheses to end. Two rules prevent it:

- **A cap per client** (``UPSTREAM_CONCURRENCY_PER_IP``): a client holds at most
  that many slots, even while others are free, so that another client finds a
  free slot as long as fewer than ``UPSTREAM_CONCURRENCY / cap`` clients are at
  their cap. A slot, once given, is held until its synthesis ends (a synthesis
  is never interrupted for another), so only a cap keeps slots free for others.
- **Fair order**: a freed slot goes to the waiting client, under its cap, that
  holds the fewest slots; among equals, the one given a slot least recently. A
  client with 20 requests waiting gets one slot, then each other waiting client
  gets one, before its second: nobody waits behind another client's backlog,
  only behind its own.

A client is whatever identifies who asks (its IP today; the tenant once there
are tenants). Its state is kept while it holds or waits for a slot, and dropped
after. A waiter that is cancelled (its utterance cancelled, its deadline passed)
takes nothing; one cancelled just as it was given a slot passes it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["FairSlots"]


@dataclass(slots=True)
class _Client:
    """One client's slots: how many it holds, its waiters in order, its last turn."""

    held: int = 0
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    #: The number of the last slot it was given (0: none since it last held none).
    served: int = 0


class FairSlots:
    """``capacity`` slots, at most ``per_client`` held by one client, given in fair order.

    Args:
        capacity: Slots in all (``UPSTREAM_CONCURRENCY``).
        per_client: Most slots one client holds at once; ``None`` for no cap
            (``capacity``). A value above ``capacity`` is ``capacity``.

    Raises:
        ValueError: ``capacity`` or ``per_client`` is below 1.
    """

    def __init__(self, capacity: int, *, per_client: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if per_client is not None and per_client < 1:
            raise ValueError("per_client must be >= 1")
        self.capacity = capacity
        self.per_client = capacity if per_client is None else min(per_client, capacity)
        self._free = capacity
        self._clients: dict[str, _Client] = {}
        self._turns = itertools.count(1)

    @property
    def free(self) -> int:
        """Slots no client holds."""
        return self._free

    @property
    def waiting(self) -> int:
        """Takers waiting for a slot, over every client."""
        return sum(len(state.waiters) for state in self._clients.values())

    def held_by(self, client: str) -> int:
        """Slots ``client`` holds."""
        state = self._clients.get(client)
        return 0 if state is None else state.held

    async def take(self, client: str) -> None:
        """Take a slot for ``client``, once it is its turn.

        At once when a slot is free and ``client`` is under its cap (nobody who
        could take it is waiting then: a freed slot goes straight to a waiter).

        Raises:
            asyncio.CancelledError: Cancelled while waiting; then nothing is held.
        """
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client()
        if self._free and state.held < self.per_client:
            self._give_to(state)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give_back(client)  # given a slot just as it left: it passes on
            else:
                with contextlib.suppress(ValueError):  # already dropped by _hand_on
                    state.waiters.remove(waiter)
                self._forget(client)
            raise

    def give_back(self, client: str) -> None:
        """Give back one of ``client``'s slots: the next waiter in fair order takes it.

        Raises:
            ValueError: ``client`` holds no slot.
        """
        state = self._clients.get(client)
        if state is None or not state.held:
            raise ValueError("this client holds no slot")
        state.held -= 1
        self._free += 1
        self._hand_on()
        self._forget(client)

    @contextlib.asynccontextmanager
    async def hold(self, client: str) -> AsyncIterator[None]:
        """Hold a slot for ``client`` (:meth:`take`, then :meth:`give_back` on exit)."""
        await self.take(client)
        try:
            yield
        finally:
            self.give_back(client)

    def _hand_on(self) -> None:
        """Give the free slots to waiters: each to the client under its cap that holds
        the fewest, the least recently served first."""
        while self._free:
            candidates = [
                state
                for state in self._clients.values()
                if state.waiters and state.held < self.per_client
            ]
            if not candidates:
                return
            chosen = min(candidates, key=lambda state: (state.held, state.served))
            waiter = chosen.waiters.popleft()
            if waiter.done():
                continue  # cancelled, its task not yet resumed: it takes nothing
            self._give_to(chosen)
            waiter.set_result(None)

    def _give_to(self, state: _Client) -> None:
        state.held += 1
        state.served = next(self._turns)
        self._free -= 1

    def _forget(self, client: str) -> None:
        """Drop the state of a client that holds nothing and waits for nothing."""
        state = self._clients.get(client)
        if state is not None and not state.held and not state.waiters:
            del self._clients[client]
