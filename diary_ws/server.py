"""What diary-ws adds to uvicorn: transport hooks for the WebSocket protocol, a draining Server, and a
supervisor for several workers that keeps both in each worker.

Like `cli`, the only other module that imports uvicorn, this one is loaded only when diary-ws runs its own
server; an app embedded elsewhere works without it and just lacks the hooks (see `routes.SocketControl`).
It leans on uvicorn internals (`WebSocketsSansIOProtocol` attributes), so uvicorn is pinned to 0.54.x.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import random
import signal
import socket
import struct
import threading
from collections.abc import Callable
from http import HTTPStatus
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, cast

import orjson
import uvicorn
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS
from websockets.protocol import OPEN, Protocol

from diary_ws.auth import PEER_SCOPE_KEY
from diary_ws.broadcaster import DEAD, LATER, WROTE
from diary_ws.routes import SOCKET_EXTENSION
from diary_ws.sse import STREAM_EXTENSION

log = logging.getLogger("diary_ws.server")

CLOSE_GRACE = 1.0  # seconds a closing socket may take to flush before it is aborted


class SocketControl:
    """The transport hooks a WebSocket handler gets in `scope["extensions"]`."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: DiaryWebSocketProtocol) -> None:
        self._protocol = protocol

    def stalled(self) -> bool:
        """The transport's buffer is over its high-water mark: the peer is not reading."""
        return not self._protocol.writable.is_set()

    def try_write(self, wire: bytes) -> int:
        """Write a ready-made frame if the socket takes bytes now: WROTE, LATER (not now) or DEAD (gone)."""
        protocol = self._protocol
        if protocol.close_sent or protocol.disconnected or protocol.transport.is_closing():
            return DEAD
        # Paused: the peer is behind, so the frame waits in the backlog. With per-message deflate each
        # socket compresses with its own context, so a shared frame cannot go out as it is.
        if not protocol.writable.is_set() or protocol.conn.extensions:
            return LATER
        protocol.transport.write(wire)
        return WROTE

    def abort(self) -> None:
        """Drop the TCP connection now. `transport.close()` would wait for a stalled peer to read first."""
        hard_abort(self._protocol.transport)


def hard_abort(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset, so the kernel frees the unsent buffer too.

    A plain `transport.abort()` frees the descriptor, but the kernel keeps the orphaned socket, and up to
    several MiB of unsent data, while it probes a peer that reads nothing. SO_LINGER 0 turns close into RST.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # A socket already closed raises OSError on asyncio and ValueError (negative fd) on uvloop.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class StallWatch:
    """Aborts a connection whose peer reads nothing for `timeout` seconds while data waits for it.

    Started from the protocol's `pause_writing`, cancelled by `resume_writing` and `connection_lost`: a peer
    that stops reading is as dead as one that stops ponging, and holds buffers until it is reset.
    """

    __slots__ = ("_abort", "_timer", "_what")

    def __init__(self, what: str, abort: Callable[[], None]) -> None:
        self._what = what
        self._abort = abort
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        if self._timer is None:
            self._timer = loop.call_later(timeout, self._fire, timeout)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self, timeout: float) -> None:
        self._timer = None
        log.warning("aborting %s has read nothing for %.0f s", self._what, timeout)
        self._abort()


