"""A `since` replay is pulled from the history as the socket drains: what it holds at once is bounded by the
socket's backlog caps, however long the replay; and the history itself is bounded by HISTORY_BYTES.

The attacks come first: never-reading resumes over a 10k x 1 KB history (they took +12.5 MB each), a
reconnect loop, a replay that stalls, and big messages that filled the history by count only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from diary_ws.backends.memory import MemoryBackend
from diary_ws.messages import Draft, MessageId
from tests.sse_client import raw_stream
from tests.utils import (
    Server,
    async_wait_until,
    drain_until_closed,
    next_frame,
    raw_handshake,
    redis_server,
    run_server,
    vm_rss_kib,
    wait_until,
)

# Filling a 10k-message history takes a while on a busy, shared machine: past the suite's default timeout.
pytestmark = pytest.mark.timeout(600)

HISTORY = 10_000
BODY = "x" * 1000  # 1 KB messages, as in the measurement


def as_pair(msg_id: str) -> tuple[int, int]:
    ms, seq = msg_id.split("-")
    return int(ms), int(seq)


async def fill(server: Server, count: int, message: str, workers: int = 16) -> list[str]:
    """Publish `count` broadcasts over a few keep-alive connections; their ids, in id order."""
    ids: list[str] = []

    async def worker(client: httpx.AsyncClient, share: int) -> None:
        for _ in range(share):
            answer = await client.post("/api/v1/ws/notification", json={"message": message})
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["id"])

    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        shares = [count // workers + (i < count % workers) for i in range(workers)]
        await asyncio.gather(*(worker(client, share) for share in shares))
    return sorted(ids, key=as_pair)


async def read_everything(ws: ClientConnection) -> None:
    """A keeper: some listener must be connected, or a broadcast is a 404."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()


async def healthz_latency(server: Server, client: httpx.AsyncClient) -> float:
    started = time.monotonic()
    answer = await client.get("/healthz")
    assert answer.status_code == 200
    return time.monotonic() - started


@pytest.fixture(scope="module")
def big_history() -> Iterator[tuple[Server, list[str]]]:
    """One server whose history holds 10k x 1 KB broadcasts (the default HISTORY_SIZE), and their ids."""
    with run_server({"ping_interval": "60", "ping_timeout": "10"}) as server:

        async def setup() -> list[str]:
            async with connect(server.listen_url("keeper"), max_size=None) as keeper:
                reader = asyncio.create_task(read_everything(keeper))
                ids = await fill(server, HISTORY, BODY)
                reader.cancel()
                return ids

        ids = asyncio.run(setup())
        yield server, ids
        server.assert_clean_log()


async def healthy_reader_is_served(server: Server, user: str) -> None:
    """A reader that reads, on the same server during the attack, gets a new message within seconds."""
    async with connect(server.listen_url(user)) as ws:
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
            answer = await client.post("/api/v1/ws/notification", json={"message": "hi", "user_ids": [user]})
            assert answer.status_code == 200, answer.text
        frame = await next_frame(ws, 10)
        assert frame["message"] == "hi"


@pytest.mark.anyio
async def test_100_never_reading_resumes_over_10k_messages_stay_within_300_mb(
    big_history: tuple[Server, list[str]],
) -> None:
    server, _ids = big_history
    pid = server.proc.pid
    before = vm_rss_kib(pid)
    sockets = [raw_handshake(server.port, f"/api/v1/ws/resumer-{i}?since=0-0", rcvbuf=4096) for i in range(100)]
    # SSE streams resume from the same history the same way.
    streams = [raw_stream(server.port, f"/api/v1/sse/streamer-{i}?since=0-0", rcvbuf=4096) for i in range(20)]
    peak = vm_rss_kib(pid)
    worst = 0.0
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
        # Watch for a while: every replay runs into its socket's full buffers and waits there.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            worst = max(worst, await healthz_latency(server, client))
            peak = max(peak, vm_rss_kib(pid))
            await asyncio.sleep(0.05)
    await healthy_reader_is_served(server, "healthy-during-resumes")
    grown = (peak - before) / 1024
    print(f"\n100 WS + 20 SSE never-reading resumes over {HISTORY} x 1 KB: RSS +{grown:.1f} MB", end=", ")
    print(f"worst /healthz {worst:.3f} s")
    assert grown < 300, f"RSS grew by {grown:.0f} MB"
    assert worst < 2.0, f"/healthz took {worst:.2f} s: the replays hold the event loop"
    for sock in sockets + streams:
        sock.close()


@pytest.mark.anyio
async def test_a_reconnect_loop_of_resumes_does_not_stall_the_event_loop(big_history: tuple[Server, list[str]]) -> None:
    server, _ids = big_history
    worst = 0.0
    reconnects = 0
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:

        async def reconnect_loop() -> None:
            nonlocal reconnects
            # About ten a second: each one asks for the whole 10k history and hangs up after a tenth of a second.
            for i in range(40):
                sock = raw_handshake(server.port, f"/api/v1/ws/looper-{i % 4}?since=0-0")
                reconnects += 1
                await asyncio.sleep(0.1)
                sock.close()

        loop_task = asyncio.create_task(reconnect_loop())
        while not loop_task.done():
            worst = max(worst, await healthz_latency(server, client))
            await asyncio.sleep(0.05)
        await loop_task
    await healthy_reader_is_served(server, "healthy-during-reconnects")
    print(f"\n{reconnects} resumes over {HISTORY} messages at ~10/s: worst /healthz {worst:.3f} s")
    assert worst < 1.0, f"/healthz took {worst:.2f} s during the reconnect loop"


