"""The ``ttsstream keys`` command: add, change, list, rotate and revoke tenants.

A tenant is a named key holder in ``API_KEYS_FILE`` (:mod:`ttsstream.core.tenants`
says the format). These commands edit that file for an operator; a running server
reloads it by itself. A new key is printed once, on standard output and nowhere
else; the file keeps only its SHA-256.

An edit keeps what an operator wrote by hand: the file is edited with ``tomlkit``,
which keeps comments, order and layout, not rewritten from the parsed tenants. The
edited text is checked with :func:`~ttsstream.core.tenants.parse_tenants`, the
server's own parser, before it replaces the file; a file the server would refuse is
refused before anything is changed, and left as it is.

Written here rather than taken from a library:

* The atomic write (a temporary file in the same directory, fsync, ``os.replace``):
  the file's mode and owner must be kept (a server running as another user must
  still read it) and a new file must be private from its first byte, which the
  packages that do atomic writes either do not do or no longer maintain; it is a
  dozen lines.
* A lock on the file's directory around each read-change-write (``flock``): two
  commands at once would otherwise lose one's change, and a lost revocation is a
  key that still works.
* Durations (``30m``, ``24h``, ``7d``) and rates (``1000/60s``): four units, one
  regular expression; the parsers on PyPI accept forms (``1 hour 5 min``) that the
  documentation would then have to describe.
* Keeping the comments around a table that is revoked or given a new field: tomlkit
  counts the comments above a table's header as the end of the table before, so
  they would move with, or be removed with, the wrong tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import secrets
import sqlite3
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import tomlkit
from tomlkit.container import OutOfOrderTableProxy
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import (
    AbstractTable,
    Array,
    Comment,
    InlineTable,
    Item,
    Key,
    Table,
    Whitespace,
)
from tomlkit.toml_document import TOMLDocument

from ttsstream.cluster.link import RedisLink
from ttsstream.cluster.usage import SharedUsage
from ttsstream.config import Config, load_config
from ttsstream.core.ratelimit import LimiterUnavailable
from ttsstream.core.tenants import (
    DEFAULT_TENANT,
    FIELDS,
    TENANT_NAME,
    Tenant,
    TenantTable,
    hash_key,
    parse_tenants,
)
from ttsstream.core.usage import Usage
from ttsstream.exceptions import ConfigError
from ttsstream.usage.sqlite import SqliteUsage

if sys.platform != "win32":
    import fcntl

__all__ = [
    "DEFAULT_GRACE",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "KEY_PREFIX",
    "add_parser",
    "new_key",
    "parse_duration",
    "parse_rate",
    "render_tenants",
    "run",
]

#: What every key this command makes starts with, for secret scanners to find it.
KEY_PREFIX = "tts_"
#: Random bytes in a key (``secrets.token_urlsafe``): 256 bits.
KEY_BYTES = 32
#: How long a rotated-out key keeps working, unless ``--grace`` says otherwise.
DEFAULT_GRACE = dt.timedelta(hours=24)
#: Exit status of a command that cannot work as given (a bad option, no file named).
EXIT_USAGE = 2
#: Exit status of a command that failed (no such tenant, a broken file, a write refused).
EXIT_FAILED = 1

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", re.ASCII)
_COUNT = re.compile(r"[0-9]+", re.ASCII)
#: A browser's Origin header: scheme://host[:port], nothing after.
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#@]+/?", re.ASCII)

#: The file's fields in the order a new tenant's table has them.
_FIELD_ORDER = FIELDS
#: ``--clear``'s names, and the file's fields each removes.
_CLEARABLE = {
    "requests": ("requests", "window"),
    "window": ("window",),
    "concurrent": ("concurrent",),
    "chars-per-day": ("characters_per_day",),
    "chars-per-month": ("characters_per_month",),
    "voices": ("voices",),
    "origins": ("origins",),
}
#: Other spellings ``--clear`` takes: the file's own names, and the singular options.
_CLEAR_ALIASES = {
    "characters_per_day": "chars-per-day",
    "characters_per_month": "chars-per-month",
    "voice": "voices",
    "origin": "origins",
}

_NEW_FILE_HEADER = """\
ttsstream tenants (API_KEYS_FILE): named API keys, each with its own limits.
Edited by `ttsstream keys add|set|list|rotate|revoke`; comments and hand edits are kept.
Keys are stored only as their SHA-256 (hex), never themselves: this file cannot give
a key back; a lost key is replaced with `ttsstream keys rotate NAME`.
One table per tenant, [tenants.NAME]: keys = [{ sha256 = "…" }], and the limits it
has of its own: requests, window (seconds), concurrent, characters_per_day,
characters_per_month, voices = ["en-*"], origins = ["https://app.example.com"].
An unset limit is the server's setting. The server reloads this file when it changes."""


