"""GET /metrics over a real server: the figures move with real traffic, and the format parses."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

import diary_ws
from diary_ws import Settings, create_app
from diary_ws.backends.memory import MemoryBackend
from diary_ws.broadcaster import Hub
from diary_ws.metrics import Metrics
from tests.docs import page
from tests.jwt_keys import SECRET, claims, sign
from tests.utils import (
    Server,
    async_wait_until,
    drain_until_closed,
    next_frame,
    raw_handshake,
    redis_server,
    run_server,
    serve_in_process,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and labels; the parser fails on anything malformed."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(server: Server) -> Samples:
    answer = server.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(answer.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.anyio
async def test_metrics_follow_real_traffic(server: Server) -> None:
    before = scrape(server)
    assert value(before, "diary_ws_connections") == 0
    assert value(before, "diary_ws_broker_reader_up") == 1  # memory:// is always up

    a1 = await connect(server.listen_url("m-a"))
    a2 = await connect(server.listen_url("m-a"))
    b = await connect(server.listen_url("m-b"))
    await async_wait_until(lambda: server.status()["total_connections"] == 3, 5, "three sockets")
    live = scrape(server)
    assert value(live, "diary_ws_connections") == 3
    assert value(live, "diary_ws_users") == 2

    assert server.post({"message": "to all"}).status_code == 200
    assert server.post({"message": "to b", "user_ids": ["m-b"]}).status_code == 200
    assert server.post({"message": "to nobody", "user_ids": ["m-nobody"]}).status_code == 404
    for ws in (a1, a2, b):
        assert (await next_frame(ws))["message"] == "to all"
    assert (await next_frame(b))["message"] == "to b"
    assert server.get("/no/such/path/12345").status_code == 404

    after = scrape(server)
    assert value(after, "diary_ws_messages_published_total") == 2
    assert value(after, "diary_ws_messages_delivered_total") == 4  # 3 sockets, then 1
    assert value(after, "diary_ws_fanout_seconds_count") == 2
    assert 0 < value(after, "diary_ws_fanout_seconds_sum") < 1
    route = "/api/v1/ws/notification"
    assert value(after, "diary_ws_http_requests_total", method="POST", route=route, status="200") == 2
    assert value(after, "diary_ws_http_requests_total", method="POST", route=route, status="404") == 1
    assert value(after, "diary_ws_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert "12345" not in server.get("/metrics").text  # raw paths never become labels
    assert server.get("/api/v1/sse/bad%20id").status_code == 400
    sse = scrape(server)
    assert value(sse, "diary_ws_http_requests_total", method="GET", route="/api/v1/sse/{user_id}", status="400") == 1

    await a1.close()  # 1000 from the client
    await a2.send("x" * 5000)  # over MAX_INCOMING_BYTES: the server closes with 1009
    await async_wait_until(lambda: server.status()["total_connections"] == 1, 5, "two sockets to go")
    closes = scrape(server)
    assert value(closes, "diary_ws_websocket_closes_total", code="1000") == 1
    assert value(closes, "diary_ws_websocket_closes_total", code="1009") == 1
    assert value(closes, "diary_ws_connections") == 1
    assert value(closes, "diary_ws_users") == 1
    await b.close()
    await a2.close()

    with pytest.raises(InvalidStatus):
        await connect(server.listen_url("bad%20id"))
    refused = scrape(server)
    assert value(refused, "diary_ws_websocket_refusals_total", status="400") == 1
    with pytest.raises(InvalidStatus):
        await connect(f"{server.ws}/no/such/socket")
    assert value(scrape(server), "diary_ws_websocket_refusals_total", status="404") == 1


@pytest.mark.anyio
async def test_a_slow_consumer_is_counted() -> None:
    with run_server({"send_queue_size": "4"}) as server:
        stalled = raw_handshake(server.port, "/api/v1/ws/m-stalled", rcvbuf=4096)
        dropped = 0
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
            # The kernel's buffers take a few MB first (docs/delivery.md, "Slow consumers"); then the backlog
            # of 4 overflows.
            for i in range(400):
                answer = await client.post("/api/v1/ws/notification", json={"message": f"{i} " + "x" * 60000})
                dropped += answer.json().get("disconnected_users", 0)
                if answer.status_code == 404:
                    break  # the stalled peer is gone: nobody is left to send to
        assert dropped == 1
        samples = scrape(server)
        assert value(samples, "diary_ws_slow_consumer_closes_total") == 1
        assert value(samples, "diary_ws_messages_dropped_total", reason="slow_consumer") == 1
        assert value(samples, "diary_ws_messages_dropped_total", reason="disconnected") == 0
        assert value(samples, "diary_ws_connections") == 0
        drain_until_closed(stalled, 10)
        stalled.close()
        server.assert_clean_log()


@pytest.mark.anyio
async def test_event_loop_lag_is_measured() -> None:
    """Blocking the loop the app runs on shows up in the lag gauge."""
    app = create_app(Settings())
    async with serve_in_process(app) as base, httpx.AsyncClient(base_url=f"http://{base}") as client:

        async def lag() -> float:
            return value(parse((await client.get("/metrics")).text), "diary_ws_event_loop_lag_seconds")

        assert await lag() < 0.25
        # Longer than LAG_INTERVAL: a deliberate block of this very event loop, which the app shares.
        time.sleep(1.0)  # noqa: ASYNC251

        async def blocked_seen() -> bool:
            return await lag() >= 0.45  # the gauge holds the last probe's overshoot for LAG_INTERVAL

        await async_wait_until(blocked_seen, 5, "the probe to report the 1 s block")


def test_two_apps_keep_separate_registries() -> None:
    """No global registry: a second app neither collides with the first nor sees its figures."""
    first, second = create_app(Settings()), create_app(Settings())
    first.state.hub.stats.published = 5
    assert value(parse(first.state.metrics.exposition().decode()), "diary_ws_messages_published_total") == 5
    assert value(parse(second.state.metrics.exposition().decode()), "diary_ws_messages_published_total") == 0


def test_per_worker_figures_carry_the_worker_label() -> None:
    hub = create_app(Settings()).state.hub
    assert isinstance(hub, Hub)
    metrics = Metrics(hub, per_worker=True)
    metrics.request("GET", "/healthz", 200)
    metrics.closed(1000)
    samples = parse(metrics.exposition().decode())
    assert samples
    for name, labels in samples:
        assert ("worker", str(os.getpid())) in labels, name


def test_every_metric_is_documented(shared_server: Server) -> None:
    docs = page("observability.md")
    families = {family.name for family in text_string_to_metric_families(shared_server.get("/metrics").text)}
    assert len(families) >= 15
    for name in families - {f for f in families if f.endswith("_created")}:  # prometheus-client's own extras
        assert f"`{name}" in docs, name


# name (as the parser reports it, without _total) -> type; every one must be on a fresh server's /metrics.
TYPES = {
    "diary_ws_build_info": "gauge",
    "diary_ws_connections": "gauge",
    "diary_ws_users": "gauge",
    "diary_ws_broker_reader_up": "gauge",
    "diary_ws_messages_published": "counter",
    "diary_ws_messages_delivered": "counter",
    "diary_ws_messages_dropped": "counter",
    "diary_ws_slow_consumer_closes": "counter",
    "diary_ws_fanout_seconds": "histogram",
    "diary_ws_publish_seconds": "histogram",
    "diary_ws_http_requests": "counter",
    "diary_ws_handshakes": "counter",
    "diary_ws_websocket_closes": "counter",
    "diary_ws_websocket_refusals": "counter",
    "diary_ws_event_loop_lag_seconds": "gauge",
    "diary_ws_event_loop_stall_seconds": "histogram",
    "diary_ws_gc_frozen_objects": "gauge",
    "diary_ws_gc_collections": "counter",
    "diary_ws_gc_pause_seconds": "histogram",
}


def test_each_metric_exists_with_its_type(shared_server: Server) -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(shared_server.get("/metrics").text)}
    for name, kind in TYPES.items():
        assert families.get(name) == kind, (name, families.get(name))
    # The series a dashboard plots from the first scrape are there at once, at zero if nothing happened yet.
    samples = scrape(shared_server)
    for transport in ("websocket", "sse"):
        for outcome in ("accepted", "400", "401", "403", "429", "503"):
            assert ("diary_ws_handshakes_total", frozenset({("transport", transport), ("outcome", outcome)})) in samples
    assert ("diary_ws_publish_seconds_count", frozenset({("source", "http")})) in samples


def test_build_info_names_what_runs(shared_server: Server) -> None:
    [info] = [f for f in text_string_to_metric_families(shared_server.get("/metrics").text) if f.name.endswith("info")]
    [sample] = info.samples
    assert sample.value == 1
    assert sample.labels["version"] == diary_ws.__version__
    assert sample.labels["python"] == platform.python_version()
    assert sample.labels["uvicorn"] == importlib.metadata.version("uvicorn")
    assert sample.labels["backend"] == "memory"
    assert sample.labels["loop"] in ("asyncio", "uvloop")


def test_handshakes_are_counted_by_transport_and_outcome() -> None:
    with run_server({"jwt_secret": SECRET, "max_connections_per_user": "1"}) as server:
        token = sign(claims("hs-a"), SECRET, "HS256")
        with ws_connect(server.listen_url("hs-a", f"token={token}")):
            for url, status in [
                (server.listen_url("hs-a", f"token={token}"), 429),  # one socket per user
                (server.listen_url("hs-b"), 401),
                (server.listen_url("hs-b", f"token={token}"), 403),  # a token for another user
                (server.listen_url("bad%20id"), 400),
            ]:
                with pytest.raises(InvalidStatus) as refused:
                    ws_connect(url).close()
                assert refused.value.response.status_code == status
            with httpx.stream(
                "GET", f"{server.http}/api/v1/sse/hs-c?token={sign(claims('hs-c'), SECRET, 'HS256')}", timeout=10
            ) as sse:
                assert sse.status_code == 200
                assert server.get("/api/v1/sse/hs-d").status_code == 401
                samples = scrape(server)
        for transport, outcome, count in [
            ("websocket", "accepted", 1), ("websocket", "429", 1), ("websocket", "401", 1), ("websocket", "403", 1),
            ("websocket", "400", 1), ("websocket", "503", 0), ("sse", "accepted", 1), ("sse", "401", 1),
            ("sse", "400", 0),
        ]:  # fmt: skip
            assert value(samples, "diary_ws_handshakes_total", transport=transport, outcome=outcome) == count, (
                transport, outcome,
            )  # fmt: skip
        server.assert_clean_log()


def histogram(samples: Samples, name: str, **labels: str) -> dict[str, float]:
    """A histogram's cumulative buckets, bound -> count."""
    return {
        dict(key)["le"]: count
        for (sample, key), count in samples.items()
        if sample == f"{name}_bucket" and frozenset(kv for kv in key if kv[0] != "le") == frozenset(labels.items())
    }