@pytest.mark.anyio
async def test_a_10k_message_resume_is_delivered_whole_in_order(big_history: tuple[Server, list[str]]) -> None:
    server, ids = big_history
    # Not the very first: other tests' messages may have pushed the oldest few out of the history since.
    since = ids[100]
    async with connect(server.listen_url("whole", f"since={since}"), max_size=None) as ws:
        got: list[str] = []
        while True:
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
            if frame["type"] == "resume":
                break
            got.append(frame["id"])
        assert got == ids[101:]
        assert frame == {"type": "resume", "recovered": True, "replayed": HISTORY - 101}


@pytest.mark.anyio
async def test_messages_published_during_a_long_replay_arrive_once_in_order() -> None:
    with run_server({"send_queue_size": "16"}) as server:  # small pages: many turns of the replay loop
        async with connect(server.listen_url("keeper"), max_size=None) as keeper:
            reader = asyncio.create_task(read_everything(keeper))
            ids = await fill(server, 2000, BODY)
            async with connect(server.listen_url("late", f"since={ids[0]}"), max_size=None) as ws:
                live = asyncio.create_task(fill(server, 300, "live", workers=2))
                frames: list[dict[str, Any]] = []
                resume: dict[str, Any] | None = None
                while resume is None or len(frames) < len(ids) - 1 + 300:
                    frame = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                    if frame["type"] == "resume":
                        assert resume is None, "two resume frames"
                        resume = frame
                    else:
                        frames.append(frame)
                live_ids = await live
            reader.cancel()
        got = [as_pair(f["id"]) for f in frames]
        assert got == sorted(set(got)), "ids must strictly increase: no duplicates, no reordering"
        assert got[0] > as_pair(ids[0]), "nothing at or below since"
        assert {f["id"] for f in frames} == set(ids[1:]) | set(live_ids)
        assert resume is not None
        assert resume["recovered"] is True
        server.assert_clean_log()


def test_a_replay_that_makes_no_progress_is_dropped_after_ping_timeout() -> None:
    # Pings far apart: the replay's own clock has to do it, not the keepalive.
    with run_server({"ping_interval": "300", "ping_timeout": "2"}) as server:

        async def setup() -> None:
            async with connect(server.listen_url("keeper"), max_size=None) as keeper:
                reader = asyncio.create_task(read_everything(keeper))
                await fill(server, 3000, "y" * 4000)  # 12 MB: more than the kernel buffers of a socket
                reader.cancel()

        asyncio.run(setup())
        started = time.monotonic()
        sock = raw_handshake(server.port, "/api/v1/ws/stuck?since=0-0", rcvbuf=4096)
        stream = raw_stream(server.port, "/api/v1/sse/stuck-sse?since=0-0", rcvbuf=4096)
        # The peers read nothing: within PING_TIMEOUT (plus the moment it takes to fill their buffers, plus
        # 1 s) they leave the server. Reading them before that would be progress, so the test watches status.
        wait_until(lambda: not {"stuck", "stuck-sse"} & set(server.status()["active_user_ids"]), 2 + 1 + 3, "the drop")
        took = time.monotonic() - started
        for peer in (sock, stream):
            assert drain_until_closed(peer, 5) in ("reset", "eof")
            peer.close()
        print(f"\nstalled resumes dropped {took:.1f} s after connecting (PING_TIMEOUT 2 s)")
        server.assert_clean_log()


# --- HISTORY_BYTES ------------------------------------------------------------------------------------------

BIG = "€" * 65536  # the longest message, 3 bytes a character: a frame of about 196 KB


