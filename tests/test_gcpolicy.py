"""GC_FREEZE (diary_ws/gcpolicy.py): survivors frozen so no full collection walks every socket, and a closed
socket that leaves no reference cycle behind, since a frozen cycle would never be freed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import os
import socket
import struct
import sys
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from diary_ws import cli, gcpolicy
from diary_ws.app import create_app
from diary_ws.edge import DiaryServer
from diary_ws.settings import from_env
from tests.utils import ON_BOTH_LOOPS, async_wait_until, free_port, raw_handshake, run_server


@pytest.fixture
def policy() -> Iterator[None]:
    try:
        yield
    finally:
        gcpolicy.uninstall()


def test_survivors_of_a_middle_collection_are_frozen(policy: None) -> None:
    gcpolicy.install(True)
    assert gcpolicy.installed()
    frozen = gc.get_freeze_count()
    assert frozen > 0  # what start-up left
    kept = [[i] for i in range(2000)]  # tracked, alive: survivors of the next collection
    gc.collect(1)
    assert gc.get_freeze_count() >= frozen + len(kept)
    assert gc.get_objects(generation=2) == []  # nothing left for a full collection to walk
    assert sum(gcpolicy.PAUSES.counts[1]) >= 1  # and the collection was timed
    gcpolicy.uninstall()
    assert not gcpolicy.installed()
    assert gc.get_freeze_count() == 0


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.mark.anyio
async def test_cycles_that_froze_are_collected_once_the_frozen_generation_doubles(
    policy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference cycle that survived into the frozen generation is never walked again: without a bound, a
    path that leaks cycles would grow the process for good. Doubling the frozen generation thaws it once."""
    monkeypatch.setattr(gcpolicy, "THAW_FLOOR", 10_000)
    gcpolicy.install(True)
    start = gc.get_freeze_count()
    thaws = gcpolicy.VALVE.thaws
    leaked = [Cycle() for _ in range(start + 20_000)]  # more than doubles it
    gc.collect(1)  # survivors: frozen with the rest
    assert gc.get_freeze_count() >= start + len(leaked)
    del leaked  # now cyclic garbage inside the frozen generation: only a thaw can free it
    await async_wait_until(lambda: gcpolicy.VALVE.thaws == thaws + 1, 5, "the thaw, on the next loop turn")
    assert gcpolicy.VALVE.freed >= start + 20_000  # each Cycle and its __dict__
    assert gc.get_freeze_count() < start + 20_000  # the cycles are gone; what is alive froze again
    assert gc.get_freeze_count() <= gcpolicy.VALVE.baseline < start + 20_000
    # Below the new bound, a middle collection freezes and nothing is thawed.
    kept = [[i] for i in range(1000)]
    gc.collect(1)
    await asyncio.sleep(0)
    assert gcpolicy.VALVE.thaws == thaws + 1
    assert len(kept) == 1000


