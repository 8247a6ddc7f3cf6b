"""Fan-out and counts over real sockets: broadcasts, targeted sends, several sockets a user, vanished peers."""

from __future__ import annotations

import socket
import struct

import orjson
import pytest
from websockets.asyncio.client import connect

from tests.utils import Server, async_wait_until, next_frame, raw_handshake


@pytest.mark.anyio
async def test_broadcast_reaches_every_socket_once(server: Server) -> None:
    sockets = [await connect(server.listen_url(f"user-{i}")) for i in range(10)]
    answer = server.post({"message": "to all"})
    assert answer.status_code == 200
    body = answer.json()
    assert (body["sent_count"], body["total_connections"], body["disconnected_users"]) == (10, 10, 0)
    assert body["message"] == "Notification sent to 10 users"
    for ws in sockets:
        frame = await next_frame(ws)
        assert frame["message"] == "to all"
        assert frame["id"] == body["id"]
        await ws.close()


@pytest.mark.anyio
async def test_targeted_send_reaches_only_the_named_users(server: Server) -> None:
    async with (
        connect(server.listen_url("alice")) as alice,
        connect(server.listen_url("bob")) as bob,
        connect(server.listen_url("carol")) as carol,
    ):
        body = server.post({"message": "psst", "user_ids": ["alice", "carol", "nobody"]}).json()
        assert (body["sent_count"], body["total_connections"]) == (2, 2)
        assert (await next_frame(alice))["message"] == "psst"
        assert (await next_frame(carol))["message"] == "psst"
        server.post({"message": "marker", "user_ids": ["bob"]})
        assert (await next_frame(bob))["message"] == "marker"  # bob's first frame: the targeted one skipped him


@pytest.mark.anyio
async def test_a_user_with_two_sockets_counts_two_sockets_and_one_user(server: Server) -> None:
    async with connect(server.listen_url("alice")) as one, connect(server.listen_url("alice")) as two:
        status = server.status()
        assert (status["connected_users"], status["total_connections"]) == (1, 2)
        assert status["active_user_ids"] == ["alice"]
        body = server.post({"message": "both", "user_ids": ["alice"]}).json()
        assert (body["sent_count"], body["total_connections"], body["disconnected_users"]) == (2, 2, 0)
        assert body["message"] == "Notification sent to 1 user"
        assert (await next_frame(one))["id"] == (await next_frame(two))["id"] == body["id"]


@pytest.mark.anyio
async def test_per_socket_order_holds_under_a_burst(server: Server) -> None:
    async with connect(server.listen_url("alice")) as ws:
        for i in range(200):
            assert server.post({"message": str(i), "user_ids": ["alice"]}).status_code == 200
        got = [int((await next_frame(ws))["message"]) for _ in range(200)]
        assert got == list(range(200))


@pytest.mark.anyio
async def test_nobody_connected_is_a_404_and_nothing_is_stored(server: Server) -> None:
    answer = server.post({"message": "hello?", "user_ids": ["ghost"]})
    assert answer.status_code == 404
    body = answer.json()
    assert body["status"] == "error"
    assert (body["sent_count"], body["total_connections"], body["disconnected_users"]) == (0, 0, 0)
    assert "id" not in body
    # Not stored: a resume from the beginning of this run finds nothing for the ghost.
    async with connect(server.listen_url("ghost", "since=1-0")) as ws:
        frame = await next_frame(ws)
        assert frame["type"] == "resume"
        assert frame["replayed"] == 0


def _reset(sock: socket.socket) -> None:
    """Vanish without a close frame: SO_LINGER 0 makes close() send a TCP reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.anyio
async def test_clients_that_vanish_without_a_close_frame_are_cleaned_up(server: Server) -> None:
    async with connect(server.listen_url("stays")) as stays:
        gone = [raw_handshake(server.port, f"/api/v1/ws/gone-{i}") for i in range(3)]
        half_gone = raw_handshake(server.port, "/api/v1/ws/gone-fin")
        assert server.status()["total_connections"] == 5
        for sock in gone:
            _reset(sock)
        half_gone.close()  # a FIN with no close frame, like a killed process
        # A publish right away may still see some of them: every socket is then either sent to or counted dead.
        body = server.post({"message": "anyone?"}).json()
        assert body["sent_count"] + body["disconnected_users"] == body["total_connections"]
        assert body["sent_count"] >= 1
        assert (await next_frame(stays))["message"] == "anyone?"
        await async_wait_until(lambda: server.status()["total_connections"] == 1, 5, "vanished sockets to go")
        assert server.status()["active_user_ids"] == ["stays"]
        body = server.post({"message": "again"}).json()
        assert (body["sent_count"], body["total_connections"], body["disconnected_users"]) == (1, 1, 0)


@pytest.mark.anyio
async def test_client_frames_are_read_and_thrown_away(server: Server) -> None:
    async with connect(server.listen_url("chatty")) as ws:
        for _ in range(10):
            await ws.send("hello server")
        await ws.send(b"\x00\x01")
        body = server.post({"message": "still here", "user_ids": ["chatty"]}).json()
        assert body["sent_count"] == 1
        frame = await next_frame(ws)
        assert frame["message"] == "still here"  # nothing was echoed back before it


@pytest.mark.anyio
async def test_per_user_connection_limit_is_429_before_the_upgrade() -> None:
    from websockets.exceptions import InvalidStatus

    from tests.utils import run_server

    with run_server({"max_connections_per_user": "2", "max_connections": "3"}) as srv:
        async with connect(srv.listen_url("alice")), connect(srv.listen_url("alice")):
            with pytest.raises(InvalidStatus) as refused:
                await connect(srv.listen_url("alice"))
            assert refused.value.response.status_code == 429
            assert orjson.loads(refused.value.response.body)["status"] == "error"
            async with connect(srv.listen_url("bob")):
                with pytest.raises(InvalidStatus) as full:
                    await connect(srv.listen_url("carol"))
                assert full.value.response.status_code == 503
                assert "MAX_CONNECTIONS" in orjson.loads(full.value.response.body)["message"]
        # Slots come back when sockets close.
        await async_wait_until(lambda: srv.status()["total_connections"] == 0, 5, "sockets to close")
        async with connect(srv.listen_url("carol")) as ws:
            assert srv.post({"message": "in", "user_ids": ["carol"]}).status_code == 200
            assert (await next_frame(ws))["message"] == "in"
        srv.assert_clean_log()


@pytest.mark.anyio
@pytest.mark.parametrize("deflate", ["1", "0"])
async def test_compressed_and_plain_sockets_get_the_same_frames(deflate: str) -> None:
    """A shared ready-made frame must never reach a socket that negotiated per-message deflate."""
    from tests.utils import run_server

    with run_server({"per_message_deflate": deflate}) as srv:
        async with (
            connect(srv.listen_url("zip"), compression="deflate") as zipped,
            connect(srv.listen_url("plain"), compression=None) as plain,
        ):
            assert bool(zipped.protocol.extensions) == (deflate == "1")
            assert not plain.protocol.extensions
            messages = ["short", "é" * 300, "é" * 33000]  # 7-bit, 16-bit and 64-bit frame lengths
            for text in messages:
                assert srv.post({"message": text}).json()["sent_count"] == 2
            for ws in (zipped, plain):
                assert [(await next_frame(ws))["message"] for _ in messages] == messages
        srv.assert_clean_log()
