"""History: `?since=` read through the per-user and broadcast indexes, with the window's floor, in one script."""

from __future__ import annotations

import orjson

from diary_ws import deadline
from diary_ws.backends.redis import scripts
from diary_ws.backends.redis.client import RedisCore
from diary_ws.messages import Draft, Message, MessageId, parse_id
from diary_ws.protocols import Page, Replay


class ReplayMixin(RedisCore):
    """The replay of a resuming socket."""

    # A Redis that restarts without its data loses entries the reader has already delivered: a replaying
    # socket keeps its live messages in its backlog (within its caps) instead of leaving them to the replay.
    replay_covers_live = False

    async def replay_page(self, user_id: str, after: MessageId, limit: int, max_bytes: int) -> Page:
        """One page, read forward through the user's and the broadcast index as the socket drains.

        At most `limit` entries are read (the user's messages only: no scan of anyone else's), and the frames
        are rendered here for this socket, one page at a time, cut at `max_bytes` (at least one message).
        The window is REPLAY's, exactly: HISTORY_SIZE messages, none past HISTORY_TTL.
        """
        argv = [self._prefix, user_id, str(after), self._size, int(self._ttl * 1000), max(1, limit)]
        with deadline.request():  # a resuming socket waits for the history no longer than a request would
            answer = await self._run(scripts.REPLAY_PAGE, [self._keys[1]], argv)
        seconds, micros, last, floor_id, entries, more = answer
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        floor = parse_id(floor_id) or MessageId(0, 0)
        found: list[Message] = []
        size = 0
        looked = max(after, floor)
        for read, (entry_id, flat) in enumerate(entries):  # oldest first, each newer than the floor
            if found and size >= max_bytes:
                more = more or read < len(entries)
                break
            msg_id = parse_id(entry_id)
            if msg_id is None:
                continue
            looked = msg_id
            message = _message(user_id, msg_id, flat)
            if message is not None:
                found.append(Message.build(msg_id, None, message))
                size += found[-1].size
        top = max(parse_id(last) or MessageId(0, 0), MessageId(now_ms, 2**64 - 1))
        return Page(found, looked, bool(more), floor <= after <= top)

    # --- history -------------------------------------------------------------------------------------------

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        argv = [self._prefix, user_id, str(since), self._size, int(self._ttl * 1000)]
        with deadline.request():  # a resuming handshake waits for the history no longer than a request would
            answer = await self._run(scripts.REPLAY, [self._keys[1]], argv)
        seconds, micros, last, floor_id, entries = answer
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        floor = parse_id(floor_id) or MessageId(0, 0)
        found: list[Message] = []
        for entry_id, flat in entries:  # oldest first, each newer than the floor
            msg_id = parse_id(entry_id)
            payload = _message(user_id, msg_id, flat) if msg_id is not None else None
            if msg_id is not None and payload is not None:
                targets = _targets(flat)
                found.append(Message.build(msg_id, targets, payload))
        # As in memory mode: up to Redis's "now", nothing newer than the last id was added, so a `since` in
        # between misses nothing (a client that saw no message yet resumes from the time it connected).
        top = max(parse_id(last) or MessageId(0, 0), MessageId(now_ms, 2**64 - 1))
        return Replay(found, floor <= since <= top)


def _targets(flat: list[str]) -> frozenset[str] | None:
    fields = dict(zip(flat[0::2], flat[1::2], strict=True))
    return frozenset(fields["t"].split(",")) if "t" in fields else None


def _message(user_id: str, msg_id: MessageId, flat: list[str]) -> bytes | None:
    """The JSON of a feed entry for `user_id`; None for a control entry or someone else's (never indexed)."""
    fields = dict(zip(flat[0::2], flat[1::2], strict=True))
    if "k" not in fields or ("t" in fields and user_id not in fields["t"].split(",")):
        return None
    data = orjson.loads(fields["d"]) if "d" in fields else None
    return Draft(fields["k"], fields["m"], data).render(msg_id)
