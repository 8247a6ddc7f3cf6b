"""diary-ws's HTTP protocol: a small answer leaves in one write (`OneWrite`), nothing else is held back, and
keep-alive still closes idle connections, and only those."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import cast

import pytest
import uvicorn

from diary_ws import create_app
from diary_ws.edge import DiaryHttpProtocol, OneWrite
from tests.utils import ON_BOTH_LOOPS, Server, async_wait_until, free_port

pytestmark = ON_BOTH_LOOPS  # the transport hooks run on both event loops

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n"
STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


class Recording:
    """Records what reaches the socket. uvicorn's request cycle uses only these three transport methods."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def one_write(can_hold: bool = True) -> tuple[OneWrite, Recording]:
    socket_side = Recording()
    return OneWrite(cast(asyncio.Transport, socket_side), can_hold), socket_side


def test_a_sized_answer_goes_out_in_one_write() -> None:
    transport, wire = one_write()
    transport.write(HEAD)
    assert wire.writes == []
    transport.write(b"{}")
    assert wire.writes == [HEAD + b"{}"]
    transport.write(b"more")  # nothing after the first pair is held
    assert wire.writes == [HEAD + b"{}", b"more"]


def test_a_stream_head_is_not_held() -> None:
    transport, wire = one_write()
    transport.write(STREAM_HEAD)
    assert wire.writes == [STREAM_HEAD]  # an event stream's client must see its headers before any event


def test_a_head_request_answer_is_not_held() -> None:
    transport, wire = one_write(can_hold=False)
    transport.write(HEAD)  # uvicorn writes no body for HEAD
    assert wire.writes == [HEAD]


def test_an_interim_100_continue_passes_and_the_answer_is_still_one_write() -> None:
    transport, wire = one_write()
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    transport.write(HEAD)
    transport.write(b"{}")
    assert wire.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", HEAD + b"{}"]


def test_close_between_head_and_body_sends_the_head_first() -> None:
    transport, wire = one_write()
    transport.write(HEAD)
    transport.close()
    assert wire.writes == [HEAD]
    assert wire.closed
    assert transport.is_closing()


@pytest.mark.anyio
async def test_head_and_a_sized_get_are_answered_by_the_real_server(server: Server) -> None:
    """End to end on diary-ws's own protocol: a HEAD answer arrives with no body, then a GET on the same socket."""

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"HEAD /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            data = b""
            while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b'{"status":"ok"}'):
                chunk = sock.recv(4096)
                assert chunk, f"the server closed the connection after {data!r}"
                data += chunk
            return data

    data = await asyncio.to_thread(exchange)
    assert data.count(b'{"status":"ok"}') == 1  # the HEAD answer had its head only


# --- keep-alive: one timer per connection, re-armed for the time left --------------------------------------

KEEP_ALIVE = 1  # seconds; uvicorn's default is 5, shortened so the test is quick


@contextlib.asynccontextmanager
async def keep_alive_server() -> AsyncIterator[int]:
    """diary-ws's HTTP protocol in real uvicorn, with a short keep-alive; yields the port."""
    config = uvicorn.Config(
        create_app(), port=free_port(), http=DiaryHttpProtocol, timeout_keep_alive=KEEP_ALIVE, log_config=None
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await async_wait_until(lambda: server.started or task.done(), 10, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield config.port
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), 5)


@pytest.mark.anyio
async def test_a_connection_in_use_stays_open_and_an_idle_one_is_closed() -> None:
    async with keep_alive_server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = asyncio.get_running_loop().time()
        # Requests 0.6 s apart for longer than two keep-alive periods: each gap is shorter than the
        # keep-alive, so the connection must stay open although the first timer fires meanwhile.
        while asyncio.get_running_loop().time() - started < 2.5 * KEEP_ALIVE:
            await healthz(reader, writer)
            await asyncio.sleep(0.6 * KEEP_ALIVE)  # the client's pace, not a wait for the server
        await healthz(reader, writer)
        idle_from = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5 * KEEP_ALIVE) == b""  # the server closes it
        assert asyncio.get_running_loop().time() - idle_from >= 0.5 * KEEP_ALIVE  # and not long before its time
        writer.close()


# --- an answer before the body is all in -------------------------------------------------------------------


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One answer with a Content-Length: its head and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection in the body of {head!r}"
        body += chunk
    return head, body


def test_a_body_answered_413_before_it_is_all_in_is_read_and_the_connection_serves_on(server: Server) -> None:
    """A client that sends its whole 4 MiB body before it reads gets its 413, and the connection its next answer.

    The app answers 413 from the Content-Length, while most of the body is still coming. When over 64 KiB of it
    came in the same read as the head, uvicorn had paused reading, and the edge never read again: the client
    waited for its own timeout (on both loops, more often on uvloop). Several rounds, as that takes a race.
    """
    size = 4 * 1024 * 1024
    body = b'{"message": "' + b"x" * (size - 15) + b'"}'
    head = b"POST /api/v1/ws/notification HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(head + b"content-length: %d\r\n\r\n" % size + body)  # TimeoutError: the server stopped reading
            answer, message = read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 413"), answer
            assert b"MAX_BODY_BYTES" in message
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")  # the rest of the body was read and dropped
            answer, message = read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert message == b'{"status":"ok"}'
