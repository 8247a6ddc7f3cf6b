"""A small Server-Sent Events reader for the tests, over httpx's streaming responses or a bare socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class Event:
    """One SSE block: the lines up to a blank line, split into its fields."""

    lines: list[str] = field(default_factory=list)

    def value(self, name: str) -> str | None:
        values = [line[len(name) + 2 :] for line in self.lines if line.startswith(name + ": ")]
        return values[-1] if values else None

    @property
    def id(self) -> str | None:
        return self.value("id")

    @property
    def data(self) -> str | None:
        return self.value("data")

    @property
    def comments(self) -> list[str]:
        return [line[2:] for line in self.lines if line.startswith(": ")]

    def json(self) -> dict[str, Any]:
        assert self.data is not None, self.lines
        frame: dict[str, Any] = orjson.loads(self.data)
        return frame


class EventReader:
    """Reads whole events from a streaming response, each within a time limit."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, limit: float = 5, *, pings: bool = False) -> Event:
        """The next event; comment-only `: ping` blocks are skipped unless `pings`."""
        while True:
            event = await asyncio.wait_for(self._block(), limit)
            if pings or event.comments != ["ping"] or event.data is not None:
                return event

    async def _block(self) -> Event:
        event = Event()
        async for line in self._lines:
            if line == "":
                if event.lines:
                    return event
                continue
            event.lines.append(line)
        raise EOFError(f"the stream ended; last lines: {event.lines}")


@contextlib.asynccontextmanager
async def open_stream(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[EventReader]:
    """GET an event stream; closing the context hangs up, as a browser tab that goes away would."""
    async with httpx.AsyncClient(timeout=30) as client, client.stream("GET", url, headers=headers) as response:
        yield EventReader(response)


def raw_stream(port: int, path: str, *, rcvbuf: int | None = None) -> socket.socket:
    """An SSE request over a bare socket that reads the response head and then only what it is told to."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"server closed before the response head: {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock
