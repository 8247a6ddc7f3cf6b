"""Idempotent publish: an `Idempotency-Key` seen again within the TTL gets the first answer, not a new send.

Decisions (the README says the same):
- Only a success is remembered. A refusal (404 nobody listening, 422, 503, ...) forgets the key, so the
  sender can retry under it and have the message delivered once somebody listens.
- The body is compared by meaning (the checked notification, keys sorted), so a retry that re-serialises
  the same JSON differently still matches; a different notification under the same key is 422.
- A duplicate that arrives while the first is still being published gets 409 with `Retry-After: 1`
  (as the IETF idempotency-key draft advises) instead of waiting on it, so nothing queues behind a key.
- Memory is bounded: at most `max_entries` keys, each kept `ttl` seconds from its first use; past the
  bound the oldest are forgotten early (a repeat of one of those would be sent again).
- Keys are remembered by this process, or, with a Redis broker, in Redis for the whole cluster (see
  `SharedIdempotency`); API keys are for rotation, not tenants, so the key space is shared by every sender.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from diary_ws.errors import BadRequest, Conflict, DiaryWSError, ValidationError
from diary_ws.validation import Notification

HEADER = "Idempotency-Key"
MAX_ENTRIES = 10_000
_KEY = re.compile(r"[\x20-\x7e]{1,255}")


@dataclass(frozen=True, slots=True)
class Answer:
    """The first request's answer, replayed as it was."""

    status: int
    body: bytes


@dataclass(slots=True)
class _Entry:
    fingerprint: bytes
    expires: float
    answer: Answer | None = None  # None while the first request is still being published


def check_key(raw: str) -> str:
    """An Idempotency-Key header value: 1-255 printable ASCII characters; BadRequest otherwise."""
    if not _KEY.fullmatch(raw) or not raw.strip():
        raise BadRequest(f"{HEADER} must be 1-255 printable ASCII characters, such as a UUID")
    return raw


def fingerprint(note: Notification) -> bytes:
    """What makes two notifications the same, whatever the JSON spelling of their bodies."""
    canonical = orjson.dumps(
        {"message": note.message, "user_ids": note.user_ids, "type": note.type, "data": note.data},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).digest()


class IdempotencyCache:
    """Keys seen within the TTL and their first answers; one per app, on `app.state.idempotency`."""

    __slots__ = ("ttl", "max_entries", "_clock", "_entries")

    def __init__(self, ttl: float, *, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first: the TTL is the same for all

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, key: str, print_: bytes) -> Answer | None:
        """None: this request is the first, go ahead (then `finish` or `abandon`). An Answer: replay it.

        Raises ValidationError (422) for another body under the key, Conflict (409) while the first runs.
        """
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.fingerprint != print_:
                raise ValidationError(
                    HEADER, f"was already used for a different notification in the last {self.ttl:g} s; use a new key"
                )
            if entry.answer is None:
                raise Conflict(
                    f"a request with this {HEADER} is still being processed; retry in a moment",
                    headers={"Retry-After": "1"},
                )
            return entry.answer
        self._entries[key] = _Entry(print_, now + self.ttl)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return None

    def finish(self, key: str, answer: Answer) -> None:
        """Remember the first request's answer for the rest of the TTL."""
        entry = self._entries.get(key)
        if entry is not None and entry.answer is None:
            entry.answer = answer

    def abandon(self, key: str) -> None:
        """The first request failed: forget the key, so a retry is a first request again."""
        entry = self._entries.get(key)
        if entry is not None and entry.answer is None:
            del self._entries[key]

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest = next(iter(entries.values()))
            if oldest.expires > now:
                return
            entries.popitem(last=False)


class SharedKeys(Protocol):
    """Idempotency keys every node shares (the Redis backend)."""

    async def idem_begin(self, key: str, print_: str, busy_ttl: float) -> tuple[str, int, str]:
        """("first", 0, "") | ("busy", 0, "") | ("other", 0, "") | ("done", status, body)."""
        ...

    async def idem_finish(self, key: str, status: int, body: str, ttl: float) -> None:
        """Keep the first answer for `ttl` seconds (if the key is still waiting for one)."""
        ...

    async def idem_abandon(self, key: str) -> None:
        """Forget the key if no answer was kept."""
        ...


class Idempotency(Protocol):
    """What the publish route needs: `IdempotencyCache`'s three steps, awaitable."""

    async def begin(self, key: str, print_: bytes) -> Answer | None: ...
    async def finish(self, key: str, answer: Answer) -> None: ...
    async def abandon(self, key: str) -> None: ...


class LocalIdempotency:
    """This process's IdempotencyCache behind the awaitable interface."""

    def __init__(self, cache: IdempotencyCache) -> None:
        self.cache = cache

    async def begin(self, key: str, print_: bytes) -> Answer | None:
        return self.cache.begin(key, print_)

    async def finish(self, key: str, answer: Answer) -> None:
        self.cache.finish(key, answer)

    async def abandon(self, key: str) -> None:
        self.cache.abandon(key)


# How long a key may stay "still being published" in the shared store: a node that dies mid-publish must not
# block the key for the whole TTL. A publish waits at most a few seconds (the broker's bounded gather).
BUSY_TTL = 30.0


class SharedIdempotency:
    """The same contract as IdempotencyCache, kept in Redis, so a retry on another node is recognised too.

    One difference: a key whose first request is still running expires after BUSY_TTL, and a finished key
    is kept `ttl` seconds from its answer rather than from its first use.
    """

    def __init__(self, ttl: float, store: SharedKeys) -> None:
        self.ttl = ttl
        self.store = store

    async def begin(self, key: str, print_: bytes) -> Answer | None:
        state, status, body = await self.store.idem_begin(key, print_.hex(), min(BUSY_TTL, self.ttl))
        if state == "other":
            raise ValidationError(
                HEADER, f"was already used for a different notification in the last {self.ttl:g} s; use a new key"
            )
        if state == "busy":
            raise Conflict(
                f"a request with this {HEADER} is still being processed; retry in a moment",
                headers={"Retry-After": "1"},
            )
        return Answer(status, body.encode()) if state == "done" else None

    async def finish(self, key: str, answer: Answer) -> None:
        # The message is out: if the answer cannot be kept, a retry would send it again, which is what a
        # client without the key would get. Nothing better is possible then; the broker error is not raised.
        with contextlib.suppress(DiaryWSError):
            await self.store.idem_finish(key, answer.status, answer.body.decode(), self.ttl)

    async def abandon(self, key: str) -> None:
        with contextlib.suppress(DiaryWSError):
            await self.store.idem_abandon(key)


def for_app(ttl: float, shared: SharedKeys | None) -> Idempotency:
    """The idempotency keys for an app: in this process, or shared by the cluster."""
    return LocalIdempotency(IdempotencyCache(ttl)) if shared is None else SharedIdempotency(ttl, shared)
