"""Graceful shutdown: readiness turns at once, every reader gets a 1012 close, stalled peers cannot hold it."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.utils import ON_BOTH_LOOPS, async_wait_until, drain_until_closed, raw_handshake, run_server

pytestmark = ON_BOTH_LOOPS  # the transport hooks run on both event loops


async def close_code(ws: ClientConnection) -> tuple[int | None, str]:
    """Read until the server closes; the close code and reason it sent."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed as closed:
        if closed.rcvd is None:
            return None, ""
        return closed.rcvd.code, closed.rcvd.reason


@pytest.mark.anyio
async def test_sigterm_closes_readers_with_1012_and_exits_fast_despite_stalled_peers() -> None:
    # Backlog caps far above the traffic, so each stalled peer holds megabytes in this process, past what the
    # kernel buffers absorb: the transport is paused and a plain close() would wait on it forever.
    with run_server({"send_queue_bytes": "16MiB", "send_queue_size": "100000"}) as srv:
        readers = [await connect(srv.listen_url(f"reader-{i}"), max_size=None) for i in range(5)]
        stalled = [raw_handshake(srv.port, f"/api/v1/ws/stalled-{i}", rcvbuf=4096) for i in range(3)]
        draining = [asyncio.create_task(close_code(ws)) for ws in readers]
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as client:
            for i in range(800):  # ~6.4 MB for each stalled peer
                answer = await client.post("/api/v1/ws/notification", json={"message": f"{i} " + "x" * 8000})
                assert answer.json()["disconnected_users"] == 0
        assert srv.status()["total_connections"] == 8

        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*draining)
        await asyncio.to_thread(srv.proc.wait, 10)
        took = time.monotonic() - started

        assert took < 5.0, f"exit took {took:.1f} s"
        assert srv.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        for code, reason in codes:
            assert code == 1012
            assert "reconnect with since after" in reason
        for sock in stalled:
            assert drain_until_closed(sock, 5) == "reset"
            sock.close()
        srv.assert_clean_log()


@pytest.mark.anyio
async def test_drain_turns_readyz_503_at_once_and_still_accepts_clients() -> None:
    with run_server({"drain_seconds": "3"}) as srv:
        assert srv.get("/readyz").status_code == 200
        async with connect(srv.listen_url("early")) as early:
            srv.proc.send_signal(signal.SIGTERM)
            await async_wait_until(lambda: srv.get("/readyz").status_code == 503, 1.0, "readyz to turn 503")
            body = srv.get("/readyz").json()
            assert body["status"] == "error"
            assert "shutting down" in body["message"]
            # Draining: the balancer stops sending clients, but one that still comes is served.
            async with connect(srv.listen_url("late")) as late:
                assert srv.post({"message": "still on"}).json()["sent_count"] == 2
                assert "still on" in str(await asyncio.wait_for(late.recv(), 5))
            assert "still on" in str(await asyncio.wait_for(early.recv(), 5))
            code, _reason = await close_code(early)
            assert code == 1012
        await asyncio.to_thread(srv.proc.wait, 10)
        assert srv.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        srv.assert_clean_log()
