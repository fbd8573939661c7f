"""The side port, the logs and graceful shutdown, as operators see them."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    TIMEOUT,
    Client,
    Clock,
    ServerFactory,
    connected,
    eventually,
    url_of,
    wait_for_entries,
)
from tests.fake_edge import FakeEdge
from tests.processes import serve_process
from ttsstream import __version__
from ttsstream.core.breaker import CircuitBreaker
from ttsstream.logs import fields_of
from ttsstream.server import Server


async def get(server: Server, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{server.ops.port}{path}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def speak(server: Server, text: str, **fields: Any) -> dict[str, Any]:
    async with connected(server) as client:
        await client.speak(text, **fields)
        return (await client.until_final("u1")).final


async def test_stats_count_what_happened(server: Server, fake: FakeEdge) -> None:
    """After 3 misses and 2 hits, /stats says so: hit rate 40.0%, 5 requests, the bytes."""
    for text in ("One.", "Two.", "Three."):
        await speak(server, text)
    await wait_for_entries(server, 3)
    for text in ("One.", "Two."):
        await speak(server, text)
    await speak(server, "Bad.", rate="fast")
    status, stats = await get(server, "/stats")
    assert status == 200
    assert (stats["cache_hits"], stats["cache_misses"], stats["cache_hit_rate"]) == (2, 3, "40.0%")
    assert stats["total_requests"] == 6
    assert stats["errors"] == 1
    assert stats["upstream_requests"] == 3 and stats["upstream_errors"] == 0
    assert stats["bytes_sent"] == sum(len(r.audio) for r in fake.records) + sum(
        len(r.audio) for r in fake.records[:2]
    )
    assert stats["connections"] == 0 and stats["active_utterances"] == 0
    assert stats["outcomes"] == {"ok": 5}
    assert stats["uptime_seconds"] > 0
    assert stats["requests_per_second"] == pytest.approx(6 / stats["uptime_seconds"], rel=0.5)
    expected = {
        "uptime_seconds",
        "total_requests",
        "cache_hits",
        "cache_misses",
        "cache_hit_rate",
        "errors",
        "rate_limited",
        "requests_per_second",
        "connections",
        "active_utterances",
        "upstream_requests",
        "upstream_errors",
        "fallbacks",
        "coalesced",
        "bytes_sent",
        "auth_failures",
    }
    assert expected <= set(stats)


async def test_stats_tell_the_loops_lag_and_the_process(server: Server, tmp_path: Path) -> None:
    """/stats gives the event loop's lag (a loop blocked 300 ms shows a lag of at least
    200 ms: its 100 ms timer was due inside the block), and the process's memory, open
    files, tasks and threads; /metrics has the lag's histogram and the tasks."""
    _, before = await get(server, "/stats")
    process = before["process"]
    assert process["rss_bytes"] > 10 * 2**20 and process["threads"] >= 1
    assert before["loop_lag_ms"]["window_s"] == 60.0

    # 40 files and 40 tasks opened now show in the next reading (give or take the
    # few sockets and tasks of the requests themselves).
    files = [(tmp_path / f"f{i}").open("w") for i in range(40)]
    stop = asyncio.Event()
    waiting = [asyncio.create_task(stop.wait()) for _ in range(40)]
    try:
        _, during = await get(server, "/stats")
        assert during["process"]["open_files"] >= process["open_files"] + 35
        assert during["process"]["tasks"] >= process["tasks"] + 35
    finally:
        stop.set()
        await asyncio.gather(*waiting)
        for file in files:
            file.close()

    # Block the loop: the lag sampler wakes at least 200 ms late.
    time.sleep(0.3)

    async def lagged() -> Any:
        _, stats = await get(server, "/stats")
        return stats["loop_lag_ms"]["max"] >= 200 and stats

    stats = await eventually(lagged, what="a 300 ms block in the loop's lag")
    assert stats["loop_lag_ms"]["samples"] >= 1
    assert stats["loop_lag_ms"]["p50"] <= stats["loop_lag_ms"]["p99"] <= stats["loop_lag_ms"]["max"]
    _, text = await get(server, "/metrics")
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }
    assert samples["ttsstream_event_loop_lag_seconds_count"] >= 1
    assert samples["ttsstream_event_loop_lag_seconds_sum"] >= 0.2
    assert samples["ttsstream_event_loop_tasks"] >= 1
    assert samples["process_resident_memory_bytes"] > 10 * 2**20
    assert samples["process_open_fds"] >= 1


