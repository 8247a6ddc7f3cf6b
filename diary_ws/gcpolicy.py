"""The garbage collector's policy in a `diary-ws serve` process (GC_FREEZE): no stop-the-world collections.

Python's full collection walks every object the collector tracks, about 60 per open socket, and the event
loop stands still meanwhile: about a second at 18,500 sockets, at every few thousand connects or POSTs.
Objects that have survived two young collections are almost all long-lived (sockets, their protocols,
caches), so after each collection of the middle generation this moves every survivor into the
collector's permanent generation (`gc.freeze()`, a constant-time list splice), which no collection walks
again. Full collections then find the oldest generation nearly empty and take well under a millisecond.

A frozen object is still freed by reference counting when the last reference goes; what the collector
never frees any more is a frozen object in a reference cycle. So the edge breaks each connection's cycles
when it is lost (edge/http.py, edge/websocket.py) and a closed socket leaves no cyclic garbage. Cycles left
elsewhere (a library's, or a path nobody has measured yet) would pile up in the frozen generation for good,
so it has a bound: once it has grown to twice its size after the last thaw and by at least THAW_FLOOR
objects (more than 19,000 open sockets hold), the next turn of the event loop thaws it, runs one full
collection and freezes again. The floor is that high because a thaw's collection is the longest pause there
is (about 0.6 µs an object: 0.7 s at 18,500 sockets), and with a lower one the sockets' own objects set it
off as they open, while nothing leaks: at 300,000, 600,000 and 1.2 million objects, the last one in the
steady state at 18,500 sockets. So a thaw means cycles leak, and memory stays within what is alive plus
THAW_FLOOR objects of leaked cycles (or twice what is alive, if that is more). Its size is estimated from
the memory grown, not counted (`Valve.estimate`): a count walks the whole list with the loop stopped, so a
leak of objects of one memory block each is seen at twice that. Measured: docs/performance.md.

`diary-ws serve` also times every collection (`diary_ws_gc_pause_seconds`), freezing or not. Only
`diary-ws serve` applies either, after start-up: the collector is the whole process's, so an app embedded
in another server leaves it to its host.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import sys
import time
from typing import Any

from diary_ws.loopwatch import BUCKETS

MIDDLE = 1  # the generation whose survivors would otherwise pile up in the oldest one
THAW_GROWTH = 2.0  # the frozen generation may grow to this many times its size after the last thaw ...
# The young generations are collected on a clock too. Python starts a young collection when allocations
# outrun deallocations by 700 objects; in a steady state, where old objects die as fast as new ones are made
# (each socket's ping timer, re-armed every PING_INTERVAL, dies as its successor is born), that count hardly
# moves, and the young generations grow until one collection walks them all: 167,000 objects and 143 ms at
# 18,500 sockets (timer handles, their contexts, bound methods, one of each per socket). A collection of the
# youngest generation every SWEEP_EVERY seconds, and of the middle one (whose survivors are frozen) every
# SWEEP_MIDDLE_EVERY sweeps, keeps each walk to what a fraction of a second made. A middle one every second
# took 10 to 17 ms of CPU at 18,500 sockets under the stall benchmark's load (its walk reaches into the
# frozen objects the young ones point at, a cache miss each), every half second at most about 9 ms; every
# 0.3 s (with fan-outs of 128 sockets a turn) ticks of the loop over 20 ms in 300 s went from 39 to 22.
SWEEP_EVERY = 0.1
SWEEP_MIDDLE_EVERY = 3
THAW_FLOOR = 1_500_000  # ... and by at least this many objects (about 25,000 sockets' worth) before one
BLOCKS_PER_OBJECT = 2  # memory blocks that come with an object the collector tracks, about (Valve.estimate)

log = logging.getLogger("diary_ws.gc")


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
            # Nothing counts what this moves: `len(gc.get_objects(2))` took 5 ms for the 30,000 survivors of
            # a connect storm's half second, and `gc.get_freeze_count()` walks the whole frozen list.
            gc.freeze()
            if VALVE.check():
                VALVE.schedule()  # not here: a collection cannot start from inside the collector's callback


class Valve:
    """The frozen generation's bound: a thaw, one full collection and a freeze once it has doubled."""

    __slots__ = ("baseline", "counted", "blocks", "recounts", "thaws", "freed", "loop", "pending")

    def __init__(self) -> None:
        self.baseline = 0  # frozen objects right after the last freeze that followed a full collection
        self.counted = 0  # the frozen objects at the last count (a walk of the list)
        self.blocks = 0  # the interpreter's allocated memory blocks then
        self.recounts = 0  # counts outside a thaw: each walked the whole frozen list
        self.thaws = 0
        self.freed = 0  # unreachable objects the thaws' collections found (cycles that froze)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending = False

    def limit(self) -> float:
        return max(self.baseline * THAW_GROWTH, self.baseline + THAW_FLOOR)

    def estimate(self, blocks: int | None = None) -> int:
        """The frozen objects now, about, without a walk of the frozen list (`gc.get_freeze_count()`: 130 to
        170 ms at 1.1 million objects in a server at 18,500 sockets, its objects spread over 280 MB): the last
        count plus half the memory blocks the process grew by since (`sys.getallocatedblocks()`), since an
        object the collector tracks comes with about two blocks (an idle socket holds 87 for its 51 objects;
        a class instance is two, itself and its attributes).

        Counting each block as an object (a strict upper bound, but for other memory shrinking meanwhile) set
        off a walk about 20 s after every connect storm to 18,500 sockets (1.6 million blocks grown, 0.89
        million objects), the longest stall of the steady state. Counting every object as it is frozen costs
        5 ms a collection to count (`len(gc.get_objects(2))` for the 30,000 survivors of a storm's half
        second), and overstated it more: most die soon after (a reconnecting socket's, a timer re-armed every
        PING_INTERVAL). The price: a leak of one-block objects is seen when it has filled twice the bound's
        room, not once."""
        if blocks is None:
            blocks = sys.getallocatedblocks()  # it adds up every memory pool's count: 0.2 ms at 350 MB
        return self.counted + max(0, blocks - self.blocks) // BLOCKS_PER_OBJECT

    def check(self) -> bool:
        """After a freeze: whether the frozen list is over its bound, counted only when it may be: when the
        estimate is over the bound and memory grew by half the objects the last count found (or half
        THAW_FLOOR), so a list just under its bound is not walked at every collection. None while a thaw is
        on its way (it counts them)."""
        blocks = sys.getallocatedblocks()
        if self.pending or self.estimate(blocks) <= self.limit():
            return False
        if blocks - self.blocks < max(self.counted, THAW_FLOOR) / 2:
            return False
        self.recount()
        return self.counted > self.limit()

    def recount(self) -> None:
        """Walk the frozen list once: the exact count, and the memory it is measured against from now on."""
        self.counted = gc.get_freeze_count()
        self.blocks = sys.getallocatedblocks()
        self.recounts += 1

    def schedule(self) -> None:
        if self.pending or self.loop is None or self.loop.is_closed():
            return
        self.pending = True
        self.loop.call_soon_threadsafe(self.thaw)

    def thaw(self) -> None:
        """Hand the frozen objects back, collect everything once, and freeze what is left."""
        if not freezing:
            self.pending = False
            return
        frozen = gc.get_freeze_count()
        gc.unfreeze()
        # Timed by the callback like any other full collection. `pending` stays set until the new baseline is
        # known: the callback, which freezes the survivors, would otherwise find them over the old bound when
        # they are alive (sockets opening, not leaked cycles) and schedule a second full collection at once.
        found = gc.collect()
        gc.freeze()
        self.recount()
        self.baseline = self.counted
        self.pending = False
        self.thaws += 1
        self.freed += found
        log.info(
            "the frozen generation grew to %d objects: thawed, collected (%d unreachable) and froze %d",
            frozen, found, self.baseline,
        )  # fmt: skip


