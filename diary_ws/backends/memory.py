"""The embedded default: ids, one bounded, ordered history and presence, all in this process's memory."""

from __future__ import annotations

import os
import socket
import time
from bisect import bisect_right

from diary_ws.errors import NobodyListening
from diary_ws.messages import Draft, IdClock, Message, MessageId
from diary_ws.protocols import Claim, Node, NodeInfo, Page, PublishResult, Replay

# One history entry: (ms, seq, targets, created, wire, offset, cost), the fields of a Message and what the
# entry counts toward HISTORY_BYTES. A tuple of plain values is something Python's garbage collector stops
# tracking on its first pass; a Message per entry would be three tracked objects (with its MessageId and
# targets set) that all reach the oldest generation. Those alone set off a full collection every ~45,000
# publishes, and a full collection walks every object of every open socket: about 0.25 s at 10,000 sockets.
_Entry = tuple[int, int, tuple[str, ...] | None, float, bytes, int, int]
_GONE: _Entry = (0, 0, None, 0.0, b"", 0, 0)  # an evicted slot below `_head`, until the list is compacted

# What HISTORY_BYTES counts beside the frame: the entry's tuple, ints and list slot, and per target the
# tuple's pointer and the id string's object header (CPython 3.11, 64 bit; measured with sys.getsizeof).
ENTRY_OVERHEAD = 200
TARGET_OVERHEAD = 8 + 49
# A replay page looks at no more than this many entries, so a page for a user with few messages in a long
# history is still a bounded slice of work between two turns of the event loop.
PAGE_SCAN = 2048


def _entry_id(entry: _Entry) -> tuple[int, int]:
    return entry[0], entry[1]


class MemoryBackend:
    """One process: ids from the wall clock, a history of at most `history_size` messages and `history_bytes`
    bytes, each kept `history_ttl` seconds."""

    replay_covers_live = True  # appended before it is delivered; if evicted first, the resume says so

    def __init__(self, history_size: int, history_ttl: float, history_bytes: int = 64 * 1024 * 1024) -> None:
        self._clock = IdClock()
        self._size = history_size
        self._ttl = history_ttl
        self._max_bytes = history_bytes
        # The history in id order: a list with a moving head rather than a deque, so a replay page finds its
        # place by bisection and reads a slice; the evicted prefix is cut off once it is half the list.
        self._entries: list[_Entry] = []
        self._head = 0
        self._bytes = 0
        # Every id up to `_floor` may have been lost (evicted, or from before this process started), so a
        # `since` below it cannot be resumed in full. Reserving an id at start puts every earlier run below it.
        self._floor = self._clock.next()
        self._node: Node | None = None

    async def start(self, node: Node) -> None:
        """Nothing to connect to."""
        self._node = node

    async def stop(self) -> None:
        self._entries = []
        self._head = self._bytes = 0

    def ready(self) -> bool:
        return True

    async def publish(self, targets: frozenset[str] | None, draft: Draft, claim: Claim | None = None) -> PublishResult:
        # The claim is for a shared store: in one process, idempotency.IdempotencyCache has the key already.
        node = self._node
        users = node.presence() if node is not None else {}  # not started: nobody can be listening
        if node is None or not users or (targets is not None and users.keys().isdisjoint(targets)):
            raise NobodyListening(targeted=targets is not None)
        message = self._append(targets, draft)
        sent, total, lost, reached, _ = await node.deliver(message, False)  # no await before: id order holds
        return PublishResult(message.id, sent, total, lost, reached, 0)

    async def publish_batch(
        self, items: list[tuple[frozenset[str] | None, Draft]], claim: Claim | None = None
    ) -> list[PublishResult | NobodyListening]:
        done: list[PublishResult | NobodyListening] = []
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

    async def status(self, limit: int | None = None) -> tuple[list[str], int, int]:
        if self._node is None:
            return [], 0, 0
        return self._node.user_ids(limit), *self._node.sizes()

    async def nodes(self) -> list[NodeInfo]:
        """One process, one node: this one."""
        users = self._node.presence() if self._node is not None else {}
        counts = {user_id: len(conns) for user_id, conns in users.items()}
        return [NodeInfo(f"{socket.gethostname()}:{os.getpid()}", True, counts, None)]

    async def close_user(self, user_id: str, code: int, reason: str) -> tuple[int, int]:
        return (self._node.close_local(user_id, code, reason) if self._node is not None else 0), 0

    def shared(self) -> None:
        """One process: limits and keys stay in it."""
        return None

    @property
    def retained(self) -> tuple[int, int]:
        """(messages, bytes as HISTORY_BYTES counts them) in the history now."""
        return len(self._entries) - self._head, self._bytes

    def _append(self, targets: frozenset[str] | None, draft: Draft) -> Message:
        msg_id = self._clock.next()
        message = Message.build(msg_id, targets, draft.render(msg_id))
        if self._size:
            kept = None if targets is None else tuple(targets)
            cost = len(message.wire) + ENTRY_OVERHEAD
            if kept is not None:
                cost += sum(len(user) for user in kept) + TARGET_OVERHEAD * len(kept)
            self._entries.append((msg_id.ms, msg_id.seq, kept, message.created, message.wire, message.offset, cost))
            self._bytes += cost
        else:
            self._floor = msg_id
        self._evict()
        return message

    async def replay_page(self, user_id: str, after: MessageId, limit: int, max_bytes: int) -> Page:
        self._evict()
        # Up to now, nothing newer than the last id was published, so an `after` in between misses nothing: a
        # client that saw no message yet resumes from the time it connected (diary_ws.client does).
        newest = max(self._clock.last, MessageId(time.time_ns() // 1_000_000, 2**64 - 1))
        recovered = self._floor <= after <= newest
        entries = self._entries
        start = bisect_right(entries, (after.ms, after.seq), lo=self._head, key=_entry_id)
        end = min(len(entries), start + PAGE_SCAN)
        found: list[Message] = []
        size = 0
        index = start
        while index < end and len(found) < limit and size < max_bytes:
            ms, seq, targets, created, wire, offset, _cost = entries[index]
            index += 1
            if targets is None or user_id in targets:
                # `targets` None: this copy only goes to one socket, which needs no one else's ids. `wire` is
                # the history's own bytes object, shared by every socket that replays it.
                found.append(Message(MessageId(ms, seq), None, created, wire, offset))
                size += len(wire)
        last = after if index == start else MessageId(entries[index - 1][0], entries[index - 1][1])
        return Page(found, last, index < len(entries), recovered)

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        """Every page at once: for tests and tools, never for a socket."""
        found: list[Message] = []
        page = await self.replay_page(user_id, since, 2**31, 2**62)
        recovered = page.recovered
        found += page.messages
        while page.more:
            page = await self.replay_page(user_id, page.last, 2**31, 2**62)
            recovered = recovered and page.recovered
            found += page.messages
        return Replay(found, recovered)

    def _evict(self) -> None:
        entries = self._entries
        head = self._head
        deadline = time.monotonic() - self._ttl
        while head < len(entries) and (
            len(entries) - head > self._size or self._bytes > self._max_bytes or entries[head][3] < deadline
        ):
            oldest = entries[head]
            entries[head] = _GONE  # the frame's bytes go now, not when the list is next compacted
            head += 1
            self._bytes -= oldest[6]
            self._floor = MessageId(oldest[0], oldest[1])
        if head > 64 and head * 2 > len(entries):
            del entries[:head]
            head = 0
        self._head = head
