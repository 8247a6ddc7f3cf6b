"""A simulated diary-ws cluster on one Redis, without sockets: what Redis pays per message as nodes are added.

K simulated nodes run in this process, each a real `RedisBackend` (the same scripts, commands and readers as
`diary-ws serve` with a redis:// BROKER_URL) handed a stub Node that holds a presence of U users and counts
deliveries instead of writing to sockets. For each K it starts from an empty redis-server of its own and runs:

- targeted: a publisher sends messages to one user each (a random user of a random node), from a random node,
  at a fixed rate (open loop: a slow publish does not slow the next one down);
- broadcast: the same for messages to everyone;
- a resume storm: `replay(user, since)` for random users from an id before the history was filled, so every
  resume asks for the whole history window;

and reads Redis's own INFO before and after each: CPU (used_cpu_user + used_cpu_sys) and commandstats. The
idle cost (heartbeats, blocked reads timing out) is measured for a second first and subtracted. Publish
latency is the time `publish()` takes, counts gathered from every node that should report. Every delivery is
checked against what was sent (the right users, exactly once, in order per node) and mismatches are printed.

It measures and asserts nothing; the figures include this process's own Python cost in the latencies (all K
nodes share one event loop), but the Redis CPU columns are Redis's alone.

    .venv-bench/bin/python -m bench.cluster_sim                  # K = 1, 5, 10, 25, 50
    .venv-bench/bin/python -m bench.cluster_sim --nodes 1 10 --targeted 200
    make bench BENCH_ARGS=--cluster
    .venv-bench/bin/python -m bench.cluster_sim --ramp --nodes 10 50   # the rate where publish p99 passes 50 ms
    .venv-bench/bin/python -m bench.cluster_sim --redis-cluster 3      # the same on a three-master Redis Cluster

With `--redis-cluster M` the nodes run on a Redis Cluster of M masters the simulator starts (the backend of a
`redis-cluster://` BROKER_URL: users spread over shards, each in one hash slot), every user joins through the
backend as a socket would, and Redis's CPU and commands are summed over the masters; the table adds the
busiest master's share of the CPU, which says how evenly the shards spread the work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from diary_ws.backends.redis import RedisBackend
from diary_ws.backends.redis.sharded import ShardedRedisBackend
from diary_ws.errors import DiaryWSError
from diary_ws.messages import Draft, Message, MessageId
from diary_ws.protocols import Counts
from tests.utils import async_wait_until, redis_cluster, redis_server, wait_until

RESULTS = Path(__file__).parent / "results"
REDIS_CORE, SIM_CORE = 0, 1


class SimNode:
    """The Hub as a backend sees it: U users with one socket each; deliveries are counted, not sent."""

    def __init__(self, name: str, users: int) -> None:
        self.users = {f"{name}-u{j}": (0,) for j in range(users)}
        self.deliveries = 0
        self.last: dict[str, MessageId] = {}  # user -> the newest id delivered to them
        self.wrong = 0  # deliveries out of id order for a user
        self.closed = 0  # users whose sockets the backend closed so they resume (a rejoin mark, a repair)

    async def deliver(self, message: Message, want_users: bool) -> Counts:
        targets = self.users if message.targets is None else message.targets
        reached = [u for u in targets if u in self.users]
        for user in reached:
            if user in self.last and message.id <= self.last[user]:
                self.wrong += 1
            self.last[user] = message.id
        self.deliveries += len(reached)
        return Counts(len(reached), len(reached), 0, len(reached), reached if want_users else None)

    def presence(self) -> Mapping[str, Sized]:
        return self.users

    def close_local(self, user_id: str, code: int, reason: str) -> int:
        # A real socket would be closed with 1013 and resume with `since`: what it missed comes back then.
        self.closed += 1
        return 0


@dataclass
class Row:
    nodes: int
    users_per_node: int
    targeted_sent: int = 0
    targeted_rate: float = 0.0
    targeted_cpu_us: float = 0.0  # Redis CPU per targeted message, microseconds
    targeted_cmds: float = 0.0  # Redis commands per targeted message
    targeted_p50_ms: float = 0.0
    targeted_p99_ms: float = 0.0
    broadcast_sent: int = 0
    broadcast_cpu_us: float = 0.0
    broadcast_cmds: float = 0.0
    broadcast_p50_ms: float = 0.0
    broadcast_p99_ms: float = 0.0
    resumes: int = 0
    resume_cpu_us: float = 0.0
    resume_cmds: float = 0.0
    resume_found_avg: float = 0.0
    resume_p50_ms: float = 0.0
    resume_p99_ms: float = 0.0
    busiest_share: float = 1.0  # targeted: the busiest Redis's share of the CPU spent (1.0 on one Redis)
    errors: list[str] = field(default_factory=list)


class Meter:
    """Redis's CPU seconds and command counts, read from INFO, summed over every server (the masters of a
    Redis Cluster); `each` keeps each server's CPU of the last read."""

    def __init__(self, servers: list[Redis]) -> None:
        self.servers = servers
        self.each: list[float] = []

    async def read(self) -> tuple[float, int]:
        self.each, total_calls = [], 0
        for redis in self.servers:
            cpu = await redis.info("cpu")
            stats = await redis.info("commandstats")
            total_calls += sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))
            self.each.append(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))
        return sum(self.each), total_calls - 2 * (len(self.servers) - 1)  # 2 INFO calls per server, 1 counted


