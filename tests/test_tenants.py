"""Tenants: named keys from API_KEYS_FILE, each with its own limits, quotas and usage,
on every door; the file reloaded without a restart.

The doors are driven by the adapters of tests/test_doors.py, as each door's clients
speak; the server is a real one on 127.0.0.1 with the fake Edge service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from tests.conftest import TIMEOUT, ServerFactory, eventually
from tests.fake_edge import FakeEdge
from tests.redis_server import RedisServer
from tests.test_doors import DOORS, LABELS, TEXT, doors
from ttsstream.core.context import Principal, RequestContext
from ttsstream.core.tenants import KeyHash, Tenant, hash_key, parse_tenants
from ttsstream.core.usage import Usage, UsageRow
from ttsstream.exceptions import KeysFileError, QuotaExceeded
from ttsstream.server import Server
from ttsstream.usage.sqlite import SqliteUsage

ALPHA, BETA = "tts_alpha-key", "tts_beta-key"


def tenants_toml(tenants: dict[str, dict[str, Any]]) -> str:
    """A keys file: each tenant's ``key`` stored as its SHA-256, its other fields as given."""
    lines = []
    for name, fields in tenants.items():
        lines.append(f"[tenants.{name}]")
        keys = fields.get("keys") or [{"key": fields["key"]}]
        entries = []
        for entry in keys:
            digest = hashlib.sha256(entry["key"].encode()).hexdigest()
            expires = f", expires = {entry['expires']}" if "expires" in entry else ""
            entries.append(f'{{ sha256 = "{digest}"{expires} }}')
        lines.append(f"keys = [{', '.join(entries)}]")
        for field, value in fields.items():
            if field in ("key", "keys"):
                continue
            lines.append(f"{field} = {orjson.dumps(value).decode()}")
        lines.append("")
    return "\n".join(lines)


def write_keys(path: Path, tenants: dict[str, dict[str, Any]]) -> Path:
    """Write the file as an operator's editor would: a new file moved into place."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(tenants_toml(tenants))
    os.replace(temporary, path)
    return path


async def keyed(start_server: ServerFactory, tmp_path: Path, **tenants: dict[str, Any]) -> Server:
    path = write_keys(tmp_path / "keys.toml", tenants)
    return await start_server(api_keys_file=path)


#: The characters each door's adapter sends: the text, and ElevenLabs' stream-input its
#: trailing space too (its opening " " is the protocol's keep-alive, not text).
CHARACTERS = {door: len(TEXT) + (door == "elevenlabs-ws") for door in DOORS}


def usage_of(server: Server, tenant: str) -> dict[str, Any]:
    snapshot = server.services.usage.snapshot()
    return snapshot.get(tenant, {})


# The file


def test_a_tenants_file_is_parsed_with_its_limits() -> None:
    table = parse_tenants(
        tenants_toml(
            {
                "webui": {
                    "key": ALPHA,
                    "requests": 1000,
                    "window": 60,
                    "concurrent": 5,
                    "characters_per_day": 100,
                    "characters_per_month": 1000,
                    "voices": ["en-*"],
                    "origins": ["https://a.example/"],
                },
                "bot": {"key": BETA},
            }
        )
    )
    found = table.find(ALPHA)
    assert found is not None
    tenant, key = found
    assert (tenant.name, tenant.requests, tenant.window, tenant.concurrent) == (
        "webui",
        1000,
        60.0,
        5,
    )
    assert (tenant.characters_per_day, tenant.characters_per_month) == (100, 1000)
    assert tenant.allows_voice("en-US-AriaNeural") and not tenant.allows_voice("de-DE-KatjaNeural")
    assert tenant.allows_origin("https://a.example") and not tenant.allows_origin("https://b.x")
    assert key.digest == hash_key(ALPHA)
    bot = table.find(BETA)
    assert bot is not None and bot[0].name == "bot" and bot[0].requests is None
    assert table.find("tts_other") is None


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("[tenants.a]\nkeys = []\n", "'keys'"),
        ('[tenants.a]\nkeys = [{ sha256 = "abc" }]\n', "sha256"),
        ("[tenants.a\n", "not valid TOML"),
        ("[other]\n", "unknown table"),
        (f'[tenants.default]\nkeys = [{{ sha256 = "{"0" * 64}" }}]\n', "'default'"),
        (f'[tenants.a]\nkeys = [{{ sha256 = "{"0" * 64}" }}]\nrequests = -1\n', "'requests'"),
        (f'[tenants.a]\nkeys = [{{ sha256 = "{"0" * 64}" }}]\nrequest = 5\n', "'request'"),
        (
            f'[tenants.a]\nkeys = [{{ sha256 = "{"0" * 64}" }}]\n'
            f'[tenants.b]\nkeys = [{{ sha256 = "{"0" * 64}" }}]\n',
            "share a key",
        ),
    ],
)
def test_a_bad_tenants_file_says_what_is_wrong(text: str, names: str) -> None:
    with pytest.raises(KeysFileError) as raised:
        parse_tenants(text)
    assert names in str(raised.value)


def test_a_rotated_out_key_opens_until_it_expires() -> None:
    now = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC)
    table = parse_tenants(
        tenants_toml(
            {"webui": {"keys": [{"key": BETA}, {"key": ALPHA, "expires": "2026-12-07T13:00:00Z"}]}}
        )
    )
    assert table.find(ALPHA, now) is not None and table.find(BETA, now) is not None
    later = now + dt.timedelta(hours=1)
    assert table.find(ALPHA, later) is None and table.find(BETA, later) is not None
    assert table.next_expiry(now) == later


# Every door


@doors
async def test_a_tenant_key_speaks_on_every_door_and_is_counted_as_its_tenant(
    door: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    """A tenant's key opens every door; its utterance is counted under the tenant's name
    and the door's label, its characters exactly; a key of no tenant is refused."""
    server = await keyed(start_server, tmp_path, webui={"key": ALPHA})
    refused = await DOORS[door](server, {"X-API-Key": "tts_nobody"})
    assert refused.status == 401 or refused.code == "unauthorized", refused
    assert (await DOORS[door](server, {"X-API-Key": ALPHA})).spoke
    counts = usage_of(server, "webui")
    assert counts["requests"] == 1 and counts["characters"] == CHARACTERS[door]
    assert counts["audio_seconds"] > 0
    assert list(counts["doors"]) == [LABELS[door]]


