"""The client-side commands of `diary-ws`: listen, send, status, presence, disconnect and token.

They talk to a running server over the network like any other client: send, status, presence and disconnect
through `diary_ws.Sender` (idempotent retries included), listen through `diary_ws.client`. The server is
`--url`, else DIARY_WS_URL, else http://DIARY_WS_HOST:DIARY_WS_PORT. Exit codes, for scripts (docs/cli.md
has the table, and tests/test_cli.py runs each of its rows):

    0  success
    1  the server could not be reached, kept answering 409/429/503/504 until the deadline, or failed (5xx)
    2  bad arguments or local configuration (argparse's own code, a bad --data or --url, a URL that is not a
       diary-ws API: a wrong path prefix, an nginx error page)
    3  nobody is listening: the notification reached no one and was not stored (HTTP 404)
    4  the server refused the request (any other 4xx: bad input, wrong credentials)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from diary_ws.auth import check_hs256_secret
from diary_ws.client import Client, ClientError
from diary_ws.sender import DEFAULT_DEADLINE, NoListeners, Refused, Sender, SenderError, Sent, Unavailable
from diary_ws.settings import SettingError, TokenSettings, client_from_env, first_api_key, token_from_env
from diary_ws.settings import base_url as checked_url
from diary_ws.validation import USER_ID_RULE, is_user_id

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, EXIT_NOBODY, EXIT_REFUSED = 0, 1, 2, 3, 4
CLOSE_WAIT = 2.0  # seconds a stopping `listen` waits for its close handshake
STDIN_MAX = 4 * 1024 * 1024  # `send -` reads at most this much; the server's own limits are lower
URL_HELP = (
    "the server's base URL, path prefix included (default: DIARY_WS_URL, else http://DIARY_WS_HOST:DIARY_WS_PORT, "
)
URL_HELP += "that is http://127.0.0.1:8000 when neither is set)"


class CommandError(Exception):
    """Ends a command with `exit_code` and one line on stderr."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add listen, send, status, presence, disconnect and token to the `diary-ws` parser."""
    listen = commands.add_parser(
        "listen",
        help="print one JSON line per notification for a user",
        description="Listen as USER_ID and print one JSON line per notification; it reconnects by itself and "
        "resumes with since, so a server restart loses nothing.",
    )
    listen.add_argument("user_id", metavar="USER_ID")
    _add_url(listen)
    listen.add_argument("--token", help="a JWT for USER_ID (see `diary-ws token`; default: none)")
    listen.add_argument("--since", metavar="ID", help="start after this message id, replaying what came since "
                        "(default: only what comes from now on)")  # fmt: skip

    send = commands.add_parser(
        "send", help="publish a notification", description="POST a notification, with an Idempotency-Key, and "
        "retry what is safe to retry (409, 429, 503, 504, no connection) until --timeout.",
    )  # fmt: skip
    send.add_argument("message", metavar="MESSAGE", help="the text; - reads it from stdin (one final newline dropped)")
    send.add_argument("--user", dest="user_ids", action="append", metavar="ID",
                      help="send to this user only; repeat for several (default: everyone)")  # fmt: skip
    send.add_argument("--type", help="the notification's type (default: notification)")
    send.add_argument("--data", metavar="JSON", help="a JSON object passed through, e.g. '{\"task\": 42}' "
                      "(default: none)")  # fmt: skip
    _add_client_options(send)

    status = commands.add_parser("status", help="show who is connected", description="GET the status.")
    status.add_argument("--limit", type=int, metavar="N", help="list at most N user ids (default: all)")
    _add_client_options(status)

    presence = commands.add_parser(
        "presence", help="is a user connected?", description="GET whether USER_ID is connected, and how many times."
    )
    presence.add_argument("user_id", metavar="USER_ID")
    _add_client_options(presence)

    disconnect = commands.add_parser(
        "disconnect", help="close every socket of a user (log-out, ban)",
        description="Close every socket and stream of USER_ID on every node with 4003 (disconnected by an "
        "operator). It does not stop the user from connecting again.",
    )  # fmt: skip
    disconnect.add_argument("user_id", metavar="USER_ID")
    _add_client_options(disconnect)

    token = commands.add_parser(
        "token",
        help="mint a listener JWT, for trying things out",
        description="Print an HS256 JWT for USER_ID, signed with DIARY_WS_JWT_SECRET or DIARY_WS_JWT_SECRET_FILE, "
        "with aud and iss from DIARY_WS_JWT_AUDIENCE and DIARY_WS_JWT_ISSUER when they are set.",
    )
    token.add_argument("user_id", metavar="USER_ID")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default: 3600)")


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=URL_HELP)


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    _add_url(parser)
    parser.add_argument("--api-key", help="sender API key (default: the first of DIARY_WS_API_KEY, or of the "
                        "file DIARY_WS_API_KEY_FILE); prefer the variable, a flag shows in ps")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=DEFAULT_DEADLINE, metavar="SECONDS",
                        help=f"give up after this long, retries included (default: {DEFAULT_DEADLINE:g})")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Run one client-side command; its exit code."""
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "listen": listen, "send": send, "status": status, "presence": presence, "disconnect": disconnect,
        "token": token,
    }  # fmt: skip
    try:
        return handlers[args.command](args)
    except CommandError as exc:
        print(f"diary-ws {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


def base_url(flag: str | None) -> str:
    """--url, else DIARY_WS_URL, else http://DIARY_WS_HOST:DIARY_WS_PORT; exit 2 for a bad one."""
    try:
        return checked_url(flag, "--url") if flag is not None else client_from_env(os.environ).url
    except SettingError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


