"""Cluster mode on a real Redis: instances share one rate limit, and Redis failing
fails no request.

Several servers run in this process against one ``redis-server`` started for the
test (persistence off); every client here is 127.0.0.1, so they all count in one
client's window.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_exceptions
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import (
    TIMEOUT,
    Client,
    ServerFactory,
    connected,
    connected_to,
    eventually,
    speaks_fine,
    url_of,
    wait_for_entries,
)
from tests.fake_edge import FakeEdge
from tests.processes import serve_process
from tests.redis_server import RedisServer, free_port
from ttsstream.server import Server

LIMIT = 10


async def side(server: Server, path: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.ops.port}{path}") as response,
    ):
        body: dict[str, Any] = orjson.loads(await response.read())
        return body


async def handshake_refusal(server: Server) -> InvalidStatus | None:
    """``None`` if a WebSocket handshake with ``server`` is admitted, else its refusal
    (a 429: the limits are what these tests refuse on)."""
    try:
        async with connect(url_of(server)) as ws:
            await ws.recv()
        return None
    except InvalidStatus as refusal:
        assert refusal.response.status_code == 429
        return refusal


def count_calls(link: Any, monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...]) -> list[str]:
    """From now on, the names of the methods in ``names`` that ask Redis through
    ``link``, in the order they ask."""
    asked: list[str] = []
    call = link.call

    async def counted(operation: Any, **kwargs: Any) -> Any:
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code.co_name not in names:
            frame = frame.f_back  # up to the method that asks
        if frame is not None:
            asked.append(frame.f_code.co_name)
        return await call(operation, **kwargs)

    monkeypatch.setattr(link, "call", counted)
    return asked


def hold_cache_writes(server: Server, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """From now on, ``server``'s cache writes (disk, then Redis) wait until the event
    returned is set."""
    store = server.services.speech.store
    assert store is not None
    may_write = asyncio.Event()
    put = store.put

    async def held_put(*args: Any) -> Any:
        await may_write.wait()
        return await put(*args)

    monkeypatch.setattr(store, "put", held_put)
    return may_write


#: Seconds allowed past a deadline the server keeps (a lease, a timeout) on a loaded
#: machine; a share of TIMEOUT, so that it scales with it.
SLACK = TIMEOUT * 0.4
#: A short REDIS_LEASE_SECONDS, for the tests of leases that lapse (1 s unscaled).
LEASE = TIMEOUT * 0.2


async def until(check: Any, timeout: float = TIMEOUT) -> None:
    """Wait until the coroutine function ``check`` returns true."""
    await eventually(check, timeout)


async def test_one_rate_limit_across_instances(
    start_server: ServerFactory, redis: RedisServer
) -> None:
    """RATE_LIMIT_REQUESTS=10 over three instances: exactly 10 handshakes, speaks and HTTP
    requests succeed together, whichever instance each reaches; the others are told
    when to come back."""
    servers = [
        await start_server(
            redis_url=redis.url, rate_limit_requests=LIMIT, max_connections_per_ip=100
        )
        for _ in range(3)
    ]
    refusals: list[int] = []

    async def handshake(server: Server) -> bool:
        refused = await handshake_refusal(server)
        if refused is not None:
            refusals.append(int(refused.response.headers["Retry-After"]))
        return refused is None

    async def http(server: Server) -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/v1/models") as response,
        ):
            if response.status == 429:
                refusals.append(int(response.headers["Retry-After"]))
            return response.status == 200

    admitted = 0
    async with (
        connected(servers[0]) as first,
        connected(servers[1]) as second,
        connected(servers[2]) as third,
    ):
        admitted += 3  # three handshakes
        clients = [first, second, third]
        for number in range(27):
            kind = number % 3
            if kind == 0:
                client = clients[number // 3 % 3]
                await client.speak("Hi.", id=f"s{number}")
                final = (await client.until_final(f"s{number}")).final
                if final["type"] == "error":
                    assert final["code"] == "rate_limited"
                    refusals.append(final["retry_after"])
                admitted += final["type"] == "end"
            elif kind == 1:
                admitted += await http(servers[number // 3 % 3])
            else:
                admitted += await handshake(servers[number // 3 % 3])
    assert admitted == LIMIT
    assert len(refusals) == 30 - LIMIT
    assert all(1 <= wait <= 60 for wait in refusals)
    health = await side(servers[0], "/health")
    assert health["cluster"] == "redis" and health["redis"]["state"] == "up"


async def test_instances_hold_leases_and_a_dead_one_lapses(
    start_server: ServerFactory, redis: RedisServer
) -> None:
    """Each instance counts the live ones; one that stops renewing (killed) stops counting
    within REDIS_LEASE_SECONDS."""
    servers = [await start_server(redis_url=redis.url, redis_lease_seconds=LEASE) for _ in range(3)]

    async def live(count: int) -> bool:
        return bool((await side(servers[0], "/health"))["redis"]["instances"] == count)

    await until(lambda: live(3))

    async def counted_by_another() -> bool:
        stats = await side(servers[1], "/stats")
        return bool(stats["cluster"] == "redis" and stats["redis"]["instances"] == 3)

    await until(counted_by_another)  # at its next renewal
    # As after kill -9: the lease is not given back, only no longer renewed.
    link = servers[2].services.cluster
    assert link is not None and link._keeper is not None
    link._keeper.cancel()
    await until(lambda: live(2), timeout=LEASE + SLACK)


async def test_redis_failing_fails_no_request_and_shared_mode_comes_back(
    start_server: ServerFactory, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis killed: speaking goes on under the instance's own limits, /health says
    degraded (once in the log); Redis back: shared mode resumes within 5 s by itself."""
    server = await start_server(redis_url=redis.url)
    assert (await side(server, "/health"))["status"] == "healthy"
    await redis.stop()
    async with connected(server) as client:
        for number in range(5):
            await speaks_fine(client, id=f"down{number}")
    health = await side(server, "/health")
    assert health["status"] == "degraded"
    assert health["redis"]["state"] == "down" and health["redis"]["error"]
    downs = [r for r in caplog.records if r.getMessage().startswith("redis: down")]
    assert len(downs) == 1

    await redis.start()

    async def back() -> bool:
        return bool((await side(server, "/health"))["redis"]["state"] == "up")

    await until(back)
    assert (await side(server, "/health"))["status"] == "healthy"
    async with connected(server) as client:
        await speaks_fine(client)


