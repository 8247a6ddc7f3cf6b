"""An async listener that reconnects by itself and resumes with `since`, so a reconnect loses nothing.

    async with Client("http://127.0.0.1:8000", "123456789") as client:
        async for note in client:
            print(note["message"])

It stands alone: it speaks the wire contract of docs/api.md through the `websockets` library and imports
neither uvicorn nor starlette (tests/test_layers.py keeps it so).

Reconnecting: exponential backoff with full jitter (a random delay between 0 and `base * factor**attempt`,
capped), reset once a connection has stayed up `healthy_after` seconds; a 1012 close whose reason says
"reconnect ... after N ms" waits those N ms instead, because the server has already spread its clients out.
Resuming: every reconnect asks for `?since=<the last id seen>`; ids at or below it are dropped, so a replay
that overlaps what already arrived yields nothing twice. A handshake refused with a 4xx other than 429 is
permanent (bad user id, bad or expired token, another user's token): `Refused` is raised, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from diary_ws import __version__
from diary_ws.messages import MessageId, parse_id
from diary_ws.protocols import CloseCode
from diary_ws.validation import USER_ID_RULE, is_user_id

log = logging.getLogger("diary_ws.client")

LISTEN_PATH = "/api/v1/ws/"
_SCHEMES = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_HINT = re.compile(r"after (\d{1,7}) ?ms")  # the server's 1012 reason: "... reconnect with since after 1234 ms"
MAX_HINT = 60.0  # seconds: a 1012 hint is honoured even above the backoff's cap, but not without bound
# Closes the client does not undo: the token expired (4001; the same token would be refused, so it is final
# unless `token` is a callable that can fetch a fresh one) or an operator disconnected this user (4003; log-out
# or ban). Every other close is reconnected with `since`.
FINAL_CLOSE_CODES = frozenset({CloseCode.TOKEN_EXPIRED, CloseCode.DISCONNECTED})

# A token, or a function that returns a fresh one (sync or async), called before every handshake.
TokenSource = str | Callable[[], str | Awaitable[str]]


class ClientError(Exception):
    """The listener stopped for good; `message` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Refused(ClientError):
    """The server refused the handshake with a 4xx other than 429: retrying the same request cannot help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the server refused the connection (HTTP {status}): {message}")
        self.status = status
        self.reason = message


class Ended(ClientError):
    """The server closed the socket with a code the client must not undo (`FINAL_CLOSE_CODES`)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"the server ended the connection with {code}: {reason or 'no reason given'}")
        self.code = code
        self.reason = reason


@dataclass
class Backoff:
    """Exponential backoff with full jitter: a delay drawn uniformly from [0, min(cap, base * factor**n))."""

    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    random: Callable[[], float] = field(default=random.random, repr=False)  # injectable, for tests

    def ceiling(self, attempt: int) -> float:
        """The most the `attempt`-th retry (from 0) may wait."""
        return min(self.cap, self.base * self.factor ** min(attempt, 64))

    def delay(self, attempt: int) -> float:
        """A jittered delay for the `attempt`-th retry, so clients that lost the same server do not stampede."""
        return self.random() * self.ceiling(attempt)


def listen_url(base_url: str, user_id: str, query: Mapping[str, str] | None = None) -> str:
    """`http://host[/prefix]` (or ws, https, wss) and a user id -> the WebSocket URL to listen on."""
    parts = urlsplit(base_url)
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"url must look like http://host:port[/prefix] (or https, ws, wss), not {base_url!r}")
    path = parts.path.rstrip("/") + LISTEN_PATH + quote(user_id, safe="")
    return urlunsplit((scheme, parts.netloc, path, urlencode(query or {}), ""))


def reconnect_hint(code: int | None, reason: str) -> float | None:
    """The delay, in seconds, that a 1012 close reason asks for; None when it asks for none."""
    if code != CloseCode.SERVICE_RESTART:
        return None
    found = _HINT.search(reason)
    return int(found.group(1)) / 1000 if found else None


