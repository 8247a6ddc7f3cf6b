"""`server.OneWrite`: a small answer leaves in one write, and nothing else is held back."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

import pytest

from diary_ws.server import OneWrite
from tests.utils import Server

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
