"""The WebSocket side of the edge: uvicorn's default (sans-I/O websockets) protocol with transport hooks for
the handler, hard aborts for stalled peers, a quiet denial path and slimmer idle sockets.

It also polices every frame a client sends (see `FramePolicy`), below uvicorn's dispatch, because websockets'
sans-I/O protocol answers pings and gathers continuation frames itself: the app never sees those, and a
flood of them cost the server memory and CPU without ever reaching the app's own rate check.

uvicorn internals this module relies on, beside those of the rest of the edge: `handle_events`' dispatch
(copied, to count each frame before it), `handle_ping`, `send_receive_event_to_app`, `receive` (which resumes
reading), and the attributes `frames`, `curr_msg_data_type`, `close_sent`, `read_paused`, `queue`, `conn`
(websockets `ServerProtocol`: `events_received`, `data_to_send`, `send_close`).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.frames import Frame, Opcode
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request
from websockets.protocol import OPEN, Protocol

from diary_ws.edge.transport import CLOSE_GRACE, StallWatch, hard_abort, log, unlink_transport
from diary_ws.errors import DiaryWSError, error_answer
from diary_ws.logs import warn_throttled
from diary_ws.protocols import CloseCode, WriteResult
from diary_ws.routes import SOCKET_EXTENSION


@dataclass(frozen=True, slots=True)
class FramePolicy:
    """What a client may send: every frame (data, continuation, ping, pong, close) counts toward the rate.

    `max_rate` frames a second with bursts of as many (MAX_INCOMING_RATE); a message left unfinished
    (a first fragment without its last) for `unfinished_timeout` (PING_TIMEOUT); pongs the server owes a
    peer that does not read them up to `backlog_bytes` unsent (SEND_QUEUE_BYTES), as any other frame.
    """

    max_rate: float = 50.0
    unfinished_timeout: float = 20.0
    backlog_bytes: int = 1024 * 1024


def _spent() -> Generator[None]:
    while True:
        yield


# The frame parser of every lost socket: it reads nothing and holds nothing (one for the whole process).
SPENT_PARSER = _spent()
next(SPENT_PARSER)


class SocketHooks:
    """The transport hooks a WebSocket handler gets in `scope["extensions"]`."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: DiaryWebSocketProtocol) -> None:
        self._protocol = protocol

    def stalled(self) -> bool:
        """The transport's buffer is over its high-water mark: the peer is not reading."""
        return not self._protocol.writable.is_set()

    def try_write(self, wire: bytes) -> WriteResult:
        """Write a ready-made frame if the socket takes bytes now: WROTE, LATER (not now) or DEAD (gone)."""
        protocol = self._protocol
        if protocol.close_sent or protocol.disconnected or protocol.transport.is_closing():
            return WriteResult.DEAD
        # Paused: the peer is behind, so the frame waits in the backlog. With per-message deflate each
        # socket compresses with its own context, so a shared frame cannot go out as it is.
        if not protocol.writable.is_set() or protocol.conn.extensions:
            return WriteResult.LATER
        protocol.transport.write(wire)
        return WriteResult.WROTE

    def abort(self) -> None:
        """Drop the TCP connection now. `transport.close()` would wait for a stalled peer to read first."""
        hard_abort(self._protocol.transport)


class ReceiveQueue:
    """The part of `asyncio.Queue` uvicorn uses for a socket's ASGI events, for the one reader there is.

    An `asyncio.Queue` is three deques and an Event with a fourth, about 3 KiB per idle socket before
    anything is queued; this is, while something is queued, a list and, only while the app waits, one future.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None  # no list for an idle socket's empty queue
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def waiter(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future done at the next item: awaited as it is, with no coroutine of its own alive meanwhile."""
        self._waiter = waiter = loop.create_future()
        return waiter

    def pop(self) -> Any:
        items = self._items
        assert items  # the caller checked empty()
        item = items.pop(0)
        if not items:
            self._items = None
        return item

    async def get(self) -> Any:
        while self.empty():
            await self.waiter(asyncio.get_running_loop())
        return self.pop()

    def empty(self) -> bool:
        return not self._items


class WritableGate:
    """The part of `asyncio.Event` uvicorn uses for "the transport takes bytes", with no list until a writer
    waits."""

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        if not self._open:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = [waiter]
            else:
                self._waiters.append(waiter)
            await waiter
        return True


