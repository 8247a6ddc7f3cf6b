"""The HTTP edge's bounds: what one server allows of connections that are not listeners, and its clocks.

`install(config, limits)` puts them on a uvicorn Config; each protocol finds them with `edge_of(config)`. A
Config nobody installed them on (an embedding host running `--http diary_ws.server:DiaryHttpProtocol`) gets the
defaults, so the protocol is never unbounded.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diary_ws.logs import warn_throttled

if TYPE_CHECKING:
    from diary_ws.edge.http import DiaryHttpProtocol

log = logging.getLogger("diary_ws.server")

_ATTRIBUTE = "_diary_edge"  # where the Edge lives on a uvicorn Config (listed in edge/internals.py)


@dataclass(frozen=True)
class EdgeLimits:
    """HTTP-side bounds; the defaults are the settings' defaults."""

    max_http_connections: int = 1000
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 16384


class Edge:
    """One server's HTTP connections that are not listeners, oldest-waiting first among those without a head.

    `waiting` holds the connections that have no complete request head (idle keep-alive ones included) in the
    order they started waiting, so the one to evict when the cap is full is the first, in O(1).
    """

    __slots__ = ("limits", "count", "waiting", "refused", "evicted")

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self.count = 0
        self.waiting: OrderedDict[DiaryHttpProtocol, None] = OrderedDict()
        self.refused = 0
        self.evicted = 0

    def admit(self, protocol: DiaryHttpProtocol) -> bool:
        """Count a new connection; over the cap, evict the longest-waiting one or say no (False)."""
        if self.count >= self.limits.max_http_connections:
            if not self.waiting:
                self.refused += 1
                warn_throttled(
                    log, "http-refused", "refused an HTTP connection with 503: %d are open, none waiting for a head "
                    "(MAX_HTTP_CONNECTIONS)", self.count,
                )  # fmt: skip
                return False
            victim, _ = self.waiting.popitem(last=False)
            self.evicted += 1
            warn_throttled(
                log, "http-evicted", "closed the HTTP connection that waited longest for a request head (%.0f s), "
                "to make room: %d are open (MAX_HTTP_CONNECTIONS)", victim.waited(), self.count,
            )  # fmt: skip
            victim.evict()
        self.count += 1
        return True


def install(config: Any, limits: EdgeLimits) -> None:
    """Give the uvicorn `config`'s HTTP protocol these limits."""
    setattr(config, _ATTRIBUTE, Edge(limits))


def edge_of(config: Any) -> Edge:
    """The Edge of this uvicorn config, made with the default limits if nobody installed one."""
    edge = getattr(config, _ATTRIBUTE, None)
    if not isinstance(edge, Edge):
        edge = Edge(EdgeLimits())
        setattr(config, _ATTRIBUTE, edge)
    return edge
