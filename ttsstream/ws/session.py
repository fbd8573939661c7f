"""One connection of protocol v1 (``/v1/stream``): its frames, its sink.

What every WebSocket connection does (the queue, cancels, timed writes, the idle
watchdog, drain) is :class:`~ttsstream.ws.connection.Connection`'s; this module
says how v1's frames become actions and how an utterance's events become v1's
frames (``docs/protocol.md``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from ttsstream import __version__
from ttsstream.core.router import Started
from ttsstream.core.utterance import Summary, cut_short
from ttsstream.engines.base import Voice, WordEvent
from ttsstream.exceptions import ClientError
from ttsstream.protocols.actions import Action
from ttsstream.protocols.v1 import (
    encode_cancelled,
    encode_end,
    encode_error,
    encode_hello,
    encode_resumed,
    encode_start,
    encode_voices,
    encode_word,
    encode_words,
    parse_client_message,
)
from ttsstream.ws.connection import ClientTooSlow, Connection, Utterance

__all__ = ["ClientTooSlow", "Session"]


class Session(Connection):
    """Serve one protocol v1 connection until it closes."""

    label = "ws"
    resumable = True

    def greeting(self) -> bytes:
        return encode_hello(
            server=f"ttsstream/{__version__}",
            default_voice=self._config.default_voice,
            max_text_length=self._config.max_text_length,
            session=self.session,
            resume_window=self._config.resume_window,
        )

    def encode_resumed(
        self, session: str, resumed: Sequence[tuple[str, int, int | None]], lost: Sequence[str]
    ) -> bytes:
        return encode_resumed(session, resumed, lost)

    def parse(self, frame: str | bytes) -> Sequence[Action]:
        return (
            parse_client_message(
                frame, max_text_length=self._config.max_text_length, make_id=_new_id
            ),
        )

    def sink(self, utterance: Utterance) -> _Frames:
        return _Frames(self, utterance)

    def encode_refusal(self, exc: ClientError) -> bytes:
        return encode_error(
            exc, utterance_id=exc.utterance_id, refused=exc.message_type or "unknown"
        )

    def encode_cancelled(self, utterance_id: str) -> bytes:
        return encode_cancelled(utterance_id)

    def encode_cut(self, utterance_id: str) -> bytes:
        return encode_error(cut_short(), utterance_id=utterance_id)

    def encode_voices(self, voices: Sequence[Voice], locale: str | None) -> bytes:
        return encode_voices(voices, locale=locale)


def _new_id() -> str:
    return "s-" + secrets.token_hex(6)


class _Frames:
    """One utterance's events as protocol v1 frames on its connection (a :class:`Sink`)."""

    def __init__(self, session: Session, utterance: Utterance) -> None:
        self._session = session
        self._utterance = utterance
        self._id = utterance.id

    @property
    def cut(self) -> ClientError | None:
        return self._utterance.cut

    @property
    def gone(self) -> bool:
        return self._session.closed

    async def start(self, started: Started) -> None:
        await self._session.send_utterance(
            self._id,
            encode_start(
                self._id,
                voice=started.voice,
                engine=started.engine,
                mime_type=started.audio_format.mime_type,
                format_name=started.audio_format.name,
                sample_rate=started.audio_format.sample_rate,
                cached=started.cached,
                fallback_reason=started.fallback_reason,
                stream=self._utterance.stream is not None,
            ),
        )

    async def audio(self, data: bytes | memoryview, *, end_ms: float) -> None:
        await self._session.send_utterance(self._id, data, text=False)

    async def word(self, word: WordEvent) -> None:
        await self._session.send_utterance(self._id, encode_word(self._id, word))

    async def words(self, words: Sequence[WordEvent]) -> None:
        await self._session.send_utterance(self._id, encode_words(self._id, words))

    async def end(self, summary: Summary) -> None:
        self._utterance.finishing = True
        await self._session.send_utterance(
            self._id,
            encode_end(
                self._id,
                byte_count=summary.byte_count,
                audio_ms=summary.audio_ms,
                words=summary.words,
                cached=summary.cached,
                ttfb_ms=summary.ttfb_ms,
                segments=summary.segments,
            ),
        )

    async def fail(self, exc: BaseException, *, partial: bool) -> None:
        self._utterance.finishing = True
        await self._session.send_utterance(
            self._id, encode_error(exc, utterance_id=self._id, partial=partial)
        )

    def hold(self, on: bool) -> None:
        # A replay's bursts are written as a few full TCP segments.
        self._session.cork(on)

    def finished(self) -> None:
        pass
