"""Every uvicorn, websockets, httptools and asyncio internal the edge touches, in one list.

The edge subclasses uvicorn's two protocols and reaches into them: attributes they set, methods they call
back, bodies it copies, a parser it rebuilds. None of that is public API, so it holds only for the versions
it was read against. `tests/test_edge_contract.py` checks every entry against the installed packages, so an
upgrade fails in CI and not in production; and at start, `unsupported()` names a uvicorn or websockets
outside the checked range, and the CLI then runs uvicorn's stock protocols instead (see `STOCK_LOSES`).

Kinds of entry:
- `name`: a module attribute, class attribute or method that must exist.
- `self`: an instance attribute the upstream class sets (`self.<name>` appears in its source).
- `copied`: a method whose body the edge copies or re-implements; its source must hash to `digest`, or the
  copy must be read again (the test prints the new digest).
- `source`: behaviour the edge relies on, as a line that must appear in the upstream source.

The speed trims that need internals nothing else needs carry their measured figure in `why`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Any

# The version prefixes the list below was checked against (setup.cfg pins the same ranges).
UVICORN_CHECKED = ("0.54.",)
WEBSOCKETS_CHECKED = ("17.",)

# What a server running uvicorn's stock protocols does not have: the one line logged at start in that case.
STOCK_LOSES = (
    "MAX_HTTP_CONNECTIONS and eviction, HEADER_TIMEOUT/BODY_TIMEOUT, MAX_HEADER_BYTES, one unsent answer per "
    "connection, resets of stalled peers, direct writes of frames and SSE chunks, the 1012 reconnect hint, "
    "JSON answers to unparsable upgrades"
)

HTTP = "uvicorn.protocols.http.httptools_impl"
WS = "uvicorn.protocols.websockets.websockets_sansio_impl"


@dataclass(frozen=True, slots=True)
class Internal:
    """One thing the edge relies on: `where` is "module:Qualified.name"."""

    where: str
    kind: str  # "name" | "self" | "copied" | "source"
    why: str
    detail: str = ""  # the digest (copied) or the line (source)


INTERNALS: tuple[Internal, ...] = (
    # --- uvicorn's httptools protocol (edge/http.py) ---
    Internal(f"{HTTP}:HttpToolsProtocol", "name", "DiaryHttpProtocol subclasses it"),
    Internal(f"{HTTP}:RequestResponseCycle", "name", "StreamHooks and OneWrite work on a request's cycle"),
    Internal(
        f"{HTTP}:HttpToolsProtocol.data_received",
        "copied",
        "re-implemented per piece in DiaryHttpProtocol._parse",
        "010a7ae59a5d3b1a",
    ),
    Internal(
        f"{HTTP}:HttpToolsProtocol.on_response_complete",
        "copied",
        "copied, with the edge's clock and feeding",
        "64e254f28e389e76",
    ),
    Internal(
        f"{HTTP}:HttpToolsProtocol.on_headers_complete",
        "copied",
        "makes self.cycle, or returns early on an upgrade; starts the app or queues a pipelined request",
        "1ea8589acfad92d8",
    ),
    Internal(
        f"{HTTP}:HttpToolsProtocol.handle_websocket_upgrade",
        "copied",
        "hands the connection to the WebSocket protocol (the edge stops counting it as HTTP first)",
        "179c4f769386ab89",
    ),
    Internal(f"{HTTP}:HttpToolsProtocol.on_message_complete", "name", "the end of a request: the edge's phase"),
    Internal(f"{HTTP}:HttpToolsProtocol.connection_made", "name", "the HTTP cap acts here"),
    Internal(f"{HTTP}:HttpToolsProtocol.connection_lost", "name", "releases the edge's count"),
    Internal(f"{HTTP}:HttpToolsProtocol.shutdown", "name", "open SSE streams end at shutdown"),
    Internal(f"{HTTP}:HttpToolsProtocol.pause_writing", "name", "the stall watch of an SSE stream"),
    Internal(f"{HTTP}:HttpToolsProtocol.resume_writing", "name", "the next request is fed once an answer is out"),
    Internal(f"{HTTP}:HttpToolsProtocol.send_400_response", "name", "answered as JSON instead of plain text"),
    Internal(f"{HTTP}:HttpToolsProtocol._unset_keepalive_if_required", "name", "a no-op: the edge's clock rules"),
    Internal(f"{HTTP}:HttpToolsProtocol.timeout_keep_alive_handler", "name", "replaced by the edge's clock"),
    Internal(f"{HTTP}:HttpToolsProtocol._start_asgi_task", "name", "called as uvicorn's own pipeline does"),
    Internal(f"{HTTP}:HttpToolsProtocol._should_upgrade", "name", "called for an upgrade head"),
    Internal(f"{HTTP}:HttpToolsProtocol._unsupported_upgrade_warning", "name", "called for an unknown upgrade"),
    *(
        Internal(f"{HTTP}:HttpToolsProtocol.{attr}", "self", why)
        for attr, why in (
            ("app", "wrapped to hand a GET its StreamHooks"),
            ("config", "ws_ping_timeout for the SSE stall watch; the edge's limits live on it"),
            ("loop", "the edge's clock"),
            ("transport", "written to directly: answers of the edge's own"),
            ("flow", "pause_reading/resume_reading/write_paused: one unsent answer per connection"),
            ("parser", "fed piece by piece"),
            ("cycle", "the request under way"),
            ("pipeline", "stays empty: requests are fed one at a time"),
            ("scope", "the request's method (OneWrite)"),
            ("headers", "Content-Length, to feed a body and no further"),
            ("client", "named in the edge's log lines"),
            ("server_state", "total_requests, counted as uvicorn does"),
            ("timeout_keep_alive", "the idle close after an answer"),
            ("timeout_keep_alive_task", "never armed: the edge's clock replaces it"),
        )
    ),
    *(
        Internal(f"{HTTP}:RequestResponseCycle.{attr}", "self", why)
        for attr, why in (
            (
                "transport",
                "replaced by OneWrite: head and body in one send() (2.8 against 5.1 us of CPU per answer)",
            ),
            ("disconnected", "set when the edge answers itself (408): the app's sends are dropped"),
            ("response_started", "StreamHooks: is a chunked response under way"),
            ("response_complete", "the answer is out: the next request may be fed"),
            ("chunked_encoding", "StreamHooks writes chunks only to a chunked response"),
            ("message_event", "set to wake the app's receive() with a disconnect"),
            ("keep_alive", "cleared at shutdown so a stream's connection closes"),
            ("body", "how much of a body the app has not read (uvicorn pauses reading over 64 KiB)"),
        )
    ),
    Internal(
        f"{HTTP}:RequestResponseCycle.run_asgi",
        "source",
        "the app's `send` is the cycle's bound method: `send.__self__` finds the cycle for StreamHooks",
        "self.scope, self.receive, self.send",
    ),
    Internal("uvicorn.protocols.http.flow_control:FlowControl.write_paused", "self", "the transport is full"),
    Internal("uvicorn.protocols.http.flow_control:FlowControl.pause_reading", "name", "no more requests read"),
    Internal("uvicorn.protocols.http.flow_control:FlowControl.resume_reading", "name", "reading again"),
    Internal("httptools:HttpParserError", "name", "a request that is not HTTP: 400 JSON"),
    Internal("httptools:HttpParserUpgrade", "name", "an upgrade head: the connection leaves HTTP"),
    # --- uvicorn's WebSocket protocol (edge/websocket.py) ---
    Internal(f"{WS}:WebSocketsSansIOProtocol", "name", "DiaryWebSocketProtocol subclasses it"),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.__init__",
        "copied",
        "queue and writable are replaced after it: "
        "ReceiveQueue and WritableGate save about 3 KiB per idle socket (README, Performance)",
        "631dcd744eab875f",
    ),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.shutdown",
        "copied",
        "re-implemented: 1012 with a reconnect hint, abort after CLOSE_GRACE",
        "e8ace796ada616b7",
    ),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.send",
        "copied",
        "a denial marks the handshake complete; the close timer is replaced by a hard abort",
        "d4919ed760ce9f7b",
    ),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.keepalive_timeout",
        "copied",
        "a missed pong aborts instead of close()",
        "8e1ceb6ec446de9d",
    ),
    Internal(f"{WS}:WebSocketsSansIOProtocol.run_asgi", "name", "puts SocketHooks in the scope first"),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.handle_events",
        "copied",
        "its dispatch is copied, each frame counted against MAX_INCOMING_RATE before it (FramePolicy)",
        "b2c9351a5d13493f",
    ),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.send_receive_event_to_app",
        "copied",
        "invalid UTF-8 is caught before it (1007, no traceback); it joins `frames` and decodes as the check does",
        "a2b10de91477dc1d",
    ),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.handle_ping",
        "copied",
        "it writes the pong websockets queued; not when the peer leaves over SEND_QUEUE_BYTES unread",
        "41bcf345d372c55c",
    ),
    *(
        Internal(f"{WS}:WebSocketsSansIOProtocol.{name}", "name", "dispatched to from the copied handle_events")
        for name in ("handle_connect", "handle_cont", "handle_text", "handle_bytes", "handle_pong", "handle_close")
    ),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.data_received",
        "name",
        "an unparsable upgrade is answered; after a violation nothing more is parsed",
    ),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.receive",
        "source",
        "resumes reading once the app has drained the queue: paused again after a violation",
        "self.transport.resume_reading()",
    ),
    Internal(f"{WS}:WebSocketsSansIOProtocol.stop_keepalive", "name", "called at shutdown"),
    Internal(
        f"{WS}:WebSocketsSansIOProtocol.handle_connect",
        "source",
        "the handshake request kept on the protocol, dropped once open (about 4 KiB per idle socket)",
        "self.request = event",
    ),
    *(
        Internal(f"{WS}:WebSocketsSansIOProtocol.{attr}", "self", why)
        for attr, why in (
            ("queue", "replaced by ReceiveQueue (put_nowait, get, empty)"),
            ("writable", "replaced by WritableGate (is_set, set, clear, wait)"),
            ("conn", "the websockets ServerProtocol"),
            ("transport", "frames are written to it directly"),
            ("close_sent", "no frame after a close"),
            ("disconnected", "a lost socket is DEAD"),
            ("handshake_initiated", "an unparsable request never initiated one"),
            ("handshake_complete", "set for denials and refusals"),
            ("close_timer", "replaced by a hard abort"),
            ("close_timeout", "the grace before that abort"),
            ("ping_timeout", "the stall watch's timeout"),
            ("loop", "timers"),
            ("client", "named in log lines"),
            ("scope", "SocketHooks goes into its extensions"),
            ("request", "dropped once the socket is open"),
            ("frames", "a violation drops the fragments gathered so far"),
            ("curr_msg_data_type", "text messages are checked for UTF-8"),
            ("read_paused", "a violation stops reading at once"),
            ("response", "dropped once the socket is open"),
        )
    ),
    # --- websockets (edge/websocket.py) ---
    Internal(
        "websockets.protocol:Protocol.parse",
        "copied",
        "a fresh frame parser replaces the one whose frame still holds the handshake request",
        "45aaf900644b63c4",
    ),
    Internal("websockets.protocol:OPEN", "name", "the state in which the parser is rebuilt"),
    Internal(
        "websockets.protocol:Protocol.parser",
        "self",
        "a lost socket's parser is replaced by a spent one: the generator's frame holds the protocol, a cycle",
    ),
    Internal(
        "websockets.protocol:Protocol.parser_exc",
        "self",
        "cleared once the socket is lost: a protocol error's traceback holds the parser's frame, a cycle",
    ),
    # --- asyncio (edge/transport.py) ---
    Internal(
        "asyncio.selector_events:_SelectorSocketTransport._read_ready_cb",
        "self",
        "cleared once the connection is lost: the transport's own bound method, a cycle (docs/performance.md)",
    ),
    Internal("websockets.frames:Frame", "name", "each frame the peer sends is counted (FramePolicy)"),
    Internal("websockets.frames:Opcode", "name", "the dispatch of the copied handle_events"),
    Internal("websockets.http11:Request", "name", "the handshake event in the copied handle_events"),
    Internal("websockets.http11:MAX_LINE_LENGTH", "name", "named in the 414/431 answer to an upgrade"),
    Internal("websockets.http11:MAX_NUM_HEADERS", "name", "named in the 431 answer to an upgrade"),
    Internal("websockets.exceptions:RequestLineTooLong", "name", "a 414 for an upgrade"),
    Internal("websockets.exceptions:HeaderLineTooLong", "name", "a 431 for an upgrade"),
    Internal("websockets.exceptions:TooManyHeaders", "name", "a 431 for an upgrade"),
    # --- uvicorn's server and config (edge/serve.py, edge/limits.py, cli.py) ---
    Internal("uvicorn.server:Server.startup", "name", "the listen queue is set again after it"),
    Internal("uvicorn.server:Server.handle_exit", "name", "the app hears of SIGTERM first"),
    Internal("uvicorn.server:Server.servers", "self", "the listening sockets"),
    Internal("uvicorn.config:Config.backlog", "self", "asyncio's accept batch (ACCEPT_BATCH)"),
    Internal(
        "uvicorn.config:Config",
        "source",
        "a plain object: the edge's limits ride on it as _diary_edge",
        "self.backlog = backlog",
    ),
    Internal("uvicorn.middleware.proxy_headers:ProxyHeadersMiddleware", "name", "X-Forwarded-For from proxies"),
    Internal(
        "asyncio.selector_events:BaseSelectorEventLoop._accept_connection",
        "source",
        "accepts up to `backlog` connections per turn of the loop: the descriptors taken before the caps act",
        "for _ in range(backlog)",
    ),
)


def resolve(where: str) -> Any:
    """The object at "module:Qualified.name"; AttributeError or ImportError when it is gone."""
    module_name, _, qualified = where.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualified.split("."):
        target = getattr(target, part)
    return target


def digest(obj: Any) -> str:
    """A short hash of an object's source: it changes when upstream changes the body the edge copied."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def check(entry: Internal) -> str | None:
    """None when `entry` still holds for the installed packages, else what changed."""
    try:
        if entry.kind == "self":
            owner, _, attr = entry.where.rpartition(".")
            cls = resolve(owner)
            sources = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__ == cls.__module__)
            return None if f"self.{attr} " in sources or f"self.{attr}:" in sources else "no longer set"
        target = resolve(entry.where)
        if entry.kind == "copied":
            found = digest(target)
            return None if found == entry.detail else f"its source changed (digest {found}): read it again"
        if entry.kind == "source":
            return None if entry.detail in inspect.getsource(target) else f"no longer has {entry.detail!r}"
        return None
    except (AttributeError, ImportError, OSError, TypeError) as exc:
        return f"gone ({exc})"


def unsupported() -> str | None:
    """Why the installed uvicorn or websockets is outside the range the edge was checked against, or None."""
    for package, checked in (("uvicorn", UVICORN_CHECKED), ("websockets", WEBSOCKETS_CHECKED)):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return f"{package} is not installed"
        if not version.startswith(checked):
            return f"{package} {version} is not a version the edge was checked against ({', '.join(checked)}x)"
    return None
