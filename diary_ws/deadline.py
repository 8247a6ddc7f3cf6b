"""One deadline per request: every broker call a request makes shares one clock, retries included.

`routes` opens `request()` around a POST, a status or a DELETE; the backend reads `until()` for each call
and gives up (503 not sent, or 504 outcome unknown) in time for the answer to go out within REQUEST_SECONDS,
whatever the broker does: paused, gone, blackholed or slow. Outside a request (the stream reader, the
presence writer) there is no deadline and the caller passes its own bound.

A ContextVar, so the value follows the request's task and nothing else: the background tasks were created
before any request and never see one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

REQUEST_SECONDS = 3.0  # the promise: no POST, status or DELETE takes longer, whatever the broker does
MARGIN = 0.3  # kept back from the broker calls, to build and send the answer
BACKSTOP_SECONDS = REQUEST_SECONDS - 0.1  # routes cut a request off here, should a broker call overrun

_until: ContextVar[float | None] = ContextVar("diary_ws_deadline", default=None)


@contextlib.contextmanager
def request(seconds: float = REQUEST_SECONDS) -> Iterator[float]:
    """Give the code inside one deadline (a nested call keeps the outer one); yields it, as monotonic time."""
    outer = _until.get()
    if outer is not None:
        yield outer
        return
    until = time.monotonic() + seconds - MARGIN
    token = _until.set(until)
    try:
        yield until
    finally:
        _until.reset(token)


def until(default: float) -> float:
    """The monotonic time by which broker calls must be done: the request's deadline, or `default` s from now."""
    found = _until.get()
    return found if found is not None else time.monotonic() + default


def left(default: float) -> float:
    """Seconds left until `until(default)` (at most `default` outside a request); may be 0 or less."""
    return until(default) - time.monotonic()
