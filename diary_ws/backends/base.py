"""What the broadcaster and a backend need of each other: the publish flow, history, presence, liveness.

The Hub hands the backend a `Node` at start. The backend decides where a message goes first (memory: straight
back into this process; Redis: a stream every node reads) and calls `Node.deliver` once for every message, on
every node, in one order. `publish` returns the counts summed over every node that reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
from typing import NamedTuple, Protocol

from diary_ws.errors import NobodyListening
from diary_ws.idempotency import Claim
from diary_ws.messages import Draft, Message, MessageId


class Replay(NamedTuple):
    """A whole `?since=` replay at once (for tests and tools; the Hub pulls pages): messages, nothing missing."""

    messages: list[Message]
    recovered: bool


class Page(NamedTuple):
    """One page of a `?since=` replay, which the Hub pulls from the history as the socket drains.

    Its messages share the history's frames (no copy per socket), and a page holds at most what one
    socket's backlog may, so a replay's total is not capped but what it holds at once is.
    """

    messages: list[Message]  # the user's retained messages after `after`, oldest first
    last: MessageId  # the next page starts after this id: the newest entry looked at, the user's or not
    more: bool  # the history holds entries after `last` right now
    recovered: bool  # nothing after `after` is missing (evicted, expired), and `after` is no id from the future


class Counts(NamedTuple):
    """One node's fan-out of one message, in sockets; `users` the users reached, when asked for."""

    sent: int
    total: int
    lost: int
    reached: int
    users: list[str] | None


class Published(NamedTuple):
    """A stored message and its counts over the cluster; `nodes_missing` nodes did not report in time."""

    id: MessageId
    sent: int
    total: int
    lost: int
    reached: int  # distinct users
    nodes_missing: int


class Node(Protocol):
    """This process's side, as a backend sees it (the Hub)."""

    async def deliver(self, message: Message, want_users: bool) -> Counts:
        """Fan one message out to this process's sockets, without waiting on any of them.

        It yields to the event loop between chunks of sockets; call it right after the message got its id,
        with no await in between, so deliveries keep id order (the Hub queues them first come, first served).
        """

    def presence(self) -> Mapping[str, Sized]:
        """User id -> this process's sockets of that user (read only)."""

    def close_local(self, user_id: str, code: int, reason: str) -> int:
        """Close this process's sockets of `user_id` with `code`; how many there were."""


class SharedState(Protocol):
    """Rate-limit buckets and idempotency keys that every node shares (see ratelimit and idempotency)."""

    async def take_token(self, bucket: str, burst: int, per_second: float, cost: int = 1) -> tuple[bool, float]: ...
    async def idem_begin(self, key: str, print_: str, busy_ttl: float) -> tuple[str, int, str]: ...
    async def idem_finish(self, key: str, status: int, body: str, ttl: float) -> None: ...
    async def idem_abandon(self, key: str) -> None: ...


class Backend(Protocol):
    """The small interface the Hub talks to; `memory` is the embedded default, `redis` the scale-out one."""

    # Every message a socket is offered live is in the history its replay reads, for good or until evicted
    # (memory: the same process's history). Then a replaying socket leaves live messages to its replay. Redis
    # can lose its data between the live delivery and the replay's read, so there they wait in the backlog.
    replay_covers_live: bool

    async def start(self, node: Node) -> None:
        """Connect and start any reader; called once from the app's lifespan."""

    async def stop(self) -> None:
        """Release everything `start` took, and leave the cluster's presence."""

    def ready(self) -> bool:
        """Whether publishes can be stored and delivered now."""

    async def publish(self, targets: frozenset[str] | None, draft: Draft, claim: Claim | None = None) -> Published:
        """Give the message its id, keep it in the history, deliver it everywhere, and count.

        Raises NobodyListening (404) when none of `targets` (None: anyone) is connected on any node,
        BrokerUnavailable (503) when the message was not stored, and OutcomeUnknown (504) when the broker
        did not answer in time (stored or not). With a `claim`, a backend that shares idempotency keys records
        the key with the message, and raises Conflict (409) or ValidationError (422) when the key is taken.
        """

    async def publish_batch(
        self, items: list[tuple[frozenset[str] | None, Draft]], claim: Claim | None = None
    ) -> list[Published | NobodyListening]:
        """`publish` for each item, in order, each on its own: a NobodyListening in the place of an item nobody
        was there for. A broker failure raises for the whole batch (Redis: one round trip, all or none), as
        `publish` does, and so does a `claim` whose key another request holds.
        """

    async def connections(self, user_id: str) -> int:
        """How many sockets and streams `user_id` has open on every live node (BrokerUnavailable if unknown)."""

    async def replay_page(self, user_id: str, after: MessageId, limit: int, max_bytes: int) -> Page:
        """The retained messages for `user_id` after `after`, oldest first: at most `limit` of them and about
        `max_bytes` (always at least one when there is one), from a bounded stretch of the history."""

    async def replay(self, user_id: str, since: MessageId) -> Replay:
        """Every retained message for `user_id` after `since` at once: for tests and tools, never for a socket."""

    async def join(self, user_id: str, limit: int) -> None:
        """A socket of `user_id` was added here: record it; TooManyConnections past `limit` cluster-wide."""

    def left(self, user_id: str) -> None:
        """A socket of `user_id` went away here; recorded in the background."""

    async def status(self) -> tuple[list[str], int]:
        """Every connected user id on every live node, sorted, and the number of sockets."""

    async def close_user(self, user_id: str, code: int, reason: str) -> tuple[int, int]:
        """Close every socket of `user_id` on every node (an operator's disconnect): (closed, nodes missing)."""

    def shared(self) -> SharedState | None:
        """Where rate limits and idempotency keys live when the cluster shares them; None: in this process."""
