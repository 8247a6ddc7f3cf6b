"""Server-Sent Events: one streaming ASGI HTTP response adapted to the Hub's `Sink`.

Each message is one event, `id: <id>` and `data: <the WebSocket's JSON frame>`, with no `event:` line, so
`EventSource.onmessage` sees every frame and dispatches on its `type`. The `resume` control frame is an event
without an `id:` line, so it does not move the browser's Last-Event-ID. Heartbeats are comment lines.
"""

from __future__ import annotations

import asyncio
import random

from starlette.types import Receive, Send

from diary_ws.messages import Message, MessageId
from diary_ws.protocols import CloseCode, StreamControl, WriteResult

STREAM_EXTENSION = "diary_ws.stream"  # offered by diary_ws.server's uvicorn HTTP protocol
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx would otherwise buffer the stream and deliver it late, in lumps
]
PING = b": ping\n\n"


def event(text: str, msg_id: MessageId | None) -> bytes:
    """One SSE event. The JSON never holds a raw newline (orjson escapes them), so one `data:` line is enough."""
    data = b"data: " + text.encode() + b"\n\n"
    return data if msg_id is None else b"id: " + str(msg_id).encode() + b"\n" + data


def chunk_of(message: Message) -> bytes:
    """The message's event as one chunk of a chunked response, built once per message for every stream."""
    chunk = message.sse
    if chunk is None:
        data = event(message.text, message.id)
        chunk = b"%x\r\n%b\r\n" % (len(data), data)
        object.__setattr__(message, "sse", chunk)  # a cache on a frozen dataclass: it never changes what it means
    return chunk


def farewell(code: int, reason: str) -> bytes:
    """The last bytes of a stream the server ends: a comment that says why (SSE has no close codes).

    On a restart, `retry:` also sets the browser's reconnect delay, jittered as in the WebSocket's 1012
    reason, so that clients do not all come back at the same instant.
    """
    if code == CloseCode.SERVICE_RESTART:
        delay_ms = random.randint(500, 5000)
        return f"retry: {delay_ms}\n: closed ({code}): server restarting: reconnect after {delay_ms} ms\n\n".encode()
    return f": closed ({code}): {reason}\n\n".encode()


class SseSink:
    """Adapts one streaming HTTP response to the Hub's `Sink`. `ended` completes when the stream is over."""

    __slots__ = ("_send", "_control", "ended")

    def __init__(self, send: Send, control: StreamControl | None) -> None:
        self._send = send
        self._control = control
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def open(self) -> None:
        """Send the status line and headers: from here on, the client is listening."""
        await self._send({"type": "http.response.start", "status": 200, "headers": HEADERS})

    def try_write(self, message: Message) -> WriteResult:
        # As a WebSocket frame is: straight onto the transport when it takes bytes now. Without diary-ws's
        # own server there is no raw transport, and the Hub's writer task sends it through ASGI.
        control = self._control
        return WriteResult.LATER if control is None else control.try_write(chunk_of(message))

    async def send_text(self, text: str, msg_id: MessageId | None) -> None:
        await self._body(event(text, msg_id))

    async def send_heartbeat(self) -> None:
        await self._body(PING)

    async def close(self, code: int, reason: str) -> None:
        if self.ended.done():
            return  # closed once already (a slow consumer, then the shutdown): the response is complete
        try:
            await self._send({"type": "http.response.body", "body": farewell(code, reason), "more_body": False})
        finally:
            if not self.ended.done():
                self.ended.set_result(None)

    def stalled(self) -> bool:
        return self._control is not None and self._control.stalled()

    def abort(self) -> bool:
        if self._control is None:
            return False
        self._control.abort()
        return True

    async def _body(self, chunk: bytes) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})


async def until_ended(receive: Receive, sink: SseSink) -> None:
    """Wait until the client goes (`http.disconnect`) or the server ends the stream, whichever comes first."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # a request body nobody asked for: read and dropped

    reader = asyncio.get_running_loop().create_task(disconnected())
    try:
        await asyncio.wait((reader, sink.ended), return_when=asyncio.FIRST_COMPLETED)
    finally:
        reader.cancel()