@doors
async def test_tenants_have_their_own_rate_limits_on_every_door(
    door: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    """One tenant over its own `requests` is refused rate_limited; another tenant, and the
    first one's IP, are not held back by it."""
    server = await keyed(
        start_server,
        tmp_path,
        alpha={"key": ALPHA, "requests": 2, "window": 60},
        beta={"key": BETA, "requests": 100},
    )
    outcomes = [await DOORS[door](server, {"X-API-Key": ALPHA}) for _ in range(3)]
    assert outcomes[0].spoke
    assert any(o.status == 429 or o.code == "rate_limited" for o in outcomes[1:]), outcomes
    for _ in range(3):
        assert (await DOORS[door](server, {"X-API-Key": BETA})).spoke


async def test_an_app_forwarding_many_users_from_one_ip_is_not_cut_off(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """An app speaking for 500 users from one address under its tenant's 1,000 a minute
    passes the per-IP limit (10) many times over; a flood without a valid key from the same
    IP is still stopped by the per-IP limit."""
    path = write_keys(tmp_path / "keys.toml", {"webui": {"key": ALPHA, "requests": 1000}})
    server = await start_server(api_keys_file=path, rate_limit_requests=10)
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/tts"
        for user in range(500):
            async with session.post(
                url, json={"text": f"Hello user {user % 3}."}, headers={"X-API-Key": ALPHA}
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()
        statuses = []
        for _ in range(12):
            async with session.post(
                url, json={"text": "Hi."}, headers={"X-API-Key": "tts_guess"}
            ) as response:
                statuses.append(response.status)
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    assert usage_of(server, "webui")["requests"] == 500


async def test_a_tenant_holds_at_most_its_concurrent_connections(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """A tenant's `concurrent` caps its open connections whatever the per-IP cap; another
    tenant connects beside it, and a closed connection frees its place."""
    path = write_keys(
        tmp_path / "keys.toml",
        {"alpha": {"key": ALPHA, "concurrent": 1}, "beta": {"key": BETA}},
    )
    server = await start_server(api_keys_file=path, max_connections_per_ip=50)
    url = f"ws://127.0.0.1:{server.port}/v1/stream"
    async with websockets.connect(url, additional_headers={"X-API-Key": ALPHA}):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers={"X-API-Key": ALPHA}):
                pass
        assert refused.value.response.status_code == 429
        assert b"too_many_connections" in bytes(refused.value.response.body)
        async with websockets.connect(url, additional_headers={"X-API-Key": BETA}):
            pass
    await eventually(lambda: server.services.admission.connections.total == 0)
    async with websockets.connect(url, additional_headers={"X-API-Key": ALPHA}):
        pass


@doors
async def test_a_tenant_speaks_only_its_voices_on_every_door(
    door: str, start_server: ServerFactory, tmp_path: Path, fake: FakeEdge
) -> None:
    """A tenant limited to other voices is refused voice_not_allowed (403 on HTTP) and
    nothing reaches Edge; a tenant allowed the voice speaks it."""
    server = await keyed(
        start_server,
        tmp_path,
        german={"key": ALPHA, "voices": ["de-*"]},
        english={"key": BETA, "voices": ["en-US-*", "alloy"]},
    )
    refused = await DOORS[door](server, {"X-API-Key": ALPHA})
    assert refused.code == "voice_not_allowed" or refused.status == 403, refused
    assert fake.records == []
    assert (await DOORS[door](server, {"X-API-Key": BETA})).spoke


async def test_a_tenant_key_works_only_from_its_origins(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await keyed(
        start_server, tmp_path, webui={"key": ALPHA, "origins": ["https://app.example"]}
    )
    speak = DOORS["tts"]
    refused = await speak(server, {"X-API-Key": ALPHA, "Origin": "https://evil.example"})
    assert refused.status == 403 and refused.code == "origin_not_allowed"
    assert (await speak(server, {"X-API-Key": ALPHA, "Origin": "https://app.example"})).spoke
    assert (await speak(server, {"X-API-Key": ALPHA})).spoke  # not a browser


# Quotas


@doors
async def test_a_daily_quota_is_exact_on_every_door(
    door: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    """A tenant with characters for two texts speaks two and is refused the third with
    quota_exceeded and when the day resets; the characters are counted exactly."""
    server = await keyed(
        start_server, tmp_path, webui={"key": ALPHA, "characters_per_day": 2 * CHARACTERS[door]}
    )
    assert (await DOORS[door](server, {"X-API-Key": ALPHA})).spoke
    assert (await DOORS[door](server, {"X-API-Key": ALPHA})).spoke
    refused = await DOORS[door](server, {"X-API-Key": ALPHA})
    assert refused.code == "quota_exceeded" or refused.status == 429, refused
    counts = usage_of(server, "webui")
    assert counts["characters"] == 2 * CHARACTERS[door] and counts["requests"] == 2


async def test_a_streamed_text_is_charged_all_it_received_and_then_refused(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """Streaming input: admitted while a character is left, charged every appended
    character when it ends (it finishes past the quota), then the next is refused."""
    pieces = ["The first part of a reply, ", "and the second part. ", "A last sentence."]
    total = sum(len(piece) for piece in pieces)
    server = await keyed(start_server, tmp_path, webui={"key": ALPHA, "characters_per_day": 10})
    url = f"ws://127.0.0.1:{server.port}/v1/stream"
    async with websockets.connect(url, additional_headers={"X-API-Key": ALPHA}) as ws:
        assert orjson.loads(await ws.recv())["type"] == "hello"
        await ws.send(orjson.dumps({"type": "speak", "id": "s", "stream": True}).decode())
        for piece in pieces:
            await ws.send(orjson.dumps({"type": "append", "id": "s", "text": piece}).decode())
        await ws.send(orjson.dumps({"type": "finish", "id": "s"}).decode())
        while True:
            frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
            if isinstance(frame, str) and orjson.loads(frame)["type"] == "end":
                break
        await ws.send(orjson.dumps({"type": "speak", "id": "t", "stream": True}).decode())
        refused = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert refused["type"] == "error" and refused["code"] == "quota_exceeded"
    assert refused["id"] == "t" and refused["retry_after"] >= 1
    assert usage_of(server, "webui")["characters"] == total


async def test_the_quota_answer_says_when_it_resets(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await keyed(start_server, tmp_path, webui={"key": ALPHA, "characters_per_day": 5})
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{server.port}/tts",
            json={"text": "Six chars"},
            headers={"X-API-Key": ALPHA},
        ) as response,
    ):
        body = await response.json()
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert response.status == 429 and body["error"] == "quota_exceeded"
    wait = int(response.headers["Retry-After"])
    assert body["retry_after"] == wait
    assert abs(wait - (midnight - now).total_seconds()) <= TIMEOUT + 1


class Calendar:
    """A wall clock the test moves."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def principal(**limits: Any) -> Principal:
    tenant = Tenant("webui", (KeyHash(hash_key(ALPHA)),), **limits)
    return Principal("webui", keyed=True, tenant=tenant, key=tenant.keys[0])


def context(who: Principal) -> RequestContext:
    return RequestContext(who, "127.0.0.1", "c1", "http")


async def test_quotas_reset_at_the_start_of_the_day_and_the_month(tmp_path: Path) -> None:
    clock = Calendar(dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC))
    usage = Usage(SqliteUsage(tmp_path / "usage.sqlite3"), now=clock)
    who = principal(characters_per_day=10, characters_per_month=15)
    await usage.charge(who, 10)
    usage.record(context(who), characters=10, cached=False, audio_ms=900, error=False)
    with pytest.raises(QuotaExceeded) as refused:
        await usage.charge(who, 1)
    assert refused.value.retry_after == 60  # to midnight
    clock.now = dt.datetime(2027, 1, 1, 0, 0, 1, tzinfo=dt.UTC)
    await usage.charge(who, 10)  # a new day and a new month
    usage.record(context(who), characters=10, cached=False, audio_ms=900, error=False)
    clock.now = dt.datetime(2027, 1, 2, 8, tzinfo=dt.UTC)
    await usage.charge(who, 5)  # a new day: 15 this month
    with pytest.raises(QuotaExceeded) as refused:
        await usage.charge(who, 1)  # the month's 15 are spent
    first_of_february = dt.datetime(2027, 2, 1, tzinfo=dt.UTC)
    assert refused.value.retry_after == int((first_of_february - clock.now).total_seconds())
    assert "month" in refused.value.message
    await usage.close()


async def test_a_charge_is_given_back_when_nothing_was_heard() -> None:
    usage = Usage()
    who = principal(characters_per_day=10)
    charge = await usage.charge(who, 10)
    assert charge is not None and charge.characters == 10 and not charge.shared
    usage.refund(charge)
    await usage.charge(who, 10)
    assert (await usage.remaining(who))["characters_left_today"] == 0


async def test_a_failed_utterance_is_not_charged(
    start_server: ServerFactory, tmp_path: Path, fake: FakeEdge
) -> None:
    """An utterance that fails before any audio gives its characters back: the quota is
    untouched, the failure counted as an error."""
    path = write_keys(tmp_path / "keys.toml", {"webui": {"key": ALPHA, "characters_per_day": 40}})
    server = await start_server(api_keys_file=path, with_offline=False)
    assert len(TEXT) <= 40
    fake.no_audio = True  # Edge sends nothing, and there is no offline voice
    refused = await DOORS["tts"](server, {"X-API-Key": ALPHA})
    assert not refused.spoke and refused.status == 502, refused
    fake.no_audio = False
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).spoke
    counts = usage_of(server, "webui")
    assert counts["characters"] == len(TEXT) and counts["errors"] == 1


# Usage


async def test_usage_is_answered_to_the_calling_key_and_kept_across_a_restart(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """GET /v1/usage answers the calling key's own counts and quota; the counts are
    written to USAGE_DB and a new server reads them."""
    tenants: dict[str, dict[str, Any]] = {
        "alpha": {"key": ALPHA, "characters_per_month": 1000},
        "beta": {"key": BETA},
    }
    path = write_keys(tmp_path / "keys.toml", tenants)
    server = await start_server(api_keys_file=path)
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).spoke
    assert (await DOORS["openai"](server, {"X-API-Key": ALPHA})).spoke
    assert (await DOORS["v1"](server, {"X-API-Key": BETA})).spoke

    async def usage(port: int, key: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}/v1/usage", headers={"Authorization": f"Bearer {key}"}
            ) as response,
        ):
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body

    alpha = await usage(server.port, ALPHA)
    assert alpha["tenant"] == "alpha" and alpha["requests"] == 2
    assert alpha["characters"] == 2 * len(TEXT) and alpha["doors"]["http"]["requests"] == 2
    assert alpha["quota"]["characters_left_this_month"] == 1000 - 2 * len(TEXT)
    beta = await usage(server.port, BETA)
    assert beta["tenant"] == "beta" and beta["doors"] == {"ws": beta["doors"]["ws"]}
    server.close()
    await server.wait_closed()
    stored = SqliteUsage(tmp_path / "usage.sqlite3")
    rows = await stored.rows(None, "0000-00-00", "9999-99-99")
    await stored.close()
    assert sum(row.tally.requests for row in rows if row.tenant == "alpha") == 2
    again = await start_server(api_keys_file=path)
    assert (await usage(again.port, ALPHA))["characters"] == 2 * len(TEXT)


async def test_usage_shows_in_stats_and_metrics(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = await keyed(start_server, tmp_path, webui={"key": ALPHA})
    assert (await DOORS["cartesia-http"](server, {"X-API-Key": ALPHA})).spoke
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.ops.port}"
        async with session.get(base + "/stats") as response:
            stats = await response.json()
        async with session.get(base + "/metrics") as response:
            metrics = await response.text()
    assert stats["tenants"]["webui"]["doors"]["cartesia"]["characters"] == len(TEXT)
    line = f'ttsstream_tenant_characters_total{{interface="cartesia",tenant="webui"}} {len(TEXT)}.0'
    assert line in metrics


def test_usage_rows_sum_per_tenant_and_door() -> None:
    from ttsstream.core.usage import Tally, summarize

    rows = [
        UsageRow("a", "2026-12-01", "ws", Tally(10, 4, 1000.0, 1, 0)),
        UsageRow("a", "2026-12-02", "ws", Tally(5, 0, 500.0, 1, 1)),
        UsageRow("a", "2026-12-02", "http", Tally(1, 1, 100.0, 1, 0)),
    ]
    summed = summarize(rows)["a"]
    assert summed["characters"] == 16 and summed["cached_characters"] == 5
    assert summed["errors"] == 1 and summed["audio_seconds"] == 1.6
    doors = summed["doors"]
    assert isinstance(doors, dict) and doors["ws"]["requests"] == 2


# Reload


async def test_keys_added_and_revoked_in_the_file_take_effect_without_a_restart(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """A tenant added to the file speaks within a moment; one removed has its open
    WebSocket ended with key_revoked, and its key is refused."""
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}})
    server = await start_server(api_keys_file=path)
    url = f"ws://127.0.0.1:{server.port}/v1/stream"
    async with websockets.connect(url, additional_headers={"X-API-Key": ALPHA}) as ws:
        assert orjson.loads(await ws.recv())["type"] == "hello"
        write_keys(path, {"beta": {"key": BETA}})
        error = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert error["type"] == "error" and error["code"] == "key_revoked"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert (await DOORS["tts"](server, {"X-API-Key": BETA})).spoke
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).status == 401


async def test_a_revoked_key_ends_its_http_stream(
    start_server: ServerFactory, tmp_path: Path, fake: FakeEdge
) -> None:
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}, "beta": {"key": BETA}})
    server = await start_server(api_keys_file=path)
    fake.pause_after_chunks = 1
    speaking = asyncio.create_task(DOORS["tts"](server, {"X-API-Key": ALPHA}))
    await eventually(lambda: fake.paused.is_set(), what="the stream is under way")
    write_keys(path, {"beta": {"key": BETA}})
    outcome = await asyncio.wait_for(speaking, TIMEOUT)
    assert outcome.code == "truncated" or outcome.code == "key_revoked", outcome
    fake.resume.set()


async def test_a_broken_file_keeps_the_last_good_keys_and_shows_in_health(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}})
    server = await start_server(api_keys_file=path)
    path.write_text("[tenants.alpha\nthis is not toml")

    async def health() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.ops.port}/health") as response,
        ):
            body: dict[str, Any] = await response.json()
            return body

    async def says_why() -> bool:
        return (await health())["keys"]["last_error"] is not None

    for _ in range(int(TIMEOUT * 10)):
        if await says_why():
            break
        await asyncio.sleep(0.1)
    body = await health()
    assert body["status"] == "degraded" and "not valid TOML" in body["keys"]["last_error"]
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).spoke
    write_keys(path, {"alpha": {"key": ALPHA}, "beta": {"key": BETA}})
    await eventually(lambda: server.services.keys.error is None, what="the file is good again")
    assert (await health())["status"] == "healthy"
    assert (await DOORS["tts"](server, {"X-API-Key": BETA})).spoke


async def test_a_missing_file_stops_the_start(start_server: ServerFactory, tmp_path: Path) -> None:
    with pytest.raises(KeysFileError) as raised:
        await start_server(api_keys_file=tmp_path / "missing.toml")
    assert "cannot read" in str(raised.value)


async def test_tts_api_key_keeps_working_beside_the_file_with_the_per_ip_limits(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    path = write_keys(tmp_path / "keys.toml", {"webui": {"key": ALPHA, "requests": 100}})
    server = await start_server(api_keys=("plain-key",), api_keys_file=path, rate_limit_requests=2)
    assert (await DOORS["tts"](server, {"X-API-Key": "plain-key"})).spoke
    assert (await DOORS["tts"](server, {"X-API-Key": "plain-key"})).spoke
    assert (await DOORS["tts"](server, {"X-API-Key": "plain-key"})).status == 429
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).spoke
    assert usage_of(server, "default")["requests"] == 2


# A cluster


async def test_a_tenant_limit_and_quota_are_one_for_the_cluster(
    start_server: ServerFactory, tmp_path: Path, redis: RedisServer
) -> None:
    """Three instances on one Redis: a tenant's requests and characters are counted once
    for all of them, whichever instance each request reaches; its usage is one report."""
    path = write_keys(
        tmp_path / "keys.toml",
        {"webui": {"key": ALPHA, "requests": 4, "characters_per_day": 3 * len(TEXT)}},
    )
    servers = [await start_server(api_keys_file=path, redis_url=redis.url) for _ in range(3)]
    outcomes = [await DOORS["tts"](servers[n % 3], {"X-API-Key": ALPHA}) for n in range(4)]
    assert [o.spoke for o in outcomes[:3]] == [True] * 3
    assert outcomes[3].code == "quota_exceeded", outcomes[3]  # 3 texts spent the day's
    refused = await DOORS["tts"](servers[1], {"X-API-Key": ALPHA})
    assert refused.code == "rate_limited", refused  # 5 requests in the window of 4
    for server in servers:
        await server.services.usage.flush()
    report = await servers[2].services.usage.report("webui")
    tenants = report["tenants"]
    assert isinstance(tenants, dict)
    assert tenants["webui"]["characters"] == 3 * len(TEXT)
    assert tenants["webui"]["requests"] == 3


async def test_redis_away_each_instance_keeps_the_tenant_limits_alone(
    start_server: ServerFactory, tmp_path: Path, redis: RedisServer
) -> None:
    """Redis killed: a tenant still speaks and its quota still holds, decided by each
    instance alone (on the counts it last had); the usage not written shows in /health
    and is written once Redis is back."""
    path = write_keys(
        tmp_path / "keys.toml", {"webui": {"key": ALPHA, "characters_per_day": 2 * len(TEXT)}}
    )
    server = await start_server(api_keys_file=path, redis_url=redis.url)
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).spoke
    await server.services.usage.flush()
    await redis.stop()
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).spoke
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).code == "quota_exceeded"
    await server.services.usage.flush()
    assert server.services.usage.error is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.ops.port}/health") as response,
    ):
        health = await response.json()
    assert health["status"] == "degraded" and health["usage"]["last_error"]
    await redis.start()
    link = server.services.cluster
    assert link is not None
    await eventually(lambda: link.up, what="Redis is back")
    await server.services.usage.flush()
    assert server.services.usage.error is None
    # The Redis that came back is empty (no persistence here): it holds what was counted
    # while it was away, the second text (replayed from the cache).
    tenants = (await server.services.usage.report("webui"))["tenants"]
    assert isinstance(tenants, dict)
    assert tenants["webui"]["characters"] == len(TEXT) == tenants["webui"]["cached_characters"]


async def test_keys_changed_under_load_fail_no_request_that_should_pass(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """While clients speak without pause with alpha's key over HTTP and WebSocket, the file
    gains beta, rotates alpha (its old key kept for a grace period), and revokes beta:
    every one of alpha's requests is answered with audio, and the new keys work."""
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}})
    server = await start_server(api_keys_file=path, rate_limit_requests=0)
    keys = server.services.keys
    done = asyncio.Event()
    outcomes: list[bool] = []

    async def speaker(door: str) -> None:
        while not done.is_set():
            outcomes.append((await DOORS[door](server, {"X-API-Key": ALPHA})).spoke)

    speakers = [asyncio.create_task(speaker(door)) for door in ("tts", "v1", "openai", "tts")]

    async def reloaded_to(tenants: dict[str, dict[str, Any]]) -> None:
        before = len(outcomes)
        version = keys.table
        write_keys(path, tenants)
        await eventually(lambda: keys.table is not version, what="the file reloaded")
        await eventually(lambda: len(outcomes) >= before + 4, what="requests after it")

    new_alpha = "tts_alpha-new"
    grace = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await reloaded_to({"alpha": {"key": ALPHA}, "beta": {"key": BETA}})
    assert (await DOORS["tts"](server, {"X-API-Key": BETA})).spoke
    rotated = {"keys": [{"key": new_alpha}, {"key": ALPHA, "expires": grace}]}
    await reloaded_to({"alpha": rotated, "beta": {"key": BETA}})
    assert (await DOORS["v1"](server, {"X-API-Key": new_alpha})).spoke
    await reloaded_to({"alpha": rotated})
    assert (await DOORS["tts"](server, {"X-API-Key": BETA})).status == 401
    done.set()
    await asyncio.gather(*speakers)
    assert len(outcomes) >= 12 and all(outcomes), outcomes.count(False)


# What an independent review found (each would fail before its fix)


@doors
async def test_a_file_with_no_tenant_left_opens_nothing(
    door: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    """Revoking the last tenant leaves a file with none: no key, and the revoked one,
    open any door (keys stay required while API_KEYS_FILE is set)."""
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}})
    server = await start_server(api_keys_file=path)
    version = server.services.keys.table
    write_keys(path, {})
    await eventually(lambda: server.services.keys.table is not version, what="the reload")
    for headers in ({}, {"X-API-Key": ALPHA}):
        refused = await DOORS[door](server, headers)
        assert refused.status == 401 or refused.code == "unauthorized", refused


