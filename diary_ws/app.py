"""`create_app(settings)`: the Starlette app, its lifespan, its state and its error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any, cast

from starlette.applications import Starlette
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diary_ws import idempotency, logs, sharing
from diary_ws.auth import Security
from diary_ws.backends import backend_for
from diary_ws.broadcaster import Hub, Limits
from diary_ws.errors import DiaryWSError, MethodNotAllowed, NotFound, error_answer
from diary_ws.metrics import UNMATCHED, Metrics, route_label
from diary_ws.ratelimit import RateLimiter
from diary_ws.routes import API, routes, send_json
from diary_ws.settings import SettingError, Settings, fd_budget, open_file_limit

log = logging.getLogger("diary_ws.app")


def default_max_connections(settings: Settings) -> int:
    """What the open-file limit leaves for listeners after MAX_HTTP_CONNECTIONS and a reserve (fd_budget)."""
    try:
        return fd_budget(settings, open_file_limit())[1]
    except SettingError:  # an embedding host's settings past its limit: keep the old margin rather than stop
        return max(1, open_file_limit() - 128)


class DiaryApp(Starlette):
    """Starlette with one middleware layer of its own, `Front`, in place of Starlette's default three.

    Every request takes the one path: any middleware a host adds, `Front`, the router, the route's endpoint.
    """

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        # Starlette's, as a plain function that hands back the coroutine to await: a socket's await chain
        # lives as long as the socket, so each frame in it is kept by every idle socket (about 300 bytes and
        # a few objects the collector tracks, at each of 18,500).
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        if scope["type"] == "websocket" and not self.user_middleware:
            socket = self._socket_route(scope)
            if socket is not None:
                return socket.handle(scope, receive, send)
        return cast(Coroutine[Any, Any, None], self.middleware_stack(scope, receive, send))

    # uvicorn (and any host that checks) tells ASGI 3 from ASGI 2 by whether `__call__` is a coroutine
    # function; this one returns the coroutine instead of being one, which Python lets a function say.
    if sys.version_info >= (3, 12):
        inspect.markcoroutinefunction(__call__)
    else:  # asyncio.iscoroutinefunction's own mark, before inspect had one
        __call__._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]

    def _socket_route(self, scope: Scope) -> BaseRoute | None:
        """The router's own match for a WebSocket (Router.app's), so the router's frame is not kept either."""
        router = self.router
        if router.middleware_stack != router.app:
            return None  # router middleware: the router's own path
        for route in router.routes:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope.setdefault("router", router)
                scope["route"] = route
                scope.update(child)
                return route
        return None

    def build_middleware_stack(self) -> ASGIApp:
        # The router's own stack (its `app`, without router middleware): one coroutine less in every await chain.
        app: ASGIApp = Front(self.router.middleware_stack)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app


class Front:
    """The layer above the router: what Starlette's ServerErrorMiddleware, ExceptionMiddleware and a metrics
    middleware would do, in one raw ASGI call and for HTTP only.

    - It counts every HTTP request by route template and status, so raw paths never become labels.
    - It answers every error an endpoint or the router raises with its JSON body (`errors.error_answer`):
      ours with their status, Starlette's 404 and 405 as ours, anything else as the JSON 500, which it then
      re-raises for the server to log.

    A WebSocket and the lifespan are handed on without a frame of this layer: `__call__` is a plain function
    that returns the router's coroutine for the caller to await. A socket's await chain stays alive for the
    socket's whole life, and Python's full garbage collections walk every object in it: Starlette's default
    stack kept about 40 more per socket (every layer's frame, closures, a second WebSocket wrapper), and at
    10,000 sockets each full collection took about 0.3 s. `Listen` answers its own refusals, so a WebSocket
    needs nothing here.
    """

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        return self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 0  # no answer started yet

        def sent(message: Message) -> Awaitable[None]:  # no coroutine of its own: it hands back `send`'s
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await self.app(scope, receive, sent)
        except Exception as exc:
            if status:
                raise  # the answer had started: the server closes the connection
            answer = error_answer(from_starlette(exc, scope) if isinstance(exc, HTTPException) else exc)
            status = answer.status
            await send_json(send, *answer)
            if not isinstance(exc, (DiaryWSError, HTTPException)):
                raise  # a bug of ours: the client has its JSON 500; the server logs the traceback
        finally:
            route = getattr(scope.get("route"), "path", None)
            metrics: Metrics = scope["app"].state.metrics
            metrics.request(scope["method"], route_label(route) if isinstance(route, str) else UNMATCHED, status or 500)


def from_starlette(exc: HTTPException, scope: Scope) -> DiaryWSError:
    """The router's own 404 and 405 as our errors, with a message that says what to do."""
    where = f"{scope['method']} {URL(scope=scope).path}"
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        # Match on the path below the prefix, so the hint survives a Mount or ROOT_PATH.
        inside = URL(scope=scope).path.removeprefix(scope.get("root_path", ""))
        hint = ": WebSocket endpoints need a WebSocket client" if inside.startswith(API + "/") else ""
        return NotFound(f"no route for {where}{hint}")
    if exc.status_code == 405:
        return MethodNotAllowed(f"{where} is not allowed; use {headers.get('Allow', '')}", headers=headers)
    return DiaryWSError.of_status(exc.status_code, exc.detail, headers)


def create_app(settings: Settings | None = None) -> Starlette:
    """A whole diary-ws app; every piece of state lives on `app.state`, so two apps can share a process."""
    settings = settings or Settings()
    limits = Limits(
        max_connections=settings.max_connections or default_max_connections(settings),
        max_connections_per_user=settings.max_connections_per_user,
        send_queue_size=settings.send_queue_size,
        send_queue_bytes=settings.send_queue_bytes,
        max_message_chars=settings.max_message_chars,
        stall_timeout=settings.ping_timeout,
    )
    hub = Hub(backend_for(settings), limits)
    backend = "redis" if settings.broker_url.startswith("redis") else "memory"
    metrics = Metrics(hub, per_worker=settings.workers > 1, backend=backend)
    app = DiaryApp(routes=routes(), lifespan=lifespan)
    # Starlette answers `/healthz/` with a 307 to `/healthz`, built from the client's Host header (an open
    # redirect) and with an empty body; a path that is not ours gets the JSON 404 instead.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.hub = hub
    app.state.metrics = metrics
    app.state.security = Security.from_settings(settings)  # reads the secrets: SettingError if unusable
    shared = app.state.hub.backend.shared()  # with Redis, limits and keys hold across the cluster
    app.state.publish_limiter = RateLimiter.from_setting(settings.rate_limit, "publish", shared)
    app.state.connect_limiter = RateLimiter.from_setting(settings.connect_rate_limit, "connect", shared)
    app.state.idempotency = idempotency.for_app(settings.idempotency_ttl, shared)
    logs.redact_tokens()  # here too, so an app embedded in another server never logs a token either
    return app


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Start the hub, and stop it at shutdown.

    A host app that mounts diary-ws must call this from its own lifespan, because Starlette does not run
    a mounted app's lifespan: `async with diary_ws.lifespan(diary_app): yield`.
    """
    hub: Hub = app.state.hub
    metrics: Metrics = app.state.metrics
    settings: Settings = app.state.settings
    # memory:// lives in this process: a second worker on the same socket is refused before it serves anyone.
    alone = sharing.one_process() if settings.broker_url.startswith("memory://") else contextlib.nullcontext()
    with alone:
        await hub.start()
        try:
            async with metrics.probes():
                yield
        finally:
            await hub.stop()
