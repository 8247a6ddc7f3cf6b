"""The load generator's parts: picows sockets that check every frame, and a bare keep-alive HTTP client.

Both are chosen to cost the load generator as little CPU per frame and per request as Python allows, so
that the server, not the client, is what the benchmark measures (the `websockets` client costs about
twice as much per frame). The suite reports the load generator's own CPU share, so a run where it was
the bottleneck says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect


class Receipts:
    """Every socket's receipts: when each broadcast arrived, and whether any was lost, repeated or late.

    Broadcast `k` carries the message text `b <k>`, so each socket knows what it should see next.
    """

    def __init__(self) -> None:
        self.stamps: dict[int, list[float]] = {}
        self.waiting: dict[int, tuple[int, asyncio.Event]] = {}
        self.duplicated = 0
        self.reordered = 0
        self.frames = 0
        self.other = 0

    def expect(self, seq: int, count: int) -> asyncio.Event:
        """An event set once `count` sockets have received broadcast `seq`."""
        done = asyncio.Event()
        self.stamps.setdefault(seq, [])
        self.waiting[seq] = (count, done)
        return done

    def got(self, listener: Listener, payload: bytes) -> None:
        now = time.monotonic()
        self.frames += 1
        try:
            seq = int(orjson.loads(payload)["message"][2:])
        except (ValueError, KeyError, TypeError):
            self.other += 1  # a frame that is not one of ours: counted, never a crash
            return
        bit = 1 << seq
        if listener.seen & bit:
            self.duplicated += 1
            return
        if seq < listener.last:
            self.reordered += 1
        listener.seen |= bit
        listener.last = max(listener.last, seq)
        stamps = self.stamps.setdefault(seq, [])
        stamps.append(now)
        wanted = self.waiting.get(seq)
        if wanted is not None and len(stamps) >= wanted[0]:
            wanted[1].set()


class Listener(WSListener):  # type: ignore[misc]  # picows ships no type information
    """One receive-only socket; it answers pings itself (picows' auto-pong)."""

    def __init__(self, receipts: Receipts) -> None:
        super().__init__()
        self.receipts = receipts
        self.seen = 0  # bit k set: broadcast k arrived
        self.last = -1
        self.transport: WSTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.receipts.got(self, frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def count(self, upto: int) -> int:
        """How many of broadcasts 0..upto-1 this socket got."""
        return (self.seen & ((1 << upto) - 1)).bit_count()


async def open_sockets(url: str, user_ids: Sequence[str], receipts: Receipts, concurrency: int) -> list[Listener]:
    """Connect one socket per user id, `concurrency` handshakes at a time."""
    listeners: list[Listener] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(user_id: str) -> None:
        async with gate:
            _transport, listener = await ws_connect(lambda: Listener(receipts), f"{url}/{user_id}")
            listeners.append(listener)

    await asyncio.gather(*(one(u) for u in user_ids))
    return listeners


async def close_sockets(listeners: Sequence[Listener], limit: float = 10) -> None:
    """Disconnect them all and wait (bounded) until each is gone."""
    for listener in listeners:
        if listener.transport is not None:
            listener.transport.disconnect(graceful=False)
    await asyncio.wait_for(asyncio.gather(*(listener.closed for listener in listeners)), limit)


class Http:
    """One keep-alive HTTP/1.1 connection that sends ready-made requests and reads Content-Length answers."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Http:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    def request_bytes(self, method: str, path: str, body: bytes | None = None) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + (body or b"")

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """One request out, its answer in: the status code and the body."""
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(request)
        reader = self._reader
        status = int((await reader.readline()).split(b" ", 2)[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await reader.readexactly(length)

    async def post_json(self, path: str, body: object) -> tuple[int, bytes]:
        return await self.send(self.request_bytes("POST", path, orjson.dumps(body)))

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self.send(self.request_bytes("GET", path))
