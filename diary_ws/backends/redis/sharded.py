"""Redis Cluster (`BROKER_URL=redis-cluster://host:port`): each node's users spread over SHARDS shards.

A shard is the whole one-Redis layout of docs/cluster.md (feed, history window, per-user and broadcast
indexes, presence, heartbeats, inboxes) under a key prefix with a hash tag of its own, so all its keys live in
one hash slot and every script stays one atomic step on one master. A user belongs to one shard (CRC-32 of
the user id), so everything about a user (presence, targeted messages, history, the order of what they get)
is decided in one place, as on one Redis; the shards' slots are spread over the masters. Each node runs one
`RedisBackend` per shard (its own reader and presence writer; the count replies are read once, by the
first shard's), and this class routes by user.

- **Targeted messages** go to the shards of their users: one script for a user, one per shard otherwise.
- **Broadcasts** are written to every shard: each user gets the copy of their own shard, in that shard's id
  order with their targeted messages, and resumes from it. The copies have one id per shard; the answer
  names the first copy somebody got.
- **Those away**: a shard where none of a message's users is connected keeps it anyway when another shard's
  users got it (a second step, modes `every` and `keep`), as one Redis keeps a message for every target;
  nobody connected anywhere is a 404 with nothing stored. A batch asks every shard who is connected first,
  then stores each wanted item in all of its shards, in the batch's order (`publish_batch`).
- **Idempotency-Key**: the key's record lives in its own shard (the "home"). A message for the home shard
  alone is recorded by the script that stores it, as on one Redis. Any other first takes the key there for its
  notification (IDEM_RESERVE: 422 for another one, 409 for a duplicate under way), then is stored in each
  shard with a record whose token follows from the key and the notification, so a retry is, for every shard,
  a resend of the same request and stores nothing twice; the home record gets the id after the parts.
- **Status, presence and the console** gather every shard's answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import secrets
import zlib
from collections.abc import Awaitable, Iterator, Mapping, Sized
from dataclasses import replace
from typing import Self, TypeVar

from redis.crc import key_slot

from diary_ws.backends import first_ids
from diary_ws.backends.redis import RedisBackend, scripts
from diary_ws.backends.redis.client import _hashed
from diary_ws.backends.redis.feed import Record, _check_outcome
from diary_ws.deadline import REQUEST_SECONDS
from diary_ws.errors import NobodyListening, OutcomeUnknown
from diary_ws.messages import Draft, Message, MessageId
from diary_ws.protocols import Claim, Counts, Node, NodeInfo, Page, PublishResult, Replay

BUSY_WINDOW = REQUEST_SECONDS + 1.0  # as idempotency.BUSY_WINDOW: how long a taken key makes a duplicate wait
SHARDS = 8  # the most masters a deployment's load spreads over; changing it starts every history afresh
REDIS_SLOTS = 16384

_T = TypeVar("_T")
Targets = frozenset[str] | None


def shard_prefixes(count: int = SHARDS) -> list[str]:
    """Each shard's key prefix: a hash tag whose slot lies in the shard's own 1/count of the slots, so a
    cluster whose masters hold equal runs of slots (as `redis-cli --cluster create` makes them) gets an even
    share of the shards on each. The count is in the tag, so a build with another count shares no key."""
    prefixes = []
    for i in range(count):
        low, high = i * REDIS_SLOTS // count, (i + 1) * REDIS_SLOTS // count
        n = 0
        while not low <= key_slot(f"diary-ws.{count}.{i}.{n}".encode()) < high:
            n += 1
        prefixes.append(f"{{diary-ws.{count}.{i}.{n}}}:")
    return prefixes


def shard_of(user_id: str, count: int = SHARDS) -> int:
    """The shard of a user (or of an Idempotency-Key, a rate-limit bucket): the same on every node."""
    return zlib.crc32(user_id.encode()) % count


class ShardNode:
    """The Node one shard sees: this process's sockets of the shard's users, and nobody else's."""

    def __init__(self, node: Node) -> None:
        self.node = node
        # The shard's users here, or a few more: `join` adds a user before the shard hears of them, `left`
        # removes one with no socket left here. A broadcast's copy is for these users only.
        self.users: set[str] = set()

    async def deliver(self, message: Message, want_users: bool) -> Counts:
        if message.targets is None:  # this shard's copy of a broadcast
            if not self.users:
                return Counts(0, 0, 0, 0, [] if want_users else None)
            message = replace(message, targets=frozenset(self.users))
        return await self.node.deliver(message, want_users)

    def presence(self) -> Mapping[str, Sized]:
        here = self.node.presence()
        return {user: here[user] for user in self.users if user in here}

    def close_local(self, user_id: str, code: int, reason: str) -> int:
        return self.node.close_local(user_id, code, reason)

    def sizes(self) -> tuple[int, int]:
        mine = self.presence()
        return len(mine), sum(map(len, mine.values()))

    def user_ids(self, limit: int | None = None) -> list[str]:
        return first_ids(self.presence(), limit)


