"""The baseline: the FastAPI tutorial's `ConnectionManager`, on real FastAPI, serving the guide's URLs.

The manager is the tutorial's (a list of sockets, a sequential `await send_text` per socket); only the
routes are the guide's, and a dict of user id -> sockets is added so that targeted sends can be measured.
It is measured beside diary-ws in the same `make bench` run and is used for nothing else. FastAPI is
installed into the bench's own virtual environment only (bench/requirements.txt).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect


class ConnectionManager:
    def __init__(self) -> None:
        self.active_connections: list[WebSocket] = []
        self.by_user: dict[str, list[WebSocket]] = {}

    async def connect(self, websocket: WebSocket, user_id: str) -> None:
        await websocket.accept()
        self.active_connections.append(websocket)
        self.by_user.setdefault(user_id, []).append(websocket)

    def disconnect(self, websocket: WebSocket, user_id: str) -> None:
        self.active_connections.remove(websocket)
        self.by_user[user_id].remove(websocket)
        if not self.by_user[user_id]:
            del self.by_user[user_id]

    async def send_personal_message(self, message: str, websocket: WebSocket) -> None:
        await websocket.send_text(message)

    async def broadcast(self, message: str) -> None:
        for connection in self.active_connections:
            await connection.send_text(message)


manager = ConnectionManager()
app = FastAPI()


@app.websocket("/api/v1/ws/{user_id}")
async def websocket_endpoint(websocket: WebSocket, user_id: str) -> None:
    await manager.connect(websocket, user_id)
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        manager.disconnect(websocket, user_id)


@app.post("/api/v1/ws/notification")
async def notify(body: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps({"type": "notification", "message": body["message"], "sent_at": time.time()})
    user_ids = body.get("user_ids")
    if user_ids is None:
        await manager.broadcast(text)
        sent = len(manager.active_connections)
    else:
        sent = 0
        for user_id in user_ids:
            for websocket in manager.by_user.get(user_id, []):
                await manager.send_personal_message(text, websocket)
                sent += 1
    return {"status": "success", "message": f"Notification sent to {sent} users", "sent_count": sent}


@app.get("/api/v1/ws/status")
async def status(limit: int | None = None) -> dict[str, Any]:
    ids = sorted(manager.by_user)
    return {"connected_users": len(ids), "status": "active", "active_user_ids": ids[:limit]}
