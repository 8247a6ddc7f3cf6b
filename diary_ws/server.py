"""The import path `uvicorn --ws diary_ws.server:DiaryWebSocketProtocol` of earlier releases; the edge now lives in
the `diary_ws.edge` package."""

from __future__ import annotations

from diary_ws.edge import DiaryHttpProtocol, DiaryWebSocketProtocol

__all__ = ["DiaryHttpProtocol", "DiaryWebSocketProtocol"]
