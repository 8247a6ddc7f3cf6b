"""What diary-ws adds to uvicorn: the edge. Transport hooks for the WebSocket and HTTP protocols, a draining
Server, and a supervisor for several workers that keeps both in each worker.

Like `cli`, the only other module that imports uvicorn, this package is loaded only when diary-ws runs its own
server; an app embedded elsewhere works without it and just lacks the hooks (see `routes.SocketControl`).
It leans on uvicorn internals (`WebSocketsSansIOProtocol` attributes), so uvicorn is pinned to 0.54.x.

- `transport`: hard aborts and the stall timer both protocols share.
- `websocket`: the WebSocket protocol and the hooks its handler gets.
- `http`: the HTTP protocol, its stream hooks and one write per answer.
- `serve`: DiaryServer, the supervisor and the proxy-headers wrapping.
"""

from __future__ import annotations

from diary_ws.edge.http import DiaryHttpProtocol, OneWrite, StreamControl
from diary_ws.edge.serve import DiaryServer, RecordPeer, supervise, with_proxy_headers
from diary_ws.edge.transport import CLOSE_GRACE, StallWatch, hard_abort
from diary_ws.edge.websocket import DiaryWebSocketProtocol, FramePolicy, ReceiveQueue, SocketControl, WritableGate

__all__ = [
    "CLOSE_GRACE", "DiaryHttpProtocol", "DiaryServer", "DiaryWebSocketProtocol", "FramePolicy", "OneWrite",
    "ReceiveQueue", "RecordPeer", "SocketControl", "StallWatch", "StreamControl", "WritableGate", "hard_abort",
    "supervise", "with_proxy_headers",
]  # fmt: skip
