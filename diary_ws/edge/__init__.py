"""What diary-ws adds to uvicorn: the edge. Transport hooks for the WebSocket and HTTP protocols, a draining
Server, and a supervisor for several workers that keeps both in each worker.

Like `cli`, the only other module that imports uvicorn, this package is loaded only when diary-ws runs its own
server; an app embedded elsewhere works without it and just lacks the hooks (see `protocols.SocketControl`).
It leans on uvicorn internals (`WebSocketsSansIOProtocol` attributes), so uvicorn is pinned to 0.54.x.

- `transport`: hard aborts and the stall timer both protocols share.
- `websocket`: the WebSocket protocol and the hooks its handler gets.
- `http`: the HTTP protocol, its stream hooks and one write per answer.
- `serve`: DiaryServer, the supervisor and the proxy-headers wrapping.
- `limits`: the HTTP caps and clocks a server applies; `internals`: every upstream internal the edge touches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the type checker: at run time each name is imported on first use (below)
    from diary_ws.edge.http import DiaryHttpProtocol, OneWrite, StreamHooks
    from diary_ws.edge.serve import DiaryServer, RecordPeer, supervise, with_proxy_headers
    from diary_ws.edge.transport import CLOSE_GRACE, StallWatch, hard_abort
    from diary_ws.edge.websocket import (
        DiaryWebSocketProtocol,
        FramePolicy,
        ReceiveQueue,
        SocketHooks,
        WritableGate,
    )

# Imported lazily, so that `edge.internals` can check the installed uvicorn before anything imports its
# internals (an unknown version may not even have them: the CLI then runs uvicorn's stock protocols).
_HOMES = {
    "DiaryHttpProtocol": "http", "OneWrite": "http", "StreamHooks": "http",
    "DiaryServer": "serve", "RecordPeer": "serve", "supervise": "serve", "with_proxy_headers": "serve",
    "CLOSE_GRACE": "transport", "StallWatch": "transport", "hard_abort": "transport",
    "DiaryWebSocketProtocol": "websocket", "ReceiveQueue": "websocket", "SocketHooks": "websocket",
    "WritableGate": "websocket", "FramePolicy": "websocket",
}  # fmt: skip

__all__ = [
    "CLOSE_GRACE", "DiaryHttpProtocol", "DiaryServer", "DiaryWebSocketProtocol", "FramePolicy", "OneWrite",
    "ReceiveQueue", "RecordPeer", "SocketHooks", "StallWatch", "StreamHooks", "WritableGate", "hard_abort",
    "supervise", "with_proxy_headers",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'diary_ws.edge' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diary_ws.edge.{home}"), name)
