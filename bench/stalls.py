"""`make bench BENCH_ARGS=--stalls`: event-loop stalls and memory with many idle sockets on one core.

For each N (5,000, 10,000 and 18,500 by default) one diary-ws process, pinned to core 0 at
`LOG_LEVEL=warning`, gets:

- a connect storm: N sockets, 200 handshakes in flight, from holder processes (picows, each under its own
  open-file limit) pinned to core 1; timed from the first connect to the last handshake;
- then, for SECONDS (the largest N; the others get at most `--slope-seconds`), while the N sockets stay open:
  about 100 reconnects a second (a pool of 100 extra sockets, each closed and opened again in turn), 500
  POSTs a second each naming one idle user, one broadcast a second to everybody, and `GET
  /api/v1/ws/status?limit=10` every 10 ms from one keep-alive connection.

It reports the longest stall and p99.9 from inside (the `diary_ws_event_loop_stall_seconds` histogram on
`/metrics`, bucket bounds) and from outside (the status poll's own latency), RSS before the storm, after it
and at the end (growth over the run), RSS per idle socket, the server's CPU share (during the storm too),
and the messages each side counted. At the end the holders drop every idle socket at once (a FIN each, no
close frame): how long the server took to let them go, and its longest stall meanwhile. Then the slope
against N and what it projects for 100,000 sockets. It writes `bench/results/stalls.json`. It measures and
asserts nothing.

    make bench BENCH_ARGS="--stalls"                                  # 5k, 10k (60 s each), 18.5k (300 s)
    .venv-bench/bin/python -m bench.suite --stalls --stalls-sockets 18500 --stalls-seconds 30
    .venv-bench/bin/python -m bench.stalls --sockets 5000 --seconds 20 --env DIARY_WS_GC_FREEZE=off
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from bench.loadgen import Http
from bench.suite import LOADGEN_CORE, RESULTS, cpu_seconds, quantile, raise_nofile, start
from tests.utils import vm_rss_kib

ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT = 200  # handshakes in flight during the storm, over all holders
SOCKETS_PER_ADDRESS = 5_000  # storm sockets per loopback source address (127.0.0.2, .3, ...)
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; the socket module does not name it
PER_HOLDER = 9_500  # sockets per holder process: each holder's descriptors stay well inside 20,000
CHURN_POOL = 100
RECONNECTS_PER_S = 100
POSTS_PER_S = 500
POST_CONNECTIONS = 4
STATUS_EVERY = 0.01
BUCKET_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


# --- the holder: a process that opens its share of the idle sockets and counts what they receive ----------


def bound_socket(i: int) -> socket.socket:
    """Socket `i` of the storm, bound to a loopback source address of its own, SOCKETS_PER_ADDRESS to each,
    with its port left to connect() (IP_BIND_ADDRESS_NO_PORT).

    From one address to one server port, every socket needs a local port of its own out of the 28,232 of
    `ip_local_port_range`, and Linux gives connect() the even ones first: past about 14,000 sockets each
    connect scanned the full even half in the holder's kernel, and the storm to 18,500 ran at 1,000 to
    1,400 a second with the server at 0.68 of its core. Real clients come from many addresses. The port
    is chosen by connect(), not bind(): bind() would also avoid every port an earlier run left in
    TIME_WAIT (the storm to 10,000 after the one to 5,000 fell to 1,055 a second, the server at 0.48).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((f"127.0.0.{2 + i // SOCKETS_PER_ADDRESS}", 0))
    sock.setblocking(False)
    return sock


