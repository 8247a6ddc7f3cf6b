"""Who may open a listener, decided before the upgrade; one function for the WebSocket and SSE handlers.

`admit_listener(scope)` runs every check a handshake must pass, in this order, and raises the
`DiaryWSError` the client gets as a denial response:

1. CONNECT_RATE_LIMIT per client address (429): first, so a flood of handshakes costs one dict look-up;
2. the user id (400) and the query (400);
3. the Origin (403);
4. the listener's credentials (401 missing or invalid, 403 another user's).

The per-user and server-wide connection limits (429, 503) come after, when the Hub attaches the socket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import Scope

from diary_ws.auth import Security, client_address, direct_peer, token_from
from diary_ws.errors import Unauthorized
from diary_ws.ratelimit import RateLimiter
from diary_ws.validation import ListenQuery, check_user_id, parse_listen_query


@dataclass(frozen=True, slots=True)
class Admission:
    """A handshake that passed: whose it is, its query, and when its token expires (None: no token)."""

    user_id: str
    query: ListenQuery
    expires_at: float | None = None


def websocket_query(scope: Scope) -> ListenQuery:
    """The WebSocket's query string."""
    return parse_listen_query(scope["query_string"])


async def admit_listener(scope: Scope, parse_query: Callable[[Scope], ListenQuery] = websocket_query) -> Admission:
    """Check a listener's handshake (WebSocket or SSE: any scope with a `user_id` path parameter).

    `parse_query` reads the listener's resume point and options: SSE also reads Last-Event-ID.
    """
    state = scope["app"].state
    security: Security = state.security
    limiter: RateLimiter | None = state.connect_limiter
    if limiter is not None:
        await limiter.acquire(client_address(scope), "connection attempts from this address")
    user_id = check_user_id(scope["path_params"]["user_id"])
    query = parse_query(scope)
    headers = Headers(scope=scope)
    security.check_origin(headers.get("origin"))
    token = token_from(scope["query_string"], headers.get("authorization")) if security.jwt is not None else None
    header = None
    if security.user_header is not None and security.proxies.trusts(direct_peer(scope)):
        found = headers.getlist(security.user_header)
        if len(found) > 1:  # a proxy that adds the header keeps the client's copy: no telling which is whose
            raise Unauthorized(
                f"the {security.user_header} header was sent more than once: the proxy must overwrite it, not add one",
                invalid=True,
            )
        header = found[0] if found else None
    return Admission(user_id, query, security.listener_auth(user_id, token, header))