@pytest.mark.parametrize("problem", ["wrong password", "nothing listening"])
async def test_a_bad_redis_at_start_is_one_warning_and_one_instance(
    start_server: ServerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    problem: str,
) -> None:
    """A wrong password or an unreachable Redis: the server starts, warns once, speaks
    alone; the password is in no log line, no /stats, no /health."""
    caplog.set_level(logging.INFO)
    guarded = RedisServer(tmp_path, password="the-right-one")
    await guarded.start()
    try:
        port = guarded.port if problem == "wrong password" else free_port()
        url = f"redis://:s3cret-wrong-pw@127.0.0.1:{port}/0"
        server = await start_server(redis_url=url)
        async with connected(server) as client:
            await speaks_fine(client)
        downs = [r for r in caplog.records if r.getMessage().startswith("redis: down")]
        assert len(downs) == 1, [r.getMessage() for r in caplog.records]
        for body in (await side(server, "/stats"), await side(server, "/health")):
            assert body["redis"]["state"] == "down"
            assert "s3cret-wrong-pw" not in orjson.dumps(body).decode()
        assert "s3cret-wrong-pw" not in caplog.text
        assert (await side(server, "/health"))["status"] == "degraded"
    finally:
        await guarded.stop()


async def test_connection_caps_count_every_instance_and_a_dead_ones_lapse(
    start_server: ServerFactory, redis: RedisServer
) -> None:
    """MAX_CONNECTIONS_PER_IP=2 over three instances: a third connection anywhere is
    refused; one closing frees a place; an instance that dies holding one (no renewal,
    as after kill -9) frees its place within its lease. HTTP streams count as well."""
    servers = [
        await start_server(redis_url=redis.url, max_connections_per_ip=2, redis_lease_seconds=LEASE)
        for _ in range(3)
    ]

    async def refused(server: Server) -> bool:
        return await handshake_refusal(server) is not None

    async with connected(servers[0]):
        async with connected(servers[1]):
            assert await refused(servers[2])
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{servers[2].port}/v1/models") as response,
            ):
                assert response.status == 429
                assert (await response.json())["error"]["code"] == "too_many_connections"

        async def free_again() -> bool:
            return not await refused(servers[2])

        await until(free_again)  # the closed connection's place, told in the background
        # servers[0] dies holding its connection: its count lapses with its lease.
        async with connected(servers[1]):
            assert await refused(servers[2])
            link = servers[0].services.cluster
            assert link is not None and link._keeper is not None
            link._keeper.cancel()
            await until(free_again, timeout=LEASE + SLACK)


async def test_a_text_made_on_one_instance_is_a_hit_on_another(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, tmp_path: Path
) -> None:
    """Each instance has its own disk; an entry made on A is replayed on C from Redis
    (``cached: true``, the same bytes and words), then kept on C's disk too."""
    first_server = await start_server(redis_url=redis.url, cache_dir=tmp_path / "a")
    other = await start_server(redis_url=redis.url, cache_dir=tmp_path / "c")
    async with connected(first_server) as client:
        await client.speak("Made once, heard everywhere.", id="a", words="batch")
        made = await client.until_final("a")
    assert made.final["type"] == "end" and made.messages[0]["cached"] is False
    shared = aioredis.from_url(redis.url)
    try:

        async def stored() -> bool:
            return len(await shared.keys("ttsstream:entry:*")) == 1

        await until(stored)
        # The same bytes as on the disk, checksum and all.
        (name,) = await shared.keys("ttsstream:entry:*")
        on_disk = [path for path in (tmp_path / "a").rglob("*") if path.is_file()]
        assert [path.read_bytes() for path in on_disk] == [await shared.get(name)]
    finally:
        await shared.aclose()
    async with connected(other) as client:
        await client.speak("Made once, heard everywhere.", id="c", words="batch")
        replayed = await client.until_final("c")
    assert replayed.messages[0]["cached"] is True
    assert bytes(replayed.audio) == bytes(made.audio)
    assert replayed.batched_words == made.batched_words
    assert len(fake.records) == 1
    await wait_for_entries(other, 1)