class Idle(WSListener):  # type: ignore[misc]  # picows ships no type information
    """One idle socket: counts broadcasts (`b <k>`) and targeted messages, answers close."""

    counts = [0, 0]  # broadcasts, others: over every socket of the process

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            Idle.counts[0 if b'"message":"b ' in frame.get_payload_as_bytes() else 1] += 1
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def hold(port: int, first: int, count: int, in_flight: int) -> None:
    """Wait for `go` on stdin, connect users u<first>..., report, then hold until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("up", flush=True)
    await reader.readline()  # "go"
    gate = asyncio.Semaphore(in_flight)
    failed = 0
    transports: list[WSTransport] = []

    async def one(i: int) -> None:
        nonlocal failed
        async with gate:
            try:
                transport, _ = await ws_connect(
                    Idle, f"ws://127.0.0.1:{port}/api/v1/ws/u{i}", socket_factory=lambda _url: bound_socket(i)
                )
                transports.append(transport)
            except Exception:  # counted and reported, the storm goes on
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(first, first + count)))
    print(orjson.dumps({"started": started, "ended": time.monotonic(), "failed": failed}).decode(), flush=True)
    await reader.read()  # until the orchestrator closes stdin
    print(orjson.dumps({"broadcasts": Idle.counts[0], "others": Idle.counts[1]}).decode(), flush=True)
    for transport in transports:
        transport.disconnect(graceful=False)


# --- the orchestrator ------------------------------------------------------------------------------------


@dataclass
class Run:
    sockets: int
    seconds: float
    env: dict[str, str]
    storm_seconds: float | None = None
    handshakes_per_s: float | None = None
    storm_failed: int = 0
    storm_cpu_share: float | None = None  # the server's CPU seconds per second of the storm: 1.0 is its core full
    storm_longest_stall_bucket_s: float | None = None
    rss_mb_before: float | None = None
    rss_mb_after_storm: float | None = None
    rss_mb_end: float | None = None
    rss_kib_per_idle_socket: float | None = None
    rss_growth_pct: float | None = None
    rss_growth_pct_after_first_minute: float | None = None
    rss_mb_samples: list[tuple[float, float]] = field(default_factory=list)
    stall_ticks: int = 0
    stall_longest_bucket_s: float | None = None  # the upper bound of the highest bucket that counted a tick
    stall_p999_bucket_s: float | None = None
    stall_over_20ms: int = 0
    stall_over_50ms: int = 0
    stall_histogram: list[tuple[float, int]] = field(default_factory=list)
    status_polls: int = 0
    status_ms_p50: float | None = None
    status_ms_p99: float | None = None
    status_ms_p999: float | None = None
    status_ms_max: float | None = None
    reconnects: int = 0
    reconnects_failed: int = 0
    posts: int = 0
    posts_not_200: int = 0
    broadcasts: int = 0
    broadcast_deliveries_expected: int = 0
    broadcast_deliveries_counted: int = 0
    drop_seconds: float | None = None  # every idle socket dropped at once: until the server let them go
    drop_longest_stall_bucket_s: float | None = None
    server_cpu_share: float | None = None
    server_runqueue_share: float | None = None  # time the server waited for a CPU: other processes' doing
    frozen_samples: list[tuple[float, float]] = field(default_factory=list)
    gc_collections: list[int] = field(default_factory=list)  # generations 0, 1, 2 (full) in the steady phase
    gc_longest_pause_bucket_s: list[float | None] = field(default_factory=list)
    gc_frozen_objects_end: float | None = None
    notes: list[str] = field(default_factory=list)


def runqueue_seconds(pid: int) -> float:
    """Time every thread of a process has spent runnable but waiting for a CPU (schedstat's second field): on
    a shared box, the stalls other processes put into the figures."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def spawn_holder(python: str, port: int, first: int, count: int, in_flight: int) -> subprocess.Popen[bytes]:
    command = [python, "-m", "bench.stalls", "--hold", str(port), str(first), str(count), str(in_flight)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)


def stall_counts(metrics_text: str, family: str = "diary_ws_event_loop_stall_seconds", match: str = "") -> list[int]:
    """Per-bucket (not cumulative) counts of a histogram with the stall buckets, in BUCKET_BOUNDS order, summed
    over the series whose line contains `match`."""
    cumulative = [0] * len(BUCKET_BOUNDS)
    for line in metrics_text.splitlines():
        if not line.startswith(family + "_bucket") or match not in line:
            continue
        le = re.search(r'le="([^"]+)"', line)
        assert le is not None
        bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
        cumulative[BUCKET_BOUNDS.index(bound)] += int(float(line.rsplit(" ", 1)[1]))
    return [c - (cumulative[i - 1] if i else 0) for i, c in enumerate(cumulative)]


def gauge(metrics_text: str, name: str) -> float | None:
    for line in metrics_text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def gc_figures(run: Run, before: str, after: str) -> None:
    """The collector's own share over the steady phase: full collections, and the longest pause by generation."""
    for generation in range(3):
        label = f'generation="{generation}"'
        counts = [
            a - b
            for a, b in zip(
                stall_counts(after, "diary_ws_gc_pause_seconds", label),
                stall_counts(before, "diary_ws_gc_pause_seconds", label),
                strict=True,
            )
        ]
        run.gc_longest_pause_bucket_s.append(longest(counts))
        run.gc_collections.append(sum(counts))
    run.gc_frozen_objects_end = gauge(after, "diary_ws_gc_frozen_objects")


async def mass_drop(run: Run, port: int, before: bytes) -> None:
    """The holders have just dropped every idle socket at once (each sends a FIN, no close frame): a proxy
    restarting, a network blip. How long until the server has let them all go, and its longest stall."""
    started = time.monotonic()
    while time.monotonic() - started < 60:
        _, text = await scrape(port)
        if (gauge(text.decode(), "diary_ws_connections") or 0) <= run.sockets // 100:
            run.drop_seconds = time.monotonic() - started
            break
        await asyncio.sleep(0.1)
    _, after = await scrape(port)
    counts = [a - b for a, b in zip(stall_counts(after.decode()), stall_counts(before.decode()), strict=True)]
    run.drop_longest_stall_bucket_s = longest(counts)


def longest(counts: list[int]) -> float | None:
    top = [bound for bound, count in zip(BUCKET_BOUNDS, counts, strict=True) if count]
    return top[-1] if top else None


def bucket_quantile(counts: list[int], q: float) -> float | None:
    total = sum(counts)
    if not total:
        return None
    need, seen = total * q, 0
    for bound, count in zip(BUCKET_BOUNDS, counts, strict=True):
        seen += count
        if seen >= need:
            return bound
    return BUCKET_BOUNDS[-1]


class Churn(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def scrape(port: int) -> tuple[int, bytes]:
    """GET /metrics on a connection of its own (a kept one would meet the keep-alive timeout between scrapes)."""
    async with Http("127.0.0.1", port) as http:
        return await http.get("/metrics")


async def paced(rate: float, deadline: float, step: Any) -> None:
    """Call `await step(k)` about `rate` times a second until `deadline`, catching up after a slow step."""
    started = time.monotonic()
    k = 0
    while (now := time.monotonic()) < deadline:
        due = started + k / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        await step(k)
        k += 1


async def measure(n: int, seconds: float, env: dict[str, str], holders_python: str) -> Run:
    run = Run(n, seconds, env)
    from tests.utils import free_port

    port = free_port()
    proc = start("diary-ws", port, env)
    pid = proc.pid
    holders: list[subprocess.Popen[bytes]] = []
    try:
        count = -(-n // PER_HOLDER)
        shares = [n // count + (i < n % count) for i in range(count)]
        first = 0
        for share in shares:
            holders.append(spawn_holder(holders_python, port, first, share, IN_FLIGHT // count))
            first += share
        for holder in holders:
            assert holder.stdout is not None
            assert (await asyncio.to_thread(holder.stdout.readline)).strip() == b"up"
        _, before = await scrape(port)
        run.rss_mb_before = vm_rss_kib(pid) / 1024
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        for holder in holders:
            assert holder.stdin is not None
            holder.stdin.write(b"go\n")
            holder.stdin.flush()
        reports = []
        for holder in holders:
            assert holder.stdout is not None
            reports.append(orjson.loads(await asyncio.to_thread(holder.stdout.readline)))
        run.storm_cpu_share = (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
        run.storm_seconds = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
        run.storm_failed = sum(r["failed"] for r in reports)
        run.handshakes_per_s = (n - run.storm_failed) / run.storm_seconds
        await asyncio.sleep(1)  # the last handshakes' objects settle
        rss1 = vm_rss_kib(pid)
        run.rss_mb_after_storm = rss1 / 1024
        run.rss_kib_per_idle_socket = (rss1 - run.rss_mb_before * 1024) / n
        _, after_storm = await scrape(port)
        storm = [a - b for a, b in zip(stall_counts(after_storm.decode()), stall_counts(before.decode()),
                                       strict=True)]  # fmt: skip
        run.storm_longest_stall_bucket_s = longest(storm)
        await steady(run, port, pid)
        _, end = await scrape(port)
        counts = [a - b for a, b in zip(stall_counts(end.decode()), stall_counts(after_storm.decode()),
                                        strict=True)]  # fmt: skip
        run.stall_histogram = list(zip(BUCKET_BOUNDS, counts, strict=True))
        gc_figures(run, after_storm.decode(), end.decode())
        run.stall_ticks = sum(counts)
        run.stall_longest_bucket_s = longest(counts)
        run.stall_p999_bucket_s = bucket_quantile(counts, 0.999)
        run.stall_over_20ms = sum(c for b, c in zip(BUCKET_BOUNDS, counts, strict=True) if b > 0.02)
        run.stall_over_50ms = sum(c for b, c in zip(BUCKET_BOUNDS, counts, strict=True) if b > 0.05)
        rss2 = vm_rss_kib(pid)
        run.rss_mb_end = rss2 / 1024
        run.rss_growth_pct = (rss2 - rss1) / rss1 * 100
        minute = [mb for at, mb in run.rss_mb_samples if at >= 60]
        if minute and seconds > 90:
            run.rss_growth_pct_after_first_minute = (rss2 / 1024 - minute[0]) / minute[0] * 100
        counted = 0
        _, before_drop = await scrape(port)
        for holder in holders:
            assert holder.stdin is not None
            assert holder.stdout is not None
            holder.stdin.close()
            counted += orjson.loads(await asyncio.to_thread(holder.stdout.readline))["broadcasts"]
        run.broadcast_deliveries_counted = counted
        await mass_drop(run, port, before_drop)
    finally:
        for holder in holders:
            with contextlib.suppress(Exception):
                holder.wait(20)
            if holder.poll() is None:
                holder.kill()
                holder.wait(5)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return run


async def steady(run: Run, port: int, pid: int) -> None:
    """SECONDS of reconnects, targeted POSTs, broadcasts and status polls, all at once."""
    url = f"ws://127.0.0.1:{port}/api/v1/ws"
    pool: list[tuple[WSTransport, Churn] | None] = [None] * CHURN_POOL
    for i in range(CHURN_POOL):
        pool[i] = await ws_connect(Churn, f"{url}/c{i}")
    cpu0, wait0, wall0 = cpu_seconds(pid), runqueue_seconds(pid), time.monotonic()
    deadline = wall0 + run.seconds
    status_times: list[float] = []
    rng = random.Random(15)

    async def reconnect(k: int) -> None:
        i = k % CHURN_POOL
        old = pool[i]
        pool[i] = None
        if old is not None:
            old[0].send_close(WSCloseCode.OK)  # picows' default, 1005, must not be sent: a protocol error
            old[0].disconnect()
        try:
            pool[i] = await ws_connect(Churn, f"{url}/c{i}")
            run.reconnects += 1
        except Exception:  # counted
            run.reconnects_failed += 1

    async def reconnects() -> None:
        running: set[asyncio.Task[None]] = set()

        async def step(k: int) -> None:
            task = asyncio.create_task(reconnect(k))
            running.add(task)
            task.add_done_callback(running.discard)

        await paced(RECONNECTS_PER_S, deadline, step)
        await asyncio.gather(*running)

    async def poster() -> None:
        async with Http("127.0.0.1", port) as conn:

            async def step(_k: int) -> None:
                body = orjson.dumps({"message": "t", "user_ids": [f"u{rng.randrange(run.sockets)}"]})
                status, _ = await conn.send(conn.request_bytes("POST", "/api/v1/ws/notification", body))
                run.posts += 1
                run.posts_not_200 += status != 200

            await paced(POSTS_PER_S / POST_CONNECTIONS, deadline, step)

    async def broadcaster() -> None:
        async with Http("127.0.0.1", port) as conn:

            async def step(k: int) -> None:
                status, _ = await conn.post_json("/api/v1/ws/notification", {"message": f"b {k}"})
                run.broadcasts += status == 200

            await paced(1, deadline, step)

    async def poller() -> None:
        async with Http("127.0.0.1", port) as conn:
            request = conn.request_bytes("GET", "/api/v1/ws/status?limit=10")
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                await conn.send(request)
                status_times.append(time.monotonic() - t0)
                await asyncio.sleep(STATUS_EVERY)

    async def rss() -> None:
        while (now := time.monotonic()) < deadline:
            run.rss_mb_samples.append((round(now - wall0, 1), round(vm_rss_kib(pid) / 1024, 1)))
            _, text = await scrape(port)
            run.frozen_samples.append((round(now - wall0, 1), gauge(text.decode(), "diary_ws_gc_frozen_objects") or 0))
            await asyncio.sleep(min(10, deadline - now))

    await asyncio.gather(reconnects(), broadcaster(), poller(), rss(), *(poster() for _ in range(POST_CONNECTIONS)))
    run.server_cpu_share = (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
    run.server_runqueue_share = (runqueue_seconds(pid) - wait0) / (time.monotonic() - wall0)
    run.broadcast_deliveries_expected = run.broadcasts * run.sockets
    run.status_polls = len(status_times)
    run.status_ms_p50 = quantile(status_times, 0.5) * 1000
    run.status_ms_p99 = quantile(status_times, 0.99) * 1000
    run.status_ms_p999 = quantile(status_times, 0.999) * 1000
    run.status_ms_max = max(status_times, default=float("nan")) * 1000
    for entry in pool:
        if entry is not None:
            entry[0].disconnect(graceful=False)


def slope(runs: list[Run]) -> dict[str, Any]:
    """Least-squares lines of RSS per socket, longest outside stall and p99.9 against N, and 100k on them."""
    if len(runs) < 2:
        return {}

    def line(ys: list[float]) -> tuple[float, float]:
        xs = [float(r.sockets) for r in runs]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        k = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        return k, my - k * mx

    out: dict[str, Any] = {}
    for name, ys in (
        ("rss_mb_after_storm", [r.rss_mb_after_storm or 0.0 for r in runs]),
        ("status_ms_max", [r.status_ms_max or 0.0 for r in runs]),
        ("status_ms_p999", [r.status_ms_p999 or 0.0 for r in runs]),
    ):
        k, b = line(ys)
        out[name] = {"per_1000_sockets": round(k * 1000, 3), "at_100k": round(k * 100_000 + b, 1)}
    return out


def table(runs: list[Run]) -> str:
    def f(v: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    def b(v: float | None) -> str:
        return "-" if v is None else f"≤{v * 1000:g} ms"

    rows: list[tuple[str, Callable[[Run], str]]] = [
        ("connect storm: seconds / handshakes per s",
         lambda r: f"{f(r.storm_seconds)} s / {f(r.handshakes_per_s, '{:,.0f}')}"),
        ("server CPU share during the storm", lambda r: f(r.storm_cpu_share, "{:.2f}")),
        ("longest stall during the storm (histogram)", lambda r: b(r.storm_longest_stall_bucket_s)),
        ("steady seconds", lambda r: f(r.seconds, "{:.0f}")),
        ("longest stall (histogram bucket)", lambda r: b(r.stall_longest_bucket_s)),
        ("stall p99.9 (histogram bucket)", lambda r: b(r.stall_p999_bucket_s)),
        ("stall ticks over 20 / 50 ms", lambda r: f"{r.stall_over_20ms} / {r.stall_over_50ms} of {r.stall_ticks}"),
        ("status p50 / p99 / p99.9 / max, ms", lambda r: " / ".join(
            f(v) for v in (r.status_ms_p50, r.status_ms_p99, r.status_ms_p999, r.status_ms_max))),
        ("RSS before / after storm / end, MB", lambda r: " / ".join(
            f(v) for v in (r.rss_mb_before, r.rss_mb_after_storm, r.rss_mb_end))),
        ("RSS growth over the run (after 1st min)", lambda r: f"{f(r.rss_growth_pct, '{:+.1f}')}% "
         f"({f(r.rss_growth_pct_after_first_minute, '{:+.1f}')}%)"),
        ("RSS per idle socket, KiB", lambda r: f(r.rss_kib_per_idle_socket)),
        ("reconnects / POSTs / broadcasts per s", lambda r: " / ".join(
            f(v / r.seconds, "{:.0f}") for v in (r.reconnects, r.posts, r.broadcasts))),
        ("server CPU share / waiting for a CPU", lambda r: f"{f(r.server_cpu_share, '{:.2f}')} / "
         f"{f(r.server_runqueue_share, '{:.2f}')}"),
        ("GC collections, generation 0 / 1 / 2", lambda r: " / ".join(str(c) for c in r.gc_collections)),
        ("longest GC pause, generation 0 / 1 / 2", lambda r: " / ".join(b(v) for v in r.gc_longest_pause_bucket_s)),
        ("objects frozen at the end", lambda r: f(r.gc_frozen_objects_end, "{:,.0f}")),
        ("broadcast deliveries counted / expected",
         lambda r: f"{r.broadcast_deliveries_counted:,} / {r.broadcast_deliveries_expected:,}"),
        ("failed: handshakes, reconnects, POSTs not 200",
         lambda r: f"{r.storm_failed}, {r.reconnects_failed}, {r.posts_not_200}"),
        ("every idle socket dropped at once: seconds to let go / longest stall",
         lambda r: f"{f(r.drop_seconds)} s / {b(r.drop_longest_stall_bucket_s)}"),
    ]  # fmt: skip
    head = "| | " + " | ".join(f"{r.sockets:,} sockets" for r in runs) + " |"
    lines = [head, "|---" * (len(runs) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(get(r) for r in runs) + " |" for name, get in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.stalls", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, nargs="+", default=[5_000, 10_000, 18_500])
    parser.add_argument("--seconds", type=float, default=300, help="steady phase at the largest N")
    parser.add_argument("--slope-seconds", type=float, default=60, help="steady phase at the smaller Ns, at most")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="extra server settings")
    parser.add_argument("--out", type=Path, default=RESULTS / "stalls.json")
    parser.add_argument("--hold", nargs=4, type=int, metavar=("PORT", "FIRST", "COUNT", "IN_FLIGHT"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {LOADGEN_CORE % (os.cpu_count() or 1)})
    raise_nofile()
    import uvloop

    if args.hold:
        uvloop.run(hold(*args.hold))
        return 0
    env = dict(item.split("=", 1) for item in args.env)
    runs: list[Run] = []
    top = max(args.sockets)
    for n in sorted(args.sockets):
        seconds = args.seconds if n == top else min(args.seconds, args.slope_seconds)
        runs.append(uvloop.run(measure(n, seconds, env, sys.executable)))
        print(table(runs[-1:]), flush=True)
    print("\n" + table(runs))
    lines = slope(runs)
    if lines:
        print("\nslope (least squares over the runs):", orjson.dumps(lines).decode())
    args.out.parent.mkdir(exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count()}, "env": env, "runs": [asdict(r) for r in runs], "slope": lines}
    args.out.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
