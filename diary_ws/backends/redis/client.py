"""The Redis connections, the constants every part shares, and the plumbing: scripts, retries, states.

`RedisCore` holds the state of one node (its connections, its reader position, its pending publishes, its
presence queue); the feed, presence, replay and store mixins of `RedisBackend` each work on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from diary_ws.backends.base import Node
from diary_ws.errors import BrokerUnavailable

if TYPE_CHECKING:
    from diary_ws.backends.redis.feed import _Gather

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
    # A pooled connection that went stale across a Redis restart fails its next command with ConnectionError:
    # health checks catch most before use, and a short retry covers the rest.
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


class RedisCore:
    """The state of one node of a diary-ws cluster that shares one Redis, and the plumbing every part uses."""

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
        self._inbox_key = f"{PREFIX}inbox:{self.node_id}"  # what the publish script routes to this node

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
