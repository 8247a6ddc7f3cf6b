"""The feed: publish (the 404 decision and the XADD in one script), the stream reader, and the count gather."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import orjson

from diary_ws import deadline
from diary_ws.backends.redis import scripts
from diary_ws.backends.redis.client import (
    CLOSE_TRY_AGAIN,
    FEED_MIN,
    HEARTBEAT_TTL,
    PUBLISH_WAIT,
    READ_BLOCK,
    READ_COUNT,
    REPORT_MAX_AGE_MS,
    TOKEN_TTL,
    RedisCore,
    _hashed,
    log,
)
from diary_ws.errors import BrokerUnavailable, Conflict, NobodyListening, OutcomeUnknown, ValidationError
from diary_ws.messages import Draft, Message, MessageId, parse_id
from diary_ws.protocols import Claim, Counts, PublishResult


class Record(NamedTuple):
    """The request record a publish script keeps, in place of the one it would make (a shard's part of a
    message on Redis Cluster, whose key and token follow from the Idempotency-Key: see sharded.py)."""

    key: str
    token: str  # a resend with the same token is the same request: the script answers what it stored
    fingerprint: str
    ttl: float


class _Gather:
    """The reports for one publish, as they come in."""

    __slots__ = ("expected", "reports", "done")

    def __init__(self) -> None:
        self.expected: set[str] | None = None
        self.reports: dict[str, Counts] = {}
        self.done = asyncio.Event()

    def add(self, node: str, counts: Counts) -> None:
        self.reports[node] = counts
        self._check()

    def expect(self, nodes: set[str]) -> None:
        self.expected = nodes
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.expected <= self.reports.keys():
            self.done.set()


def _fields(targets: frozenset[str] | None, draft: Draft) -> dict[str, str]:
    """A message's stream entry fields."""
    fields: dict[str, str] = {"k": draft.kind, "m": draft.message}
    if draft.data is not None:
        fields["d"] = orjson.dumps(draft.data).decode()
    if targets is not None:
        fields["t"] = ",".join(targets)  # user ids never contain a comma
    return fields


def _check_outcome(outcome: str, unknown: bool, what: str) -> None:
    """Raise what a PUBLISH or PUBLISH_BATCH outcome other than 'added' or 'nobody' means for the request."""
    if outcome != "added" and unknown:
        # This attempt was refused, but an earlier one may still be run by Redis (sent, then the
        # connection failed): only a stored answer is sure.
        raise OutcomeUnknown(
            f"the broker answered late: {what} may or may not have been sent; a retry with the same "
            "Idempotency-Key is safe (without one, a retry may send it twice)"
        )
    if outcome == "epoch":
        raise BrokerUnavailable(f"broker unavailable (it lost its data and is being repaired): {what} was "
                                "not sent; retry later")  # fmt: skip
    if outcome == "busy":
        raise Conflict(
            "a request with this Idempotency-Key is still being processed; retry in a moment",
            headers={"Retry-After": "1"},
        )
    if outcome == "other":
        raise ValidationError(
            "Idempotency-Key", "was already used for a different notification or batch; use a new key"
        )


def _published(msg_id: MessageId, reports: list[Counts], missing: int) -> PublishResult:
    """The counts of one message summed over the nodes that reported; users counted once across nodes."""
    users: set[str] = set()
    sent = total = lost = 0
    for counts in reports:
        sent, total, lost = sent + counts.sent, total + counts.total, lost + counts.lost
        users.update(counts.users or ())
    return PublishResult(msg_id, sent, total, lost, len(users), missing)


ANSWER_TIME = 0.2  # of a request's deadline, kept from the wait for counts to record an Idempotency-Key's answer


