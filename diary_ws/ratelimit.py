"""Token buckets per key (an API key or a client address), with an injectable clock and a bounded count.

A bucket holds up to `burst` tokens and refills at `count` per `period`; each request takes one. The
number of buckets is bounded: past `max_buckets` the least recently used one is forgotten. Forgetting a
bucket hands that key a full one, which is what it would have after an idle spell anyway; an attacker
would need more than `max_buckets` addresses busy at once to exploit it, and then has that many buckets
whatever we do.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from diary_ws.errors import RateLimited, ValidationError
from diary_ws.protocols import SharedStore
from diary_ws.settings import rate_parts

MAX_BUCKETS = 50_000  # about 150 bytes each: a few MB at most


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` requests per `period` seconds, in bursts of up to `burst`."""

    count: int
    period: float
    burst: int

    @classmethod
    def parse(cls, text: str) -> Rate:
        """`100/s`, `100/s:200`, `10/m`, `1000/h:50`; ValueError otherwise."""
        return cls(*rate_parts(text))

    @property
    def per_second(self) -> float:
        return self.count / self.period


@dataclass(frozen=True, slots=True)
class Verdict:
    """One request's outcome and the numbers for the `RateLimit-*` headers."""

    allowed: bool
    limit: int  # the burst: what a full bucket allows at once
    remaining: int  # whole tokens left
    reset: int  # seconds until the bucket is full again
    retry_after: int  # when refused: seconds until one token is back (at least 1)

    def headers(self) -> dict[str, str]:
        """The `RateLimit-*` headers (IETF draft), plus `Retry-After` on a refusal."""
        found = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }
        if not self.allowed:
            found["Retry-After"] = str(self.retry_after)
        return found


class RateLimiter:
    """Buckets by key, for one Rate. Kept on `app.state`; one event loop uses it, so it needs no lock.

    With `shared` (a cluster on Redis), `acquire` takes from buckets every node shares instead.
    """

    __slots__ = ("rate", "max_buckets", "_clock", "_buckets", "name", "shared")

    def __init__(
        self,
        rate: Rate,
        *,
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
        shared: SharedStore | None = None,
    ) -> None:
        self.rate = rate
        self.max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self.name = name  # keeps two limiters' shared buckets apart
        self.shared = shared

    @classmethod
    def from_setting(cls, text: str | None, name: str = "", shared: SharedStore | None = None) -> RateLimiter | None:
        """A limiter for a RATE_LIMIT-style setting; None when the setting is unset."""
        return None if text is None else cls(Rate.parse(text), name=name, shared=shared)

    async def acquire(self, key: str, what: str, cost: int = 1) -> dict[str, str]:
        """`enforce`, on the shared buckets when there are some (BrokerUnavailable, 503, if they are down).

        `cost` tokens are taken at once (a batch counts its items), or none. A cost over the burst could never
        pass, however long the sender waited: that is a ValidationError (422) naming the burst, not a 429.
        """
        if cost > self.rate.burst:
            raise ValidationError(
                "notifications",
                f"{cost} items can never pass the rate limit: it allows bursts of up to {self.rate.burst} (RATE_LIMIT "
                f"{self.rate.count}/{_period_unit(self.rate.period)}:{self.rate.burst}); send smaller batches",
            )
        if self.shared is None:
            return self.enforce(key, what, cost)
        allowed, tokens = await self.shared.take_token(
            f"{self.name}:{key}", self.rate.burst, self.rate.per_second, cost
        )
        return self._answer(self._verdict(allowed, tokens, cost), what)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, cost: int = 1) -> Verdict:
        """Take `cost` tokens from `key`'s bucket if it has them all, or none."""
        rate = self.rate
        now = self._clock()
        tokens, when = self._buckets.pop(key, (float(rate.burst), now))
        tokens = min(float(rate.burst), tokens + (now - when) * rate.per_second)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)  # popped and put back: the most recently used is last
        if len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return self._verdict(allowed, tokens, cost)

    def _verdict(self, allowed: bool, tokens: float, cost: int = 1) -> Verdict:
        rate = self.rate
        return Verdict(
            allowed=allowed,
            limit=rate.burst,
            remaining=int(tokens),
            reset=math.ceil((rate.burst - tokens) / rate.per_second),
            retry_after=max(1, math.ceil((cost - tokens) / rate.per_second)),
        )

    def enforce(self, key: str, what: str, cost: int = 1) -> dict[str, str]:
        """Take `cost` tokens or raise RateLimited (429); the `RateLimit-*` headers for the answer."""
        return self._answer(self.take(key, cost), what)

    def _answer(self, verdict: Verdict, what: str) -> dict[str, str]:
        if not verdict.allowed:
            rate = self.rate
            raise RateLimited(
                f"too many {what}: the limit is {rate.count} per {_period_name(rate.period)} in bursts of up to "
                f"{rate.burst}; retry after {verdict.retry_after} s",
                headers=verdict.headers(),
            )
        return verdict.headers()


def _period_unit(period: float) -> str:
    return {1.0: "s", 60.0: "m", 3600.0: "h"}.get(period, f"{period:g}s")


def _period_name(period: float) -> str:
    return {1.0: "second", 60.0: "minute", 3600.0: "hour"}.get(period, f"{period:g} s")
