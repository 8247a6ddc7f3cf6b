"""`make bench`: diary-ws against the FastAPI tutorial's ConnectionManager, in one run, on this machine.

Each server runs in its own process pinned to core 0; this process, the load generator (picows on uvloop),
pins itself to core 1. For every N it measures, per server:

- handshakes: the server's CPU per handshake while N sockets connect, and its RSS per idle socket;
- fan-out: ROUNDS broadcasts, one at a time, each timed from just before the POST to every socket's receipt
  (last socket p50 over the rounds, every socket's p50/p99), the POST's own latency, the server's CPU per
  delivery;
- a burst: BURST broadcasts sent back to back while another connection polls GET status; deliveries per
  second from the first POST to the last receipt, and the status latency p50/p99 during it;
- targeted sends: POSTs per second naming one connected user;
- correctness: lost, duplicated and reordered messages over everything sent.

Both clocks are CLOCK_MONOTONIC, which is system-wide on Linux. It measures and asserts nothing. `--deflate`
adds one run of diary-ws with PER_MESSAGE_DEFLATE on and clients that negotiate it (the `websockets`
client, as the guide's clients and browsers do); `--soak` runs connect/disconnect churn with publishes
instead and reports RSS over time; `--hostile` runs bench/hostile.py (the attacks of issue 12) instead;
`--chaos SECONDS` runs bench/chaos.py (Redis under faults) instead.

    make bench                                   # N = 1,000, 5,000, 10,000
    make bench BENCH_ARGS=--batch                # bench/batch.py: single POSTs against batches
    make bench BENCH_ARGS=--fair                 # targeted POSTs against the tutorial on uvicorn[standard]
    make bench BENCH_ARGS=--stalls               # bench/stalls.py: stalls and memory at 5k, 10k, 18.5k sockets
    .venv-bench/bin/python -m bench.suite --sockets 1000 --rounds 5
    .venv-bench/bin/python -m bench.suite --servers diary-ws+asyncio diary-ws+uvloop --broker memory  # the loops
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.loadgen import Http, Receipts, close_sockets, open_sockets
from tests.utils import RedisServer, free_port, redis_server, vm_rss_kib, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SERVER_CORE, LOADGEN_CORE = 0, 1
# The servers run from the project's own environment (what `make run` runs: uvloop, but no FastAPI there);
# the baseline needs FastAPI, which lives in the bench's environment only.
PROJECT_PYTHON = os.environ.get("BENCH_PROJECT_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
# The checkout whose diary-ws is measured (`python -m diary_ws` imports from the working directory): another
# one's, with its own BENCH_PROJECT_PYTHON, measures a before against an after with the same load generator.
PROJECT_ROOT = Path(os.environ.get("BENCH_PROJECT_ROOT", str(ROOT)))


@dataclass
class Result:
    server: str
    sockets: int
    handshake_cpu_ms: float | None = None
    rss_kib_per_idle_socket: float | None = None
    last_socket_ms_p50: float | None = None
    per_socket_ms_p50: float | None = None
    per_socket_ms_p99: float | None = None
    post_ms_p50: float | None = None
    cpu_us_per_delivery: float | None = None
    redis_cpu_us_per_delivery: float | None = None  # redis-server's own CPU, Redis mode only
    burst_deliveries_per_s: float | None = None
    status_ms_p50_in_burst: float | None = None
    status_ms_p99_in_burst: float | None = None
    targeted_posts_per_s: float | None = None
    targeted_cpu_us_per_post: float | None = None  # the server's CPU per POST: steadier than the rate on a busy box
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    loadgen_cpu_share: float | None = None  # the load generator's CPU over wall time in the fan-out rounds
    notes: list[str] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, user and system, in nanoseconds' resolution.

    /proc/PID/stat counts whole clock ticks (10 ms), too coarse for a few thousand deliveries; each
    thread's schedstat has its time on a CPU in ns.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def server_child() -> None:
    os.sched_setaffinity(0, {SERVER_CORE})
    raise_nofile()


def start(
    kind: str, port: int, extra_env: dict[str, str], log_level: str | None = "warning", quiet: bool = False
) -> subprocess.Popen[bytes]:
    """Start one server; `log_level` None leaves the server at its own default, `quiet` sends its output to
    /dev/null (the log lines are still formatted and written)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    if kind.startswith("diary-ws"):
        env["DIARY_WS_PORT"] = str(port)
        if log_level is not None:
            env["DIARY_WS_LOG_LEVEL"] = log_level
        env.update(extra_env)  # extra_env may override
        cmd = [PROJECT_PYTHON, "-m", "diary_ws", "serve"]
    elif kind == "fastapi-standard":
        # The tutorial as users deploy it: `pip install "uvicorn[standard]"` and `uvicorn main:app`, so uvloop,
        # httptools and uvicorn's defaults (per-message deflate offered, the access log at info).
        cmd = [sys.executable, "-m", "uvicorn", "bench.baseline:app", "--port", str(port)]
        cmd += [] if log_level is None else ["--log-level", log_level]
    else:
        # The tutorial on uvicorn's own default install (h11), and once more on httptools, the parser diary-ws
        # runs on, so the HTTP figures can be compared parser for parser. Both on the asyncio loop, as diary-ws.
        parser = "httptools" if kind.endswith("+httptools") else "h11"
        cmd = [sys.executable, "-m", "uvicorn", "bench.baseline:app", "--port", str(port), "--log-level", "warning",
               "--loop", "asyncio", "--http", parser, "--ws-per-message-deflate", "false"]  # fmt: skip
    output = subprocess.DEVNULL if quiet else None
    cwd = PROJECT_ROOT if kind.startswith("diary-ws") else ROOT
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, preexec_fn=server_child, stdout=output, stderr=output)

    def up() -> bool:
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return proc.poll() is not None  # a dead server ends the wait; the caller sees it next

    wait_until(up, 20, f"{kind} to listen")
    if proc.poll() is not None:
        raise RuntimeError(f"{kind} exited with {proc.returncode} at start")
    return proc


