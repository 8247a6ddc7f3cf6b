"""The Redis connections, the constants every part shares, and the plumbing: scripts, retries, states.

`RedisCore` holds the state of one node (its connections, its reader position, its pending publishes, its
presence queue); the feed, presence, replay and store mixins of `RedisBackend` each work on it.
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
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from diary_ws import deadline
from diary_ws.backends.redis import scripts
from diary_ws.errors import BrokerUnavailable, OutcomeUnknown
from diary_ws.messages import MessageId
from diary_ws.protocols import CloseCode, Node

if TYPE_CHECKING:
    from diary_ws.backends.redis.feed import _Gather

log = logging.getLogger("diary_ws.redis")

TRIM_EVERY = 1.0  # seconds: how often a node's reader checks HISTORY_BYTES, while entries come in


PREFIX = "diary-ws:"  # every key's prefix on one Redis
# On Redis Cluster every key carries one hash tag, so all of them live in one hash slot: each script may then
# touch any of them in one atomic step, as on one Redis (docs/cluster.md, "Redis Cluster").
CLUSTER_PREFIX = "{diary-ws}:"
CLUSTER_SCHEMES = {"redis-cluster": "redis", "rediss-cluster": "rediss"}
HEARTBEAT_INTERVAL = 2.0  # seconds between a node's heartbeats
HEARTBEAT_TTL = 6.0  # a node silent this long is dead: its users leave status, publishes stop waiting for it
PUBLISH_WAIT = 1.0  # the longest a publish waits for the other nodes' counts
READ_BLOCK = 1.5  # XREAD BLOCK, seconds; a reader silent for longer than this plus READ_GRACE is stalled
READ_GRACE = 1.0
READ_COUNT = 500  # entries per XREAD
REPORT_MAX_AGE_MS = 60_000  # entries older than this (a reader catching up) are delivered but not reported
# The reconnect backoff of the reader and the presence writer, seconds. Capped at one heartbeat, so a node
# rewrites its presence within about one heartbeat of Redis coming back.
RETRY_FIRST, RETRY_MAX = 0.1, HEARTBEAT_INTERVAL
COMMAND_TIMEOUT = 2.0  # socket timeout of ordinary commands
TOKEN_TTL = 30.0  # seconds a publish's own record lives: longer than any of its retries can take to run
CLOSE_TRY_AGAIN = CloseCode.TRY_AGAIN_LATER  # the close code of a socket that must resume
REDIRECTS = 5  # MOVED or ASK answers one script follows before it counts as failed (Redis Cluster)
TRYAGAIN_PAUSE, TRYAGAIN_PAUSE_MAX = 0.05, 0.2  # seconds before a script is sent again after TRYAGAIN
MOVING_SCRIPTS = frozenset((scripts.PUBLISH, scripts.PUBLISH_BATCH))  # the scripts that may answer 'moving'
NON_LOCAL = "non local key"  # Redis Cluster's refusal of a key, inside a script, that has moved to another master
BACKGROUND_BOUND = 3 * COMMAND_TIMEOUT  # the longest a script outside a request may take, retries included
FEED_MIN = 1000  # the stream keeps at least this many entries, so a reader can catch up after a short outage


def is_cluster(url: str) -> bool:
    """Whether BROKER_URL names a Redis Cluster (`redis-cluster://`, `rediss-cluster://`)."""
    return url.partition("://")[0] in CLUSTER_SCHEMES


def key_prefix(url: str) -> str:
    return CLUSTER_PREFIX if is_cluster(url) else PREFIX


def _client(url: str, socket_timeout: float, retries: int) -> Redis:
    # A pooled connection that went stale across a Redis restart fails its next command with ConnectionError:
    # health checks catch most before use, and a short retry covers the rest.
    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        # redis-py's cluster client finds every master from any one node, follows MOVED after a failover or a
        # resharding, and sends each command to the master of its key's slot (all of ours are in one slot).
        cluster = RedisCluster.from_url(
            f"{CLUSTER_SCHEMES[scheme]}://{rest}",
            decode_responses=True,
            socket_timeout=socket_timeout,
            socket_connect_timeout=COMMAND_TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.4, base=0.05), retries),
        )
        return cast(Redis, cluster)  # the commands we use have the same signatures on both
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=COMMAND_TIMEOUT,
        health_check_interval=1,
        retry=Retry(ExponentialBackoff(cap=0.4, base=0.05), retries),
    )


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


class _Attempt:
    """Whether a command may have left for Redis (after that, a failure leaves its outcome unknown)."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


