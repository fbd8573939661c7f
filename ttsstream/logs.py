"""Logs for operators: an access log and an error log, as text or JSON lines.

- The access log (logger ``ttsstream.access``) has one line per finished
  utterance and one per refused handshake, with structured fields. It never
  holds the text (its length and the first 12 hex digits of its cache key
  instead) nor a key.
- The error log is everything else: start-up, warnings, errors with their
  stack traces, at ``LOG_LEVEL``.

Without ``LOG_DIR`` the access log goes to standard output and the error log to
standard error (containers, journald). With it they are ``access.log`` and
``error.log`` there, reopened by :func:`reopen` (on SIGHUP) so logrotate works.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

__all__ = ["access", "configure", "reopen", "shutdown"]

ACCESS_LOGGER = logging.getLogger("ttsstream.access")
_FIELDS = "ttsstream_fields"
#: Longest an access-log line waits for others to be written with it, in seconds.
GATHER_SECONDS = 0.05
_files: list[ReopenableFileHandler] = []
_writer: _AccessWriter | None = None


def access(event: str, **fields: Any) -> None:
    """Write one access-log line: an event name and its fields.

    Once :func:`configure` ran, this only appends the line's parts to a list: a
    thread formats and writes the list in bursts (see :class:`_AccessWriter`).
    Before that (tests, embedding), it is an ordinary ``INFO`` record of the
    logger ``ttsstream.access``, with the fields in :func:`fields_of`.
    """
    writer = _writer
    if writer is not None:
        writer.add(time.time(), event, fields)
    elif ACCESS_LOGGER.isEnabledFor(logging.INFO):
        ACCESS_LOGGER.info(event, extra={_FIELDS: fields})


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of an access-log record (empty for others)."""
    fields: dict[str, Any] = getattr(record, _FIELDS, {})
    return fields


class TextFormatter(logging.Formatter):
    """``2026-11-26T08:30:12.345Z INFO ttsstream.access utterance ip=… conn=…``."""

    def format(self, record: logging.LogRecord) -> str:
        line = _text_line(
            record.created, record.levelname, record.name, record.getMessage(), fields_of(record)
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the fields."""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return _json_line(
            record.created,
            record.levelname,
            record.name,
            record.getMessage(),
            fields_of(record),
            exception,
        )


def _text_line(
    created: float, level: str, logger: str, message: str, fields: dict[str, Any]
) -> str:
    line = f"{_timestamp(created)} {level} {logger} {message}"
    if fields:
        line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
    return line


def _json_line(
    created: float,
    level: str,
    logger: str,
    message: str,
    fields: dict[str, Any],
    exception: str | None = None,
) -> str:
    entry: dict[str, Any] = {
        "ts": _timestamp(created),
        "level": level,
        "logger": logger,
        "message": message,
        **fields,
    }
    if exception is not None:
        entry["exception"] = exception
    return orjson.dumps(entry, default=str).decode()


class ReopenableFileHandler(logging.FileHandler):
    """A log file that can be reopened after logrotate moved it away."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def configure(*, level: int, log_format: str, log_dir: Path | None) -> None:
    """Set up both logs; replaces any handlers configured before.

    Raises:
        OSError: ``log_dir`` cannot be created or written.
    """
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    _files.clear()
    if log_dir is None:
        access_handler: logging.StreamHandler[Any] = logging.StreamHandler(sys.stdout)
        error_handler: logging.StreamHandler[Any] = logging.StreamHandler(sys.stderr)
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        access_file = ReopenableFileHandler(log_dir / "access.log", encoding="utf-8")
        error_file = ReopenableFileHandler(log_dir / "error.log", encoding="utf-8")
        _files.extend([access_file, error_file])
        access_handler, error_handler = access_file, error_file
    error_handler.setFormatter(formatter)

    global _writer
    shutdown()
    _writer = _AccessWriter(access_handler, _json_line if log_format == "json" else _text_line)
    _writer.start()
    root = logging.getLogger()
    root.handlers[:] = [error_handler]
    root.setLevel(level)


class _AccessWriter(threading.Thread):
    """The access log's thread: it formats and writes the lines in bursts.

    The access log is on every utterance's path. :func:`access` only appends to
    a deque; woken by the first line after a quiet spell, this thread waits
    GATHER_SECONDS for the burst to gather, then formats it and writes it with
    one write and one flush. No log record per line, no queue hand-off per line,
    and the event loop shares the GIL with this thread a few times a second
    instead of once per utterance (the access log through ``logging`` cost a
    fifth of the replay throughput).
    """

    def __init__(
        self,
        handler: logging.StreamHandler[Any],
        line: Callable[[float, str, str, str, dict[str, Any]], str],
    ) -> None:
        super().__init__(name="access-log", daemon=True)
        self._handler = handler
        self._line = line
        # A deque: append() and popleft() are atomic, so the two threads need no lock.
        self._lines: deque[tuple[float, str, dict[str, Any]]] = deque()
        self._wake = threading.Event()
        self._stopping = False

    def add(self, created: float, event: str, fields: dict[str, Any]) -> None:
        self._lines.append((created, event, fields))
        if len(self._lines) == 1:
            self._wake.set()

    def run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            time.sleep(GATHER_SECONDS)
            self._wake.clear()
            self._write()
        self._write()

    def stop(self) -> None:
        """Write what is left and end the thread."""
        self._stopping = True
        self._wake.set()
        self.join()

    def _write(self) -> None:
        lines = []
        with contextlib.suppress(IndexError):
            while True:
                lines.append(self._lines.popleft())
        if not lines:
            return
        text = "".join(
            self._line(created, "INFO", ACCESS_LOGGER.name, event, fields) + "\n"
            for created, event, fields in lines
        )
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.stream.flush()
        except Exception:
            logging.getLogger("ttsstream.logs").exception("access log write failed")
        finally:
            handler.release()


def shutdown() -> None:
    """Write out what the access log holds; call before the process exits."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


def reopen() -> None:
    """Reopen the log files (after logrotate); nothing to do when logging to streams."""
    for handler in _files:
        handler.reopen()
    if _files:
        logging.getLogger("ttsstream.logs").info("log files reopened")


#: Characters that make a text-log value ambiguous unless quoted (with non-printables).
_NEEDS_QUOTES = re.compile(r'[\s"=]')


@functools.lru_cache(maxsize=4)
def _second(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _timestamp(created: float) -> str:
    return f"{_second(int(created))}.{int(created % 1 * 1000):03d}Z"


def _text_value(value: Any) -> str:
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is float:
        return f"{value:.1f}"
    if value is None:
        return "-"
    if kind is bool:
        return "true" if value else "false"
    text = str(value)
    if not text or not text.isprintable() or _NEEDS_QUOTES.search(text):
        return orjson.dumps(text).decode()  # quoted and escaped: one line, unambiguous
    return text