class ShardedRedisBackend:
    """One node of a diary-ws cluster on Redis Cluster: SHARDS `RedisBackend`s, one per shard, routed by user."""

    replay_covers_live = RedisBackend.replay_covers_live

    def __init__(self, url: str, history_size: int, history_ttl: float, history_bytes: int = 64 * 1024 * 1024):
        prefixes = shard_prefixes()
        share = max(1, history_bytes // len(prefixes))  # HISTORY_BYTES is the node's, over all its shards
        first = RedisBackend(url, history_size, history_ttl, share, shard=(prefixes[0], None))
        self._shards = [first] + [
            RedisBackend(url, history_size, history_ttl, share, shard=(prefix, first)) for prefix in prefixes[1:]
        ]
        self._views: list[ShardNode] = []
        self.node_id = first.node_id

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self, node: Node) -> None:
        self._views = [ShardNode(node) for _ in self._shards]
        await asyncio.gather(*(shard.start(view) for shard, view in zip(self._shards, self._views, strict=True)))

    async def stop(self) -> None:
        await asyncio.gather(*(shard.stop() for shard in self._shards))

    def ready(self) -> bool:
        return all(shard.ready() for shard in self._shards)

    @property
    def reader_up(self) -> bool:
        return all(shard.reader_up for shard in self._shards)

    # --- one user: their shard ----------------------------------------------------------------------------

    def _of(self, user_id: str) -> RedisBackend:
        return self._shards[shard_of(user_id, len(self._shards))]

    async def join(self, user_id: str, limit: int) -> None:
        index = shard_of(user_id, len(self._shards))
        self._views[index].users.add(user_id)
        await self._shards[index].join(user_id, limit)

    def left(self, user_id: str) -> None:
        index = shard_of(user_id, len(self._shards))
        view = self._views[index]
        if user_id not in view.node.presence():
            view.users.discard(user_id)
        self._shards[index].left(user_id)

    async def connections(self, user_id: str) -> int:
        return await self._of(user_id).connections(user_id)

    async def close_user(self, user_id: str, code: int, reason: str) -> tuple[int, int]:
        return await self._of(user_id).close_user(user_id, code, reason)

    async def replay_page(self, user_id: str, after: MessageId, limit: int, max_bytes: int) -> Page:
        return await self._of(user_id).replay_page(user_id, after, limit, max_bytes)

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        return await self._of(user_id).replay(user_id, since)

    # --- everyone: every shard ----------------------------------------------------------------------------

    async def status(self, limit: int | None = None) -> tuple[list[str], int, int]:
        """Each user's presence lives in its own shard, so the shards' users are distinct and their first ids
        hold the cluster's first ones."""
        found = await _every(shard.status(limit) for shard in self._shards)
        ids = list(itertools.islice(heapq.merge(*(ids for ids, _users, _total in found)), limit))
        return ids, sum(users for _ids, users, _total in found), sum(total for _ids, _users, total in found)

    async def nodes(self) -> list[NodeInfo]:
        merged: dict[str, NodeInfo] = {}
        for listing in await _every(shard.nodes() for shard in self._shards):
            for info in listing:
                seen = merged.get(info.node_id)
                if seen is None:
                    merged[info.node_id] = NodeInfo(info.node_id, info.here, dict(info.users), info.heartbeat)
                else:
                    seen.users.update(info.users)
                    if info.heartbeat is not None and (seen.heartbeat is None or info.heartbeat > seen.heartbeat):
                        merged[info.node_id] = seen._replace(heartbeat=info.heartbeat)
        return sorted(merged.values(), key=lambda node: (not node.here, node.node_id))

    # --- the shared store: each key in its own shard --------------------------------------------------------

    def shared(self) -> Self:
        return self

    def _home(self, key: str) -> RedisBackend:
        return self._shards[shard_of(key, len(self._shards))]

    async def take_token(self, bucket: str, burst: int, per_second: float, cost: int = 1) -> tuple[bool, float]:
        return await self._home(bucket).take_token(bucket, burst, per_second, cost)

    async def idem_begin(self, key: str, print_: str, busy_ttl: float) -> tuple[str, int, str]:
        return await self._home(key).idem_begin(key, print_, busy_ttl)

    async def idem_finish(self, key: str, status: int, body: str, ttl: float) -> None:
        await self._home(key).idem_finish(key, status, body, ttl)

    async def idem_abandon(self, key: str) -> None:
        await self._home(key).idem_abandon(key)

    # --- publish ------------------------------------------------------------------------------------------

    def _groups(self, targets: Targets) -> dict[int, Targets]:
        """The shards a message goes to, each with its users there (None: a broadcast, every shard)."""
        if targets is None:
            return dict.fromkeys(range(len(self._shards)))
        groups: dict[int, set[str]] = {}
        for user in targets:
            groups.setdefault(shard_of(user, len(self._shards)), set()).add(user)
        return {index: frozenset(users) for index, users in sorted(groups.items())}

    def _record(self, index: int, claim: Claim | None, item: int | None = None) -> Record | None:
        """A shard's record of a keyed request's part: its token follows from the key and the notification,
        so every request with the key is the same request to the shard, whichever step stored the part (a
        retry may find somebody connected where the first attempt kept the message for those away).
        None: the shard's own record."""
        if claim is None:
            return None
        name = f"{claim.key}\0{claim.fingerprint}" + ("" if item is None else f"\0{item}")  # `item`: one of a batch
        token = hashlib.sha256(name.encode()).hexdigest()[:32]
        prefix = self._shards[index]._prefix
        return Record(f"{prefix}pub:{token}", token, claim.fingerprint, claim.ttl)

    async def publish(self, targets: Targets, draft: Draft, claim: Claim | None = None) -> PublishResult:
        count = len(self._shards)
        groups = self._groups(targets)
        if len(groups) == 1:
            [(index, users)] = groups.items()
            if claim is None or index == shard_of(claim.key, count):  # as on one Redis, record and all
                return await self._shards[index].publish(users, draft, claim)

        async def part(index: int, users: Targets, keep: bool) -> PublishResult:
            record = self._record(index, claim)
            return await self._shards[index].publish(users, draft, record=record, keep=keep)

        if claim is not None:
            await self._reserve(claim)

        done = await _parts({index: part(index, users, False) for index, users in groups.items()})
        results = _stored(done)  # the copies somebody got first: the answer names the first of them
        away = [index for index, answer in done.items() if isinstance(answer, NobodyListening)]
        if away and results:  # kept for those away too, as one Redis keeps it for every target
            kept = await _parts({index: part(index, groups[index], True) for index in away})
            results += _stored(kept, any_stored=True)
        if not results:
            raise NobodyListening(targeted=targets is not None)
        if claim is not None:
            await self._record_home(claim, str(results[0].id), "", "")
        return _summed(results)

    async def publish_batch(
        self, items: list[tuple[Targets, Draft]], claim: Claim | None = None
    ) -> list[PublishResult | NobodyListening]:
        """Each shard's items in one script, all shards at once; each item's answer sums its shards'.

        One Redis decides every item's 404 in the step that stores it. Over shards, one round trip first asks
        each shard who of the batch's users is connected (scripts.CONNECTED); an item somebody is there for is
        then stored in every shard of its users (or every shard, for a broadcast), there for those away too,
        so each shard keeps the batch's order for each user. Who connects or leaves between the two steps
        counts as a moment earlier or later, as for any publish. The batch as a whole is not one atomic step:
        a shard that fails leaves a 504, which a retry with the Idempotency-Key completes."""
        count = len(self._shards)
        rows: dict[int, list[tuple[int, Targets]]] = {}
        for number, (targets, _draft) in enumerate(items):
            for index, users in self._groups(targets).items():
                rows.setdefault(index, []).append((number, users))
        if len(rows) == 1 and (claim is None or next(iter(rows)) == shard_of(claim.key, count)):
            [(index, mine)] = rows.items()  # one shard: its script decides and stores, as on one Redis
            return await self._shards[index].publish_batch([(users, items[n][1]) for n, users in mine], claim)

        if claim is not None:
            await self._reserve(claim)
        asked = {index: sorted({u for _n, users in mine for u in users or ()}) for index, mine in rows.items()}
        found = await _parts({index: self._shards[index].connected(users) for index, users in asked.items()})
        _raise_failure(found, any_stored=False)
        anyone = any(seen[0] for seen in found.values() if isinstance(seen, tuple))
        here: set[str] = set()
        for seen in found.values():
            if isinstance(seen, tuple):
                here |= seen[1]
        wanted = [anyone if targets is None else not here.isdisjoint(targets) for targets, _draft in items]

        # Every shard gets all of its rows each time (a retry's shard finds the rows its record answers for),
        # the wanted ones kept for those away.
        async def part(index: int, mine: list[tuple[int, Targets]]) -> list[PublishResult | NobodyListening]:
            batch = [(users, items[n][1]) for n, users in mine]
            keep = [wanted[n] for n, _users in mine]
            return await self._shards[index].publish_batch(batch, record=self._record(index, claim), keep=keep)

        done = await _parts({index: part(index, mine) for index, mine in rows.items()})
        per_item: list[list[PublishResult]] = [[] for _ in items]
        away: dict[int, list[tuple[int, Targets]]] = {}  # item -> its parts nobody was there for
        for index, stored in done.items():
            if isinstance(stored, BaseException):
                continue
            for (number, users), answer in zip(rows[index], stored, strict=True):
                if isinstance(answer, PublishResult):
                    per_item[number].append(answer)
                else:
                    away.setdefault(number, []).append((index, users))
        _raise_failure(done, any_stored=any(per_item))
        # An item nobody was there for when asked, whose user connected in one shard before it was stored
        # there: kept in its other shards too, one by one (a rare race; its order is its own).
        late = [(number, index, users) for number, parts in away.items() if per_item[number] for index, users in parts]
        if late:

            async def keep_one(number: int, index: int, users: Targets) -> PublishResult:
                record = self._record(index, claim, item=number)
                return await self._shards[index].publish(users, items[number][1], record=record, keep=True)

            again = await _parts({i: keep_one(*row) for i, row in enumerate(late)})
            _raise_failure(again, any_stored=True)
            for i, (number, _index, _users) in enumerate(late):
                kept = again[i]
                if isinstance(kept, PublishResult):
                    per_item[number].append(kept)
        answers: list[PublishResult | NobodyListening] = [
            _summed(results) if results else NobodyListening(targeted=targets is not None)
            for (targets, _draft), results in zip(items, per_item, strict=True)
        ]
        if claim is not None and any(per_item):
            marks = ",".join(str(a.id) if isinstance(a, PublishResult) else "-" for a in answers)
            first_id = next(str(a.id) for a in answers if isinstance(a, PublishResult))
            await self._record_home(claim, first_id, marks, ";" * len(answers))
        return answers

    async def _reserve(self, claim: Claim) -> None:
        """Take the key in its home shard for this notification before any part is stored (IDEM_RESERVE):
        422 if another notification holds it, 409 if a request with this one took it a moment ago."""
        home = self._home(claim.key)
        keys = [_hashed("idem", claim.key, home._prefix)]
        argv = [claim.fingerprint, secrets.token_hex(8), int(BUSY_WINDOW * 1000), int(claim.ttl * 1000)]
        _check_outcome(await home._run(scripts.IDEM_RESERVE, keys, argv), False, "the notification")

    async def _record_home(self, claim: Claim, first_id: str, marks: str, tos: str) -> None:
        """The Idempotency-Key's record in its home shard, after the parts were stored (scripts.IDEM_RECORD).
        If it cannot be written, the request says 504: a retry stores nothing twice (the parts' records)."""
        home = self._home(claim.key)
        token = hashlib.sha256(f"{claim.key}\0{claim.fingerprint}".encode()).hexdigest()[:32]
        keys = [_hashed("idem", claim.key, home._prefix)]
        argv = [token, claim.fingerprint, first_id, int(claim.ttl * 1000), marks, tos]
        try:
            await home._run(scripts.IDEM_RECORD, keys, argv)
        except Exception as exc:
            raise OutcomeUnknown(
                "the broker did not record the Idempotency-Key: the notification was sent; a retry with the same "
                "Idempotency-Key is safe and sends nothing twice"
            ) from exc


