"""`make bench BENCH_ARGS=--batch`: notifications per second through single POSTs and through batches.

In one run, against one diary-ws server per broker (memory, and Redis when redis-server is installed), with
LISTENERS sockets connected (users u0..u{LISTENERS-1}, one picows socket each), it sends targeted
notifications (item i goes to user u{i % LISTENERS}) for a fixed time in three ways:

- single: one `POST /api/v1/ws/notification` per notification, from 4 keep-alive connections at once;
- batch-100 and batch-1000: `POST /api/v1/ws/notifications` with 100 or 1,000 items, from 2 connections.

For each it reports notifications accepted per second (a 200 for a single POST, a `success` result for a
batch item), the server's CPU per notification (and redis-server's, in Redis mode), and the rate at which
they reached the listeners, timed to the last frame. It measures and asserts nothing.

    .venv-bench/bin/python -m bench.batch --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from bench.loadgen import Http, Receipts, close_sockets, open_sockets
from bench.suite import LOADGEN_CORE, RESULTS, SERVER_CORE, cpu_seconds, raise_nofile, start
from tests.utils import RedisServer, free_port, redis_server

LISTENERS = 100
SINGLE = "/api/v1/ws/notification"
BATCH = "/api/v1/ws/notifications"


@dataclass
class Row:
    broker: str
    mode: str
    notifications: int  # accepted
    seconds: float
    per_s: float
    server_cpu_us_per_notification: float
    redis_cpu_us_per_notification: float | None
    delivered_per_s: float  # from the first POST to the last frame at the listeners
    not_delivered: int


def items(start: int, count: int) -> list[dict[str, object]]:
    return [{"message": f"n{start + i}", "user_ids": [f"u{(start + i) % LISTENERS}"]} for i in range(count)]


async def run_mode(port: int, mode: str, seconds: float, receipts: Receipts) -> tuple[int, float, float]:
    """Send for `seconds`; (notifications accepted, seconds sending, seconds until the last delivery)."""
    size = 1 if mode == "single" else int(mode.split("-")[1])
    connections = 4 if size == 1 else 2
    accepted = 0
    counter = 0
    deadline = time.monotonic() + seconds
    first_frame = receipts.frames

    async def sender() -> None:
        nonlocal accepted, counter
        async with Http("127.0.0.1", port) as http:
            while time.monotonic() < deadline:
                start, counter = counter, counter + size
                if size == 1:
                    status, _ = await http.post_json(SINGLE, items(start, 1)[0])
                    accepted += status == 200
                else:
                    status, body = await http.post_json(BATCH, {"notifications": items(start, size)})
                    if status == 200:
                        results = orjson.loads(body)["results"]
                        accepted += sum(1 for r in results if r["status"] == "success")

    started = time.monotonic()
    await asyncio.gather(*(sender() for _ in range(connections)))
    sent_for = time.monotonic() - started
    limit = time.monotonic() + 30
    # Receipts counts frames without an event per count; a short poll costs the load generator little.
    while receipts.frames - first_frame < accepted and time.monotonic() < limit:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    return accepted, sent_for, time.monotonic() - started


async def measure(
    broker: str, modes: list[str], seconds: float, env: dict[str, str], redis_pid: int | None
) -> list[Row]:
    port = free_port()
    proc = start("diary-ws", port, env)
    rows: list[Row] = []
    try:
        receipts = Receipts()
        listeners = await open_sockets(
            f"ws://127.0.0.1:{port}/api/v1/ws", [f"u{i}" for i in range(LISTENERS)], receipts, 50
        )
        await run_mode(port, "batch-100", 0.3, receipts)  # warm up: the first requests pay for imports and caches
        for mode in modes:
            before = receipts.frames
            cpu0 = cpu_seconds(proc.pid)
            redis0 = cpu_seconds(redis_pid) if redis_pid else 0.0
            accepted, sent_for, until_delivered = await run_mode(port, mode, seconds, receipts)
            cpu = cpu_seconds(proc.pid) - cpu0
            redis_cpu = cpu_seconds(redis_pid) - redis0 if redis_pid else None
            delivered = receipts.frames - before
            rows.append(
                Row(
                    broker=broker, mode=mode, notifications=accepted, seconds=round(sent_for, 2),
                    per_s=round(accepted / sent_for), server_cpu_us_per_notification=micros(cpu, accepted),
                    redis_cpu_us_per_notification=None if redis_cpu is None else micros(redis_cpu, accepted),
                    delivered_per_s=round(delivered / until_delivered), not_delivered=accepted - delivered,
                )
            )  # fmt: skip
            print(table(rows[-1:], header=not rows[:-1] and broker == "memory"), flush=True)
        await close_sockets(listeners)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return rows


def micros(cpu: float, count: int) -> float:
    return round(cpu / max(count, 1) * 1e6, 1)


def table(rows: list[Row], header: bool = True) -> str:
    cols = ("broker", "mode", "notifications", "per_s", "server_cpu_us_per_notification",
            "redis_cpu_us_per_notification", "delivered_per_s", "not_delivered")  # fmt: skip
    lines = ["  ".join(f"{c:>14}" for c in cols)] if header else []
    for row in rows:
        values = asdict(row)
        lines.append("  ".join(f"{'-' if values[c] is None else values[c]!s:>14}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="sending time per mode (default: 3)")
    parser.add_argument("--modes", nargs="+", default=["single", "batch-100", "batch-1000"])
    parser.add_argument("--broker", choices=["memory", "redis"], nargs="+", default=["memory", "redis"])
    parser.add_argument("--out", type=Path, default=RESULTS / "batch.json")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {LOADGEN_CORE % (os.cpu_count() or 1)})
    raise_nofile()
    import uvloop

    brokers = list(args.broker)
    if "redis" in brokers and shutil.which("redis-server") is None:
        print("redis-server not found: Redis mode skipped (install Debian's redis-server package)")
        brokers.remove("redis")
    rows: list[Row] = []
    for broker in brokers:
        with contextlib.ExitStack() as stack:
            env: dict[str, str] = {}
            redis_pid = None
            if broker == "redis":
                redis: RedisServer = stack.enter_context(redis_server())
                assert redis.proc is not None
                os.sched_setaffinity(redis.proc.pid, {SERVER_CORE})
                env["DIARY_WS_BROKER_URL"] = redis.url
                redis_pid = redis.proc.pid
            rows += uvloop.run(measure(broker, args.modes, args.seconds, env, redis_pid))
    args.out.parent.mkdir(exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "uname": os.uname().release}, "rows": [asdict(r) for r in rows]}
    args.out.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
