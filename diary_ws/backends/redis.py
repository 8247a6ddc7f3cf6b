"""The scale-out backend on Redis ≥ 7: one stream, one reader per process, presence, heartbeats, gathered counts.

- **Feed.** Every message is one entry of one stream (`<prefix>feed`, XADD with an approximate MAXLEN). The
  stream id is the message id. Each process runs one reader (XREAD BLOCK) and fans every entry out to its own
  sockets, so every node delivers in the stream's order. `?since=` reads the same stream on any node.
- **Presence.** Each node keeps a hash user -> its socket count (`<prefix>presence:<node>`), written when a
  socket comes or goes, and a heartbeat key with a TTL. A node whose heartbeat expired is forgotten by the
  next script that looks, so its users leave `status` within HEARTBEAT_TTL.
- **Counts.** The publisher names itself and a token in the entry. Each node's reader reports its counts:
  the publisher's own reader directly, the others by RPUSH onto the publisher's reply list, which one task
  per node reads (BLPOP). The publisher waits up to PUBLISH_WAIT for every live node.
- **Failure.** Nothing here raises into a request except as BrokerUnavailable (503). The reader and the
  presence writer retry with backoff and log once per change of state; `ready()` is false while either is
  down or the reader has stalled past its block timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from diary_ws.backends import scripts
from diary_ws.backends.base import Counts, Node, Page, Published, Replay
from diary_ws.errors import BrokerUnavailable, NobodyListening, TooManyConnections
from diary_ws.messages import Draft, Message, MessageId, parse_id

log = logging.getLogger("diary_ws.redis")

PREFIX = "diary-ws:"
HEARTBEAT_INTERVAL = 2.0  # seconds between a node's heartbeats
HEARTBEAT_TTL = 6.0  # a node silent this long is dead: its users leave status, publishes stop waiting for it
PUBLISH_WAIT = 1.0  # the longest a publish waits for the other nodes' counts
READ_BLOCK = 2.0  # XREAD BLOCK, seconds; a reader silent for longer than this plus READ_GRACE is stalled
READ_GRACE = 1.0
READ_COUNT = 500  # entries per XREAD
REPORT_MAX_AGE_MS = 60_000  # entries older than this (a reader catching up) are delivered but not reported
# The reconnect backoff of the reader and the presence writer, seconds. Capped at one heartbeat, so a node
# rewrites its presence within about one heartbeat of Redis coming back.
RETRY_FIRST, RETRY_MAX = 0.1, HEARTBEAT_INTERVAL
COMMAND_TIMEOUT = 2.0  # socket timeout of ordinary commands
FEED_MIN = 1000  # the stream keeps at least this many entries, so a reader can catch up after a short outage


def _client(url: str, socket_timeout: float, retries: int) -> Redis:
    # A pooled connection that went stale across a Redis restart fails its next command (PITFALLS 7):
    # health checks catch most before use, and a short retry covers the rest.
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=COMMAND_TIMEOUT,
        health_check_interval=1,
        retry=Retry(ExponentialBackoff(cap=0.4, base=0.05), retries),
    )


class _Gather:
    """The reports for one publish, as they come in."""

    __slots__ = ("expected", "reports", "done")

    def __init__(self) -> None:
        self.expected: set[str] | None = None
        self.reports: dict[str, Counts] = {}
        self.done = asyncio.Event()

    def add(self, node: str, counts: Counts) -> None:
        self.reports[node] = counts
        self._check()

    def expect(self, nodes: set[str]) -> None:
        self.expected = nodes
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.expected <= self.reports.keys():
            self.done.set()


class _State:
    """An up/down flag that logs only when it changes."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.up = False
        self.ever = False

    def ok(self) -> None:
        if self.up:
            return
        if self.ever:
            log.warning("%s: Redis is reachable again", self.what)
        else:
            log.info("%s: connected to Redis", self.what)
        self.up = self.ever = True

    def failed(self, exc: BaseException, retry: float) -> None:
        if self.up or not self.ever:
            log.warning("%s: Redis unreachable (%s); retrying with backoff up to %.0f s", self.what, exc, retry)
            self.ever = True
        self.up = False