@pytest.mark.anyio
async def test_big_messages_are_bounded_by_history_bytes() -> None:
    limit_mb = 16
    with run_server({"history_bytes": f"{limit_mb}MiB"}) as server:
        async with connect(server.listen_url("keeper"), max_size=None) as keeper:
            reader = asyncio.create_task(read_everything(keeper))
            await fill(server, 20, BIG)  # warm up: the first big bodies grow the heap for good
            before = vm_rss_kib(server.proc.pid)
            ids = await fill(server, 600, BIG, workers=4)  # 118 MB of frames, far over 16 MiB
            grown = (vm_rss_kib(server.proc.pid) - before) / 1024
            reader.cancel()
        print(f"\n600 x 196 KB messages with HISTORY_BYTES={limit_mb} MiB: RSS +{grown:.1f} MB")
        assert grown < limit_mb + 30, f"RSS grew by {grown:.0f} MB"
        # What is kept is the newest, as many as fit, and a resume from the start says some are missing.
        async with connect(server.listen_url("reader", f"since={ids[0]}"), max_size=None) as ws:
            replayed: list[str] = []
            while (frame := orjson.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "resume":
                replayed.append(frame["id"])
            assert frame["recovered"] is False
            kept = len(replayed)
            assert 0 < kept <= limit_mb * 1024 * 1024 // 196_000
            assert replayed == ids[-kept:]
        server.assert_clean_log()


@pytest.mark.anyio
async def test_history_bytes_counts_frames_and_targets_and_evicts_the_oldest() -> None:
    backend = MemoryBackend(history_size=10_000, history_ttl=300, history_bytes=1024 * 1024)
    many = frozenset(f"user-{i:04d}-{'x' * 100}" for i in range(1000))  # 1,000 long ids: ~160 KB of targets
    first = backend._append(many, Draft("notification", "small", None))
    for i in range(40):
        backend._append(many, Draft("notification", f"m{i}", None))
    count, size = backend.retained
    assert size <= 1024 * 1024
    assert count < 10, "the targets count: ~160 KB an entry, so only a few fit in 1 MiB"
    replay = await backend.replay(next(iter(many)), first.id)
    assert replay.recovered is False
    assert len(replay.messages) == count


@pytest.mark.anyio
async def test_a_replay_page_is_bounded_by_count_bytes_and_scan() -> None:
    backend = MemoryBackend(history_size=10_000, history_ttl=300, history_bytes=1 << 30)
    for i in range(5000):
        backend._append(frozenset({"other"}) if i % 1000 else None, Draft("notification", "x" * 1000, None))
    start = MessageId(0, 0)
    page = await backend.replay_page("alice", start, 256, 1 << 30)
    assert page.more
    assert len(page.messages) == 3  # the broadcasts among the first 2,048 entries looked at
    page = await backend.replay_page("other", start, 256, 1 << 30)
    assert page.more
    assert len(page.messages) == 256
    page = await backend.replay_page("other", start, 256, 10_000)
    assert page.more
    assert len(page.messages) == 10  # about max_bytes: it stops once it has reached it
    shared = await backend.replay_page("other", start, 1, 1 << 30)
    assert shared.messages[0].wire is page.messages[0].wire, "a page shares the history's frame, never copies"


# --- Redis mode ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_redis_never_reading_resumes_are_pulled_in_pages() -> None:
    with redis_server() as redis, run_server({"broker_url": redis.url}) as server:
        async with connect(server.listen_url("keeper"), max_size=None) as keeper:
            reader = asyncio.create_task(read_everything(keeper))
            ids = await fill(server, 3000, BODY)
            reader.cancel()
        pid = server.proc.pid
        before = vm_rss_kib(pid)
        sockets = [raw_handshake(server.port, f"/api/v1/ws/r-{i}?since=0-0", rcvbuf=4096) for i in range(30)]
        peak = before
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                await healthz_latency(server, client)
                peak = max(peak, vm_rss_kib(pid))
                await asyncio.sleep(0.05)
        await healthy_reader_is_served(server, "healthy")
        grown = (peak - before) / 1024
        print(f"\nRedis: 30 never-reading resumes over 3000 x 1 KB: RSS +{grown:.1f} MB")
        assert grown < 40, f"RSS grew by {grown:.0f} MB (a whole replay each would be about 130 MB)"
        for sock in sockets:
            sock.close()
        # And a reader gets the whole history, in order, page after page.
        async with connect(server.listen_url("whole", f"since={ids[0]}"), max_size=None) as ws:
            got: list[str] = []
            while (frame := orjson.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "resume":
                got.append(frame["id"])
            assert got == ids[1:]
            assert frame == {"type": "resume", "recovered": True, "replayed": len(ids) - 1}
        server.assert_clean_log()


@pytest.mark.anyio
async def test_redis_stream_is_trimmed_to_history_bytes() -> None:
    from redis.asyncio import Redis

    cap = 4 * 1024 * 1024
    with redis_server() as redis, run_server({"broker_url": redis.url, "history_bytes": "4MiB"}) as server:
        async with connect(server.listen_url("keeper"), max_size=None) as keeper:
            reader = asyncio.create_task(read_everything(keeper))
            ids = await fill(server, 100, BIG, workers=4)  # about 20 MB of messages
            client = Redis.from_url(redis.url)
            try:

                async def small_enough() -> bool:
                    # The trim runs at most once a second, when the reader gets entries: keep some coming.
                    await fill(server, 1, "tick", workers=1)
                    used = await client.memory_usage("diary-ws:feed", samples=0)
                    return used is not None and used <= cap * 1.25

                await async_wait_until(small_enough, 10, "the stream to be trimmed to about HISTORY_BYTES")
            finally:
                await client.aclose()
            reader.cancel()
        async with connect(server.listen_url("reader", f"since={ids[0]}"), max_size=None) as ws:
            replayed: list[str] = []
            while (frame := orjson.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "resume":
                replayed.append(frame["id"])
            assert frame["recovered"] is False
            assert len([i for i in replayed if i in ids]) <= cap // 196_000 + 2
        server.assert_clean_log()
