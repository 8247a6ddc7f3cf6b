"""The seams between the pieces, in one module: what each side of a boundary may count on of the other.

- `Sink`: one socket or stream, as the Hub sees it (`routes.AsgiSink`, `sse.SseSink`);
- `SocketControl`, `StreamControl`: the transport hooks diary-ws's own server puts in a scope (`edge/`);
- `Node` and `Backend`: the Hub and the broker, and the records they pass (`PublishResult`, `Counts`, `Page`,
  `Replay`, `NodeInfo`, `Claim`);
- `SharedStore`: the rate-limit buckets and idempotency keys every node shares (the Redis backend), and
  `Idempotency`, the keys as the publish route sees them (kept in this process, or shared);
- `WriteResult` and `CloseCode`: the values that cross them.

No Starlette, no uvicorn, no redis here: every layer may import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol

from diary_ws.errors import Answer, NobodyListening
from diary_ws.messages import Draft, Message, MessageId


class CloseCode(IntEnum):
    """The WebSocket close codes the service sends or reads (RFC 6455, section 7.4; 4000-4999 are ours)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    NO_STATUS = 1005  # the peer's close frame had no code
    ABNORMAL = 1006  # no close frame at all: the connection dropped, or the handler failed first
    INVALID_DATA = 1007  # a text frame that is not UTF-8
    POLICY_VIOLATION = 1008  # too many frames a second (MAX_INCOMING_RATE)
    MESSAGE_TOO_BIG = 1009  # a frame over MAX_INCOMING_BYTES
    SERVICE_RESTART = 1012  # the server is shutting down: reconnect with `since` (the reason may hint a delay)
    TRY_AGAIN_LATER = 1013  # the history could not be read (the broker went away after the handshake)
    TOKEN_EXPIRED = 4001  # the listener's token expired: reconnect with a new one
    DISCONNECTED = 4003  # an operator closed the user's connections (log-out, ban)
    SLOW_CONSUMER = 4008  # the socket's backlog overflowed: reconnect with `since`


class WriteResult(IntEnum):
    """What a write that must not wait did (`Sink.try_write`, `SocketControl.try_write`)."""

    WROTE = 1  # on the transport now
    LATER = 0  # not now: the peer is slow, or there is no transport to write to; send it through ASGI
    DEAD = -1  # the connection is gone


