"""History: `?since=` read through the per-user and broadcast indexes, with the window's floor, in one script."""

from __future__ import annotations

import orjson

from diary_ws.backends.base import Replay
from diary_ws.backends.redis import scripts
from diary_ws.backends.redis.client import PREFIX, RedisCore
from diary_ws.messages import Draft, Message, MessageId, parse_id


class ReplayMixin(RedisCore):
    """The replay of a resuming socket."""

    # --- history -------------------------------------------------------------------------------------------

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        argv = [PREFIX, user_id, str(since), self._size, int(self._ttl * 1000)]
        seconds, micros, last, floor_id, entries = await self._run(scripts.REPLAY, [self._keys[1]], argv)
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        floor = parse_id(floor_id) or MessageId(0, 0)
        found: list[Message] = []
        for entry_id, flat in entries:  # oldest first, each newer than the floor
            msg_id = parse_id(entry_id)
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            targets = frozenset(fields["t"].split(",")) if "t" in fields else None
            if msg_id is None or "k" not in fields or (targets is not None and user_id not in targets):
                continue
            data = orjson.loads(fields["d"]) if "d" in fields else None
            found.append(Message.build(msg_id, targets, Draft(fields["k"], fields["m"], data).render(msg_id)))
        # As in memory mode: up to Redis's "now", nothing newer than the last id was added, so a `since` in
        # between misses nothing (a client that saw no message yet resumes from the time it connected).
        top = max(parse_id(last) or MessageId(0, 0), MessageId(now_ms, 2**64 - 1))
        return Replay(found, floor <= since <= top)