class Sweeper:
    """Young collections on a clock (SWEEP_EVERY), so the young generations never grow past what a moment made."""

    __slots__ = ("handle", "turns")

    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None
        self.turns = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop()
        self.handle = loop.call_later(SWEEP_EVERY, self.sweep, loop)

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if not freezing or loop.is_closed():
            self.handle = None
            return
        self.turns += 1
        gc.collect(1 if self.turns % SWEEP_MIDDLE_EVERY == 0 else 0)  # the callback freezes a middle one's survivors
        self.handle = loop.call_later(SWEEP_EVERY, self.sweep, loop)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


PAUSES = Pauses()  # the process's one collector, so one record of it
SWEEPER = Sweeper()
VALVE = Valve()
freezing = False


def install(freeze: bool) -> None:
    """Time every collection; with `freeze`, collect and freeze what start-up left, then freeze the survivors
    of every later collection of the middle (or oldest) generation."""
    global freezing
    if freeze:
        gc.collect()
        gc.freeze()
        VALVE.recount()
        VALVE.baseline = VALVE.counted
        VALVE.recounts = 0
        try:
            VALVE.loop = asyncio.get_running_loop()
        except RuntimeError:  # installed outside a loop (tests): the bound is then checked by calling thaw()
            VALVE.loop = None
    freezing = freeze
    if freeze and VALVE.loop is not None:
        SWEEPER.start(VALVE.loop)
    if PAUSES.callback not in gc.callbacks:
        gc.callbacks.append(PAUSES.callback)


def uninstall() -> None:
    """Stop timing and freezing, and hand the frozen objects back to the collector (at shutdown, in tests)."""
    global freezing
    freezing = False
    SWEEPER.stop()
    VALVE.loop = None
    VALVE.pending = False
    if PAUSES.callback in gc.callbacks:
        gc.callbacks.remove(PAUSES.callback)
    gc.unfreeze()


def installed() -> bool:
    return PAUSES.callback in gc.callbacks
