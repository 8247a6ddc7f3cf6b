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
        with contextlib.suppress(OSError):
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

    def _fire(self, timeout: float) -> None:
        self._timer = None
        log.warning("aborting %s has read nothing for %.0f s", self._what, timeout)
        self._abort()
