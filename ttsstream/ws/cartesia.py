"""Cartesia's ``WS /tts/websocket``, for clients written for Cartesia (its SDK, Pipecat's
``CartesiaTTSService``, LiveKit's plugin) pointed at this server.

The protocol's rules are :class:`~ttsstream.protocols.cartesia.CartesiaContexts`';
this is the connection that carries them out. Each context is a streaming
utterance; up to ``PARALLEL_CONTEXTS`` are spoken at the same time, more in the
order opened; its audio goes out as
``chunk`` messages (base64), its words as ``timestamps`` (seconds on the
context's timeline, batched just before the audio they describe, when
``add_timestamps`` asked), and ``done`` ends it. A cancel is answered with
nothing, as Cartesia does. An ``error`` ends its context for every client (they
stop reading it there): a refused message of a context being spoken stops its
utterance too, and nothing more of it is sent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from ttsstream.core.router import Started
from ttsstream.core.utterance import Summary, cut_short
from ttsstream.engines.base import WordEvent
from ttsstream.exceptions import ClientError, NotFound
from ttsstream.protocols.actions import Action
from ttsstream.protocols.cartesia import (
    CartesiaContexts,
    encode_chunk,
    encode_done,
    encode_error,
    encode_timestamps,
)
from ttsstream.ws.connection import Connection, Utterance

__all__ = ["PARALLEL_CONTEXTS", "CartesiaSocket"]

#: Contexts of one connection spoken at once; more wait their turn (``QUEUE_SIZE``).
PARALLEL_CONTEXTS = 5


class CartesiaSocket(Connection):
    """One ``/tts/websocket`` connection and its contexts."""

    label = "cartesia"
    #: Contexts spoken at the same time (each message names its context), so that one
    #: context's text waiting for its next piece never holds another's audio back.
    parallel = PARALLEL_CONTEXTS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._contexts = CartesiaContexts(
            max_text_length=self._config.max_text_length,
            aliases=[name for name, _ in self._config.voice_map],
        )
        #: Contexts ended by an error while their utterance is held: nothing more of
        #: them is sent, and their utterance is being cancelled.
        self._dropping: set[str] = set()

    # The protocol's hooks

    def parse(self, frame: str | bytes) -> Sequence[Action]:
        return self._contexts.receive(frame)

    def sink(self, utterance: Utterance) -> _Messages:
        return _Messages(self, utterance)

    def words_mode(self, utterance: Utterance) -> str:
        return "batch" if utterance.request.words == "batch" else "none"

    def encode_refusal(self, exc: ClientError) -> bytes:
        context_id = exc.utterance_id
        if context_id is not None:
            self.context_failed(context_id)
        return encode_error(exc, context_id=context_id, request_id=self.connection_id)

    def encode_cut(self, utterance_id: str) -> bytes:
        self._contexts.ended(utterance_id, failed=True)
        cut = cut_short()
        cut.utterance_id = utterance_id
        return encode_error(cut, context_id=utterance_id, request_id=self.connection_id)

    # What the door adds

    async def cancel(self, utterance_id: str | None) -> None:
        """Cancel as the base does; a context that is over (its ``done`` on its way, or
        never spoken) is no error: Cartesia answers no cancel."""
        with contextlib.suppress(NotFound):
            await super().cancel(utterance_id)

    def context_failed(self, context_id: str) -> None:
        """The context's ``error`` is being sent: it is over for the client, so its
        later messages are dropped and its utterance, if held, is stopped."""
        self._contexts.ended(context_id, failed=True)
        if self.has_utterance(context_id) and context_id not in self._dropping:
            self._dropping.add(context_id)
            self._spawn(self._drop(context_id))

    def dropping(self, context_id: str) -> bool:
        """Whether the context ended in an error while its utterance was held."""
        return context_id in self._dropping

    async def _drop(self, context_id: str) -> None:
        try:
            await self.cancel(context_id)
        finally:
            self._dropping.discard(context_id)

    @property
    def contexts(self) -> CartesiaContexts:
        return self._contexts


class _Messages:
    """One context's events as Cartesia's messages (a :class:`Sink`)."""

    def __init__(self, connection: CartesiaSocket, utterance: Utterance) -> None:
        self._connection = connection
        self._utterance = utterance
        self._id = utterance.id
        #: When the last message was made (``step_time``: how long the next took).
        self._last = time.perf_counter()

    @property
    def cut(self) -> ClientError | None:
        return self._utterance.cut

    @property
    def gone(self) -> bool:
        return self._connection.closed

    async def start(self, started: Started) -> None:
        pass  # Cartesia has no start message.

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        now = time.perf_counter()
        frame = encode_chunk(self._id, data, step_time_ms=(now - self._last) * 1000)
        self._last = now
        await self._send(frame)

    async def word(self, word: WordEvent) -> None:
        await self.words((word,))

    async def words(self, words: Sequence[WordEvent]) -> None:
        text = self._connection.contexts.text_of(self._id)
        await self._send(encode_timestamps(self._id, words, text))

    async def end(self, summary: Summary) -> None:
        if self._dropped():
            return
        self._utterance.finishing = True
        await self._connection.send_for(encode_done(self._id))
        self._connection.contexts.ended(self._id)

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        if self._dropped():
            return
        self._utterance.finishing = True
        if isinstance(exc, ClientError):
            exc.utterance_id = self._id
        self._connection.contexts.ended(self._id, failed=True)
        await self._connection.send_for(
            encode_error(
                exc,
                context_id=self._id,
                request_id=self._connection.connection_id,
                partial=partial,
            )
        )

    def hold(self, on: bool) -> None:
        self._connection.cork(on)

    def finished(self) -> None:
        pass

    def _dropped(self) -> bool:
        """Whether the context's error was sent already (by a refused message of it)."""
        return not self._utterance.finishing and self._connection.dropping(self._id)

    async def _send(self, frame: bytes) -> None:
        if not self._dropped():
            await self._connection.send_for(frame)
