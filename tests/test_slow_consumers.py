"""Slow consumers over real sockets: peers that never read must not slow, block or starve anybody else."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.utils import (
    ON_BOTH_LOOPS,
    Server,
    async_wait_until,
    drain_until_closed,
    open_fds,
    raw_handshake,
    vm_rss_kib,
)

pytestmark = ON_BOTH_LOOPS  # the transport hooks run on both event loops

READERS = 20
STALLED = 3
PAYLOAD = "x" * 8000  # 8 KB messages: the default 1 MiB backlog overflows after a few hundred
PUBLISHES = 600


async def read_all(ws: ClientConnection, count: int) -> list[dict[str, object]]:
    """Every frame until `count` have come."""
    frames: list[dict[str, object]] = []
    while len(frames) < count:
        frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), 20)))
    return frames


@pytest.mark.anyio
async def test_stalled_peers_are_dropped_and_readers_get_everything_in_order(server: Server) -> None:
    stalled = [raw_handshake(server.port, f"/api/v1/ws/stalled-{i}", rcvbuf=4096) for i in range(STALLED)]
    readers = [await connect(server.listen_url(f"reader-{i}"), max_size=None) for i in range(READERS)]
    fds_before = open_fds(server.proc.pid)
    rss_before = vm_rss_kib(server.proc.pid)
    collectors = [asyncio.create_task(read_all(ws, PUBLISHES)) for ws in readers]

    slowest = 0.0
    dropped = 0
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
        for i in range(PUBLISHES):
            started = time.monotonic()
            answer = await client.post("/api/v1/ws/notification", json={"message": f"{i} {PAYLOAD}"})
            slowest = max(slowest, time.monotonic() - started)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["sent_count"] + body["disconnected_users"] == body["total_connections"]
            dropped += body["disconnected_users"]

    # Each stalled peer is counted once, in the publish that overflowed its backlog.
    assert dropped == STALLED
    # A publish hands off and returns; it never waits for a socket (a blocked one would hang for good).
    assert slowest < 2.0, f"a publish took {slowest:.2f} s"

    # Every reader got every message, in order, once.
    for frames in await asyncio.gather(*collectors):
        assert [int(str(f["message"]).split()[0]) for f in frames] == list(range(PUBLISHES))
        ids = [tuple(map(int, str(f["id"]).split("-"))) for f in frames]
        assert ids == sorted(set(ids))

    # The stalled peers left the registry at once, and their connections were reset, not left to linger.
    status = server.status()
    assert status["total_connections"] == READERS
    assert not [u for u in status["active_user_ids"] if u.startswith("stalled-")]
    for sock in stalled:
        assert drain_until_closed(sock, 10) == "reset"
        sock.close()
    await async_wait_until(lambda: open_fds(server.proc.pid) <= fds_before - STALLED, 10, "descriptors to be freed")
    # Memory stays bounded: the history holds 600 x 8 KB once, and no stalled backlog is kept.
    grown = vm_rss_kib(server.proc.pid) - rss_before
    assert grown < 64 * 1024, f"RSS grew by {grown} KiB"
    for ws in readers:
        await ws.close()


@pytest.mark.anyio
async def test_a_stalled_peer_does_not_delay_its_own_users_other_socket(server: Server) -> None:
    """One user, two sockets: the stalled one is dropped, the live one keeps getting everything."""
    stalled = raw_handshake(server.port, "/api/v1/ws/alice", rcvbuf=4096)
    async with connect(server.listen_url("alice"), max_size=None) as live:
        collector = asyncio.create_task(read_all(live, 500))
        counts = []
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
            for i in range(500):
                answer = await client.post(
                    "/api/v1/ws/notification", json={"message": f"{i} {PAYLOAD}", "user_ids": ["alice"]}
                )
                counts.append(answer.json())
        frames = await collector
        assert [int(str(f["message"]).split()[0]) for f in frames] == list(range(500))
        assert counts[0]["total_connections"] == 2
        assert counts[-1]["total_connections"] == 1
        assert sum(c["disconnected_users"] for c in counts) == 1
        assert all(c["message"] == "Notification sent to 1 user" for c in counts)
    assert drain_until_closed(stalled, 10) == "reset"
    stalled.close()


@pytest.mark.anyio
async def test_a_peer_that_reads_nothing_is_freed_after_the_ping_timeout_without_any_overflow() -> None:
    """No traffic big enough to overflow anything: the keepalive and the stall timer still free the peer."""
    from tests.utils import run_server

    with run_server({"ping_interval": "0.5", "ping_timeout": "1"}) as srv:
        quiet = raw_handshake(srv.port, "/api/v1/ws/quiet", rcvbuf=4096)  # never reads, never pongs
        stuck = raw_handshake(srv.port, "/api/v1/ws/stuck", rcvbuf=4096)  # and has megabytes waiting
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as client:
            for i in range(100):
                answer = await client.post(
                    "/api/v1/ws/notification", json={"message": f"{i} {PAYLOAD}", "user_ids": ["stuck"]}
                )
                assert answer.json()["disconnected_users"] == 0  # well below the backlog caps
        await async_wait_until(lambda: srv.status()["total_connections"] == 0, 10, "both peers to be dropped")
        assert drain_until_closed(stuck, 10) == "reset"  # unsent data: reset, so the kernel frees it too
        assert drain_until_closed(quiet, 10) in ("eof", "reset")
        for sock in (quiet, stuck):
            sock.close()
        log = srv.log()
        assert "Traceback" not in log
