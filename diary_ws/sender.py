"""Publish from Python over HTTP: `Sender` (blocking) and `AsyncSender` (asyncio), on httpx.

Every send carries an `Idempotency-Key` made here, and a failure that is safe to retry is retried with the
same key, after a jittered backoff, until a deadline: 429 (after its Retry-After), 409 (the first attempt is
still being published), 503 (the broker did not store it), 504 (it may or may not have been stored: the key
makes the retry safe either way) and connection errors. Anything else is raised at once, as one of a small
family of exceptions that carries the status and the server's message.

This module needs only httpx and the settings module: it is usable from any program, server stack or not.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
import orjson

from diary_ws.settings import base_url, client_from_env, first_api_key

API = "/api/v1/ws"
RETRY_STATUSES = frozenset({409, 429, 503, 504})
DEFAULT_DEADLINE = 10.0  # seconds for a whole call, retries and waits included
ATTEMPT_TIMEOUT = 5.0  # seconds for one attempt; the server answers within 3 s whatever its broker does
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0
BATCH_SIZE = 1000  # items per POST in send_many: the server's default MAX_BATCH


# --- errors ------------------------------------------------------------------------------------------------


class SenderError(Exception):
    """A call that did not succeed: `status` is the HTTP status (None: no answer), `message` the server's."""

    def __init__(self, message: str, status: int | None = None, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)
        self.message = message
        self.status = status
        self.body: Mapping[str, Any] = body or {}


class NoListeners(SenderError):
    """404 on a send: none of the targeted users is connected, so it was neither sent nor stored."""


class Refused(SenderError):
    """The server refused the request and a retry would not help (400, 401, 404 no such route, 413, 422...)."""


class Unavailable(SenderError):
    """The server could not be reached, or kept answering 409/429/503/504, until the deadline; or a 5xx."""


# --- results -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """A notification the server stored and handed out; all three counts are sockets."""

    id: str
    message: str
    sent_count: int
    total_connections: int
    disconnected_users: int
    nodes_missing: int = 0

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Sent:
        return cls(
            id=doc["id"],
            message=doc["message"],
            sent_count=doc["sent_count"],
            total_connections=doc["total_connections"],
            disconnected_users=doc["disconnected_users"],
            nodes_missing=doc.get("nodes_missing", 0),
        )


@dataclass(frozen=True, slots=True)
class Failed:
    """One item of a batch that was not sent: `code` 404 (nobody listening) or 422 (not valid)."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Presence:
    """Whether a user is connected, on any node, and with how many sockets and streams."""

    user_id: str
    connected: bool
    connections: int


# --- requests and answers, the same for both senders --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Call:
    method: str
    path: str
    body: bytes | None = None
    key: str | None = None  # the Idempotency-Key, the same on every attempt
    is_send: bool = False  # a 404 is NoListeners, not a wrong URL


def _notification(
    message: str, user_ids: Iterable[str] | None, type: str | None, data: Mapping[str, Any] | None
) -> dict[str, Any]:
    if isinstance(user_ids, (str, bytes)):  # a lone id would be taken letter by letter
        raise TypeError("user_ids must be a list of user ids, not a single string")
    body: dict[str, Any] = {"message": message}
    if user_ids is not None:
        body["user_ids"] = list(user_ids)
    if type is not None:
        body["type"] = type
    if data is not None:
        body["data"] = dict(data)
    return body


def _item(item: str | Mapping[str, Any]) -> dict[str, Any]:
    return {"message": item} if isinstance(item, str) else dict(item)


def _send_call(body: dict[str, Any]) -> _Call:
    return _Call("POST", f"{API}/notification", orjson.dumps(body), str(uuid.uuid4()), is_send=True)


def _batch_calls(items: Sequence[dict[str, Any]], size: int) -> Iterator[_Call]:
    if size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {size})")
    for start in range(0, len(items), size):
        body = orjson.dumps({"notifications": items[start : start + size]})
        yield _Call("POST", f"{API}/notifications", body, str(uuid.uuid4()), is_send=True)


def _batch_results(doc: Mapping[str, Any]) -> list[Sent | Failed]:
    return [Sent.of(r) if r["status"] == "success" else Failed(r["code"], r["message"]) for r in doc["results"]]


def _error_of(status: int, response: httpx.Response, call: _Call) -> SenderError:
    """The exception for a non-2xx answer, with the server's message on one line."""
    doc = _json_object(response)
    message = str(doc["message"]) if "message" in doc else summarise(response)
    if status == 404 and call.is_send and "sent_count" in doc:
        return NoListeners(message, status, doc)
    if status == 404:
        message += " (is the base URL right? It includes the path prefix a proxy adds, if any)"
    return (Unavailable if status >= 500 or status in RETRY_STATUSES else Refused)(message, status, doc)


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        doc = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


