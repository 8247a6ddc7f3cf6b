"""The HTTP and WebSocket endpoints: parse, check, call the Hub, answer. No delivery logic here."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, cast

import orjson
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from diary_ws import deadline, idempotency
from diary_ws.admission import admit_listener
from diary_ws.auth import Security, client_address
from diary_ws.broadcaster import Connection, Hub, State
from diary_ws.browser_client import client_script, cors_send
from diary_ws.console import console, overview
from diary_ws.errors import (
    Answer,
    BadRequest,
    BrokerUnavailable,
    ClientGone,
    DiaryWSError,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    ServerFull,
    ValidationError,
    error_answer,
)
from diary_ws.messages import HEARTBEAT_FRAME, Message, MessageId
from diary_ws.metrics import CONTENT_TYPE, Metrics
from diary_ws.openapi import openapi_document
from diary_ws.protocols import Claim, CloseCode, Idempotency, PublishResult, SocketControl, StreamControl, WriteResult
from diary_ws.ratelimit import RateLimiter
from diary_ws.settings import Settings
from diary_ws.sse import HEADERS, STREAM_EXTENSION, SseSink, until_ended
from diary_ws.validation import (
    Batch,
    ListenQuery,
    Notification,
    check_content_type,
    check_user_id,
    parse_batch,
    parse_notification,
    parse_stream_query,
)

API = "/api/v1/ws"
SSE = "/api/v1/sse"
SOCKET_EXTENSION = "diary_ws.socket"  # offered by diary_ws.server's uvicorn protocol


def json_response(body: dict[str, Any], status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """One orjson-serialised JSON answer."""
    return Response(orjson.dumps(body), status_code, headers, media_type="application/json")


def error_response(exc: DiaryWSError) -> Response:
    """`errors.error_answer` as a Starlette Response, for the endpoints that are functions."""
    status, body, headers = error_answer(exc)
    return Response(body, status, dict(headers), media_type="application/json")


# --- HTTP ------------------------------------------------------------------------------------------------


NOTIFY_ROUTE = f"{API}/notification"
BATCH_ROUTE = f"{API}/notifications"
LISTEN_PREFIX = f"{API}/"  # every WebSocket path under it is a listener's, valid user id or not
_JSON_TYPE = (b"content-type", b"application/json")
# The request headers the POST reads, picked out of the raw list in one pass (first one wins, as Starlette's).
_WANTED = frozenset((b"authorization", b"x-api-key", b"idempotency-key", b"content-type", b"content-length"))


async def send_json(send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    """One JSON answer as two ASGI messages, without building a Starlette Response."""
    raw = [(b"content-length", str(len(body)).encode()), _JSON_TYPE]
    if headers:
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Notify:
    """POST /api/v1/ws/notification, the route a busy back end calls thousands of times a second.

    Raw ASGI (Starlette calls a class instance as an ASGI app): it skips Starlette's Request and Response
    objects and reads the five headers it needs in one pass over the list. An exception that escapes it has
    sent nothing: `app.Front` answers it with the JSON 500.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            answer = await self._handle(scope, receive)
            if answer.status == 200:
                metrics: Metrics = scope["app"].state.metrics
                metrics.observe_http_publish(time.perf_counter() - started)
        except DiaryWSError as exc:
            answer = error_answer(exc)
        await send_json(send, *answer)

    async def _handle(self, scope: Scope, receive: Receive) -> Answer:
        # One deadline for every broker call of this request (rate limit, idempotency key, publish), and a
        # backstop over all of it: past it the outcome is unknown, which is what a 504 says.
        with deadline.request():
            try:
                async with asyncio.timeout(backstop(scope["app"].state.hub)):
                    return await self._handle_in_time(scope, receive)
            except TimeoutError:
                raise OutcomeUnknown(
                    "no answer in time: the notification may or may not have been sent; a retry with the same "
                    "Idempotency-Key is safe (without one, a retry may send it twice)"
                ) from None

    async def _handle_in_time(self, scope: Scope, receive: Receive) -> Answer:
        state = scope["app"].state
        settings: Settings = state.settings
        found = wanted_headers(scope)
        security: Security = state.security
        sender = security.sender(found.get(b"authorization"), found.get(b"x-api-key"))  # 401 before the body
        limiter: RateLimiter | None = state.publish_limiter
        limit_headers: dict[str, str] = {}
        if limiter is not None:
            limit_headers = await limiter.acquire(sender or client_address(scope), "notifications")
        key = found.get(b"idempotency-key")
        key = None if key is None else idempotency.check_key(key)
        check_content_type(found.get(b"content-type"))
        body = await read_body(receive, found.get(b"content-length"), settings.max_body_bytes)
        note = parse_notification(body, settings.max_message_chars)
        hub: Hub = state.hub
        if key is None:
            return await publish(hub, note, limit_headers)
        run = functools.partial(publish, hub, note, limit_headers)
        return await publish_once(state.idempotency, key, idempotency.fingerprint(note), run, limit_headers)