@pytest.mark.anyio
async def test_publish_latency_is_observed_for_posts_and_notify() -> None:
    app = create_app(Settings())
    async with (
        serve_in_process(app) as base,
        httpx.AsyncClient(base_url=f"http://{base}") as client,
        connect(f"ws://{base}/api/v1/ws/lat"),
    ):
        await async_wait_until(lambda: app.state.hub.sizes()[1] == 1, 5, "the socket")
        for _ in range(3):
            answer = await client.post("/api/v1/ws/notification", json={"message": "hi", "user_ids": ["lat"]})
            assert answer.status_code == 200
        assert (
            await client.post("/api/v1/ws/notification", json={"message": "x", "user_ids": ["nobody"]})
        ).status_code == 404
        await app.state.hub.notify("from python", ["lat"])
        samples = parse((await client.get("/metrics")).text)
    assert value(samples, "diary_ws_publish_seconds_count", source="http") == 3  # the 404 is not a publish
    assert value(samples, "diary_ws_publish_seconds_count", source="python") == 1
    buckets = histogram(samples, "diary_ws_publish_seconds", source="http")
    assert set(buckets) >= {"0.0001", "3.0", "+Inf"}
    assert buckets["3.0"] == 3  # a local publish never takes seconds
    assert 0 < value(samples, "diary_ws_publish_seconds_sum", source="http") < 3