async def test_metrics_parse_and_match(server: Server, fake: FakeEdge) -> None:
    """/metrics is Prometheus text that prometheus-client parses, with the same numbers."""
    await speak(server, "Metric one.")
    await wait_for_entries(server, 1)
    await speak(server, "Metric one.")
    fake.refuse_status = 503
    await speak(server, "Metric two.")
    status, text = await get(server, "/metrics")
    assert status == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("ttsstream_requests_total", (("interface", "ws"), ("outcome", "ok")))] == 3
    assert samples[("ttsstream_cache_hits_total", ())] == 1
    assert samples[("ttsstream_cache_misses_total", ())] == 2
    assert samples[("ttsstream_fallbacks_total", ())] == 1
    assert samples[("ttsstream_upstream_errors_total", (("kind", "upstream_unavailable"),))] == 3
    assert samples[("ttsstream_sent_bytes_total", ())] > 0
    assert samples[("ttsstream_connections", ())] == 0
    ttfa = "ttsstream_time_to_first_audio_seconds_count"
    assert samples[(ttfa, (("source", "cached"),))] == 1
    assert samples[(ttfa, (("source", "live"),))] == 1
    assert samples[(ttfa, (("source", "fallback"),))] == 1
    labels = {value for (_, pairs) in samples for _, value in pairs}
    assert not any("Metric" in label or "127.0.0.1" in label for label in labels)


async def test_health_is_degraded_while_the_breaker_is_open(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """/health is 200 healthy, and 200 degraded with the breaker's state while it is open."""
    server = await start_server(upstream_retries=0)
    server.services.router.breaker = CircuitBreaker(failure_threshold=1, cooldown=30, clock=Clock())
    await wait_for_voice_list(server)
    status, health = await get(server, "/health")
    assert status == 200
    assert health == {
        "status": "healthy",
        "uptime_seconds": health["uptime_seconds"],
        "cache_enabled": True,
        "rate_limit": "100/60s",
        "version": __version__,
        "upstream": {
            "state": "closed",
            "consecutive_failures": 0,
            "last_error": None,
            "retry_in_seconds": None,
            "voice_list": {"voices": len(fake.voices), "last_error": None},
        },
        "fallback_voice": "espeak:auto",
        "connections": 0,
        "cluster": "single",
        "redis": None,
        "keys": {"file": None, "tenants": 0, "last_error": None},
        "usage": {"last_error": None},
    }
    fake.refuse_status = 503
    async with connected(server) as client:
        await client.speak("Breaks the breaker.")
        await client.until_final("u1")
        status, health = await get(server, "/health")
        assert (status, health["status"], health["connections"]) == (200, "degraded", 1)
        assert health["upstream"] == {
            "state": "open",
            "consecutive_failures": 1,
            "last_error": "upstream_unavailable",
            "retry_in_seconds": 30.0,
            "voice_list": {"voices": len(fake.voices), "last_error": None},
        }


async def wait_for_voice_list(server: Server) -> None:
    await eventually(
        lambda: server.services.router.edge_voices is not None, what="the voice list fetched"
    )


async def test_health_is_degraded_while_the_voice_list_is_missing(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Without Edge's voice list, /health says degraded and why; once fetched, healthy."""
    fake.refuse_voices_status = 503
    server = await start_server()
    await eventually(
        lambda: server.services.router.edge_voices_error is not None, what="the list's failure"
    )
    status, health = await get(server, "/health")
    assert (status, health["status"]) == (200, "degraded")
    assert health["upstream"]["voice_list"] == {
        "voices": None,
        "last_error": "upstream_unavailable",
    }
    fake.refuse_voices_status = None
    await wait_for_voice_list(server)
    status, health = await get(server, "/health")
    assert health["status"] == "healthy"
    assert health["upstream"]["voice_list"]["voices"] == len(fake.voices)


async def test_voices_endpoint(server: Server) -> None:
    """/voices lists the same voices as the WebSocket voices message."""
    status, listed = await get(server, "/voices")
    async with connected(server) as client:
        await client.send({"type": "voices"})
        message = await client.next_loose()
    assert status == 200 and listed["voices"] == message["voices"]
    # ?locale= as on every door: the same voices as the voices message asked for it.
    status, french = await get(server, "/voices?locale=fr")
    async with connected(server) as client:
        await client.send({"type": "voices", "locale": "fr"})
        message = await client.next_loose()
    assert status == 200 and french["voices"] == message["voices"]
    assert 0 < len(french["voices"]) < len(listed["voices"])


async def test_drain_finishes_utterances_and_refuses_new_ones(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """During a drain /ready is 503, new speaks get shutting_down, the playing utterance
    ends complete, then the connection closes with 1001."""
    server = await start_server()
    assert (await get(server, "/ready"))[0] == 200
    fake.pause_after_chunks = 2
    async with connected(server) as client:
        await client.speak("Finish this sentence before you go.", id="long")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        drain = asyncio.create_task(server.drain(TIMEOUT))
        await asyncio.sleep(0)
        status, ready = await get(server, "/ready")
        assert (status, ready) == (503, {"ready": False, "state": "draining"})
        await client.speak("Too late.", id="late")
        assert (await client.until_final("late")).final["code"] == "shutting_down"
        with pytest.raises(OSError):
            await connect(url_of(server), open_timeout=1)
        fake.resume.set()
        result = await client.until_final("long")
        assert result.final["type"] == "end"
        assert bytes(result.audio) == bytes(fake.records[0].audio)
        await asyncio.wait_for(drain, TIMEOUT)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.ws.recv(), TIMEOUT)
        assert client.ws.close_code == 1001


async def test_utterances_cut_by_the_drain_are_told_so(
    start_server: ServerFactory, fake: FakeEdge
) -> None:
    """Past DRAIN_TIMEOUT, the playing utterance gets shutting_down with partial: true and
    the queued one shutting_down with partial: false, before the 1001 close."""
    server = await start_server()
    fake.pause_after_chunks = 2
    async with connected(server) as client:
        await client.speak("This sentence is never finished.", id="cut")
        await client.speak("This one never starts.", id="queued")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        await asyncio.wait_for(server.drain(0.2), TIMEOUT)
        cut = await client.until_final("cut")
        assert cut.messages[0]["type"] == "start" and cut.audio
        assert (cut.final["code"], cut.final["partial"]) == ("shutting_down", True)
        queued = await client.until_final("queued")
        assert [m["type"] for m in queued.messages] == ["error"]
        assert (queued.final["code"], queued.final["partial"]) == ("shutting_down", False)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(client.ws.recv(), TIMEOUT)
        assert client.ws.close_code == 1001
    assert server.stats.outcomes["shutting_down"] == 1


async def test_sigterm_mid_utterance_delivers_it_and_exits_0(
    fake: FakeEdge, tmp_path: Path
) -> None:
    """A real server process receiving SIGTERM mid-utterance finishes it, refuses a new one
    with shutting_down, closes with 1001 and exits 0, logging the drain."""
    fake.pause_after_chunks = 2
    process, url, side = await serve_process(fake, tmp_path)
    async with connect(url) as ws:
        client = Client(ws)
        await client.recv_message()
        await client.speak("Do not cut me off in the middle of my sentence.", id="long")
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        process.send_signal(signal.SIGTERM)
        async with aiohttp.ClientSession() as session:

            async def not_ready() -> bool:
                async with session.get(f"http://{side}/ready") as response:
                    return response.status == 503

            await eventually(not_ready, what="/ready 503")
        await client.speak("And another?", id="late")
        assert (await client.until_final("late")).final["code"] == "shutting_down"
        fake.resume.set()
        result = await client.until_final("long")
        assert result.final["type"] == "end"
        assert bytes(result.audio) == bytes(fake.records[0].audio)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert ws.close_code == 1001
    assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    assert "draining: 1 utterances in progress" in log
    assert "drained: 1 of 1 utterances finished, 0 cut" in log


async def test_second_signal_closes_at_once(fake: FakeEdge, tmp_path: Path) -> None:
    """A second SIGTERM does not wait for the drain: connections close and the process exits."""
    fake.pause_after_chunks = 1
    process, url, _ = await serve_process(fake, tmp_path, DRAIN_TIMEOUT="600")
    async with connect(url) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "speak", "text": "Never finishes."}))
        await asyncio.wait_for(fake.paused.wait(), TIMEOUT)
        process.send_signal(signal.SIGTERM)
        # The first one handled before the second is sent (two pending are one).
        assert process.stderr is not None
        while b"draining:" not in await asyncio.wait_for(process.stderr.readline(), TIMEOUT):
            pass
        assert process.returncode is None  # draining, for up to 600 s
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert ws.close_code == 1001


