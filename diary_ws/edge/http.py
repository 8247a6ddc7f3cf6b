"""The HTTP side of the edge: uvicorn's httptools protocol with hooks for streams (SSE), one write per answer
and one keep-alive timer per connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from diary_ws.broadcaster import DEAD, LATER, WROTE
from diary_ws.edge.transport import CLOSE_GRACE, StallWatch, hard_abort
from diary_ws.sse import STREAM_EXTENSION


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
