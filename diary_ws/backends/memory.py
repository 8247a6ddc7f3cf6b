"""The embedded default: ids, one bounded, ordered history and presence, all in this process's memory."""

from __future__ import annotations

import time
from collections import deque

from diary_ws.backends.base import Node, Published, Replay
from diary_ws.errors import NobodyListening
from diary_ws.messages import Draft, IdClock, Message, MessageId


class MemoryBackend:
    """One process: ids from the wall clock, a ring of `history_size` messages kept `history_ttl` seconds."""

    def __init__(self, history_size: int, history_ttl: float) -> None:
        self._clock = IdClock()
        self._size = history_size
        self._ttl = history_ttl
        self._history: deque[Message] = deque()
        # Every id up to `_floor` may have been lost (evicted, or from before this process started), so a
        # `since` below it cannot be resumed in full. Reserving an id at start puts every earlier run below it.
        self._floor = self._clock.next()
        self._node: Node | None = None

    async def start(self, node: Node) -> None:
        """Nothing to connect to."""
        self._node = node

    async def stop(self) -> None:
        self._history.clear()

    def ready(self) -> bool:
        return True

    async def publish(self, targets: frozenset[str] | None, draft: Draft) -> Published:
        node = self._node
        users = node.presence() if node is not None else {}  # not started: nobody can be listening
        if node is None or not users or (targets is not None and users.keys().isdisjoint(targets)):
            raise NobodyListening(targeted=targets is not None)
        message = self._append(targets, draft)
        sent, total, lost, reached, _ = await node.deliver(message, False)  # no await before: id order holds
        return Published(message.id, sent, total, lost, reached, 0)

    async def join(self, user_id: str, limit: int) -> None:
        """One process: the Hub's own count is the whole count, and it has checked it."""

    def left(self, user_id: str) -> None:
        """Nothing to record."""

    async def status(self) -> tuple[list[str], int]:
        users = self._node.presence() if self._node is not None else {}
        return sorted(users), sum(len(conns) for conns in users.values())

    async def close_user(self, user_id: str, code: int, reason: str) -> tuple[int, int]:
        return (self._node.close_local(user_id, code, reason) if self._node is not None else 0), 0

    def shared(self) -> None:
        """One process: limits and keys stay in it."""
        return None

    def _append(self, targets: frozenset[str] | None, draft: Draft) -> Message:
        msg_id = self._clock.next()
        message = Message.build(msg_id, targets, draft.render(msg_id))
        if self._size:
            self._history.append(message)
        else:
            self._floor = msg_id
        self._evict()
        return message

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        self._evict()
        # Up to now, nothing newer than the last id was published, so a `since` in between misses nothing: a
        # client that saw no message yet resumes from the time it connected (diary_ws.client does).
        newest = max(self._clock.last, MessageId(time.time_ns() // 1_000_000, 2**64 - 1))
        recovered = self._floor <= since <= newest
        # The ring is ordered by id: walk back from the newest to the first one at or before `since`.
        found: list[Message] = []
        for message in reversed(self._history):
            if message.id <= since:
                break
            if message.is_for(user_id):
                found.append(message)
        found.reverse()
        return Replay(found, recovered)

    def _evict(self) -> None:
        history = self._history
        deadline = time.monotonic() - self._ttl
        while history and (len(history) > self._size or history[0].created < deadline):
            self._floor = history.popleft().id
