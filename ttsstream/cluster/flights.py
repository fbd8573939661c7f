"""One upstream call per text over the cluster, still streaming: flights in Redis.

The instance that starts an Edge synthesis first takes the flight's lock (``SET
NX`` with the instance's lease, renewed while it runs) and writes every event
of it to a Redis Stream as it comes. An identical request on another instance
finds the lock taken and reads that stream from its start, blocking for what
comes next, so its client gets the audio and words live, from the first chunk.

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
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from ttsstream.cluster.link import RedisLink
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

__all__ = ["SharedFlights"]

logger = logging.getLogger("ttsstream.cluster")

#: Seconds a finished flight's stream stays readable (for joiners still reading it).
STREAM_TTL = 60
#: Longest one blocking read of a flight's stream waits, in ms.
BLOCK_MS = 500

# One round trip: the lock, and a clean stream for the new flight.
_CLAIM = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
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

    async def claim(self, key: str) -> bool | None:
        """Whether this instance now owns the flight of ``key`` (``False``: another does;
        ``None``: Redis cannot tell, the instance goes alone)."""
        link = self._link
        lease_ms = round(link.lease_seconds * 1000)
        keys = [link.key("flight", key), link.key("events", key)]
        locked = await link.call(
            lambda client: client.eval(_CLAIM, 2, *keys, link.instance, lease_ms)
        )
        if locked is None:
            return None
        return bool(locked)

    async def publish(
        self, key: str, events: AsyncGenerator[Speech, None]
    ) -> AsyncGenerator[Speech, None]:
        """``events`` as they come, each also written to the flight's stream, in order, by
        a writer task (the owner's own clients never wait for Redis), which gives the
        lock back after the last."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        writer = asyncio.create_task(self._write(key, queue))
        self._writers.add(writer)
        writer.add_done_callback(self._writers.discard)
        final: dict[str, Any] = {"k": "gone"}
        try:
            async for event in events:
                queue.put_nowait(_encode(event))
                yield event
            final = {"k": "end"}
        except Exception as exc:
            final = {"k": "error", "code": error_code(exc), "message": str(exc)}
            raise
        finally:
            queue.put_nowait(final)
            queue.put_nowait(None)
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
                owner = await link.call(lambda client: client.exists(lock))
                if not owner or loop.time() - quiet_since > self._timeout:
                    raise FlightLost(audio_sent=audio_sent)
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

    async def _write(self, key: str, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        link = self._link
        stream, lock = link.key("events", key), link.key("flight", key)
        lease_ms = round(link.lease_seconds * 1000)
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            entries = [fields for fields in batch if fields is not None]

            async def add(client: Any, entries: list[dict[str, Any]] = entries) -> None:
                async with client.pipeline(transaction=False) as pipe:
                    for fields in entries:
                        pipe.xadd(stream, fields)
                    pipe.expire(stream, STREAM_TTL)
                    pipe.pexpire(lock, lease_ms)  # the owner is alive: its lock is renewed
                    await pipe.execute()

            if entries:
                await link.call(add, within=1.0)
            if None in batch:
                break
        await link.call(lambda client: client.eval(_RELEASE, 1, lock, link.instance))


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
