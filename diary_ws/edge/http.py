"""The HTTP side of the edge: uvicorn's httptools protocol with hooks for streams (SSE), one write per answer
and one keep-alive timer per connection."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import httptools
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from diary_ws.edge.limits import edge_of
from diary_ws.edge.transport import CLOSE_GRACE, StallWatch, hard_abort, unlink_transport
from diary_ws.errors import DiaryWSError, error_answer
from diary_ws.logs import warn_throttled
from diary_ws.protocols import WriteResult
from diary_ws.sse import STREAM_EXTENSION

log = logging.getLogger("diary_ws.server")

LINGER_BYTES = 1 << 20  # what a client may still send after an error answer before its connection is reset


class StreamHooks:
    """The transport hooks an HTTP handler gets in `scope["extensions"]`, for streaming responses (SSE)."""

    __slots__ = ("_protocol", "_cycle")

    def __init__(self, protocol: DiaryHttpProtocol, cycle: RequestResponseCycle | None) -> None:
        self._protocol = protocol
        self._cycle = cycle  # this request's, which is not always the protocol's latest (pipelining)

    def try_write(self, chunk: bytes) -> WriteResult:
        """Write one ready-made body chunk if the response streams and the socket takes bytes now.

        WROTE, LATER (not now, or not a chunked response under way: the ASGI path sends it) or DEAD.
        """
        cycle = self._cycle
        if cycle is None:
            return WriteResult.LATER
        if cycle.disconnected or cycle.response_complete or cycle.transport.is_closing():
            return WriteResult.DEAD
        if not cycle.response_started or not cycle.chunked_encoding or self._protocol.flow.write_paused:
            return WriteResult.LATER
        cycle.transport.write(chunk)
        return WriteResult.WROTE

    def stalled(self) -> bool:
        """The transport's buffer is over its high-water mark: the peer is not reading."""
        return self._protocol.flow.write_paused

    def abort(self) -> None:
        """Drop the TCP connection now, unsent bytes and all (see `hard_abort`)."""
        hard_abort(self._protocol.transport)

    def on_shutdown(self, callback: Callable[[], None] | None) -> None:
        """What to call when the server shuts down while this response streams; None when it is over."""
        self._protocol.set_stream(callback)


class OneWrite:
    """The transport uvicorn's request cycle writes to: it holds a response head back until the body, so that a
    small answer leaves in one send() instead of two, saving a system call and a TCP segment per request.

    Measured on its own (one write of head and body against two, asyncio on a socket pair, bench figures of
    this 2-core box): 2.8 against 5.1 us of CPU per answer, about 4% of a targeted POST's server CPU; and one
    TCP segment instead of two. It needs `RequestResponseCycle.transport` (edge/internals.py), which nothing
    else replaces.

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


async def _gone(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """The app of a connection that is done with HTTP: nothing calls it; it only replaces the wrapper whose
    closure points back at the protocol."""


class Phase(enum.Enum):
    """Where a connection is in its request: what the edge's clock is timing, if anything."""

    HEAD = "waiting for a request head"  # nothing yet, or part of one: HEADER_TIMEOUT (or keep-alive if idle)
    BODY = "reading a request body"  # BODY_TIMEOUT for the whole body
    ANSWER = "answering"  # the app's turn: no clock of ours, and no further request is read
    GONE = "upgraded or closed"  # a WebSocket now, or closing: the HTTP side is done with it


class DiaryHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the edge's bounds, hooks so that open streams end at shutdown, and
    stalled readers freed.

    httptools rather than h11: it halves the server's CPU per POST (118 against 220 us on the bench).

    The bounds (docs/limits.md): MAX_HTTP_CONNECTIONS with eviction of the connection waiting longest for a
    head; HEADER_TIMEOUT and BODY_TIMEOUT (408); MAX_HEADER_BYTES (431, or 414 for the request line); and at
    most one unsent answer: httptools parses whatever it is fed, every pipelined request in a read at once, so
    the bytes are fed in pieces that end where a head ends, and no piece after a complete request is fed
    until its answer is written out. The rest waits as bytes, and reading pauses.

    uvicorn's own shutdown only marks a streaming response not-keep-alive and then waits for it to finish,
    which an SSE stream never does (uvicorn.Server.shutdown waits for every connection first).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_shutdown: Callable[[], None] | None = None
        self.stall = StallWatch("an event stream whose reader", self._hard_abort)
        self.edge = edge_of(self.config)
        self._limits = self.edge.limits
        self._pending = b""  # bytes read but not yet fed to the parser
        self._phase = Phase.HEAD
        self._since = 0.0  # when the phase began
        self._head_bytes = 0  # of the head being read
        self._head_tail = b""  # its last bytes, while its end is not found
        self._head_newline = False  # its request line has ended (414 against 431)
        self._body_left = -1  # Content-Length bytes still to feed; -1: a chunked body (or none)
        self._answered = False  # a request was answered on this connection: idle means keep-alive then
        self._counted = False  # in the edge's count of HTTP connections
        self._clock: asyncio.TimerHandle | None = None
        self._lost = False
        self._linger = 0  # bytes still to drop after an answer of the edge's own, before a reset
        app = self.app

        async def with_hooks(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
            if scope.get("method") == "GET":  # only an event stream (a GET) uses them: spare every POST the object
                plain = cast("dict[str, Any]", scope)  # uvicorn types extension values as dict[object, object]
                cycle = getattr(send, "__self__", None)  # uvicorn hands the app its request cycle's own `send`
                own = cycle if isinstance(cycle, RequestResponseCycle) else None
                extensions = plain.setdefault("extensions", {})
                extensions[STREAM_EXTENSION] = StreamHooks(self, own)
                try:
                    await app(scope, receive, send)
                finally:
                    # The hooks point at the request's cycle, which holds this scope: a reference cycle,
                    # which a frozen collector would never free (docs/performance.md).
                    extensions.pop(STREAM_EXTENSION, None)
                return
            await app(scope, receive, send)

        self.app = with_hooks

    # --- the connection cap ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.edge.admit(self):
            self._phase = Phase.GONE
            self._answer_and_close(503, "the server has too many HTTP connections open: retry in a moment")
            return
        self._counted = True
        self._enter(Phase.HEAD)

    def evict(self) -> None:
        """Make room for a new connection (the Edge chose this one): close, with a reset if it sent anything."""
        self._release()
        self._phase = Phase.GONE
        self._cancel_clock()
        if self._head_bytes or self._pending:
            self._hard_abort()
        else:
            self.transport.close()  # an idle keep-alive connection: a plain close, as its keep-alive timeout would

    def waited(self) -> float:
        """Seconds this connection has waited in its phase."""
        return self.loop.time() - self._since

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.edge.count -= 1
        self.edge.waiting.pop(self, None)

    def set_stream(self, callback: Callable[[], None] | None) -> None:
        """A stream (SSE) began (`callback`: what ends it at shutdown) or ended (None).

        While it streams the connection is a listener, under MAX_CONNECTIONS, not an HTTP connection.
        """
        self.on_shutdown = callback
        if callback is not None:
            if self._counted:
                self._counted = False
                self.edge.count -= 1
        elif not self._counted and not self._lost and self._phase is not Phase.GONE:
            self._counted = True
            self.edge.count += 1

    # --- phases and the clock -----------------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        self._phase = phase
        self._since = self.loop.time()
        waiting = self.edge.waiting
        if phase is Phase.HEAD:
            self._head_bytes = 0
            self._head_tail = b""
            self._head_newline = False
            waiting[self] = None
            waiting.move_to_end(self)
        else:
            waiting.pop(self, None)
        self._arm()

    def _arm(self) -> None:
        deadline = self._deadline()
        if deadline is None:
            return
        # One timer per connection, re-armed for the time left when it fires early (uvicorn pushes and cancels
        # one per request on the timer heap); armed anew only when a phase's deadline comes before it.
        clock = self._clock
        if clock is None or clock.when() > deadline:
            if clock is not None:
                clock.cancel()
            self._clock = self.loop.call_at(deadline, self._clock_due)

    def _deadline(self) -> float | None:
        phase = self._phase
        if phase is Phase.HEAD:
            idle = not self._head_bytes and not self._pending
            wait = self.timeout_keep_alive if idle and self._answered else self._limits.header_timeout
            return self._since + wait
        if phase is Phase.BODY:
            return self._since + self._limits.body_timeout
        return None

    def _clock_due(self) -> None:
        self._clock = None
        deadline = self._deadline()
        if deadline is None:
            return
        if deadline > self.loop.time():
            self._clock = self.loop.call_at(deadline, self._clock_due)
            return
        self._release()
        quiet = self._phase is Phase.HEAD and not self._head_bytes and not self._pending
        if quiet or (self.cycle is not None and self._phase is Phase.BODY and self.cycle.response_complete):
            self._phase = Phase.GONE
            self.transport.close()  # sent nothing (the idle close), or already answered: silent
            return
        what = "head" if self._phase is Phase.HEAD else "body"
        limit = self._limits.header_timeout if self._phase is Phase.HEAD else self._limits.body_timeout
        warn_throttled(log, "http-timeout", "408 to %s: its request %s took over %g s", self._peer(), what, limit)
        self._phase = Phase.GONE
        self._answer_and_close(408, f"the request {what} did not arrive within {limit:g} s")

    def _cancel_clock(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    # --- feeding the parser: one request at a time ----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._phase is Phase.GONE:  # answered and closing: what still comes is dropped (a lingering close)
            self._linger -= len(data)
            if self._linger < 0:
                self._hard_abort()
            return
        if self._phase is Phase.HEAD and not self._head_bytes and not self._pending:
            # The first byte of a head: its clock now runs for HEADER_TIMEOUT, from the end of the previous
            # answer, or from now if an idle keep-alive connection already waited longer than that.
            now = self.loop.time()
            if self._answered and now > self._since + self._limits.header_timeout:
                self._since = now
            self._pending = data
            self._arm()
            self._feed()
            return
        self._pending = self._pending + data if self._pending else data
        if self._phase is Phase.ANSWER:
            self.flow.pause_reading()  # the next request waits, as bytes, until this answer is out
            return
        self._feed()

    def _feed(self) -> None:
        """Feed the parser piece by piece, until the bytes run out or a complete request awaits its answer."""
        while self._pending and self._phase in (Phase.HEAD, Phase.BODY):
            pending = self._pending
            if self._phase is Phase.HEAD:
                piece = self._head_piece(pending)
                if piece is None:
                    self._refuse_head(pending)
                    return
            elif self._body_left >= 0:
                piece = pending[: self._body_left]
                self._body_left -= len(piece)
            else:  # chunked: its last chunk and trailers end with an empty line, like a head
                end = pending.find(b"\r\n\r\n")
                piece = pending if end < 0 else pending[: end + 4]
            self._pending = pending[len(piece) :]
            if not self._parse(piece):
                return
        if self._phase is Phase.ANSWER and self._pending:
            self.flow.pause_reading()

    def _head_piece(self, pending: bytes) -> bytes | None:
        """The bytes of `pending` up to the end of the head being read (all if it does not end in them), or
        None when the head is over MAX_HEADER_BYTES. Searches no further than the limit allows."""
        room = self._limits.max_header_bytes - self._head_bytes
        tail = self._head_tail  # the end of the head may straddle two reads
        stop = -1
        if tail:
            found = (tail + pending[:3]).find(b"\r\n\r\n")
            if found >= 0:
                stop = found + 4 - len(tail)
        if stop < 0:
            found = pending.find(b"\r\n\r\n", 0, max(0, room))
            stop = found + 4 if found >= 0 else -1
        piece = pending if stop < 0 else pending[:stop]
        if len(piece) > room:
            return None
        self._head_bytes += len(piece)
        if not self._head_newline and b"\n" in piece:
            self._head_newline = True
        self._head_tail = b"" if stop >= 0 else (tail + piece)[-3:]
        return piece

    def _parse(self, piece: bytes) -> bool:
        """uvicorn's `data_received`, for one piece; False when the connection is done with HTTP."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserError:
            warn_throttled(log, "http-invalid", "400 to %s: not a valid HTTP/1.1 request", self._peer())
            self._phase = Phase.GONE
            self._answer_and_close(400, "the request is not valid HTTP/1.1")
            return False
        except httptools.HttpParserUpgrade:
            self._release()
            self._phase = Phase.GONE
            self._cancel_clock()
            self._pending = b""  # as uvicorn: what follows an upgrade head before the 101 is not kept
            if self._should_upgrade():
                self.handle_websocket_upgrade()
                self._unlink()  # the WebSocket protocol has the transport now; nothing calls this one again
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

    def _refuse_head(self, pending: bytes) -> None:
        """431, or 414 when the request line alone is over MAX_HEADER_BYTES; nothing more is read."""
        limit = self._limits.max_header_bytes
        line_done = self._head_newline or b"\n" in pending[: max(0, limit - self._head_bytes)]
        status = 431 if line_done else 414
        what = "the request line and headers are" if line_done else "the request line is"
        warn_throttled(log, "http-head-too-large", "%d to %s: %s over %d bytes", status, self._peer(), what, limit)
        self._pending = b""
        self._phase = Phase.GONE
        self._answer_and_close(status, f"{what} over {limit} bytes (MAX_HEADER_BYTES); send less in headers")

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is before:
            return  # an upgrade: httptools raises HttpParserUpgrade next, and _parse hands the connection over
        # A new request: its answer goes out in one write.
        can_hold = self.scope["method"] != "HEAD"
        self.cycle.transport = cast(asyncio.Transport, OneWrite(self.transport, can_hold))
        self._body_left = self._content_length()
        self._enter(Phase.BODY)

    def _content_length(self) -> int:
        length = -1
        for name, value in self.headers:
            if name == b"transfer-encoding":
                return -1
            if name == b"content-length" and value.isdigit():
                length = int(value)
        return length

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._phase is not Phase.BODY:
            return
        if self.cycle.response_complete:  # answered before its body was all in (a 413, say): next request
            self._answered = True
            self._enter(Phase.HEAD)
        else:
            self._enter(Phase.ANSWER)

    def on_response_complete(self) -> None:
        # uvicorn's, except for the keep-alive timer and the pipeline (pinned uvicorn 0.54; edge/internals.py).
        self.server_state.total_requests += 1
        if self.transport.is_closing() or self._phase is Phase.GONE:
            return
        self._answered = True
        if self.pipeline:  # pragma: no cover - fed one request at a time, nothing is ever pipelined here
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        if self._phase is Phase.ANSWER:  # not a response sent before its request's body was all in
            self._enter(Phase.HEAD)
        elif self._phase is Phase.BODY:
            # Answered before its body was all in (a 413, say): the rest of the body is read and dropped, under
            # BODY_TIMEOUT, then the next request. uvicorn paused reading if over 64 KiB of the body came before
            # the app answered, and resumes here (as its own on_response_complete does): else a client that
            # sends its whole body before it reads waited for its own timeout, or for BODY_TIMEOUT's silent close.
            self.flow.resume_reading()
        if not self.flow.write_paused:
            self._next_request()
        # else: resume_writing feeds the next request once the peer has read this answer

    def _next_request(self) -> None:
        if self._phase is Phase.HEAD:
            self._feed()
            if not self._pending and self._phase is Phase.HEAD:
                self.flow.resume_reading()

    def _unset_keepalive_if_required(self) -> None:
        pass  # the edge's own clock (above) covers keep-alive

    def timeout_keep_alive_handler(self) -> None:  # pragma: no cover - uvicorn's timer is never armed here
        self._clock_due()

    # --- answers of our own ------------------------------------------------------------------------------

    def _answer_and_close(self, status: int, message: str) -> None:
        """A JSON error answer outside the app (the body of docs/api.md), then close; the app's request, if one is
        running, hears a disconnect."""
        self._release()
        self._cancel_clock()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self._hard_abort()
                return
        if self.transport.is_closing():
            return
        body = error_answer(DiaryWSError.of_status(status, message)).body
        phrase = HTTPStatus(status).phrase.encode()
        head = b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, phrase, len(body)) + body)
        # A lingering close: closing with unread bytes from the client makes the kernel send a reset, which can
        # destroy the answer before the client reads it (it is still sending its head). So the answer leaves
        # with a FIN, what the client still sends is read and dropped, up to LINGER_BYTES, and the connection
        # is reset after CLOSE_GRACE at the latest (nginx's lingering_close does the same).
        self._linger = LINGER_BYTES
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:  # pragma: no cover - TCP transports can
            self.transport.close()
        self.flow.resume_reading()
        self.loop.call_later(CLOSE_GRACE, self._abort_if_open)

    def send_400_response(self, msg: str) -> None:
        self._answer_and_close(400, msg)

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

    def _abort_if_open(self) -> None:
        if not self._lost:
            self._hard_abort()

    # --- shutdown, flow and loss -------------------------------------------------------------------------

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
        if self._phase is Phase.HEAD and self._pending and not self._lost:
            self._next_request()  # the answer before is out now

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.stall.cancel()
        self._release()
        self._cancel_clock()
        self._phase = Phase.GONE
        self._pending = b""
        super().connection_lost(exc)
        self._unlink()
        unlink_transport(self.transport)

    def _unlink(self) -> None:
        """Break this protocol's reference cycles once it is done, so reference counting frees it at once,
        even after the garbage collector froze it (docs/performance.md): the stall watch's callback, the app
        wrapper's closure, the parser's callbacks (uvicorn drops the parser itself when the connection is
        lost, not when it is upgraded) and the last request's cycle. An upgraded connection's transport
        lives on with the WebSocket."""
        self.stall.release()
        self.app = _gone
        self.parser = None  # type: ignore[assignment]  # as uvicorn's own connection_lost
        self.cycle = None  # type: ignore[assignment]  # its on_response is this protocol's bound method

    def _hard_abort(self) -> None:
        if not self._lost:
            hard_abort(self.transport)
