"""A bad day for Redis, run against real parts: the engine of tests/test_chaos.py and bench/chaos.py.

Two `diary-ws serve` nodes reach one redis-server through `tests/tcp_proxy.py`. Readers (one user each) hold
a WebSocket, drop it after a random while and resume with `?since=` the last id they got, on either node.
A publisher POSTs numbered notifications (`data.seq`) to both nodes, some broadcasts, some targeted, half
of them with an `Idempotency-Key` (retried, with the same key, after 504 / 409 / 503 as a careful sender
would). Probes time `GET /status`, `DELETE .../connections` and `/readyz`. Meanwhile Redis is paused
(SIGSTOP), killed and restarted empty, cut (connections reset, new ones refused) and blackholed (bytes
accepted, nothing answered), one fault at a time with healthy spells between.

What is checked, from what the clients saw (nothing here trusts the server's own counters):
- lost: a seq answered 200 that a reader it was for never got, unless a `resume` with `recovered: false`
  covers it (the gap between that socket's `since` and the first id it then got);
- duplicated: a seq a reader got twice (on any of its sockets);
- reordered: an id not above the one before it on one socket, or at or below that socket's `since`;
- false answers: a seq delivered although every answer for it was 503 or 404, delivered under another id
  than its 200 said, or two 200s with different ids;
- slow: a POST, status or DELETE answered after more than 3 s (the client's clock, so a little slack).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.tcp_proxy import TcpProxy, tcp_proxy
from tests.utils import RedisServer, Server, async_wait_until, redis_server, run_server, wait_until

DEADLINE = 3.0  # the server's promise for a POST, a status or a DELETE
FAULTS = ("pause", "kill", "cut", "blackhole")
RETRY_FOR = 90.0  # seconds a keyed POST is retried for, at most


def pair(msg_id: str) -> tuple[int, int]:
    ms, seq = msg_id.split("-")
    return int(ms), int(seq)


@dataclass
class Plan:
    """How hard and how long."""

    duration: float  # seconds of faults and healthy spells, after the start
    readers: int = 16
    rate: float = 40.0  # POSTs per second, both nodes together
    healthy: tuple[float, float] = (2.0, 3.0)  # a healthy spell before each fault, seconds (random in range)
    lengths: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"pause": (3.0, 4.0), "kill": (2.0, 3.0), "cut": (2.0, 3.0), "blackhole": (4.0, 5.0)}
    )
    seed: int | None = None


@dataclass
class Socket:
    since: str
    node: int
    ids: list[str] = field(default_factory=list)  # notification ids, in arrival order
    seqs: list[int] = field(default_factory=list)
    resume: dict[str, Any] | None = None
    close_code: int | None = None


@dataclass
class Reader:
    user: str
    last: str
    sockets: list[Socket] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)


@dataclass
class Post:
    seq: int
    key: str | None
    targets: list[str] | None
    answers: list[tuple[int, str | None]] = field(default_factory=list)  # (status, id)


@dataclass
class Report:
    posts: int = 0
    attempts: int = 0
    answers: Counter[int] = field(default_factory=Counter)
    reconnects: int = 0
    refusals: int = 0
    not_recovered: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    covered: int = 0
    duplicated: int = 0
    forgotten: int = 0  # stored twice under one Idempotency-Key, once before and once after Redis lost its data
    reordered: int = 0
    false_answers: int = 0
    slow: int = 0
    slowest: dict[str, float] = field(default_factory=lambda: {"post": 0.0, "status": 0.0, "delete": 0.0})
    client_lag: float = 0.0  # the longest this process's event loop was late, seconds
    readyz_503_after: list[float] = field(default_factory=list)  # seconds from a fault to both nodes' 503
    delivered: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, for the failure message

    def bad(self) -> int:
        return self.lost + self.duplicated + self.reordered + self.false_answers + self.slow

    def summary(self) -> str:
        return (
            f"posts {self.posts} (attempts {self.attempts}: {dict(sorted(self.answers.items()))}), "
            f"deliveries {self.delivered}, reconnects {self.reconnects} (refused {self.refusals}, "
            f"recovered:false {self.not_recovered}), faults {dict(self.faults)}; lost {self.lost} "
            f"(covered by recovered:false {self.covered}), duplicated {self.duplicated} (and {self.forgotten} "
            f"under a key Redis forgot in a restart), reordered {self.reordered}, "
            f"false answers {self.false_answers}, over {DEADLINE:g} s {self.slow} "
            f"(slowest: {', '.join(f'{k} {v:.2f} s' for k, v in self.slowest.items())}), "
            f"readyz 503 after {', '.join(f'{s:.2f}' for s in self.readyz_503_after) or '-'} s; "
            f"the client's own event loop lagged up to {self.client_lag:.2f} s"
        )


class Chaos:
    def __init__(self, plan: Plan, redis: RedisServer, proxy: TcpProxy, nodes: list[Server], since: str) -> None:
        self.plan = plan
        self.redis = redis
        self.proxy = proxy
        self.nodes = nodes
        self.random = random.Random(plan.seed)
        self.readers = [Reader(f"r{i}", since) for i in range(plan.readers)]
        self.posts: list[Post] = []
        self.report = Report()
        self.publishing = True
        self.reading = True
        self.fault: str | None = None
        self.newest: dict[str, tuple[int, int]] = {}  # the newest id answered 200 for each reader, at the end
        self.final_deadline = 0.0
        self.began = time.monotonic()
        self.restarts: list[tuple[int, int]] = []  # Redis's clock just after each restart that lost the data

    # --- readers ---------------------------------------------------------------------------------------

    async def read(self, reader: Reader) -> None:
        while self.reading or (not self.caught_up(reader) and time.monotonic() < self.final_deadline):
            node = self.random.randrange(len(self.nodes))
            url = self.nodes[node].listen_url(reader.user, f"since={reader.last}")
            sock = Socket(reader.last, node)
            try:
                async with connect(url, open_timeout=5, close_timeout=1) as ws:
                    reader.sockets.append(sock)
                    stay = self.random.uniform(0.3, 2.5)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(stay):
                            async for raw in ws:
                                self.frame(reader, sock, orjson.loads(raw))
                    # At the end, stay until the newest message for this reader is in.
                    while not self.reading and not self.caught_up(reader) and time.monotonic() < self.final_deadline:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.5):
                                self.frame(reader, sock, orjson.loads(await ws.recv()))
                    sock.close_code = ws.close_code
            except InvalidStatus as exc:
                reader.refused[exc.response.status_code] += 1
                await asyncio.sleep(self.random.uniform(0.1, 0.4))
            except (ConnectionClosed, OSError, TimeoutError):
                await asyncio.sleep(self.random.uniform(0.05, 0.2))

    def frame(self, reader: Reader, sock: Socket, frame: dict[str, Any]) -> None:
        if frame.get("type") == "resume":
            sock.resume = frame
        elif "id" in frame:
            sock.ids.append(frame["id"])
            sock.seqs.append(frame["data"]["seq"])
            if pair(frame["id"]) > pair(reader.last):
                reader.last = frame["id"]

    def caught_up(self, reader: Reader) -> bool:
        return pair(reader.last) >= self.newest.get(reader.user, (0, 0))

    # --- the publisher ---------------------------------------------------------------------------------

    async def publish(self) -> None:
        seq = 0
        started = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        while self.publishing:
            seq += 1
            targets = None
            if seq % 4 == 0:
                targets = [r.user for r in self.random.sample(self.readers, min(3, len(self.readers)))]
            post = Post(seq, str(uuid.uuid4()) if (seq // 2) % 2 == 0 else None, targets)
            self.posts.append(post)
            task = asyncio.create_task(self.send(post))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(max(0.0, started + seq / self.plan.rate - time.monotonic()))
        if pending:
            await asyncio.wait(pending, timeout=RETRY_FOR + 15)

    async def send(self, post: Post) -> None:
        body: dict[str, Any] = {"message": f"m{post.seq}", "data": {"seq": post.seq}}
        if post.targets is not None:
            body["user_ids"] = post.targets
        headers = {"Content-Type": "application/json"}
        if post.key is not None:
            headers["Idempotency-Key"] = post.key
        give_up = time.monotonic() + RETRY_FOR
        for attempt in range(1000):
            node = self.nodes[(post.seq + attempt) % len(self.nodes)]
            status, msg_id, retry_after = await self.call("post", "POST", node, "/api/v1/ws/notification",
                                                          content=orjson.dumps(body), headers=headers)  # fmt: skip
            post.answers.append((status, msg_id))
            # Without a key nothing is safe to repeat; with one, everything but a final answer is. A careful
            # sender backs off (full jitter, doubling to 8 s), never sooner than Retry-After, and gives up.
            if post.key is None or status not in (409, 503, 504) or time.monotonic() > give_up:
                return
            wait = self.random.uniform(0, min(8.0, 0.5 * 2**attempt))
            await asyncio.sleep(max(wait, retry_after or 0.0))

    async def call(self, what: str, method: str, node: Server, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        started = time.monotonic()
        try:
            answer = await request(node.port, method, path, **kwargs)
        except (OSError, ValueError) as exc:
            self.problem(f"{what} {path}: no answer ({exc!r}) after {time.monotonic() - started:.2f} s")
            self.report.slow += 1
            return 0, None, None
        seconds = time.monotonic() - started
        self.report.slowest[what] = max(self.report.slowest[what], seconds)
        if seconds > DEADLINE + 0.5:  # the client's own clock on a shared box: a little slack
            self.report.slow += 1
            self.problem(f"{what} answered {answer[0]} after {seconds:.2f} s at {started - self.began:.1f} s "
                         f"({self.fault or 'no fault'})")  # fmt: skip
        status, headers, content = answer
        if status >= 500 and not headers.get("content-type", "").startswith("application/json"):
            self.problem(f"{what}: a {status} that is not JSON: {content[:200]!r}")
        msg_id = None
        if status == 200 and what == "post":
            msg_id = orjson.loads(content).get("id")
        retry = headers.get("retry-after")
        return status, msg_id, float(retry) if retry and retry.isdigit() else None

    async def lag(self) -> None:
        """How late this process's own event loop runs (a client starved of CPU would blame the server)."""
        while self.publishing:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            self.report.client_lag = max(self.report.client_lag, time.monotonic() - before - 0.05)

    async def probe(self) -> None:
        """Status and DELETE on both nodes, twice a second, all along."""
        turn = 0
        while self.publishing:
            node = self.nodes[turn % len(self.nodes)]
            turn += 1
            await asyncio.gather(
                self.call("status", "GET", node, "/api/v1/ws/status"),
                self.call("delete", "DELETE", node, "/api/v1/ws/users/nobody-here/connections"),
            )
            await asyncio.sleep(0.5)

    # --- faults ----------------------------------------------------------------------------------------

    async def faults(self, log: Callable[[str], None]) -> None:
        end = time.monotonic() + self.plan.duration
        turn = 0
        while time.monotonic() < end:
            await asyncio.sleep(self.random.uniform(*self.plan.healthy))
            kind = FAULTS[turn % len(FAULTS)]
            turn += 1
            length = self.random.uniform(*self.plan.lengths[kind])
            log(f"fault {turn}: {kind} for {length:.1f} s at {time.monotonic() - self.began:.1f} s")
            self.report.faults[kind] += 1
            self.fault = kind
            began = time.monotonic()
            if kind == "pause":
                assert self.redis.proc is not None
                os.kill(self.redis.proc.pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(length)
                finally:
                    os.kill(self.redis.proc.pid, signal.SIGCONT)
            elif kind == "kill":
                self.redis.kill()
                await self.readyz_down(began, length)
                await asyncio.to_thread(self.redis.start)
                # Every id from now on is above this one, every id of the old data below (one machine's clock).
                self.restarts.append(pair(redis_now(self.redis.port)))
            elif kind == "cut":
                self.proxy.cut(refuse=True)
                await self.readyz_down(began, length)
                self.proxy.release()
            else:
                self.proxy.blackhole()
                await self.readyz_down(began, length)
                self.proxy.heal()
            self.fault = None
        await asyncio.sleep(self.plan.healthy[1])

    async def readyz_down(self, began: float, length: float) -> None:
        """Poll /readyz until both nodes say 503 (recording how long that took), then wait out the fault."""
        down: set[int] = set()
        while time.monotonic() - began < length:
            for index, node in enumerate(self.nodes):
                if index not in down:
                    with contextlib.suppress(OSError, ValueError):
                        if (await request(node.port, "GET", "/readyz", limit=2))[0] == 503:
                            down.add(index)
            if len(down) == len(self.nodes):
                self.report.readyz_503_after.append(time.monotonic() - began)
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(max(0.0, began + length - time.monotonic()))

    def one_per_redis(self, ids: list[str]) -> bool:
        """Each id stored by another life of Redis (a restart that lost the data lies between any two)."""
        lives = {sum(pair(msg_id) >= boundary for boundary in self.restarts) for msg_id in ids}
        return len(lives) == len(ids)

    def problem(self, text: str) -> None:
        if len(self.report.problems) < 40:
            self.report.problems.append(text)

    # --- the verdict -------------------------------------------------------------------------------------

    def judge(self) -> Report:
        report = self.report
        report.posts = len(self.posts)
        ok: dict[int, str] = {}
        refused: set[int] = set()
        for post in self.posts:
            report.attempts += len(post.answers)
            report.answers.update(status for status, _ in post.answers)
            answered = {msg_id for status, msg_id in post.answers if status == 200 and msg_id is not None}
            if len(answered) > 1:
                report.false_answers += 1
                self.problem(f"seq {post.seq}: two 200s with different ids {sorted(answered)}")
            if answered:
                ok[post.seq] = answered.pop()
            elif post.answers and all(status in (404, 503) for status, _ in post.answers):
                refused.add(post.seq)
        by_seq = {post.seq: post for post in self.posts}
        for reader in self.readers:
            report.reconnects += max(0, len(reader.sockets) - 1)
            report.refusals += sum(reader.refused.values())
            got: dict[int, list[str]] = {}
            gaps: list[tuple[tuple[int, int], tuple[int, int]]] = []
            for sock in reader.sockets:
                report.delivered += len(sock.ids)
                floor = pair(sock.since)
                for msg_id, seq in zip(sock.ids, sock.seqs, strict=True):
                    if pair(msg_id) <= floor:
                        report.reordered += 1
                        self.problem(f"{reader.user}: {msg_id} (seq {seq}) came after {floor} (since {sock.since})")
                    floor = max(floor, pair(msg_id))
                    got.setdefault(seq, []).append(msg_id)
                if sock.resume is not None and sock.resume.get("recovered") is False:
                    report.not_recovered += 1
                    first = pair(sock.ids[0]) if sock.ids else (2**63, 0)
                    gaps.append((pair(sock.since), first))
            for seq, ids in got.items():
                post = by_seq[seq]
                if len(ids) > 1 and post.key is not None and self.one_per_redis(ids):
                    # Stored again under its key by a retry after Redis lost its data, and with it the key.
                    report.forgotten += len(ids) - 1
                elif len(ids) > 1:
                    report.duplicated += len(ids) - 1
                    self.problem(f"{reader.user}: seq {seq} delivered as {ids}; answers {post.answers}")
                if seq in refused:
                    report.false_answers += 1
                    self.problem(f"{reader.user}: seq {seq} delivered after {post.answers}")
                elif seq in ok and ok[seq] not in ids:
                    report.false_answers += 1
                    self.problem(f"{reader.user}: seq {seq} delivered as {ids}, answered {ok[seq]}")
            start = pair(reader.sockets[0].since) if reader.sockets else (0, 0)
            for seq, msg_id in ok.items():
                targets = by_seq[seq].targets
                if (targets is not None and reader.user not in targets) or seq in got or pair(msg_id) <= start:
                    continue
                if any(low < pair(msg_id) < high for low, high in gaps):
                    report.covered += 1
                    continue
                report.lost += 1
                self.problem(f"{reader.user}: seq {seq} ({msg_id}, answers {by_seq[seq].answers}) never arrived")
        return report


async def request(
    port: int, method: str, path: str, *, content: bytes = b"", headers: dict[str, str] | None = None, limit: float = 15
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a connection of its own: (status, headers in lower case, body).

    A dozen lines on asyncio streams rather than an HTTP client library: with hundreds of requests in
    flight, a pooled client spends enough CPU of its own to blur what the server's latency is.
    """
    async with asyncio.timeout(limit):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(f"{head}Content-Length: {len(content)}\r\n\r\n".encode() + content)
            raw = await reader.read()
        finally:
            writer.close()
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        raise ValueError(f"not an HTTP answer: {raw[:100]!r}")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


def redis_now(port: int) -> str:
    """Redis's clock as a stream id: a `since` from before anything is published."""
    import redis as redis_client

    seconds, micros = redis_client.Redis(port=port).time()
    return f"{seconds * 1000 + micros // 1000}-0"


async def run(plan: Plan, log: Callable[[str], None] = lambda line: None) -> Report:
    """One chaos run; returns what the clients saw."""
    with redis_server() as redis, tcp_proxy(redis.port) as proxy, contextlib.ExitStack() as stack:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        nodes = [stack.enter_context(run_server({"broker_url": url})) for _ in range(2)]
        for node in nodes:
            wait_until(lambda node=node: node.get("/readyz").status_code == 200, 15, "every node to be ready")  # type: ignore[misc]
        chaos = Chaos(plan, redis, proxy, nodes, redis_now(redis.port))
        try:
            readers = [asyncio.create_task(chaos.read(reader)) for reader in chaos.readers]
            # Every reader holds a socket before the first POST, so every message has someone to go to.
            await async_wait_until(lambda: all(reader.sockets for reader in chaos.readers), 15, "every reader's socket")
            publisher = asyncio.create_task(chaos.publish())
            prober = asyncio.create_task(chaos.probe())
            lag = asyncio.create_task(chaos.lag())
            await chaos.faults(log)
            chaos.publishing = False
            await asyncio.wait_for(asyncio.gather(publisher, prober, lag), RETRY_FOR + 30)
            for post in chaos.posts:
                for status, msg_id in post.answers:
                    for reader in chaos.readers:
                        if status == 200 and msg_id and (post.targets is None or reader.user in post.targets):
                            chaos.newest[reader.user] = max(chaos.newest.get(reader.user, (0, 0)), pair(msg_id))
            chaos.final_deadline = time.monotonic() + 20
            chaos.reading = False  # each reader stays on its next socket until it has the newest message
            await asyncio.wait_for(asyncio.gather(*readers), 60)
        finally:
            pass
        for node in nodes:
            text = node.log()
            if "Traceback" in text:
                chaos.problem(f"a traceback in node {node.port}'s log: {text[text.index('Traceback') :][:1500]}")
        return chaos.judge()
