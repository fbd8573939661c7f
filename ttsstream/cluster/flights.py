"""One upstream call per text over the cluster, still streaming: flights in Redis.

The instance that starts an Edge synthesis first takes the flight's lock (``SET
NX`` with the instance's lease, renewed while it runs). An identical request on
another instance finds the lock taken, asks for the flight (a message on the
deployment's ``want`` channel, to which each instance subscribes once), and
reads the flight's Redis Stream from its start, blocking for what comes next.
The owner writes a flight's events to its stream only once someone asked for
it: first what it kept so far, then each event as it comes, so a joiner gets
the audio and words live, from the first chunk, and a flight nobody joins costs
Redis nothing but its lock. (Writing every flight out cost a fifth of the
server's CPU at 100 live utterances.)

A flight that ends whole keeps its lock until the cache has its entry: then
:meth:`SharedFlights.settle` stores the entry in the shared tier and gives the
lock back, when the cache writes it (once no utterance waits for its first
audio), in one call with the other flights settled within :data:`SETTLE_DELAY`.
Until then a joiner still finds the lock and gets the flight's stream written
out, and after it finds the entry: there is no moment in between when the text
would look new to the cluster. The locks of this instance's flights are renewed
together, in one call a third of a lease. Each call wakes Redis, which costs the
instance's core CPU when they share it, and work at the end of an utterance
delays the next request of a client that asks again at once (bench/NOTES.md).

If the owner dies, its lock lapses with its lease; a reader that sees the lock
gone (or nothing new for ``UPSTREAM_TIMEOUT``) before the end is told
:class:`FlightLost`, with whether it had passed on audio: one that had not
takes the flight over (synthesizes it itself), one that had ends with
``upstream_unavailable``, so that no client hears two syntheses mixed. After
the end the stream expires within a minute. While Redis is down, flights are
the instance's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from typing import Any, NamedTuple

import orjson

from ttsstream.cluster.link import OPERATION_TIMEOUT, RedisLink
from ttsstream.cluster.ratelimit import HIT_FUNCTION
from ttsstream.core.router import Speech, Started
from ttsstream.core.speech_cache import FlightLost
from ttsstream.engines.base import AudioChunk, AudioFormat, WordEvent, word_fields
from ttsstream.exceptions import (
    ClientError,
    NoAudio,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_code,
)

__all__ = ["Found", "SharedFlights"]

logger = logging.getLogger("ttsstream.cluster")

#: Seconds a finished flight's stream stays readable (for joiners still reading it).
STREAM_TTL = 60
#: Longest one blocking read of a flight's stream waits, in ms.
BLOCK_MS = 500
#: Seconds the settles of whole flights wait for others, to go to Redis in one call:
#: each call wakes Redis, which on the instance's core costs it CPU (bench/NOTES.md).
SETTLE_DELAY = 0.05

# One round trip: the lock, and a clean stream for the new flight (1; 0 if taken).
_CLAIM_FUNCTION = """
local function claim(lock, events, owner, lease_ms)
  if not redis.call('SET', lock, owner, 'NX', 'PX', lease_ms) then return 0 end
  redis.call('DEL', events)
  return 1
end
"""
_CLAIM = _CLAIM_FUNCTION + "return claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2])\n"
# The same claim, unless the text's entry is stored (``entry_key``): then {2, the entry},
# and no lock.
_FIND_OR_CLAIM_FUNCTION = """
local function find_or_claim(lock, events, entry_key, owner, lease_ms)
  local entry = redis.call('GET', entry_key)
  if entry then return {2, entry} end
  return {claim(lock, events, owner, lease_ms)}
end
"""
_FIND_OR_CLAIM = (
    _CLAIM_FUNCTION
    + _FIND_OR_CLAIM_FUNCTION
    + "return find_or_claim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])\n"
)
# A speak's rate-limit hit first (KEYS[4]): over the limit, {3, µs to wait} and nothing
# looked up or claimed; else the lookup as above.
_HIT_THEN_FIND_OR_CLAIM = (
    HIT_FUNCTION
    + _CLAIM_FUNCTION
    + _FIND_OR_CLAIM_FUNCTION
    + """