class Client:
    """Listens as one user and yields each notification (a dict) once, across any number of reconnects.

    `url` is the service's base URL (`http://127.0.0.1:8000`, `https://host/notify`); `token` (a string, or a
    function returning a fresh one before each handshake, which also makes a 4001 expiry reconnect) goes in an
    `Authorization: Bearer` header, or in `?token=` with `token_in="query"` (query strings end up in proxy
    logs, so the header is the default). `since` starts from a known id. `on_resume(recovered, replayed)` is
    called for each resume control frame; `recovered` holds the latest one's value (None before any).
    """

    def __init__(
        self,
        url: str,
        user_id: str,
        *,
        token: TokenSource | None = None,
        token_in: Literal["header", "query"] = "header",
        since: str | None = None,
        on_resume: Callable[[bool, int], object] | None = None,
        backoff: Backoff | None = None,
        healthy_after: float = 5.0,
        open_timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        max_size: int = 16 * 1024 * 1024,
    ) -> None:
        if not is_user_id(user_id):
            raise ValueError(f"user_id {user_id!r} is not valid: it must be {USER_ID_RULE}")
        self._last = _parse_since(since)
        self.url = listen_url(url, user_id)  # for display: never holds the token
        self._base = url
        self.user_id = user_id
        self._token = token
        self._token_in = token_in
        self._headers = dict(headers or {})
        self.on_resume = on_resume
        self.backoff = backoff or Backoff()
        self.healthy_after = healthy_after
        self.open_timeout = open_timeout
        self.max_size = max_size
        self.recovered: bool | None = None  # what the latest resume frame said
        self.connections = 0  # successful handshakes so far; more than 1 means it has reconnected
        self.duplicates = 0  # frames dropped because their id was at or below one already yielded
        self._origin: MessageId | None = None  # where to resume from before any id has been seen
        self._ws: ClientConnection | None = None
        self._opened = 0.0
        self._attempt = 0
        self._delay = 0.0
        self._closing = False
        self._stop = asyncio.Event()

    @property
    def last_id(self) -> str | None:
        """The id of the last notification yielded (or the `since` given): where a reconnect resumes."""
        return None if self._last is None else str(self._last)

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: close the socket (1000) and end the iteration; safe to call more than once, from any task."""
        self._closing = True
        self._stop.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    # --- iteration -----------------------------------------------------------------------------------------

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while not self._closing:
            ws = self._ws
            if ws is None:
                await self._pause()
                await self._open()
                continue
            try:
                raw = await ws.recv()
            except ConnectionClosed:
                self._lost(ws)
                continue
            note = self._accept(raw)
            if note is not None:
                return note
        raise StopAsyncIteration

    async def _pause(self) -> None:
        delay, self._delay = self._delay, 0.0
        if delay > 0:
            with contextlib.suppress(TimeoutError):  # woken early by aclose()
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _open(self) -> None:
        if self._closing:
            return
        since = self._last or self._origin
        started = MessageId(time.time_ns() // 1_000_000, 0)
        query = {"since": str(since)} if since is not None else {}
        headers = dict(self._headers)
        token = await self._fresh_token()
        if token is not None:
            if self._token_in == "query":
                query["token"] = token
            else:
                headers["Authorization"] = f"Bearer {token}"
        try:
            ws = await connect(
                listen_url(self._base, self.user_id, query),
                additional_headers=headers,
                user_agent_header=f"diary-ws-client/{__version__}",
                open_timeout=self.open_timeout,
                max_size=self.max_size,
                compression=None,  # notifications are small; the server leaves deflate off too
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if 400 <= status < 500 and status != 429:
                raise Refused(status, _error_message(exc.response.body)) from None
            self._retry(f"HTTP {status}: {_error_message(exc.response.body)}", _retry_after(exc.response.headers))
            return
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._retry(str(exc) or type(exc).__name__)
            return
        if self._closing:  # aclose() ran while the handshake was in flight
            await ws.close()
            return
        # Until a first id arrives, a reconnect resumes from when this connection was asked for: the
        # server's ids are wall-clock milliseconds, so only clock skew between the two hosts blurs it.
        self._origin = self._origin or started
        self._ws = ws
        self._opened = time.monotonic()
        self.connections += 1
        log.info("connected to %s%s", self.url, f" (resuming after {since})" if since else "")

    async def _fresh_token(self) -> str | None:
        if self._token is None or isinstance(self._token, str):
            return self._token
        token = self._token()
        return await token if inspect.isawaitable(token) else token

    def _retry(self, why: str, at_least: float = 0.0) -> None:
        self._delay = max(self.backoff.delay(self._attempt), at_least)
        self._attempt += 1
        log.warning("cannot connect to %s (%s); retrying in %.2f s", self.url, why, self._delay)

    def _lost(self, ws: ClientConnection) -> None:
        self._ws = None
        if self._closing:
            return
        code, reason = ws.close_code, ws.close_reason or ""
        if code in FINAL_CLOSE_CODES and not (code == CloseCode.TOKEN_EXPIRED and callable(self._token)):
            raise Ended(code, reason)
        if time.monotonic() - self._opened >= self.healthy_after:
            self._attempt = 0  # it was a good connection: start the backoff over
        hint = reconnect_hint(code, reason)
        if hint is not None:
            self._delay = min(hint, MAX_HINT)
        else:
            self._delay = self.backoff.delay(self._attempt)
            self._attempt += 1
        log.warning(
            "connection lost (%s%s); reconnecting in %.2f s with since=%s",
            code if code is not None else "no close frame", f": {reason}" if reason else "", self._delay,
            self._last or self._origin,
        )  # fmt: skip

    def _accept(self, raw: str | bytes) -> dict[str, Any] | None:
        """A frame -> the notification to yield, or None for control frames and ids already seen."""
        try:
            frame = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("ignored a frame that is not JSON: %r", raw[:80])
            return None
        if not isinstance(frame, dict):
            log.warning("ignored a frame that is not a JSON object: %r", raw[:80])
            return None
        kind = frame.get("type")
        if kind == "resume":
            replayed = frame.get("replayed")
            self._resumed(frame.get("recovered") is True, replayed if isinstance(replayed, int) else 0)
            return None
        if kind == "heartbeat":
            return None
        raw_id = frame.get("id")
        msg_id = parse_id(raw_id) if isinstance(raw_id, str) else None
        if msg_id is not None:
            if self._last is not None and msg_id <= self._last:
                self.duplicates += 1
                return None
            self._last = msg_id
        return frame

    def _resumed(self, recovered: bool, replayed: int) -> None:
        self.recovered = recovered
        if not recovered:
            log.warning(
                "resumed after %s, but the server no longer holds everything since then (restart or history "
                "limit): some notifications for %s may have been missed; %d replayed",
                self._last or self._origin, self.user_id, replayed,
            )  # fmt: skip
        if self.on_resume is not None:
            self.on_resume(recovered, replayed)


def _parse_since(since: str | None) -> MessageId | None:
    if since is None:
        return None
    parsed = parse_id(since)
    if parsed is None:
        raise ValueError(f"since {since!r} is not a message id such as 1700000000000-0")
    return parsed


def _error_message(body: bytes | bytearray | None) -> str:
    """The `message` of the server's JSON error body, or the start of whatever came instead."""
    try:
        doc = orjson.loads(body or b"")
    except orjson.JSONDecodeError:
        return (body or b"").decode(errors="replace")[:200] or "no message"
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return str(doc["message"])
    return str(doc)[:200]


def _retry_after(headers: Headers) -> float:
    value = headers.get("Retry-After", "")
    return float(value) if value.isdigit() else 0.0
