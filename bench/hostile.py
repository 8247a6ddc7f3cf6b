"""The hostile benchmark: each attack of issue 12 against a fresh server, beside a run with no attack.

For every attack in `ATTACKS` it starts `diary-ws serve` (from the project's environment, with the attack's
settings), connects one healthy WebSocket reader, publishes to it every 20 ms, runs the attack for
`--seconds`, and prints: the server's RSS growth (peak during the attack, and after it), the bytes it
logged, and the reader's delivery latency p50/p99 (POST sent to frame received) with how many arrived. It
measures and asserts nothing; the bounds themselves are asserted by tests/test_edge_http.py.

`ATTACKS` is a table: to add an attack, write `async def my_attack(target: Target) -> str` (it runs until
`target.deadline`, and returns a note for the table) and append an `Attack` row. Sizes are the issue's at
`--scale 1`; `--scale 0.1` divides every count and byte size by ten.

    python -m bench.hostile --scale 0.25 --seconds 10      # modest
    make bench BENCH_ARGS=--hostile                      # through the suite
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import connect

from tests.utils import Server, run_server, vm_rss_kib


@dataclass
class Target:
    """What an attack gets: the server, its size factor, and when to stop."""

    server: Server
    scale: float
    deadline: float
    notes: list[str] = field(default_factory=list)

    def count(self, n: int) -> int:
        return max(1, int(n * self.scale))

    def left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass(frozen=True)
class Attack:
    """One row of the table: a name, what it does, the server settings it runs against, and the attack."""

    name: str
    what: str
    run: Callable[[Target], Coroutine[Any, Any, str]]
    settings: dict[str, str] = field(default_factory=dict)
    open_files: int | None = None


# --- the attacks ----------------------------------------------------------------------------------------------


async def no_attack(target: Target) -> str:
    await asyncio.sleep(max(0.0, target.left()))
    return ""


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    with contextlib.suppress(OSError):
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    return None


SLOW_STARTS = (
    b"GET /api/v1/ws/status HTTP/1.1\r\nHost: x\r\n",  # a head
    b"GET /api/v1/ws/slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",  # an upgrade
    b"POST /api/v1/ws/notification HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{",  # a body
    b"POST /api/v1/ws/notification HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",  # chunks
)


async def _slow_connections(target: Target, count: int, starts: tuple[bytes, ...], every: float) -> str:
    """`count` connections that each send a byte every `every` s, and come back when the server drops them."""
    port = target.server.port
    dropped = 0

    async def one(i: int) -> None:
        nonlocal dropped
        start = starts[i % len(starts)]
        while target.left() > 0:
            opened = await _open(port)
            if opened is None:
                dropped += 1
                await asyncio.sleep(0.5)
                continue
            reader, writer = opened
            try:
                writer.write(start)
                while target.left() > 0:
                    await asyncio.sleep(min(every, max(0.01, target.left())))
                    if reader.at_eof() or writer.is_closing():
                        break
                    writer.write(b"a" if b"chunked" not in start else b"1\r\na\r\n")
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()
            if target.left() > 0:
                dropped += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    return f"{count} slow connections; {dropped} dropped by the server and reopened"


async def slow_headers(target: Target) -> str:
    return await _slow_connections(target, target.count(1100), SLOW_STARTS[:1], 3.0)


async def slow_everything(target: Target) -> str:
    return await _slow_connections(target, target.count(2000), SLOW_STARTS, 3.0)


async def pipelined_unread(target: Target) -> str:
    """Pipelined `GET /healthz`, 20 MB of them, whose answers are never read."""
    opened = await _open(target.server.port)
    if opened is None:
        return "could not connect"
    _reader, writer = opened
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    batch = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 1000
    total, sent = int(20_000_000 * target.scale), 0
    with contextlib.suppress(OSError, TimeoutError):
        while sent < total and target.left() > 0:
            writer.write(batch)
            await asyncio.wait_for(writer.drain(), max(0.1, target.left()))
            sent += len(batch)
    await asyncio.sleep(max(0.0, target.left()))
    writer.close()
    return f"{sent / 1e6:.1f} of {total / 1e6:.0f} MB written before the server stopped reading"


async def endless_header(target: Target) -> str:
    """A header line that never ends: 50 MB of it, if the server reads that far."""
    opened = await _open(target.server.port)
    if opened is None:
        return "could not connect"
    reader, writer = opened
    answer = asyncio.create_task(reader.read(200))  # read while writing, as a careful client would
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    block, total, sent = b"z" * 65536, int(50_000_000 * target.scale), 0
    with contextlib.suppress(OSError, TimeoutError):
        while sent < total and target.left() > 0 and not answer.done():
            writer.write(block)
            await asyncio.wait_for(writer.drain(), max(0.1, target.left()))
            sent += len(block)
    got = b""
    with contextlib.suppress(OSError, TimeoutError):
        got = await asyncio.wait_for(answer, max(0.1, target.left()))
    await asyncio.sleep(max(0.0, target.left()))
    writer.close()
    status = got.split(b"\r\n", 1)[0].decode(errors="replace") or "no answer"
    return f"{sent / 1e6:.1f} MB sent; {status}"


ATTACKS: list[Attack] = [
    Attack("none", "no attack: the reference figures", no_attack),
    Attack(
        "slow-headers",
        "1,100 connections sending a header byte every 3 s, open-file limit 1,024",
        slow_headers,
        open_files=1024,
    ),
    Attack("slow-mixed", "2,000 slow heads, upgrades, bodies and chunked bodies, a byte every 3 s", slow_everything),
    Attack("pipelined", "20 MB of pipelined GET /healthz, answers never read", pipelined_unread),
    Attack("endless-header", "a header line that never ends, 50 MB", endless_header),
]


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    rss_peak_mb: float
    rss_after_mb: float
    log_kb: float
    p50_ms: float
    p99_ms: float
    delivered: int
    sent: int
    note: str


async def healthy_reader(server: Server, stop: asyncio.Event, latencies: list[float]) -> int:
    """A WebSocket reader that a publisher sends to every 20 ms; returns how many were published."""
    sent = 0
    async with connect(server.listen_url("reader"), open_timeout=10) as ws:

        async def read() -> None:
            async for raw in ws:
                frame = orjson.loads(raw)
                if frame.get("type") == "notification":
                    latencies.append(time.monotonic() - float(frame["message"]))

        reading = asyncio.create_task(read())
        async with httpx.AsyncClient(base_url=server.http, timeout=5) as client:
            while not stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    body = {"message": repr(time.monotonic()), "user_ids": ["reader"]}
                    await client.post("/api/v1/ws/notification", json=body)
                    sent += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.02)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), 2)  # the last frames
        reading.cancel()
    return sent


async def measure(attack: Attack, server: Server, seconds: float, scale: float) -> Row:
    pid = server.proc.pid
    log_before = server.log_path.stat().st_size
    latencies: list[float] = []
    stop = asyncio.Event()
    reader = asyncio.create_task(healthy_reader(server, stop, latencies))
    await asyncio.sleep(1)  # the reader connected and warm
    rss_before = vm_rss_kib(pid)
    peak = rss_before
    target = Target(server, scale, time.monotonic() + seconds)
    running = asyncio.create_task(attack.run(target))
    while not running.done():
        peak = max(peak, vm_rss_kib(pid))
        await asyncio.wait({running}, timeout=0.1)
    note = running.result()
    stop.set()
    sent = await reader
    await asyncio.sleep(1)
    after = vm_rss_kib(pid)
    warm = latencies[len(latencies) // 20 :] or latencies  # the first twentieth: still connecting
    return Row(
        attack.name,
        (peak - rss_before) / 1024,
        (after - rss_before) / 1024,
        (server.log_path.stat().st_size - log_before) / 1024,
        statistics.median(warm) * 1000 if warm else float("nan"),
        sorted(warm)[int(len(warm) * 0.99)] * 1000 if warm else float("nan"),
        len(latencies),
        sent,
        note,
    )


def run_one(attack: Attack, seconds: float, scale: float) -> Row:
    settings = {"log_level": "info", **attack.settings}
    with run_server(settings, open_files=attack.open_files) as server:
        return asyncio.run(measure(attack, server, seconds, scale))


def table(rows: list[Row]) -> str:
    head = "| attack | RSS peak | RSS after | log | reader p50 | reader p99 | delivered | note |\n" + "|---" * 8 + "|"
    lines = [
        f"| {r.name} | +{r.rss_peak_mb:.1f} MB | +{r.rss_after_mb:.1f} MB | {r.log_kb:.0f} KB | {r.p50_ms:.1f} ms "
        f"| {r.p99_ms:.1f} ms | {r.delivered}/{r.sent} | {r.note} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="size factor: 1 is the issue's sizes")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each attack runs")
    parser.add_argument("--only", nargs="+", metavar="ATTACK", help=f"run these: {', '.join(a.name for a in ATTACKS)}")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the attacker holds thousands of sockets too
    rows = []
    for attack in ATTACKS:
        if args.only and attack.name not in args.only and attack.name != "none":
            continue
        print(f"{attack.name}: {attack.what} ...", file=sys.stderr, flush=True)
        rows.append(run_one(attack, args.seconds, args.scale))
    print(f"\nscale {args.scale:g}, {args.seconds:g} s per attack, {os.cpu_count()} CPUs\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
