"""What every door is to the server: something drain, ``/stats`` and ``/metrics`` iterate.

A door is a family of endpoints that speaks one wire protocol over the speech
core (the WebSocket protocol v1, the HTTP speech API, ElevenLabs' API…). The
server never names one: it asks each how much is in progress, waits for each
to be idle, and cuts what a drain left unfinished. The route table
(:mod:`ttsstream.routes`) says which doors there are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ttsstream.core.context import Principal

__all__ = ["Door"]


class Door(Protocol):
    """The lifecycle of a door's work, as a drain sees it."""

    #: The door's name in stats, metrics and logs (``ws``, ``http``, ``elevenlabs``…).
    label: str

    @property
    def in_progress(self) -> int:
        """Utterances queued or playing (HTTP: streams being answered)."""

    async def wait_idle(self) -> None:
        """Return once nothing is in progress."""

    async def cut(self) -> None:
        """End what is in progress with ``shutting_down`` (the server stops now)."""

    def revoke(self, holds: Callable[[Principal], bool]) -> int:
        """End the connections and streams whose key no longer opens the server (a key
        revoked, or a rotated-out key expired) with ``key_revoked``; how many."""