async def test_json_logs_hold_fields_but_no_text_or_key(fake: FakeEdge, tmp_path: Path) -> None:
    """LOG_FORMAT=json writes one object per line; the access line has the documented fields
    and neither the text nor the key, for a WebSocket speak and an HTTP request alike."""
    key = "LogSecretKey42"
    process, url, _ = await serve_process(
        fake, tmp_path, LOG_FORMAT="json", LOG_DIR=str(tmp_path / "logs"), TTS_API_KEY=key
    )
    text = "Private words that must never be logged."
    async with connect(url, additional_headers={"X-API-Key": key}) as ws:
        client = Client(ws)
        await client.recv_message()
        await client.speak(text, id="p1")
        await client.until_final("p1")
    await refused_handshake(url + "?api_key=wrong" + key)
    http = url.replace("ws://", "http://").replace("/v1/stream", "/tts")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            http, json={"text": text + " Twice."}, headers={"X-API-Key": key}
        ) as response:
            assert response.status == 200 and await response.read()
        async with session.post(http + "?api_key=wrong" + key, json={"text": text}) as response:
            assert response.status == 401
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
    access = (tmp_path / "logs" / "access.log").read_text()
    errors = (tmp_path / "logs" / "error.log").read_text()
    lines = [json.loads(line) for line in access.splitlines()]
    utterance, over_http = [line for line in lines if line["message"] == "utterance"]
    assert (utterance["interface"], over_http["interface"]) == ("ws", "http")
    assert (over_http["outcome"], over_http["chars"]) == ("ok", len(text + " Twice."))
    assert over_http["id"] == over_http["conn"] and over_http["id"].startswith("h-")
    assert {
        "ts",
        "level",
        "ip",
        "conn",
        "id",
        "voice",
        "engine",
        "chars",
        "key",
        "cached",
        "fallback",
        "ttfb_ms",
        "audio_ms",
        "bytes",
        "outcome",
    } <= set(utterance)
    assert (utterance["ip"], utterance["id"], utterance["chars"]) == ("127.0.0.1", "p1", len(text))
    assert (utterance["outcome"], utterance["engine"], len(utterance["key"])) == ("ok", "edge", 12)
    refusals = [line for line in lines if line["message"] == "handshake_refused"]
    assert [refusal["reason"] for refusal in refusals] == ["unauthorized", "unauthorized"]
    for line in errors.splitlines():
        json.loads(line)
    for secret in ("Private", "never be logged", key):
        assert secret not in access and secret not in errors


async def refused_handshake(url: str) -> None:
    with pytest.raises(Exception, match="401"):
        async with connect(url):
            pass


async def test_sighup_reopens_log_files(fake: FakeEdge, tmp_path: Path) -> None:
    """After logrotate moves access.log away, SIGHUP makes the server write a new one."""
    logs = tmp_path / "logs"
    process, url, _ = await serve_process(fake, tmp_path, LOG_DIR=str(logs))

    async def one(id: str) -> None:
        async with connect(url) as ws:
            client = Client(ws)
            await client.recv_message()
            await client.speak(f"Rotation {id}.", id=id)
            await client.until_final(id)

    await one("before")
    # The access log is written by a thread.
    await eventually(lambda: "id=before" in (logs / "access.log").read_text())
    (logs / "access.log").rename(logs / "access.log.1")
    process.send_signal(signal.SIGHUP)
    await eventually((logs / "access.log").exists, what="access.log reopened")
    await one("after")
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
    assert "id=before" in (logs / "access.log.1").read_text()
    rotated_in = (logs / "access.log").read_text()
    assert "id=after" in rotated_in and "id=before" not in rotated_in
    assert "log files reopened" in (logs / "error.log").read_text()


