"""``ttsstream keys``: tenants added, changed, listed, rotated and revoked in API_KEYS_FILE,
as the server then reads the file (``parse_tenants``)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import TIMEOUT
from tests.redis_server import RedisServer
from ttsstream import keys_cli
from ttsstream.cli import main
from ttsstream.cluster.link import RedisLink
from ttsstream.cluster.usage import SharedUsage
from ttsstream.core.tenants import KeyHash, Tenant, TenantTable, hash_key, parse_tenants
from ttsstream.core.usage import Tally, UsageRow
from ttsstream.usage.sqlite import SqliteUsage

KEY = re.compile(r"tts_[A-Za-z0-9_-]{43}")
HOUR = dt.timedelta(hours=1)

COMMENTED = """\
# Tenants of the production server; ask ops before changing.

# the chat front end
[tenants.webui]  # since March
keys = [{ sha256 = "%s" }]
requests = 1000   # per minute

# the nightly batch, going away in June
[tenants.batch]
keys = [{ sha256 = "%s" }]
concurrent = 2
# end of tenants
"""


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.toml"


def keys(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``ttsstream keys ARGS`` in this process: its exit status, stdout and stderr."""
    capsys.readouterr()
    try:
        status = main(["keys", *args])
    except SystemExit as exc:  # argparse refusing an argument
        assert isinstance(exc.code, int)
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def add(capsys: pytest.CaptureFixture[str], path: Path, name: str, *options: str) -> str:
    """Add tenant ``name``; its key."""
    status, out, err = keys(capsys, "add", name, "--file", str(path), *options)
    assert status == 0, err
    return out.strip()


def tenants(path: Path) -> TenantTable:
    return parse_tenants(path.read_text(encoding="utf-8"))


def found(path: Path, key: str, now: dt.datetime | None = None) -> str | None:
    """The name of the tenant ``key`` opens, as the server would find it at ``now``."""
    match = tenants(path).find(key, now=now)
    return None if match is None else match[0].name


def commented_file(path: Path) -> tuple[str, str]:
    """Write :data:`COMMENTED` with two tenants' keys; their keys (webui's, batch's)."""
    webui, batch = "tts_webui-key", "tts_batch-key"
    path.write_text(COMMENTED % (hash_key(webui).hex(), hash_key(batch).hex()))
    return webui, batch


