"""Message ids and the one frame every listener gets.

Ids are `"<ms>-<seq>"` like Redis stream ids: compared as a pair of integers, never as strings, and always
increasing, across restarts too (the wall clock moves on), so a `since` from an old run is simply old.
"""

from __future__ import annotations

import functools
import re
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # ASCII digits only: \d would take "١٢-0" too
_MAX_PART = 2**64 - 1  # what a Redis stream id allows for each half


class MessageId(NamedTuple):
    """`<ms>-<seq>`; a tuple, so `<` compares the integers in order."""

    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


def parse_id(text: str) -> MessageId | None:
    """`"1700000000000-3"` -> MessageId, or None when it is not an id."""
    m = _ID.fullmatch(text)
    if m is None:
        return None
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms > _MAX_PART or seq > _MAX_PART:
        return None
    return MessageId(ms, seq)


class IdClock:
    """Hands out strictly increasing ids from the wall clock, as Redis does for `XADD *`."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = MessageId(0, 0)

    def next(self) -> MessageId:
        """The next id: this millisecond, or one more in the sequence if the clock has not moved on."""
        ms = time.time_ns() // 1_000_000
        last = self.last
        # A clock that steps back must not reorder ids: stay on the last millisecond and count up.
        self.last = MessageId(ms, 0) if ms > last.ms else MessageId(last.ms, last.seq + 1)
        return self.last


@dataclass(frozen=True, slots=True)
class Message:
    """One published notification, serialised and framed once, and shared by every socket that gets it."""

    id: MessageId
    targets: frozenset[str] | None  # None: everyone
    created: float  # time.monotonic() when it was stored, for the history's TTL
    wire: bytes  # the whole WebSocket text frame, header and JSON, as it goes on an uncompressed socket
    offset: int  # where the JSON starts in `wire`
    # The same message as one chunk of an SSE response, built by `diary_ws.sse` for the first stream that gets
    # it and shared by the rest, as `wire` is by the sockets.
    sse: bytes | None = field(default=None, compare=False, repr=False)

    @classmethod
    def build(cls, msg_id: MessageId, targets: frozenset[str] | None, payload: bytes) -> Message:
        """A message whose JSON is `payload`."""
        frame = text_frame(payload)
        return cls(msg_id, targets, time.monotonic(), frame, len(frame) - len(payload))

    @property
    def size(self) -> int:
        """Bytes on the wire: what the backlog's byte cap counts."""
        return len(self.wire)

    @property
    def text(self) -> str:
        """The JSON as a string, for the ASGI send path (slow path only: it copies)."""
        return self.wire[self.offset :].decode()

    def is_for(self, user_id: str) -> bool:
        """Whether this user is meant to get it."""
        return self.targets is None or user_id in self.targets


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented RFC 6455 text frame: what a server sends when nothing is compressed.

    Built once per message, so a publish writes the same bytes to every socket instead of framing per socket.
    """
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def rfc3339(epoch_ms: int) -> str:
    """Milliseconds since the epoch -> `2026-11-25T18:11:45.123Z`."""
    seconds, ms = divmod(epoch_ms, 1000)
    return f"{_second(seconds)}{ms:03d}Z"


@functools.lru_cache(maxsize=4)
def _second(epoch_seconds: int) -> str:
    # strftime is most of rfc3339's cost, and a busy second has thousands of messages: once per second.
    return datetime.fromtimestamp(epoch_seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def render(kind: str, message: str, data: dict[str, Any] | None, msg_id: MessageId) -> bytes:
    """The frame of docs/api.md: the guide's `message`, plus `type`, `id`, `sent_at` and `data` when given."""
    frame: dict[str, Any] = {"type": kind, "message": message, "id": str(msg_id), "sent_at": rfc3339(msg_id.ms)}
    if data is not None:
        frame["data"] = data
    return orjson.dumps(frame)


HEARTBEAT_FRAME = '{"type":"heartbeat"}'  # what `?heartbeat=` sends; never stored, never counted


class Draft(NamedTuple):
    """A notification before it has an id: what a backend stores and renders once the id is known."""

    kind: str
    message: str
    data: dict[str, Any] | None

    def render(self, msg_id: MessageId) -> bytes:
        """The JSON frame with `msg_id` in it."""
        return render(self.kind, self.message, self.data, msg_id)


def control_frame(**fields: Any) -> str:
    """A small frame of our own, such as `{"type": "resume", ...}`."""
    return orjson.dumps(fields).decode()
