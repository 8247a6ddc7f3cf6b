"""GET /api/v1/ws/client.js: the browser client (static/diary-ws.js), importable from any allowed origin.

A module script is fetched in CORS mode, so a page on another origin can `import` it only when the answer
carries `Access-Control-Allow-Origin`: `*` under the default ALLOWED_ORIGINS, the page's own origin when
it is in the list. The SSE stream answers the same way (`cors_send`), so that the client's EventSource
fallback works from another origin too. The file is small and changes only with the server, so browsers
keep it a few minutes and then revalidate it with its ETag (a 304 without the body).
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Scope, Send

from diary_ws.auth import Security, normalise_origin

MEDIA_TYPE = "text/javascript; charset=utf-8"
CACHE_CONTROL = "public, max-age=600"


@cache
def script() -> tuple[bytes, str]:
    """The module's bytes and their ETag, read once per process (the package does not change under it)."""
    body = files("diary_ws").joinpath("static", "diary-ws.js").read_bytes()
    return body, f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def cors_headers(security: Security, origin: str | None) -> dict[str, str]:
    """The CORS answer for a page at `origin`: none when ALLOWED_ORIGINS leaves it out (the browser blocks it)."""
    if security.origins is None:
        return {"Access-Control-Allow-Origin": "*"}
    headers = {"Vary": "Origin"}  # the answer depends on who asks: a shared cache must keep them apart
    if origin is not None and normalise_origin(origin) in security.origins:
        headers["Access-Control-Allow-Origin"] = origin
    return headers


async def client_script(request: Request) -> Response:
    """GET (and HEAD) /api/v1/ws/client.js."""
    body, etag = script()
    headers = {
        "ETag": etag,
        "Cache-Control": CACHE_CONTROL,
        "X-Content-Type-Options": "nosniff",
        **cors_headers(request.app.state.security, request.headers.get("origin")),
    }
    if etag in request.headers.get("if-none-match", "").replace("W/", "").split(", "):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=MEDIA_TYPE, headers=headers)


def cors_send(scope: Scope, send: Send) -> Send:
    """`send`, with the CORS header added to the response head when a page on another origin asks.

    For the SSE stream: an EventSource on another origin is refused by its own browser without it. The
    handshake has already checked the origin against ALLOWED_ORIGINS (403 otherwise), so an answer that
    starts streaming is one for an allowed origin.
    """
    origin = Headers(scope=scope).get("origin")
    if origin is None:
        return send  # same-origin, or not a browser: nothing to add, and no wrapper on the stream's path
    extra = [
        (k.lower().encode("latin-1"), v.encode("latin-1"))
        for k, v in cors_headers(scope["app"].state.security, origin).items()
    ]

    async def with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return with_cors