class ReceiveQueue:
    """The part of `asyncio.Queue` uvicorn uses for a socket's ASGI events, for the one reader there is.

    An `asyncio.Queue` is three deques and an Event with a fourth, about 3 KiB per idle socket before
    anything is queued; this is a list and, only while the app waits, one future.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class WritableGate:
    """The part of `asyncio.Event` uvicorn uses for "the transport takes bytes", without an idle deque."""

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        if not self._open:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        return True


class DiaryWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's default WebSocket protocol, plus hooks to free stalled peers and a quiet denial path.

    It also slims what every idle socket keeps (issue: memory per idle socket): a lighter receive queue and
    writable flag, and no handshake request or response once the socket is open.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stall = StallWatch("a WebSocket whose peer", self._hard_abort)
        self.queue = ReceiveQueue()  # type: ignore[assignment]
        self.writable = WritableGate()  # type: ignore[assignment]

    async def run_asgi(self) -> None:
        self.scope["extensions"][SOCKET_EXTENSION] = SocketControl(self)  # type: ignore[assignment]
        await super().run_asgi()

    def data_received(self, data: bytes) -> None:
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
        body = orjson.dumps({"status": "error", "message": why})
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
        self.stall.cancel()
        super().connection_lost(exc)

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
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1012})
            # Spread the reconnects, so a restart does not meet every client at the same instant.
            delay_ms = random.randint(500, 5000)
            self.conn.send_close(1012, f"server restarting: reconnect with since after {delay_ms} ms")
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
        """Drop the handshake's request and response (about 4 KiB) that an open socket never reads again.

        uvicorn keeps the 101 response on the protocol, and websockets' parser generator keeps the parsed
        request in its frame for the life of the socket. A fresh frame parser is the same state as the old
        one once the handshake is done, as long as no frame bytes are buffered yet (they rarely are; if
        some are, the old parser stays).
        """
        self.request = None  # type: ignore[assignment]
        self.response = None  # type: ignore[assignment]
        conn = self.conn
        if conn.state is OPEN and not conn.reader.buffer and conn.parser_exc is None:
            conn.parser = Protocol.parse(conn)
            next(conn.parser)


class StreamControl:
    """The transport hooks an HTTP handler gets in `scope["extensions"]`, for streaming responses (SSE)."""

    __slots__ = ("_protocol", "_cycle")

    def __init__(self, protocol: DiaryHttpProtocol, cycle: RequestResponseCycle | None) -> None:
        self._protocol = protocol
        self._cycle = cycle  # this request's, which is not always the protocol's latest (pipelining)

    def try_write(self, chunk: bytes) -> int:
        """Write one ready-made body chunk if the response streams and the socket takes bytes now.

        WROTE, LATER (not now, or not a chunked response under way: the ASGI path sends it) or DEAD.
        """
        cycle = self._cycle
        if cycle is None:
            return LATER
        if cycle.disconnected or cycle.response_complete or cycle.transport.is_closing():
            return DEAD
        if not cycle.response_started or not cycle.chunked_encoding or self._protocol.flow.write_paused:
            return LATER
        cycle.transport.write(chunk)
        return WROTE

    def stalled(self) -> bool:
        """The transport's buffer is over its high-water mark: the peer is not reading."""
        return self._protocol.flow.write_paused

    def abort(self) -> None:
        """Drop the TCP connection now, unsent bytes and all (see `hard_abort`)."""
        hard_abort(self._protocol.transport)

    def on_shutdown(self, callback: Callable[[], None] | None) -> None:
        """What to call when the server shuts down while this response streams; None when it is over."""
        self._protocol.on_shutdown = callback


class OneWrite:
    """The transport uvicorn's request cycle writes to: it holds a response head back until the body, so that a
    small answer leaves in one send() instead of two, saving a system call and a TCP segment per request.

    Only a head with a Content-Length is held, and not for HEAD: uvicorn writes a body for every other
    answer, and the app that declared the length has its body at hand. A stream's head (chunked, as SSE)
    goes out at once, and so does an interim `100 Continue`.
    """

    __slots__ = ("_transport", "_held", "_first")

    def __init__(self, transport: asyncio.Transport, can_hold: bool) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._first = can_hold

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif self._first and not data.startswith(b"HTTP/1.1 1"):
            self._first = False
            if b"\r\ncontent-length:" in data:
                self._held = data
            else:
                self._transport.write(data)
        else:
            self._transport.write(data)

    def close(self) -> None:
        held = self._held
        if held is not None:  # the app failed between head and body: what was written still goes first
            self._held = None
            self._transport.write(held)
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class DiaryHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus hooks so that open streams end at shutdown and stalled readers are freed.

    httptools rather than h11: it halves the server's CPU per POST (118 against 220 us on the bench).

    uvicorn's own shutdown only marks a streaming response not-keep-alive and then waits for it to finish,
    which an SSE stream never does (PITFALLS 5).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_shutdown: Callable[[], None] | None = None
        self.stall = StallWatch("an event stream whose reader", self._hard_abort)
        app = self.app

        async def with_hooks(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
            if scope.get("method") == "GET":  # only an event stream (a GET) uses them: spare every POST the object
                plain = cast("dict[str, Any]", scope)  # uvicorn types extension values as dict[object, object]
                cycle = getattr(send, "__self__", None)  # uvicorn hands the app its request cycle's own `send`
                own = cycle if isinstance(cycle, RequestResponseCycle) else None
                plain.setdefault("extensions", {})[STREAM_EXTENSION] = StreamControl(self, own)
            await app(scope, receive, send)

        self.app = with_hooks

    # Keep-alive: uvicorn arms a fresh timer after every answer and cancels it on the next request's bytes,
    # a timer-heap push and a cancel per request. One timer per connection that re-arms itself for the time
    # still left does the same job: it closes a connection idle for `timeout_keep_alive` after its answer.
    _idle_since: float | None = None

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # busy: the timer, if it fires now, only re-arms on the next answer

    def on_response_complete(self) -> None:
        # uvicorn's, except for the keep-alive timer (pinned uvicorn 0.54; see the module docstring).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._idle_since = None
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._keep_alive_due)

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        idle = self._idle_since
        if idle is None:
            return  # a request is under way; its answer arms the timer again
        left = idle + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a new request (an upgrade makes none): its answer goes out in one write
            can_hold = self.scope["method"] != "HEAD"
            self.cycle.transport = cast(asyncio.Transport, OneWrite(self.transport, can_hold))

    def shutdown(self) -> None:
        callback = self.on_shutdown
        if callback is None or self.cycle is None or self.cycle.response_complete:
            super().shutdown()
            return
        self.cycle.keep_alive = False  # the connection closes once the stream's last bytes are out
        callback()
        self.loop.call_later(CLOSE_GRACE, self._hard_abort)

    def pause_writing(self) -> None:
        super().pause_writing()
        # As for WebSockets: a stream whose reader has read nothing for the ping timeout is dropped.
        timeout = self.config.ws_ping_timeout
        if timeout and self.on_shutdown is not None:
            self.stall.start(self.loop, timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stall.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stall.cancel()
        if self.timeout_keep_alive_task is not None:  # uvicorn's own cancel went through the override above
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)

    def _hard_abort(self) -> None:
        hard_abort(self.transport)