class _CommandError(Exception):
    """What ends a ``keys`` command: one line on standard error, and its exit status."""

    def __init__(self, message: str, *, status: int = EXIT_FAILED) -> None:
        super().__init__(message, status)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


# Values of options


def parse_duration(text: str) -> dt.timedelta:
    """``30``, ``30s``, ``15m``, ``24h``, ``7d`` or ``1.5h`` (a bare number: seconds).

    Raises:
        ValueError: ``text`` is none of those.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"expected a duration such as 30s, 15m, 24h or 7d, not {text!r}")
    return dt.timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])


def parse_rate(text: str) -> tuple[int, float | None]:
    """Requests and window (seconds) of ``1000/60s``, ``1000/1m``, ``100/h`` or ``1000``.

    A bare count leaves the window unset: the server's ``RATE_LIMIT_WINDOW``.

    Raises:
        ValueError: ``text`` is none of those, or its window is zero.
    """
    count, slash, window = text.strip().partition("/")
    form = f"expected REQUESTS[/WINDOW] such as 1000/60s, 100/1h or 1000, not {text!r}"
    if not _COUNT.fullmatch(count):
        raise ValueError(form)
    if not slash:
        return int(count), None
    if window[:1].isalpha():  # 100/h: one hour
        window = "1" + window
    try:
        seconds = parse_duration(window).total_seconds()
    except ValueError:
        raise ValueError(form) from None
    if seconds <= 0:
        raise ValueError(f"expected a window longer than zero, such as 1000/60s, not {text!r}")
    return int(count), seconds


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ``ValueError`` becomes argparse's own error."""

    def converted(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return converted


def _count_parser(minimum: int) -> Callable[[str], int]:
    def count(text: str) -> int:
        if not _COUNT.fullmatch(text.strip()) or int(text) < minimum:
            raise ValueError(f"expected an integer >= {minimum}, not {text!r}")
        return int(text)

    return count


def _voice(text: str) -> str:
    if not text.strip():
        raise ValueError("expected a voice name or pattern such as en-* or en-US-AvaNeural")
    return text.strip()


def _origin(text: str) -> str:
    if not _ORIGIN.fullmatch(text.strip()):
        raise ValueError(
            f"expected an origin such as https://chat.example.com (no path), not {text!r}"
        )
    return text.strip().rstrip("/")


def _clear_name(text: str) -> str:
    name = _CLEAR_ALIASES.get(text, text)
    if name not in _CLEARABLE:
        raise ValueError(f"expected one of {', '.join(_CLEARABLE)}, not {text!r}")
    return name


# The command line


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``keys`` and its commands to ``commands`` (``add_subparsers()``'s result)."""
    keys: argparse.ArgumentParser = commands.add_parser(
        "keys",
        help="add, change, list, rotate and revoke tenants' API keys (API_KEYS_FILE)",
        description="Manage the tenants of API_KEYS_FILE: named API keys with their own "
        "limits. A new key is printed once on standard output; the file keeps only its "
        "SHA-256. A running server reloads the file by itself.",
    )
    file_option = argparse.ArgumentParser(add_help=False)
    file_option.add_argument(
        "--file",
        type=Path,
        metavar="PATH",
        help="the tenants file (default: API_KEYS_FILE from the environment or .env)",
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    add = actions.add_parser(
        "add",
        parents=[file_option],
        help="add a tenant and print its new key",
        description="Add tenant NAME with a new key, printed once on standard output. "
        "Limits not given are the server's. Creates the file if there is none.",
    )
    add.add_argument("name", metavar="NAME", help="letters, digits, '_', '.', '-' (up to 64)")
    _limit_options(add)

    change = actions.add_parser(
        "set",
        parents=[file_option],
        help="change a tenant's limits",
        description="Change tenant NAME's limits; --voice and --origin replace its list. "
        "--clear FIELD gives a limit back to the server's setting.",
    )
    change.add_argument("name", metavar="NAME")
    _limit_options(change)
    change.add_argument(
        "--clear",
        action="append",
        type=_argument(_clear_name),
        default=[],
        metavar="FIELD",
        help=f"unset a limit (the server's applies): {', '.join(_CLEARABLE)}; repeatable",
    )

    listing = actions.add_parser(
        "list",
        parents=[file_option],
        help="list tenants, their keys' count and their limits (never a key)",
        description="One line per tenant: name, valid keys, when a rotated-out key "
        "expires next, and its limits ('default': the server's setting).",
    )
    listing.add_argument("--json", action="store_true", help="a JSON array instead")

    revoke = actions.add_parser(
        "revoke",
        parents=[file_option],
        help="remove a tenant: its keys stop working",
        description="Remove tenant NAME; its keys stop working, and a running server "
        "closes what they opened when it reloads the file.",
    )
    revoke.add_argument("name", metavar="NAME")

    rotate = actions.add_parser(
        "rotate",
        parents=[file_option],
        help="give a tenant a new key, printed once; the old one works for a grace period",
        description="Give tenant NAME a new key, printed once on standard output. Its "
        "old keys keep working for the grace period, then stop; keys already expired "
        "are removed.",
    )
    usage = actions.add_parser(
        "usage",
        parents=[file_option],
        help="what tenants spoke in a month (the stored usage), per door",
        description="Each tenant's usage in a month (this one by default): characters "
        "(cached ones apart), audio seconds, requests and errors, per door. Read from "
        "USAGE_DB (default: usage.sqlite3 beside the tenants file), or from Redis when "
        "REDIS_URL is set.",
    )
    usage.add_argument("name", metavar="NAME", nargs="?", help="one tenant (default: all)")
    usage.add_argument(
        "--month", type=_argument(_month), metavar="YYYY-MM", help="default: this month (UTC)"
    )
    usage.add_argument("--json", action="store_true", help="JSON instead of a table")

    rotate.add_argument("name", metavar="NAME")
    rotate.add_argument(
        "--grace",
        type=_argument(parse_duration),
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="how long the old keys keep working: 30m, 24h, 7d; 0 stops them at once (default 24h)",
    )
    return keys


def _limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests",
        type=_argument(parse_rate),
        metavar="N/WINDOW",
        help="requests per window: 1000/60s, 100/1h; a bare 1000 keeps the server's window",
    )
    parser.add_argument(
        "--concurrent",
        type=_argument(_count_parser(1)),
        metavar="N",
        help="open connections and streams at once",
    )
    parser.add_argument(
        "--chars-per-day",
        type=_argument(_count_parser(0)),
        metavar="N",
        help="characters spoken per day (UTC)",
    )
    parser.add_argument(
        "--chars-per-month",
        type=_argument(_count_parser(0)),
        metavar="N",
        help="characters spoken per month (UTC)",
    )
    parser.add_argument(
        "--voice",
        action="append",
        type=_argument(_voice),
        metavar="PATTERN",
        help="a voice it may use (fnmatch pattern such as en-*); repeatable",
    )
    parser.add_argument(
        "--origin",
        action="append",
        type=_argument(_origin),
        metavar="URL",
        help="a browser origin it may call from (https://chat.example.com); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    """Run the ``keys`` command ``args`` describe; returns the exit status."""
    command = f"ttsstream keys {args.keys_command}"
    try:
        path = _file_of(args)
        return _COMMANDS[args.keys_command](args, path)
    except _CommandError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return exc.status


def new_key() -> str:
    """A new random key: :data:`KEY_PREFIX` and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def _file_of(args: argparse.Namespace) -> Path:
    """``--file``, else ``API_KEYS_FILE``."""
    if args.file is not None:
        return Path(args.file)
    try:
        path = load_config().api_keys_file
    except ConfigError as exc:
        raise _CommandError(f"configuration error: {exc}", status=EXIT_USAGE) from None
    if path is None:
        raise _CommandError(
            "no tenants file: set API_KEYS_FILE (in the environment or .env) or pass --file PATH",
            status=EXIT_USAGE,
        )
    return path


# Commands


def _add(args: argparse.Namespace, path: Path) -> int:
    name = _valid_name(args.name)
    fields = _changes(args)
    key = new_key()
    with _editing(path, create=True) as keys_file:
        if name in keys_file.table.tenants:
            raise _CommandError(f"tenant {name!r} already exists in {path}")
        table = tomlkit.table()
        table.add("keys", _keys_array([(hash_key(key), None)], inline=False))
        for field in _FIELD_ORDER:
            value = fields.get(field)
            if value is not None:
                table.add(field, value)
        keys_file.tenants_table()[name] = table
        keys_file.save()
    _print_key(key)
    print(
        f"tenant {name!r} added to {path}. Its key, on standard output, is shown only "
        "this once: the file keeps only its hash.",
        file=sys.stderr,
    )
    return 0


def _set(args: argparse.Namespace, path: Path) -> int:
    changes = _changes(args)
    given = set(changes)
    for name in args.clear:
        for field in _CLEARABLE[name]:
            if field in given:
                raise _CommandError(
                    f"--clear {name} and an option setting it at once", status=EXIT_USAGE
                )
            changes[field] = None
    if not changes:
        raise _CommandError("nothing to change: give a limit or --clear FIELD", status=EXIT_USAGE)
    with _editing(path, create=False) as keys_file:
        table = keys_file.tenant(args.name)
        for field in _FIELD_ORDER:
            if field not in changes:
                continue
            value = changes[field]
            if value is None:
                if field in table:
                    del table[field]
            elif field in table:
                table[field] = value
            else:
                _add_field(table, field, value)
        keys_file.save()
    print(f"tenant {args.name!r} changed in {path}", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace, path: Path) -> int:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _CommandError(f"there is no {path} (ttsstream keys add NAME creates it)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _CommandError(f"cannot read {path}: {_reason(exc)}") from None
    table = _parsed(text, path)
    print(render_tenants(table.tenants.values(), now=_now(), as_json=args.json))
    sys.stdout.flush()  # a closed standard output is found here, not at exit
    if not args.json:
        count = len(table)
        print(f"{count} tenant{'' if count == 1 else 's'} in {path}", file=sys.stderr)
    return 0


def _revoke(args: argparse.Namespace, path: Path) -> int:
    with _editing(path, create=False) as keys_file:
        keys_file.tenant(args.name)  # it exists
        _remove_table(keys_file.document, keys_file.tenants_table(), args.name)
        keys_file.save()
    print(
        f"tenant {args.name!r} removed from {path}: its keys stop working when the server "
        "reloads the file",
        file=sys.stderr,
    )
    return 0


def _rotate(args: argparse.Namespace, path: Path) -> int:
    grace: dt.timedelta = args.grace
    key = new_key()
    now = _now()
    expires = (now + grace).replace(microsecond=0)
    with _editing(path, create=False) as keys_file:
        table = keys_file.tenant(args.name)
        current = keys_file.table.tenants[args.name]
        # A rotation never lengthens an old key's life; what has already ended goes.
        kept = [
            (old.digest, min(old.expires or expires, expires))
            for old in current.keys
            if min(old.expires or expires, expires) > now
        ]
        table["keys"] = _keys_array(
            [(hash_key(key), None), *kept], inline=isinstance(table, InlineTable)
        )
        keys_file.save()
    _print_key(key)
    if kept:
        until = f"its old keys work until {_timestamp(expires)}"
    else:
        until = "its old keys stop working now"
    print(
        f"tenant {args.name!r} has a new key in {path}. It is on standard output, shown "
        f"only this once: the file keeps only its hash; {until}.",
        file=sys.stderr,
    )
    return 0


def _month(text: str) -> str:
    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", text):
        raise ValueError("a month such as 2026-12")
    return text


def _usage(args: argparse.Namespace, path: Path) -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        raise _CommandError(f"configuration error: {exc}", status=EXIT_USAGE) from None
    month = args.month or _now().strftime("%Y-%m")
    try:
        tenants = asyncio.run(_read_usage(config, path, args.name, month))
    except (OSError, sqlite3.Error, LimiterUnavailable) as exc:
        raise _CommandError(f"cannot read the usage: {_reason(exc)}") from None
    if args.json:
        print(
            orjson.dumps({"month": month, "tenants": tenants}, option=orjson.OPT_INDENT_2).decode()
        )
        return 0
    columns = ("TENANT", "DOOR", "CHARACTERS", "CACHED", "AUDIO SECONDS", "REQUESTS", "ERRORS")
    rows = [list(columns)]
    for name, counts in tenants.items():
        doors = counts["doors"]
        assert isinstance(doors, dict)
        for door, tally in [("all", counts), *doors.items()]:
            rows.append(
                [
                    name if door == "all" else "",
                    door,
                    str(tally["characters"]),
                    str(tally["cached_characters"]),
                    f"{tally['audio_seconds']:.1f}",
                    str(tally["requests"]),
                    str(tally["errors"]),
                ]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    print(f"usage of {month} (UTC), {len(tenants)} tenants", file=sys.stderr)
    return 0


async def _read_usage(
    config: Config, path: Path, name: str | None, month: str
) -> dict[str, dict[str, object]]:
    """The month's usage from where the server keeps it (Redis in a cluster)."""
    usage: Usage
    if config.redis_url is not None:
        logging.getLogger("ttsstream.cluster").setLevel(logging.ERROR)
        link = RedisLink(
            config.redis_url, prefix=config.redis_prefix, lease_seconds=config.redis_lease_seconds
        )
        await link.start()
        try:
            if not link.up:
                raise LimiterUnavailable(f"Redis ({link.error})")
            usage = Usage(SharedUsage(link))
            report = await usage.report(name, month)
        finally:
            await link.aclose()
    else:
        database = config.usage_db or path.parent / "usage.sqlite3"
        if not database.exists():
            raise FileNotFoundError(f"no usage yet: {database} does not exist")
        usage = Usage(SqliteUsage(database))
        try:
            report = await usage.report(name, month)
        finally:
            await usage.close()
    tenants = report["tenants"]
    assert isinstance(tenants, dict)
    return tenants


_COMMANDS: dict[str, Callable[[argparse.Namespace, Path], int]] = {
    "usage": _usage,
    "add": _add,
    "set": _set,
    "list": _list,
    "revoke": _revoke,
    "rotate": _rotate,
}


def _print_key(key: str) -> None:
    """The key alone on standard output, for a script to take."""
    print(key)
    sys.stdout.flush()


def _valid_name(name: str) -> str:
    if not TENANT_NAME.fullmatch(name) or name == DEFAULT_TENANT:
        raise _CommandError(
            f"invalid tenant name {name!r}: 1 to 64 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit, not {DEFAULT_TENANT!r}",
            status=EXIT_USAGE,
        )
    return name


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The fields the limit options set (``None``: removed, the server's setting)."""
    changes: dict[str, Any] = {}
    if args.requests is not None:
        requests, window = args.requests
        changes["requests"] = requests
        changes["window"] = None if window is None else _seconds_value(window)
    for field, value in (
        ("concurrent", args.concurrent),
        ("characters_per_day", args.chars_per_day),
        ("characters_per_month", args.chars_per_month),
    ):
        if value is not None:
            changes[field] = value
    if args.voice:
        changes["voices"] = list(dict.fromkeys(args.voice))
    if args.origin:
        changes["origins"] = list(dict.fromkeys(args.origin))
    return changes


def _seconds_value(seconds: float) -> int | float:
    """``60`` rather than ``60.0`` in the file."""
    return int(seconds) if float(seconds).is_integer() else seconds


# Listing


def render_tenants(tenants: Iterable[Tenant], *, now: dt.datetime, as_json: bool = False) -> str:
    """The ``keys list`` table (or JSON array) of ``tenants``, by name; never a key or hash.

    Each tenant's record: its name, how many of its keys open the server at ``now``,
    when the next of its rotated-out keys expires, and its limits (``None``, shown
    ``default``: the server's setting).
    """
    records = [_record(tenant, now) for tenant in sorted(tenants, key=lambda t: t.name)]
    if as_json:
        return orjson.dumps(records, option=orjson.OPT_INDENT_2).decode()
    columns: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
        ("NAME", "name", str),
        ("KEYS", "keys", str),
        ("NEXT EXPIRY", "next_expiry", lambda value: value or "-"),
        ("REQUESTS", "requests", _or_default(str)),
        ("WINDOW", "window", _or_default(_duration_text)),
        ("CONCURRENT", "concurrent", _or_default(str)),
        ("CHARS/DAY", "characters_per_day", _or_default(str)),
        ("CHARS/MONTH", "characters_per_month", _or_default(str)),
        ("VOICES", "voices", _or_default(",".join)),
        ("ORIGINS", "origins", _or_default(",".join)),
    )
    rows = [[title for title, _, _ in columns]]
    rows += [[shown(record[field]) for _, field, shown in columns] for record in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _record(tenant: Tenant, now: dt.datetime) -> dict[str, Any]:
    pending = [k.expires for k in tenant.keys if k.expires is not None and k.expires > now]
    return {
        "name": tenant.name,
        "keys": sum(1 for key in tenant.keys if key.valid(now)),
        "next_expiry": _timestamp(min(pending)) if pending else None,
        "requests": tenant.requests,
        "window": tenant.window,
        "concurrent": tenant.concurrent,
        "characters_per_day": tenant.characters_per_day,
        "characters_per_month": tenant.characters_per_month,
        "voices": None if tenant.voices is None else list(tenant.voices),
        "origins": None if tenant.origins is None else sorted(tenant.origins),
    }


def _or_default(shown: Callable[[Any], str]) -> Callable[[Any], str]:
    return lambda value: "default" if value is None else shown(value)


def _duration_text(seconds: float) -> str:
    """``60s``, ``5m``, ``1h``, ``1d``: the largest unit that divides it."""
    for unit, size in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _timestamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# The file


@dataclass
class _KeysFile:
    """The tenants file being edited: its document, its tenants, and how to write it back."""

    path: Path
    #: Where it is written (``path`` with its symbolic links resolved).
    target: Path
    document: TOMLDocument
    table: TenantTable
    #: Its mode and owner before; ``None``: it is new.
    before: os.stat_result | None

    def tenants_table(self) -> MutableMapping[str, Any]:
        """``[tenants]``, made if the file has none."""
        tenants = self.document.get("tenants")
        if tenants is None:
            tenants = tomlkit.table(is_super_table=True)
            self.document.add("tenants", tenants)
        assert isinstance(tenants, MutableMapping)  # parse_tenants accepted the file
        return tenants

    def tenant(self, name: str) -> MutableMapping[str, Any]:
        """Tenant ``name``'s table (a proxy for one written as dotted keys)."""
        if name not in self.table.tenants:
            raise _CommandError(f"there is no tenant {name!r} in {self.path}")
        table = self.tenants_table()[name]
        assert isinstance(table, MutableMapping)
        return table

    def save(self) -> None:
        """Write the document back, once the server's parser accepts it."""
        text = tomlkit.dumps(self.document)
        try:
            parse_tenants(text, source=str(self.path))
        except ConfigError as exc:
            raise _CommandError(f"not changed: the result would be refused: {exc}") from None
        try:
            _write_atomically(self.target, text, self.before)
        except OSError as exc:
            raise _CommandError(f"cannot write {self.path}: {_reason(exc)}") from None


@contextlib.contextmanager
def _editing(path: Path, *, create: bool) -> Iterator[_KeysFile]:
    """The file at ``path``, read and checked, its directory locked until the edit ends."""
    target = Path(os.path.realpath(path))
    try:
        with _locked(target.parent):
            try:
                before: os.stat_result | None = target.stat()
                text = target.read_text(encoding="utf-8")
            except FileNotFoundError:
                if not create:
                    raise _CommandError(
                        f"there is no {path} (ttsstream keys add NAME creates it)"
                    ) from None
                before, text = None, ""
            except (OSError, UnicodeDecodeError) as exc:
                raise _CommandError(f"cannot read {path}: {_reason(exc)}") from None
            try:
                document = tomlkit.parse(text)
            except TOMLKitError as exc:
                raise _CommandError(f"{path} is not valid TOML ({exc}); not changed") from None
            table = _parsed(text, path)
            if before is None:
                document = _new_document()
            yield _KeysFile(path, target, document, table, before)
    except FileNotFoundError:
        raise _CommandError(f"cannot write {path}: there is no directory {target.parent}") from None
    except OSError as exc:
        raise _CommandError(f"cannot use {path}: {_reason(exc)}") from None


def _parsed(text: str, path: Path) -> TenantTable:
    """The tenants of ``text``, as the server reads them."""
    try:
        return parse_tenants(text, source=str(path))
    except ConfigError as exc:
        raise _CommandError(f"{exc}; not changed") from None


def _new_document() -> TOMLDocument:
    document = tomlkit.document()
    for line in _NEW_FILE_HEADER.splitlines():
        document.add(tomlkit.comment(line))
    document.add(tomlkit.nl())
    return document


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the lock every ``keys`` command takes on ``folder`` to edit a file in it.

    The directory, not the file, is locked: the file is replaced by a new one at
    each edit, and a lock on the old one would not keep out a command that opened
    the new one.
    """
    if sys.platform == "win32":
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _write_atomically(path: Path, text: str, before: os.stat_result | None) -> None:
    """Replace ``path`` by ``text`` at once: a reader sees the old file or the new one.

    A new file is readable by its owner alone (0600) from its first byte; a file
    replaced keeps its mode and, where allowed, its owner and group.
    """
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="\n") as file:
            if before is not None:
                os.chmod(file.fileno(), stat.S_IMODE(before.st_mode))
                _keep_owner(file.fileno(), before, path)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(path.parent)


def _keep_owner(descriptor: int, before: os.stat_result, path: Path) -> None:
    """Give the new file the old one's owner and group (root editing a server's file)."""
    if sys.platform == "win32":
        return
    now = os.fstat(descriptor)
    if (now.st_uid, now.st_gid) == (before.st_uid, before.st_gid):
        return
    try:
        os.fchown(descriptor, before.st_uid, before.st_gid)
    except PermissionError:
        print(
            f"ttsstream keys: warning: {path} now belongs to user {now.st_uid} and group "
            f"{now.st_gid}, not {before.st_uid} and {before.st_gid} as before: check that "
            "the server can still read it",
            file=sys.stderr,
        )


def _sync_directory(folder: Path) -> None:
    """Make the rename itself durable (a crash after would otherwise undo it)."""
    if sys.platform == "win32":
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# Editing tables (tomlkit)


def _keys_array(keys: list[tuple[bytes, dt.datetime | None]], *, inline: bool) -> Array:
    """``keys = [{ sha256 = "…" }, { sha256 = "…", expires = … }]``, a line per key
    when there are several, unless it is in an inline table."""
    array = tomlkit.array()
    for digest, expires in keys:
        entry = tomlkit.inline_table()
        entry.add("sha256", digest.hex())
        if expires is not None:
            entry.add("expires", expires.astimezone(dt.UTC))
        array.append(entry)
    return array.multiline(len(keys) > 1 and not inline)


def _add_field(table: MutableMapping[str, Any], field: str, value: Any) -> None:
    """Add ``field`` after the table's last field, before the comments that end it
    (those are above the next table's header: they speak of that one)."""
    if not isinstance(table, Table) or isinstance(table, OutOfOrderTableProxy):
        table[field] = value
        return
    trailing = _take_trailing(table)
    table.add(field, value)
    for item in trailing:
        table.add(item)


def _remove_table(document: TOMLDocument, tenants: MutableMapping[str, Any], name: str) -> None:
    """Remove tenant ``name``'s table and the comment right above it; the comments
    above the next tenant's header stay above it."""
    if not isinstance(tenants, AbstractTable) or isinstance(tenants, OutOfOrderTableProxy):
        del tenants[name]
        return
    body = tenants.value.body
    place = next(i for i, (key, _) in enumerate(body) if key is not None and key.key == name)
    removed = body[place][1] if _headed(*body[place]) else None
    previous = body[place - 1][1] if place > 0 and _headed(*body[place - 1]) else None
    # The lines above the removed one: the end of the table before it, the file's
    # lines before [tenants.…] for the first table, else the lines before it in [tenants].
    if isinstance(previous, Table):
        _blank_above(previous.value.body, len(previous.value.body))
    elif place == 0 and isinstance(tenants, Table) and tenants.is_super_table():
        top = document.body
        _blank_above(top, next(i for i, (key, _) in enumerate(top) if key == tenants.name))
    else:
        _blank_above(body, place)
    following = [item for key, item in body[place + 1 :] if _headed(key, item)]
    trailing = _take_trailing(removed) if isinstance(removed, Table) else []
    del tenants[name]
    if removed is None:
        return
    if following and not (trailing and isinstance(trailing[0], Whitespace)):
        trailing.insert(0, Whitespace("\n"))  # a blank line before the next header
    if isinstance(previous, Table):
        for item in trailing:
            previous.add(item)
    elif following and isinstance(head := following[0], Table):
        head.trivia.indent = "".join(item.as_string() for item in trailing) + head.trivia.indent
    else:
        for item in trailing:
            document.add(item)


def _headed(key: Key | None, item: Item) -> bool:
    """Whether ``item`` is a table with a header of its own (``[tenants.NAME]``)."""
    return isinstance(item, Table) and key is not None and not key.is_dotted()


def _blank_above(body: list[tuple[Key | None, Item]], end: int) -> None:
    """Empty the comment lines right above ``body[end]``, and the blank lines above them.

    Emptied, not removed: the keys after them are found by their place in ``body``.
    """
    place = end - 1
    for kind in (Comment, Whitespace):
        while place >= 0 and body[place][0] is None and isinstance(body[place][1], kind):
            body[place] = (None, Whitespace(""))
            place -= 1


def _take_trailing(table: Table) -> list[Comment | Whitespace]:
    """Remove and return the comments and blank lines after ``table``'s last field."""
    body = table.value.body
    trailing: list[Comment | Whitespace] = []
    while body and body[-1][0] is None and isinstance(item := body[-1][1], Comment | Whitespace):
        body.pop()
        trailing.insert(0, item)
    return trailing


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
