"""State the cluster shares: rate-limit buckets and idempotency keys, each one script on Redis's clock."""

from __future__ import annotations

from typing import Self

from diary_ws.backends.redis import scripts
from diary_ws.backends.redis.client import RedisCore, _hashed


class StoreMixin(RedisCore):
    """The shared store (`Backend.shared()`): token buckets and idempotency keys."""

    # --- state the cluster shares: rate-limit buckets and idempotency keys ---------------------------------

    def shared(self) -> Self:
        return self

    async def take_token(self, bucket: str, burst: int, per_second: float, cost: int = 1) -> tuple[bool, float]:
        ttl_ms = int((burst / per_second + 1) * 1000)  # a bucket idle this long is full: forgetting it is the same
        taken, tokens = await self._run(
            scripts.RATE, [_hashed("rate", bucket, self._prefix)], [burst, per_second, ttl_ms, cost]
        )
        return bool(taken), float(tokens)

    async def idem_begin(self, key: str, print_: str, busy_ttl: float) -> tuple[str, int, str]:
        # Read only: the key is recorded by the script that stores the message (feed.py), in the same step.
        argv = [print_, int(busy_ttl * 1000)]
        answer = await self._run(scripts.IDEM_BEGIN, [_hashed("idem", key, self._prefix), self._keys[0]], argv)
        if answer[0] == "done":
            return "done", int(answer[1]), answer[2]
        if answer[0] == "stale":
            return "stale", int(answer[2]), answer[1]
        return answer[0], 0, ""

    async def idem_finish(self, key: str, status: int, body: str, ttl: float) -> None:
        await self._run(scripts.IDEM_FINISH, [_hashed("idem", key, self._prefix)], [status, body, int(ttl * 1000)])

    async def idem_abandon(self, key: str) -> None:
        await self._run(scripts.IDEM_ABANDON, [_hashed("idem", key, self._prefix)], [])
