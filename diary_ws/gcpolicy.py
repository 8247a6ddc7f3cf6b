"""The garbage collector's policy in a `diary-ws serve` process (GC_FREEZE): no stop-the-world collections.

Python's full collection walks every object the collector tracks, about 60 per open socket, and the event
loop stands still meanwhile: about a second at 18,500 sockets, at every few thousand connects or POSTs.
Objects that have survived two young collections are almost all long-lived (sockets, their protocols,
caches), so after each collection of the middle generation this moves every survivor into the
collector's permanent generation (`gc.freeze()`, a constant-time list splice), which no collection walks
again. Full collections then find the oldest generation nearly empty and take well under a millisecond.

A frozen object is still freed by reference counting when the last reference goes; what the collector
never frees any more is a frozen object in a reference cycle. So the edge breaks each connection's cycles
when it is lost (edge/http.py, edge/websocket.py) and a closed socket leaves no cyclic garbage; cycles
still left elsewhere stay in memory (`diary_ws_gc_frozen_objects` shows their count growing). Measured
figures: docs/performance.md.

`diary-ws serve` also times every collection (`diary_ws_gc_pause_seconds`), freezing or not. Only
`diary-ws serve` applies either, after start-up: the collector is the whole process's, so an app embedded
in another server leaves it to its host.
"""

from __future__ import annotations

import bisect
import gc
import time
from typing import Any

from diary_ws.loopwatch import BUCKETS

MIDDLE = 1  # the generation whose survivors would otherwise pile up in the oldest one


class Pauses:
    """The CPU time of each collection, per generation: what the collector itself costs the event loop.

    CPU time (the thread's own clock), not wall time: on a busy machine a collection may wait for a CPU
    halfway, and that wait is the stall histogram's to show, not the collector's.
    """

    __slots__ = ("counts", "totals", "worst", "_started")

    def __init__(self) -> None:
        self.counts = [[0] * (len(BUCKETS) + 1) for _ in range(3)]  # per generation; the last slot is +Inf
        self.totals = [0.0, 0.0, 0.0]
        self.worst = [0.0, 0.0, 0.0]
        self._started = 0.0

    def record(self, generation: int, seconds: float) -> None:
        self.counts[generation][bisect.bisect_left(BUCKETS, seconds)] += 1
        self.totals[generation] += seconds
        if seconds > self.worst[generation]:
            self.worst[generation] = seconds

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.thread_time()
            return
        generation = info["generation"]
        self.record(generation, time.thread_time() - self._started)
        if freezing and generation >= MIDDLE:
            gc.freeze()


PAUSES = Pauses()  # the process's one collector, so one record of it
freezing = False


def install(freeze: bool) -> None:
    """Time every collection; with `freeze`, collect and freeze what start-up left, then freeze the survivors
    of every later collection of the middle (or oldest) generation."""
    global freezing
    if freeze:
        gc.collect()
        gc.freeze()
    freezing = freeze
    if PAUSES.callback not in gc.callbacks:
        gc.callbacks.append(PAUSES.callback)


def uninstall() -> None:
    """Stop timing and freezing, and hand the frozen objects back to the collector (at shutdown, in tests)."""
    global freezing
    freezing = False
    if PAUSES.callback in gc.callbacks:
        gc.callbacks.remove(PAUSES.callback)
    gc.unfreeze()


def installed() -> bool:
    return PAUSES.callback in gc.callbacks
