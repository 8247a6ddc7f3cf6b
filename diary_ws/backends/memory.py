"""The embedded default: ids and one bounded, ordered history in this process's memory."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from diary_ws.backends.base import Replay
from diary_ws.messages import IdClock, Message, MessageId


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

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        self._history.clear()

    def ready(self) -> bool:
        return True

    async def append(self, targets: frozenset[str] | None, render: Callable[[MessageId], bytes]) -> Message:
        msg_id = self._clock.next()
        message = Message.build(msg_id, targets, render(msg_id))
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
