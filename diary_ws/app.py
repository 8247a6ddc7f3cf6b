"""`create_app(settings)`: the Starlette app, its lifespan, its state and its error mapping."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from diary_ws import idempotency, logs
from diary_ws.auth import Security
from diary_ws.backends import backend_for
from diary_ws.broadcaster import Hub, Limits
from diary_ws.errors import DiaryWSError, MethodNotAllowed, NotFound
from diary_ws.metrics import Metrics, RequestMetrics
from diary_ws.ratelimit import RateLimiter
from diary_ws.routes import (
    API,
    LISTEN_PREFIX,
    NOTIFY_ROUTE,
    SERVER_ERROR,
    Listen,
    Notify,
    error_response,
    json_response,
    routes,
    send_json,
)
from diary_ws.settings import SettingError, Settings, fd_budget, open_file_limit

log = logging.getLogger("diary_ws.app")


def default_max_connections(settings: Settings) -> int:
    """What the open-file limit leaves for listeners after MAX_HTTP_CONNECTIONS and a reserve (fd_budget)."""
    try:
        return fd_budget(settings, open_file_limit())[1]
    except SettingError:  # an embedding host's settings past its limit: keep the old margin rather than stop
        return max(1, open_file_limit() - 128)


class DiaryApp(Starlette):
    """Starlette, with two shortcuts past its middleware stack and router, to the two hottest handlers.

    - A POST to the notification route, the one a busy back end calls thousands of times a second:
      Starlette's three middleware layers, its router and the request wrapper cost a third of its time
      (py-spy). The shortcut does what they would have done for it: counts the request in the metrics, and
      answers an unexpected exception with the JSON 500 before it re-raises it for the server to log.
    - A WebSocket under /api/v1/ws/: through the stack, every open socket keeps about 40 more objects alive
      for its whole life (the await chain of every layer, their closures and a second WebSocket wrapper).
      Python's full garbage collections walk every one of them: at 10,000 sockets each took about 0.3 s.
      The stack does nothing else for a WebSocket (our metrics middleware counts HTTP only, and `Listen`
      answers its own refusals).

    Both are taken only while the middleware stack is the one `create_app` built: middleware that an
    embedding host adds sees every request.
    """

    _shortcuts: tuple[Notify, Listen] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        if [m.cls for m in self.user_middleware] == [cast(Any, RequestMetrics)]:
            self._shortcuts = Notify(), Listen()
        return super().build_middleware_stack()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shortcuts = self._shortcuts
        kind = scope["type"]
        if shortcuts is not None and (kind == "websocket" or (kind == "http" and scope["method"] == "POST")):
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            inside = path[len(root) :] if root and path.startswith(root) else path  # as Starlette's router sees it
            if kind == "http":
                if inside == NOTIFY_ROUTE:
                    await self._notify(shortcuts[0], scope, receive, send)
                    return
            elif inside.startswith(LISTEN_PREFIX):
                scope["app"] = self
                scope["path_params"] = {"user_id": inside[len(LISTEN_PREFIX) :]}  # what the route would match
                await shortcuts[1](scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _notify(self, handler: Notify, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        status = 500
        try:
            status = await handler.respond(scope, receive, send)
        except Exception:
            with contextlib.suppress(Exception):  # it fails only if the answer had started: then uvicorn closes
                await send_json(send, 500, SERVER_ERROR)
            raise
        finally:
            metrics: Metrics = self.state.metrics
            metrics.request("POST", NOTIFY_ROUTE, status)


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
    metrics = Metrics(hub, per_worker=settings.workers > 1)
    app = DiaryApp(
        routes=routes(),
        middleware=[Middleware(RequestMetrics, metrics=metrics)],
        lifespan=lifespan,
        exception_handlers={
            DiaryWSError: _diary_error,
            HTTPException: _http_error,
            500: _server_error,
        },
    )
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
    await hub.start()
    try:
        async with metrics.lag_probe():
            yield
    finally:
        await hub.stop()


async def _diary_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DiaryWSError)  # Starlette picks handlers by class; this narrows the type
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        # Match on the path below the prefix, so the hint survives a Mount or ROOT_PATH.
        inside = request.url.path.removeprefix(request.scope.get("root_path", ""))
        hint = ": WebSocket endpoints need a WebSocket client" if inside.startswith(API + "/") else ""
        return error_response(NotFound(f"no route for {where}{hint}"))
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return error_response(
            MethodNotAllowed(f"{where} is not allowed; use {allowed}", headers=dict(exc.headers or {}))
        )
    return json_response({"status": "error", "message": exc.detail}, exc.status_code, dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    # A bug of ours: Starlette logs the traceback; the client still gets the JSON error shape, not plain text.
    return Response(SERVER_ERROR, 500, media_type="application/json")