# --- listen ------------------------------------------------------------------------------------------------


def listen(args: argparse.Namespace) -> int:
    """Print notifications as JSON lines until Ctrl-C or SIGTERM (exit 0) or a permanent refusal (exit 4)."""
    logging.basicConfig(level=logging.WARNING, format="diary-ws listen: %(message)s", stream=sys.stderr)
    try:
        client = Client(base_url(args.url), args.user_id, token=args.token, since=args.since)
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


# --- send, status, presence, disconnect: through diary_ws.Sender ------------------------------------------------


def send(args: argparse.Namespace) -> int:
    """POST one notification and print the server's JSON answer."""
    message = _stdin_message() if args.message == "-" else args.message
    data: dict[str, Any] | None = None
    if args.data is not None:
        try:
            data = orjson.loads(args.data)
        except orjson.JSONDecodeError as exc:
            raise CommandError(f"--data is not valid JSON: {exc}", EXIT_USAGE) from None
        if not isinstance(data, dict):
            raise CommandError("--data must be a JSON object such as '{\"task\": 42}'", EXIT_USAGE)
    for user_id in args.user_ids or ():
        _check_user_id(user_id, "--user")
    sent = _through_sender(args, lambda sender: sender.send(message, args.user_ids, args.type, data))
    _print_json(_answer_of(sent))
    return EXIT_OK


def status(args: argparse.Namespace) -> int:
    """GET the status and print it."""
    if args.limit is not None and args.limit < 0:
        raise CommandError(f"--limit must be at least 0 (got {args.limit})", EXIT_USAGE)
    _print_json(_through_sender(args, lambda sender: sender.status(args.limit)))
    return EXIT_OK


def presence(args: argparse.Namespace) -> int:
    """GET a user's presence and print it."""
    _check_user_id(args.user_id, "USER_ID")
    found = _through_sender(args, lambda sender: sender.presence(args.user_id))
    _print_json({"user_id": found.user_id, "connected": found.connected, "connections": found.connections})
    return EXIT_OK


def disconnect(args: argparse.Namespace) -> int:
    """Close every socket of a user, and print how many were closed."""
    _check_user_id(args.user_id, "USER_ID")
    closed = _through_sender(args, lambda sender: sender.disconnect(args.user_id))
    _print_json({"status": "success", "user_id": args.user_id, "closed": closed})
    return EXIT_OK


def _through_sender(args: argparse.Namespace, call: Callable[[Sender], Any]) -> Any:
    """Run one Sender call; its errors become the documented exit codes, each with one line."""
    if not args.timeout > 0:
        raise CommandError(f"--timeout must be a number of seconds above 0 (got {args.timeout:g})", EXIT_USAGE)
    url = base_url(args.url)
    try:
        # --api-key, or the first key of DIARY_WS_API_KEY (a comma or newline list, for rotation) or its *_FILE
        key = args.api_key or first_api_key(os.environ)
    except SettingError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    try:
        with Sender(url, key or "", deadline=args.timeout) as sender:
            return call(sender)
    except SenderError as exc:
        raise CommandError(str(exc), exit_code(exc)) from None


def exit_code(exc: SenderError) -> int:
    """The exit code for a Sender error (the table in docs/cli.md)."""
    if isinstance(exc, NoListeners):
        return EXIT_NOBODY
    if isinstance(exc, Unavailable):
        return EXIT_UNREACHABLE
    assert isinstance(exc, Refused)
    # No such route, or an answer that is not diary-ws's: the URL (or its prefix) is wrong, a local setting.
    if exc.status is None or exc.status < 400 or exc.status in (404, 405):
        return EXIT_USAGE
    return EXIT_REFUSED


def _answer_of(sent: Sent) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "status": "success", "message": sent.message, "sent_count": sent.sent_count,
        "total_connections": sent.total_connections, "disconnected_users": sent.disconnected_users, "id": sent.id,
    }  # fmt: skip
    if sent.nodes_missing:
        answer["nodes_missing"] = sent.nodes_missing
    return answer


def _print_json(doc: Any) -> None:
    print(orjson.dumps(doc).decode())


def _check_user_id(user_id: str, where: str) -> None:
    if not is_user_id(user_id):
        raise CommandError(f"{where}: user id {user_id!r} is not valid: it must be {USER_ID_RULE}", EXIT_USAGE)


def _stdin_message() -> str:
    """The message from stdin, as `-` means for curl, httpie and git; one final newline (from echo) dropped."""
    raw = sys.stdin.buffer.read(STDIN_MAX + 1)
    if len(raw) > STDIN_MAX:
        raise CommandError(f"the message on stdin is over {STDIN_MAX} bytes", EXIT_USAGE)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"the message on stdin is not UTF-8 (bad byte at position {exc.start})", EXIT_USAGE
        ) from None
    return text.removesuffix("\n").removesuffix("\r")


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
    signing = jwt_settings()
    if signing.audience:
        claims["aud"] = signing.audience
    if signing.issuer:
        claims["iss"] = signing.issuer
    print(jwt.encode(claims, signing.secret, algorithm="HS256"))
    return EXIT_OK


def jwt_settings() -> TokenSettings:
    """The signing settings (settings.token_from_env), checked by the server's own rule for HS256 secrets, so
    the command never mints a token the server would refuse to check."""
    try:
        signing = token_from_env(os.environ)
        check_hs256_secret(signing.secret, signing.source)
    except SettingError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    return signing