class Deployment:
    """Where the simulated nodes keep their state: one redis-server, or a Redis Cluster's masters."""

    def __init__(self, url: str, ports: list[int]) -> None:
        self.url = url
        self.admins = [Redis(port=port, decode_responses=True) for port in ports]

    def backend(self, history: int) -> Any:
        if self.url.startswith("redis-cluster://"):
            return ShardedRedisBackend(self.url, history_size=history, history_ttl=3600.0)
        return RedisBackend(self.url, history_size=history, history_ttl=3600.0)

    async def reset(self) -> Meter:
        for admin in self.admins:
            await admin.flushall()
        return Meter(self.admins)

    async def close(self) -> None:
        for admin in self.admins:
            await admin.aclose()


async def join_all(backends: list[Any], nodes: list[SimNode], sharded: bool) -> None:
    """On Redis Cluster every user joins through the backend, as a socket does (a shard hears of its users so);
    on one Redis the first heartbeat writes each node's whole presence."""
    if not sharded:
        return
    for backend, node in zip(backends, nodes, strict=True):
        await asyncio.gather(*(backend.join(user, 16) for user in node.users))


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# At most this many calls in flight: redis-py's pool (100 connections per client by default) refuses more
# at once, and a run that reaches it is past what it can sustain anyway. The latency counts the wait here.
IN_FLIGHT = 80


async def open_loop(rate: float, count: int, one: Any) -> list[float]:
    """Call `one()` `count` times at `rate` a second without waiting for the previous; each call's seconds."""
    latencies: list[float] = []
    room = asyncio.Semaphore(IN_FLIGHT)

    async def timed() -> None:
        start = time.perf_counter()
        async with room:
            await one()
        latencies.append(time.perf_counter() - start)

    tasks = []
    begin = time.perf_counter()
    for i in range(count):
        delay = begin + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(timed()))
    await asyncio.gather(*tasks)
    return latencies


