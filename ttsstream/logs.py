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

import datetime
import functools
import logging
import logging.handlers
import queue
import re
import sys
import time
from pathlib import Path
from typing import Any

import orjson

__all__ = ["access", "configure", "reopen", "shutdown"]

ACCESS_LOGGER = logging.getLogger("ttsstream.access")
_FIELDS = "ttsstream_fields"
#: Longest an access-log line waits for others to be written with it, in seconds.
GATHER_SECONDS = 0.05
_files: list[ReopenableFileHandler] = []
_listener: logging.handlers.QueueListener | None = None


def access(event: str, **fields: Any) -> None:
    """Write one access-log line: an event name and its fields.

    On every utterance's path, so it skips what ``Logger.info`` does for other
    logs (looking up the caller's frame, checking ``extra``): it makes the record
    and hands it to the handlers.
    """
    if ACCESS_LOGGER.isEnabledFor(logging.INFO):
        record = logging.LogRecord(ACCESS_LOGGER.name, logging.INFO, "", 0, event, None, None)
        setattr(record, _FIELDS, fields)
        ACCESS_LOGGER.handle(record)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of an access-log record (empty for others)."""
    fields: dict[str, Any] = getattr(record, _FIELDS, {})
    return fields


class TextFormatter(logging.Formatter):
    """``2026-11-26T08:30:12.345Z INFO ttsstream.access utterance ip=… conn=…``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name} {record.getMessage()}"
        fields = fields_of(record)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
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


class _Unflushed(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes a record without flushing: the access log's thread flushes once it caught up.

    One ``write`` syscall per burst of utterances instead of one per utterance.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)


class _AccessStream(_Unflushed):
    """The access log on standard output."""


class _AccessFile(_Unflushed, ReopenableFileHandler):
    """The access log file."""


def configure(*, level: int, log_format: str, log_dir: Path | None) -> None:
    """Set up both logs; replaces any handlers configured before.

    Raises:
        OSError: ``log_dir`` cannot be created or written.
    """
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else TextFormatter()
    _files.clear()
    if log_dir is None:
        access_handler: logging.Handler = _AccessStream(sys.stdout)
        error_handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        access_file = _AccessFile(log_dir / "access.log", encoding="utf-8")
        error_file = ReopenableFileHandler(log_dir / "error.log", encoding="utf-8")
        _files.extend([access_file, error_file])
        access_handler, error_handler = access_file, error_file
    for handler in (access_handler, error_handler):
        handler.setFormatter(formatter)

    global _listener
    shutdown()
    # The access log is on every utterance's path: the event loop only queues its
    # records; a thread formats and writes them, flushing once its queue is empty.
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = _Writer(records, access_handler)
    _listener.start()
    ACCESS_LOGGER.handlers[:] = [_Enqueue(records)]
    ACCESS_LOGGER.setLevel(logging.INFO)
    ACCESS_LOGGER.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [error_handler]
    root.setLevel(level)


class _Enqueue(logging.handlers.QueueHandler):
    """Queues access records as they are, for the thread in this process to format.

    ``QueueHandler`` copies and pre-formats each record so that it can cross
    processes; these stay in the process and hold no arguments to merge.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _Writer(logging.handlers.QueueListener):
    """The access log's thread: it writes records in bursts, flushing after each.

    Woken by the first record after a quiet spell, it waits GATHER_SECONDS for
    the burst to gather before writing it: under load it wakes (and competes
    with the event loop for the GIL) a few times a second instead of once per
    utterance.
    """

    def __init__(self, records: queue.SimpleQueue[logging.LogRecord], handler: logging.Handler):
        super().__init__(records, handler)
        self._records = records

    def dequeue(self, block: bool) -> logging.LogRecord:
        try:
            return self._records.get_nowait()
        except queue.Empty:
            for handler in self.handlers:
                handler.flush()
            record = self._records.get(block)
            time.sleep(GATHER_SECONDS)
            return record


def shutdown() -> None:
    """Write out what the access log has queued; call before the process exits."""
    global _listener
    if _listener is not None:
        _listener.stop()
        for handler in _listener.handlers:
            handler.flush()
        _listener = None


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


def _timestamp(record: logging.LogRecord) -> str:
    return f"{_second(int(record.created))}.{int(record.msecs):03d}Z"


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