def wanted_headers(scope: Scope) -> dict[bytes, str]:
    """The request headers a POST reads, picked out of the raw list in one pass."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED and name not in found:
            found[name] = value.decode("latin-1")
    return found


def backstop(hub: Hub) -> float | None:
    """The cut-off over a request's broker calls, with a broker (None without: memory mode waits on nothing
    but its own fan-out, which a cut-off would stop half way)."""
    return deadline.BACKSTOP_SECONDS if hub.backend.shared() is not None else None


async def publish_once(
    cache: Idempotency,
    key: str,
    print_: bytes,
    run: Callable[[Claim | None], Awaitable[Answer]],
    headers: dict[str, str],
) -> Answer:
    """Run a publish under an Idempotency-Key: a repeat gets the first answer again, and nothing is sent.

    `run` gets the key's claim, for a backend that records the key in the step that stores the message.
    """
    first = await cache.begin(key, print_)
    if first is not None:
        return Answer(first.status, first.body, {**headers, "Idempotent-Replayed": "true"})
    try:
        answer = await run(cache.claim(key, print_))
    except BaseException:  # 404, 503, a cancelled request: the key is free for a retry (unless a message is stored)
        await cache.abandon(key)
        raise
    await cache.finish(key, Answer(answer.status, answer.body))
    return answer


async def publish(hub: Hub, note: Notification, headers: dict[str, str], claim: Claim | None = None) -> Answer:
    """Publish and answer with the guide's fields plus `id`."""
    return Answer(200, orjson.dumps(sent_answer(await hub.publish(note, claim))), headers)


def sent_answer(result: PublishResult) -> dict[str, Any]:
    """The success answer of one publish: the guide's fields plus `id` (and `nodes_missing` when some were)."""
    noun = "user" if result.users_reached == 1 else "users"
    answer = {
        "status": "success",
        "message": f"Notification sent to {result.users_reached} {noun}",
        "sent_count": result.sent_count,
        "total_connections": result.total_connections,
        "disconnected_users": result.disconnected_users,
        "id": str(result.id),
    }
    if result.nodes_missing:
        answer["nodes_missing"] = result.nodes_missing  # the key appears only then (see docs/clients.md)
    return answer