@pytest.mark.anyio
async def test_a_thaw_that_finds_everything_alive_collects_once(policy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sockets opening grow the frozen generation with live objects. Its thaw's full collection (the longest
    pause there is: about 0.6 µs an object, 340 ms at 600,000) must run once: its own callback used to find
    the frozen generation still over the old bound and schedule a second one right after (seen at 18,500
    sockets: every thaw's collection twice)."""
    monkeypatch.setattr(gcpolicy, "THAW_FLOOR", 10_000)
    gcpolicy.install(True)
    start = gc.get_freeze_count()
    thaws = gcpolicy.VALVE.thaws
    full = gcpolicy.PAUSES.counts[2][:]
    alive = [Cycle() for _ in range(start + 20_000)]  # more than doubles it, and stays alive (2 blocks each)
    gc.collect(1)
    await async_wait_until(lambda: gcpolicy.VALVE.thaws > thaws, 5, "the thaw, on the next loop turn")
    for _ in range(5):  # room for a second thaw to run, if one was scheduled
        await asyncio.sleep(0)
    assert gcpolicy.VALVE.thaws == thaws + 1
    assert sum(gcpolicy.PAUSES.counts[2]) - sum(full) == 1, "one full collection per thaw"
    assert gcpolicy.VALVE.baseline >= len(alive)


@pytest.mark.anyio
async def test_young_collections_run_on_a_clock_and_freezing_counts_without_walking(policy: None) -> None:
    """In a steady state old objects die as fast as new ones are born, so Python's own trigger (allocations
    minus deallocations) hardly moves and the young generations grow until one collection walks them all
    (143 ms at 18,500 sockets). The sweeper collects them every SWEEP_EVERY seconds instead, each middle one
    freezing its survivors, counted as they are frozen: `gc.get_freeze_count()` walks the whole frozen list
    (tens of ms at a million objects) and used to run after every middle collection."""
    gcpolicy.install(True)
    young, middle = sum(gcpolicy.PAUSES.counts[0]), sum(gcpolicy.PAUSES.counts[1])
    kept = [[i] for i in range(5_000)]
    await async_wait_until(
        lambda: sum(gcpolicy.PAUSES.counts[1]) > middle + 1,
        10 * gcpolicy.SWEEP_EVERY * gcpolicy.SWEEP_MIDDLE_EVERY,
        "two middle collections on the clock",
    )
    assert sum(gcpolicy.PAUSES.counts[0]) > young + gcpolicy.SWEEP_MIDDLE_EVERY
    assert gcpolicy.VALVE.estimate() >= gc.get_freeze_count() >= len(kept)  # not below the real count
    del kept
    gcpolicy.uninstall()
    assert gcpolicy.SWEEPER.handle is None


@pytest.mark.anyio
async def test_objects_frozen_that_die_do_not_make_the_valve_walk_the_frozen_list(
    policy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Most frozen objects die soon (a reconnecting socket's, a ping timer re-armed every 20 s), and counting
    only what is frozen passed the bound about every 30 s at 18,500 sockets with nothing grown: each time a
    walk of the frozen list (`gc.get_freeze_count()`, 130 to 170 ms at 1.1 million objects), the longest
    stalls of the steady state, as was `/metrics` reading the gauge. Memory that did not grow now says the
    frozen list did not either; a leak still walks it, and thaws."""
    monkeypatch.setattr(gcpolicy, "THAW_FLOOR", 10_000)
    gcpolicy.install(True)
    start, thaws = gcpolicy.VALVE.recounts, gcpolicy.VALVE.thaws
    size = gcpolicy.VALVE.baseline // 4 + 5_000
    for _ in range(10):  # frozen, then freed: more than the bound's room went through the frozen list
        churn = [[i] for i in range(size)]
        gc.collect(1)
        del churn
    assert size * 10 > gcpolicy.VALVE.limit()  # what a count of everything frozen would say
    assert gcpolicy.VALVE.estimate() < gcpolicy.VALVE.limit()
    assert gcpolicy.VALVE.recounts == start
    text = generate_latest_text()
    assert gcpolicy.VALVE.counted <= metric(text, "diary_ws_gc_frozen_objects") <= gcpolicy.VALVE.estimate() + 1_000
    assert gcpolicy.VALVE.recounts == start  # the gauge did not walk it either
    leaked = [Cycle() for _ in range(gcpolicy.VALVE.baseline + 20_000)]
    gc.collect(1)
    del leaked
    assert start + 1 <= gcpolicy.VALVE.recounts <= start + 3  # walked as memory grew, not at every collection
    await async_wait_until(lambda: gcpolicy.VALVE.thaws == thaws + 1, 5, "the thaw, on the next loop turn")


class Slot:
    """A tracked object in one memory block (no __dict__)."""

    __slots__ = ("me",)

    def __init__(self) -> None:
        self.me = None


@pytest.mark.anyio
async def test_memory_grown_short_of_twice_the_bounds_room_walks_nothing(
    policy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sockets opening grow memory, and the estimate with it. A count walks the whole frozen list (150 ms at
    0.94 million objects), and one came about 20 s after every connect storm to 18,500 sockets while nothing
    leaked, when memory had grown by more blocks than the bound had room for objects. An object comes with
    about two blocks, so the estimate counts half of them: short of the bound by that, nothing is walked; a
    leak past it is counted, and thawed."""
    gcpolicy.install(True)
    base = gcpolicy.VALVE.counted
    monkeypatch.setattr(gcpolicy, "THAW_FLOOR", base)  # a bound of 2 x base objects: room for base more
    start, thaws = gcpolicy.VALVE.recounts, gcpolicy.VALVE.thaws
    alive = [Slot() for _ in range(base + base // 4)]  # one memory block each
    gc.collect(1)
    grown = sys.getallocatedblocks() - gcpolicy.VALVE.blocks
    assert grown > gcpolicy.VALVE.limit() - base  # more blocks than the bound has room for objects ...
    assert gcpolicy.VALVE.estimate() <= gcpolicy.VALVE.limit()  # ... but not twice that: no walk
    assert gcpolicy.VALVE.recounts == start
    more = [Slot() for _ in range(2 * base)]
    gc.collect(1)
    assert gcpolicy.VALVE.recounts >= start + 1  # past it: counted, over the bound, thawed
    await async_wait_until(lambda: gcpolicy.VALVE.thaws == thaws + 1, 5, "the thaw of a list over its bound")
    assert len(alive) + len(more) == 3 * base + base // 4


def generate_latest_text() -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from diary_ws.metrics import GcCollector

    registry = CollectorRegistry()
    registry.register(GcCollector({}))
    return generate_latest(registry).decode()


def test_without_freeze_collections_are_only_timed(policy: None) -> None:
    gcpolicy.install(False)
    before = sum(gcpolicy.PAUSES.counts[1])
    gc.collect(1)
    assert gc.get_freeze_count() == 0
    assert sum(gcpolicy.PAUSES.counts[1]) == before + 1


def metric(server_metrics: str, name: str) -> float:
    for family in text_string_to_metric_families(server_metrics):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not on /metrics")


@pytest.mark.parametrize(("setting", "frozen"), [({}, True), ({"gc_freeze": "0"}, False)])
def test_serve_freezes_unless_told_not_to(setting: dict[str, str], frozen: bool) -> None:
    with run_server(setting) as server:
        text = server.get("/metrics").text
        assert (metric(text, "diary_ws_gc_frozen_objects") > 1000) is frozen
        assert metric(text, "diary_ws_gc_frozen_objects") >= 0


def masked_close(code: int) -> bytes:
    mask = os.urandom(4)
    payload = struct.pack("!H", code)
    return bytes([0x88, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def event_stream(port: int, user_id: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET /api/v1/sse/{user_id} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    assert sock.recv(12) == b"HTTP/1.1 200"
    return sock


def requests(port: int) -> None:
    """GETs (each offered the stream hooks) and POSTs on one keep-alive connection, then a close."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(5):
            for method, path, body in (
                ("GET", "/api/v1/ws/status?limit=10", None),
                ("GET", "/healthz", None),
                ("POST", "/api/v1/ws/notification", b'{"message": "hi", "user_ids": ["u0"]}'),
            ):
                connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
                answer = connection.getresponse()
                answer.read()
                assert answer.status == 200, (method, path, answer.status)
    finally:
        connection.close()


@ON_BOTH_LOOPS
@pytest.mark.anyio
async def test_closed_connections_leave_no_cyclic_garbage(server_loop: str) -> None:
    """Every WebSocket's HTTP handshake protocol, its WebSocket protocol and its transport, and every HTTP
    request and keep-alive connection, are freed by reference counting once done: with GC_FREEZE they may be
    frozen, and a frozen cycle would never be freed."""
    port = free_port()
    settings = from_env({"DIARY_WS_PORT": str(port), "DIARY_WS_LOG_LEVEL": "warning"})
    app = create_app(settings)
    server = DiaryServer(cli.uvicorn_config(settings, app), on_signal=lambda: None, drain_seconds=0)
    task = asyncio.create_task(server.serve())
    watched = {"DiaryWebSocketProtocol", "DiaryHttpProtocol", "SocketControl", "StallWatch", "ServerProtocol"}
    watched |= {"RequestResponseCycle", "StreamControl", "OneWrite", "Connection", "SseSink", "AsgiSink"}
    watched |= {"_SelectorSocketTransport", "TCPTransport"}  # asyncio's and uvloop's (the client here is blocking)
    try:
        await async_wait_until(lambda: server.started, 10, "the server to start")
        gc.collect()
        gc.disable()
        sockets = [await asyncio.to_thread(raw_handshake, port, f"/api/v1/ws/u{i}") for i in range(20)]
        # Heartbeats run on a timer per socket; so do an event stream's.
        sockets += [await asyncio.to_thread(raw_handshake, port, f"/api/v1/ws/h{i}?heartbeat=5") for i in range(5)]
        sockets += [await asyncio.to_thread(event_stream, port, f"s{i}") for i in range(5)]
        await async_wait_until(lambda: app.state.hub.sizes()[0] == 30, 10, "30 listeners")
        await asyncio.to_thread(requests, port)
        for i, sock in enumerate(sockets):
            if i % 2 and i < 25:  # a close code no peer may send: the server's parser fails with a protocol error
                sock.sendall(masked_close(1005))
            sock.close()

        def live() -> list[str]:
            return sorted({type(o).__name__ for o in gc.get_objects()} & watched)

        assert "DiaryWebSocketProtocol" in live()
        # The collector is off: only reference counting can free them.
        with contextlib.suppress(AssertionError):
            await async_wait_until(lambda: not live(), 10, "the closed sockets to be freed by reference counting")
        assert live() == [], "left alive (in reference cycles, or still referenced) after the sockets closed"
    finally:
        gc.enable()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
