"""The console page (CONSOLE=1): static HTML, JS and CSS shipped in the package. No build step, no CDN.

The page only uses the public API (status, notification, the WebSocket), through URLs relative to its own,
so it works under any ROOT_PATH.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response

from diary_ws.errors import NotFound
from diary_ws.settings import Settings

# asset name in the URL -> (file in diary_ws/static, media type)
ASSETS = {
    "": ("console.html", "text/html; charset=utf-8"),
    "console.js": ("console.js", "text/javascript; charset=utf-8"),
    "console.css": ("console.css", "text/css; charset=utf-8"),
}
HEADERS = {
    # Everything the page loads or talks to is this origin; 'self' covers same-origin ws:// and wss:// too.
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def console(request: Request) -> Response:
    """GET /api/v1/ws/console and its two assets."""
    settings: Settings = request.app.state.settings
    if not settings.console:
        raise NotFound("the console is off: start the server with DIARY_WS_CONSOLE=1 (or --console 1)")
    asset = ASSETS.get(request.path_params.get("asset", ""))
    if asset is None:
        raise NotFound(f"no console file {request.url.path}")
    name, media_type = asset
    body = files("diary_ws").joinpath("static", name).read_bytes()
    return Response(body, media_type=media_type, headers=HEADERS)
