"""The embedded default: ids, one bounded, ordered history and presence, all in this process's memory."""

from __future__ import annotations

import time
from collections import deque

from diary_ws.backends.base import Node, Published, Replay
from diary_ws.errors import NobodyListening
from diary_ws.idempotency import Claim
from diary_ws.messages import Draft, IdClock, Message, MessageId

# One history entry: (ms, seq, targets, created, wire, offset), the fields of a Message. A tuple of plain
# values is something Python's garbage collector stops tracking on its first pass; a Message per entry would be three
# tracked objects (with its MessageId and targets set) that all reach the oldest generation. Those alone set
# off a full collection every ~45,000 publishes, and a full collection walks every object of every open socket:
# about 0.25 s at 10,000 sockets.
_Entry = tuple[int, int, tuple[str, ...] | None, float, bytes, int]


class MemoryBackend:
    """One process: ids from the wall clock, a ring of `history_size` messages kept `history_ttl` seconds."""

    def __init__(self, history_size: int, history_ttl: float) -> None:
        self._clock = IdClock()
        self._size = history_size
        self._ttl = history_ttl
        self._history: deque[_Entry] = deque()
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

    async def publish(self, targets: frozenset[str] | None, draft: Draft, claim: Claim | None = None) -> Published:
        # The claim is for a shared store: in one process, idempotency.IdempotencyCache has the key already.
        node = self._node
        users = node.presence() if node is not None else {}  # not started: nobody can be listening
        if node is None or not users or (targets is not None and users.keys().isdisjoint(targets)):
            raise NobodyListening(targeted=targets is not None)
        message = self._append(targets, draft)
        sent, total, lost, reached, _ = await node.deliver(message, False)  # no await before: id order holds
        return Published(message.id, sent, total, lost, reached, 0)

    async def publish_batch(
        self, items: list[tuple[frozenset[str] | None, Draft]], claim: Claim | None = None
    ) -> list[Published | NobodyListening]:
        done: list[Published | NobodyListening] = []
        for targets, draft in items:
            try:
                done.append(await self.publish(targets, draft))
            except NobodyListening as exc:
                done.append(exc)
        return done

    async def connections(self, user_id: str) -> int:
        users = self._node.presence() if self._node is not None else {}
        conns = users.get(user_id)
        return 0 if conns is None else len(conns)

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
            kept = None if targets is None else tuple(targets)
            self._history.append((msg_id.ms, msg_id.seq, kept, message.created, message.wire, message.offset))
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
        for ms, seq, targets, created, wire, offset in reversed(self._history):
            if (ms, seq) <= since:
                break
            if targets is None or user_id in targets:
                found.append(
                    Message(MessageId(ms, seq), None if targets is None else frozenset(targets), created, wire, offset)
                )
        found.reverse()
        return Replay(found, recovered)

    def _evict(self) -> None:
        history = self._history
        deadline = time.monotonic() - self._ttl
        while history and (len(history) > self._size or history[0][3] < deadline):
            oldest = history.popleft()
            self._floor = MessageId(oldest[0], oldest[1])
