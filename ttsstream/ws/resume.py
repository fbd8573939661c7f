"""Resuming a dropped WebSocket: each utterance's frames kept by byte offset, and the
connections parked until their client comes back.

An utterance's frames (its JSON messages and its audio) are kept in an
:class:`UtteranceLog` as they are sent, each with the audio bytes sent before it,
so that a client that received ``offset`` audio bytes (and ``frames`` JSON
messages) gets exactly the rest: no gap, no byte twice. When a connection drops
without a close (the network went away), it is parked in :class:`Parking` for
``RESUME_WINDOW`` seconds under its session token: its utterances go on being
spoken into their logs; a new connection's ``resume`` with that token (from the
same key's tenant) takes them over. What the logs hold is bounded per connection
(``RESUME_BUFFER_MB``) and in all (``RESUME_TOTAL_MB``): past it, the oldest ended
utterances' frames are dropped first, then the growing one's (it cannot be resumed).
A cached replay's audio frames are views of its entry's bytes, shared by every
replay of it: they count as the entry's bytes once per connection and once in all,
however many logs hold them (counted as sent, a closed loop of replays of one
sentence filled the 256 MB in about 3 s and pushed out the logs of live utterances).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ttsstream.core.context import Principal
from ttsstream.exceptions import ResumeFailed

if TYPE_CHECKING:
    from ttsstream.ws.connection import Connection

__all__ = ["Buffers", "Logs", "Parking", "UtteranceLog", "new_token"]


def _shared(frame: bytes | memoryview) -> bytes | None:
    """The immutable bytes ``frame`` is a view of (a cached entry's audio), if it is one."""
    if isinstance(frame, memoryview):
        owner: Any = frame.obj
        if type(owner) is bytes:
            return owner
    return None


def _unref(counts: dict[int, int], key: int) -> bool:
    """One reference less to ``key`` in ``counts``; whether it was the last."""
    left = counts[key] - 1
    if left:
        counts[key] = left
        return False
    del counts[key]
    return True


def new_token() -> str:
    """An unguessable session token (144 random bits)."""
    return secrets.token_urlsafe(18)


@dataclass(slots=True)
class UtteranceLog:
    """The frames of one utterance as sent, in order."""

    id: str
    #: Each frame, whether it is a text frame, and the audio bytes sent before it.
    frames: list[tuple[bytes | memoryview, bool, int]] = field(default_factory=list)
    #: Audio bytes in all.
    audio: int = 0
    #: Text frames in all.
    texts: int = 0
    size: int = 0
    #: Its last frame was sent (``end`` or an error), at this monotonic time.
    ended_at: float | None = None
    #: Its frames were dropped (over the buffers' bound): it cannot be resumed.
    dropped: bool = False

    def add(self, frame: bytes | memoryview, text: bool) -> None:
        self.frames.append((frame, text, self.audio))
        if text:
            self.texts += 1
        else:
            self.audio += len(frame)
        self.size += len(frame)

    def start(self, offset: int, frames: int | None) -> tuple[int, int]:
        """Where a client at ``offset`` audio bytes (and ``frames`` text frames) resumes:
        the index of the first frame to send and how many of its bytes to skip.

        Raises:
            ValueError: ``offset`` is past the audio sent, or ``frames`` past the
                messages sent.
        """
        if offset > self.audio or (frames is not None and frames > self.texts):
            raise ValueError("past what was sent")
        texts = 0
        for index, (frame, text, before) in enumerate(self.frames):
            if text:
                # A message is the client's if it counted it, or (uncounted) came before
                # the audio it reached.
                if (frames is None and before >= offset) or (
                    frames is not None and texts >= frames
                ):
                    return index, 0
                texts += 1
            elif before + len(frame) > offset:
                return index, max(0, offset - before)
        return len(self.frames), 0

    def drop(self) -> int:
        """Forget its frames; the bytes freed."""
        freed, self.size = self.size, 0
        self.frames = []
        self.dropped = True
        return freed


@dataclass(slots=True)
class Logs:
    """One connection's utterance logs, by id, in the order they began."""

    by_id: dict[str, UtteranceLog] = field(default_factory=dict)
    size: int = 0
    #: Its share of :attr:`Buffers._ended` (ended, kept, not being caught up), oldest
    #: end first: the connection's own first to go when it is over its bound.
    kept: dict[int, UtteranceLog] = field(default_factory=dict)
    #: Frames of its logs viewing each shared bytes object (by id): counted once.
    shared: dict[int, int] = field(default_factory=dict)

    def open(self, utterance_id: str) -> UtteranceLog:
        log = self.by_id.get(utterance_id)
        if log is None:
            log = self.by_id[utterance_id] = UtteranceLog(utterance_id)
        return log


class Buffers:
    """What every connection's logs hold, bounded per connection and in all."""

    def __init__(self, per_connection: int, total: int) -> None:
        self.per_connection = per_connection
        self.total_cap = total
        self.total = 0
        #: Ended logs, oldest first, with their connection's logs: dropped first.
        self._ended: OrderedDict[int, tuple[UtteranceLog, Logs]] = OrderedDict()
        #: Frames of all logs viewing each shared bytes object (by id): counted once.
        self._shared: dict[int, int] = {}

    def add(self, logs: Logs, log: UtteranceLog, frame: bytes | memoryview, text: bool) -> None:
        """Keep ``frame`` in ``log`` (one of a connection's ``logs``), making room by
        dropping ended logs, the connection's own first; if there is still none, ``log``
        is dropped."""
        if log.dropped:
            return
        owner = None if text else _shared(frame)
        key = id(owner)
        while True:
            if owner is None:
                size = total_size = len(frame)
            else:  # counted with the first frame that views it (dropping may change that)
                size = 0 if key in logs.shared else len(owner)
                total_size = 0 if key in self._shared else len(owner)
            mine = logs.size + size > self.per_connection
            if not mine and self.total + total_size <= self.total_cap:
                break
            # The oldest ended log: the connection's own when it is over its bound (not
            # a search of every connection's: bench/NOTES.md, "cost of one cached replay").
            if mine:
                own = next(iter(logs.kept.values()), None)
                victim = None if own is None else (own, logs)
            else:
                victim = next(iter(self._ended.values()), None)
            if victim is None:
                self._forget(log, logs)
                return
            self._forget(*victim)
        if text:
            # Kept at its own size: orjson's result holds a buffer of about 4 KiB
            # whatever its length (bench/NOTES.md: three times the bound otherwise).
            frame = bytes(memoryview(frame))
        log.add(frame, text)
        logs.size += size
        self.total += total_size
        if owner is not None:
            logs.shared[key] = logs.shared.get(key, 0) + 1
            self._shared[key] = self._shared.get(key, 0) + 1

    def ended(self, logs: Logs, log: UtteranceLog) -> None:
        """``log``'s utterance is over: its frames are the first to go."""
        log.ended_at = time.monotonic()
        if not log.dropped:
            self._ended[id(log)] = (log, logs)
            logs.kept[id(log)] = log

    def pin(self, log: UtteranceLog) -> None:
        """Keep ``log`` from being dropped to make room (it is being caught up)."""
        entry = self._ended.pop(id(log), None)
        if entry is not None:
            entry[1].kept.pop(id(log), None)

    def unpin(self, logs: Logs, log: UtteranceLog) -> None:
        if log.ended_at is not None and not log.dropped:
            self._ended[id(log)] = (log, logs)
            logs.kept[id(log)] = log

    def discard(self, logs: Logs, utterance_id: str) -> None:
        """Forget the log of an earlier utterance with this id (a new one takes it)."""
        log = logs.by_id.pop(utterance_id, None)
        if log is not None:
            self._forget(log, logs)

    def prune(self, logs: Logs, older_than: float) -> None:
        """Forget the connection's logs that ended before ``older_than`` (monotonic).

        Logs are looked at in the order they began, up to the first that ended since:
        one utterance plays at a time, so they end in that order but for a queued one
        cancelled, which goes at a later call. Each call looks at what it forgets and
        one more (not at every log of the window: a connection replaying at once holds
        thousands).
        """
        old = []
        for log in logs.by_id.values():
            if log.ended_at is None:
                continue  # playing, or dropped while playing
            if log.ended_at >= older_than:
                break
            old.append(log)
        for log in old:
            self._forget(log, logs)
            del logs.by_id[log.id]

    def release(self, logs: Logs) -> None:
        """The connection is gone: forget all its logs."""
        for log in list(logs.by_id.values()):
            self._forget(log, logs)
        logs.by_id.clear()

    def _forget(self, log: UtteranceLog, logs: Logs) -> None:
        freed = freed_total = 0
        for frame, text, _ in log.frames:
            owner = None if text else _shared(frame)
            if owner is None:
                freed += len(frame)
                freed_total += len(frame)
                continue
            if _unref(logs.shared, id(owner)):
                freed += len(owner)
            if _unref(self._shared, id(owner)):
                freed_total += len(owner)
        log.drop()
        logs.size -= freed
        self.total -= freed_total
        self._ended.pop(id(log), None)
        logs.kept.pop(id(log), None)


class Parking:
    """Connections whose client dropped, by session token, until resumed or expired.

    Args:
        window: Seconds a connection stays parked (``RESUME_WINDOW``; 0: none is).
        buffers: The bound on what their logs hold.
    """

    def __init__(self, window: float, buffers: Buffers) -> None:
        self.window = window
        self.buffers = buffers
        self._parked: dict[str, Connection] = {}
        #: The server stops: nothing is parked any more.
        self.closed = False

    def __len__(self) -> int:
        return len(self._parked)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._parked.values()))

    @property
    def enabled(self) -> bool:
        return self.window > 0 and not self.closed

    def park(self, token: str, connection: Connection) -> bool:
        """Park ``connection`` under ``token``; whether it was (not once the server stops)."""
        if self.closed:
            return False
        self._parked[token] = connection
        return True

    def unpark(self, token: str) -> None:
        self._parked.pop(token, None)

    def claim(self, token: str, principal: Principal) -> Connection:
        """The parked connection of ``token``, taken out of the parking for ``principal``.

        Raises:
            ResumeFailed: No connection is parked under it (never issued, expired, or
                already resumed), or it is another key's tenant's.
        """
        if not self.enabled:
            raise ResumeFailed("this server does not resume connections", reason="disabled")
        connection = self._parked.get(token)
        if connection is None:
            raise ResumeFailed(
                "no dropped connection waits under this session (expired, resumed, or "
                "never issued): start afresh",
                reason="unknown",
            )
        if connection.context.principal.name != principal.name:
            raise ResumeFailed("this session belongs to another key", reason="not_yours")
        del self._parked[token]
        return connection

    def close(self) -> None:
        """The server stops: no connection is parked any more, none will be."""
        self.closed = True
        for connection in list(self._parked.values()):
            connection.give_up_parking()
        self._parked.clear()
