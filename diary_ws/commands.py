"""The client-side commands of `diary-ws`: listen, send, status and token.

They talk to a running server over the network like any other client (send and status through the stdlib's
urllib, so no HTTP library is needed; listen through `diary_ws.client`). Exit codes, for scripts:

    0  success
    1  the server could not be reached, or failed (5xx): retrying later may help
    2  bad arguments or local configuration (argparse's own code, a bad --data, no JWT secret)
    3  nobody is listening: the notification reached no one and was not stored (HTTP 404)
    4  the server refused the request (any other 4xx: bad input, wrong credentials, rate limit)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import orjson

from diary_ws.auth import check_hs256_secret
from diary_ws.client import Client, ClientError
from diary_ws.settings import SettingError
from diary_ws.validation import USER_ID_RULE, is_user_id

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_NOBODY, EXIT_REFUSED = 0, 1, 2, 3, 4
DEFAULT_URL = "http://127.0.0.1:8000"
HTTP_TIMEOUT = 10.0
CLOSE_WAIT = 2.0  # seconds a stopping `listen` waits for its close handshake


class CommandError(Exception):
    """Ends a command with `exit_code` and one line on stderr."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add listen, send, status and token to the `diary-ws` parser."""
    listen = commands.add_parser(
        "listen",
        help="print one JSON line per notification for a user",
        description="Listen as USER_ID and print one JSON line per notification; it reconnects by itself and "
        "resumes with since, so a server restart loses nothing.",
    )
    listen.add_argument("user_id", metavar="USER_ID")
    _add_url(listen)
    listen.add_argument("--token", help="a JWT for USER_ID (see `diary-ws token`)")
    listen.add_argument("--since", metavar="ID", help="start after this message id, replaying what came since")

    send = commands.add_parser("send", help="publish a notification", description="POST a notification.")
    send.add_argument("message", metavar="MESSAGE")
    send.add_argument("--user", dest="user_ids", action="append", metavar="ID",
                      help="send to this user only; repeat for several (default: everyone)")  # fmt: skip
    send.add_argument("--type", help="the notification's type (default: notification)")
    send.add_argument("--data", metavar="JSON", help="a JSON object passed through, e.g. '{\"task\": 42}'")
    _add_url(send)
    _add_api_key(send)

    status = commands.add_parser("status", help="show who is connected", description="GET the status.")
    status.add_argument("--limit", type=int, metavar="N", help="list at most N user ids")
    _add_url(status)
    _add_api_key(status)

    token = commands.add_parser(
        "token",
        help="mint a listener JWT, for trying things out",
        description="Print an HS256 JWT for USER_ID, signed with DIARY_WS_JWT_SECRET or DIARY_WS_JWT_SECRET_FILE, "
        "with aud and iss from DIARY_WS_JWT_AUDIENCE and DIARY_WS_JWT_ISSUER when they are set.",
    )
    token.add_argument("user_id", metavar="USER_ID")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default: 3600)")


def _add_url(parser: argparse.ArgumentParser) -> None:
    where = f"the server's base URL, path prefix included (default: {DEFAULT_URL})"
    parser.add_argument("--url", default=DEFAULT_URL, help=where)


def _add_api_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", help="sender API key (default: the first of DIARY_WS_API_KEY, or of the "
                        "file DIARY_WS_API_KEY_FILE); prefer the variable, a flag shows in ps")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run one client-side command; its exit code."""
    handlers = {"listen": listen, "send": send, "status": status, "token": token}
    try:
        return handlers[args.command](args)
    except CommandError as exc:
        print(f"diary-ws {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


# --- listen ------------------------------------------------------------------------------------------------


def listen(args: argparse.Namespace) -> int:
    """Print notifications as JSON lines until Ctrl-C or SIGTERM (exit 0) or a permanent refusal (exit 4)."""
    logging.basicConfig(level=logging.WARNING, format="diary-ws listen: %(message)s", stream=sys.stderr)
    try:
        client = Client(args.url, args.user_id, token=args.token, since=args.since)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        return asyncio.run(_listen(client))
    except BrokenPipeError:  # `diary-ws listen u | head -1`: the reader left, which is no error of ours
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


async def _listen(client: Client) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None  # asyncio.run always runs us in a task
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        async for note in client:
            sys.stdout.write(orjson.dumps(note).decode() + "\n")
            sys.stdout.flush()  # one line as soon as it arrives, even into a pipe
        return EXIT_OK
    except asyncio.CancelledError:
        task.uncancel()  # our own signal handler asked for this: a normal stop
        return EXIT_OK
    except ClientError as exc:  # Refused at the handshake, or Ended by a close the client must not undo
        raise CommandError(exc.message, EXIT_REFUSED) from None
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.aclose(), CLOSE_WAIT)


# --- send and status ---------------------------------------------------------------------------------------


def send(args: argparse.Namespace) -> int:
    """POST one notification and print the server's JSON answer."""
    body: dict[str, Any] = {"message": args.message}
    if args.user_ids:
        body["user_ids"] = args.user_ids
    if args.type is not None:
        body["type"] = args.type
    if args.data is not None:
        try:
            body["data"] = orjson.loads(args.data)
        except orjson.JSONDecodeError as exc:
            raise CommandError(f"--data is not valid JSON: {exc}", EXIT_USAGE) from None
    answer = _request("POST", _endpoint(args.url, "/api/v1/ws/notification"), args.api_key, orjson.dumps(body))
    print(answer)
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    """GET the status and print it."""
    query = f"?limit={args.limit}" if args.limit is not None else ""
    print(_request("GET", _endpoint(args.url, "/api/v1/ws/status") + query, args.api_key))
    return EXIT_OK


