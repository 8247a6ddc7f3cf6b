"""`diary-ws serve`: flags and DIARY_WS_* variables -> Settings -> uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import os
import resource
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from diary_ws import __version__
from diary_ws import commands as client_commands
from diary_ws.settings import (
    SECRETS,
    SPECS,
    SWITCHES,
    SettingError,
    Settings,
    env_name,
    fd_budget,
    flag_name,
    from_env,
    open_file_limit,
)  # fmt: skip

if TYPE_CHECKING:
    import uvicorn

EXIT_CANNOT_START = 1
EXIT_BAD_SETTING = 2


class CannotStart(Exception):
    """The server cannot start for a reason outside the settings (its port is taken); one line for stderr."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per setting, named after it."""
    parser = argparse.ArgumentParser(
        prog="diary-ws",
        description="Real-time notifications over WebSocket: `serve` runs the server; the other commands talk to "
        "one (DIARY_WS_URL, else http://DIARY_WS_HOST:DIARY_WS_PORT). Exit codes: see docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"diary-ws {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the server", description="Run the server. Every flag is also "
                                "a DIARY_WS_* variable; a flag wins over its variable.")  # fmt: skip
    defaults = Settings()
    for name, (_parser, help_text) in SPECS.items():
        # A secret on the command line shows in `ps` and shell history; the flag exists, but says so.
        caution = "; prefer the environment or the *_FILE setting" if name in SECRETS else ""
        shown = f"{help_text} [{env_name(name)}]{caution}{_default_of(getattr(defaults, name))}"
        if name in SWITCHES:
            # --console and --no-console, as git and httpie do; `--console 1` (a value) still works.
            serve.add_argument(flag_name(name), dest=name, nargs="?", const="1", default=None, metavar="on|off",
                               help=shown)  # fmt: skip
            serve.add_argument("--no-" + flag_name(name)[2:], dest=name, action="store_const", const="0",
                               help=f"turn {flag_name(name)} off")  # fmt: skip
        else:
            serve.add_argument(flag_name(name), dest=name, metavar="VALUE", default=None, help=shown)
    client_commands.add_parsers(commands)
    return parser


def _default_of(value: object) -> str:
    if value is None or value == "" or value == ():
        return ""  # unset, or decided at start: the help text says how
    if isinstance(value, bool):
        return f" (default: {'on' if value else 'off'})"
    if isinstance(value, tuple):
        return f" (default: {','.join(value)})"
    return f" (default: {value:g})" if isinstance(value, float) else f" (default: {value})"


def main(argv: Sequence[str] | None = None) -> int:
    """The console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `diary-ws`: what it can do, as git and httpie print, and no error
        parser.print_help()
        return 0
    if args.command != "serve":
        return client_commands.run(args)
    overrides = {name: value for name, value in vars(args).items() if name in SPECS and value is not None}
    try:
        settings = from_env(os.environ, overrides)
        return serve(settings)  # create_app reads the secret files: a SettingError can come from there too
    except SettingError as exc:
        print(f"diary-ws: error: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    except CannotStart as exc:
        print(f"diary-ws: error: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START


def check_port(settings: Settings) -> None:
    """Refuse to start, with one line, when the address cannot be bound, before anything logs "startup".

    uvicorn would run the app's startup first and only then fail to bind, with a traceback-like error line.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET  # as uvicorn's Config.bind_socket
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            why = exc.strerror or str(exc)
            hint = (
                ": another process listens there; stop it, or pick another port with --port or DIARY_WS_PORT"
                if exc.errno == errno.EADDRINUSE
                else "; check --host / DIARY_WS_HOST"
            )
            raise CannotStart(f"cannot listen on {settings.host}:{settings.port}: {why.lower()}{hint}") from None


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: every socket is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        # Some containers refuse; the default MAX_CONNECTIONS then follows the soft limit.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def with_fd_budget(settings: Settings) -> Settings:
    """`settings` with MAX_HTTP_CONNECTIONS and MAX_CONNECTIONS decided for this process's open-file limit
    (SettingError, exit 2, when they add up past it)."""
    http, listeners = fd_budget(settings, open_file_limit())
    return dataclasses.replace(settings, max_http_connections=http, max_connections=listeners)


def warn_if_stock_protocols() -> None:
    """One line at start when the installed uvicorn or websockets is one the edge was not checked against."""
    import logging

    from diary_ws.edge.internals import STOCK_LOSES, unsupported

    problem = unsupported()
    if problem is not None:
        logging.getLogger("diary_ws.server").warning(
            "%s: running uvicorn's stock protocols, without the edge's %s", problem, STOCK_LOSES
        )


def serve(settings: Settings) -> int:
    """Run uvicorn with the diary-ws protocol hooks until SIGTERM or SIGINT; WORKERS processes share the port."""
    from diary_ws import logs

    raise_open_file_limit()
    settings = with_fd_budget(settings)
    logs.configure(settings.log_level, settings.log_format)
    check_port(settings)
    warn_if_stock_protocols()
    if settings.workers == 1:
        return 0 if run_worker(settings) else 1
    from diary_ws.app import create_app
    from diary_ws.edge import supervise

    create_app(settings)  # reads the secret files: a SettingError stops here, with exit 2, not in each worker
    # Bound once here and shared, so every worker accepts on the same port (settings forbid memory:// here).
    sock = uvicorn_config(settings, app=None).bind_socket()
    return supervise(settings.workers, sock, functools.partial(run_worker, settings))


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    """The uvicorn configuration for `settings`, with the diary-ws WebSocket protocol."""
    import uvicorn

    from diary_ws.edge.internals import unsupported
    from diary_ws.edge.limits import EdgeLimits, install
    from diary_ws.edge.serve import ACCEPT_BATCH

    http: Any = "httptools"
    ws: Any = "websockets-sansio"
    if unsupported() is None:
        from diary_ws.edge.http import DiaryHttpProtocol
        from diary_ws.edge.websocket import DiaryWebSocketProtocol, FramePolicy

        policy = FramePolicy(settings.max_incoming_rate, settings.ping_timeout, settings.send_queue_bytes)
        http, ws = DiaryHttpProtocol, DiaryWebSocketProtocol.with_policy(policy)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        root_path=settings.root_path,
        http=http,
        ws=ws,
        ws_max_size=settings.max_incoming_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        ws_per_message_deflate=settings.per_message_deflate,
        # X-Forwarded-For from TRUSTED_PROXIES only, through with_proxy_headers (which also records the
        # direct peer for USER_HEADER); uvicorn's own wrapping, which trusts 127.0.0.1 by default, stays off.
        proxy_headers=False,
        backlog=ACCEPT_BATCH,  # per turn of the loop; DiaryServer sets the kernel's listen queue to 2048 again
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        lifespan="on",
        loop=settings.loop,  # auto by default: uvloop when installed (docs/observability.md)
        log_config=None,
        log_level=settings.log_level,
        # uvicorn builds each access line's arguments before the logger drops it: off when it would be dropped.
        access_log=settings.log_level in ("info", "debug", "trace"),
    )
    install(
        config,
        EdgeLimits(
            max_http_connections=settings.max_http_connections or EdgeLimits.max_http_connections,
            header_timeout=settings.header_timeout,
            body_timeout=settings.body_timeout,
            max_header_bytes=settings.max_header_bytes,
        ),
    )
    return config


def run_worker(settings: Settings, sock: socket.socket | None = None) -> bool:
    """One serving process: the app, uvicorn and DiaryServer; `sock` is the supervisor's shared socket."""
    from diary_ws import logs
    from diary_ws.app import create_app
    from diary_ws.edge import DiaryServer, with_proxy_headers

    if sock is not None:  # a spawned worker starts with a bare interpreter
        raise_open_file_limit()
        logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)

    def begin_drain() -> None:
        app.state.hub.draining = True

    config = uvicorn_config(settings, with_proxy_headers(app, settings.trusted_proxies))
    server = DiaryServer(
        config, on_signal=begin_drain, drain_seconds=settings.drain_seconds, gc_freeze=settings.gc_freeze
    )
    server.run(sockets=None if sock is None else [sock])
    return server.started