async def test_a_whole_flight_is_settled_with_its_entry_in_one_call(
    start_server: ServerFactory,
    redis: RedisServer,
    fake: FakeEdge,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flight that ends whole keeps its lock until its entry is written: then one
    round trip stores the entry and gives the lock back. In between, the same text asked
    on another instance joins the finished flight (its stream written out on
    request), the same bytes and words, no second synthesis."""
    owner = await start_server(redis_url=redis.url, cache_dir=tmp_path / "a")
    other = await start_server(redis_url=redis.url, cache_dir=tmp_path / "b")
    link = owner.services.cluster
    assert link is not None
    asked = count_calls(link, monkeypatch, ("find_or_claim", "_settle_all", "_store", "claim"))
    may_write = hold_cache_writes(owner, monkeypatch)
    text = "Settled with its entry, in one call."
    shared = aioredis.from_url(redis.url)
    try:
        async with connected(owner) as client:
            await client.speak(text, id="a", words="batch")
            made = await client.until_final("a")
        assert made.final["type"] == "end"
        (lock,) = await shared.keys("ttsstream:flight:*")
        assert await shared.get(lock) == link.instance.encode()  # held: not yet settled
        assert not await shared.keys("ttsstream:entry:*")
        async with connected(other) as client:
            await client.speak(text, id="b", words="batch")
            joined = await client.until_final("b")
        assert joined.final["type"] == "end" and joined.messages[0]["cached"] is False
        assert bytes(joined.audio) == bytes(made.audio)
        assert joined.batched_words == made.batched_words
        assert len(fake.records) == 1
        may_write.set()

        async def settled() -> bool:
            return (
                not await shared.exists(lock) and len(await shared.keys("ttsstream:entry:*")) == 1
            )

        await until(settled)
        assert asked == ["find_or_claim", "_settle_all"]
    finally:
        await shared.aclose()


async def test_flights_that_end_together_are_settled_by_one_call_and_one_script(
    start_server: ServerFactory,
    redis: RedisServer,
    fake: FakeEdge,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flights whose entries are written within the settle delay go to Redis together:
    one call stores every entry and one script gives back every lock, and only the
    locks that are still the instance's."""
    server = await start_server(redis_url=redis.url)
    link = server.services.cluster
    assert link is not None
    asked = count_calls(link, monkeypatch, ("_settle_all",))
    may_write = hold_cache_writes(server, monkeypatch)
    shared = aioredis.from_url(redis.url)
    texts = [f"Settled together, {n}." for n in range(3)]
    try:
        async with connected(server) as client:
            for n, text in enumerate(texts):
                await client.speak(text, id=str(n))
                assert (await client.until_final(str(n))).final["type"] == "end"
        locks = sorted(await shared.keys("ttsstream:flight:*"))
        assert len(locks) == 3
        # One lock taken over meanwhile (its lease lapsed, another instance took it).
        await shared.set(locks[0], "another-instance")
        scripts = (await shared.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
        may_write.set()

        async def settled() -> bool:
            return len(await shared.keys("ttsstream:entry:*")) == 3

        await until(settled)
        assert asked == ["_settle_all"]
        stats = await shared.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == scripts + 1
        assert await shared.keys("ttsstream:flight:*") == [locks[0]]
        assert await shared.get(locks[0]) == b"another-instance"
    finally:
        await shared.aclose()
    assert len(fake.records) == 3


async def test_a_flight_that_fails_is_given_back_at_once(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, tmp_path: Path
) -> None:
    """An owner's synthesis that breaks after its first audio ends its joiner on another
    instance with the same error, after the audio they shared, and gives its lock back
    at once (not at the end of a lease): the text is then spoken anew, whole."""
    fake.pause_after_chunks = fake.drop_after_chunks = 2
    owner = await start_server(redis_url=redis.url, cache_dir=tmp_path / "a")
    other = await start_server(redis_url=redis.url, cache_dir=tmp_path / "b")
    text = "Broken halfway, for everyone who heard it."
    shared = aioredis.from_url(redis.url)
    try:
        async with connected(owner) as speaker, connected(other) as listener:
            await speaker.speak(text, id="a")
            await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
            await listener.speak(text, id="b")
            while not listener.so_far("b").audio:
                await listener.read_one()
            fake.resume.set()
            first, second = await speaker.until_final("a"), await listener.until_final("b")
        assert first.final["code"] == second.final["code"] == "upstream_unavailable"
        assert bytes(second.audio) == bytes(first.audio)

        async def given_back() -> bool:
            return not await shared.keys("ttsstream:flight:*")

        await until(given_back, timeout=SLACK)  # the lease is 15 s
        fake.pause_after_chunks = fake.drop_after_chunks = None
        async with connected(other) as client:
            await client.speak(text, id="c")
            again = await client.until_final("c")
        assert again.final["type"] == "end" and again.messages[0]["cached"] is False
        assert len(fake.records) == 2
    finally:
        await shared.aclose()


async def test_a_joiner_whose_flight_was_stored_meanwhile_replays_it(
    start_server: ServerFactory,
    redis: RedisServer,
    fake: FakeEdge,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A joiner that found the flight's lock, but whose ask the owner missed, and then
    sees the lock go because the flight was settled (its entry stored), replays the
    entry: no second synthesis."""
    from ttsstream.cluster.flights import SharedFlights

    monkeypatch.setattr(SharedFlights, "_on_want", lambda self, data: None)  # asks missed
    owner = await start_server(redis_url=redis.url, cache_dir=tmp_path / "a")
    other = await start_server(redis_url=redis.url, cache_dir=tmp_path / "b")
    may_write = hold_cache_writes(owner, monkeypatch)
    text = "Stored while its joiner waited."
    async with connected(owner) as client:
        await client.speak(text, id="a", words="batch")
        made = await client.until_final("a")
    async with connected(other) as client:
        await client.speak(text, id="b", words="batch")
        # Joined: reading a stream nobody writes.
        await eventually(lambda: other.stats.coalesced, what="b joined the flight")
        may_write.set()
        replayed = await client.until_final("b")
    assert replayed.final["type"] == "end" and replayed.messages[0]["cached"] is True
    assert bytes(replayed.audio) == bytes(made.audio)
    assert replayed.batched_words == made.batched_words
    assert len(fake.records) == 1


async def test_the_http_door_shares_flights_and_entries_over_the_cluster(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, tmp_path: Path
) -> None:
    """Over HTTP as over the WebSocket: the same text posted to two instances at once is
    one synthesis, the second instance's response streaming while the upstream is
    paused mid-utterance; a third instance with an empty disk answers it from Redis
    (``X-TTS-Cache: hit``), the same bytes."""
    fake.pause_after_chunks = 3
    servers = [
        await start_server(redis_url=redis.url, cache_dir=tmp_path / f"c{number}")
        for number in range(3)
    ]
    text = {"text": "Posted twice, made once."}
    async with aiohttp.ClientSession() as session:
        first = await session.post(f"http://127.0.0.1:{servers[0].port}/tts", json=text)
        assert first.headers["X-TTS-Cache"] == "miss"
        second = await asyncio.wait_for(
            session.post(f"http://127.0.0.1:{servers[1].port}/tts", json=text), TIMEOUT
        )
        assert fake.paused.is_set() and not fake.records[0].completed  # joined live
        fake.resume.set()
        bodies = [await response.read() for response in (first, second)]
        assert bodies[0] == bodies[1] == bytes(fake.records[0].audio)
        shared = aioredis.from_url(redis.url)
        try:
            await until(lambda: _stored(shared))
        finally:
            await shared.aclose()
        async with session.get(f"http://127.0.0.1:{servers[2].port}/tts", params=text) as replayed:
            assert replayed.headers["X-TTS-Cache"] == "hit"
            assert await replayed.read() == bodies[0]
    assert len(fake.records) == 1


async def _stored(client: Any) -> bool:
    return bool(await client.keys("ttsstream:entry:*"))


async def test_the_upstream_cap_holds_over_the_cluster(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, tmp_path: Path
) -> None:
    """UPSTREAM_CONCURRENCY=2 over three instances: six connections speaking different
    texts at once, two on each instance, never hold more than two Edge syntheses
    together; all twelve texts are spoken."""
    fake.first_audio_delay = 0.3
    servers = [
        await start_server(
            redis_url=redis.url, upstream_concurrency=2, cache_dir=tmp_path / f"c{number}"
        )
        for number in range(3)
    ]

    async def speak_twice(server: Server, number: int) -> list[str]:
        async with connected(server) as client:
            for turn in range(2):
                await client.speak(f"Text number {number} turn {turn}.", id=f"u{turn}")
            return [(await client.until_final(f"u{turn}")).final["type"] for turn in range(2)]

    # One connection speaks its utterances one after another: two connections each.
    outcomes = await asyncio.gather(
        *(speak_twice(server, number) for number in range(6) for server in [servers[number % 3]])
    )
    assert all(outcome == ["end", "end"] for outcome in outcomes)
    assert len(fake.records) == 12
    assert fake.max_active == 2


async def test_one_synthesis_per_text_over_the_cluster_and_live(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, tmp_path: Path
) -> None:
    """30 identical requests spread over 3 instances at once: the upstream sees one
    synthesis; every client gets its first audio while the upstream is still paused
    mid-utterance (live, not a replay after the end), and the same bytes and words."""
    fake.pause_after_chunks = 3
    servers = [
        await start_server(
            redis_url=redis.url, max_connections_per_ip=100, cache_dir=tmp_path / f"c{number}"
        )
        for number in range(3)
    ]
    text = "Thirty listeners, three instances, one synthesis."
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connected(servers[number % 3])) for number in range(30)
        ]
        for client in clients:
            await client.speak(text, id="same", words="batch")

        async def first_audio(client: Client) -> None:
            while not client.so_far("same").audio:
                await client.read_one()

        await asyncio.wait_for(asyncio.gather(*map(first_audio, clients)), TIMEOUT)
        assert fake.paused.is_set() and not fake.records[0].completed
        fake.resume.set()
        results = await asyncio.gather(*(client.until_final("same") for client in clients))
    assert len(fake.records) == 1
    audio = bytes(fake.records[0].audio)
    assert all(result.final["type"] == "end" for result in results)
    assert all(bytes(result.audio) == audio for result in results)
    assert all(result.batched_words == results[0].batched_words for result in results)
    assert len(results[0].batched_words) == len(text.split())


async def test_an_owner_killed_mid_flight_leaves_no_one_hanging(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, tmp_path: Path
) -> None:
    """The instance speaking a text is killed (-9) mid-utterance: a listener on another
    instance that had its audio ends with upstream_unavailable (partial), in time; a
    request after that gets the whole text from a new synthesis, never mixed audio."""
    fake.pause_after_chunks = 3
    owner, owner_url, _ = await serve_process(
        fake,
        tmp_path,
        REDIS_URL=redis.url,
        REDIS_LEASE_SECONDS=str(LEASE),
        UPSTREAM_TIMEOUT=str(LEASE * 3),
        CACHE_DIR=str(tmp_path / "owner"),
    )
    other = await start_server(
        redis_url=redis.url,
        redis_lease_seconds=LEASE,
        upstream_timeout=LEASE * 3,
        cache_dir=tmp_path / "o",
    )
    text = "Spoken by an instance that will not live to finish it."
    try:
        async with connected_to(owner_url) as speaker, connected(other) as listener:
            await speaker.speak(text, id="a")
            while not speaker.so_far("a").audio:
                await speaker.read_one()
            await listener.speak(text, id="b")
            while not listener.so_far("b").audio:
                await listener.read_one()
            owner.kill()
            await owner.wait()
            started = asyncio.get_running_loop().time()
            ended = (await listener.until_final("b")).final
            assert ended["code"] == "upstream_unavailable" and ended["partial"] is True
            assert asyncio.get_running_loop().time() - started < LEASE * 3 + SLACK
            fake.pause_after_chunks = None
            await listener.speak(text, id="c")
            again = await listener.until_final("c")
        assert again.final["type"] == "end"
        assert len(fake.records) == 2
        assert bytes(again.audio) == bytes(fake.records[1].audio)
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()


async def test_redis_killed_under_load_fails_no_utterance(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, tmp_path: Path
) -> None:
    """50 clients over 2 instances keep speaking while Redis is killed and restarted:
    every utterance ends well, and both instances are back in shared mode within 5 s."""
    servers = [
        await start_server(
            redis_url=redis.url,
            rate_limit_requests=0,
            max_connections_per_ip=100,
            cache_dir=tmp_path / f"c{number}",
        )
        for number in range(2)
    ]
    outcomes: list[str] = []

    async def speak(client: Client, number: int, turn: int) -> None:
        id = f"t{turn}"
        await client.speak(f"Client {number} says turn {turn}.", id=id)
        outcomes.append((await client.until_final(id)).final["type"])

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connected(servers[number % 2])) for number in range(50)
        ]

        async def turn(number: int) -> None:
            await asyncio.gather(*(speak(c, n, number) for n, c in enumerate(clients)))

        await turn(0)
        await asyncio.gather(turn(1), redis.stop())
        await turn(2)
        await redis.start()
        await turn(3)

        async def both_up() -> bool:
            states = [(await side(server, "/health"))["redis"]["state"] for server in servers]
            return states == ["up", "up"]

        await until(both_up)
        await turn(4)
    assert outcomes == ["end"] * 250


async def test_a_flight_longer_than_a_lease_is_still_one(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, tmp_path: Path
) -> None:
    """An owner's synthesis that outlasts REDIS_LEASE_SECONDS keeps its lock: the same
    text asked on another instance then joins it instead of calling Microsoft again."""
    fake.pause_after_chunks = 2
    owner, other = [
        await start_server(
            redis_url=redis.url, redis_lease_seconds=LEASE, cache_dir=tmp_path / f"c{number}"
        )
        for number in range(2)
    ]
    text = "A long text, spoken for longer than a lease."
    async with connected(owner) as speaker, connected(other) as listener:
        await speaker.speak(text, id="a")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await asyncio.sleep(LEASE * 1.5)  # longer than the lease
        await listener.speak(text, id="b")
        while not listener.so_far("b").audio:
            await listener.read_one()
        fake.resume.set()
        first, second = await speaker.until_final("a"), await listener.until_final("b")
    assert first.final["type"] == second.final["type"] == "end"
    assert len(fake.records) == 1
    assert bytes(second.audio) == bytes(first.audio)


async def test_a_shared_lookup_finds_the_entry_or_claims_the_flight_at_once(
    redis: RedisServer,
) -> None:
    """A miss on disk asks Redis once: the stored entry (and no flight lock taken), or
    the flight's claim (this instance's, or another's). A damaged entry is a miss,
    and the flight is claimed after all. With a request's rate-limit hit in the same
    script, a hit over the limit looks nothing up and claims nothing."""
    from ttsstream.cache.store import CacheEntry
    from ttsstream.cluster.cache import SharedEntries
    from ttsstream.cluster.flights import SharedFlights
    from ttsstream.cluster.link import RedisLink
    from ttsstream.cluster.ratelimit import SharedWindow
    from ttsstream.engines.base import WordEvent

    links = [RedisLink(redis.url, prefix="lookup:", lease_seconds=15) for _ in range(2)]
    flights = [SharedFlights(link, timeout=5) for link in links]
    tiers = [
        SharedEntries(link, ttl=60, flights=flight, window=SharedWindow(link))
        for link, flight in zip(links, flights, strict=True)
    ]
    for link in links:
        await link.start()
    client = aioredis.from_url(redis.url)
    try:
        assert await tiers[0].find_or_claim("new-text") == (None, True)
        assert await tiers[1].find_or_claim("new-text") == (None, False)  # owned by the first
        entry = CacheEntry(
            engine="edge",
            voice="en-US-AvaNeural",
            audio=b"\xff\xf3" * 500,
            words=(WordEvent("Stored", 50.0, 300.0, 0, 6),),
        )
        tiers[0].put("stored-text", entry)
        await until(lambda: client.exists("lookup:entry:stored-text"))
        assert await tiers[1].find_or_claim("stored-text") == (entry, None)
        assert not await client.exists("lookup:flight:stored-text")  # no lock taken
        await client.set("lookup:entry:damaged-text", b"not an entry")
        assert await tiers[1].find_or_claim("damaged-text") == (None, True)
        assert await client.get("lookup:flight:damaged-text") == links[1].instance.encode()
        # Two requests a minute from this IP: the third is refused, with no claim.
        ask = tiers[0].hit_then_find_or_claim
        assert await ask("192.0.2.7", 2, 60.0, "first-text") == (None, None, True)
        assert await ask("192.0.2.7", 2, 60.0, "stored-text") == (None, entry, None)
        assert await ask("192.0.2.7", 2, 60.0, "third-text") == (60, None, None)
        assert not await client.exists("lookup:flight:third-text")
        assert await tiers[1].hit_then_find_or_claim("192.0.2.8", 2, 60.0, "first-text") == (
            None,
            None,
            False,
        )
    finally:
        await client.aclose()
        for link in links:
            await link.aclose()


async def test_a_connection_is_admitted_in_one_round_trip(
    start_server: ServerFactory, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cluster, admitting a WebSocket or an HTTP request (its rate limit and its
    connection caps) asks Redis once; one refused for its key is counted once too,
    and takes no connection."""
    server = await start_server(redis_url=redis.url, api_keys=("k" * 32,))
    link = server.services.cluster
    assert link is not None
    asked = count_calls(link, monkeypatch, ("hit", "acquire", "hit_and_acquire"))
    async with connect(url_of(server), additional_headers={"X-API-Key": "k" * 32}) as ws:
        await ws.recv()
        assert asked == ["hit_and_acquire"]
        assert server.services.admission.connections.total == 1
    asked.clear()
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url_of(server), additional_headers={"X-API-Key": "wrong"}):
            pass
    assert refused.value.response.status_code == 401
    assert asked == ["hit"]
    asked.clear()
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            url_of(server).replace("ws://", "http://").replace("/v1/stream", "/v1/models"),
            headers={"X-API-Key": "k" * 32},
        ) as response,
    ):
        assert response.status == 200
    assert asked == ["hit_and_acquire"]