class RedisCore:
    """The state of one node of a diary-ws cluster that shares one Redis, and the plumbing every part uses."""

    def __init__(
        self,
        url: str,
        history_size: int,
        history_ttl: float,
        history_bytes: int = 64 * 1024 * 1024,
        *,
        shard: tuple[str, RedisCore | None] | None = None,
    ) -> None:
        """`shard`: this core is one shard of a node on Redis Cluster (backends/redis/sharded.py): its key prefix
        (a hash tag of its own), and the node's first shard, whose node id it takes and whose reader of count
        replies it shares (one reply list per node, however many shards)."""
        self._url = url
        self._size = history_size
        self._ttl = history_ttl
        self._max_bytes = history_bytes
        self._trimmed_at = 0.0  # monotonic time of the last HISTORY_BYTES trim (see ReplayMixin._trim_bytes)
        first = shard[1] if shard is not None else None
        self.node_id: str = first.node_id if first else f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._node: Node | None = None
        self._cmd: Redis | None = None  # ordinary commands
        self._blocking: Redis | None = None  # XREAD BLOCK and BLPOP
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._last_id = "0-0"  # the reader's position; kept across outages
        self._last_read = 0.0  # monotonic time the reader last heard from Redis
        label = f" ({shard[0].strip('{}:')})" if shard is not None else ""
        self._reader = _State(f"stream reader{label}")
        self._presence = _State(f"presence{label}")
        self._replies: _State = first._replies if first else _State("count replies")
        self._pending: dict[str, _Gather] = first._pending if first else {}
        self._dirty: set[str] = set()  # users whose count here changed since the last write
        self._joins: list[tuple[str, int, asyncio.Future[None]]] = []
        self._rewrite = True  # write the whole presence hash (first beat, or Redis may have lost it)
        self._wake = asyncio.Event()
        self._next_beat = 0.0
        self._up = asyncio.Event()  # set once both the reader and the presence writer have reached Redis
        self._scripts: dict[str, AsyncScript] = {}
        self._prefix = prefix = shard[0] if shard is not None else key_prefix(url)
        self._reads_replies = first is None  # a shard other than the first leaves the count replies to it
        self._keys = (prefix + "nodes", prefix + "feed", prefix + "epoch")
        self._presence_key = f"{prefix}presence:{self.node_id}"
        self._heartbeat_key = f"{prefix}node:{self.node_id}"
        self._replies_key: str = first._replies_key if first else f"{prefix}replies:{self.node_id}"
        self._replies_prefix = first._prefix if first else prefix  # where the other nodes' reports go
        self._inbox_key = f"{prefix}inbox:{self.node_id}"  # what the publish script routes to this node
        self._indexed: set[str] = set()  # users this node has an entry for in their `where:<user>` index
        # user -> the oldest rejoin mark (scripts.BEAT) a socket of the user here may have joined before; a mark
        # newer than that closes the user's sockets here (FeedMixin._rejoined).
        self._joined: dict[str, MessageId] = {}
        self._joining: dict[str, int] = {}  # user -> sockets here whose JOIN has not answered yet
        self._last_mark = MessageId(0, 0)  # the newest rejoin mark the reader has met
        # The newest id a publish of this node was answered for: the heartbeat checks Redis still has it (BEAT).
        self._stored = MessageId(0, 0)
        self._epoch = ""  # the name of Redis's data this node's reader last repaired or found (scripts.REPAIR)
        self._clock: tuple[float, float] | None = None  # (Redis's TIME in ms, monotonic s) at the last heartbeat

    # --- plumbing -------------------------------------------------------------------------------------------

    async def _trim_bytes(self) -> None:
        """HISTORY_BYTES on the stream: every node's reader, at most once a second while entries come in, has
        Redis trim the oldest entries when the stream's memory (Redis's own sampled estimate) is over the cap.
        So the stream can pass the cap by what arrives within a second plus the estimate's error; trimmed
        entries count as deleted, and a resume from before them is `recovered: false`."""
        now = time.monotonic()
        if now - self._trimmed_at < TRIM_EVERY:
            return
        self._trimmed_at = now
        try:
            _used, trimmed = await self._run(scripts.TRIM_BYTES, [self._keys[1]], [self._max_bytes])
        except BrokerUnavailable:
            return  # the reader's own next command says so; the trim waits for the next turn
        if trimmed:
            log.info("trimmed %d entries off the stream: over HISTORY_BYTES (%d)", trimmed, self._max_bytes)

    async def _run(self, source: str, keys: list[str], argv: list[Any]) -> Any:
        """Run a script that is safe to run twice (a read, a presence write, a token bucket), within the
        request's deadline (diary_ws.deadline), redis-py's own retries included; any failure, a timeout
        included, becomes BrokerUnavailable for the caller."""
        if self._cmd is None:
            raise BrokerUnavailable("broker unavailable: the backend is not started (run the app's lifespan)")
        budget = deadline.left(BACKGROUND_BOUND)
        if budget <= 0:
            raise BrokerUnavailable("broker unavailable: no time was left for it; retry later")
        try:
            async with asyncio.timeout(budget):
                if isinstance(self._cmd, RedisCluster):
                    # Not redis-py's Script: after NOSCRIPT it loads the script on every master, and one master
                    # down then fails a script that only needs another.
                    return await self._cluster_script_once(self._cmd, source, keys, argv, _Attempt())
                # EVALSHA; after a Redis restart forgot the script, redis-py loads it again.
                return await self._scripts[source](keys, argv)
        except Exception as exc:  # asyncio's TimeoutError is an OSError
            if not broker_fault(exc):
                raise
            raise BrokerUnavailable(f"broker unavailable ({type(exc).__name__}); retry later") from exc

    async def _store(self, keys: list[str], argv: list[Any], what: str, source: str = scripts.PUBLISH) -> Any:
        """Run the PUBLISH script (or PUBLISH_BATCH), which stores at most once per request token, until it
        answers or the deadline passes.

        Its own connection and no redis-py retry, so a failure is known to have come before the command
        was sent (nothing stored: the caller answers 503) or after (maybe stored: 504). Within the deadline
        it is sent again after either: the script recognises an earlier attempt of the same request.
        Returns (the script's answer, whether an earlier attempt may have been run).
        """
        if self._cmd is None:
            raise BrokerUnavailable("broker unavailable: the backend is not started (run the app's lifespan)")
        until = deadline.until(COMMAND_TIMEOUT)
        sent = False
        delay = 0.05
        while True:
            attempt = _Attempt()
            try:
                async with asyncio.timeout(until - time.monotonic()):
                    return await self._script_once(source, keys, argv, attempt), sent
            except Exception as exc:
                if not broker_fault(exc):
                    raise
                sent = sent or attempt.sent
                failure: BaseException = exc
            if time.monotonic() + delay >= until:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.4)
        if sent:
            raise OutcomeUnknown(
                f"the broker did not answer in time ({type(failure).__name__}): {what} may or may not have been "
                "sent; a retry with the same Idempotency-Key is safe (without one, a retry may send it twice)"
            ) from failure
        raise BrokerUnavailable(
            f"broker unavailable ({type(failure).__name__}): {what} was not sent; retry later"
        ) from failure

    async def _script_once(self, source: str, keys: list[str], argv: list[Any], attempt: _Attempt) -> Any:
        """Send one script on a pooled connection, noting in `attempt` when the command may have left."""
        assert self._cmd is not None
        if isinstance(self._cmd, RedisCluster):
            return await self._cluster_script_once(self._cmd, source, keys, argv, attempt)
        pool = self._cmd.connection_pool
        conn = await cast(Any, pool).get_connection()  # connects (and handshakes) if it must: nothing of ours sent yet
        try:
            await conn.check_health()  # the PING after an idle spell, before our command
            attempt.sent = True
            script = self._scripts[source]
            await conn.send_command("EVALSHA", script.sha, len(keys), *keys, *argv, check_health=False)
            try:
                try:
                    return await conn.read_response()
                except NoScriptError:  # a restarted Redis forgot it: it did not run, so sending the source is safe
                    await conn.send_command("EVAL", source, len(keys), *keys, *argv, check_health=False)
                    return await conn.read_response()
            except ResponseError:
                # Redis answered with a refusal (out of memory, busy, a read-only replica): our scripts write
                # nothing before the point where one could fail, so nothing was stored.
                attempt.sent = False
                raise
        except BaseException:
            await conn.disconnect(nowait=True)  # whatever is left unread on it must not reach the next user
            raise
        finally:
            await pool.release(conn)

    async def _cluster_script_once(
        self, cluster: RedisCluster, source: str, keys: list[str], argv: list[Any], attempt: _Attempt
    ) -> Any:
        """`_script_once` on Redis Cluster: on a connection to the master of the keys' slot, as the cluster
        client knows it. A slot that moved (MOVED: the client learns where) or is moving (ASK: the keys are
        already there, asked with ASKING) is followed here, a few times; a slot half moved (TRYAGAIN: its
        keys on both sides for the moment) is waited out, within the caller's deadline. None of those
        answers ran the script, and a heartbeat or a publish must not fail for a rebalance. CLUSTERDOWN (a
        failover under way) is raised: `_store` and the background tasks send the script again after a pause."""
        await cluster.initialize()  # reads the layout if it has none (first use, or forgotten below)
        asked: ClusterNode | None = None
        redirects, pause = 0, TRYAGAIN_PAUSE
        while True:  # every caller bounds it with its deadline (`_run`, `_store`)
            node = asked or cluster.get_node_from_key(keys[0])
            if node is None:
                raise ClusterDownError(f"no master serves the slot of {keys[0]} now")
            try:
                return await self._script_on(cluster, node, source, keys, argv, attempt, asking=asked is not None)
            except (MovedError, AskError) as exc:
                redirects += 1
                if redirects > REDIRECTS:  # the masters disagree (a layout still settling): a fault for now
                    raise
                if isinstance(exc, MovedError):
                    await cluster.nodes_manager.move_slot(exc)
                    asked = None
                else:
                    asked = _ask_target(cluster, exc, keys[0])
            except TryAgainError:
                # A slot half moved, for as long as the operator's migration of its keys takes: wait it out.
                asked = None
                await asyncio.sleep(pause)
                pause = min(pause * 2, TRYAGAIN_PAUSE_MAX)

    async def _script_on(
        self,
        cluster: RedisCluster,
        node: ClusterNode,
        source: str,
        keys: list[str],
        argv: list[Any],
        attempt: _Attempt,
        asking: bool,
    ) -> Any:
        """One try of `_cluster_script_once` on `node` (after ASKING, which holds for the next command on the
        same connection only)."""
        conn = node.acquire_connection()
        try:
            await cast(Any, conn).connect()  # connects (and handshakes) if it must: nothing of ours sent yet
            if asking:
                await _asking(conn)
            attempt.sent = True
            script = self._scripts[source]
            await conn.send_command("EVALSHA", script.sha, len(keys), *keys, *argv)
            try:
                try:
                    answer = await conn.read_response()
                except NoScriptError:  # a master that never saw it (new, or promoted): sending the source is safe
                    if asking:
                        await _asking(conn)
                    await conn.send_command("EVAL", source, len(keys), *keys, *argv)
                    answer = await conn.read_response()
            except ResponseError as exc:
                # MOVED, ASK, TRYAGAIN and CLUSTERDOWN are refusals before the script ran, as in _script_once.
                attempt.sent = False
                if NON_LOCAL in str(exc):
                    # A key of a slot being moved was already on the other master, found before PUBLISH's writes
                    # (scripts.py, `here`); a heartbeat's may come after some, which its next beat writes again.
                    raise TryAgainError(str(exc)) from exc
                raise
            if source in MOVING_SCRIPTS and answer[0] == "moving":  # scripts.py, `here`: nothing written
                # Only theirs: another script's answer may open with a user id, and "moving" is one.
                attempt.sent = False
                raise TryAgainError(f"the slot of {keys[0]} is being moved: a key is on the other master now")
            return answer
        except (ConnectionError, OSError):
            await conn.disconnect()
            # The master may be gone for good (a failover): read the layout again, so the next attempt asks the
            # node that serves the slot now. Not `aclose()`, which would close the connections other requests
            # are using; a failure here is the same broker fault, and the next one tries again.
            with contextlib.suppress(RedisError, OSError, RedisClusterException):
                await cluster.nodes_manager.initialize()
            raise
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)

    async def _blocking_read(self, key: str, *args: Any) -> Any:
        """A blocking read (XREAD BLOCK, BLPOP on `key`) on the blocking client; None after its timeout.

        On Redis Cluster, sent to the master of `key`'s slot by us rather than redis-py, which follows a MOVED
        by sending the read again inside the same call: through a slot migration one read then blocked on the
        old master and again on the new one, longer than READ_BLOCK + READ_GRACE, and the node read as stalled
        (not ready: its POSTs got 503) with nothing wrong. Here a MOVED is a read of nothing that teaches the
        client the slot's new master; an ASK (the key has moved ahead of its slot) reads there once."""
        client = self._blocking
        assert client is not None
        if not isinstance(client, RedisCluster):
            return await cast(Any, client).execute_command(*args)
        await client.initialize()  # reads the layout if it has none (first use, or forgotten below)
        node = client.get_node_from_key(key)
        if node is None:
            raise ClusterDownError(f"no master serves the slot of {key} now")
        try:
            return await _read_on(node, args)
        except MovedError as exc:
            await client.nodes_manager.move_slot(exc)
            return None
        except AskError as exc:
            return await _read_on(_ask_target(client, exc, key), args, asking=True)
        except (ConnectionError, OSError):
            with contextlib.suppress(RedisError, OSError, RedisClusterException):  # as in _cluster_script_once
                await client.nodes_manager.initialize()
            raise

    def _resync(self, why: str) -> None:
        """Close every socket here with 1013, so each resumes with `since` and hears of any gap."""
        assert self._node is not None
        self._joined.clear()
        self._last_mark = MessageId(0, 0)  # after a loss of Redis's data its marks are gone too
        users = list(self._node.presence())
        closed = sum(self._node.close_local(user, CLOSE_TRY_AGAIN, "messages may be missing: reconnect with since")
                     for user in users)  # fmt: skip
        if closed:
            log.warning("%s: closed its %d sockets with %d so they resume", why, closed, CLOSE_TRY_AGAIN)

    def _close_for_mark(self, user_id: str) -> int:
        """Close the user's sockets here with 1013: one of them joined before a rejoin mark (scripts.BEAT)."""
        assert self._node is not None
        self._joined.pop(user_id, None)
        return self._node.close_local(user_id, CLOSE_TRY_AGAIN, "messages may be missing: reconnect with since")

    def _redis_ms(self) -> float | None:
        """Redis's clock now, in ms, from its last TIME and this process's monotonic clock since; None before
        the first. Ages of stream ids are measured on it, so no node's wall clock matters."""
        if self._clock is None:
            return None
        redis_ms, at = self._clock
        return redis_ms + (time.monotonic() - at) * 1000

    async def _guarded(self, what: str, once: Callable[[], Awaitable[None]], state: _State | None) -> None:
        """Run `once` forever; on a Redis failure, log the change of state and retry with backoff."""
        delay = RETRY_FIRST
        while not self._stopping:
            try:
                await once()
                delay = RETRY_FIRST
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, BrokerUnavailable) or broker_fault(exc):
                    if self._stopping:
                        return  # redis-py turns the cancellation of a blocking read into a connection error
                    cause = exc.__cause__ if isinstance(exc, BrokerUnavailable) and exc.__cause__ else exc
                    if state is not None:
                        state.failed(cause, RETRY_MAX)
                    else:
                        log.debug("%s: %r", what, cause)
                else:
                    log.exception("%s failed; restarting it in %.1f s", what, delay)  # a bug of ours: say so loudly
                    if state is not None:
                        state.up = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)


