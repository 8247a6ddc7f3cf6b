"""What `diary_ws.edge` trims from every idle socket, and that the trimmed sockets still work."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from diary_ws import cli
from diary_ws.app import create_app
from diary_ws.edge import DiaryServer, DiaryWebSocketProtocol, ReceiveQueue, WritableGate
from diary_ws.settings import from_env
from tests.utils import ON_BOTH_LOOPS, Server, async_wait_until, free_port, raw_handshake, serve_in_process

pytestmark = ON_BOTH_LOOPS  # the transport hooks run on both event loops


def masked_text_frame(payload: bytes) -> bytes:
    """A client's text frame (clients must mask)."""
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + struct.pack("!H", size))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the server closed the connection"
            data += chunk
        return data

    first, second = exactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", exactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", exactly(8))[0]
    return first & 0x0F, exactly(size)


def test_a_frame_sent_with_the_handshake_is_still_read(server: Server) -> None:
    """Bytes that arrive with the handshake keep websockets' own parser (the trim is skipped), and work."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        request = (
            b"GET /api/v1/ws/early HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        sock.sendall(request + masked_text_frame(b"hello"))  # one write: the frame rides with the handshake
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert server.post({"message": "after an early frame", "user_ids": ["early"]}).status_code == 200
        opcode, payload = read_frame(sock)
        assert opcode == 1
        assert b"after an early frame" in payload
        sock.sendall(masked_text_frame(b"x" * 5000))  # over MAX_INCOMING_BYTES: the parser is alive and polices
        opcode, payload = read_frame(sock)
        assert opcode == 8
        assert struct.unpack("!H", payload[:2])[0] == 1009


def test_frames_after_the_handshake_go_through_the_fresh_parser(server: Server) -> None:
    sock = raw_handshake(server.port, "/api/v1/ws/later")
    with sock:
        sock.sendall(masked_text_frame(b"ignored"))
        assert server.post({"message": "still delivered", "user_ids": ["later"]}).status_code == 200
        opcode, payload = read_frame(sock)
        assert opcode == 1
        assert b"still delivered" in payload
        sock.sendall(masked_text_frame(b"x" * 5000))
        opcode, payload = read_frame(sock)
        assert opcode == 8
        assert struct.unpack("!H", payload[:2])[0] == 1009
    server.assert_clean_log()


@pytest.mark.anyio
async def test_an_open_socket_keeps_no_handshake() -> None:
    app = create_app()
    async with serve_in_process(app) as base, connect(f"ws://{base}/api/v1/ws/slim", compression=None) as ws:
        hub = app.state.hub
        await async_wait_until(lambda: list(hub.connections()), 5, "the socket to register")
        (conn,) = hub.connections()
        # White-box on purpose: this is the memory trim itself. The protocol sits behind the sink's hooks.
        protocol = conn.sink._control._protocol
        assert isinstance(protocol, DiaryWebSocketProtocol)
        assert protocol.request is None
        assert protocol.response is None
        assert not protocol.scope["headers"]  # read to admit the socket, before the accept; never after
        assert isinstance(protocol.queue, ReceiveQueue)
        assert isinstance(protocol.writable, WritableGate)
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"http://{base}/api/v1/ws/notification", json={"message": "slim"})
        assert answer.status_code == 200
        assert "slim" in str(await asyncio.wait_for(ws.recv(), 5))


@pytest.mark.anyio
async def test_receive_queue_is_fifo_and_wakes_its_reader() -> None:
    queue = ReceiveQueue()
    assert queue.empty()
    reader = asyncio.create_task(queue.get())
    await asyncio.sleep(0)  # let the reader start waiting: the point is the wake-up
    queue.put_nowait({"n": 1})
    queue.put_nowait({"n": 2})
    assert await asyncio.wait_for(reader, 1) == {"n": 1}
    assert not queue.empty()
    assert await asyncio.wait_for(queue.get(), 1) == {"n": 2}
    assert queue.empty()


@pytest.mark.anyio
async def test_writable_gate_holds_writers_until_set() -> None:
    gate = WritableGate()
    assert gate.is_set()
    assert await asyncio.wait_for(gate.wait(), 1)
    gate.clear()
    waiters = [asyncio.create_task(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]


@pytest.mark.anyio
async def test_an_idle_socket_awaits_through_four_coroutines() -> None:
    """A socket's await chain lives as long as the socket, and each coroutine in it keeps a frame (a few
    hundred bytes and objects the collector tracks) at every idle socket. It was nine: Starlette's app and
    router, uvicorn's run_asgi and ours over it, Listen, read_and_discard, and three for the receive (ours,
    uvicorn's, the queue's get). Now the app, the router and the receive hand on the coroutine or await a
    bare future, and the queue and the writable gate hold no list while idle."""
    port = free_port()
    settings = from_env({"DIARY_WS_PORT": str(port), "DIARY_WS_LOG_LEVEL": "warning"})
    app = create_app(settings)
    server = DiaryServer(cli.uvicorn_config(settings, app), on_signal=lambda: None, drain_seconds=0)
    serving = asyncio.create_task(server.serve())  # as `diary-ws serve` runs it, without TRUSTED_PROXIES
    await async_wait_until(lambda: server.started, 10, "the server to start")
    try:
        async with connect(f"ws://127.0.0.1:{port}/api/v1/ws/chain", compression=None):
            await chain_of_an_idle_socket(app)
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def chain_of_an_idle_socket(app: Any) -> None:
    """The coroutines an idle socket's task awaits through, and what its queue and gate hold."""
    hub = app.state.hub
    await async_wait_until(lambda: list(hub.connections()), 5, "the socket to register")
    (conn,) = hub.connections()
    protocol = conn.sink._control._protocol  # white-box on purpose, as above
    (task,) = protocol.tasks
    names: list[str] = []
    awaited: Any = task.get_coro()
    while hasattr(awaited, "cr_code"):
        names.append(awaited.cr_code.co_qualname)
        awaited = awaited.cr_await
    assert names == [
        "WebSocketsSansIOProtocol.run_asgi",
        "Listen.__call__",
        "read_and_discard",
        "DiaryWebSocketProtocol.receive",
    ]
    # The receive waits on the queue's future itself: what a future's __await__ hands on.
    assert type(awaited) is type(asyncio.get_running_loop().create_future().__await__())
    assert protocol.queue.empty()
    assert protocol.queue._items is None
    assert protocol.writable._waiters is None