async def test_a_reload_that_changes_limits_keeps_counting_and_reaches_open_sockets(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """A tenant's new `requests` count the hits made before the reload, on connections
    opened before it too; its new `voices` hold on those connections."""
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA, "requests": 3}})
    server = await start_server(api_keys_file=path)
    url = f"ws://127.0.0.1:{server.port}/v1/stream"
    async with websockets.connect(url, additional_headers={"X-API-Key": ALPHA}) as ws:
        assert orjson.loads(await ws.recv())["type"] == "hello"  # the handshake: 1 hit
        version = server.services.keys.table
        write_keys(path, {"alpha": {"key": ALPHA, "requests": 4, "voices": ["de-*"]}})
        await eventually(lambda: server.services.keys.table is not version)
        speak = {"type": "speak", "id": "a", "text": TEXT, "voice": "en-US-AriaNeural"}
        await ws.send(orjson.dumps(speak).decode())
        refused = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert refused["code"] == "voice_not_allowed"  # a hit: 2
    outcomes = [await DOORS["tts"](server, {"X-API-Key": ALPHA}) for _ in range(3)]
    # 2 hits before the reload's new limit of 4: 2 more, then refused.
    assert [o.code for o in outcomes] == ["voice_not_allowed", "voice_not_allowed", "rate_limited"]
    assert outcomes[2].status == 429


