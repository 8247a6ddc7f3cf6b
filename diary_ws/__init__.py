"""diary-ws: push real-time notifications to receive-only WebSocket clients."""

from __future__ import annotations

__version__ = "0.1.0"

from diary_ws.app import create_app, lifespan
from diary_ws.broadcaster import Hub
from diary_ws.errors import DiaryWSError, NobodyListening, NotStarted, SharedInMemory, ValidationError
from diary_ws.protocols import PublishResult
from diary_ws.sender import AsyncSender, Failed, NoListeners, Presence, Refused, Sender, SenderError, Sent, Unavailable
from diary_ws.settings import Settings
from diary_ws.validation import Notification

__all__ = [
    "AsyncSender", "DiaryWSError", "Failed", "Hub", "NoListeners", "NobodyListening", "NotStarted", "Notification",
    "Presence", "PublishResult", "Refused", "Sender", "SenderError", "Sent", "Settings", "SharedInMemory",
    "Unavailable", "ValidationError", "__version__", "create_app", "lifespan",
]  # fmt: skip