class NotifyMany:
    """POST /api/v1/ws/notifications: a batch of notifications, each checked and published on its own.

    Raw ASGI like `Notify`, so the body is read with the same bounded reader (MAX_BATCH_BYTES here).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer = await self._handle(scope, receive)
        except DiaryWSError as exc:
            answer = error_answer(exc)
        await send_json(send, *answer)

    async def _handle(self, scope: Scope, receive: Receive) -> Answer:
        # As for one notification: one deadline for every broker call, and a backstop past which it is a 504.
        with deadline.request():
            try:
                async with asyncio.timeout(backstop(scope["app"].state.hub)):
                    return await self._handle_in_time(scope, receive)
            except TimeoutError:
                raise OutcomeUnknown(
                    "no answer in time: the batch may or may not have been sent; a retry with the same "
                    "Idempotency-Key is safe (without one, a retry may send it twice)"
                ) from None

    async def _handle_in_time(self, scope: Scope, receive: Receive) -> Answer:
        state = scope["app"].state
        settings: Settings = state.settings
        found = wanted_headers(scope)
        security: Security = state.security
        sender = security.sender(found.get(b"authorization"), found.get(b"x-api-key"))  # 401 before the body
        key = found.get(b"idempotency-key")
        key = None if key is None else idempotency.check_key(key)
        check_content_type(found.get(b"content-type"))
        body = await read_body(receive, found.get(b"content-length"), settings.max_batch_bytes, "MAX_BATCH_BYTES")
        batch = parse_batch(body, settings.max_batch, settings.max_message_chars, settings.max_body_bytes)
        limiter: RateLimiter | None = state.publish_limiter
        run = functools.partial(limit_and_publish, state.hub, batch, limiter, sender or client_address(scope))
        if key is None:
            return await run(None)
        # The limit is taken inside the keyed run: a replay of a batch (a retry after a 504) costs no tokens.
        status, body, headers = await publish_once(state.idempotency, key, batch.fingerprint, run, {})
        return Answer(status, with_invalid_items(body, batch) if "Idempotent-Replayed" in headers else body, headers)


async def limit_and_publish(
    hub: Hub, batch: Batch, limiter: RateLimiter | None, who: str, claim: Claim | None
) -> Answer:
    """Take one token per item (checked or not: each is a request's worth), then publish the batch."""
    headers = {} if limiter is None else await limiter.acquire(who, "notifications", len(batch.items))
    return await publish_batch(hub, batch, headers, claim)


def with_invalid_items(body: bytes, batch: Batch) -> bytes:
    """A replayed batch answer with a result for every item: one rebuilt by the broker from what it stored (the
    first request never answered) has none for the items that were not valid, which are put back in place."""
    doc = orjson.loads(body)
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or len(results) == len(batch.items):
        return body
    stored = iter(results)
    doc["results"] = [_item_error(item) if isinstance(item, ValidationError) else next(stored) for item in batch.items]
    doc["failed"] = sum(1 for r in doc["results"] if r["status"] == "error")
    return orjson.dumps(doc)


def _item_error(error: DiaryWSError) -> dict[str, Any]:
    return {"status": "error", "code": error.status_code, "message": error.message}


async def publish_batch(hub: Hub, batch: Batch, headers: dict[str, str], claim: Claim | None) -> Answer:
    """Publish a batch's valid items in one go; 200 with one result per item, in order."""
    notes = [item for item in batch.items if isinstance(item, Notification)]
    published = iter(await hub.publish_batch(notes, claim) if notes else ())
    results: list[dict[str, Any]] = []
    for item in batch.items:
        done = item if isinstance(item, ValidationError) else next(published)
        results.append(sent_answer(done) if isinstance(done, PublishResult) else _item_error(done))
    failed = sum(1 for r in results if r["status"] == "error")
    return Answer(200, orjson.dumps({"status": "success", "results": results, "failed": failed}), headers)


def check_sender(request: Request) -> None:
    """401 without a valid API key, when keys are configured."""
    security: Security = request.app.state.security
    security.sender(request.headers.get("authorization"), request.headers.get("x-api-key"))


async def read_body(receive: Receive, declared: str | None, limit: int, setting: str = "MAX_BODY_BYTES") -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (Content-Length or not)."""
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise BadRequest("Content-Length must be a whole number of bytes")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body is {declared} bytes; the limit is {limit} ({setting})")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if not more and not chunks:
            if len(chunk) > limit:
                break
            return chunk  # the usual case: the whole body in one message, nothing to join
        size += len(chunk)
        if size > limit:
            break
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)
    raise PayloadTooLarge(f"body is over {limit} bytes, the limit ({setting})")


async def status(request: Request) -> Response:
    """GET /api/v1/ws/status."""
    check_sender(request)
    raw = request.query_params.get("limit")
    limit = None
    if raw is not None:
        # isdigit() alone takes "²", which int() refuses: that was a 500.
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
            raise BadRequest("query parameter limit must be a whole number of at least 0")
        limit = int(raw)
    hub: Hub = request.app.state.hub
    with deadline.request():
        try:
            async with asyncio.timeout(backstop(hub)):
                return json_response(await hub.status(limit))
        except TimeoutError:
            raise BrokerUnavailable("broker unavailable: no answer in time; retry later") from None


async def presence(request: Request) -> Response:
    """GET /api/v1/ws/users/{user_id}: whether a user is connected anywhere, and with how many sockets."""
    check_sender(request)
    user_id = check_user_id(request.path_params["user_id"])
    hub: Hub = request.app.state.hub
    with deadline.request():  # as for the status: a broker that does not answer in time is a 503
        try:
            async with asyncio.timeout(backstop(hub)):
                count = await hub.connections_of(user_id)
        except TimeoutError:
            raise BrokerUnavailable("broker unavailable: no answer in time; retry later") from None
    return json_response({"user_id": user_id, "connected": count > 0, "connections": count})


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text format; unauthenticated like /healthz (it names no user)."""
    registry: Metrics = request.app.state.metrics
    return Response(registry.exposition(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    """GET /api/v1/ws/openapi.json: the hand-written OpenAPI 3.1 document, packaged with the code."""
    return Response(openapi_document(request.scope.get("root_path", "")), media_type="application/json")


async def disconnect(request: Request) -> Response:
    """DELETE /api/v1/ws/users/{user_id}/connections: close every socket of a user with 4003 (log-out, ban)."""
    check_sender(request)
    user_id = check_user_id(request.path_params["user_id"])
    hub: Hub = request.app.state.hub
    with deadline.request():
        try:
            async with asyncio.timeout(backstop(hub)):
                closed, missing = await hub.disconnect_user(user_id)
        except TimeoutError:
            raise OutcomeUnknown(
                "no answer in time: the connections may or may not have been closed; retrying is safe"
            ) from None
    noun = "connection" if closed == 1 else "connections"
    answer = {"status": "success", "message": f"Closed {closed} {noun} of user {user_id}", "closed": closed}
    if missing:
        answer["nodes_missing"] = missing  # as for a publish: some nodes did not say how many they closed
    return json_response(answer)


async def healthz(request: Request) -> Response:
    """The process is alive and its event loop answers."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready for new clients: started, not shutting down, broker reachable."""
    hub: Hub = request.app.state.hub
    if not hub.ready():
        why = "shutting down" if hub.draining else "not ready: the broker is unavailable or still starting"
        return error_response(ServerFull(why))
    return json_response({"status": "ready"})


# --- WebSocket -------------------------------------------------------------------------------------------


class AsgiSink:
    """Adapts one ASGI WebSocket to the Hub's `Sink`."""

    __slots__ = ("_control", "_send")

    def __init__(self, send: Send, control: SocketControl | None) -> None:
        self._send = send
        self._control = control

    def try_write(self, message: Message) -> WriteResult:
        return WriteResult.LATER if self._control is None else self._control.try_write(message.wire)

    async def send_text(self, text: str, msg_id: MessageId | None) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def send_heartbeat(self) -> None:
        await self._send({"type": "websocket.send", "text": HEARTBEAT_FRAME})

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def stalled(self) -> bool:
        return self._control is not None and self._control.stalled()

    def abort(self) -> bool:
        if self._control is None:
            return False
        self._control.abort()
        return True


# What Starlette's accept() sends.
ACCEPT: dict[str, Any] = {
    "type": "websocket.accept",
    "subprotocol": None,
    "headers": [],
}  # what Starlette's accept() sends


class Listen:
    """WebSocket /api/v1/ws/{user_id}: receive-only.

    Raw ASGI, with no Starlette WebSocket wrapper: everything a handler holds lives as long as its socket, and
    Python's full garbage collections walk it, at every one of 10,000 sockets.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub: Hub = scope["app"].state.hub
        settings: Settings = scope["app"].state.settings
        metrics: Metrics = scope["app"].state.metrics
        conn: Connection | None = None
        code: int = CloseCode.ABNORMAL  # the handler failed before the peer's disconnect reached it
        try:
            admission = await admit_listener(scope)  # 400, 401, 403, 429: before the upgrade
            sink = AsgiSink(send, scope.get("extensions", {}).get(SOCKET_EXTENSION))
            conn = hub.session(admission.user_id, sink, admission.expires_at)
            since, heartbeat = admission.query.since, admission.query.heartbeat
            del admission  # this frame lives as long as the socket, which needs none of it
            async with conn:  # the Hub's limits (429, 503), then the socket's whole life
                try:
                    await receive()  # websocket.connect, which the server sends first
                    await send(ACCEPT)
                    metrics.accepted_handshake("websocket")
                    await hub.listen(conn, since)
                    if heartbeat is not None:
                        conn.heartbeat_every(heartbeat)
                    code = await read_and_discard(
                        receive, conn, settings.max_incoming_bytes, settings.max_incoming_rate
                    )
                finally:
                    metrics.closed(code)
        except DiaryWSError as exc:
            if conn is not None and conn.state is not State.REFUSED:
                raise  # no refusal: nothing after the upgrade raises one
            await WebSocket(scope, receive, send).send_denial_response(error_response(exc))
            metrics.refused(exc.status_code)


async def read_and_discard(receive: Receive, conn: Connection, max_bytes: int, max_rate: float) -> int:
    """Read the client's frames and drop them; police size (1009) and rate (1008); end on disconnect.

    Returns the close code the connection ended with (ours when we closed it, the peer's otherwise).
    """
    loop = asyncio.get_running_loop()  # not its bound `time`: that would be one more object per socket
    tokens, last = max_rate, loop.time()  # a token bucket: bursts of up to `max_rate` frames, `max_rate` a second
    closing = False
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            code: int = message.get("code", CloseCode.NO_STATUS)
            return code
        if closing or message["type"] != "websocket.receive":
            continue  # after our close frame we only wait for the disconnect
        size = len(message.get("bytes") or b"") or len((message.get("text") or "").encode())
        now = loop.time()
        tokens = min(max_rate, tokens + (now - last) * max_rate) - 1
        last = now
        if size > max_bytes:
            conn.close(CloseCode.MESSAGE_TOO_BIG, f"frame too big: at most {max_bytes} bytes")
            closing = True
        elif tokens < 0:
            conn.close(
                CloseCode.POLICY_VIOLATION,
                f"too many frames: at most {max_rate:g} a second; this socket is receive-only",
            )
            closing = True


# --- Server-Sent Events --------------------------------------------------------------------------------------


def stream_query(scope: Scope) -> ListenQuery:
    """The SSE stream's query string and Last-Event-ID header."""
    last_event_id = next((v for k, v in scope["headers"] if k == b"last-event-id"), None)
    return parse_stream_query(scope["query_string"], None if last_event_id is None else last_event_id.decode("latin-1"))


class Stream:
    """GET /api/v1/sse/{user_id}: the WebSocket's messages as Server-Sent Events. Raw ASGI, like `Listen`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub: Hub = scope["app"].state.hub
        settings: Settings = scope["app"].state.settings
        metrics: Metrics = scope["app"].state.metrics
        send = cors_send(scope, send)  # the browser client's fallback may stream to a page on another origin
        control: StreamControl | None = scope.get("extensions", {}).get(STREAM_EXTENSION)
        sink = SseSink(send, control)
        conn: Connection | None = None
        try:
            admission = await admit_listener(scope, stream_query)  # the WebSocket's checks: auth, origin, rate, ids
            if scope["method"] == "HEAD":
                # The stream's head and no session: a HEAD carries no body, so as a listener it took a slot and
                # counted every message to its user as sent while nothing could ever reach anyone.
                await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                await send({"type": "http.response.body", "body": b""})
                return
            conn = hub.session(admission.user_id, sink, admission.expires_at)
            async with conn:  # the Hub's limits (429, 503), then the stream's whole life
                # uvicorn would wait on an open stream at shutdown (docs/operations.md, "Shutdown"): end it first
                if control is not None:
                    control.on_shutdown(lambda: conn.close(CloseCode.SERVICE_RESTART, "server restarting"))
                try:
                    await sink.open()
                    metrics.accepted_handshake("sse")
                    await hub.listen(conn, admission.query.since)
                    conn.heartbeat_every(settings.ping_interval)
                    await until_ended(receive, sink)
                finally:
                    if control is not None:
                        control.on_shutdown(None)
        except DiaryWSError as exc:
            if conn is not None and conn.state is not State.REFUSED:
                raise  # no refusal: nothing after the stream starts raises one
            await send_json(send, *error_answer(exc))  # before the stream starts: a plain JSON answer
            metrics.refused(exc.status_code, "sse")


async def unknown_socket(websocket: WebSocket) -> None:
    """Any other WebSocket path: a JSON 404 refusal instead of Starlette's bare 403."""
    where = websocket.scope["path"]
    prefix = websocket.scope.get("root_path", "")  # under a Mount or ROOT_PATH the endpoint moves with it
    await websocket.send_denial_response(
        error_response(NotFound(f"no WebSocket endpoint at {where}; listen at {prefix}{API}/{{user_id}}"))
    )
    websocket.app.state.metrics.refused(404)


class AnythingConvertor(Convertor[str]):
    """Like Starlette's `path`, but it also matches newlines, so no path escapes the JSON refusal."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anything", AnythingConvertor())


class UserConvertor(AnythingConvertor):
    """`anything`, except a path that ends in /connections: that one is the DELETE route's, and a GET of it
    must get that route's 405 rather than this route's 400 for a user id with a slash in it.

    Starlette takes the first route that matches path and method over one that matches the path alone.
    """

    regex = "(?s:(?!.*/connections$).*)"


register_url_convertor("user", UserConvertor())


class AsgiRoute(Route):
    """A `Route` to a raw ASGI endpoint whose `handle` has no frame of its own when the method matches: it
    returns the endpoint's coroutine for the router to await (one coroutine less per request on the POST
    a busy back end sends thousands of times a second). Any other method gets Starlette's own 405."""

    def handle(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        if self.methods and scope["method"] not in self.methods:
            return super().handle(scope, receive, send)
        return cast(Coroutine[Any, Any, None], self.app(scope, receive, send))


class SocketRoute(WebSocketRoute):
    """A `WebSocketRoute` whose `handle` has no frame of its own: it returns the endpoint's coroutine for the
    router to await. A socket's await chain lives as long as the socket, and Python's full garbage
    collections walk every object in it, at every one of 10,000 sockets: one coroutine less each."""

    def handle(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        return cast(Coroutine[Any, Any, None], self.app(scope, receive, send))


def routes() -> list[BaseRoute]:
    """Every route of the service, in match order."""
    return [
        AsgiRoute(NOTIFY_ROUTE, Notify(), methods=["POST"]),
        AsgiRoute(BATCH_ROUTE, NotifyMany(), methods=["POST"]),
        Route(f"{API}/status", status, methods=["GET"]),
        # `anything`, so that a user id with a / (or an empty one) gets the documented 400, not a 404.
        Route(f"{API}/users/{{user_id:anything}}/connections", disconnect, methods=["DELETE"]),
        Route(f"{API}/users/{{user_id:user}}", presence, methods=["GET"]),
        Route(f"{API}/console", console, methods=["GET"]),
        Route(f"{API}/console/overview", overview, methods=["GET"]),
        Route(f"{API}/console/{{asset}}", console, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route(f"{API}/openapi.json", openapi, methods=["GET"]),
        Route(f"{API}/client.js", client_script, methods=["GET"]),  # HTTP only: a WebSocket here is user client.js
        # `anything` so that /api/v1/ws/a/b or a%0Ab reaches the user-id check and gets its 400, not the
        # empty 403 of an unmatched WebSocket (Starlette's `path` convertor stops at a newline).
        AsgiRoute(SSE + "/{user_id:anything}", Stream(), methods=["GET"]),
        SocketRoute(LISTEN_PREFIX + "{user_id:anything}", Listen()),
        WebSocketRoute("/{path:anything}", unknown_socket),
    ]
