"""Idempotent publish: an `Idempotency-Key` seen again within the TTL gets the first answer, not a new send.

Decisions (docs/redis-failures.md says the same for Redis):
- Only a stored message is remembered. A refusal (404 nobody listening, 422, 503, ...) forgets the key, so
  the sender can retry under it and have the message delivered once somebody listens. With Redis the key is
  recorded by the very script that stores the message, so a message whose answer was lost (504) is
  remembered too: a retry gets the first answer once it is known, a 409 while it may still come, and, once
  the first request is past its deadline without an answer, a 200 naming the stored id (its counts unknown).
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

import orjson

from diary_ws.deadline import REQUEST_SECONDS
from diary_ws.errors import Answer, BadRequest, Conflict, DiaryWSError, ValidationError
from diary_ws.protocols import Claim, Idempotency, SharedStore
from diary_ws.validation import Notification

HEADER = "Idempotency-Key"
MAX_ENTRIES = 10_000
_KEY = re.compile(r"[\x20-\x7e]{1,255}")


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


class LocalIdempotency:
    """This process's IdempotencyCache behind the awaitable interface."""

    def __init__(self, cache: IdempotencyCache) -> None:
        self.cache = cache

    async def begin(self, key: str, print_: bytes) -> Answer | None:
        return self.cache.begin(key, print_)

    def claim(self, key: str, print_: bytes) -> Claim | None:
        return None  # the cache holds the key already; the memory backend stores nothing of it

    async def finish(self, key: str, answer: Answer) -> None:
        self.cache.finish(key, answer)

    async def abandon(self, key: str) -> None:
        self.cache.abandon(key)


# How long after its message was stored (by Redis's clock) a key without an answer makes a retry wait (409):
# the first request may still be answering, within its deadline and the write of its answer. Past it, that
# request has given up (504) and a retry is told the message was sent, under its id.
BUSY_WINDOW = REQUEST_SECONDS + 1.0


class SharedIdempotency:
    """The same contract as IdempotencyCache, kept in Redis, so a retry on another node is recognised too.

    The key is recorded with the message, in the script that stores it (`claim`), so even a request that
    could not learn its own outcome (504) leaves the key for its retry. A finished key is kept `ttl` seconds
    from its answer rather than from its first use.
    """

    def __init__(self, ttl: float, store: SharedStore) -> None:
        self.ttl = ttl
        self.store = store

    async def begin(self, key: str, print_: bytes) -> Answer | None:
        state, number, text = await self.store.idem_begin(key, print_.hex(), BUSY_WINDOW)
        if state == "other":
            raise ValidationError(
                HEADER, f"was already used for a different notification in the last {self.ttl:g} s; use a new key"
            )
        if state == "busy":
            raise Conflict(
                f"a request with this {HEADER} is still being processed; retry in a moment",
                headers={"Retry-After": "1"},
            )
        if state == "stale":
            answer = Answer(200, stale_answer(text, number))
            await self.finish(key, answer)  # every later retry gets the same answer
            return answer
        return Answer(number, text.encode()) if state == "done" else None

    def claim(self, key: str, print_: bytes) -> Claim:
        return Claim(key, print_.hex(), self.ttl)

    async def finish(self, key: str, answer: Answer) -> None:
        # The message is out: if the answer cannot be kept, a retry finds the key without one, waits out
        # BUSY_WINDOW (409) and is then told the id (see `stale_answer`). The broker error is not raised.
        with contextlib.suppress(DiaryWSError):
            await self.store.idem_finish(key, answer.status, answer.body.decode(), self.ttl)

    async def abandon(self, key: str) -> None:
        with contextlib.suppress(DiaryWSError):
            await self.store.idem_abandon(key)


def stale_answer(msg_id: str, nodes: int) -> bytes:
    """The answer for a key whose message was stored by a request that never answered (it said 504).

    The guide's fields with the stored id; the counts were never gathered, so they are 0 and every live
    node is in `nodes_missing`, which says exactly that. For a batch (`msg_id` is then "batch:" and one mark
    per item: an id, or "-" for an item nobody was listening for), the batch answer made of those.
    """
    if msg_id.startswith("batch:"):
        return _stale_batch(msg_id.removeprefix("batch:").split(","), nodes)
    return orjson.dumps(_stale_item(msg_id, nodes))


def _stale_item(msg_id: str, nodes: int) -> dict[str, object]:
    return {
        "status": "success",
        "message": f"Notification sent by an earlier request with this {HEADER}; its counts were not recorded",
        "sent_count": 0,
        "total_connections": 0,
        "disconnected_users": 0,
        "id": msg_id,
        "nodes_missing": max(nodes, 1),
    }  # fmt: skip


def _stale_batch(marks: list[str], nodes: int) -> bytes:
    nobody = {"status": "error", "code": 404, "message": "No active connections: not sent or stored"}
    results = [nobody if mark == "-" else _stale_item(mark, nodes) for mark in marks]
    return orjson.dumps({"status": "success", "results": results, "failed": marks.count("-")})


def for_app(ttl: float, shared: SharedStore | None) -> Idempotency:
    """The idempotency keys for an app: in this process, or shared by the cluster."""
    return LocalIdempotency(IdempotencyCache(ttl)) if shared is None else SharedIdempotency(ttl, shared)