class RedisBackend:
    """One node of a diary-ws cluster that shares one Redis."""

    def __init__(self, url: str, history_size: int, history_ttl: float) -> None:
        self._url = url
        self._size = history_size
        self._ttl = history_ttl
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._node: Node | None = None
        self._cmd: Redis | None = None  # ordinary commands
        self._blocking: Redis | None = None  # XREAD BLOCK and BLPOP
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._last_id = "0-0"  # the reader's position; kept across outages
        self._last_read = 0.0  # monotonic time the reader last heard from Redis
        self._reader = _State("stream reader")
        self._presence = _State("presence")
        self._replies = _State("count replies")
        self._pending: dict[str, _Gather] = {}
        self._dirty: set[str] = set()  # users whose count here changed since the last write
        self._joins: list[tuple[str, int, asyncio.Future[None]]] = []
        self._rewrite = True  # write the whole presence hash (first beat, or Redis may have lost it)
        self._wake = asyncio.Event()
        self._next_beat = 0.0
        self._up = asyncio.Event()  # set once both the reader and the presence writer have reached Redis
        self._scripts: dict[str, AsyncScript] = {}
        self._keys = (PREFIX + "nodes", PREFIX + "feed", PREFIX + "epoch")
        self._presence_key = f"{PREFIX}presence:{self.node_id}"
        self._heartbeat_key = f"{PREFIX}node:{self.node_id}"
        self._replies_key = f"{PREFIX}replies:{self.node_id}"

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self, node: Node) -> None:
        """Start the reader, the reply reader and the presence writer; an unreachable Redis is retried."""
        self._node = node
        self._cmd = _client(self._url, COMMAND_TIMEOUT, retries=2)
        # The blocking reads retry in their own loop (`_guarded`), which logs each change of state.
        self._blocking = _client(self._url, READ_BLOCK + COMMAND_TIMEOUT, retries=0)
        self._scripts = {source: self._cmd.register_script(source) for source in scripts.ALL}
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._guarded("stream reader", self._read_once, self._reader)),
            loop.create_task(self._guarded("presence", self._presence_once, self._presence)),
            loop.create_task(self._guarded("count replies", self._replies_once, self._replies)),
        ]
        # Wait briefly for the first connection, so a healthy start is ready at once; a down Redis is not fatal.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), COMMAND_TIMEOUT)
        log.info("node %s on %s", self.node_id, _safe_url(self._url))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=COMMAND_TIMEOUT)
        self._tasks = []
        if self._cmd is not None:
            # Leave at once, so status forgets this node now rather than when its heartbeat expires.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    async with self._cmd.pipeline(transaction=True) as pipe:
                        pipe.delete(self._heartbeat_key, self._presence_key, self._replies_key)
                        pipe.srem(self._keys[0], self.node_id)
                        await pipe.execute()
        for client in (self._cmd, self._blocking):
            if client is not None:
                await client.aclose()
        self._cmd = self._blocking = None

    @property
    def reader_up(self) -> bool:
        """The stream reader is connected and has read within its block timeout (the liveness gauge)."""
        return self._reader.up and time.monotonic() - self._last_read < READ_BLOCK + READ_GRACE

    def ready(self) -> bool:
        # The replies reader too: a node whose reports from the others cannot arrive would answer its
        # publishes with nodes_missing for nothing.
        return self.reader_up and self._presence.up and self._replies.up

    # --- publish -----------------------------------------------------------------------------------------

    async def publish(self, targets: frozenset[str] | None, draft: Draft) -> Published:
        fields: dict[str, str] = {"k": draft.kind, "m": draft.message}
        if draft.data is not None:
            fields["d"] = orjson.dumps(draft.data).decode()
        if targets is not None:
            fields["t"] = ",".join(targets)  # user ids never contain a comma
        msg_id, reports, missing = await self._gather(sorted(targets) if targets is not None else [], fields)
        if msg_id is None:
            raise NobodyListening(targeted=targets is not None)
        users: set[str] = set()
        sent = total = lost = 0
        for counts in reports:
            sent, total, lost = sent + counts.sent, total + counts.total, lost + counts.lost
            users.update(counts.users or ())
        return Published(msg_id, sent, total, lost, len(users), missing)

    async def close_user(self, user_id: str, code: int, reason: str) -> tuple[int, int]:
        # A control entry on the same stream: every node closes its sockets of the user and reports how many.
        # Replay skips it (it has no message kind), and it is ordered after every message before it.
        fields = {"c": "close", "u": user_id, "code": str(code), "why": reason}
        _id, reports, missing = await self._gather(None, fields)
        return sum(counts.sent for counts in reports), missing

    async def _gather(
        self, targets: list[str] | None, fields: dict[str, str]
    ) -> tuple[MessageId | None, list[Counts], int]:
        """Add an entry unless no target is connected (targets None: add it anyway) and gather the counts.

        Returns (the id, or None when nobody was there; every report that came within PUBLISH_WAIT; the
        number of live nodes that did not report).
        """
        token = secrets.token_hex(8)
        gather = self._pending[token] = _Gather()
        try:
            head = [PREFIX, max(self._size, FEED_MIN), -1 if targets is None else len(targets), *(targets or ())]
            entry = {"o": self.node_id, "r": token, **fields}
            argv = [*head, *(x for kv in entry.items() for x in kv)]
            answer = await self._run(scripts.PUBLISH, [self._keys[0], self._keys[1]], argv)
            if not answer[0]:
                return None, [], 0
            msg_id = parse_id(answer[0])
            assert msg_id is not None, answer
            gather.expect(set(answer[1]))
            if not gather.done.is_set():
                # asyncio.timeout, not wait_for: wait_for wraps the wait in a task of its own, on every publish.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PUBLISH_WAIT):
                        await gather.done.wait()
        finally:
            del self._pending[token]
        missing = sorted((gather.expected or set()) - gather.reports.keys())
        if missing:
            log.warning("entry %s: no counts within %.1f s from node(s) %s", msg_id, PUBLISH_WAIT, ", ".join(missing))
        return msg_id, list(gather.reports.values()), len(missing)

    # --- the reader ----------------------------------------------------------------------------------------

    async def _read_once(self) -> None:
        assert self._blocking is not None
        if not self._reader.up:
            lost, last = await self._run(scripts.REPAIR, [self._keys[1], self._keys[2]], [self._last_id])
            if lost and self._last_id != "0-0":
                log.warning("Redis lost its data (a restart?): history starts again now; presence is rewritten")
            elif lost:
                log.info("Redis holds no diary-ws data yet: history starts now")
            if self._last_id == "0-0":
                self._last_id = last  # a fresh process starts at the end of the feed
        # After a reconnect the first read barely blocks, and only once it has come back is the reader up:
        # a blocking connection that went stale in a Redis restart fails on its first command (PITFALLS 7),
        # and a node must not say ready while its reader is still in backoff.
        first = not self._reader.up
        block = 1 if first else int(READ_BLOCK * 1000)
        # redis-py's default (RESP2) form: [[stream, [(id, {field: value}), ...]]], or None after the block timeout.
        reply: list[tuple[str, list[tuple[str, dict[str, str]]]]] | None = cast(
            Any, await self._blocking.xread({self._keys[1]: self._last_id}, count=READ_COUNT, block=block)
        )
        self._last_read = time.monotonic()
        if first:
            self._reader.ok()
            if self._presence.up:
                self._up.set()
        reports: list[tuple[str, bytes]] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                try:
                    report = await self._deliver(entry_id, fields)
                except Exception:  # a bad entry must not stop the feed: skip it, loudly
                    log.exception("skipping stream entry %s", entry_id)
                    report = None
                if report is not None:
                    reports.append(report)
                self._last_id = entry_id
        self._last_read = time.monotonic()
        if reports:
            assert self._cmd is not None
            async with self._cmd.pipeline(transaction=False) as pipe:
                for origin, body in reports:
                    key = f"{PREFIX}replies:{origin}"
                    pipe.rpush(key, body)
                    pipe.pexpire(key, int(HEARTBEAT_TTL * 1000))
                await pipe.execute()

    async def _deliver(self, entry_id: str, fields: dict[str, str]) -> tuple[str, bytes] | None:
        """Fan one entry out here; the report to send to its publisher, if it is another node."""
        msg_id = parse_id(entry_id)
        assert self._node is not None
        if msg_id is not None and fields.get("c") == "close":
            closed = self._node.close_local(fields["u"], int(fields["code"]), fields["why"])
            counts = Counts(closed, closed, 0, int(closed > 0), None)
        elif msg_id is not None and "k" in fields:
            targets = frozenset(fields["t"].split(",")) if "t" in fields else None
            data = orjson.loads(fields["d"]) if "d" in fields else None
            message = Message.build(msg_id, targets, Draft(fields["k"], fields["m"], data).render(msg_id))
            counts = await self._node.deliver(message, True)
        else:
            log.warning("skipping stream entry %s: not a diary-ws entry", entry_id)
            return None
        origin, token = fields.get("o"), fields.get("r", "")
        if origin == self.node_id:
            gather = self._pending.get(token)
            if gather is not None:
                gather.add(self.node_id, counts)
            return None
        if origin is None or time.time() * 1000 - msg_id.ms > REPORT_MAX_AGE_MS:
            return None
        return origin, orjson.dumps({"t": token, "n": self.node_id, "c": counts[:4], "u": counts.users})

    async def _replies_once(self) -> None:
        assert self._blocking is not None
        first = not self._replies.up  # as for the stream reader: up once a command has come back
        popped = await self._blocking.blpop([self._replies_key], timeout=0.01 if first else READ_BLOCK)
        if first:
            self._replies.ok()
        if popped is None:
            return
        report = orjson.loads(popped[1])
        gather = self._pending.get(report["t"])
        if gather is not None:
            sent, total, lost, reached = report["c"]
            gather.add(report["n"], Counts(sent, total, lost, reached, report["u"]))

    # --- presence ------------------------------------------------------------------------------------------

    async def join(self, user_id: str, limit: int) -> None:
        if not self._presence.up:
            raise BrokerUnavailable("broker unavailable: cannot record the connection; retry later")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._joins.append((user_id, limit, done))
        self._wake.set()
        await done

    def left(self, user_id: str) -> None:
        self._dirty.add(user_id)
        self._wake.set()

    async def status(self) -> tuple[list[str], int]:
        answer = await self._run(scripts.STATUS, [self._keys[0]], [PREFIX])
        users: set[str] = set()
        total = 0
        for pairs in answer[1::2]:
            users.update(pairs[0::2])
            total += sum(int(n) for n in pairs[1::2])
        return sorted(users), total

    async def _presence_once(self) -> None:
        """One turn of the presence writer: the only task that writes this node's presence, so writes never race."""
        if not self._joins and not self._dirty and not self._rewrite:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), HEARTBEAT_INTERVAL)
        self._wake.clear()
        try:
            if self._rewrite or time.monotonic() >= self._next_beat:
                await self._beat()
            await self._write_joins()
            await self._write_dirty()
        except BaseException as exc:
            self._rewrite = True  # Redis may come back without our data
            for _user, _limit, done in self._joins:
                if not done.done():
                    done.set_exception(BrokerUnavailable("broker unavailable: cannot record the connection"))
            self._joins = []
            raise exc

    async def _beat(self) -> None:
        """Refresh the heartbeat; if it had expired (or Redis lost it), write the whole presence hash again."""
        assert self._cmd is not None
        ttl = int(HEARTBEAT_TTL * 1000)
        async with self._cmd.pipeline(transaction=True) as pipe:
            pipe.set(self._heartbeat_key, str(int(time.time())), px=ttl, get=True)
            pipe.sadd(self._keys[0], self.node_id)
            pipe.pexpire(self._presence_key, ttl)
            previous = (await pipe.execute())[0]
        if previous is None or self._rewrite:
            counts = self._counts(self._presence_snapshot())
            async with self._cmd.pipeline(transaction=True) as pipe:
                pipe.delete(self._presence_key)
                if counts:
                    pipe.hset(self._presence_key, mapping=counts)  # type: ignore[arg-type]
                    pipe.pexpire(self._presence_key, ttl)
                await pipe.execute()
            self._dirty.clear()
            if previous is None and self._presence.ever:
                log.warning("presence: heartbeat had expired or Redis lost it; rewrote %d users", len(counts))
            self._rewrite = False
        self._next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        self._presence.ok()
        if self._reader.up:
            self._up.set()

    async def _write_joins(self) -> None:
        joins, self._joins = self._joins, []
        presence = self._presence_snapshot()
        for index, (user_id, limit, done) in enumerate(joins):
            if done.done():
                continue
            mine = len(presence.get(user_id, ()))
            try:
                argv = [PREFIX, self.node_id, user_id, mine, limit, int(HEARTBEAT_TTL * 1000)]
                accepted, others, registered = await self._run(scripts.JOIN, [self._keys[0]], argv)
            except BaseException:
                self._joins = joins[index:] + self._joins
                raise
            if not registered:
                self._rewrite = True
                self._wake.set()
            if accepted:
                done.set_result(None)
            else:
                done.set_exception(
                    TooManyConnections(
                        f"user {user_id} already has {others + mine - 1} open connections across the cluster, "
                        f"the most allowed (MAX_CONNECTIONS_PER_USER); close one first"
                    )
                )

    async def _write_dirty(self) -> None:
        if not self._dirty:
            return
        assert self._cmd is not None
        users, self._dirty = self._dirty, set()
        presence = self._presence_snapshot()
        try:
            async with self._cmd.pipeline(transaction=False) as pipe:
                for user_id in users:
                    count = len(presence.get(user_id, ()))
                    if count:
                        pipe.hset(self._presence_key, user_id, count)
                    else:
                        pipe.hdel(self._presence_key, user_id)
                await pipe.execute()
        except BaseException:
            self._dirty |= users
            raise

    def _presence_snapshot(self) -> dict[str, Any]:
        assert self._node is not None
        return dict(self._node.presence())

    @staticmethod
    def _counts(presence: dict[str, Any]) -> dict[str, int]:
        return {user_id: len(conns) for user_id, conns in presence.items() if len(conns)}

    # --- history -------------------------------------------------------------------------------------------

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        answer = await self._run(scripts.REPLAY, [self._keys[1]], [str(since), self._size + 1])
        seconds, micros, last, deleted, entries = answer
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        cutoff = now_ms - self._ttl * 1000
        floor = parse_id(deleted) or MessageId(0, 0)
        window: list[tuple[MessageId, dict[str, str]]] = []
        for entry_id, flat in entries:  # newest first
            msg_id = parse_id(entry_id)
            if msg_id is None:
                continue
            if len(window) == self._size or msg_id.ms < cutoff:
                floor = max(floor, msg_id)  # outside the history: as good as deleted
                break
            window.append((msg_id, dict(zip(flat[0::2], flat[1::2], strict=True))))
        found: list[Message] = []
        for msg_id, fields in reversed(window):
            targets = frozenset(fields["t"].split(",")) if "t" in fields else None
            if "k" not in fields or (targets is not None and user_id not in targets):
                continue
            data = orjson.loads(fields["d"]) if "d" in fields else None
            found.append(Message.build(msg_id, targets, Draft(fields["k"], fields["m"], data).render(msg_id)))
        # As in memory mode: up to Redis's "now", nothing newer than the last id was added, so a `since` in
        # between misses nothing (a client that saw no message yet resumes from the time it connected).
        top = max(parse_id(last) or MessageId(0, 0), MessageId(now_ms, 2**64 - 1))
        return Replay(found, floor <= since <= top)

    async def replay_page(self, user_id: str, after: MessageId, limit: int, max_bytes: int) -> Page:
        # Not paged yet: reads the whole window and returns the first page of it.
        replay = await self.replay(user_id, after)
        found: list[Message] = []
        size = 0
        for message in replay.messages:
            if len(found) >= limit or size >= max_bytes:
                return Page(found, found[-1].id, True, replay.recovered)
            found.append(message)
            size += message.size
        return Page(found, found[-1].id if found else after, False, replay.recovered)

    # --- state the cluster shares: rate-limit buckets and idempotency keys ---------------------------------

    def shared(self) -> RedisBackend:
        return self

    async def take_token(self, bucket: str, burst: int, per_second: float) -> tuple[bool, float]:
        ttl_ms = int((burst / per_second + 1) * 1000)  # a bucket idle this long is full: forgetting it is the same
        taken, tokens = await self._run(scripts.RATE, [_hashed("rate", bucket)], [burst, per_second, ttl_ms])
        return bool(taken), float(tokens)

    async def idem_begin(self, key: str, print_: str, busy_ttl: float) -> tuple[str, int, str]:
        answer = await self._run(scripts.IDEM_BEGIN, [_hashed("idem", key)], [print_, int(busy_ttl * 1000)])
        if answer[0] == "done":
            return "done", int(answer[1]), answer[2]
        return answer[0], 0, ""

    async def idem_finish(self, key: str, status: int, body: str, ttl: float) -> None:
        await self._run(scripts.IDEM_FINISH, [_hashed("idem", key)], [status, body, int(ttl * 1000)])

    async def idem_abandon(self, key: str) -> None:
        await self._run(scripts.IDEM_ABANDON, [_hashed("idem", key)], [])

    # --- plumbing -------------------------------------------------------------------------------------------

    async def _run(self, source: str, keys: list[str], argv: list[Any]) -> Any:
        """Run a script; any Redis failure becomes BrokerUnavailable for the caller."""
        if self._cmd is None:
            raise BrokerUnavailable("broker unavailable: the backend is not started (run the app's lifespan)")
        try:
            # EVALSHA; after a Redis restart forgot the script, redis-py loads it again.
            return await self._scripts[source](keys, argv)
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"broker unavailable ({type(exc).__name__}); retry later") from exc

    async def _guarded(self, what: str, once: Callable[[], Awaitable[None]], state: _State | None) -> None:
        """Run `once` forever; on a Redis failure, log the change of state and retry with backoff."""
        delay = RETRY_FIRST
        while not self._stopping:
            try:
                await once()
                delay = RETRY_FIRST
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, BrokerUnavailable) as exc:
                if self._stopping:
                    return  # redis-py turns the cancellation of a blocking read into a connection error
                cause = exc.__cause__ if isinstance(exc, BrokerUnavailable) and exc.__cause__ else exc
                if state is not None:
                    state.failed(cause, RETRY_MAX)
                else:
                    log.debug("%s: %r", what, cause)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            except Exception:
                log.exception("%s failed; restarting it in %.1f s", what, delay)  # a bug of ours: say so loudly
                if state is not None:
                    state.up = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)


def _hashed(kind: str, key: str) -> str:
    """A Redis key for an API key, address or Idempotency-Key: hashed, so no secret is ever a key name."""
    return f"{PREFIX}{kind}:{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def _safe_url(url: str) -> str:
    """The URL without its password, for the log."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
