"""diary-ws on asyncio against diary-ws on uvloop (the LOOP setting), alternated, for a busy shared box.

Only the parts the loop changes most: broadcasts to N sockets (server CPU per delivery) and targeted POSTs
(POSTs per second and server CPU per POST). Each loop runs ROUNDS times, alternating, and the median is
printed, so a burst of load from elsewhere on the machine hits both. It measures and asserts nothing.

    .venv-bench/bin/python -m bench.loops --sockets 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import uvloop

from bench.loadgen import Http, close_sockets, open_sockets
from bench.suite import LOADGEN_CORE, Bench, Result, cpu_seconds, raise_nofile
from tests.utils import vm_rss_kib


class LoopBench(Bench):
    """The suite's Bench, cut down to fan-out rounds and targeted sends."""

    async def _measure(self, pid: int) -> None:
        r = self.result
        rss0, cpu0 = vm_rss_kib(pid), cpu_seconds(pid)
        users = [f"u{i}" for i in range(self.n)]
        listeners = await open_sockets(f"ws://127.0.0.1:{self.port}/api/v1/ws", users, self.receipts, 64)
        r.handshake_cpu_ms = (cpu_seconds(pid) - cpu0) / self.n * 1000
        r.rss_kib_per_idle_socket = (vm_rss_kib(pid) - rss0) / self.n
        async with Http("127.0.0.1", self.port) as http:
            for _ in range(2):  # warm-up broadcasts, not timed
                await self._broadcast(http)
            await self._rounds(http, pid)
            await self._targeted(pid, seconds=3.0)
        await close_sockets(listeners)


FIELDS = ("cpu_us_per_delivery", "targeted_posts_per_s", "targeted_cpu_us_per_post", "handshake_cpu_ms",
          "rss_kib_per_idle_socket")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10, help="broadcasts per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per loop, alternated")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {LOADGEN_CORE % (os.cpu_count() or 1)})
    raise_nofile()
    runs: dict[str, list[Result]] = {"asyncio": [], "uvloop": []}
    for _ in range(args.repeats):
        for loop, results in runs.items():
            bench = LoopBench(f"diary-ws+{loop}", args.sockets, args.rounds, 0, {"DIARY_WS_LOOP": loop})
            results.append(uvloop.run(bench.run()))
            print(loop, {f: round(getattr(results[-1], f) or 0, 2) for f in FIELDS}, flush=True)
    print(f"\nmedians over {args.repeats} runs each, {args.sockets} sockets, {args.rounds} broadcasts:")
    print(f"{'':28}{'asyncio':>12}{'uvloop':>12}")
    for name in FIELDS:
        medians = [statistics.median(getattr(r, name) or 0.0 for r in runs[loop]) for loop in runs]
        print(f"{name:28}{medians[0]:12.2f}{medians[1]:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