@pytest.mark.anyio
async def test_a_blocking_stall_shows_in_the_stall_histogram() -> None:
    """A callback that blocks the server's own event loop for 0.3 s is one observation above 0.25 s."""
    app = create_app(Settings())
    async with serve_in_process(app) as base, httpx.AsyncClient(base_url=f"http://{base}") as client:

        async def above(bound: str) -> float:
            buckets = histogram(parse((await client.get("/metrics")).text), "diary_ws_event_loop_stall_seconds")
            return buckets["+Inf"] - buckets[bound]

        before = await above("0.25")
        ticks = await async_wait_until(lambda: app.state.metrics.stalls.observations > 20, 5, "the probe to tick")
        assert ticks
        blocked = asyncio.Event()

        def block() -> None:
            time.sleep(0.3)  # the stall under test: nothing else runs on this loop meanwhile
            blocked.set()

        asyncio.get_running_loop().call_soon(block)
        await asyncio.wait_for(blocked.wait(), 5)

        async def counted() -> bool:
            return await above("0.25") == before + 1

        await async_wait_until(counted, 5, "the 0.3 s stall to be counted above 0.25 s")
        assert await above("0.5") == 0  # and counted once, at its length, not as a burst of late ticks


def test_the_core_knows_nothing_of_prometheus() -> None:
    """metrics reads the hub; the hub and the backends never import metrics or prometheus-client."""
    from tests.test_layers import importers_of

    for target in ("prometheus_client", "diary_ws.metrics"):
        assert not {m for m in importers_of(target) if m.startswith(("diary_ws.broadcaster", "diary_ws.backends"))}
    assert importers_of("prometheus_client") == {"diary_ws.metrics"}