async def test_a_usage_store_that_cannot_be_read_fails_no_speech(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """USAGE_DB where no file can be made: a tenant with a quota still speaks (counted
    from now), /health says why, GET /v1/usage answers 503 usage_unavailable."""
    (tmp_path / "not-a-directory").write_text("")
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA, "characters_per_day": 1000}})
    server = await start_server(
        api_keys_file=path, usage_db=tmp_path / "not-a-directory" / "usage.sqlite3"
    )
    assert (await DOORS["tts"](server, {"X-API-Key": ALPHA})).spoke
    assert (await DOORS["v1"](server, {"X-API-Key": ALPHA})).spoke
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"http://127.0.0.1:{server.port}/v1/usage", headers={"X-API-Key": ALPHA}
        ) as response:
            assert response.status == 503
            assert (await response.json())["error"] == "usage_unavailable"
        async with session.get(f"http://127.0.0.1:{server.ops.port}/health") as response:
            health = await response.json()
    assert health["status"] == "degraded" and "usage store" in health["usage"]["last_error"]


async def test_cluster_refunds_go_back_where_they_were_charged(
    tmp_path: Path, redis: RedisServer
) -> None:
    """A charge made in Redis is given back in Redis even if Redis was away meanwhile; one
    made alone while Redis was away is given back on this instance only: the cluster's
    count never goes below what was really spoken."""
    from ttsstream.cluster.link import RedisLink
    from ttsstream.cluster.usage import SharedUsage

    link = RedisLink(redis.url, prefix="t:", lease_seconds=15)
    await link.start()
    shared = SharedUsage(link)
    usage = Usage(shared, shared=shared)
    who = principal(characters_per_day=10)
    try:
        in_redis = await usage.charge(who, 5)
        assert in_redis is not None and in_redis.shared
        await redis.stop()
        await eventually(lambda: not link.up, what="the link down")
        alone = await usage.charge(who, 5)
        assert alone is not None and not alone.shared
        usage.refund(in_redis)  # kept until Redis is back
        await redis.start()
        await eventually(lambda: link.up, what="the link up")
        usage.refund(alone)  # this instance's only
        await eventually(lambda: not shared._unsent, what="the kept refund sent")
        await asyncio.gather(*([shared._sending] if shared._sending else []))
        # The Redis that came back is empty (no persistence here): the refund of a charge
        # it lost takes nothing below 0, so the day's 10 characters are all there, no more.
        assert await usage.charge(who, 10) is not None
        with pytest.raises(QuotaExceeded):
            await usage.charge(who, 1)
    finally:
        await usage.close()
        await link.aclose()