def _ask_target(cluster: RedisCluster, exc: AskError, key: str) -> ClusterNode:
    """The master an ASK points to: the one `key` has already moved to, ahead of its slot."""
    target = cluster.get_node(host=exc.host, port=exc.port)
    if target is None:
        raise ClusterDownError(f"{key}: its slot moves to {exc.host}:{exc.port}, not known yet") from exc
    return target


async def _asking(conn: Any) -> None:
    """ASKING on `conn`: it lets the next command on this connection alone reach a slot still being imported."""
    await conn.send_command("ASKING")
    await conn.read_response()


async def _read_on(node: ClusterNode, args: tuple[Any, ...], asking: bool = False) -> Any:
    """Send `args` on one connection of `node` (after ASKING, which holds for the next command on that
    connection only) and read the answer, parsed as redis-py parses it; a connection that failed or was
    interrupted mid-read is closed, so no late answer reaches its next user."""
    conn = node.acquire_connection()
    try:
        await cast(Any, conn).connect()
        if asking:
            await _asking(conn)
        await conn.send_command(*args)
        return await node.parse_response(conn, str(args[0]))
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        node.release(conn)


def broker_fault(exc: BaseException) -> bool:
    """Whether `exc` is a failure to reach Redis (the request gets 503 or 504, a background task retries),
    rather than a bug.

    redis-py's own errors and OSError (asyncio's TimeoutError among them) are, and RedisClusterException (not a
    RedisError: the cluster client's "no node answers" or "slots not covered"). So, on Redis Cluster, is a
    RuntimeError or AttributeError raised inside redis-py: during a failover its cluster client closes every
    connection of a node that other tasks are still using (redis-py 8.1, `RedisCluster._execute_command` on
    CLUSTERDOWN), and those tasks then meet a closed transport or a connection without a writer.
    """
    if isinstance(exc, (RedisError, OSError, RedisClusterException)):  # the last: no node of the cluster answers
        return True
    if isinstance(exc, (RuntimeError, AttributeError)):
        tb = exc.__traceback__
        inside = False
        while tb is not None:  # from our call down to where it was raised
            name = tb.tb_frame.f_code.co_filename
            inside = inside or f"{os.sep}redis{os.sep}" in name
            tb = tb.tb_next
        return inside
    return False


def _hashed(kind: str, key: str, prefix: str = PREFIX) -> str:
    """A Redis key for an API key, address or Idempotency-Key: hashed, so no secret is ever a key name."""
    return f"{prefix}{kind}:{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def _safe_url(url: str) -> str:
    """The URL without its password, for the log."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
