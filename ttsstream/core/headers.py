"""What the core reads of a request's headers, whichever door it came through."""

from __future__ import annotations

from typing import Protocol

__all__ = ["HeaderValues"]


class HeaderValues(Protocol):
    """Request headers, looked up case-insensitively (websockets' ``Headers`` is one)."""

    def get_all(self, key: str, /) -> list[str]: ...

    def get(self, key: str, /) -> str | None: ...
