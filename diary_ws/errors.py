"""The one family of errors the service answers with, and `error_answer`, the one function that turns any
error into its JSON answer (every endpoint and the app's error layer call it).

No Starlette here: the broadcaster and the validation helper raise these too.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class Answer(NamedTuple):
    """An HTTP answer before it is sent: status, JSON body, extra headers."""

    status: int
    body: bytes
    headers: Mapping[str, str] = NO_HEADERS


class DiaryWSError(Exception):
    """An error a client should see: `message` says what is wrong and how to fix it."""

    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}  # more keys for the JSON body, such as the zero counters of a 404

    @classmethod
    def of_status(cls, status: int, message: str, headers: dict[str, str] | None = None) -> DiaryWSError:
        """An error with a status no subclass names: the server's own 400, 414 or 431, Starlette's others."""
        error = cls(message, headers=headers)
        error.status_code = status
        return error

    def body(self) -> dict[str, Any]:
        """The JSON error body every error answer has (docs/api.md)."""
        return {"status": "error", "message": self.message, **self.extra}


class BadRequest(DiaryWSError):
    """Unparsable JSON, bad UTF-8, a bad user id or a bad query."""

    status_code = 400


class ClientGone(BadRequest):
    """The sender hung up before its body was complete. Nobody reads this answer (the server drops it); it is
    sent so that the request counts as a 400, not a 500."""

    def __init__(self) -> None:
        super().__init__("client disconnected")


class InternalError(DiaryWSError):
    """A bug of ours: the server log has the traceback; the client still gets the JSON error shape."""

    def __init__(self) -> None:
        super().__init__("internal server error; the server log has the details")


class ValidationError(DiaryWSError):
    """Well-formed but invalid: names the field and the rule it breaks."""

    status_code = 422

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class NotFound(DiaryWSError):
    status_code = 404


class MethodNotAllowed(DiaryWSError):
    status_code = 405


class PayloadTooLarge(DiaryWSError):
    status_code = 413


class UnsupportedMediaType(DiaryWSError):
    status_code = 415


class TooManyConnections(DiaryWSError):
    """The user already holds MAX_CONNECTIONS_PER_USER sockets."""

    status_code = 429


class ServerFull(DiaryWSError):
    """MAX_CONNECTIONS sockets are open, or the server is shutting down."""

    status_code = 503


class BrokerUnavailable(DiaryWSError):
    """The broker could not be reached: nothing was stored, so nothing will be delivered (503)."""

    status_code = 503


class OutcomeUnknown(DiaryWSError):
    """The broker was asked and did not answer in time: the change may or may not have been made (504)."""

    status_code = 504


class NobodyListening(NotFound):
    """None of the targeted users is connected: the message was not stored."""

    def __init__(self, targeted: bool) -> None:
        who = "none of the given user_ids is" if targeted else "no user is"
        super().__init__(
            f"No active connections: {who} connected, so the notification was not sent or stored; retry later",
            extra={"sent_count": 0, "total_connections": 0, "disconnected_users": 0},
        )


class Unauthorized(DiaryWSError):
    """No valid API key or token; `WWW-Authenticate` tells the client which scheme to use (RFC 6750)."""

    status_code = 401

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        challenge = 'Bearer realm="diary-ws"' + (', error="invalid_token"' if invalid else "")
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Forbidden(DiaryWSError):
    """Authenticated, but not for this: another user's token, or an Origin not allowed."""

    status_code = 403


class Conflict(DiaryWSError):
    """A request with the same Idempotency-Key is still being processed."""

    status_code = 409


class RateLimited(DiaryWSError):
    """Over RATE_LIMIT or CONNECT_RATE_LIMIT; carries `Retry-After` and the `RateLimit-*` headers."""

    status_code = 429


class NotStarted(DiaryWSError):
    """The hub has not been started: a host app mounted diary-ws without running its lifespan."""

    status_code = 503

    def __init__(self) -> None:
        super().__init__(
            "diary-ws is not started: its lifespan has not run, so nobody can listen and nothing can be sent. "
            'A host app that mounts it must run "async with diary_ws.lifespan(app): yield" in its own lifespan '
            "(Starlette does not run a mounted app's lifespan)"
        )


class SharedInMemory(DiaryWSError):
    """A second process serves the same listening socket as an in-memory app: each would hold part of the users."""

    def __init__(self, address: str) -> None:
        super().__init__(
            f"memory:// cannot be shared by several processes: another process already serves {address} with an "
            "in-memory diary-ws, so each would hold only its own listeners and a send would reach some of them. "
            "Run one worker, or set BROKER_URL (DIARY_WS_BROKER_URL) to redis://... for several"
        )


SERVER_ERROR = Answer(500, orjson.dumps(InternalError().body()))


def error_answer(exc: BaseException) -> Answer:
    """The JSON answer to `exc`: its own status, body and headers for one of ours, the 500 for anything else."""
    if isinstance(exc, DiaryWSError):
        return Answer(exc.status_code, orjson.dumps(exc.body()), exc.headers)
    return SERVER_ERROR
