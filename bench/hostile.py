"""The hostile benchmark: each attack of issue 12 against a fresh server, beside a run with no attack.

For every attack in `ATTACKS` it starts `diary-ws serve` (from the project's environment, with the attack's
settings), connects one healthy WebSocket reader, publishes to it every 20 ms, runs the attack for
`--seconds`, and prints: the server's RSS growth (peak during the attack, and after it), the bytes it
logged, and the reader's delivery latency p50/p99 (POST sent to frame received) with how many arrived. It
measures and asserts nothing; the bounds themselves are asserted by tests/test_edge_http.py,
tests/test_edge_frames.py and tests/test_replay_bounds.py.

`ATTACKS` is a table: to add an attack, write `async def my_attack(target: Target) -> str` (it runs until
`target.deadline`, and returns a note for the table) and append an `Attack` row. Sizes are the issue's at
`--scale 1`; `--scale 0.1` divides every count and byte size by ten.

    python -m bench.hostile --scale 0.25 --seconds 10      # modest
    make bench BENCH_ARGS=--hostile                      # through the suite
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
    # Run before the figures' baseline is taken (e.g. filling the history a resume attack replays).
    prepare: Callable[[Server, float], Coroutine[Any, Any, None]] | None = None


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


# --- WebSocket frames, replay and history ------------------------------------------------------------------


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _ws_open(port: int, path: str, rcvbuf: int | None = None) -> Stream:
    """A WebSocket handshake over a bare connection; the reader is left just after the 101 head."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer


def _frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    """One masked client frame (payloads under 126 bytes)."""
    mask = os.urandom(4)
    return (
        bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)])
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


async def fill_history(server: Server, count: int, size: int, to_keeper: bool = False) -> None:
    """Publish `count` broadcasts (or messages to the keeper only) of about `size` bytes, with a keeper
    listening so that none is a 404."""
    async with connect(f"{server.ws}/api/v1/ws/keeper", max_size=None) as keeper:
        reading = asyncio.create_task(_drain_ws(keeper))
        async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
            body: dict[str, Any] = {"message": "€" * (size // 3) if size > 10_000 else "x" * size}
            if to_keeper:
                body["user_ids"] = ["keeper"]  # not to the healthy reader, whose frames carry their send time

            async def worker(share: int) -> None:
                for _ in range(share):
                    await client.post("/api/v1/ws/notification", json=body)

            await asyncio.gather(*(worker(count // 16 + (i < count % 16)) for i in range(16)))
        reading.cancel()


async def _drain_ws(ws: Any) -> None:
    with contextlib.suppress(Exception):
        while True:
            await ws.recv()


async def _prepare_resume(server: Server, scale: float) -> None:
    await fill_history(server, max(1, int(10_000 * scale)), 1000)


async def resume_flood(target: Target) -> str:
    """100 sockets resuming with ?since=0-0 over the 10k x 1 KB history, never reading."""
    held: list[Stream] = []
    for i in range(target.count(100)):
        with contextlib.suppress(OSError, TimeoutError):
            held.append(await _ws_open(target.server.port, f"/api/v1/ws/resumer-{i}?since=0-0", rcvbuf=4096))
    await asyncio.sleep(max(0.0, target.left()))
    for _reader, writer in held:
        writer.close()
    return f"{len(held)} never-reading resumes"


async def resume_reconnects(target: Target) -> str:
    """Reconnects with ?since=0-0 at about 10 a second, each hanging up after 0.1 s."""
    done = 0
    while target.left() > 0:
        with contextlib.suppress(OSError, TimeoutError):
            _reader, writer = await _ws_open(target.server.port, f"/api/v1/ws/looper-{done % 4}?since=0-0")
            await asyncio.sleep(0.1)
            writer.close()
            done += 1
    return f"{done} resumes"


async def big_history(target: Target) -> str:
    """10k messages of 196 KB each (the longest message, 3-byte characters), within the POST limits."""
    started = time.monotonic()
    count = target.count(10_000)
    task = asyncio.create_task(fill_history(target.server, count, 196_000, to_keeper=True))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), max(0.1, target.left()))
    if not task.done():
        task.cancel()
        return f"stopped at the deadline ({time.monotonic() - started:.0f} s) of {count} messages"
    return f"{count} messages published"


async def _frame_flood(target: Target, name: str, chunk: bytes) -> str:
    """Flood `chunk` from a peer that reads nothing, reconnecting each time the server ends it."""
    ended = 0
    while target.left() > 0:
        try:
            _reader, writer = await _ws_open(target.server.port, f"/api/v1/ws/{name}", rcvbuf=4096)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        try:
            while target.left() > 0:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), max(0.1, target.left()))
        except (OSError, TimeoutError):
            ended += 1
        finally:
            writer.close()
    return f"{ended} connections ended by the server"


async def ping_flood(target: Target) -> str:
    return await _frame_flood(target, "pinger", _frame(0x9, b"p" * 125) * 200)


async def pong_flood(target: Target) -> str:
    return await _frame_flood(target, "ponger", _frame(0xA, b"q" * 10) * 500)


async def continuation_flood(target: Target) -> str:
    return await _frame_flood(target, "continuer", _frame(0x1, b"a", fin=False) + _frame(0x0, b"", fin=False) * 2000)


async def tiny_frames(target: Target) -> str:
    return await _frame_flood(target, "tiny", _frame(0x1, b"x") * 2000)


async def invalid_utf8(target: Target) -> str:
    """1,000 text frames with invalid UTF-8, 25 a connection, over and over."""
    frames = 0
    while target.left() > 0:
        with contextlib.suppress(OSError, TimeoutError):
            reader, writer = await _ws_open(target.server.port, "/api/v1/ws/mangler")
            writer.write(_frame(0x1, b"\xff\xfe not utf-8") * 25)
            frames += 25
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(reader.read(), max(0.1, target.left()))
            writer.close()
    return f"{frames} invalid frames sent"


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
    Attack(
        "resume-flood", "100 never-reading ?since=0-0 resumes over 10k x 1 KB", resume_flood, prepare=_prepare_resume
    ),
    Attack("resume-loop", "?since=0-0 reconnects at ~10/s over 10k x 1 KB", resume_reconnects, prepare=_prepare_resume),
    Attack("big-history", "10k messages of 196 KB (HISTORY_BYTES 64 MiB)", big_history),
    Attack("ping-flood", "pings from a peer that reads no pongs", ping_flood),
    Attack("pong-flood", "unsolicited pongs", pong_flood),
    Attack("continuation-flood", "empty continuation frames", continuation_flood),
    Attack("tiny-frames", "1-byte text frames", tiny_frames),
    Attack("invalid-utf8", "text frames with invalid UTF-8", invalid_utf8),
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
    if attack.prepare is not None:
        await attack.prepare(server, scale)
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