async def run_k(where: Deployment, k: int, args: argparse.Namespace) -> Row:
    row = Row(k, args.users)
    meter = await where.reset()
    nodes = [SimNode(f"n{i}", args.users) for i in range(k)]
    backends = [where.backend(args.history) for _ in range(k)]
    rng = random.Random(k)
    try:
        for backend, node in zip(backends, nodes, strict=True):
            await backend.start(node)
        await asyncio.to_thread(
            wait_until, lambda: all(b.ready() for b in backends), 30.0, f"{k} simulated nodes to be ready"
        )
        await join_all(backends, nodes, args.redis_cluster > 0)

        # Idle cost per second (heartbeats, blocked reads returning empty), subtracted from every phase.
        cpu0, calls0 = await meter.read()
        await asyncio.sleep(args.idle)
        cpu1, calls1 = await meter.read()
        idle_cpu, idle_calls = (cpu1 - cpu0) / args.idle, (calls1 - calls0 - 2) / args.idle

        shares: list[float] = []  # per phase, the busiest Redis's share of the CPU spent

        async def phase(run: Any, count: int) -> tuple[float, float, list[float]]:
            cpu_a, calls_a = await meter.read()
            start = time.perf_counter()
            latencies = await run()
            await settled()
            elapsed = time.perf_counter() - start
            each_a = meter.each
            cpu_b, calls_b = await meter.read()
            spent = [b - a for a, b in zip(each_a, meter.each, strict=True)]
            shares.append(max(spent) / max(sum(spent), 1e-9))
            cpu = max(0.0, cpu_b - cpu_a - idle_cpu * elapsed)
            calls = max(0.0, calls_b - calls_a - 2 - idle_calls * elapsed)
            return cpu / count * 1e6, calls / count, latencies

        before = MessageId(int(time.time() * 1000) - 1, 0)
        all_users = [u for node in nodes for u in node.users]
        expected = dict.fromkeys(all_users, 0)
        delivered_broadcasts: list[MessageId] = []

        async def settled() -> None:
            """Wait (no Redis command) until every node has delivered what was published, and a little for
            the count replies that follow, so a phase is charged for all of its own work and no more."""
            want = sum(expected.values()) + len(delivered_broadcasts) * len(all_users)
            with contextlib.suppress(AssertionError):  # past a minute: measured as it stands
                await async_wait_until(lambda: sum(n.deliveries for n in nodes) >= want, 60, "deliveries")
            await asyncio.sleep(0.3)

        async def targeted_one() -> None:
            user = rng.choice(all_users)
            expected[user] += 1
            try:
                published = await rng.choice(backends).publish(frozenset({user}), Draft("notice", "hello", None))
            except DiaryWSError as exc:
                expected[user] -= 1
                row.errors.append(f"targeted to {user}: {exc.status_code} {exc}")
                return
            if published.sent_count != 1 or published.nodes_missing:
                row.errors.append(
                    f"targeted {published.id}: sent {published.sent_count}, missing {published.nodes_missing}"
                )

        async def broadcast_one() -> None:
            try:
                published = await rng.choice(backends).publish(None, Draft("notice", "to all", None))
            except DiaryWSError as exc:
                row.errors.append(f"broadcast: {exc.status_code} {exc}")
                return
            delivered_broadcasts.append(published.id)
            if published.sent_count != k * args.users or published.nodes_missing:
                row.errors.append(
                    f"broadcast {published.id}: sent {published.sent_count}, missing {published.nodes_missing}"
                )

        # Fill the history to its size first (not measured), so a resume asks for a full window.
        fill = max(0, args.history - args.targeted - args.broadcasts)
        await open_loop(args.fill_rate, fill, targeted_one)
        await settled()

        row.targeted_sent, row.targeted_rate = args.targeted, args.rate
        cpu, cmds, lat = await phase(lambda: open_loop(args.rate, args.targeted, targeted_one), args.targeted)
        row.targeted_cpu_us, row.targeted_cmds = cpu, cmds
        row.busiest_share = shares[-1]
        row.targeted_p50_ms, row.targeted_p99_ms = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000

        row.broadcast_sent = args.broadcasts
        bcast_rate = max(1.0, args.rate / 10)
        cpu, cmds, lat = await phase(lambda: open_loop(bcast_rate, args.broadcasts, broadcast_one), args.broadcasts)
        row.broadcast_cpu_us, row.broadcast_cmds = cpu, cmds
        row.broadcast_p50_ms, row.broadcast_p99_ms = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000

        found: list[int] = []

        async def resume_one() -> None:
            user = rng.choice(all_users)
            replay = await rng.choice(backends).replay(user, before)
            found.append(len(replay.messages))
            ids = [m.id for m in replay.messages]
            if ids != sorted(set(ids)) or any(m.targets is not None and user not in m.targets for m in replay.messages):
                row.errors.append(f"resume of {user}: out of order, duplicated or someone else's messages")

        row.resumes = args.resumes
        cpu, cmds, lat = await phase(lambda: open_loop(args.resume_rate, args.resumes, resume_one), args.resumes)
        row.resume_cpu_us, row.resume_cmds = cpu, cmds
        row.resume_p50_ms, row.resume_p99_ms = pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000
        row.resume_found_avg = statistics.fmean(found) if found else 0.0

        # Every user got exactly what was sent to them (targeted) plus every broadcast, once, in order.
        total = sum(expected.values()) + len(delivered_broadcasts) * len(all_users)
        delivered = sum(n.deliveries for n in nodes)
        if delivered != total:
            closed = sum(n.closed for n in nodes)
            row.errors.append(f"deliveries: {delivered}, expected {total}; users told to resume: {closed} (a node "
                              "the simulator kept too busy to beat in time was skipped, then closed them)")  # fmt: skip
        if any(n.wrong for n in nodes):
            row.errors.append(f"out of order deliveries: {sum(n.wrong for n in nodes)}")
    finally:
        for backend in backends:
            await backend.stop()
    return row


