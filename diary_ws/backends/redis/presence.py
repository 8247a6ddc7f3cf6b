"""Presence: this node's hash of user -> socket count, its heartbeat, the per-user limit, and `status`.

Each count is written twice: in this node's hash (`presence:<node>`, for `status` and for the rewrite after
Redis lost it) and in the user's index (`where:<user>`, node -> count), which the publish script reads to
route a targeted message to the nodes that hold its users and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from diary_ws import deadline
from diary_ws.backends import first_ids
from diary_ws.backends.redis import scripts
from diary_ws.backends.redis.client import (
    COMMAND_TIMEOUT,
    FEED_MIN,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_TTL,
    RedisCore,
    broker_fault,
    log,
)
from diary_ws.errors import BrokerUnavailable, TooManyConnections
from diary_ws.messages import MessageId, parse_id
from diary_ws.protocols import NodeInfo


class PresenceMixin(RedisCore):
    """The presence writer (the only task that writes this node's presence) and the reads of everyone's."""

    # --- presence ------------------------------------------------------------------------------------------

    async def join(self, user_id: str, limit: int) -> None:
        if not self._presence.up:
            raise BrokerUnavailable("broker unavailable: cannot record the connection; retry later")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._joins.append((user_id, limit, done))
        self._joining[user_id] = self._joining.get(user_id, 0) + 1
        self._wake.set()
        try:
            # A handshake waits no longer than a request would: the writer may be stuck on a silent Redis.
            async with asyncio.timeout(deadline.left(COMMAND_TIMEOUT)):
                await done  # cancelled on timeout: the writer then skips it
        except TimeoutError:
            raise BrokerUnavailable("broker unavailable: cannot record the connection in time; retry later") from None
        finally:
            self._joining[user_id] -= 1
            if not self._joining[user_id]:
                del self._joining[user_id]

    def left(self, user_id: str) -> None:
        self._dirty.add(user_id)
        self._wake.set()

    async def connections(self, user_id: str) -> int:
        return int(await self._run(scripts.PRESENCE, [self._keys[0]], [self._prefix, user_id]))

    async def connected(self, users: list[str]) -> tuple[bool, set[str]]:
        """Whether anybody is connected on a live node, and which of `users` are (for a batch over shards)."""
        answer = await self._run(scripts.CONNECTED, [self._keys[0]], [self._prefix, *users])
        return bool(answer[0]), {user for user, there in zip(users, answer[1:], strict=True) if there}

    async def status(self, limit: int | None = None) -> tuple[list[str], int, int]:
        answer = await self._run(scripts.STATUS, [self._keys[0]], [self._prefix])
        users: set[str] = set()
        total = 0
        for pairs in answer[1::2]:
            users.update(pairs[0::2])
            total += sum(int(n) for n in pairs[1::2])
        return first_ids(users, limit), len(users), total

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes (STATUS drops those whose heartbeat expired) and when each last beat."""
        answer = await self._run(scripts.STATUS, [self._keys[0]], [self._prefix])
        names: list[str] = answer[0::2]
        assert self._cmd is not None  # _run has checked
        try:
            async with self._cmd.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.get(f"{self._prefix}node:{name}")  # the heartbeat key holds the Unix time of the beat
                beats = await pipe.execute()
        except Exception as exc:
            if not broker_fault(exc):
                raise
            raise BrokerUnavailable(f"broker unavailable ({type(exc).__name__}); retry later") from exc
        found = [
            NodeInfo(name, name == self.node_id, {u: int(n) for u, n in zip(pairs[0::2], pairs[1::2], strict=True)},
                     float(beat) if beat is not None and beat.isdigit() else None)
            for name, pairs, beat in zip(names, answer[1::2], beats, strict=True)
        ]  # fmt: skip
        found.sort(key=lambda node: (not node.here, node.node_id))
        return found

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
        """Refresh the heartbeat; if it had expired (or Redis lost it), write the whole presence hash again.

        Whether the node must close its sockets because its heartbeat had expired is not decided here: the
        script writes a mark in this node's inbox, which the reader meets in order (scripts.BEAT).
        """
        assert self._cmd is not None
        ttl = int(HEARTBEAT_TTL * 1000)
        # The value is when this node beat (its own clock): the console shows it; nothing compares it.
        beat = str(int(time.time()))
        argv = [
            self._prefix,
            self.node_id,
            beat,
            ttl,
            self._epoch,
            max(self._size, FEED_MIN),
            FEED_MIN,
            int(self._presence.ever),
            str(max(self._stored, parse_id(self._last_id) or MessageId(0, 0))),
        ]
        asked = time.monotonic()
        previous, seconds, micros, _epoch, _mark, lost = await self._run(
            scripts.BEAT, [*self._keys, self._heartbeat_key], argv
        )
        if lost:
            log.warning("Redis no longer holds messages this node knew were stored, up to %s (a failover to a "
                        "replica that had not got them?): a resume from before them says recovered: false",
                        argv[-1])  # fmt: skip
        # Redis's clock, for the ages of entries (`_redis_ms`); taken half way through the round trip.
        self._clock = (int(seconds) * 1000 + int(micros) / 1000, (asked + time.monotonic()) / 2)
        if previous is None or self._rewrite:
            counts = self._counts(self._presence_snapshot())
            # The per-user index too: this node's entry for every user here, and none for a user no longer here.
            gone = self._indexed - counts.keys()
            async with self._cmd.pipeline(transaction=True) as pipe:
                pipe.delete(self._presence_key)
                if counts:
                    pipe.hset(self._presence_key, mapping=counts)  # type: ignore[arg-type]
                    pipe.pexpire(self._presence_key, ttl)
                for user_id in gone:
                    pipe.hdel(f"{self._prefix}where:{user_id}", self.node_id)
                for user_id, count in counts.items():
                    pipe.hset(f"{self._prefix}where:{user_id}", self.node_id, count)
                await pipe.execute()
            self._indexed = set(counts)
            for user_id in gone:
                self._joined.pop(user_id, None)
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
                argv = [self._prefix, self.node_id, user_id, mine, limit, int(HEARTBEAT_TTL * 1000),
                        str(int(time.time())), self._epoch, max(self._size, FEED_MIN), FEED_MIN]  # fmt: skip
                accepted, others, registered, *life = await self._run(scripts.JOIN, list(self._keys), argv)
            except BaseException:
                # The script may still run: a paused Redis runs what waits in its socket when it wakes, after
                # this node gave up. Counting the user as indexed makes the rewrite that follows a failure
                # clear this node's entry in `where:<user>` unless the user is here by then.
                self._indexed.add(user_id)
                self._joins = joins[index:] + self._joins
                raise
            if accepted:
                self._indexed.add(user_id)
                # The oldest rejoin mark a socket of the user here may predate (see FeedMixin._rejoined).
                mark = parse_id(life[0] or "")  # None: no mark in this Redis's data (new, or it lost it)
                joined = mark or MessageId(0, 0)
                self._joined[user_id] = min(joined, self._joined.get(user_id, joined))
                if mark is not None and mark < self._last_mark:
                    # Joined before a rejoin mark the reader met while this answer was on its way: the socket
                    # may have missed what skipped this node, as the ones the reader closed then.
                    self._close_for_mark(user_id)
            if not registered:
                self._rewrite = True
                self._wake.set()
            if done.done():
                # The handshake gave up waiting (and the socket went away): a presence write put right what
                # the script counted.
                self._dirty.add(user_id)
            elif accepted:
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
                        pipe.hset(f"{self._prefix}where:{user_id}", self.node_id, count)
                    else:
                        pipe.hdel(self._presence_key, user_id)
                        pipe.hdel(f"{self._prefix}where:{user_id}", self.node_id)
                await pipe.execute()
            self._indexed |= {user_id for user_id in users if presence.get(user_id)}
            self._indexed -= {user_id for user_id in users if not presence.get(user_id)}
            for user_id in users:
                if not presence.get(user_id):
                    self._joined.pop(user_id, None)
        except BaseException:
            self._dirty |= users
            raise

    def _presence_snapshot(self) -> dict[str, Any]:
        assert self._node is not None
        return dict(self._node.presence())

    @staticmethod
    def _counts(presence: dict[str, Any]) -> dict[str, int]:
        return {user_id: len(conns) for user_id, conns in presence.items() if len(conns)}