class Sink(Protocol):
    """What the Hub needs of one socket or stream; `routes` adapts an ASGI WebSocket to it, `sse` an SSE stream."""

    def try_write(self, message: Message) -> WriteResult:
        """Write at once if the socket takes bytes now: WROTE; LATER if it cannot now; DEAD if it is gone."""

    async def send_text(self, text: str, msg_id: MessageId | None) -> None:
        """Send one JSON frame (a message with its id, or a control frame with None), waiting while the peer
        is slow; raises once the peer is gone."""

    async def send_heartbeat(self) -> None:
        """Tell the peer the line is alive: a heartbeat frame, or an SSE comment line."""

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame."""

    def stalled(self) -> bool:
        """The peer is not reading: the transport has stopped taking bytes."""

    def abort(self) -> bool:
        """Drop the connection at once, buffers and all; False if the server offers no way to."""


class SocketControl(Protocol):
    """The WebSocket transport hooks diary-ws's own server puts in the scope (`edge.websocket.SocketHooks`);
    other ASGI servers have none, and the Hub then sends every frame through ASGI."""

    def try_write(self, wire: bytes) -> WriteResult: ...
    def stalled(self) -> bool: ...
    def abort(self) -> None: ...


class StreamControl(Protocol):
    """The HTTP transport hooks diary-ws's own server puts in a scope for an SSE stream
    (`edge.http.StreamHooks`); other ASGI servers have none."""

    def try_write(self, chunk: bytes) -> WriteResult: ...
    def stalled(self) -> bool: ...
    def abort(self) -> None: ...
    def on_shutdown(self, callback: Callable[[], None] | None) -> None: ...


class SharedStore(Protocol):
    """Rate-limit buckets and idempotency keys that every node shares (the Redis backend's `shared()`)."""

    async def take_token(self, bucket: str, burst: int, per_second: float, cost: int = 1) -> tuple[bool, float]:
        """Take `cost` tokens from `bucket` if it has them all: (taken, whole and partial tokens left)."""

    async def idem_begin(self, key: str, print_: str, busy_ttl: float) -> tuple[str, int, str]:
        """("first", 0, "") | ("busy", 0, "") | ("other", 0, "") | ("done", status, body) |
        ("stale", live nodes, id): stored over `busy_ttl` seconds ago and never answered."""

    async def idem_finish(self, key: str, status: int, body: str, ttl: float) -> None:
        """Keep the first answer for `ttl` seconds (if the key is still waiting for one)."""

    async def idem_abandon(self, key: str) -> None:
        """Forget the key if no message was stored under it."""


class Idempotency(Protocol):
    """What the publish route needs: `idempotency.IdempotencyCache`'s three steps, awaitable, and the claim for the
    backend (None when the key is kept in this process)."""

    async def begin(self, key: str, print_: bytes) -> Answer | None: ...
    def claim(self, key: str, print_: bytes) -> Claim | None: ...
    async def finish(self, key: str, answer: Answer) -> None: ...
    async def abandon(self, key: str) -> None: ...


class Claim(NamedTuple):
    """An Idempotency-Key a publish carries to the backend: Redis records it in the step that stores the message."""

    key: str
    fingerprint: str  # hex: the notification's meaning (see `idempotency.fingerprint`)
    ttl: float  # seconds the key is kept


@dataclass(frozen=True, slots=True)
class PublishResult:
    """A stored message and the counts of the POST's answer (docs/api.md): sockets, summed over every node
    that reported, and the distinct users reached."""

    id: MessageId
    sent_count: int
    total_connections: int
    disconnected_users: int
    users_reached: int
    nodes_missing: int = 0  # nodes that did not report their counts in time (Redis only)


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
    """One node's share of a message's fan-out, in sockets (`users`: the users reached, when asked for). The
    backend sums the shares of every node that reported into the message's `PublishResult`."""

    sent: int
    total: int
    lost: int
    reached: int
    users: list[str] | None


class NodeInfo(NamedTuple):
    """One live node of the cluster, as the console lists it."""

    node_id: str
    here: bool  # this process
    users: dict[str, int]  # user id -> that user's sockets on the node
    heartbeat: float | None  # Unix time of its last heartbeat; None where there is none (memory://)


class Node(Protocol):
    """This process's side, as a backend sees it (the Hub)."""

    async def deliver(self, message: Message, want_users: bool) -> Counts:
        """Fan one message out to this process's sockets, without waiting on any of them.

        It yields to the event loop between chunks of sockets; call it right after the message got its id,
        with no await in between, so deliveries keep id order (the Hub queues them first come, first served).
        """

    def presence(self) -> Mapping[str, Sized]:
        """User id -> this process's sockets of that user (read only)."""

    def sizes(self) -> tuple[int, int]:
        """(distinct users, sockets) on this process, counted as they come and go: nothing is walked."""

    def user_ids(self, limit: int | None = None) -> list[str]:
        """The first `limit` user ids of `presence()` in sorted order (all with None), kept sorted as users
        come and go: a monitor may poll the status every few milliseconds."""

    def close_local(self, user_id: str, code: int, reason: str) -> int:
        """Close this process's sockets of `user_id` with `code`; how many there were."""


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

    async def publish(self, targets: frozenset[str] | None, draft: Draft, claim: Claim | None = None) -> PublishResult:
        """Give the message its id, keep it in the history, deliver it everywhere, and count.

        Raises NobodyListening (404) when none of `targets` (None: anyone) is connected on any node,
        BrokerUnavailable (503) when the message was not stored, and OutcomeUnknown (504) when the broker
        did not answer in time (stored or not). With a `claim`, a backend that shares idempotency keys records
        the key with the message, and raises Conflict (409) or ValidationError (422) when the key is taken.
        """

    async def publish_batch(
        self, items: list[tuple[frozenset[str] | None, Draft]], claim: Claim | None = None
    ) -> list[PublishResult | NobodyListening]:
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

    async def status(self, limit: int | None = None) -> tuple[list[str], int, int]:
        """The first `limit` connected user ids on every live node in sorted order (all with None), how many
        distinct users are connected, and the number of sockets. A monitor may poll it every few milliseconds."""

    async def nodes(self) -> list[NodeInfo]:
        """Every live node with its users' socket counts; this process's node first."""

    async def close_user(self, user_id: str, code: int, reason: str) -> tuple[int, int]:
        """Close every socket of `user_id` on every node (an operator's disconnect): (closed, nodes missing)."""

    def shared(self) -> SharedStore | None:
        """Where rate limits and idempotency keys live when the cluster shares them; None: in this process."""
