"""The event-loop stall probe: a timer that wakes every `TICK` seconds and records how late it woke.

A coroutine that runs without awaiting (a full garbage collection, a big JSON dump, a blocking call) holds
every socket of the process. The lag gauge in `metrics` samples every half second and misses most such
stalls; this probe samples a hundred times a second, so a stall of 20 ms shows, and the histogram tells a
rare 1 s freeze from steady jitter.

It is one `call_at` chain, not a task: each tick is one timer-heap push and a few additions (about a
microsecond), so the probe costs well under 0.1% of a core.
"""

from __future__ import annotations

import asyncio
import bisect

TICK = 0.01  # seconds between wake-ups: a stall shorter than this may fall between two ticks
# Upper bounds, seconds. A healthy loop wakes within a millisecond (epoll rounds its timeout up to whole
# ms); 20 ms and 50 ms are the p99.9 and worst-case targets of the "no stop-the-world" work; above, a freeze.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StallProbe:
    """Counts, per bucket, how late each tick woke; read by the metrics collector and the console."""

    __slots__ = ("counts", "total", "worst", "_loop", "_due", "_handle")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last slot is above the top bound (+Inf)
        self.total = 0.0  # the sum of every lateness, seconds
        self.worst = 0.0  # the longest lateness since `take_worst` last read it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start ticking on `loop` (idempotent)."""
        if self._handle is None:
            self._loop = loop
            self._schedule(loop.time())

    def stop(self) -> None:
        """Stop ticking; the counts stay."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def record(self, late: float) -> None:
        """Count one wake-up `late` seconds after it was due."""
        self.counts[bisect.bisect_left(BUCKETS, late)] += 1
        self.total += late
        if late > self.worst:
            self.worst = late

    def take_worst(self) -> float:
        """The longest lateness since the last call, and start a new window."""
        worst, self.worst = self.worst, 0.0
        return worst

    @property
    def observations(self) -> int:
        return sum(self.counts)

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        # Due TICK after this wake-up, not after the last due time: after a stall the probe does not fire a
        # burst of catch-up ticks, and the stall is counted once, at its full length.
        self._due = now + TICK
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        # asyncio may run a timer up to one clock resolution early: that is no lateness.
        self.record(max(0.0, now - self._due))
        self._schedule(now)