async def _every(calls: Iterator[Awaitable[_T]]) -> list[_T]:
    return list(await asyncio.gather(*calls))


async def _parts(calls: dict[int, Awaitable[_T]]) -> dict[int, _T | BaseException]:
    """Run one awaitable per shard at once; each one's result or exception, by shard."""
    done = await asyncio.gather(*calls.values(), return_exceptions=True)
    for outcome in done:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # a cancellation is not an answer
    return dict(zip(calls, done, strict=True))


def _stored(done: dict[int, PublishResult | BaseException], any_stored: bool = False) -> list[PublishResult]:
    """The shards' PublishResults in shard order, after raising what the failures mean for the request
    (`any_stored`: an earlier step stored some of it already)."""
    results = [answer for _index, answer in sorted(done.items()) if isinstance(answer, PublishResult)]
    _raise_failure(done, any_stored=any_stored or bool(results))
    return results


def _summed(results: list[PublishResult]) -> PublishResult:
    """One message's answer from its shards' parts: the first part's id, the counts summed."""
    return PublishResult(
        results[0].id,
        sum(r.sent_count for r in results),
        sum(r.total_connections for r in results),
        sum(r.disconnected_users for r in results),
        sum(r.users_reached for r in results),  # each user is in one shard: nobody is counted twice
        max(r.nodes_missing for r in results),  # the same node is often missing from several shards
    )


def _raise_failure(done: Mapping[int, object], any_stored: bool) -> None:
    """A shard that failed while another stored its part: the message reached some users and not others, so
    the request's outcome is unknown to its sender (504; a retry with the key completes it, storing nothing
    twice). With nothing stored, the first failure is the answer (503, 504, 409 or 422)."""
    failures = [
        answer for answer in done.values() if isinstance(answer, Exception) and not isinstance(answer, NobodyListening)
    ]
    if not failures:
        return
    if any_stored:
        raise OutcomeUnknown(
            "the broker stored the notification for some users and failed for others: a retry with the same "
            "Idempotency-Key is safe and completes it (without one, a retry may send it twice to some)"
        ) from failures[0]
    raise failures[0]