class Bench:
    """One server, N sockets, and the measurements on them."""

    def __init__(
        self, kind: str, sockets: int, rounds: int, burst: int, extra_env: dict[str, str], redis_pid: int | None = None
    ) -> None:
        self.kind = kind
        self.redis_pid = redis_pid
        self.n = sockets
        self.rounds = rounds
        self.burst = burst
        self.extra_env = extra_env
        self.port = free_port()
        self.receipts = Receipts()
        self.seq = 0
        self.result = Result(kind, sockets)

    async def run(self) -> Result:
        proc = start(self.kind, self.port, self.extra_env)
        try:
            await self._measure(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return self.result

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
            await self._burst(http)
            await self._targeted(pid)
        sent = self.seq
        got = sum(listener.count(sent) for listener in listeners)
        r.lost = self.n * sent - got
        r.duplicated = self.receipts.duplicated
        r.reordered = self.receipts.reordered
        await close_sockets(listeners)

    async def _broadcast(self, http: Http, limit: float = 60) -> tuple[float, float, list[float]]:
        """One broadcast, waited out: (POST start, POST seconds, receipt times)."""
        seq = self.seq
        self.seq += 1
        done = self.receipts.expect(seq, self.n)
        started = time.monotonic()
        status, body = await http.post_json("/api/v1/ws/notification", {"message": f"b {seq}"})
        posted = time.monotonic() - started
        if status != 200:
            self.result.notes.append(f"broadcast {seq}: HTTP {status} {body[:200]!r}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), limit)
        return started, posted, self.receipts.stamps[seq]

    async def _rounds(self, http: Http, pid: int) -> None:
        r = self.result
        last: list[float] = []
        every: list[float] = []
        posts: list[float] = []
        cpu0, own0, wall0 = cpu_seconds(pid), time.process_time(), time.monotonic()
        redis0 = cpu_seconds(self.redis_pid) if self.redis_pid else 0.0
        delivered = 0
        for _ in range(self.rounds):
            started, posted, stamps = await self._broadcast(http)
            posts.append(posted)
            delivered += len(stamps)
            if stamps:
                last.append(max(stamps) - started)
                every.extend(t - started for t in stamps)
        r.cpu_us_per_delivery = (cpu_seconds(pid) - cpu0) / max(delivered, 1) * 1e6
        if self.redis_pid:
            r.redis_cpu_us_per_delivery = (cpu_seconds(self.redis_pid) - redis0) / max(delivered, 1) * 1e6
        r.loadgen_cpu_share = (time.process_time() - own0) / (time.monotonic() - wall0)
        r.last_socket_ms_p50 = statistics.median(last) * 1000 if last else float("nan")
        r.per_socket_ms_p50 = quantile(every, 0.5) * 1000
        r.per_socket_ms_p99 = quantile(every, 0.99) * 1000
        r.post_ms_p50 = statistics.median(posts) * 1000

    async def _burst(self, http: Http) -> None:
        """BURST broadcasts back to back, while another connection polls GET status."""
        r = self.result
        first = self.seq
        events = [self.receipts.expect(first + i, self.n) for i in range(self.burst)]
        polling = True
        status_times: list[float] = []

        async def poll() -> None:
            async with Http("127.0.0.1", self.port) as probe:
                request = probe.request_bytes("GET", "/api/v1/ws/status?limit=10")
                while polling:
                    t0 = time.monotonic()
                    await probe.send(request)
                    status_times.append(time.monotonic() - t0)
                    await asyncio.sleep(0.005)

        poller = asyncio.create_task(poll())
        started = time.monotonic()
        for _ in range(self.burst):
            seq = self.seq
            self.seq += 1
            await http.post_json("/api/v1/ws/notification", {"message": f"b {seq}"})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 120)
        ends = [max(self.receipts.stamps[first + i], default=started) for i in range(self.burst)]
        polling = False
        await poller
        delivered = sum(len(self.receipts.stamps[first + i]) for i in range(self.burst))
        r.burst_deliveries_per_s = delivered / (max(ends) - started)
        r.status_ms_p50_in_burst = quantile(status_times, 0.5) * 1000
        r.status_ms_p99_in_burst = quantile(status_times, 0.99) * 1000

    async def _targeted(self, pid: int, seconds: float = 2.0, connections: int = 4) -> None:
        """POSTs naming one connected user, from a few keep-alive connections at once, for a fixed time."""
        count = 0
        deadline = time.monotonic() + seconds

        async def sender() -> None:
            nonlocal count
            async with Http("127.0.0.1", self.port) as http:
                request = http.request_bytes(
                    "POST", "/api/v1/ws/notification", orjson.dumps({"message": "targeted", "user_ids": ["u0"]})
                )
                while time.monotonic() < deadline:
                    status, _ = await http.send(request)
                    count += status == 200

        started, cpu0 = time.monotonic(), cpu_seconds(pid)
        await asyncio.gather(*(sender() for _ in range(connections)))
        self.result.targeted_posts_per_s = count / (time.monotonic() - started)
        self.result.targeted_cpu_us_per_post = (cpu_seconds(pid) - cpu0) / max(count, 1) * 1e6


async def fair_run(kind: str, log_level: str | None, seconds: float, connections: int = 16) -> Result:
    """Targeted POSTs per second against one listener, from `connections` keep-alive connections: each server
    at `log_level` (None: its own default), its log lines written to /dev/null."""
    bench = Bench(kind, 1, 0, 0, {})
    bench.result.server = f"{kind} @{log_level or 'default'} log level"
    proc = start(kind, bench.port, {}, log_level=log_level, quiet=True)
    try:
        listeners = await open_sockets(f"ws://127.0.0.1:{bench.port}/api/v1/ws", ["u0"], bench.receipts, 1)
        await bench._targeted(proc.pid, seconds=1.0, connections=connections)  # warm-up, not kept
        await bench._targeted(proc.pid, seconds=seconds, connections=connections)
        await close_sockets(listeners)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return bench.result


def fair(seconds: float, rounds: int = 3) -> list[dict[str, Any]]:
    """diary-ws against the tutorial on uvicorn[standard], both at their default log levels, then both at
    warning: `rounds` runs of each, alternating, so that a busy moment of a shared machine falls on both; the
    ratio of the medians of POSTs per second, and of the server CPU per POST (steadier on a busy machine)."""
    import uvloop

    rows = []
    for level in (None, "warning"):
        ours: list[Result] = []
        theirs: list[Result] = []
        for _ in range(rounds):
            ours.append(uvloop.run(fair_run("diary-ws", level, seconds)))
            theirs.append(uvloop.run(fair_run("fastapi-standard", level, seconds)))

        def median(results: list[Result], key: str) -> float:
            return statistics.median(getattr(r, key) or 0.0 for r in results)

        row = {
            "log_level": level or "each server's default (info)",
            "rounds": rounds,
            "seconds": seconds,
            "diary_ws_posts_per_s": [round(r.targeted_posts_per_s or 0) for r in ours],
            "tutorial_posts_per_s": [round(r.targeted_posts_per_s or 0) for r in theirs],
            "ratio_of_medians": median(ours, "targeted_posts_per_s") / median(theirs, "targeted_posts_per_s"),
            "diary_ws_cpu_us_per_post": median(ours, "targeted_cpu_us_per_post"),
            "tutorial_cpu_us_per_post": median(theirs, "targeted_cpu_us_per_post"),
            "cpu_ratio": median(theirs, "targeted_cpu_us_per_post") / median(ours, "targeted_cpu_us_per_post"),
        }
        print(orjson.dumps(row).decode(), flush=True)
        rows.append(row)
    return rows


async def deflate_run(sockets: int, rounds: int) -> Result:
    """diary-ws with PER_MESSAGE_DEFLATE on and `websockets` clients that negotiate it (as browsers do)."""
    from websockets.asyncio.client import connect

    port = free_port()
    proc = start("diary-ws+deflate", port, {"DIARY_WS_PER_MESSAGE_DEFLATE": "1"})
    result = Result("diary-ws+deflate", sockets)
    try:
        rss0, cpu0 = vm_rss_kib(proc.pid), cpu_seconds(proc.pid)
        conns = [await connect(f"ws://127.0.0.1:{port}/api/v1/ws/d{i}", compression="deflate") for i in range(sockets)]
        result.handshake_cpu_ms = (cpu_seconds(proc.pid) - cpu0) / sockets * 1000
        result.rss_kib_per_idle_socket = (vm_rss_kib(proc.pid) - rss0) / sockets
        counts = [0] * sockets
        arrived: dict[int, int] = {}
        complete: dict[int, asyncio.Event] = {k: asyncio.Event() for k in range(rounds)}

        async def reader(i: int) -> None:
            async for _ in conns[i]:
                k = counts[i]
                counts[i] += 1
                arrived[k] = arrived.get(k, 0) + 1
                if arrived[k] == sockets and k in complete:
                    complete[k].set()

        readers = [asyncio.create_task(reader(i)) for i in range(sockets)]
        last: list[float] = []
        async with Http("127.0.0.1", port) as http:
            cpu0 = cpu_seconds(proc.pid)
            for k in range(rounds):
                started = time.monotonic()
                await http.post_json("/api/v1/ws/notification", {"message": f"b {k}"})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(complete[k].wait(), 60)
                last.append(time.monotonic() - started)
            result.cpu_us_per_delivery = (cpu_seconds(proc.pid) - cpu0) / (sockets * rounds) * 1e6
        result.last_socket_ms_p50 = statistics.median(last) * 1000
        result.lost = sockets * rounds - sum(counts)
        result.notes.append("websockets client: its own CPU bounds the latency; compare CPU and RSS")
        for task in readers:
            task.cancel()
        for ws in conns:
            await ws.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    return result


async def soak(minutes: float, sockets: int, churn_per_s: int, publish_per_s: int) -> dict[str, Any]:
    """Connect/disconnect churn with publishes; RSS sampled every 10 s."""
    port = free_port()
    proc = start("diary-ws", port, {})
    receipts = Receipts()
    samples: list[tuple[float, int]] = []
    try:
        pool = await open_sockets(f"ws://127.0.0.1:{port}/api/v1/ws", [f"s{i}" for i in range(sockets)], receipts, 64)
        started = time.monotonic()
        next_sample = started
        rng = random.Random(1)
        made = sockets
        async with Http("127.0.0.1", port) as http:
            publish = http.request_bytes("POST", "/api/v1/ws/notification", orjson.dumps({"message": "soak"}))
            while (now := time.monotonic()) - started < minutes * 60:
                if now >= next_sample:
                    samples.append((now - started, vm_rss_kib(proc.pid)))
                    next_sample += 10
                leaving = [pool.pop(rng.randrange(len(pool))) for _ in range(churn_per_s // 10)]
                await close_sockets(leaving)
                users = [f"s{made + i}" for i in range(len(leaving))]
                made += len(leaving)
                pool += await open_sockets(f"ws://127.0.0.1:{port}/api/v1/ws", users, receipts, 64)
                for _ in range(max(1, publish_per_s // 10)):
                    await http.send(publish)
                await asyncio.sleep(0.1)
        samples.append((time.monotonic() - started, vm_rss_kib(proc.pid)))
        await close_sockets(pool)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    # Growth is counted from the first minute on: the first samples include the allocator warming up.
    base = next((rss for t, rss in samples if t >= 60), samples[0][1])
    return {
        "minutes": minutes, "sockets": sockets, "churn_per_s": churn_per_s, "publish_per_s": publish_per_s,
        "sockets_opened": made, "frames_received": receipts.frames,
        "rss_kib": samples, "growth_pct_after_first_minute": (samples[-1][1] - base) / base * 100,
    }  # fmt: skip


COLUMNS = [f.name for f in Result.__dataclass_fields__.values() if f.name not in ("server", "sockets", "notes")]


def fmt(value: object, cell: int) -> str:
    if isinstance(value, float):
        return f"{value:>{cell}.2f}"
    return f"{'-' if value is None else value:>{cell}}"


def table(results: list[Result]) -> str:
    heads = [f"{r.server} @{r.sockets}" for r in results]
    width = max(len(c) for c in COLUMNS)
    cell = max(12, *(len(h) for h in heads))
    lines = [f"{'':{width}}  " + "  ".join(f"{h:>{cell}}" for h in heads)]
    for key in COLUMNS:
        values = [getattr(r, key) for r in results]
        lines.append(f"{key:{width}}  " + "  ".join(fmt(v, cell) for v in values))
    for r in results:
        lines.extend(f"note ({r.server} @{r.sockets}): {n}" for n in r.notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--servers", nargs="+", default=["diary-ws", "fastapi-tutorial", "fastapi-tutorial+httptools"])
    parser.add_argument("--broker", choices=["memory", "redis"], nargs="+", default=["memory", "redis"],
                        help="diary-ws broker(s) to measure; redis starts its own redis-server")  # fmt: skip
    parser.add_argument("--deflate", action="store_true", help="also measure per-message deflate at 1,000 sockets")
    parser.add_argument("--soak", type=float, metavar="MINUTES", help="run the churn soak instead (10 is the spec)")
    parser.add_argument("--chaos", type=float, metavar="SECONDS",
                        help="run the Redis chaos run (bench/chaos.py) for this long instead")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "bench.json")
    parser.add_argument("--batch", action="store_true", help="run bench/batch.py instead: single POSTs against "
                        "batches of 100 and 1,000 (its own flags follow --batch)")  # fmt: skip
    parser.add_argument("--cluster", action="store_true",
                        help="run bench/cluster_sim.py instead (its own flags follow --cluster)")  # fmt: skip
    parser.add_argument("--hostile", action="store_true", help="run the hostile benchmark (bench/hostile.py) instead")
    parser.add_argument("--hostile-scale", type=float, default=1.0, help="its size factor (1: the issue's sizes)")
    parser.add_argument("--hostile-seconds", type=float, default=20.0, help="how long each of its attacks runs")
    parser.add_argument("--fair", type=float, nargs="?", const=10.0, metavar="SECONDS",
                        help="targeted POSTs against the tutorial on uvicorn[standard], at each server's default log "
                        "level and both at warning (SECONDS each, 10 by default)")  # fmt: skip
    parser.add_argument("--stalls", action="store_true", help="run bench/stalls.py instead: 5k, 10k and 18.5k "
                        "idle sockets under reconnects, POSTs, broadcasts and status polls (all other flags are "
                        "its own: --sockets, --seconds, --slope-seconds, --env, --out)")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    if args.stalls:
        from bench import stalls

        return stalls.main([arg for arg in (sys.argv[1:] if argv is None else argv) if arg != "--stalls"])
    if args.hostile:
        from bench import hostile

        return hostile.main(["--scale", str(args.hostile_scale), "--seconds", str(args.hostile_seconds)])
    if args.chaos:
        from bench import chaos

        return chaos.main(["--seconds", str(args.chaos)])
    if args.batch:
        from bench import batch

        return batch.main(rest)
    if args.cluster:
        from bench import cluster_sim

        return cluster_sim.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    os.sched_setaffinity(0, {LOADGEN_CORE % (os.cpu_count() or 1)})
    raise_nofile()
    import uvloop

    if args.fair is not None:
        rows = fair(args.fair)
        args.out.parent.mkdir(exist_ok=True)
        args.out.with_name("fair.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
        return 0
    if args.soak:
        report = uvloop.run(soak(args.soak, 1000, 100, 20))
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        args.out.parent.mkdir(exist_ok=True)
        args.out.with_name("soak.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        return 0
    results: list[Result] = []
    # A fresh load generator's first run is slower whichever server it meets: throw a short one away.
    uvloop.run(Bench(args.servers[0], 200, 3, 3, {}).run())
    brokers = list(args.broker)
    if "redis" in brokers and shutil.which("redis-server") is None:
        print("redis-server not found: Redis mode skipped (install Debian's redis-server package)")
        brokers.remove("redis")
    for n in args.sockets:
        for kind in args.servers:
            for broker in brokers if kind == "diary-ws" else ["memory"]:
                with contextlib.ExitStack() as stack:
                    env: dict[str, str] = {}
                    label, redis_pid = kind, None
                    loop = kind.partition("+")[2] if kind.startswith("diary-ws+") else ""
                    if loop in ("asyncio", "uvloop"):  # diary-ws+asyncio, diary-ws+uvloop: the LOOP setting
                        env["DIARY_WS_LOOP"] = loop
                    if broker == "redis":
                        redis: RedisServer = stack.enter_context(redis_server())
                        assert redis.proc is not None
                        # The server side shares core 0, as a co-located Redis would.
                        os.sched_setaffinity(redis.proc.pid, {SERVER_CORE})
                        env["DIARY_WS_BROKER_URL"] = redis.url
                        label, redis_pid = "diary-ws+redis", redis.proc.pid
                    results.append(uvloop.run(Bench(label, n, args.rounds, args.burst, env, redis_pid).run()))
                    print(table(results[-1:]), flush=True)
    if args.deflate:
        results.append(uvloop.run(deflate_run(1000, args.rounds)))
    print("\n" + table(results))
    args.out.parent.mkdir(exist_ok=True)
    out = {"machine": {"cpus": os.cpu_count(), "uname": os.uname().release}, "results": [asdict(r) for r in results]}
    args.out.write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