class RecordPeer:
    """Keeps the direct peer's address in the scope before uvicorn's ProxyHeadersMiddleware replaces
    scope["client"] with the X-Forwarded-For one: USER_HEADER is believed only from a trusted direct peer,
    and after the rewrite the client address alone cannot tell who that was."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "lifespan":
            scope[PEER_SCOPE_KEY] = scope.get("client")  # type: ignore[literal-required]
        await self.app(scope, receive, send)


def with_proxy_headers(app: Any, trusted_proxies: tuple[str, ...]) -> Any:
    """The app behind uvicorn's proxy-headers middleware for `trusted_proxies`, recording the direct peer.

    Run uvicorn with proxy_headers=False then: its own wrapping would sit outside RecordPeer.
    """
    if not trusted_proxies:
        return app  # nobody may set X-Forwarded-For (uvicorn's own default would trust 127.0.0.1)
    return RecordPeer(ProxyHeadersMiddleware(app, trusted_hosts=list(trusted_proxies)))


class DiaryServer(uvicorn.Server):
    """uvicorn's Server, told about SIGTERM first so /readyz can turn 503 before connections close."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None], drain_seconds: float) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self._drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn waits for every connection before it runs the lifespan shutdown (PITFALLS 5), so the app
        # hears of SIGTERM here, from the signal handler, or not in time.
        self._on_signal()
        if self._draining or not self._drain_seconds or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("draining for %.1f s: /readyz answers 503, open sockets stay", self._drain_seconds)
        self._loop.call_soon_threadsafe(self._loop.call_later, self._drain_seconds, super().handle_exit, sig, None)


WORKER_STARTUP_FAILURE = 3  # what uvicorn exits with when a worker cannot start; restarting would not help


def supervise(workers: int, sock: socket.socket, target: Callable[[socket.socket], object]) -> int:
    """Run `target(sock)` in `workers` processes sharing one listening socket, until SIGTERM or SIGINT.

    uvicorn's own supervisor builds a plain `uvicorn.Server` in each worker, which would lose DiaryServer's
    early /readyz flip and drain. This one only spawns, restarts a worker that dies, and passes a stop
    signal on as SIGTERM; each worker runs the whole single-process path (DiaryServer included).
    """
    context = multiprocessing.get_context("spawn")  # no fork: each worker starts clean, as uvicorn's do
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def spawn() -> BaseProcess:
        process = context.Process(target=target, args=(sock,), daemon=False)
        process.start()
        return process

    processes = [spawn() for _ in range(workers)]
    log.info("supervisor %d started %d workers: %s", os.getpid(), workers, ", ".join(str(p.pid) for p in processes))
    status = 0
    while not stop.wait(0.5):
        for index, process in enumerate(processes):
            if process.is_alive():
                continue
            if process.exitcode == WORKER_STARTUP_FAILURE:
                log.error("worker %s could not start; stopping", process.pid)
                stop.set()
                status = 1
                break
            processes[index] = spawn()
            log.warning("worker %s exited (%s); started %s", process.pid, process.exitcode, processes[index].pid)
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    for process in processes:
        process.join()
    return status
