"""Serving: the draining Server, the supervisor for several workers, and the proxy-headers wrapping."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from diary_ws import gcpolicy
from diary_ws.auth import PEER_SCOPE_KEY
from diary_ws.edge.transport import log
from diary_ws.logs import warn_throttled

# Connections asyncio accepts per turn of the event loop (it takes uvicorn's `backlog` for it), and the length
# of the kernel's queue of connections not yet accepted. settings.FD_RESERVE keeps two batches' descriptors.
ACCEPT_BATCH = 64
LISTEN_QUEUE = 2048  # uvicorn's default backlog


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

    def __init__(
        self, config: uvicorn.Config, on_signal: Callable[[], None], drain_seconds: float, gc_freeze: bool = False
    ) -> None:
        super().__init__(config)
        self._gc_freeze = gc_freeze
        self._on_signal = on_signal
        self._drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(quiet_accept_errors)
        try:
            await super().serve(sockets)
        finally:
            gcpolicy.uninstall()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # asyncio accepts up to `backlog` connections per turn of the loop before any of them is seen by the
        # protocol, which is where the caps act: a small backlog (ACCEPT_BATCH) keeps how many descriptors can
        # be taken before an eviction frees one inside the reserve. The kernel's queue of connections waiting
        # to be accepted is the listen() size, set again here so that bursts of connects still queue.
        for server in getattr(self, "servers", []):
            for listening in server.sockets:
                with contextlib.suppress(OSError), socket.socket(fileno=os.dup(listening.fileno())) as dup:
                    dup.listen(LISTEN_QUEUE)
        if self.started:
            gcpolicy.install(self._gc_freeze)  # after start-up: what it left is long-lived, frozen with the rest

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn waits for every connection before it runs the lifespan shutdown (uvicorn.Server.shutdown), so
        # the app hears of SIGTERM here, from the signal handler, or not in time.
        self._on_signal()
        if self._draining or not self._drain_seconds or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        log.info("draining for %.1f s: /readyz answers 503, open sockets stay", self._drain_seconds)
        self._loop.call_soon_threadsafe(self._loop.call_later, self._drain_seconds, super().handle_exit, sig, None)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: an accept() out of descriptors or memory is one throttled line, not a
    traceback per attempt (asyncio retries a second later itself); anything else goes to asyncio's default."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        warn_throttled(log, "accept-" + errno.errorcode.get(exc.errno or 0, "error"), "accept() failed: %s", exc)
        return
    loop.default_exception_handler(context)


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
