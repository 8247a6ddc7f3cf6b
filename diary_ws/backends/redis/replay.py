"""History: `?since=` read from the one stream, with the stream's state, in one script."""

from __future__ import annotations

import orjson

from diary_ws import deadline
from diary_ws.backends.redis import scripts
from diary_ws.backends.redis.client import RedisCore
from diary_ws.messages import Draft, Message, MessageId, parse_id
from diary_ws.protocols import Page, Replay

# Entries one page reads from the stream (XRANGE COUNT), the user's or not: a bounded slice of Redis's work and
# of ours between two turns of the event loop.
PAGE_SCAN = 500


class ReplayMixin(RedisCore):
    """The replay of a resuming socket."""

    # A Redis that restarts without its data loses entries the reader has already delivered: a replaying
    # socket keeps its live messages in its backlog (within its caps) instead of leaving them to the replay.
    replay_covers_live = False

    async def replay_page(self, user_id: str, after: MessageId, limit: int, max_bytes: int) -> Page:
        """One page, read forward from the stream (XRANGE) as the socket drains.

        The frames are rendered here for this socket, one page at a time: what a socket holds of its replay
        is at most a page. Entries past HISTORY_TTL count as deleted. HISTORY_SIZE bounds the stream through
        XADD's approximate MAXLEN, so a page may reach a little further back than `replay`'s exact window.
        """
        with deadline.request():  # each page waits for Redis no longer than a request would
            answer = await self._run(scripts.REPLAY_PAGE, [self._keys[1]], [str(after), PAGE_SCAN])
        seconds, micros, last, deleted, entries, first, lost = answer
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        cutoff = now_ms - self._ttl * 1000
        floor = parse_id(deleted) or MessageId(0, 0)
        oldest = parse_id(first)
        if lost and oldest is not None:  # trimmed: anything before the first entry may have been there
            floor = max(
                floor, MessageId(oldest.ms, oldest.seq - 1) if oldest.seq else MessageId(oldest.ms - 1, 2**64 - 1)
            )
        found: list[Message] = []
        size = 0
        looked = after
        read = 0
        for entry_id, flat in entries:  # oldest first
            if len(found) >= limit or size >= max_bytes:
                break
            read += 1
            msg_id = parse_id(entry_id)
            if msg_id is None:
                continue
            looked = msg_id
            if msg_id.ms < cutoff:
                floor = max(floor, msg_id)  # outside the history: as good as deleted
                continue
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            targets = fields["t"].split(",") if "t" in fields else None
            if "k" not in fields or (targets is not None and user_id not in targets):
                continue
            data = orjson.loads(fields["d"]) if "d" in fields else None
            message = Message.build(msg_id, None, Draft(fields["k"], fields["m"], data).render(msg_id))
            found.append(message)
            size += message.size
        top = max(parse_id(last) or MessageId(0, 0), MessageId(now_ms, 2**64 - 1))
        # More: this page stopped short of what it read, or read a full scan (the stream may hold more).
        more = read < len(entries) or len(entries) >= PAGE_SCAN
        return Page(found, looked, more, floor <= after <= top)

    # --- history -------------------------------------------------------------------------------------------

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        with deadline.request():  # a resuming handshake waits for the history no longer than a request would
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
