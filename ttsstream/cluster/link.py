"""The cluster's link to Redis: its connections, its state, and this instance's lease.

Redis must never fail a request. Every operation goes through
:meth:`RedisLink.call`, bounded by :data:`OPERATION_TIMEOUT`. The parts' calls
(:meth:`RedisLink.run`, :meth:`RedisLink.script`) go over the instance's
:class:`~ttsstream.cluster.line.QuickLine`, which reads a reply as soon as it is
there; the lease, the subscription and blocking reads over redis-py's client
(and every call, for ``rediss://``). A failure marks the
link down (logged once, at the change), answers ``None`` so that the caller
decides alone (its local limits), and a keeper task reconnects with backoff and
brings the link back up by itself. A slow answer is also ``None``, and makes the
keeper check Redis at once.

Messages between instances (pub/sub) come through one subscription per
instance, for every channel a part registered with :meth:`RedisLink.listen`,
made again whenever Redis comes back.

The keeper also holds this instance's lease: a member of a sorted set scored by
when it lapses, renewed every third of ``REDIS_LEASE_SECONDS``. The live
instances are the members whose lease has not lapsed, so an instance killed
with ``kill -9`` stops counting within a lease.

Errors are logged by type and Redis's own message, which never holds the
password; the URL is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions

from ttsstream.cluster.line import QuickLine

__all__ = ["OPERATION_TIMEOUT", "RedisLink"]

logger = logging.getLogger("ttsstream.cluster")

#: Longest one Redis operation may take before the instance decides alone, seconds
#: (a loaded 2-core machine took over 50 ms now and then for a round trip).
OPERATION_TIMEOUT = 0.2
#: Longest a connection attempt may take, seconds.
CONNECT_TIMEOUT = 1.0
#: Waits between reconnection attempts, seconds: doubling from the first to the last.
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 2.0

T = TypeVar("T")

#: What a failing Redis raises through redis-py.
_FAILURES = (redis.exceptions.RedisError, OSError, TimeoutError)


class RedisLink:
    """The instance's connection to the cluster's Redis.

    Args:
        url: ``redis://`` or ``rediss://`` URL (with its password, if any).
        prefix: Put before every key.
        lease_seconds: How long this instance counts as live without a renewal.
    """

    def __init__(self, url: str, *, prefix: str, lease_seconds: float) -> None:
        # No socket_timeout: every operation is bounded here instead (call, and the
        # few that cannot go through it), and with one redis-py sends each command
        # through asyncio.wait_for, which on Python 3.11 runs it in a task of its
        # own: a turn of the event loop more per call, about 1 ms on a loaded
        # instance (bench/NOTES.md).
        self._client: Any = redis.asyncio.from_url(
            url, socket_connect_timeout=CONNECT_TIMEOUT, retry_on_timeout=False
        )
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        #: This instance's id in the cluster (random, per process start).
        self.instance = secrets.token_hex(6)
        #: For :meth:`run` (``None`` for TLS: redis-py's pipelines then).
        self._line = QuickLine.for_url(
            url, name=f"ttsstream-{self.instance}", connect_timeout=CONNECT_TIMEOUT
        )
        #: ``starting``, ``up``, ``down`` or ``closed``.
        self.state = "starting"
        #: Live instances, this one included, as of the last renewal.
        self.instances = 0
        #: Why the link is down (an error's type and message), else ``None``.
        self.error: str | None = None
        #: Operations that took longer than their deadline (the instance decided alone).
        self.slow = 0
        self._keeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._when_up: list[Callable[[], None]] = []
        self._when_closing: list[Callable[[], Awaitable[None]]] = []
        self._channels: dict[str, Callable[[bytes], None]] = {}
        self._listener: asyncio.Task[None] | None = None

    @property
    def client(self) -> Any:
        """The redis-py client, for what :meth:`call` cannot bound (a subscription)."""
        return self._client

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await ``callback()`` when the link closes, to give back what the instance
        holds (:meth:`call` makes no more calls by then: use :attr:`client`)."""
        self._when_closing.append(callback)

    def on_up(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the link comes up (to publish what Redis may lack)."""
        self._when_up.append(callback)

    def listen(self, channel: str, callback: Callable[[bytes], None]) -> None:
        """Call ``callback(data)`` for each message published on ``channel`` (of this
        deployment) by any instance; registered before :meth:`start`. Messages sent
        while Redis is down or the subscription is being made again are lost, so a
        listener must not depend on every one."""
        self._channels[self.key(channel)] = callback

    async def publish(self, channel: str, data: str) -> None:
        """Publish ``data`` on ``channel`` to every instance's listener (this one's too)."""
        await self.run(("PUBLISH", self.key(channel), data))

    def key(self, *parts: str) -> str:
        """A key in this deployment's namespace."""
        return self.prefix + ":".join(parts)

    @property
    def up(self) -> bool:
        return self.state == "up"

    async def start(self) -> None:
        """Connect (a failure is a warning: the instance runs alone meanwhile) and keep
        the link and the lease."""
        await self._renew()
        self._keeper = asyncio.create_task(self._keep(), name="redis-keeper")
        if self._channels:
            self._listener = asyncio.create_task(self._listen(), name="redis-listener")

    async def aclose(self) -> None:
        """Stop the keeper and the listener, leave the cluster, close the connections."""
        was_up = self.up
        # Closed: the keeper's and the listener's loops end, and background writes
        # still pending (counts, permits) do nothing.
        self.state = "closed"
        self._wake.set()
        for task in (self._keeper, self._listener):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for callback in self._when_closing:
            await callback()
        if was_up:
            with contextlib.suppress(*_FAILURES):
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await self._client.zrem(self.key("instances"), self.instance)
        with contextlib.suppress(*_FAILURES):
            await self._client.aclose()
        if self._line is not None:
            self._line.close()

    async def call(
        self, operation: Callable[[Any], Awaitable[T]], *, within: float = OPERATION_TIMEOUT
    ) -> T | None:
        """``operation(client)`` within ``within`` seconds, or ``None`` if Redis is down,
        failing or slow.

        A failure takes the link down until the keeper brings it back. A slow answer
        only asks the keeper to check Redis at once (it goes down if Redis does not
        answer within CONNECT_TIMEOUT): an instance whose own event loop was busy
        must not leave the cluster for it.
        """
        if not self.up:
            return None
        try:
            async with asyncio.timeout(within):
                return await operation(self._client)
        except TimeoutError:
            self.slow += 1
            self._wake.set()
            return None
        except _FAILURES as exc:
            _raise_if_cancelled(exc)
            self._down(exc)
            return None

    async def run(
        self, *commands: tuple[Any, ...], within: float = OPERATION_TIMEOUT
    ) -> list[Any] | None:
        """Send ``commands`` (``("SET", key, value)``, ``("EVAL", script, 1, key)``…) in
        order and in one write, within ``within`` seconds; their replies, or ``None``
        as :meth:`call` answers it.

        They go over the :class:`~ttsstream.cluster.line.QuickLine` where there is
        one: its replies are read as soon as they are there, not at the event loop's
        next turn, and it costs the instance half the CPU of a redis-py call
        (bench/NOTES.md). A reply is as Redis sent it (``b"OK"``, not ``True``).
        """
        line = self._line

        async def over_line(_: Any) -> list[Any]:
            assert line is not None
            return await line.run(*commands)

        async def over_client(client: Any) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return list(await pipe.execute())

        return await self.call(over_client if line is None else over_line, within=within)

    async def script(
        self, script: str, keys: list[str], args: list[Any], *, within: float = OPERATION_TIMEOUT
    ) -> Any:
        """Run a Lua script (sent by its digest where Redis has it, as :meth:`run` does);
        its reply, or ``None`` as :meth:`call` answers it."""
        replies = await self.run(("EVAL", script, len(keys), *keys, *args), within=within)
        return None if replies is None else replies[0]

    def snapshot(self) -> dict[str, Any]:
        """What ``/health`` and ``/stats`` show of the cluster."""
        return {
            "state": "up" if self.up else "down",
            "instances": self.instances if self.up else None,
            "error": self.error,
            "slow_operations": self.slow,
        }

    async def _listen(self) -> None:
        """Hold the subscription to every registered channel, made again after a failure.

        It ends when the link closes, whatever redis-py makes of the cancellation
        (it may surface as a connection error).
        """
        while self.state != "closed":
            if not self.up:
                await asyncio.sleep(0.25)
                continue
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(*self._channels)
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None:
                            callback = self._channels.get(message["channel"].decode())
                            if callback is not None:
                                callback(message["data"])
            except _FAILURES as exc:  # Redis went away: subscribe again once it is back
                _raise_if_cancelled(exc)
                logger.debug("redis: subscription lost (%s)", type(exc).__name__)
                await asyncio.sleep(0.25)

    async def _keep(self) -> None:
        backoff = BACKOFF_FIRST
        while self.state != "closed":
            wait = self.lease_seconds / 3 if self.up else backoff
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            self._wake.clear()
            await self._renew()
            backoff = BACKOFF_FIRST if self.up else min(backoff * 2, BACKOFF_MAX)

    async def _renew(self) -> None:
        """Renew this instance's lease and count the live ones; up or down by the result."""
        key = self.key("instances")
        now = time.time()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.zadd(key, {self.instance: now + self.lease_seconds})
                    pipe.zremrangebyscore(key, "-inf", now)
                    # What this instance holds lapses with its lease.
                    pipe.pexpire(self.key("conns", self.instance), round(self.lease_seconds * 1000))
                    pipe.zcard(key)
                    *_, live = await pipe.execute()
        except _FAILURES as exc:
            _raise_if_cancelled(exc)
            self._down(exc)
            return
        if self.state == "closed":
            return
        self.instances = int(live)
        came_up = not self.up
        self.state = "up"
        self.error = None
        if came_up:
            logger.warning("redis: up; shared mode with %d live instances", self.instances)
            for callback in self._when_up:
                callback()

    def _down(self, exc: BaseException) -> None:
        if self.state == "closed":
            return
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self._line is not None:
            self._line.close()  # opened again by the first call once Redis is back
        if self.state != "down":
            logger.warning("redis: down (%s); each instance decides alone until it is back", error)
            self._wake.set()  # the keeper starts reconnecting at once
        self.state = "down"
        self.error = error


def _raise_if_cancelled(failure: BaseException) -> None:
    """Go on with a cancellation that redis-py turned into a connection error: a loop
    that took it for Redis failing would never end."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from failure