def test_a_window_must_be_finite() -> None:
    digest = "0" * 64
    for window in ("nan", "inf"):
        with pytest.raises(KeysFileError, match="window"):
            parse_tenants(f'[tenants.a]\nkeys = [{{ sha256 = "{digest}" }}]\nwindow = {window}\n')


async def test_a_key_in_both_tts_api_key_and_the_file_is_a_bad_file(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}})
    with pytest.raises(KeysFileError, match="TTS_API_KEY"):
        await start_server(api_keys=(ALPHA,), api_keys_file=path)


async def test_a_key_revoked_while_its_request_body_is_read_speaks_nothing(
    start_server: ServerFactory, tmp_path: Path, fake: FakeEdge
) -> None:
    path = write_keys(tmp_path / "keys.toml", {"alpha": {"key": ALPHA}, "beta": {"key": BETA}})
    server = await start_server(api_keys_file=path)
    body = orjson.dumps({"text": TEXT})
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            b"POST /tts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-API-Key: {ALPHA}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:5]
        )
        await writer.drain()
        await eventually(lambda: server.stats.snapshot()["total_requests"] == 1)
        version = server.services.keys.table
        write_keys(path, {"beta": {"key": BETA}})
        await eventually(lambda: server.services.keys.table is not version)
        writer.write(body[5:])
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 401"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = orjson.loads(await asyncio.wait_for(reader.readexactly(length), TIMEOUT))
        assert answer["error"] == "key_revoked"
    finally:
        writer.close()
        await writer.wait_closed()
    assert fake.records == []