async def test_a_speak_that_plays_at_once_asks_redis_once_before_its_upstream(
    start_server: ServerFactory, redis: RedisServer, fake: FakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a cluster, a new text spoken at once is counted in the rate window and looked
    up in the shared tier (its flight claimed) by one script; a speak queued behind
    another asks twice (its lookup waits for its turn). A speak refused after that
    round trip gives back the flight it claimed."""
    from ttsstream.engines.base import SynthesisRequest

    server = await start_server(redis_url=redis.url)
    link = server.services.cluster
    assert link is not None
    shared = aioredis.from_url(redis.url)
    try:
        async with connected(server) as client:
            asked = count_calls(link, monkeypatch, ("hit", "find_or_claim", "claim"))
            await client.speak("Asked once, with its rate limit.", id="a")
            assert (await client.until_final("a")).final["type"] == "end"
            assert asked == ["find_or_claim"]
            await client.speak("Played at once.", id="b")
            await client.speak("Queued behind it.", id="c")
            assert (await client.until_final("b")).final["type"] == "end"
            assert (await client.until_final("c")).final["type"] == "end"
            assert asked == ["find_or_claim", "find_or_claim", "hit", "find_or_claim"]
            # Every request was counted in the cluster's window: the handshake, 3 speaks.
            (window,) = await shared.keys("ttsstream:rate:*")
            assert await shared.zcard(window) == 4

            asked.clear()
            text, voice = "Refused for its voice.", "xx-XX-NobodyNeural"
            await client.speak(text, id="d", voice=voice)
            refused = await client.until_final("d")
            assert refused.final["code"] == "invalid_voice"
            assert asked == ["find_or_claim"]  # the flight was claimed with the rate limit…
            key = server.services.speech.key_of(SynthesisRequest(text=text, voice=voice))

            async def given_back() -> bool:
                return not await shared.exists(f"ttsstream:flight:{key}")

            await until(given_back)  # …and given back, long before its lease ends
            assert await shared.zcard(window) == 5
    finally:
        await shared.aclose()
    assert len(fake.records) == 3


async def test_a_permit_given_back_is_taken_at_once_on_any_instance(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one permit for the cluster, a waiter gets it as soon as it is given back,
    by the same instance or another (the release is announced), not at its next
    recheck (made an hour here); waiters on one instance get it in their order."""
    from ttsstream.cluster import slots as slots_module
    from ttsstream.cluster.link import RedisLink
    from ttsstream.cluster.slots import SharedSlots

    monkeypatch.setattr(slots_module, "RECHECK", 3600.0)
    links = [RedisLink(redis.url, prefix="slots-test:", lease_seconds=15) for _ in range(2)]
    here, there = (SharedSlots(link, 1) for link in links)
    for link in links:
        await link.start()
    try:
        await until(lambda: _subscribed(redis.url, 2))
        held = await here.take()
        assert held is not None
        got: list[str] = []

        async def wait(slots: SharedSlots, name: str) -> str | None:
            permit = await slots.take()
            got.append(name)
            return permit

        first = asyncio.create_task(wait(there, "there"))  # another instance
        await asyncio.sleep(0.2)
        assert not first.done()  # the cluster is full
        here.release(held)
        async with asyncio.timeout(TIMEOUT):
            other = await first
        assert other is not None and got == ["there"]
        # Two waiters on one instance, the permit given back by another.
        second = asyncio.create_task(wait(here, "here-1"))
        third = asyncio.create_task(wait(here, "here-2"))
        await asyncio.sleep(0.2)
        assert not second.done() and not third.done()
        there.release(other)
        async with asyncio.timeout(TIMEOUT):
            after = await second
        assert after is not None and got == ["there", "here-1"]
        await asyncio.sleep(0.2)
        assert not third.done()
        here.release(after)  # and by the same instance
        async with asyncio.timeout(TIMEOUT):
            last = await third
        assert last is not None and got == ["there", "here-1", "here-2"]
        here.release(last)
    finally:
        for link in links:
            await link.aclose()


async def test_permits_held_longer_than_a_lease_still_count(redis: RedisServer) -> None:
    """Every permit an instance holds, spares too, is renewed while held (together,
    in one call): held for three leases, they still count against the cap."""
    from ttsstream.cluster.link import RedisLink
    from ttsstream.cluster.slots import SharedSlots

    lease = TIMEOUT * 0.12  # renewed in time on a loaded machine too
    links = [RedisLink(redis.url, prefix="renewed:", lease_seconds=lease) for _ in range(2)]
    here, there = SharedSlots(links[0], 8), SharedSlots(links[1], 8)  # two spares at most
    for link in links:
        await link.start()
    client = aioredis.from_url(redis.url)
    try:
        held, spare = await here.take(), await here.take()
        assert held is not None and spare is not None
        here.release(spare)  # kept as a spare: still held
        await asyncio.sleep(lease * 3)
        assert await client.zcard("renewed:upstream") == 2
        theirs = [await there.take() for _ in range(7)]  # the seventh gets the spare
        assert None not in theirs and await client.zcard("renewed:upstream") == 8
        waiting = asyncio.ensure_future(there.take())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # the held permit still counts
        here.release(held)
        async with asyncio.timeout(TIMEOUT):
            assert await waiting is not None
    finally:
        await client.aclose()
        for link in links:
            await link.aclose()


async def test_spare_permits_skip_redis_and_go_back_when_wanted(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the cluster is far from its cap, a permit given back stays with its
    instance as a spare: the next take makes no call to Redis. The spare still
    counts: an instance that finds the cluster full gets it at once (announced, not
    at a recheck, made an hour here). Spares unused go back after SPARE_IDLE, and
    when the link closes."""
    from ttsstream.cluster import slots as slots_module
    from ttsstream.cluster.link import RedisLink
    from ttsstream.cluster.slots import SharedSlots

    monkeypatch.setattr(slots_module, "RECHECK", 3600.0)
    links = [RedisLink(redis.url, prefix="spares:", lease_seconds=15) for _ in range(2)]
    here, there = (SharedSlots(link, 8) for link in links)  # two spares at most
    for link in links:
        await link.start()
    client = aioredis.from_url(redis.url)

    async def held() -> int:
        return int(await client.zcard("spares:upstream"))

    calls = 0
    call = links[0].call

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await call(*args, **kwargs)

    try:
        await until(lambda: _subscribed(redis.url, 2, "spares:upstream-wanted"))
        first = await here.take()
        assert first is not None
        here.release(first)
        await asyncio.sleep(0.1)
        assert await held() == 1  # kept as a spare
        monkeypatch.setattr(links[0], "call", counted)
        again = await here.take()
        assert again == first and calls == 0  # no round trip
        here.release(again)
        # The other instance fills the cluster: the spare is the eighth place.
        theirs = [await there.take() for _ in range(7)]
        assert None not in theirs and await held() == 8
        async with asyncio.timeout(TIMEOUT):
            last = await there.take()  # full: asks for spares, which come back at once
        assert last is not None and last not in theirs and await held() == 8
        for permit in [*theirs, last]:
            assert permit is not None
            there.release(permit)  # the cluster was full: nothing kept
        await until(lambda: _count(client, 0))
        # A spare unused goes back by itself.
        monkeypatch.setattr(slots_module, "SPARE_IDLE", 0.2)
        before = calls
        spare = await here.take()
        assert spare is not None and calls == before + 1  # no spare left: asked Redis
        here.release(spare)
        assert await held() == 1
        await until(lambda: _count(client, 0))
        # And when the link closes.
        monkeypatch.setattr(slots_module, "SPARE_IDLE", 3600.0)
        spare = await here.take()
        assert spare is not None
        here.release(spare)
        assert await held() == 1
        await links[0].aclose()
        assert await held() == 0
    finally:
        await client.aclose()
        for link in links:
            await link.aclose()


async def _count(client: Any, expected: int) -> bool:
    return int(await client.zcard("spares:upstream")) == expected


async def _blocked(url: str) -> bool:
    """Whether a client of the Redis at ``url`` waits in a blocking command."""
    client = aioredis.from_url(url)
    try:
        return bool((await client.info("clients"))["blocked_clients"])
    finally:
        await client.aclose()


async def _subscribed(url: str, count: int, channel: str = "slots-test:upstream-freed") -> bool:
    client = aioredis.from_url(url)
    try:
        numbers = await client.pubsub_numsub(channel)
        return bool(numbers and numbers[0][1] >= count)
    finally:
        await client.aclose()


#: A script that keeps Redis busy for half a second (nothing else runs meanwhile).
_BUSY = """
local t = redis.call('TIME')
local began = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - began > 500000
return 1
"""


async def test_a_permit_or_lock_taken_past_its_deadline_is_given_back(
    redis: RedisServer,
) -> None:
    """Redis busy past an operation's deadline: the instance goes alone (None), but
    the permit or flight lock its script took once Redis got to it is given back,
    so the cluster does not lose that place until a lease runs out (15 s); and the
    links close at once afterwards."""
    from ttsstream.cluster.flights import SharedFlights
    from ttsstream.cluster.link import RedisLink
    from ttsstream.cluster.slots import SharedSlots

    links = [RedisLink(redis.url, prefix="late:", lease_seconds=15) for _ in range(2)]
    slots = [SharedSlots(link, 1) for link in links]
    flights = [SharedFlights(link, timeout=5) for link in links]
    for link in links:
        await link.start()
    busy = aioredis.from_url(redis.url)

    async def while_redis_is_busy(operation: Any) -> Any:
        # Connections ready (a new one's handshake would time out before the
        # operation is sent), then the operation, sent but answered too late.
        await asyncio.gather(*(links[0].call(lambda c: c.ping()) for _ in range(3)))
        hold = asyncio.ensure_future(busy.eval(_BUSY, 0))
        await asyncio.sleep(0.05)
        outcome = await operation
        await hold
        return outcome

    try:
        # Connected: the busy script then goes out in the loop's next turns, ahead of the
        # operation sent after a sleep, however late the sleep ends on a loaded machine.
        await busy.ping()
        warm = await slots[0].take()  # the script is loaded: the next take sends it at once
        assert warm is not None
        slots[0].release(warm)
        assert await while_redis_is_busy(slots[0].take()) is None  # decided alone
        async with asyncio.timeout(SLACK):
            assert await slots[1].take() is not None
        assert await while_redis_is_busy(flights[0].claim("some-text")) is None
        await eventually(lambda: flights[1].claim("some-text"), timeout=SLACK)
    finally:
        await busy.aclose()
        # Closing ends the link's tasks at once, even those whose cancellation
        # redis-py turned into a connection error (they used to loop on).
        async with asyncio.timeout(SLACK):
            for link in links:
                await link.aclose()


async def ask(line: Any, *command: Any) -> Any:
    """One command's reply over a :class:`~ttsstream.cluster.line.QuickLine`."""
    (reply,) = await line.run(command)
    return reply


async def test_the_quick_line_answers_each_call_in_order(redis: RedisServer) -> None:
    """The line a request's lookup goes over: concurrent calls each get their own
    reply, one that gave up takes its reply to nowhere, an error is raised in its call
    only, and replies larger than a read and requests larger than the socket's buffer
    go through whole."""
    from ttsstream.cluster.line import QuickLine

    line = QuickLine.for_url(redis.url, connect_timeout=TIMEOUT)
    assert line is not None
    try:
        words = [f"word-{n}".encode() for n in range(200)]
        assert await asyncio.gather(*(ask(line, "ECHO", w) for w in words)) == words
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await ask(line, "BLPOP", "nothing-here", 0.3)  # answers nil later
        assert await ask(line, "ECHO", "mine") == b"mine"
        with pytest.raises(redis_exceptions.ResponseError):
            await ask(line, "NO-SUCH-COMMAND")
        assert await ask(line, "PING") == b"PONG"
        with pytest.raises(redis_exceptions.ResponseError):  # raised once all are in
            await line.run(("SET", "a", 1), ("NO-SUCH-COMMAND",), ("INCR", "a"))
        assert await ask(line, "GET", "a") == b"2"
        assert await ask(line, "SET", "b", bytearray(b"any buffer")) == b"OK"
        assert await ask(line, "GET", "b") == b"any buffer"
        big = bytes(range(256)) * (2**15)  # 8 MiB
        assert await ask(line, "SET", "big", big) == b"OK"
        assert await ask(line, "GET", "big") == big
    finally:
        line.close()


async def test_the_quick_line_sends_a_script_whole_only_when_redis_lacks_it(
    redis: RedisServer,
) -> None:
    """Scripts go by their digest; whole the first time and after Redis lost them."""
    from ttsstream.cluster.line import QuickLine

    line = QuickLine.for_url(redis.url, connect_timeout=TIMEOUT)
    assert line is not None
    shared = aioredis.from_url(redis.url)
    script = "return {KEYS[1], ARGV[1]}"
    try:
        for n in range(3):
            assert await ask(line, "EVAL", script, 1, "k", n) == [b"k", str(n).encode()]
        await shared.script_flush()
        replies = await line.run(("EVAL", script, 1, "k", 3), ("SET", "after", "it"))
        assert replies == [[b"k", b"3"], b"OK"]
        stats = await shared.info("commandstats")
        assert stats["cmdstat_eval"]["calls"] == 2
        assert stats["cmdstat_evalsha"]["calls"] >= 2
    finally:
        line.close()
        await shared.aclose()


async def test_a_call_just_as_the_line_opens_finds_it_open(redis: RedisServer) -> None:
    """A call made in the loop turn the opening completes in (before any callback of
    it ran) gets its reply; it took the line for lost, and the link went down."""
    from ttsstream.cluster.line import QuickLine

    for _ in range(5):
        line = QuickLine.for_url(redis.url, connect_timeout=TIMEOUT)
        assert line is not None
        try:
            first = asyncio.ensure_future(line.run(("PING",)))
            while line._opening is None:
                await asyncio.sleep(0)
            opening = line._opening
            while not opening.done():  # queued ahead of the opening's own callbacks
                await asyncio.sleep(0)
            assert await line.run(("PING",)) == [b"PONG"]
            assert await first == [b"PONG"]
        finally:
            line.close()


async def test_the_quick_line_logs_in_selects_and_names_itself(tmp_path: Path) -> None:
    """With a password and a database in the URL: it logs in, works in that database,
    names itself; a wrong password is an authentication error that does not hold it, a
    database out of range Redis's own error."""
    from ttsstream.cluster.line import QuickLine

    guarded = RedisServer(tmp_path, password="pa:ss@word")
    await guarded.start()
    url = f"redis://:pa%3Ass%40word@127.0.0.1:{guarded.port}/3"
    line = QuickLine.for_url(url, name="ttsstream-test", connect_timeout=TIMEOUT)
    wrong = QuickLine.for_url(url.replace("word", "wrong"), connect_timeout=TIMEOUT)
    assert line is not None and wrong is not None
    shared = aioredis.from_url(url)
    try:
        assert await ask(line, "SET", "here", "yes") == b"OK"
        assert await shared.get("here") == b"yes"
        names = [client["name"] for client in await shared.client_list()]
        assert "ttsstream-test" in names
        with pytest.raises(redis_exceptions.AuthenticationError) as refused:
            await ask(wrong, "PING")
        assert "pa:ss" not in str(refused.value)
        nowhere = QuickLine.for_url(url.replace("/3", "/99"), connect_timeout=TIMEOUT)
        assert nowhere is not None
        with pytest.raises(redis_exceptions.ResponseError) as no_such_db:
            await ask(nowhere, "PING")  # a database out of range: no authentication error
        assert not isinstance(no_such_db.value, redis_exceptions.AuthenticationError)
    finally:
        line.close()
        wrong.close()
        await shared.aclose()
        await guarded.stop()


async def test_the_quick_line_fails_its_calls_when_redis_goes_and_opens_again(
    redis: RedisServer,
) -> None:
    """Redis killed: the calls waiting fail at once (a connection error), as does a call
    while it is away; once it is back, the next call opens the line again."""
    from ttsstream.cluster.line import QuickLine

    line = QuickLine.for_url(redis.url, connect_timeout=TIMEOUT)
    assert line is not None
    try:
        assert await ask(line, "PING") == b"PONG"
        waiting = asyncio.ensure_future(ask(line, "BLPOP", "nothing-here", 30))
        await until(lambda: _blocked(redis.url))
        await redis.stop()
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(TIMEOUT):
                await waiting
        with pytest.raises(OSError):
            await ask(line, "PING")
        await redis.start()
        assert await ask(line, "PING") == b"PONG"
    finally:
        line.close()


async def test_a_speaks_calls_go_over_the_quick_line(
    start_server: ServerFactory, redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In cluster mode a speak's calls to Redis (its lookup, its entry stored with its
    lock given back) go over the instance's quick line, named after the instance, and
    scripts by their digest once Redis has them."""
    server = await start_server(redis_url=redis.url)
    link = server.services.cluster
    assert link is not None
    shared = aioredis.from_url(redis.url)
    sent: list[tuple[str, str]] = []  # (the client's address, the command), from MONITOR
    settles = count_calls(link, monkeypatch, ("_settle_all",))

    async def watch() -> None:
        async with shared.monitor() as monitor:
            while True:
                command = await monitor.next_command()
                if command["client_type"] != "lua":  # not the calls scripts make
                    where = f"{command['client_address']}:{command['client_port']}"
                    sent.append((where, command["command"].split()[0].upper()))

    watching = asyncio.ensure_future(watch())

    async def monitoring() -> bool:
        return any("O" in client["flags"] for client in await shared.client_list())

    try:
        await until(monitoring)
        for round in range(2):  # the first sends each script whole once
            sent.clear()
            settles.clear()
            async with connected(server) as client:
                for n in range(2):
                    await client.speak(f"Over the quick line, {round}.{n}.", id=str(n))
                    assert (await client.until_final(str(n))).final["type"] == "end"

            async def stored(count: int = 2 * round + 2) -> bool:
                return len(await shared.keys("ttsstream:entry:*")) == count

            await until(stored)
            # Redis runs commands in order: once MONITOR shows one sent now, it has
            # shown those that stored the entries.
            await shared.echo(f"round {round}")
            await eventually(lambda: "ECHO" in {command for _, command in sent})
        (quick,) = [
            c["addr"]
            for c in await shared.client_list()
            if c["name"] == f"ttsstream-{link.instance}"
        ]
        on_line = [command for where, command in sent if where == quick]
        elsewhere = [command for where, command in sent if where != quick]
        # The handshake's admission, 2 lookups and the locks given back (one script per
        # settle: the two flights may be settled together), by digest.
        assert settles and on_line.count("EVALSHA") == 3 + len(settles), on_line
        assert on_line.count("SET") == 2  # the entries
        assert not {"EVALSHA", "EVAL", "SET"} & set(elsewhere), elsewhere
        assert "EVAL" not in on_line
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await shared.aclose()


def unretrieved(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What asyncio said of futures whose exception nobody took (once collected)."""
    gc.collect()
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_call_of_several_commands_cut_by_redis_leaves_no_future_behind(
    redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis killed under a call of several commands, and under one whose caller gave up:
    each call fails (or has failed) once, and no reply's future is left with an
    exception nobody took."""
    from ttsstream.cluster.line import QuickLine

    line = QuickLine.for_url(redis.url, connect_timeout=TIMEOUT)
    assert line is not None
    try:
        assert await ask(line, "PING") == b"PONG"
        # Each waits for its BLPOP first, as a call waits for a busy Redis.
        waiting = asyncio.ensure_future(
            line.run(("BLPOP", "nothing-here", 30), ("PING",), ("PING",))
        )
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(TIMEOUT / 50):
                await line.run(("BLPOP", "nothing-here", 30), ("PING",), ("PING",))
        await redis.stop()
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(TIMEOUT):
                await waiting
        del waiting
    finally:
        line.close()
    assert unretrieved(caplog) == []


async def test_redis_killed_under_an_instance_leaves_no_future_behind(
    start_server: ServerFactory, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis busy, then killed, while an instance's connection counts are being written
    (several commands a call): the instance goes on alone, and asyncio reports no
    future with an exception nobody took."""
    server = await start_server(redis_url=redis.url, rate_limit_requests=0)
    async with connected(server) as client:
        await speaks_fine(client)
    # A script that never ends: Redis answers nothing more until it is killed.
    _, busy = await asyncio.open_connection("127.0.0.1", redis.port)
    busy.write(b"*3\r\n$4\r\nEVAL\r\n$17\r\nwhile true do end\r\n$1\r\n0\r\n")
    try:
        for _ in range(3):
            async with connected(server) as client:
                await speaks_fine(client)
        await redis.stop()
    finally:
        busy.close()

    async def down() -> bool:
        return bool((await side(server, "/health"))["redis"]["state"] == "down")

    await until(down)
    async with connected(server) as client:
        await speaks_fine(client)
    assert unretrieved(caplog) == []