class FeedMixin(RedisCore):
    """Publishing, closing a user everywhere, and this node's stream reader and count-reply reader."""

    # --- publish -----------------------------------------------------------------------------------------

    async def publish(
        self,
        targets: frozenset[str] | None,
        draft: Draft,
        claim: Claim | None = None,
        *,
        record: Record | None = None,
        keep: bool = False,
    ) -> PublishResult:
        """`record` and `keep` are for a shard's part of a message on Redis Cluster (sharded.py): the request's
        record to keep, and a message stored even when none of this shard's users it is for is connected."""
        fields = _fields(targets, draft)
        if targets is None:
            mode, named = ("every" if keep else "all"), []
        else:
            mode, named = ("keep" if keep else "users"), sorted(targets)
        msg_id, reports, missing = await self._gather(mode, named, fields, claim, "the notification", record)
        if msg_id is None:
            raise NobodyListening(targeted=targets is not None)
        return _published(msg_id, reports, missing)

    async def publish_batch(
        self,
        items: list[tuple[frozenset[str] | None, Draft]],
        claim: Claim | None = None,
        *,
        record: Record | None = None,
        keep: Sequence[bool] = (),
    ) -> list[PublishResult | NobodyListening]:
        """Every item's 404 decision and XADD in one script, one round trip; then one bounded wait for the counts.

        The script records the request as PUBLISH does (its own token, or the claim's Idempotency-Key), so a
        resend after a lost answer stores the batch once, and the same 503 / 504 / 409 / 422 follow.
        """
        token = secrets.token_hex(8)
        tokens = [f"{token}.{i}" for i in range(len(items))]  # each item's counts come back under its own
        gathers = [_Gather() for _ in items]
        self._pending.update(zip(tokens, gathers, strict=True))
        try:
            kept = record or self._record(token, claim)
            argv: list[Any] = [
                self._prefix,
                max(self._size, FEED_MIN),
                FEED_MIN,
                self._size,
                int(self._ttl * 1000) + 1000,
                kept.token,
                kept.fingerprint,
                int(kept.ttl * 1000),
                self._epoch,
                "".join("1" if flag else "0" for flag in keep),
                len(items),
            ]
            for (targets, draft), item_token in zip(items, tokens, strict=True):
                entry = {"o": self.node_id, "r": item_token, **_fields(targets, draft)}
                argv += [
                    len(targets or ()),
                    *sorted(targets or ()),
                    len(entry),
                    *(x for kv in entry.items() for x in kv),
                ]
            (outcome, tos, *found), unknown = await self._store(
                [*self._keys, kept.key], argv, "the batch", scripts.PUBLISH_BATCH
            )
            _check_outcome(outcome, unknown, "the batch")
            marks = found[0].split(",")
            self._stored = max([self._stored, *(m for m in map(parse_id, marks) if m is not None)])
            stored = [gather for gather, mark in zip(gathers, marks, strict=True) if mark != "-"]
            for gather, mark, to in zip(gathers, marks, tos, strict=True):
                if mark != "-":
                    gather.expect(set(to.split(",")) - {""})  # the nodes this item went to
            with contextlib.suppress(TimeoutError):  # one bound for the whole batch, not one per item
                async with asyncio.timeout(min(PUBLISH_WAIT, deadline.left(PUBLISH_WAIT + ANSWER_TIME) - ANSWER_TIME)):
                    for gather in stored:
                        await gather.done.wait()
        finally:
            for item_token in tokens:
                del self._pending[item_token]
        done: list[PublishResult | NobodyListening] = []
        late: set[str] = set()
        for (targets, _draft), gather, mark in zip(items, gathers, marks, strict=True):
            msg_id = parse_id(mark)
            if msg_id is None:
                done.append(NobodyListening(targeted=targets is not None))
                continue
            missing = (gather.expected or set()) - gather.reports.keys()
            late |= missing
            done.append(_published(msg_id, list(gather.reports.values()), len(missing)))
        if late:
            log.warning("a batch: no counts within %.1f s from node(s) %s", PUBLISH_WAIT, ", ".join(sorted(late)))
        return done

    async def close_user(self, user_id: str, code: int, reason: str) -> tuple[int, int]:
        # A control entry in the inboxes of the nodes that hold the user: each closes its sockets of the user
        # and reports how many; it is ordered after every message before it. It is kept in no history index.
        fields = {"c": "close", "u": user_id, "code": str(code), "why": reason}
        _id, reports, missing = await self._gather("close", [user_id], fields, None, "the close of the connections")
        return sum(counts.sent for counts in reports), missing

    def _record(self, token: str, claim: Claim | None) -> Record:
        """The record a publish script keeps of a request: of this request alone (its retries after a lost
        answer store once), or the Idempotency-Key's (a later request with the key finds the message)."""
        if claim is None:
            return Record(f"{self._prefix}pub:{token}", token, "", TOKEN_TTL)
        return Record(_hashed("idem", claim.key, self._prefix), token, claim.fingerprint, claim.ttl)

    async def _gather(
        self,
        mode: str,
        targets: list[str],
        fields: dict[str, str],
        claim: Claim | None,
        what: str,
        record: Record | None = None,
    ) -> tuple[MessageId | None, list[Counts], int]:
        """Add an entry unless nobody it is for is connected, and gather the counts of the nodes it went to.

        `mode` is the publish script's: `all`, `users` (the nodes holding `targets`), `close` (likewise).
        Returns (the id, or None when nobody was there; every report that came within PUBLISH_WAIT and the
        request's deadline; the number of nodes it went to that did not report). Raises BrokerUnavailable
        when nothing was stored, OutcomeUnknown when that is not known, Conflict or ValidationError when
        another request holds the claim's key.
        """
        token = secrets.token_hex(8)
        gather = self._pending[token] = _Gather()
        try:
            feed_max, index_ttl = max(self._size, FEED_MIN), int(self._ttl * 1000) + 1000
            head = [self._prefix, feed_max, FEED_MIN, self._size, index_ttl, mode, len(targets), *targets]
            kept = record or self._record(token, claim)
            entry = {"o": self.node_id, "r": token, **fields}
            argv = [*head, kept.token, kept.fingerprint, int(kept.ttl * 1000), self._epoch,
                    *(x for kv in entry.items() for x in kv)]  # fmt: skip
            (outcome, live, *found), unknown = await self._store([*self._keys, kept.key], argv, what)
            _check_outcome(outcome, unknown, what)
            if outcome == "nobody":
                return None, [], 0
            msg_id = parse_id(found[0])
            assert msg_id is not None, found
            self._stored = max(self._stored, msg_id)
            gather.expect(set(live))
            if not gather.done.is_set():
                # asyncio.timeout, not wait_for: wait_for wraps the wait in a task of its own, on every publish.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(
                        min(PUBLISH_WAIT, deadline.left(PUBLISH_WAIT + ANSWER_TIME) - ANSWER_TIME)
                    ):
                        await gather.done.wait()
        finally:
            del self._pending[token]
        missing = sorted((gather.expected or set()) - gather.reports.keys())
        if missing:
            log.warning("entry %s: no counts in time from node(s) %s", msg_id, ", ".join(missing))
        return msg_id, list(gather.reports.values()), len(missing)

    # --- the reader ----------------------------------------------------------------------------------------

    async def _read_once(self) -> None:
        assert self._blocking is not None
        if not self._reader.up:
            await self._repair()
        # After a reconnect the first read barely blocks, and only once it has come back is the reader up:
        # a blocking connection that went stale in a Redis restart fails on its first command,
        # and a node must not say ready while its reader is still in backoff.
        first = not self._reader.up
        block = 1 if first else int(READ_BLOCK * 1000)
        # redis-py's default (RESP2) form: [[stream, [(id, {field: value}), ...]]], or None after the block timeout.
        reply: list[tuple[str, list[tuple[str, dict[str, str]]]]] | None = cast(Any, await self._read_inbox(block))
        self._last_read = time.monotonic()
        if first:
            self._reader.ok()
            if self._presence.up:
                self._up.set()
        reports: list[tuple[str, bytes]] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                try:
                    report = await self._deliver(entry_id, fields)
                except Exception:  # a bad entry must not stop the feed: skip it, loudly
                    log.exception("skipping stream entry %s", entry_id)
                    report = None
                if report is not None:
                    reports.append(report)
                self._last_id = entry_id
        self._last_read = time.monotonic()
        if reply:
            await self._trim_bytes()
        if reports:
            assert self._cmd is not None
            async with self._cmd.pipeline(transaction=False) as pipe:
                for origin, body in reports:
                    key = f"{self._replies_prefix}replies:{origin}"
                    pipe.rpush(key, body)
                    pipe.pexpire(key, int(HEARTBEAT_TTL * 1000))
                await pipe.execute()

    async def _read_inbox(self, block: int) -> Any:
        """XREAD BLOCK on this node's inbox, by name: on Redis Cluster redis-py cannot find XREAD's key without
        asking the server (COMMAND GETKEYS, twice a read)."""
        args = ("XREAD", "COUNT", READ_COUNT, "BLOCK", block, "STREAMS", self._inbox_key, self._last_id)
        return await self._blocking_read(self._inbox_key, *args)

    async def _repair(self) -> None:
        """On (re)connecting: repair the stream if Redis lost its data, and find out whether this node missed
        entries (Redis lost them, or trimmed them before this reader got there). If it did, its sockets are
        closed with 1013, so they resume with `since` and hear `recovered: false`, never a silent gap."""
        keys = [self._keys[1], self._keys[2], self._inbox_key]
        lost, last, epoch, deleted = await self._run(scripts.REPAIR, keys, [self._last_id])
        position = parse_id(self._last_id) or MessageId(0, 0)
        if lost and self._last_id != "0-0":
            log.warning("Redis lost its data (a restart?): history starts again now; presence is rewritten")
        elif lost:
            log.info("Redis holds no diary-ws data yet: history starts now")
        if self._last_id == "0-0":
            self._last_id = last  # a fresh process starts at the end of the feed
        elif epoch != self._epoch or (parse_id(deleted) or MessageId(0, 0)) > position:
            # Lost with Redis, or trimmed unread: whatever this reader had not read yet is gone. Read on from
            # where the repaired stream starts, and tell every socket here.
            self._last_id = deleted if epoch != self._epoch else self._last_id
            self._resync("Redis lost entries this node had not delivered yet")
        self._epoch = epoch

    async def _deliver(self, entry_id: str, fields: dict[str, str]) -> tuple[str, bytes] | None:
        """Fan one entry out here; the report to send to its publisher, if it is another node."""
        msg_id = parse_id(entry_id)
        assert self._node is not None
        if msg_id is not None and fields.get("c") == "rejoin":
            self._rejoined(msg_id)
            return None
        if msg_id is not None and fields.get("c") == "close":
            closed = self._node.close_local(fields["u"], int(fields["code"]), fields["why"])
            counts = Counts(closed, closed, 0, int(closed > 0), None)
        elif msg_id is not None and "k" in fields:
            targets = frozenset(fields["t"].split(",")) if "t" in fields else None
            data = orjson.loads(fields["d"]) if "d" in fields else None
            message = Message.build(msg_id, targets, Draft(fields["k"], fields["m"], data).render(msg_id))
            counts = await self._node.deliver(message, True)
        else:
            log.warning("skipping stream entry %s: not a diary-ws entry", entry_id)
            return None
        origin, token = fields.get("o"), fields.get("r", "")
        if origin == self.node_id:
            gather = self._pending.get(token)
            if gather is not None:
                gather.add(self.node_id, counts)
            return None
        now = self._redis_ms()  # the age of an entry on Redis's own clock: node clocks do not matter
        if origin is None or (now is not None and now - msg_id.ms > REPORT_MAX_AGE_MS):
            return None
        return origin, orjson.dumps({"t": token, "n": self.node_id, "c": counts[:4], "u": counts.users})

    def _rejoined(self, mark: MessageId) -> None:
        """This node's heartbeat had expired and came back at `mark` (scripts.BEAT): every publish in between
        skipped this node, so a socket that joined before the mark may have missed messages. Close those with
        1013, before anything newer is delivered; they resume with `since` from the user's history."""
        assert self._node is not None
        self._last_mark = max(self._last_mark, mark)
        # A user whose only sockets here are still joining is decided when the JOIN answers (PresenceMixin).
        zero = MessageId(0, 0)
        joined, joining = self._joined, self._joining
        users = [u for u in self._node.presence() if joined.get(u, zero) < mark and (u in joined or u not in joining)]
        closed = sum(self._close_for_mark(user) for user in users)
        log.warning("this node's heartbeat had expired (publishes skipped it): closed its %d sockets with %d so "
                    "they resume", closed, CLOSE_TRY_AGAIN)  # fmt: skip

    async def _replies_once(self) -> None:
        assert self._blocking is not None
        first = not self._replies.up  # as for the stream reader: up once a command has come back
        popped = await self._blocking_read(self._replies_key, "BLPOP", self._replies_key, 0.01 if first else READ_BLOCK)
        if first:
            self._replies.ok()
        if popped is None:
            return
        report = orjson.loads(popped[1])
        gather = self._pending.get(report["t"])
        if gather is not None:
            sent, total, lost, reached = report["c"]
            gather.add(report["n"], Counts(sent, total, lost, reached, report["u"]))