local wait = hit(KEYS[4], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])
if wait >= 0 then return {3, wait} end
return find_or_claim(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
"""
)
# Gives back each lock in KEYS that is still this instance's (ARGV[1]): one script for
# all the flights of a settle, since each script call costs Redis more than its commands.
_RELEASE = """
local released = 0
for _, lock in ipairs(KEYS) do
  if redis.call('GET', lock) == ARGV[1] then released = released + redis.call('DEL', lock) end
end
return released
"""


class Found(NamedTuple):
    """What :meth:`SharedFlights.find_or_claim` found: the entry's bytes, or whether
    the flight is now this instance's; or, when the request's rate-limit hit was
    refused, the µs to wait (and nothing else)."""

    found: bytes | bool = False
    wait_us: int | None = None


_ERRORS: dict[str, type[ClientError]] = {
    "upstream_timeout": UpstreamTimeout,
    "no_audio": NoAudio,
}


class SharedFlights:
    """Flights in Redis Streams (a :class:`~ttsstream.core.speech_cache.ClusterFlights`).

    Args:
        link: The cluster's Redis.
        timeout: Seconds a reader waits for the next event before giving up on the owner.
    """

    def __init__(self, link: RedisLink, *, timeout: float) -> None:
        self._link = link
        self._timeout = timeout
        self._writers: set[asyncio.Task[None]] = set()
        #: This instance's flights, by key, from their claim until they are settled:
        #: what they made so far, until another instance wants it.
        self._own: dict[str, _Publication] = {}
        #: Flights to settle (with their entries, if whole) in the next call, and the
        #: task that makes it.
        self._settling: list[tuple[str, tuple[tuple[Any, ...], float] | None]] = []
        self._settler: asyncio.Task[None] | None = None
        #: Renews the locks of every flight in ``_own``, while there are any.
        self._renewer: asyncio.Task[None] | None = None
        #: Keys other instances asked for lately, and when (a want may come first).
        self._wanted: dict[str, float] = {}
        # Subscribed from the start (an ask made before would be lost), and again
        # whenever Redis comes back.
        link.listen("want", self._on_want)
        link.on_close(self._close)

    async def claim(self, key: str) -> bool | None:
        """Whether this instance now owns the flight of ``key`` (``False``: another does;
        ``None``: Redis cannot tell, the instance goes alone)."""
        link = self._link
        lease_ms = round(link.lease_seconds * 1000)
        keys = [link.key("flight", key), link.key("events", key)]
        locked = await link.script(_CLAIM, keys, [link.instance, lease_ms])
        if locked is None:
            # Past its deadline the script may still have taken the lock: given back,
            # or another instance would wait on a flight nobody writes out.
            self.give_back(key)
            return None
        return bool(locked)

    async def find_or_claim(
        self,
        key: str,
        entry_key: str,
        *,
        within: float,
        hit: tuple[str, list[Any]] | None = None,
    ) -> Found | None:
        """The stored entry at ``entry_key`` (its bytes) if there is one, else whether
        this instance now owns the flight of ``key``, in one round trip (``None``:
        Redis cannot tell).

        With ``hit`` (the rate window's key and :data:`HIT_FUNCTION`'s arguments, from
        :meth:`SharedWindow.hit_parts`), a request's hit is counted first in the same
        script: if it is over the limit, the answer is the µs to wait, and nothing is
        looked up or claimed.
        """
        link = self._link
        lease_ms = round(link.lease_seconds * 1000)
        keys = [link.key("flight", key), link.key("events", key), entry_key]
        args: list[Any] = [link.instance, lease_ms]
        script = _FIND_OR_CLAIM
        if hit is not None:
            script = _HIT_THEN_FIND_OR_CLAIM
            keys.append(hit[0])
            args.extend(hit[1])
        found = await link.script(script, keys, args, within=within)
        if found is None:
            self.give_back(key)  # the script may have run after the deadline, as in claim
            return None
        if found[0] == 3:
            return Found(wait_us=int(found[1]))
        return Found(bytes(found[1]) if found[0] == 2 else bool(found[0]))

    def give_back(self, key: str) -> None:
        """Give back the lock of ``key``: a claim not flown, or a whole flight of this
        instance with no entry to store (in the background)."""
        self._settle_later(key, None)

    def settle(self, key: str, store: tuple[Any, ...], *, within: float) -> None:
        """Store a whole flight's entry (``store``: the command that does) and give its
        lock back (in the background, with the others of the moment, after its stream,
        if it is written out), within ``within`` seconds."""
        self._settle_later(key, (store, within))

    async def publish(
        self, key: str, events: AsyncGenerator[Speech, None]
    ) -> AsyncGenerator[Speech, None]:
        """``events`` as they come, each also written to the flight's stream once another
        instance wants it, in order, by a writer task (the owner's own clients never
        wait for Redis). A flight that fails gives its lock back at once; a whole one
        keeps it until :meth:`settle` or :meth:`give_back`."""
        publication = self._own[key] = _Publication(self, key)
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_locks())
        if self._wanted.pop(key, None) is not None:
            publication.want()
        final: dict[str, Any] = {"k": "gone"}
        try:
            async for event in events:
                publication.add(event)
                yield event
            final = {"k": "end"}
        except Exception as exc:
            final = {"k": "error", "code": error_code(exc), "message": str(exc)}
            raise
        finally:
            whole = final["k"] == "end"
            if not whole and self._own.get(key) is publication:
                del self._own[key]
            publication.end(final, release=not whole)
            await events.aclose()

    async def listen(self, key: str) -> AsyncIterator[Speech]:
        """The flight's events from its start, live.

        Raises:
            FlightLost: Its owner (or Redis) is gone before its end.
            ClientError: The owner's synthesis failed.
        """
        link = self._link
        stream, lock = link.key("events", key), link.key("flight", key)
        loop = asyncio.get_running_loop()
        await self._want(key)
        last = "0-0"
        audio_sent = False
        quiet_since = loop.time()
        while True:

            def xread(client: Any, last: str = last) -> Any:
                return client.xread({stream: last}, count=256, block=BLOCK_MS)

            read = await link.call(xread, within=BLOCK_MS / 1000 + 1.0)
            if read is None:
                raise FlightLost(audio_sent=audio_sent)
            entries = read[0][1] if read else []
            if not entries:
                owner = await link.run(("EXISTS", lock))
                if not owner or not owner[0] or loop.time() - quiet_since > self._timeout:
                    raise FlightLost(audio_sent=audio_sent)
                if last == "0-0":  # nothing yet: the owner may have missed the first ask
                    await self._want(key)
                continue
            quiet_since = loop.time()
            for entry_id, fields in entries:
                last = entry_id
                kind = fields[b"k"]
                if kind == b"end":
                    return
                if kind == b"gone":
                    raise FlightLost(audio_sent=audio_sent)
                if kind == b"error":
                    code = fields[b"code"].decode()
                    raise _ERRORS.get(code, UpstreamUnavailable)(fields[b"message"].decode())
                event = _decode(kind, fields)
                audio_sent = audio_sent or isinstance(event, AudioChunk)
                yield event

    async def _want(self, key: str) -> None:
        """Ask the owner of ``key``'s flight, whichever instance it is, to write it out."""
        await self._link.publish("want", key)

    def _on_want(self, data: bytes) -> None:
        key = data.decode()
        publication = self._own.get(key)
        if publication is not None:
            publication.want()
            return
        # Not (yet) this instance's: remembered for a moment in case its flight starts now.
        now = asyncio.get_running_loop().time()
        self._wanted = {k: t for k, t in self._wanted.items() if now - t < 5.0}
        self._wanted[key] = now

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._writers.add(task)
        task.add_done_callback(self._writers.discard)
        return task

    def _settle_later(self, key: str, entry: tuple[tuple[Any, ...], float] | None) -> None:
        """Settle ``key`` with the others of the next :data:`SETTLE_DELAY` seconds."""
        self._settling.append((key, entry))
        if self._settler is None:
            self._settler = self._spawn(self._settle_soon())

    async def _settle_soon(self) -> None:
        await asyncio.sleep(SETTLE_DELAY)
        self._settler = None
        await self._settle_all()

    async def _settle_all(self) -> None:
        """Store the entries waiting and give their locks back, in one call, each after
        its stream (if it was written out: a joiner reads it to its end)."""
        link = self._link
        settling, self._settling = self._settling, []
        writers: list[asyncio.Task[None]] = []
        commands: list[tuple[Any, ...]] = []
        locks: list[str] = []
        within = 0.0
        for key, entry in settling:
            publication = self._own.get(key)
            if publication is not None and publication.ended:
                del self._own[key]
                if publication.writer is not None:
                    writers.append(publication.writer)
            if entry is not None:
                # Not in the release's script: Lua copies an entry's bytes twice, which
                # made this cost Redis 0.16 ms instead of 0.02.
                store, entry_within = entry
                commands.append(store)
                within = max(within, entry_within)
            locks.append(link.key("flight", key))
        commands.append(("EVAL", _RELEASE, len(locks), *locks, link.instance))
        for writer in writers:
            await writer
        await link.run(*commands, within=within or OPERATION_TIMEOUT)

    async def _release(self, key: str, writer: asyncio.Task[None] | None) -> None:
        """Give back the lock of a flight that failed, at once (after its stream)."""
        if writer is not None:
            await writer
        await self._link.script(_RELEASE, [self._link.key("flight", key)], [self._link.instance])

    async def _renew_locks(self) -> None:
        """Renew the lock of every flight of this instance (one pipeline), a third of a
        lease apart, while it has any: a text that takes longer than a lease is still
        one flight."""
        link = self._link
        lease_ms = round(link.lease_seconds * 1000)
        try:
            while self._own:
                await asyncio.sleep(link.lease_seconds / 3)
                renewals = [("PEXPIRE", link.key("flight", key), lease_ms) for key in self._own]
                if renewals:
                    await link.run(*renewals)
        finally:
            self._renewer = None

    async def _close(self) -> None:
        """Give back, as the link closes, the locks of whole flights not yet settled."""
        if self._renewer is not None:
            self._renewer.cancel()
        locks = [self._link.key("flight", key) for key, own in self._own.items() if own.ended]
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                if locks:
                    await self._link.client.eval(_RELEASE, len(locks), *locks, self._link.instance)

    async def _write(self, key: str, queue: asyncio.Queue[_Queued | None]) -> None:
        link = self._link
        stream = link.key("events", key)
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            adds = [
                ("XADD", stream, "*", *_flat(item if isinstance(item, dict) else _encode(item)))
                for item in batch
                if item is not None
            ]
            if adds:
                # The stream expires apart from the lock, which is renewed apart.
                await link.run(*adds, ("EXPIRE", stream, STREAM_TTL), within=1.0)
            if None in batch:
                break


#: What a publication keeps and writes out: an event, or the flight's last fields.
_Queued = Speech | dict[str, Any]


class _Publication:
    """One flight of this instance: its events kept (as they are: encoding them costs
    only a flight that is wanted) until another instance asks for them, then written
    out, what was kept and the rest as it comes; also after its end, until settled."""

    def __init__(self, flights: SharedFlights, key: str) -> None:
        self._flights = flights
        self._key = key
        self._kept: list[_Queued] = []
        self._queue: asyncio.Queue[_Queued | None] | None = None
        #: Writes the flight's stream, once wanted.
        self.writer: asyncio.Task[None] | None = None
        self.ended = False

    def add(self, event: Speech) -> None:
        if self._queue is None:
            self._kept.append(event)
        else:
            self._queue.put_nowait(event)

    def want(self) -> None:
        if self._queue is not None:
            return
        self._queue = asyncio.Queue()
        for item in self._kept:
            self._queue.put_nowait(item)
        if self.ended:
            self._queue.put_nowait(None)
        self._kept = []
        self.writer = self._flights._spawn(self._flights._write(self._key, self._queue))

    def end(self, final: dict[str, Any], *, release: bool) -> None:
        """The flight is over: ``final`` says how; ``release``: its lock goes back now
        (after its stream, if written), else it waits to be settled."""
        self.ended = True
        if self._queue is not None:
            self._queue.put_nowait(final)
            self._queue.put_nowait(None)
        elif not release:  # kept whole, for a joiner that asks before it is settled
            self._kept.append(final)
        if release:
            self._kept = []
            self._flights._spawn(self._flights._release(self._key, self.writer))


def _encode(event: Speech) -> dict[str, Any]:
    if isinstance(event, AudioChunk):
        return {"k": "audio", "data": bytes(event.data)}
    if isinstance(event, WordEvent):
        return {"k": "word", "json": orjson.dumps(word_fields(event))}
    audio_format = event.audio_format
    return {
        "k": "start",
        "json": orjson.dumps(
            {
                "engine": event.engine,
                "voice": event.voice,
                "fallback_reason": event.fallback_reason,
                "format": [
                    audio_format.mime_type,
                    audio_format.sample_rate,
                    audio_format.bitrate_bps,
                    audio_format.name,
                ],
            }
        ),
    }


def _flat(fields: dict[str, Any]) -> list[Any]:
    """A stream entry's fields as XADD takes them."""
    return [part for pair in fields.items() for part in pair]


def _decode(kind: bytes, fields: dict[bytes, bytes]) -> Speech:
    if kind == b"audio":
        return AudioChunk(fields[b"data"])
    described = orjson.loads(fields[b"json"])
    if kind == b"word":
        return WordEvent(
            text=described["text"],
            offset_ms=described["offset_ms"],
            duration_ms=described["duration_ms"],
            char_start=described["char_start"],
            char_end=described["char_end"],
        )
    mime, rate, bps, name = described["format"]
    return Started(
        described["engine"],
        described["voice"],
        AudioFormat(mime_type=mime, sample_rate=rate, bitrate_bps=bps, name=name),
        fallback_reason=described["fallback_reason"],
    )