def test_add_prints_only_a_new_key_that_opens_the_tenant(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """``add`` prints a new tts_ key alone on stdout, found as that tenant; the file has
    its hash only."""
    status, out, err = keys(capsys, "add", "webui", "--file", str(keys_file))
    assert status == 0, err
    key = out.strip()
    assert out == f"{key}\n"
    assert KEY.fullmatch(key)
    assert "only" in err and "once" in err
    assert key not in err
    assert found(keys_file, key) == "webui"
    text = keys_file.read_text()
    assert key not in text
    assert key[len(keys_cli.KEY_PREFIX) :] not in text
    assert hash_key(key).hex() in text


def test_add_writes_the_limits_the_server_reads(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """Every limit option of ``add`` is read back by the server's parser as given."""
    add(
        capsys,
        keys_file,
        "webui",
        "--requests",
        "1000/1m",
        "--concurrent",
        "5",
        "--chars-per-day",
        "200000",
        "--chars-per-month",
        "5000000",
        "--voice",
        "en-*",
        "--voice",
        "espeak:*",
        "--origin",
        "https://chat.example.com/",
    )
    tenant = tenants(keys_file).tenants["webui"]
    assert (tenant.requests, tenant.window, tenant.concurrent) == (1000, 60.0, 5)
    assert (tenant.characters_per_day, tenant.characters_per_month) == (200_000, 5_000_000)
    assert tenant.voices == ("en-*", "espeak:*")
    assert tenant.origins == frozenset({"https://chat.example.com"})
    assert "window = 60\n" in keys_file.read_text()


def test_a_new_file_is_private_and_says_what_it_holds(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """The file ``add`` creates is 0600 and starts with a comment about its format and hashes."""
    add(capsys, keys_file, "webui")
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    header = keys_file.read_text().split("[tenants", 1)[0]
    assert header.startswith("# ")
    assert "SHA-256" in header and "API_KEYS_FILE" in header
    assert list(keys_file.parent.iterdir()) == [keys_file]  # no temporary file left


def test_an_edited_file_keeps_its_mode(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    """A file given another mode by its operator keeps it through edits."""
    add(capsys, keys_file, "webui")
    keys_file.chmod(0o640)
    add(capsys, keys_file, "batch")
    keys(capsys, "revoke", "webui", "--file", str(keys_file))
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o640


def test_a_linked_file_is_edited_where_it_is(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """Through a symbolic link, the file it points to is edited and the link stays a link."""
    real = keys_file.with_name("real.toml")
    add(capsys, real, "webui")
    keys_file.symlink_to(real.name)
    key = add(capsys, keys_file, "batch")
    assert keys_file.is_symlink()
    assert found(real, key) == "batch"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_root_editing_keeps_the_servers_ownership(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """Root editing a file the server's user owns leaves it that user's (and readable by it)."""
    add(capsys, keys_file, "webui")
    os.chown(keys_file, 4321, 4321)
    add(capsys, keys_file, "batch")
    owner = keys_file.stat()
    assert (owner.st_uid, owner.st_gid) == (4321, 4321)
    assert stat.S_IMODE(owner.st_mode) == 0o600


@pytest.mark.parametrize(
    ("form", "requests", "window"),
    [
        ("1000/60s", 1000, 60.0),
        ("1000/1m", 1000, 60.0),
        ("100/1h", 100, 3600.0),
        ("100/h", 100, 3600.0),
        ("5/1.5m", 5, 90.0),
        ("20/30", 20, 30.0),
        ("1000", 1000, None),
        ("0/1d", 0, 86400.0),
    ],
)
def test_requests_forms(form: str, requests: int, window: float | None) -> None:
    """``--requests`` takes a count, and a window with or without unit; a bare count has none."""
    assert keys_cli.parse_rate(form) == (requests, window)


def test_a_bare_request_count_leaves_the_window_to_the_server(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """``--requests 1000`` writes no window: the server's RATE_LIMIT_WINDOW applies."""
    add(capsys, keys_file, "webui", "--requests", "1000")
    tenant = tenants(keys_file).tenants["webui"]
    assert (tenant.requests, tenant.window) == (1000, None)


@pytest.mark.parametrize("form", ["10x", "1000/0s", "/60s", "-5/60s", "1000/60y", "1e3", ""])
def test_a_bad_requests_form_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], keys_file: Path, form: str
) -> None:
    """A ``--requests`` that is no rate exits 2, says which option, and writes nothing."""
    status, out, err = keys(capsys, "add", "webui", "--file", str(keys_file), f"--requests={form}")
    assert status == 2
    assert out == ""
    assert "--requests" in err and "1000/60s" in err
    assert "Traceback" not in err
    assert not keys_file.exists()


@pytest.mark.parametrize(
    ("form", "seconds"),
    [("0", 0), ("90", 90), ("30s", 30), ("30m", 1800), ("24h", 86400), ("7d", 604800)],
)
def test_duration_forms(form: str, seconds: int) -> None:
    """``--grace`` takes seconds, or a count of s, m, h or d."""
    assert keys_cli.parse_duration(form) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("form", ["", "-1h", "1w", "h", "1 h"])
def test_bad_duration_forms(form: str) -> None:
    """Durations outside those forms are refused."""
    with pytest.raises(ValueError, match="30s, 15m, 24h or 7d"):
        keys_cli.parse_duration(form)


def test_an_existing_name_is_refused(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    """Adding a tenant that exists fails (exit 1) and leaves the file as it was."""
    key = add(capsys, keys_file, "webui")
    before = keys_file.read_bytes()
    status, out, err = keys(capsys, "add", "webui", "--file", str(keys_file))
    assert (status, out) == (1, "")
    assert err.count("\n") == 1
    assert "'webui' already exists" in err
    assert keys_file.read_bytes() == before
    assert found(keys_file, key) == "webui"


@pytest.mark.parametrize("name", ["default", "-webui", "a b", "x" * 65, "é"])
def test_an_invalid_name_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], keys_file: Path, name: str
) -> None:
    """A name the server would refuse (or ``default``, TTS_API_KEY's) exits 2, no file made."""
    status, out, err = keys(capsys, "add", "--file", str(keys_file), "--", name)
    assert (status, out) == (2, "")
    assert "invalid tenant name" in err
    assert not keys_file.exists()


def test_set_changes_and_clears_limits_and_keeps_the_key(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """``set`` changes limits, replaces the voice list, ``--clear`` unsets; the key still works."""
    key = add(capsys, keys_file, "webui", "--requests", "10/1s", "--voice", "en-*")
    status, out, err = keys(
        capsys,
        "set",
        "webui",
        "--file",
        str(keys_file),
        "--requests",
        "50/1h",
        "--concurrent",
        "2",
        "--voice",
        "fr-*",
        "--chars-per-month",
        "0",
    )
    assert (status, out) == (0, ""), err
    tenant = tenants(keys_file).tenants["webui"]
    assert (tenant.requests, tenant.window, tenant.concurrent) == (50, 3600.0, 2)
    assert (tenant.voices, tenant.characters_per_month) == (("fr-*",), 0)

    status, _, err = keys(
        capsys,
        "set",
        "webui",
        "--file",
        str(keys_file),
        "--clear",
        "requests",
        "--clear",
        "voices",
        "--clear",
        "characters_per_month",
    )
    assert status == 0, err
    tenant = tenants(keys_file).tenants["webui"]
    assert (tenant.requests, tenant.window, tenant.voices) == (None, None, None)
    assert (tenant.concurrent, tenant.characters_per_month) == (2, None)
    assert found(keys_file, key) == "webui"


@pytest.mark.parametrize(
    ("args", "status", "said"),
    [
        ([], 2, "nothing to change"),
        (["--clear", "concurrent", "--concurrent", "3"], 2, "--clear concurrent"),
        (["--clear", "window", "--requests", "5"], 2, "--clear window"),
        (["--clear", "colour"], 2, "--clear: expected one of"),
        (["--concurrent", "0"], 2, "--concurrent: expected an integer >= 1"),
        (["--origin", "chat.example.com"], 2, "expected an origin"),
        (["--origin", "https://chat.example.com/app"], 2, "expected an origin"),
    ],
)
def test_set_refuses_what_cannot_be_done(
    capsys: pytest.CaptureFixture[str],
    keys_file: Path,
    args: list[str],
    status: int,
    said: str,
) -> None:
    """``set`` with nothing to do, contradicting or bad options exits 2 and changes nothing."""
    add(capsys, keys_file, "webui", "--concurrent", "4")
    before = keys_file.read_bytes()
    exit_status, out, err = keys(capsys, "set", "webui", "--file", str(keys_file), *args)
    assert (exit_status, out) == (status, "")
    assert said in err
    assert keys_file.read_bytes() == before


def test_commands_on_an_unknown_tenant_fail(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """``set``, ``rotate`` and ``revoke`` of a tenant the file lacks exit 1, in one line."""
    add(capsys, keys_file, "webui")
    for args in (["set", "nope", "--concurrent", "2"], ["rotate", "nope"], ["revoke", "nope"]):
        status, out, err = keys(capsys, *args, "--file", str(keys_file))
        assert (status, out) == (1, "")
        assert err == f"ttsstream keys {args[0]}: there is no tenant 'nope' in {keys_file}\n"


def test_commands_other_than_add_need_the_file(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """Without the file, every command but ``add`` exits 1 and says ``add`` creates it."""
    for args in (["list"], ["set", "a", "--concurrent", "2"], ["rotate", "a"], ["revoke", "a"]):
        status, _, err = keys(capsys, *args, "--file", str(keys_file))
        assert status == 1
        assert "ttsstream keys add NAME creates it" in err
    assert not keys_file.exists()


def test_list_shows_names_keys_and_limits_never_a_key_or_hash(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """``list``: a line per tenant, its valid keys and limits ('default' if unset), no secret."""
    webui = add(capsys, keys_file, "webui", "--requests", "1000/60s", "--voice", "en-*")
    batch = add(capsys, keys_file, "batch", "--chars-per-day", "5000")
    status, out, err = keys(capsys, "list", "--file", str(keys_file))
    assert status == 0, err
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["NAME", "KEYS", "NEXT"]
    assert [line.split()[0] for line in lines] == ["batch", "webui"]
    batch_line, webui_line = lines
    assert batch_line.split() == [
        "batch", "1", "-", "default", "default", "default", "5000", "default", "default", "default"
    ]  # fmt: skip
    assert webui_line.split() == [
        "webui", "1", "-", "1000", "1m", "default", "default", "default", "en-*", "default"
    ]  # fmt: skip
    assert "2 tenants" in err
    for key in (webui, batch):
        assert key not in out + err
        assert hash_key(key).hex() not in out + err
        assert hash_key(key).hex()[:12] not in out + err


def test_list_json(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    """``list --json``: an array of records, limits null when unset, no key or hash."""
    key = add(capsys, keys_file, "webui", "--requests", "10/1h", "--origin", "https://a.example")
    status, out, _ = keys(capsys, "list", "--json", "--file", str(keys_file))
    assert status == 0
    assert orjson.loads(out) == [
        {
            "name": "webui",
            "keys": 1,
            "next_expiry": None,
            "requests": 10,
            "window": 3600.0,
            "concurrent": None,
            "characters_per_day": None,
            "characters_per_month": None,
            "voices": None,
            "origins": ["https://a.example"],
        }
    ]
    assert hash_key(key).hex() not in out


def test_render_tenants_takes_the_tenants() -> None:
    """The listing is one function of the tenants and the time: keys valid then, next expiry."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    tenant = Tenant(
        "webui",
        (
            KeyHash(b"\1" * 32),
            KeyHash(b"\2" * 32, expires=now + HOUR),
            KeyHash(b"\3" * 32, expires=now + 2 * HOUR),
            KeyHash(b"\4" * 32, expires=now - HOUR),
        ),
        window=90,
    )
    _, line = keys_cli.render_tenants([tenant], now=now).splitlines()
    assert line.split()[:5] == ["webui", "3", "2026-01-01T01:00:00Z", "default", "90s"]


def test_revoke_removes_the_tenant_and_its_keys(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """After ``revoke`` the tenant's key opens nothing; the other tenants' keys still work."""
    webui = add(capsys, keys_file, "webui")
    batch = add(capsys, keys_file, "batch")
    status, out, err = keys(capsys, "revoke", "webui", "--file", str(keys_file))
    assert (status, out) == (0, ""), err
    assert found(keys_file, webui) is None
    assert "webui" not in tenants(keys_file).tenants
    assert found(keys_file, batch) == "batch"


def test_rotate_keeps_the_old_key_for_the_grace_period(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """After ``rotate`` both keys open the tenant; after the grace (24h by default) only the new."""
    old = add(capsys, keys_file, "webui")
    status, out, err = keys(capsys, "rotate", "webui", "--file", str(keys_file))
    assert status == 0, err
    new = out.strip()
    assert out == f"{new}\n"
    assert KEY.fullmatch(new) and new != old
    assert new not in keys_file.read_text()
    now = dt.datetime.now(dt.UTC)
    assert found(keys_file, old, now) == found(keys_file, new, now) == "webui"
    later = now + keys_cli.DEFAULT_GRACE + dt.timedelta(minutes=1)
    assert found(keys_file, old, later) is None
    assert found(keys_file, new, later) == "webui"
    assert found(keys_file, old, now + keys_cli.DEFAULT_GRACE - dt.timedelta(minutes=1))
    assert "only" in err and "until" in err


def test_rotate_with_no_grace_ends_the_old_key_at_once(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """``--grace 0``: the old key opens nothing from now on, and leaves the file."""
    old = add(capsys, keys_file, "webui")
    status, out, err = keys(capsys, "rotate", "webui", "--grace", "0", "--file", str(keys_file))
    assert status == 0, err
    assert found(keys_file, old) is None
    assert found(keys_file, out.strip()) == "webui"
    assert len(tenants(keys_file).tenants["webui"].keys) == 1


def test_rotate_drops_expired_keys_and_never_lengthens_a_grace(
    capsys: pytest.CaptureFixture[str], keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second rotation keeps an old key's earlier expiry, and drops keys already expired."""
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    monkeypatch.setattr(keys_cli, "_now", lambda: start)
    first = add(capsys, keys_file, "webui")
    second = keys(capsys, "rotate", "webui", "--grace", "1h", "--file", str(keys_file))[1].strip()
    keys(capsys, "rotate", "webui", "--grace", "7d", "--file", str(keys_file))
    expiries = {k.digest: k.expires for k in tenants(keys_file).tenants["webui"].keys}
    assert expiries[hash_key(first)] == start + HOUR
    assert expiries[hash_key(second)] == start + dt.timedelta(days=7)

    monkeypatch.setattr(keys_cli, "_now", lambda: start + 2 * HOUR)
    third = keys(capsys, "rotate", "webui", "--grace", "30m", "--file", str(keys_file))[1].strip()
    held = tenants(keys_file).tenants["webui"].keys
    assert hash_key(first) not in {k.digest for k in held}
    assert held[0].digest == hash_key(third)
    assert len(held) == 3  # third, second and the one before it, until 30 minutes from then
    out = keys(capsys, "list", "--file", str(keys_file))[1]
    assert (start + 2 * HOUR + dt.timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ") in out


def test_comments_and_hand_edits_survive(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """``add``, ``set``, ``rotate`` keep an operator's comments and layout where they were."""
    webui, _ = commented_file(keys_file)
    original = keys_file.read_text()
    new = add(capsys, keys_file, "reports")
    text = keys_file.read_text()
    assert text.startswith(original)  # a new tenant goes at the end; nothing above moves
    assert found(keys_file, new) == "reports"

    keys(
        capsys, "set", "webui", "--concurrent", "3", "--requests", "2000", "--file", str(keys_file)
    )
    keys(capsys, "rotate", "webui", "--file", str(keys_file))
    text = keys_file.read_text()
    for line in original.splitlines():
        if line.startswith("#") or line.startswith("[tenants."):
            assert line in text
    assert "requests = 2000   # per minute" in text
    # The new field goes with webui's, not under the comment about the batch tenant.
    webui_part = text.split("# the nightly batch")[0]
    assert "concurrent = 3" in webui_part
    assert found(keys_file, webui) == "webui"


def test_revoke_keeps_the_comments_of_other_tenants(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    """Revoking a tenant removes its own comment, not the one above the next tenant."""
    commented_file(keys_file)
    keys(capsys, "revoke", "webui", "--file", str(keys_file))
    text = keys_file.read_text()
    assert "# the chat front end" not in text
    assert text.startswith(
        "# Tenants of the production server; ask ops before changing.\n\n"
        "# the nightly batch, going away in June\n[tenants.batch]\n"
    )
    assert "# end of tenants" in text

    commented_file(keys_file)
    keys(capsys, "revoke", "batch", "--file", str(keys_file))
    text = keys_file.read_text()
    assert "nightly batch" not in text
    assert "requests = 1000   # per minute\n# end of tenants\n" in text


@pytest.mark.parametrize(
    ("content", "said"),
    [
        ("[tenants.webui\nkeys = []\n", "not valid TOML"),
        ('[tenants.webui]\nkeys = [{ sha256 = "abc" }]\n', "sha256"),
        ('[tenants.webui]\nkeys = [{ sha256 = "%s" }]\ncolour = 1\n' % ("a" * 64), "colour"),
        ("[other]\n", "unknown table"),
    ],
)
def test_a_broken_file_is_refused_and_left_untouched(
    capsys: pytest.CaptureFixture[str], keys_file: Path, content: str, said: str
) -> None:
    """A file the server would refuse is refused by every command, in one line, unchanged."""
    keys_file.write_text(content)
    keys_file.chmod(0o644)
    for args in (["add", "new"], ["list"], ["rotate", "webui"], ["revoke", "webui"]):
        status, out, err = keys(capsys, *args, "--file", str(keys_file))
        assert (status, out) == (1, "")
        assert err.startswith(f"ttsstream keys {args[0]}: ")
        assert err.count("\n") == 1 and said in err and "Traceback" not in err
    assert keys_file.read_text() == content
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o644
    assert list(keys_file.parent.iterdir()) == [keys_file]


def test_the_file_comes_from_api_keys_file(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --file, the commands use API_KEYS_FILE (environment, then ./.env)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("API_KEYS_FILE", raising=False)
    (tmp_path / ".env").write_text("API_KEYS_FILE=from-dotenv.toml\n")
    status, out, err = keys(capsys, "add", "webui")
    assert status == 0, err
    assert found(tmp_path / "from-dotenv.toml", out.strip()) == "webui"

    monkeypatch.setenv("API_KEYS_FILE", str(tmp_path / "from-env.toml"))
    key = keys(capsys, "add", "batch")[1].strip()
    assert found(tmp_path / "from-env.toml", key) == "batch"


def test_without_a_file_the_error_says_how_to_name_one(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No --file and no API_KEYS_FILE: exit 2, naming both ways to give the file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("API_KEYS_FILE", raising=False)
    status, out, err = keys(capsys, "list")
    assert (status, out) == (2, "")
    assert err == (
        "ttsstream keys list: no tenants file: set API_KEYS_FILE (in the environment or "
        ".env) or pass --file PATH\n"
    )


def test_a_missing_directory_is_said(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``add`` into a directory that does not exist fails in one line, creating nothing."""
    path = tmp_path / "nowhere" / "keys.toml"
    status, out, err = keys(capsys, "add", "webui", "--file", str(path))
    assert (status, out) == (1, "")
    assert "no directory" in err and err.count("\n") == 1
    assert not path.parent.exists()


def test_keys_is_listed_among_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """``ttsstream --help`` lists ``keys``; ``ttsstream keys --help`` its five commands."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "keys" in capsys.readouterr().out
    status, out, _ = keys(capsys, "--help")
    assert status == 0
    for command in ("add", "set", "list", "revoke", "rotate"):
        assert command in out


def test_the_installed_command_adds_a_key(tmp_path: Path) -> None:
    """``python -m ttsstream keys add`` as a process: the key alone on stdout, found in the file."""
    path = tmp_path / "keys.toml"
    environ = {k: v for k, v in os.environ.items() if k != "API_KEYS_FILE"}
    done = subprocess.run(
        [sys.executable, "-m", "ttsstream", "keys", "add", "webui", "--file", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environ,
        timeout=TIMEOUT * 2,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert done.stdout == f"{key}\n" and KEY.fullmatch(key)
    assert found(path, key) == "webui"
    assert "shown only this once" in done.stderr


# Usage


def _usage_rows() -> list[UsageRow]:
    return [
        UsageRow("webui", "2026-12-01", "http", Tally(100, 40, 6000.0, 3, 1)),
        UsageRow("webui", "2026-12-02", "ws", Tally(50, 0, 3000.0, 1, 0)),
        UsageRow("batch", "2026-12-02", "http", Tally(7, 0, 500.0, 1, 0)),
        UsageRow("webui", "2026-11-30", "http", Tally(999, 0, 1.0, 1, 0)),
    ]


def test_keys_usage_reads_a_month_of_the_stored_usage(
    capsys: pytest.CaptureFixture[str],
    keys_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for variable in ("REDIS_URL", "USAGE_DB", "API_KEYS_FILE"):
        monkeypatch.delenv(variable, raising=False)
    add(capsys, keys_file, "webui")
    status, _, err = keys(capsys, "usage", "--file", str(keys_file))
    assert status == 1 and "no usage yet" in err

    async def store() -> None:
        usage = SqliteUsage(keys_file.parent / "usage.sqlite3")
        await usage.add(_usage_rows())
        await usage.close()

    asyncio.run(store())
    status, out, _ = keys(capsys, "usage", "--file", str(keys_file), "--month", "2026-12", "--json")
    assert status == 0
    report = orjson.loads(out)
    assert report["month"] == "2026-12" and set(report["tenants"]) == {"webui", "batch"}
    webui = report["tenants"]["webui"]
    assert (webui["characters"], webui["cached_characters"], webui["requests"]) == (150, 40, 4)
    assert webui["audio_seconds"] == 9.0 and webui["doors"]["ws"]["characters"] == 50
    status, out, _ = keys(capsys, "usage", "webui", "--file", str(keys_file), "--month", "2026-12")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TENANT", "DOOR", "CHARACTERS"]
    assert lines[1].split()[:3] == ["webui", "all", "150"] and "batch" not in out
    status, _, err = keys(capsys, "usage", "--file", str(keys_file), "--month", "2026-13")
    assert status == 2 and "2026-12" in err


async def test_keys_usage_reads_the_cluster_usage_from_redis(
    capsys: pytest.CaptureFixture[str],
    keys_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis: RedisServer,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", redis.url)
    link = RedisLink(redis.url, prefix="ttsstream:", lease_seconds=15)
    await link.start()
    try:
        await SharedUsage(link).add(_usage_rows())
    finally:
        await link.aclose()
    capsys.readouterr()
    status = await asyncio.to_thread(
        main, ["keys", "usage", "--file", str(keys_file), "--month", "2026-12", "--json"]
    )
    out, err = capsys.readouterr()
    assert status == 0, err
    report = orjson.loads(out)
    assert report["tenants"]["webui"]["characters"] == 150
    assert report["tenants"]["batch"]["doors"]["http"]["requests"] == 1
