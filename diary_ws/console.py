"""The console page (CONSOLE=1): static HTML, JS and CSS shipped in the package. No build step, no CDN.

The page uses the public API (notification, the DELETE of a user's connections, the WebSocket) and one
read-only endpoint of its own, `console/overview`, all through URLs relative to its own, so it works under
any ROOT_PATH.
"""

from __future__ import annotations

import asyncio
import itertools
from importlib.resources import files
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from diary_ws import deadline
from diary_ws.auth import Security
from diary_ws.broadcaster import Hub
from diary_ws.errors import BadRequest, BrokerUnavailable, NotFound
from diary_ws.loopwatch import BUCKETS
from diary_ws.metrics import SAMPLE_PERIOD, Metrics, Sample, loop_name
from diary_ws.settings import Settings

USERS_SHOWN = 100  # users the overview lists by default (those with the most sockets first); ?limit= up to:
USERS_MAX = 1000
RECENT_STALL = 0.05  # seconds: the console counts stalls longer than this

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


def check_console_on(request: Request) -> None:
    """404 unless CONSOLE=1."""
    settings: Settings = request.app.state.settings
    if not settings.console:
        raise NotFound("the console is off: start the server with DIARY_WS_CONSOLE=1 (or --console 1)")


async def console(request: Request) -> Response:
    """GET /api/v1/ws/console and its two assets."""
    check_console_on(request)
    asset = ASSETS.get(request.path_params.get("asset", ""))
    if asset is None:
        raise NotFound(f"no console file {request.url.path}")
    name, media_type = asset
    body = files("diary_ws").joinpath("static", name).read_bytes()
    return Response(body, media_type=media_type, headers=HEADERS)


async def overview(request: Request) -> Response:
    """GET /api/v1/ws/console/overview: what the console shows, in one read (needs the API key, like status).

    Users with their socket counts over every live node, the nodes, the rates ring of this process and its
    event-loop stalls.
    """
    check_console_on(request)
    security: Security = request.app.state.security
    security.sender(request.headers.get("authorization"), request.headers.get("x-api-key"))
    limit = _limit(request.query_params.get("limit"))
    hub: Hub = request.app.state.hub
    metrics: Metrics = request.app.state.metrics
    with deadline.request():  # as for the status: a broker that does not answer in time is a 503 within 3 s
        try:
            async with asyncio.timeout(deadline.BACKSTOP_SECONDS):
                nodes = await hub.backend.nodes()
        except TimeoutError:
            raise BrokerUnavailable("broker unavailable: no answer in time; retry later") from None
    users: dict[str, int] = {}
    for node in nodes:
        for user_id, count in node.users.items():
            users[user_id] = users.get(user_id, 0) + count
    ranked = sorted(users.items(), key=lambda item: (-item[1], item[0]))[:limit]
    body: dict[str, Any] = {
        "connected_users": len(users),
        "total_connections": sum(users.values()),
        "users": [{"user_id": user_id, "connections": count} for user_id, count in ranked],
        "nodes": [
            {"node": n.node_id, "here": n.here, "users": len(n.users), "connections": sum(n.users.values()),
             "heartbeat": n.heartbeat}
            for n in nodes
        ],
        "rates": rates([*metrics.ring, metrics.sample(take=False)]),
        "stalls": stalls(metrics),
        "loop": loop_name(),
    }  # fmt: skip
    return Response(orjson.dumps(body), media_type="application/json", headers={"Cache-Control": "no-store"})


def _limit(raw: str | None) -> int:
    if raw is None:
        return USERS_SHOWN
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise BadRequest(f"query parameter limit must be a whole number from 0 to {USERS_MAX}")
    return min(int(raw), USERS_MAX)


def rates(samples: list[Sample], period: float = SAMPLE_PERIOD) -> list[dict[str, float]]:
    """Per-second rates between successive samples, with each interval's worst stall.

    The last sample is "now". The interval that ends now always spans at least one sampling period: when the
    newest ring sample is younger than that, it is folded into the interval before, so a burst stays on the
    headline figure for a whole period (5-10 s) instead of falling to zero a moment after a sample is taken,
    between two polls of the page.
    """
    if len(samples) >= 3 and samples[-1].at - samples[-2].at < period:
        folded, now = samples[-2], samples[-1]
        worst = max(folded.worst_stall, now.worst_stall)
        samples = [*samples[:-2], now._replace(worst_stall=worst)]
    found = []
    for before, after in itertools.pairwise(samples):
        seconds = after.at - before.at
        if seconds < 0.5:  # the ring was sampled a moment ago: the interval to now is too short to say much
            continue
        found.append({
            "at": round(after.at, 3),
            "seconds": round(seconds, 3),
            "publishes": round((after.published - before.published) / seconds, 3),
            "deliveries": round((after.delivered - before.delivered) / seconds, 3),
            "handshakes": round((after.handshakes - before.handshakes) / seconds, 3),
            "refusals": round((after.refused - before.refused) / seconds, 3),
            "worst_stall": round(after.worst_stall, 6),
        })  # fmt: skip
    return found


def stalls(metrics: Metrics) -> dict[str, Any]:
    """The stall histogram as counts per bucket, and the figures the console prints."""
    probe = metrics.stalls
    over = sum(count for bound, count in zip((*BUCKETS, float("inf")), probe.counts, strict=True)
               if bound > RECENT_STALL)  # fmt: skip
    return {
        "ticks": probe.observations,
        "over_50ms": over,
        "buckets": [[bound, count] for bound, count in zip([*BUCKETS, None], probe.counts, strict=True)],
        "lag": metrics.lag,
    }
