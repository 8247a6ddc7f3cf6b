"""The naive baseline: the FastAPI-tutorial ConnectionManager pattern on plain Starlette.

A list of sockets and a sequential `await send_text` per socket; one stalled client freezes every
broadcast. Measured beside diary-ws in the same run, never used for anything else.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


class ConnectionManager:
    def __init__(self) -> None:
        self.active: list[WebSocket] = []

    async def broadcast(self, text: str) -> int:
        for ws in self.active:
            await ws.send_text(text)
        return len(self.active)


manager = ConnectionManager()


async def listen(websocket: WebSocket) -> None:
    await websocket.accept()
    manager.active.append(websocket)
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        manager.active.remove(websocket)


async def notify(request: Request) -> JSONResponse:
    body = await request.json()
    import json

    sent = await manager.broadcast(json.dumps({"type": "notification", "message": body["message"]}))
    return JSONResponse({"status": "success", "sent_count": sent})


app = Starlette(
    routes=[Route("/api/v1/ws/notification", notify, methods=["POST"]), WebSocketRoute("/api/v1/ws/{user_id}", listen)]
)
