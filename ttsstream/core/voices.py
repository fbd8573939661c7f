"""Which voices a locale asks for: the one rule of every voice list (pure; no I/O).

The WebSocket's ``voices`` message, HTTP's ``/v1/audio/voices`` and
``ttsstream say --list-voices --locale`` all filter with :func:`in_locale`, so
that the same ``locale`` lists the same voices whichever door asks.
"""

from __future__ import annotations

__all__ = ["in_locale", "locale_wanted"]


def locale_wanted(value: str | None) -> str:
    """A ``locale`` as asked (``en``, ``en-US``, ``EN_us``), in the form :func:`in_locale`
    compares; empty when none was asked."""
    return (value or "").strip().replace("_", "-").lower()


def in_locale(locale: str, wanted: str | None) -> bool:
    """Whether a voice of ``locale`` is one that ``wanted`` asks for.

    A locale is a tag of parts joined by ``-``: ``wanted`` matches a locale that
    is it or begins with it and a ``-``, in any case. ``en`` matches ``en-US``,
    ``en-GB`` and ``en``; ``en-US`` matches ``en-US`` and eSpeak's ``en-US-nyc``,
    not ``en-USX``. Nothing asked (``None`` or empty) matches every voice.
    """
    wanted = locale_wanted(wanted)
    if not wanted:
        return True
    locale = locale.replace("_", "-").lower()
    return locale == wanted or locale.startswith(wanted + "-")