def _endpoint(base_url: str, path: str) -> str:
    if not base_url.startswith(("http://", "https://")):
        raise CommandError(f"--url must start with http:// or https:// (got {base_url!r})", EXIT_USAGE)
    return base_url.rstrip("/") + path


def api_key(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """--api-key, or the first key of DIARY_WS_API_KEY (a comma or newline list, for rotation) or its *_FILE."""
    if flag:
        return flag
    keys = environ.get("DIARY_WS_API_KEY")
    path = environ.get("DIARY_WS_API_KEY_FILE")
    if not keys and path:
        keys = _read_secret_file(path, "DIARY_WS_API_KEY_FILE")
    listed = [key.strip() for key in re.split(r"[,\n]", keys or "") if key.strip()]  # as the server splits them
    return listed[0] if listed else None


def _request(method: str, url: str, key_flag: str | None, body: bytes | None = None) -> str:
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    key = api_key(key_flag, os.environ)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        with exc:
            raise CommandError(f"HTTP {exc.code}: {_message_of(exc.read())}", _exit_code(exc.code)) from None
    except (urllib.error.URLError, OSError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise CommandError(f"cannot reach {url}: {why}", EXIT_UNREACHABLE) from None


def _exit_code(status: int) -> int:
    if status == 404:
        return EXIT_NOBODY
    return EXIT_REFUSED if 400 <= status < 500 else EXIT_UNREACHABLE


def _message_of(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace").strip()[:300] or "no message"
    return str(doc.get("message", doc)) if isinstance(doc, dict) else str(doc)


# --- token -------------------------------------------------------------------------------------------------


def token(args: argparse.Namespace) -> int:
    """Print an HS256 JWT for a user: sub, iat, exp, and aud and iss when configured."""
    import jwt  # only this command needs PyJWT

    if not is_user_id(args.user_id):
        raise CommandError(f"user id {args.user_id!r} is not valid: it must be {USER_ID_RULE}", EXIT_USAGE)
    if args.ttl < 1:
        raise CommandError(f"--ttl must be at least 1 second (got {args.ttl})", EXIT_USAGE)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.user_id, "iat": now, "exp": now + args.ttl}
    for claim, name in (("aud", "DIARY_WS_JWT_AUDIENCE"), ("iss", "DIARY_WS_JWT_ISSUER")):
        if os.environ.get(name):
            claims[claim] = os.environ[name]
    print(jwt.encode(claims, jwt_secret(os.environ), algorithm="HS256"))
    return EXIT_OK


def jwt_secret(environ: Mapping[str, str]) -> str:
    """The HS256 secret from DIARY_WS_JWT_SECRET or DIARY_WS_JWT_SECRET_FILE, read directly."""
    inline, path = (environ.get("DIARY_WS_JWT_SECRET") or "").strip(), environ.get("DIARY_WS_JWT_SECRET_FILE")
    if inline and path:
        raise CommandError("set DIARY_WS_JWT_SECRET or DIARY_WS_JWT_SECRET_FILE, not both", EXIT_USAGE)
    secret = inline or (_read_secret_file(path, "DIARY_WS_JWT_SECRET_FILE") if path else "")
    if not secret:
        raise CommandError(
            "no JWT secret configured: set DIARY_WS_JWT_SECRET or DIARY_WS_JWT_SECRET_FILE (the server's HS256 "
            "secret); tokens for RS256/ES256 come from whoever holds the private key",
            EXIT_USAGE,
        )
    try:  # the server's own rule, so the command never mints a token the server would refuse to check
        check_hs256_secret(secret, "DIARY_WS_JWT_SECRET_FILE" if path else "DIARY_WS_JWT_SECRET")
    except SettingError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    return secret


def _read_secret_file(path: str, name: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()  # a trailing newline from `echo secret > file` is not part of it
    except OSError as exc:
        raise CommandError(f"{name}: cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
