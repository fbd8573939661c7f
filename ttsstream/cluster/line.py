"""The instance's connection to Redis, whose replies are read as soon as they are there.

Why by hand: redis-py's asyncio client reads a reply through the event loop's
transport, so the caller always waits for the loop's next turn, even when the
reply is already in the socket. With Redis on the instance's own machine, it
usually is: the write wakes Redis, which answers before the write returns (80 %
of the lookups on a loaded 2-core machine), and on a busy instance that turn
was most of what cluster mode added to a request (bench/NOTES.md). No asyncio
Redis client reads a reply in the call that sent it; this one does, and nothing
else: one non-blocking socket, hiredis to encode commands and parse replies
(the parser redis-py itself uses), and the loop's reader for a reply that is not
there yet.

Calls share the connection in order (a reply belongs to the oldest call still
waiting; one that gave up takes its reply to nowhere). The connection is opened
by the first call that needs it, with ``AUTH`` and ``SELECT`` from the URL, and
dropped on any failure, failing the calls that wait on it: :class:`RedisLink`
takes each failure as Redis failing, as for redis-py's own. ``rediss://`` stays
on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.exceptions

__all__ = ["QuickLine"]

#: What one read asks the socket for.
READ_SIZE = 2**16


class QuickLine:
    """One connection to Redis, opened when first needed.

    Args:
        host, port, db, username, password: Where and as whom (from the URL).
        name: The connection's name in Redis (``CLIENT LIST``).
        connect_timeout: Longest an opening may take, seconds.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        name: str | None = None,
        connect_timeout: float,
    ) -> None:
        self._address = (host, port)
        self._hello: list[tuple[Any, ...]] = []
        if password is not None:
            self._hello.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            self._hello.append(("SELECT", db))
        if name is not None:
            self._hello.append(("CLIENT", "SETNAME", name))
        self._connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._opening: asyncio.Future[None] | None = None
        self._parser = _parser()
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._unsent = bytearray()
        self._digests: dict[str, str] = {}

    @classmethod
    def for_url(
        cls, url: str, *, name: str | None = None, connect_timeout: float
    ) -> QuickLine | None:
        """A line to the Redis at ``url``, or ``None`` for one it does not speak to
        (TLS)."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            return None
        db = parts.path.strip("/")
        return cls(
            parts.hostname,
            parts.port or 6379,
            db=int(db) if db else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            name=name,
            connect_timeout=connect_timeout,
        )

    async def run(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send ``commands`` in one write; their replies, in order.

        An ``EVAL`` goes by its script's digest (``EVALSHA``), and again whole if Redis
        lacks the script (after the commands sent with it, then). The first error
        among the replies is raised (:class:`redis.exceptions.ResponseError`), once
        every reply is in.
        """
        sent = [self._by_digest(command) for command in commands]
        replies = await self._exchange(sent)
        lacking = [n for n, reply in enumerate(replies) if _lacks_script(reply)]
        if lacking:
            again = await self._exchange([commands[n] for n in lacking])
            for n, reply in zip(lacking, again, strict=True):
                replies[n] = reply
        for reply in replies:
            if isinstance(reply, redis.exceptions.ResponseError):
                raise reply
        return replies

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        sock = self._sock
        if sock is None:
            await self._open()
            if (sock := self._sock) is None:
                raise ConnectionError("redis connection lost")
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in commands]
        self._waiting.extend(waiters)
        self._send(sock, b"".join(_pack(command) for command in commands))
        self._read()  # the replies may be there already: then no wait for the loop
        try:
            return [await waiter for waiter in waiters]
        except BaseException:
            # The call failed (the connection dropped) or gave up at one reply: the
            # others' failures are taken here (else asyncio reports each as never
            # retrieved), and those still to come go to nowhere.
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled():
                    waiter.exception()
            raise

    def _by_digest(self, command: tuple[Any, ...]) -> tuple[Any, ...]:
        if command[0] != "EVAL":
            return command
        script = command[1]
        digest = self._digests.get(script)
        if digest is None:
            digest = self._digests[script] = hashlib.sha1(script.encode()).hexdigest()
        return ("EVALSHA", digest, *command[2:])

    def close(self) -> None:
        """Drop the connection (the next call opens another); idempotent."""
        self._drop(ConnectionError("connection closed"))

    async def _open(self) -> None:
        """Open the connection: the first caller that needs it does, for all of them."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._connect_and_keep())
        # Shielded: a caller that gives up does not stop the opening for the others.
        await asyncio.shield(self._opening)

    async def _connect_and_keep(self) -> None:
        """Connect, and keep the socket before the opening is done: a caller that finds
        it done then finds the socket too (a done-callback would run a turn later, and a
        call arriving in between would take the link for lost)."""
        try:
            sock = await self._connect()
        finally:
            self._opening = None
        self._sock = sock
        self._parser = _parser()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read)

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            host, port = self._address
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            failure: OSError = OSError(f"no address for {host}")
            for family, kind, proto, _, address in infos:
                sock = socket.socket(family, kind, proto)
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    await loop.sock_connect(sock, address)
                    await self._greet(loop, sock)
                except BaseException as exc:
                    sock.close()
                    if not isinstance(exc, OSError):
                        raise
                    failure = exc
                    continue
                return sock
            raise failure

    async def _greet(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """``AUTH`` and ``SELECT`` if the URL asks for them, and the name, before any call."""
        if not self._hello:
            return
        await loop.sock_sendall(sock, b"".join(_pack(command) for command in self._hello))
        parser, answered = _parser(), 0
        while answered < len(self._hello):
            data = await loop.sock_recv(sock, READ_SIZE)
            if not data:
                raise ConnectionError("closed by Redis")
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if isinstance(reply, redis.exceptions.ResponseError):
                    if self._hello[answered][0] == "AUTH":
                        raise redis.exceptions.AuthenticationError(str(reply))
                    raise reply
                answered += 1

    def _send(self, sock: socket.socket, data: bytes) -> None:
        if not self._unsent:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._drop(exc)
                return
            if sent == len(data):
                return
            asyncio.get_running_loop().add_writer(sock.fileno(), self._flush)
            data = data[sent:]
        self._unsent += data

    def _flush(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sent = sock.send(self._unsent)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop(exc)
            return
        del self._unsent[:sent]
        if not self._unsent:
            asyncio.get_running_loop().remove_writer(sock.fileno())

    def _read(self) -> None:
        """Take what the socket holds, and hand each whole reply to its caller."""
        sock = self._sock
        if sock is None:
            return
        try:
            while len(data := sock.recv(READ_SIZE)) == READ_SIZE:
                self._parser.feed(data)
            if not data:
                raise ConnectionError("closed by Redis")
            self._parser.feed(data)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._drop(exc)
            return
        try:
            while (reply := self._parser.gets()) is not False:
                waiter = self._waiting.popleft()
                if not waiter.done():  # else its caller gave up
                    waiter.set_result(reply)
        except (IndexError, hiredis.ProtocolError) as exc:  # not Redis speaking
            self._drop(ConnectionError(f"{type(exc).__name__}: {exc}"))

    def _drop(self, failure: OSError) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(sock.fileno())
            loop.remove_writer(sock.fileno())
            sock.close()
        self._unsent.clear()
        waiting, self._waiting = self._waiting, collections.deque()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"redis connection lost: {failure}"))


def _pack(command: tuple[Any, ...]) -> bytes:
    """A command as Redis reads it (hiredis takes ``bytes`` but no other buffer)."""
    try:
        return bytes(hiredis.pack_command(command))
    except TypeError:
        buffers = (bytearray, memoryview)
        command = tuple(bytes(arg) if isinstance(arg, buffers) else arg for arg in command)
        return bytes(hiredis.pack_command(command))


def _lacks_script(reply: Any) -> bool:
    return isinstance(reply, redis.exceptions.ResponseError) and str(reply).startswith("NOSCRIPT")


def _parser() -> Any:
    return hiredis.Reader(replyError=redis.exceptions.ResponseError)
