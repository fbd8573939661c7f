"""ElevenLabs' stream-input WebSockets: ``/v1/text-to-speech/{voice_id}/stream-input``
(one context) and ``/multi-stream-input`` (several), for clients written for
ElevenLabs (its SDK, Pipecat, LiveKit) pointed at this server.

The protocol's rules are :class:`~ttsstream.protocols.elevenlabs.StreamInput`'s;
this is the connection that carries them out: each context is a streaming
utterance, its audio goes out as base64 in JSON with the characters it covers
(words arrive batched, just before the audio they describe), and ``isFinal``
ends it. The key may come in the first message (``xi_api_key``) when the
handshake had none; the connection idles out after the query's
``inactivity_timeout`` (20 s by default, as ElevenLabs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from ttsstream.core.router import Started
from ttsstream.core.utterance import Summary, cut_short
from ttsstream.engines.base import Voice, WordEvent
from ttsstream.exceptions import ClientError
from ttsstream.protocols.actions import Action, Speak
from ttsstream.protocols.elevenlabs import MAX_CONTEXTS, StreamInput, encode_voices
from ttsstream.ws.connection import Connection, Utterance

__all__ = ["ElevenLabsMultiStream", "ElevenLabsStream"]


class ElevenLabsStream(Connection):
    """One ``stream-input`` connection (a single context)."""

    label = "elevenlabs"
    #: ``multi-stream-input``: several contexts.
    multi: ClassVar[bool] = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Why the handshake's voice or query is refused (told, then the socket closes).
        self._refused: ClientError | None = None
        query: Mapping[str, str] = dict(parse_qsl(urlsplit(self.path).query))
        try:
            self._protocol = StreamInput(
                voice_id=self.params.get("voice_id", ""),
                query=query,
                multi=self.multi,
                max_text_length=self._config.max_text_length,
            )
        except ClientError as exc:
            self._refused = exc
            self._protocol = StreamInput(voice_id="", query={}, multi=self.multi, max_text_length=1)

    async def run(self) -> None:
        if self._refused is not None:
            # ElevenLabs closes a stream it cannot serve with 1008 and the reason.
            self._stats.errors += 1
            await self.send(self._protocol.encode_error(self._refused))
            await self.close(1008, self._refused.message[:120])
            return
        await super().run()

    @property
    def idle_timeout(self) -> float:
        # The client's inactivity_timeout, within the operator's IDLE_TIMEOUT (and the
        # first message's deadline while the key is still to come).
        return min(self._protocol.options.inactivity_timeout, super().idle_timeout)

    def refused(self, action: Action, exc: ClientError) -> None:
        if isinstance(action, Speak):
            self._protocol.forget(action.id)  # the context was never opened

    def parse(self, frame: str | bytes) -> Sequence[Action]:
        return self._protocol.receive(frame)

    def first_message_key(self) -> str | None:
        return self._protocol.api_key

    def words_mode(self, utterance: Utterance) -> str:
        return "batch"

    def sink(self, utterance: Utterance) -> _Messages:
        return _Messages(self, utterance)

    def encode_refusal(self, exc: ClientError) -> bytes:
        return self._protocol.encode_error(exc)

    def encode_cancelled(self, utterance_id: str) -> bytes:
        return self._protocol.encode_cancelled(utterance_id)

    def encode_cut(self, utterance_id: str) -> bytes:
        return self._protocol.encode_error(cut_short_for(utterance_id))

    def encode_voices(self, voices: Sequence[Voice], locale: str | None) -> bytes:
        return encode_voices(voices)

    @property
    def protocol(self) -> StreamInput:
        return self._protocol


class ElevenLabsMultiStream(ElevenLabsStream):
    """One ``multi-stream-input`` connection (contexts named by ``context_id``), its
    open contexts spoken at the same time, as ElevenLabs' are."""

    multi = True
    parallel = MAX_CONTEXTS


def cut_short_for(utterance_id: str) -> ClientError:
    """The shutdown error of one context."""
    cut = cut_short()
    cut.utterance_id = utterance_id
    return cut


class _Messages:
    """One context's events as ElevenLabs' messages (a :class:`Sink`)."""

    def __init__(self, connection: ElevenLabsStream, utterance: Utterance) -> None:
        self._connection = connection
        self._protocol = connection.protocol
        self._utterance = utterance
        self._id = utterance.id
        #: Where the audio sent so far ends on the context's timeline, ms.
        self._end_ms = 0.0

    @property
    def cut(self) -> ClientError | None:
        return self._utterance.cut

    @property
    def gone(self) -> bool:
        return self._connection.closed

    async def start(self, started: Started) -> None:
        pass  # ElevenLabs has no start message.

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        frame = self._protocol.encode_audio(
            self._id, bytes(data), audio_ms=max(0.0, end_ms - self._end_ms)
        )
        self._end_ms = max(self._end_ms, end_ms)
        await self._connection.send_for(frame)

    async def word(self, word: WordEvent) -> None:
        self._protocol.words(self._id, (word,))

    async def words(self, words: Sequence[WordEvent]) -> None:
        self._protocol.words(self._id, words)

    async def end(self, summary: Summary) -> None:
        self._utterance.finishing = True
        for frame in self._protocol.encode_final(self._id):
            await self._connection.send_for(frame)

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        self._utterance.finishing = True
        if isinstance(exc, ClientError):
            exc.utterance_id = self._id
        await self._connection.send_for(self._protocol.encode_error(exc))
        # The context is over: isFinal frees it in Pipecat and LiveKit, which wait for it.
        await self._connection.send_for(self._protocol.encode_cancelled(self._id))

    def hold(self, on: bool) -> None:
        self._connection.cork(on)

    def finished(self) -> None:
        pass