_TITLE = re.compile(rb"<title>\s*(.*?)\s*</title>", re.IGNORECASE | re.DOTALL)


def summarise(response: httpx.Response) -> str:
    """One line for an answer that is not diary-ws's JSON (an nginx error page, say): never the whole page."""
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    title = _TITLE.search(response.content[:4096])
    if title is not None:
        text = title.group(1).decode("utf-8", "replace")
    else:
        text = response.content[:200].decode("utf-8", "replace")
    text = " ".join(text.split())[:100] or "an empty body"
    return f"not a diary-ws answer ({kind}): {text}"


def _retry_after(response: httpx.Response | None) -> float:
    raw = response.headers.get("retry-after", "") if response is not None else ""
    return float(raw) if raw.isascii() and raw.isdigit() else 0.0  # an HTTP date is ignored: backoff instead


def _delay(attempt: int, response: httpx.Response | None) -> float:
    """Full jitter (each retry waits a random time up to an exponential cap), never less than Retry-After."""
    wait = random.uniform(0, min(BACKOFF_MAX, BACKOFF_FIRST * 2**attempt))
    hinted = _retry_after(response)
    return hinted + wait / 4 if hinted else wait  # after a Retry-After, a little jitter so senders spread out


class _Base:
    """What both senders share: where the server is, the key, the deadline."""

    def __init__(self, url: str | None, api_key: str | None, deadline: float) -> None:
        # The environment only for what the arguments leave out: a bad DIARY_WS_* value must not fail them.
        url = client_from_env(os.environ).url if url is None else url
        api_key = first_api_key(os.environ) if api_key is None else api_key
        self.url = base_url(url, "url")
        self.api_key = api_key
        self.deadline = deadline
        self.headers = {"Accept": "application/json", "User-Agent": "diary-ws-sender"}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def _request(self, call: _Call, timeout: float) -> dict[str, Any]:
        headers = dict(self.headers)
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        if call.key is not None:
            headers["Idempotency-Key"] = call.key
        return {"method": call.method, "url": self.url + call.path, "content": call.body, "headers": headers,
                "timeout": timeout}  # fmt: skip

    def _outcome(self, call: _Call, response: httpx.Response) -> dict[str, Any] | SenderError:
        if 200 <= response.status_code < 300:
            doc = _json_object(response)
            if doc:
                return doc
            return Refused(summarise(response), response.status_code)  # a 200 from something else: wrong URL
        return _error_of(response.status_code, response, call)


def _unreachable(url: str, exc: httpx.TransportError) -> Unavailable:
    why = str(exc) or type(exc).__name__
    return Unavailable(f"cannot reach {url}: {why}")


