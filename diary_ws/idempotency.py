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
- Keys are remembered by this process only; API keys are for rotation, not tenants, so the key space is
  shared by every sender.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from diary_ws.errors import BadRequest, Conflict, ValidationError
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
