"""The transport-level tools the edge's protocols share: a hard abort that frees the kernel's buffers, and a
stall timer for a peer that reads nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("diary_ws.server")

CLOSE_GRACE = 1.0  # seconds a closing socket may take to flush before it is aborted


def hard_abort(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset, so the kernel frees the unsent buffer too.

    A plain `transport.abort()` frees the descriptor, but the kernel keeps the orphaned socket, and up to
    several MiB of unsent data, while it probes a peer that reads nothing. SO_LINGER 0 turns close into RST.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # A socket already closed raises OSError on asyncio and ValueError (negative fd) on uvloop.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class StallWatch:
    """Aborts a connection whose peer reads nothing for `timeout` seconds while data waits for it.

    Started from the protocol's `pause_writing`, cancelled by `resume_writing` and `connection_lost`: a peer
    that stops reading is as dead as one that stops ponging, and holds buffers until it is reset.
    """

    __slots__ = ("_abort", "_timer", "_what")

    def __init__(self, what: str, abort: Callable[[], None]) -> None:
        self._what = what
        self._abort = abort
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        if self._timer is None:
            self._timer = loop.call_later(timeout, self._fire, timeout)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        """Cancel for good and drop the abort callback: the callback is the owner's bound method, a reference
        cycle that would keep a closed connection for the garbage collector instead of freeing it at once."""
        self.cancel()
        self._abort = _nothing

    def _fire(self, timeout: float) -> None:
        self._timer = None
        log.warning("aborting %s has read nothing for %.0f s", self._what, timeout)
        self._abort()


def _nothing() -> None:
    pass


def unlink_transport(transport: asyncio.BaseTransport | None) -> None:
    """Break the cycle a closed asyncio socket transport keeps with itself, so reference counting frees it.

    asyncio's selector transport holds its own bound read method (`_read_ready_cb`) until the object dies,
    so every closed connection is left to the garbage collector, and one that the collector's policy froze
    (docs/performance.md) would never be freed. Only once the connection is lost; uvloop's transports have
    no such attribute.
    """
    if transport is not None and getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]
