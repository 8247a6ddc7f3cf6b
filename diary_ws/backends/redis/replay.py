"""History: `?since=` read from the one stream, with the stream's state, in one script."""

from __future__ import annotations

import orjson

from diary_ws import deadline
from diary_ws.backends.base import Replay
from diary_ws.backends.redis import scripts
from diary_ws.backends.redis.client import RedisCore
from diary_ws.messages import Draft, Message, MessageId, parse_id


class ReplayMixin(RedisCore):
    """The replay of a resuming socket."""

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