class Sender(_Base):
    """A blocking client for a diary-ws server: `send`, `send_many`, `status`, `presence`, `disconnect`.

    `url` and `api_key` default to DIARY_WS_URL (else http:// + DIARY_WS_HOST:DIARY_WS_PORT) and the first key
    of DIARY_WS_API_KEY (or its file). `deadline` bounds each call, retries included.
    """

    def __init__(self, url: str | None = None, api_key: str | None = None, *, deadline: float = DEFAULT_DEADLINE):
        super().__init__(url, api_key, deadline)
        self._client = httpx.Client()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def send(
        self,
        message: str,
        user_ids: Iterable[str] | None = None,
        type: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Sent:
        """Publish one notification (to everyone without `user_ids`); NoListeners if nobody got it."""
        return Sent.of(self._call(_send_call(_notification(message, user_ids, type, data))))

    def send_many(
        self, notifications: Iterable[str | Mapping[str, Any]], *, batch_size: int = BATCH_SIZE
    ) -> list[Sent | Failed]:
        """Publish many, `batch_size` to a POST: one result per item, in order (a str is a broadcast message)."""
        items = [_item(n) for n in notifications]
        results: list[Sent | Failed] = []
        for call in _batch_calls(items, batch_size):
            results += _batch_results(self._call(call))
        return results

    def status(self, limit: int | None = None) -> dict[str, Any]:
        """Who is connected: the guide's fields plus `total_connections`."""
        return self._call(_Call("GET", f"{API}/status" + ("" if limit is None else f"?limit={int(limit)}")))

    def presence(self, user_id: str) -> Presence:
        """Whether `user_id` is connected anywhere, and with how many sockets and streams."""
        doc = self._call(_Call("GET", f"{API}/users/{_quoted(user_id)}"))
        return Presence(doc["user_id"], doc["connected"], doc["connections"])

    def disconnect(self, user_id: str) -> int:
        """Close every socket of `user_id` with 4003 (log-out, ban); how many were closed."""
        closed: int = self._call(_Call("DELETE", f"{API}/users/{_quoted(user_id)}/connections"))["closed"]
        return closed

    def _call(self, call: _Call) -> dict[str, Any]:
        end = time.monotonic() + self.deadline
        attempt = 0
        while True:
            left = end - time.monotonic()
            response: httpx.Response | None = None
            try:
                response = self._client.request(**self._request(call, min(ATTEMPT_TIMEOUT, max(left, 0.1))))
                outcome = self._outcome(call, response)
            except httpx.TransportError as exc:
                outcome = _unreachable(self.url, exc)
            if not isinstance(outcome, SenderError):
                return outcome
            wait = _delay(attempt, response)
            if not _retryable(outcome) or time.monotonic() + wait >= end:
                raise outcome
            time.sleep(wait)
            attempt += 1


class AsyncSender(_Base):
    """`Sender` for asyncio: the same methods, awaited."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, deadline: float = DEFAULT_DEADLINE):
        super().__init__(url, api_key, deadline)
        self._client = httpx.AsyncClient()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def send(
        self,
        message: str,
        user_ids: Iterable[str] | None = None,
        type: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Sent:
        """Publish one notification (to everyone without `user_ids`); NoListeners if nobody got it."""
        return Sent.of(await self._call(_send_call(_notification(message, user_ids, type, data))))

    async def send_many(
        self, notifications: Iterable[str | Mapping[str, Any]], *, batch_size: int = BATCH_SIZE
    ) -> list[Sent | Failed]:
        """Publish many, `batch_size` to a POST: one result per item, in order (a str is a broadcast message)."""
        items = [_item(n) for n in notifications]
        results: list[Sent | Failed] = []
        for call in _batch_calls(items, batch_size):
            results += _batch_results(await self._call(call))
        return results

    async def status(self, limit: int | None = None) -> dict[str, Any]:
        """Who is connected: the guide's fields plus `total_connections`."""
        return await self._call(_Call("GET", f"{API}/status" + ("" if limit is None else f"?limit={int(limit)}")))

    async def presence(self, user_id: str) -> Presence:
        """Whether `user_id` is connected anywhere, and with how many sockets and streams."""
        doc = await self._call(_Call("GET", f"{API}/users/{_quoted(user_id)}"))
        return Presence(doc["user_id"], doc["connected"], doc["connections"])

    async def disconnect(self, user_id: str) -> int:
        """Close every socket of `user_id` with 4003 (log-out, ban); how many were closed."""
        closed: int = (await self._call(_Call("DELETE", f"{API}/users/{_quoted(user_id)}/connections")))["closed"]
        return closed

    async def _call(self, call: _Call) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.deadline
        attempt = 0
        while True:
            left = end - loop.time()
            response: httpx.Response | None = None
            try:
                response = await self._client.request(**self._request(call, min(ATTEMPT_TIMEOUT, max(left, 0.1))))
                outcome = self._outcome(call, response)
            except httpx.TransportError as exc:
                outcome = _unreachable(self.url, exc)
            if not isinstance(outcome, SenderError):
                return outcome
            wait = _delay(attempt, response)
            if not _retryable(outcome) or loop.time() + wait >= end:
                raise outcome
            await asyncio.sleep(wait)
            attempt += 1


def _retryable(error: SenderError) -> bool:
    return isinstance(error, Unavailable) and (error.status is None or error.status in RETRY_STATUSES)


def _quoted(user_id: str) -> str:
    return quote(user_id, safe="")  # a bad id reaches the server whole, and gets its 400
