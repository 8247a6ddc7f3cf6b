"""The scale-out backend on Redis ≥ 7: routed inboxes, a per-user index, presence, heartbeats, gathered counts.

The layout and its costs are in docs/cluster.md.

- **Feed.** Every message's body is one entry of one stream (`<prefix>feed`, XADD with an approximate MAXLEN);
  the stream id is the message id. The publish script also writes the entry to the inbox stream of each node
  it goes to (`<prefix>inbox:<node>`): for a targeted message the nodes that hold its users, for a broadcast
  every live node. Each process runs one reader (XREAD BLOCK on its inbox) and fans every entry out to its
  own sockets, in id order.
- **History.** A targeted message's id goes into each target's index (`<prefix>u:<user>`), a broadcast's into
  `<prefix>all`; `?since=` reads those two and fetches only what it returns. The window (HISTORY_SIZE
  messages, one for all users as in memory mode) is kept by a counter and a ring of ids.
- **Presence.** Each node keeps a hash user -> its socket count (`<prefix>presence:<node>`) and the same count
  in each user's index (`<prefix>where:<user>`, node -> count), written when a socket comes or goes, and a
  heartbeat key with a TTL. A node whose heartbeat expired is forgotten by the next script that looks, so its
  users leave `status` within HEARTBEAT_TTL. The heartbeat that revives an expired one writes a `rejoin`
  mark into the node's inbox; its reader closes the sockets that joined before the mark with 1013
  (publishes skipped the node meanwhile) before it delivers anything newer.
- **Counts.** The publisher names itself and a token in the entry. Each node the entry went to reports its
  counts: the publisher's own reader directly, the others by RPUSH onto the publisher's reply list, which one
  task per node reads (BLPOP). The publisher waits up to PUBLISH_WAIT for exactly those nodes.
- **Failure.** Nothing here raises into a request except as BrokerUnavailable (503). The reader and the
  presence writer retry with backoff and log once per change of state; `ready()` is false while either is
  down or the reader has stalled past its block timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from diary_ws.backends.redis import scripts
from diary_ws.backends.redis.client import (
    COMMAND_TIMEOUT,
    FEED_MIN,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TTL,
    PREFIX,
    PUBLISH_WAIT,
    READ_BLOCK,
    READ_COUNT,
    READ_GRACE,
    REPORT_MAX_AGE_MS,
    RETRY_FIRST,
    RETRY_MAX,
    _client,
    _safe_url,
    broker_fault,
    log,
)
from diary_ws.backends.redis.feed import FeedMixin
from diary_ws.backends.redis.presence import PresenceMixin
from diary_ws.backends.redis.replay import ReplayMixin
from diary_ws.backends.redis.store import StoreMixin
from diary_ws.protocols import Node


class RedisBackend(FeedMixin, PresenceMixin, ReplayMixin, StoreMixin):
    """One node of a diary-ws cluster that shares one Redis: its lifecycle; each job lives in its own module."""

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
            loop.create_task(self._guarded(self._reader.what, self._read_once, self._reader)),
            loop.create_task(self._guarded(self._presence.what, self._presence_once, self._presence)),
        ]
        if self._reads_replies:
            self._tasks.append(loop.create_task(self._guarded("count replies", self._replies_once, self._replies)))
        # Wait briefly for the first connection, so a healthy start is ready at once; a down Redis is not fatal.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), COMMAND_TIMEOUT)
        if self._reads_replies:
            log.info("node %s on %s", self.node_id, _safe_url(self._url))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=COMMAND_TIMEOUT)
        self._tasks = []
        if self._cmd is not None:
            # Leave at once, so status forgets this node now rather than when its heartbeat expires.
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT):
                    users = self._indexed
                    async with self._cmd.pipeline(transaction=True) as pipe:
                        # One slot per transaction on Redis Cluster: the reply list is the first shard's.
                        mine = (self._replies_key,) if self._reads_replies else ()
                        pipe.delete(self._heartbeat_key, self._presence_key, self._inbox_key,
                                    f"{self._prefix}life:{self.node_id}", *mine)  # fmt: skip
                        pipe.srem(self._keys[0], self.node_id)
                        for user_id in users:
                            pipe.hdel(f"{self._prefix}where:{user_id}", self.node_id)
                        await pipe.execute()
            except Exception as exc:  # the heartbeat's expiry does the same, later
                if not broker_fault(exc):
                    raise
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


__all__ = [
    "COMMAND_TIMEOUT",
    "FEED_MIN",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_TTL",
    "PREFIX",
    "PUBLISH_WAIT",
    "READ_BLOCK",
    "READ_COUNT",
    "READ_GRACE",
    "REPORT_MAX_AGE_MS",
    "RETRY_FIRST",
    "RETRY_MAX",
    "RedisBackend",
    "scripts",
]