# Sockets whose loss is handled per turn of the event loop, when many are lost at once (`lose_later`).
LOST_PER_TURN = 64
_lost: dict[asyncio.AbstractEventLoop, deque[tuple[DiaryWebSocketProtocol, Exception | None]]] = {}


def lose_later(protocol: DiaryWebSocketProtocol, exc: Exception | None) -> None:
    """Queue the rest of a socket's `connection_lost`: LOST_PER_TURN sockets a turn of the event loop.

    A proxy that restarts, or a network blip, drops every socket at once. The event loop then calls every
    protocol's `connection_lost` in one turn, and wakes every handler in the next: at 18,500 sockets, turns
    of 300 to 460 ms in which nobody else got anything, health checks included. In turns of LOST_PER_TURN
    (a few ms each), the sockets still open and the new handshakes get theirs between them.
    """
    loop = protocol.loop
    queue = _lost.get(loop)
    if queue is None:
        queue = _lost[loop] = deque()
        loop.call_soon(_lose_some, loop, queue)
    queue.append((protocol, exc))


def _lose_some(loop: asyncio.AbstractEventLoop, queue: deque[tuple[DiaryWebSocketProtocol, Exception | None]]) -> None:
    try:
        for _ in range(min(LOST_PER_TURN, len(queue))):
            protocol, exc = queue.popleft()
            protocol.finish_lost(exc)
    finally:
        if queue:
            loop.call_soon(_lose_some, loop, queue)
        else:
            del _lost[loop]


class DiaryWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's default WebSocket protocol, plus hooks to free stalled peers and a quiet denial path.

    It also slims what every idle socket keeps (issue: memory per idle socket): a lighter receive queue and
    writable flag, and no handshake request or response once the socket is open.
    """

    policy: ClassVar[FramePolicy] = FramePolicy()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stall = StallWatch("a WebSocket whose peer", self._hard_abort)
        self.queue: ReceiveQueue = ReceiveQueue()  # type: ignore[assignment]
        self.writable = WritableGate()  # type: ignore[assignment]
        self._tokens = self.policy.max_rate
        self._refilled = 0.0
        self._unfinished: asyncio.TimerHandle | None = None
        self._violated = False

    @classmethod
    def with_policy(cls, policy: FramePolicy) -> type[DiaryWebSocketProtocol]:
        """This protocol with `policy` instead of the defaults: what `diary-ws serve` gives uvicorn."""
        return type(cls.__name__, (cls,), {"policy": policy})

    # --- every incoming frame --------------------------------------------------------------------------

    def handle_events(self) -> None:
        # uvicorn's dispatch, with each frame counted first. After a violation nothing more is dispatched:
        # not even the pongs websockets has already queued for pings in the same read.
        for event in self.conn.events_received():
            if self._violated:
                return
            if isinstance(event, Request):
                self.handle_connect(event)
            elif isinstance(event, Frame) and self._admit(event):
                opcode = event.opcode
                if opcode == Opcode.CONT:
                    self.handle_cont(event)
                elif opcode == Opcode.TEXT:
                    self.handle_text(event)
                elif opcode == Opcode.BINARY:
                    self.handle_bytes(event)
                elif opcode == Opcode.PING:
                    self.handle_ping()
                elif opcode == Opcode.PONG:
                    self.handle_pong(event)
                elif opcode == Opcode.CLOSE:
                    self.handle_close(event)

    def _admit(self, frame: Frame) -> bool:
        """Count one frame against the rate, and watch fragmented messages; False once it broke a rule."""
        if frame.opcode == Opcode.CLOSE:
            return True  # the peer's close (or its answer to ours) is always let through
        rate = self.policy.max_rate
        now = self.loop.time()
        self._tokens = min(rate, self._tokens + (now - self._refilled) * rate) - 1
        self._refilled = now
        if self._tokens < 0:
            self._violate(
                CloseCode.POLICY_VIOLATION,
                f"too many frames: at most {rate:g} a second, control frames included",
                "frame_rate",
            )
            return False
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            if not frame.fin and self._unfinished is None:
                timeout = self.policy.unfinished_timeout
                self._unfinished = self.loop.call_later(timeout, self._unfinished_too_long, timeout)
            elif frame.fin and self._unfinished is not None:
                self._unfinished.cancel()
                self._unfinished = None
        return True

    def _unfinished_too_long(self, timeout: float) -> None:
        self._unfinished = None
        self._violate(
            CloseCode.POLICY_VIOLATION, f"a message was left unfinished for {timeout:g} s", "unfinished_message"
        )

    def handle_ping(self) -> None:
        # websockets has queued the pong already; a peer that reads nothing would pile pongs up unsent.
        if self.transport.get_write_buffer_size() > self.policy.backlog_bytes:
            warn_throttled(
                log, "pong_backlog", "aborting a WebSocket from %s: over %d bytes of pongs and frames unread",
                self.client, self.policy.backlog_bytes,
            )  # fmt: skip
            self.conn.data_to_send()  # dropped with the connection
            self._violated = True
            self._hard_abort()
            return
        super().handle_ping()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:  # uvicorn would log a traceback for each such message
                self.frames = []
                self._violate(CloseCode.INVALID_DATA, "a text message is not valid UTF-8", "invalid_utf8")
                return
        super().send_receive_event_to_app()

    def _violate(self, code: int, reason: str, kind: str) -> None:
        """Close for a broken rule: read nothing more from this peer, and abort if it is not gone in a second."""
        if self._violated:
            return
        self._violated = True
        warn_throttled(log, kind, "closing a WebSocket from %s with %d: %s", self.client, code, reason)
        if self._unfinished is not None:
            self._unfinished.cancel()
            self._unfinished = None
        self.frames = []
        self._stop_reading()
        self.conn.data_to_send()  # pongs owed for pings of this same read: dropped
        if not self.close_sent and not self.transport.is_closing():
            self.conn.send_close(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code})
        # As the close timer: uvicorn then leaves the transport open when the handler ends, so the close
        # frame is not cut short by a reset, and the peer has a second to take it before the abort.
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(CLOSE_GRACE, self._hard_abort)

    # Each of these methods replaces uvicorn's rather than wrapping it: a coroutine that awaits another stays
    # alive, with its frame, for as long as the socket is open (run_asgi and receive, at every idle socket).

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # uvicorn makes it here, and starts the app on the next loop turn
        if scope is not None:
            scope["extensions"][SOCKET_EXTENSION] = SocketHooks(self)

    async def receive(self) -> ASGIReceiveEvent:
        # uvicorn's, with the queue's wait as a bare future rather than a coroutine of its own.
        queue = self.queue
        while queue.empty():
            await queue.waiter(self.loop)
        message: ASGIReceiveEvent = queue.pop()
        if self._violated:
            self._stop_reading()  # uvicorn resumes once the app has drained the queue: not after a violation
        elif self.read_paused and queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    def _stop_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self._violated:
            # Read after a violation only if uvicorn resumed reading on a path of its own: dropped unparsed.
            # Parsing a flood of tiny frames costs about 0.1 s per 256 KiB read, and uvloop makes up to 32
            # reads a turn before its timers run, so the abort a second after the violation came seconds late.
            self._stop_reading()
            return
        super().data_received(data)
        failed = self.conn.handshake_exc
        if failed is not None and not self.handshake_initiated and not self.transport.is_closing():
            self._refuse_unparsable(failed)

    def _refuse_unparsable(self, failed: Exception) -> None:
        """Answer an upgrade request that websockets could not parse, instead of leaving the client hanging.

        httptools took the request and handed it over for the upgrade, but websockets parses it again with
        its own limits (by default 8,192 bytes a line and 128 headers). It then queues a 414 or 431, or only
        an EOF, and uvicorn never writes either: the client waited for its own timeout. A long `?token=` is the usual
        cause, so the answer says where a token fits instead.
        """
        if isinstance(failed, RequestLineTooLong):
            why = f"the request line is over {MAX_LINE_LENGTH} bytes; send a long token in the Authorization header"
            status = 414
        elif isinstance(failed, HeaderLineTooLong | TooManyHeaders):
            status, why = (
                431,
                f"a header line is over {MAX_LINE_LENGTH} bytes, or there are over {MAX_NUM_HEADERS} headers",
            )
        else:
            status, why = 400, "the WebSocket handshake is not a valid HTTP request"
        body = error_answer(DiaryWSError.of_status(status, why)).body
        phrase = HTTPStatus(status).phrase.encode()
        head = b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, phrase, len(body)) + body)
        self.handshake_complete = self.close_sent = True
        self.transport.close()
        log.info("refused a WebSocket handshake from %s with %d: %s", self.client, status, why)

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            self._forget_handshake()
        elif message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # uvicorn's sans-I/O path never marks a denial response as a finished handshake, so run_asgi
            # logs "ASGI callable returned without completing handshake" at ERROR for every 4xx refusal.
            self.handshake_complete = True
        elif message["type"] == "websocket.close" and self.close_timer is not None:
            # uvicorn closes after close_timeout with transport.close(), which waits forever on a stalled peer.
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._hard_abort)

    def pause_writing(self) -> None:
        super().pause_writing()
        # A peer that stops reading for longer than the ping timeout is as dead as one that stops ponging.
        if self.ping_timeout:
            self.stall.start(self.loop, self.ping_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stall.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        # What must not wait: no timer of this socket fires on its closed transport, and nothing more is
        # written to it. The rest waits its turn with the other sockets lost at the same moment (`lose_later`).
        self.stall.release()
        if self._unfinished is not None:
            self._unfinished.cancel()
            self._unfinished = None
        self.stop_keepalive()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self.disconnected = True
        lose_later(self, exc)

    def finish_lost(self, exc: Exception | None) -> None:
        """The rest of `connection_lost`: wake the handler (which leaves the Hub) and let go of the socket."""
        super().connection_lost(exc)
        # No reference cycles left through this protocol, so reference counting frees a closed socket at once,
        # even after the garbage collector froze it (docs/performance.md): the handler keeps its own
        # SocketHooks, and the scope's copy points back here.
        scope = getattr(self, "scope", None)  # set once the handshake request has come
        if scope is not None:
            scope.get("extensions", {}).pop(SOCKET_EXTENSION, None)
        unlink_transport(self.transport)
        self.conn.parser = SPENT_PARSER  # the frame parser's generator holds `conn`: a cycle through it
        self.conn.parser_exc = None  # a protocol error's traceback holds that generator's frame, and so `conn`

    def keepalive_timeout(self) -> None:
        was_open = not (self.close_sent or self.transport.is_closing())
        super().keepalive_timeout()
        if was_open:
            # No pong in time: the peer is gone or not reading. uvicorn's close() would leave what the kernel
            # still holds for it (up to MiBs, invisible to the transport) in an orphaned socket; reset instead.
            self._hard_abort()

    def shutdown(self) -> None:
        """Server shutdown: 1012 with a jittered reconnect hint, and no waiting on peers that do not read."""
        if self.handshake_complete and not self.close_sent and not self.transport.is_closing():
            self.stop_keepalive()
            self.queue.put_nowait({"type": "websocket.disconnect", "code": CloseCode.SERVICE_RESTART})
            # Spread the reconnects, so a restart does not meet every client at the same instant.
            delay_ms = random.randint(500, 5000)
            self.conn.send_close(
                CloseCode.SERVICE_RESTART, f"server restarting: reconnect with since after {delay_ms} ms"
            )
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()
            self.loop.call_later(CLOSE_GRACE, self._hard_abort)
            return
        super().shutdown()
        self.loop.call_later(CLOSE_GRACE, self._hard_abort)

    def _hard_abort(self) -> None:
        hard_abort(self.transport)

    def _forget_handshake(self) -> None:
        """Drop the handshake's request and response (about 4 KiB), and the scope's headers, that an open
        socket never reads again.

        uvicorn keeps the 101 response on the protocol, and websockets' parser generator keeps the parsed
        request in its frame for the life of the socket. A fresh frame parser is the same state as the old
        one once the handshake is done, as long as no frame bytes are buffered yet (they rarely are; if
        some are, the old parser stays).

        The scope's headers go too (about 1.5 KiB: a list of tuples of bytes, at every idle socket): the app
        reads them to admit the socket, before it accepts, and never after (`admission.admit_listener`).
        """
        self.request = None  # type: ignore[assignment]
        self.response = None  # type: ignore[assignment]
        self.scope["headers"] = ()
        conn = self.conn
        if conn.state is OPEN and not conn.reader.buffer and conn.parser_exc is None:
            conn.parser = Protocol.parse(conn)
            next(conn.parser)