@dataclass
class Step:
    nodes: int
    rate: float  # targeted messages a second offered
    sent: int
    achieved: float  # messages a second that completed
    p50_ms: float
    p99_ms: float
    redis_cpu_share: float  # Redis's CPU seconds per second of the step (1.0: one core saturated)
    cpu_us: float  # Redis CPU per message, microseconds
    errors: int


async def ramp_k(where: Deployment, k: int, args: argparse.Namespace) -> list[Step]:
    """Targeted messages at doubling rates, `--ramp-seconds` each, until publish p99 passes `--ramp-p99` ms
    (twice at one rate). Redis's CPU here is all of it, heartbeats and blocked reads included."""
    meter = await where.reset()
    nodes = [SimNode(f"n{i}", args.users) for i in range(k)]
    backends = [where.backend(args.history) for _ in range(k)]
    rng = random.Random(k)
    all_users = [u for node in nodes for u in node.users]
    steps: list[Step] = []
    try:
        for backend, node in zip(backends, nodes, strict=True):
            await backend.start(node)
        await asyncio.to_thread(
            wait_until, lambda: all(b.ready() for b in backends), 30.0, f"{k} simulated nodes to be ready"
        )
        await join_all(backends, nodes, args.redis_cluster > 0)
        errors = 0

        async def targeted_one() -> None:
            nonlocal errors
            try:
                published = await rng.choice(backends).publish(
                    frozenset({rng.choice(all_users)}), Draft("notice", "hello", None)
                )
            except DiaryWSError:
                errors += 1
                return
            if published.sent_count != 1 or published.nodes_missing:
                errors += 1

        rate = args.ramp_from
        while rate <= args.ramp_to:
            errors = 0
            count = max(20, int(rate * args.ramp_seconds))
            cpu_a, _ = await meter.read()
            start = time.perf_counter()
            latencies = await open_loop(rate, count, targeted_one)
            elapsed = time.perf_counter() - start
            cpu_b, _ = await meter.read()
            step = Step(k, rate, count, count / elapsed, pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000,
                        (cpu_b - cpu_a) / elapsed, (cpu_b - cpu_a) / count * 1e6, errors)  # fmt: skip
            steps.append(step)
            print(f"K={k} rate {rate:.0f}/s: done {step.achieved:.0f}/s, p50 {step.p50_ms:.1f} ms, p99 "
                  f"{step.p99_ms:.1f} ms, Redis CPU {step.redis_cpu_share:.2f} core ({step.cpu_us:.0f} us/msg), "
                  f"{errors} problems", flush=True)  # fmt: skip
            if step.p99_ms > args.ramp_p99:
                # On a shared machine one stall of another process puts a step over: a rate counts as past the
                # limit when it is over twice in a row.
                if len(steps) > 1 and steps[-2].rate == rate:
                    break
                await asyncio.sleep(0.5)
                continue
            rate *= 2
            await asyncio.sleep(0.5)
    finally:
        for backend in backends:
            await backend.stop()
    return steps


def table(rows: list[Row]) -> str:
    cols = [
        ("K", "nodes", "{:d}"),
        ("tgt cpu us/msg", "targeted_cpu_us", "{:.0f}"),
        ("tgt cmds/msg", "targeted_cmds", "{:.1f}"),
        ("tgt p50 ms", "targeted_p50_ms", "{:.1f}"),
        ("tgt p99 ms", "targeted_p99_ms", "{:.1f}"),
        ("bcast cpu us/msg", "broadcast_cpu_us", "{:.0f}"),
        ("bcast cmds/msg", "broadcast_cmds", "{:.1f}"),
        ("bcast p99 ms", "broadcast_p99_ms", "{:.1f}"),
        ("resume cpu us", "resume_cpu_us", "{:.0f}"),
        ("resume cmds", "resume_cmds", "{:.1f}"),
        ("found/resume", "resume_found_avg", "{:.1f}"),
        ("busiest Redis", "busiest_share", "{:.0%}"),
    ]
    head = "| " + " | ".join(c[0] for c in cols) + " |"
    sep = "|" + "|".join("---:" for _ in cols) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(getattr(r, key)) for _, key, fmt in cols) + " |")
    for r in rows:
        if r.errors:
            lines.append(f"K={r.nodes}: {len(r.errors)} problem(s), first: " + "; ".join(r.errors[:3]))
    return "\n".join(lines)