def slow_admission(monkeypatch: pytest.MonkeyPatch, server: Server, seconds: float) -> None:
    """Make both doors' admission (a speak's rate check, an HTTP request's) take
    ``seconds`` longer, as a slow Redis would."""
    admission = server.services.admission
    for name in ("check_rate", "admit"):
        decide = getattr(admission, name)

        async def slowly(*args: Any, decide: Any = decide, **kwargs: Any) -> Any:
            await asyncio.sleep(seconds)
            return await decide(*args, **kwargs)

        monkeypatch.setattr(admission, name, slowly)


async def post_tts(server: Server, text: str) -> None:
    url = url_of(server).replace("ws://", "http://").replace("/v1/stream", "/tts")
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json={"text": text}) as response,
    ):
        assert response.status == 200
        assert await response.read()


async def test_time_to_first_audio_counts_the_admission(
    start_server: ServerFactory, fake: FakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time to first audio runs from the request's arrival, before its admission
    (which asks Redis in a cluster): a slow admission shows in the speak's ``ttfb_ms``
    and in the first-audio histogram, on both doors."""
    server = await start_server()
    slow = 0.3
    slow_admission(monkeypatch, server, slow)
    async with connected(server) as client:
        await client.speak("Admitted slowly.", id="a")
        end = (await client.until_final("a")).final
    assert end["type"] == "end" and end["ttfb_ms"] >= slow * 1000

    registry = server.services.stats.registry
    name = "ttsstream_time_to_first_audio_seconds_sum"
    before = registry.get_sample_value(name, {"source": "live"}) or 0.0
    await post_tts(server, "Admitted slowly, over HTTP.")
    after = registry.get_sample_value(name, {"source": "live"})
    assert after is not None and after - before >= slow
    assert len(fake.records) == 2


async def test_access_log_tells_the_upstreams_time_from_the_servers(
    start_server: ServerFactory,
    fake: FakeEdge,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An utterance Edge spoke logs Edge's time to first audio (``upstream_ms``) beside
    its ``ttfb_ms``, on both doors: a slow admission is in the latter only, a slow Edge
    in both; a replay has none."""
    caplog.set_level(logging.INFO, logger="ttsstream.access")
    server = await start_server()
    slow, slow_edge = 0.3, 0.2
    slow_admission(monkeypatch, server, slow)
    fake.first_audio_delay = slow_edge
    async with connected(server) as client:
        for number in (1, 2):  # the second is a replay
            await client.speak("Timed twice.", id=f"u{number}")
            assert (await client.until_final(f"u{number}")).final["type"] == "end"
    await post_tts(server, "Timed over HTTP.")
    lines = [fields_of(r) for r in caplog.records if r.name == "ttsstream.access"]
    live, replay = [line for line in lines if line.get("id") in ("u1", "u2")]
    (http,) = [line for line in lines if line.get("interface") == "http"]
    assert live["cached"] is False and replay["cached"] is True and http["cached"] is False
    for spoken in (live, http):
        assert slow_edge * 1000 <= spoken["upstream_ms"] <= spoken["ttfb_ms"] - slow * 1000
    assert replay["upstream_ms"] is None and replay["ttfb_ms"] >= slow * 1000
    assert len(fake.records) == 2


async def test_side_port_refusals_are_json_as_on_the_main_port(server: Server) -> None:
    """An unknown path on the side port is 404 and a wrong method 405, with the JSON
    body the main port gives them (and the 405 its Allow header)."""
    side, main = (f"http://127.0.0.1:{port}" for port in (server.ops.port, server.port))
    async with aiohttp.ClientSession() as session:
        for method, side_path, main_path, status in (
            ("GET", "/nope", "/nope", 404),
            ("POST", "/health", "/", 405),
        ):
            answers = []
            for url in (side + side_path, main + main_path):
                async with session.request(method, url) as response:
                    assert response.status == status, url
                    assert response.content_type == "application/json", url
                    answers.append(await response.json())
            assert answers[0] == answers[1], answers
        async with session.post(side + "/health") as response:
            assert response.headers["Allow"] == "GET, HEAD"
            assert await response.json() == {
                "error": "method_not_allowed",
                "message": "POST is not allowed here",
            }