def test_broker_reader_up_follows_the_backends_flag() -> None:
    """A backend with a reader (Redis) exposes `reader_up`; the gauge reports it, not just `ready()`."""

    class DeafBackend(MemoryBackend):
        reader_up = False

    app = create_app(Settings())
    samples = parse(app.state.metrics.exposition().decode())
    assert value(samples, "diary_ws_broker_reader_up") == 1
    app.state.hub.backend = DeafBackend(history_size=10, history_ttl=60)
    samples = parse(app.state.metrics.exposition().decode())
    assert value(samples, "diary_ws_broker_reader_up") == 0


def test_real_workers_label_their_figures() -> None:
    """WORKERS=2 over a real redis-server: each scrape is one worker's, and every series says which."""
    with redis_server() as redis, run_server({"broker_url": redis.url, "workers": "2"}) as server:
        seen: set[str] = set()
        for _ in range(20):
            samples = scrape(server)
            workers = {value for _name, labels in samples for key, value in labels if key == "worker"}
            assert len(workers) == 1, workers  # one worker answered, and labelled all of it
            assert all(("worker", next(iter(workers))) in labels for _name, labels in samples)
            assert value(samples, "diary_ws_broker_reader_up", worker=next(iter(workers))) == 1
            seen |= workers
        assert str(server.proc.pid) not in seen  # the supervisor serves nothing: these are the workers' pids
        server.assert_clean_log()


@pytest.mark.parametrize(
    ("loop", "expected"), [(None, "uvloop"), ("auto", "uvloop"), ("asyncio", "asyncio"), ("uvloop", "uvloop")]
)
def test_serve_runs_on_the_loop_the_setting_names(loop: str | None, expected: str) -> None:
    """uvloop by default when installed (auto; the edge's bounds are tested on both loops); asyncio opts out."""
    pytest.importorskip("uvloop", reason="uvloop is not installed: make install brings it")
    with run_server({} if loop is None else {"loop": loop}) as server:
        [info] = [f for f in text_string_to_metric_families(server.get("/metrics").text) if f.name.endswith("info")]
        assert info.samples[0].labels["loop"] == expected
        server.assert_clean_log()


def test_loop_uvloop_without_uvloop_is_a_clear_setting_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from diary_ws.settings import SettingError, from_env

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    with pytest.raises(SettingError, match="DIARY_WS_LOOP is uvloop, which is not installed"):
        from_env({"DIARY_WS_LOOP": "uvloop"})
    assert from_env({"DIARY_WS_LOOP": "auto"}).loop == "auto"  # auto falls back to asyncio instead
    with pytest.raises(SettingError, match="must be one of auto, asyncio, uvloop"):
        from_env({"DIARY_WS_LOOP": "trio"})


@pytest.mark.anyio
async def test_a_peers_own_close_codes_share_one_label(server: Server) -> None:
    """The peer picks its close code (3000-4999 are free for applications): one label each would let any
    client add two thousand series to every scrape."""
    for code in (3000, 3999, 4500, 4999):
        async with connect(server.listen_url(f"closer{code}")) as ws:
            await ws.close(code, "bye")
    await async_wait_until(lambda: server.status()["total_connections"] == 0, 5, "the sockets to go")
    samples = scrape(server)
    codes = {dict(labels).get("code") for name, labels in samples if name == "diary_ws_websocket_closes_total"}
    assert codes == {"other"}, codes
    assert value(samples, "diary_ws_websocket_closes_total", code="other") == 4