@contextlib.contextmanager
def deployment(args: argparse.Namespace) -> Iterator[Deployment]:
    """A redis-server of its own, or a Redis Cluster of `--redis-cluster` masters; with --pin, Redis on core 0
    and the simulator on core 1."""
    cores = os.cpu_count() or 1
    if args.redis_cluster:
        with redis_cluster(masters=args.redis_cluster) as cluster:
            if args.pin:
                for server in cluster.servers:
                    assert server.proc is not None
                    os.sched_setaffinity(server.proc.pid, {REDIS_CORE % cores})
                os.sched_setaffinity(0, {SIM_CORE % cores})
            yield Deployment(cluster.url, [server.port for server in cluster.servers])
        return
    with redis_server() as redis:
        assert redis.proc is not None
        if args.pin:
            os.sched_setaffinity(redis.proc.pid, {REDIS_CORE % cores})
            os.sched_setaffinity(0, {SIM_CORE % cores})
        yield Deployment(redis.url, [redis.port])


async def run(args: argparse.Namespace) -> tuple[list[Row], list[Step]]:
    rows: list[Row] = []
    steps: list[Step] = []
    with deployment(args) as where:
        try:
            if args.ramp:
                for k in args.nodes:
                    steps += await ramp_k(where, k, args)
                return rows, steps
            for k in args.nodes:
                rows.append(await run_k(where, k, args))
                print(table(rows[-1:]), flush=True)
        finally:
            await where.close()
    return rows, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 5, 10, 25, 50])
    parser.add_argument("--users", type=int, default=100, help="users per simulated node")
    parser.add_argument("--history", type=int, default=400, help="HISTORY_SIZE")
    parser.add_argument("--targeted", type=int, default=100, help="targeted messages measured")
    parser.add_argument("--rate", type=float, default=20.0, help="targeted messages a second")
    parser.add_argument("--fill-rate", type=float, default=50.0, help="rate of the unmeasured history fill")
    parser.add_argument("--broadcasts", type=int, default=10)
    parser.add_argument("--resumes", type=int, default=60)
    parser.add_argument("--resume-rate", type=float, default=20.0)
    parser.add_argument("--idle", type=float, default=1.0, help="seconds of idle measured per K")
    parser.add_argument("--ramp", action="store_true",
                        help="instead of the table: targeted messages at doubling rates until publish p99 passes "
                        "--ramp-p99, for each K of --nodes")  # fmt: skip
    parser.add_argument("--ramp-from", type=float, default=50.0, help="the first rate, messages a second")
    parser.add_argument("--ramp-to", type=float, default=6400.0, help="the last rate tried")
    parser.add_argument("--ramp-seconds", type=float, default=4.0, help="seconds per rate")
    parser.add_argument("--ramp-p99", type=float, default=50.0, help="the publish p99 (ms) where the ramp stops")
    parser.add_argument("--pin", action="store_true", help="Redis on core 0, the simulator on core 1")
    parser.add_argument("--redis-cluster", type=int, default=0, metavar="MASTERS",
                        help="on a Redis Cluster of this many masters (redis-cluster://), not one Redis")  # fmt: skip
    parser.add_argument("--label", default="", help="a name for the results file")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import uvloop

        rows, steps = uvloop.run(run(args))
    except ImportError:
        rows, steps = asyncio.run(run(args))
    if rows:
        print("\n" + table(rows))
    load = os.getloadavg()[0]
    print(f"\n({os.cpu_count()} cores, load average {load:.1f} at the end: latencies include any contention)")
    out = args.out or RESULTS / f"cluster_sim{'-' + args.label if args.label else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(orjson.dumps({"args": vars(args) | {"out": str(out)}, "rows": [asdict(r) for r in rows],
                                  "ramp": [asdict(s) for s in steps]},
                                 option=orjson.OPT_INDENT_2))  # fmt: skip
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
