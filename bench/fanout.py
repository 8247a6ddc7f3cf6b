"""Fan-out benchmark: diary-ws against the naive baseline, in one run, on this machine. Measures; asserts nothing.

The server runs in its own process pinned to core 0; this process, the load generator, pins itself to
core 1. For each server: N idle sockets, then ROUNDS broadcasts, each timed from just before the POST to
each socket's receipt. Both clocks are CLOCK_MONOTONIC, which is system-wide on Linux.

    make bench                       # N = 1000, 20 rounds, memory and Redis mode
    python -m bench.fanout --sockets 5000 --rounds 20 --broker memory

Redis mode starts its own redis-server (pinned to the server's core) and one diary-ws process on it: the
same fan-out, plus the XADD and the reader's XREAD between the POST and the sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.utils import RedisServer, free_port, redis_server, vm_rss_kib, wait_until

RESULTS = Path(__file__).parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    server: str
    sockets: int
    rounds: int
    last_socket_ms_p50: float
    last_socket_ms_max: float
    per_socket_ms_p50: float
    per_socket_ms_p99: float
    post_ms_p50: float
    deliveries_per_s: float
    server_cpu_us_per_delivery: float
    redis_cpu_us_per_delivery: float  # redis-server's own CPU, Redis mode only
    rss_kib_per_idle_socket: float
    lost: int
    loadgen_cpu_share: float  # the load generator's CPU over wall time: near 1.0 means it was the bottleneck


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start(kind: str, port: int, redis: RedisServer | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    if kind.startswith("diary-ws"):
        env.update(DIARY_WS_PORT=str(port), DIARY_WS_LOG_LEVEL="warning")
        if kind == "diary-ws+redis":
            assert redis is not None
            env.update(DIARY_WS_BROKER_URL=redis.url)
        cmd = [sys.executable, "-m", "diary_ws", "serve"]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "bench.naive:app", "--port", str(port), "--log-level", "warning",
               "--ws-per-message-deflate", "false"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, preexec_fn=lambda: os.sched_setaffinity(0, {0}))

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/v1/ws/status", timeout=1).status_code in (200, 404)
        except httpx.HTTPError:
            return False

    wait_until(up, 15, f"{kind} to start")
    return proc


class Round:
    """One broadcast's receipts; `done` is set when every socket has one."""

    def __init__(self, expected: int) -> None:
        self.stamps: list[float] = []
        self.expected = expected
        self.done = asyncio.Event()

    def receipt(self) -> None:
        self.stamps.append(time.monotonic())
        if len(self.stamps) >= self.expected:
            self.done.set()


async def receiver(ws: ClientConnection, rounds: list[Round]) -> None:
    async for _frame in ws:
        rounds[-1].receipt()


async def measure(kind: str, sockets: int, rounds: int, redis: RedisServer | None = None) -> Result:
    port = free_port()
    proc = start(kind, port, redis)
    try:
        rss_before = vm_rss_kib(proc.pid)
        conns = [await connect(f"ws://127.0.0.1:{port}/api/v1/ws/u{i}", compression=None) for i in range(sockets)]
        rss_idle = vm_rss_kib(proc.pid)
        stamps: list[Round] = []
        per_socket: list[float] = []
        last: list[float] = []
        posts: list[float] = []
        lost = 0
        readers = [asyncio.create_task(receiver(ws, stamps)) for ws in conns]
        broker_pid = redis.proc.pid if redis is not None and redis.proc is not None and "redis" in kind else None
        broker0 = cpu_seconds(broker_pid) if broker_pid else 0.0
        cpu0, own0, wall0 = cpu_seconds(proc.pid), time.process_time(), time.monotonic()
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(rounds):
                stamps.append(Round(sockets))
                started = time.monotonic()
                await http.post(f"http://127.0.0.1:{port}/api/v1/ws/notification", json={"message": f"round {i}"})
                posts.append(time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stamps[-1].done.wait(), 30)
                got = stamps[-1].stamps
                lost += sockets - len(got)
                per_socket.extend(t - started for t in got)
                if got:
                    last.append(max(got) - started)
        cpu = cpu_seconds(proc.pid) - cpu0
        broker_cpu = cpu_seconds(broker_pid) - broker0 if broker_pid else 0.0
        wall = time.monotonic() - wall0
        own = time.process_time() - own0
        for task in readers:
            task.cancel()
        for ws in conns:
            await ws.close()
        per_socket.sort()
        deliveries = sockets * rounds - lost
        return Result(
            server=kind,
            sockets=sockets,
            rounds=rounds,
            last_socket_ms_p50=statistics.median(last) * 1000,
            last_socket_ms_max=max(last) * 1000,
            per_socket_ms_p50=per_socket[len(per_socket) // 2] * 1000,
            per_socket_ms_p99=per_socket[int(len(per_socket) * 0.99)] * 1000,
            post_ms_p50=statistics.median(posts) * 1000,
            deliveries_per_s=deliveries / sum(last),
            server_cpu_us_per_delivery=cpu / max(deliveries, 1) * 1e6,
            redis_cpu_us_per_delivery=broker_cpu / max(deliveries, 1) * 1e6,
            rss_kib_per_idle_socket=(rss_idle - rss_before) / sockets,
            lost=lost,
            loadgen_cpu_share=own / wall,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def table(results: list[Result]) -> str:
    rows = [asdict(r) for r in results]
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    lines = [f"{'':{width}}  " + "  ".join(f"{r['server']:>12}" for r in rows)]
    for key in keys[1:]:
        cells = "  ".join(f"{r[key]:>12.1f}" if isinstance(r[key], float) else f"{r[key]:>12}" for r in rows)
        lines.append(f"{key:{width}}  {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, nargs="+", default=[1000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--broker", choices=["memory", "redis", "both"], default="both")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {1 % (os.cpu_count() or 1)})
    kinds = {"memory": ["diary-ws"], "redis": ["diary-ws+redis"], "both": ["diary-ws", "diary-ws+redis"]}[args.broker]
    if "diary-ws+redis" in kinds and shutil.which("redis-server") is None:
        print("redis-server not found: Redis mode skipped (install Debian's redis-server package)")
        kinds.remove("diary-ws+redis")
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_server()) if "diary-ws+redis" in kinds else None
        if redis is not None and redis.proc is not None:
            os.sched_setaffinity(redis.proc.pid, {0})  # the server side shares core 0, as a co-located Redis would
        for n in args.sockets:
            # The first run in a fresh load generator is about twice as slow whichever server it meets (its
            # allocator and caches warm up), so a short run is thrown away before anything is measured.
            asyncio.run(measure("naive", n, 3))
            for kind in [*kinds, "naive"]:
                results.append(asyncio.run(measure(kind, n, args.rounds, redis)))
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}, "results": [asdict(r) for r in results]}
    (RESULTS / "fanout.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print(f"\nwritten: {RESULTS / 'fanout.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
