"""The Hub: this process's sockets, one bounded backlog each, fan-out, counts and clean-up.

A publish never waits on a socket. It renders and frames the message once, writes those same bytes at
once to every targeted socket that takes bytes now, and queues them for the others, whose writer task
drains the backlog in order. A backlog that overflows (SEND_QUEUE_SIZE messages or SEND_QUEUE_BYTES
bytes) marks a slow consumer: it leaves the registry at once and is closed with 4008, or aborted when
it reads nothing (see `Sink.abort`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from diary_ws.errors import BrokerUnavailable, NobodyListening, NotStarted, ServerFull, TooManyConnections
from diary_ws.messages import Draft, Message, MessageId, control_frame
from diary_ws.protocols import Backend, Claim, CloseCode, Counts, PublishResult, Sink, WriteResult
from diary_ws.validation import Notification, check_notification

log = logging.getLogger("diary_ws.hub")

# Sockets per turn of the event loop in a fan-out: about 2-4 ms of work at 18,500 sockets (a write each). With
# 256, a broadcast's turns were the busiest of the steady state (docs/performance.md).
FANOUT_CHUNK = 128


@dataclass(frozen=True, slots=True)
class Limits:
    """The Hub's share of Settings."""

    max_connections: int
    max_connections_per_user: int
    send_queue_size: int
    send_queue_bytes: int
    max_message_chars: int = 65536  # what `notify` checks, as the POST does
    stall_timeout: float = 20.0  # PING_TIMEOUT: a replay that sends nothing for this long is dropped


@dataclass(slots=True)
class HubStats:
    """Plain running totals the metrics collector reads at scrape time: int additions, no locks, no labels.

    They count per publish or per failed socket, never per successful delivery, so the hot path stays cheap.
    """

    published: int = 0  # messages this node stored and fanned out
    delivered: int = 0  # sockets a message was handed to (written or queued)
    dropped_dead: int = 0  # targeted sockets found gone during a fan-out
    slow_consumers: int = 0  # sockets closed (or aborted) because their backlog overflowed
    observe_fanout: Callable[[float], None] = field(default=lambda seconds: None)  # set by diary_ws.metrics
    observe_notify: Callable[[float], None] = field(default=lambda seconds: None)  # a `notify` that published


class State(IntEnum):
    """Where a connection is in its life. It changes only in `Connection._move`, along these arrows:

        NEW -> ATTACHED -> REPLAYING -> LIVE -> CLOSING -> GONE
        NEW or ATTACHED -> REFUSED; ATTACHED -> LIVE; ATTACHED, REPLAYING or LIVE -> CLOSING or GONE

    The order it keeps: nothing goes out before the handshake is done (ATTACHED: messages wait in the
    backlog); a resume's replay goes out before any live message (REPLAYING: live messages are left to the
    replay, or wait behind it); a message is written directly only while no writer exists, so nothing
    overtakes what waits (LIVE); after a close, only the close frame goes out (CLOSING); after GONE, nothing.
    """

    NEW = 0  # made by `Hub.session`, not counted anywhere yet
    ATTACHED = 1  # in the registry, handshake not done: messages wait in the backlog
    REPLAYING = 2  # handshake done; the writer replays a `since` resume from the history
    LIVE = 3  # handshake done: written at once when no writer exists, else queued behind what waits
    CLOSING = 4  # out of the registry; the writer sends the close frame (once the handshake is done)
    GONE = 5  # out of the registry; nothing more goes out
    REFUSED = 6  # the Hub's limits turned it away (429, 503): nothing was taken


_MOVES = {
    State.NEW: frozenset({State.ATTACHED, State.REFUSED}),
    State.ATTACHED: frozenset({State.REPLAYING, State.LIVE, State.CLOSING, State.GONE, State.REFUSED}),
    State.REPLAYING: frozenset({State.LIVE, State.CLOSING, State.GONE}),
    State.LIVE: frozenset({State.CLOSING, State.GONE}),
    State.CLOSING: frozenset({State.GONE}),
    State.GONE: frozenset(),
    State.REFUSED: frozenset(),
}
_REGISTERED = frozenset({State.ATTACHED, State.REPLAYING, State.LIVE})  # in the Hub's registry, taking messages
_WRITING = frozenset({State.REPLAYING, State.LIVE, State.CLOSING})  # a writer task may exist


class Connection:
    """One socket of one user, and its backlog; also the session that owns it (`async with hub.session()`).

    A message for a socket that takes bytes now is written at once, with no task and no queue (the common
    case). Only when the peer falls behind does the message wait in the backlog, and only then does a
    writer task exist, to drain it in order and end. Order holds because nothing is written directly
    while a writer exists.

    A `since` resume is pulled from the history by the writer, a page at a time as the socket drains (see
    `_replay`): the socket never holds more of it than its backlog caps allow, however long the replay.

    Its life is a `State`. As a session, entering takes its slot (the Hub's limits: 429, 503) and arms the
    token's expiry (4001); leaving stops it, whatever ended the handler.
    """

    __slots__ = ("user_id", "sink", "state", "_hub", "_backlog", "_bytes", "_writer", "_close", "_floor",
                 "_beat", "_beat_due", "_replayed", "_watch", "_expires_at", "_expiry")  # fmt: skip

    def __init__(self, hub: Hub, user_id: str, sink: Sink, expires_at: float | None = None) -> None:
        self.user_id = user_id
        self.sink = sink
        self.state = State.NEW
        self._hub = hub
        self._backlog: deque[Message] | None = None  # made when first needed: an empty deque is ~600 bytes
        self._bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._close: tuple[int, str] | None = None  # the close frame CLOSING sends
        self._floor: MessageId | None = None  # live messages at or below it were replayed already
        self._replayed = 0  # frames replayed so far: what the stall watch looks at
        self._watch: asyncio.TimerHandle | None = None
        self._beat: asyncio.TimerHandle | None = None
        self._beat_due = False  # a heartbeat waits for the writer; at most one ever does
        self._expires_at = expires_at  # Unix time the listener's token expires (None: no token)
        self._expiry: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> Connection:
        """Take the socket's slot, or raise 429/503 (the state is then REFUSED); arm the token's expiry."""
        await self._hub._admit(self)
        if self._expires_at is not None:
            delay = max(0.0, self._expires_at - time.time())  # exp is wall-clock time
            self._expiry = asyncio.get_running_loop().call_later(
                delay, self.close, CloseCode.TOKEN_EXPIRED, "token expired: reconnect with a new token"
            )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _move(self, to: State) -> None:
        """The one place the state changes, along `State`'s arrows only; leaving the registry leaves the Hub."""
        if to not in _MOVES[self.state]:
            raise RuntimeError(f"a connection of user {self.user_id} cannot go from {self.state.name} to {to.name}")
        registered = self.state in _REGISTERED
        self.state = to
        if registered and to not in _REGISTERED:
            self._hub._forget(self)

    def offer(self, message: Message) -> bool:
        """Hand over one message without waiting; False when the socket is dead or just overflowed."""
        state = self.state
        if state is not State.LIVE:
            if state not in _REGISTERED:
                return False  # left the registry while a chunked fan-out was under way: nothing more goes out
            if state is State.REPLAYING and self._hub.backend.replay_covers_live:
                # The history got this message before any socket was offered it, so the replay reaches it in
                # its turn, and nothing is held for it here. Should the history lose it first, the resume
                # frame says `recovered: false`. (Otherwise it queues, within the caps, and the floor sorts it.)
                return True
        floor = self._floor
        if floor is not None and message.id <= floor:
            # Replayed already: this socket resumed while the message was on its way here (a paused fan-out
            # here, or a Redis reader that had not reached it yet when the history was read).
            # See docs/delivery.md, "Resume and the live feed".
            return True
        if state is State.LIVE and self._writer is None:
            outcome = self.sink.try_write(message)
            if outcome == WriteResult.WROTE:
                return True
            if outcome == WriteResult.DEAD:
                self._hub.stats.dropped_dead += 1
                self._move(State.GONE)
                return False
        limits = self._hub.limits
        backlog = self._backlog
        if backlog is None:
            backlog = self._backlog = deque()
        if len(backlog) >= limits.send_queue_size or self._bytes + message.size > limits.send_queue_bytes:
            self._overflow()
            return False
        backlog.append(message)
        self._bytes += message.size
        self._ensure_writer()
        return True

    def start(self, since: MessageId | None) -> None:
        """The handshake is done; with `since`, replay what came after it and a control frame, then go live.

        Closed before the handshake: the close frame goes out now. Gone: nothing does.
        """
        if self.state is State.CLOSING:
            self._ensure_writer()  # the close frame
            return
        if self.state is not State.ATTACHED:
            return  # gone
        if since is None:
            self._move(State.LIVE)
            if self._backlog:
                self._ensure_writer()  # what was published during the handshake, in order
            return
        self._move(State.REPLAYING)
        self._floor = since  # nothing at or below `since` goes out: the client has it
        if self._hub.backend.replay_covers_live:
            # Queued since the socket attached: all of it is in the history already; the replay sends it.
            self._backlog = None
            self._bytes = 0
        self._watch = asyncio.get_running_loop().call_later(self._hub.limits.stall_timeout, self._check, 0)
        self._ensure_writer()  # the replay

    def heartbeat_every(self, seconds: float) -> None:
        """Send a heartbeat every `seconds` through the writer, in order: never between replayed frames.

        A timer, not a task, per socket; it ends with the socket. Heartbeats are no messages: they are not
        stored, not counted, and a heartbeat still waiting when the next is due is not doubled.
        """
        self._beat = asyncio.get_running_loop().call_later(seconds, self._tick, seconds)

    def _tick(self, seconds: float) -> None:
        # A bound method, not a closure that names itself: that closure is a reference cycle that outlives the
        # socket, which a frozen garbage collector never frees (docs/performance.md).
        self._beat = asyncio.get_running_loop().call_later(seconds, self._tick, seconds)
        self._beat_due = True
        self._ensure_writer()

    def close(self, code: int, reason: str) -> None:
        """Leave the registry, drop what is unsent, and close with `code`; a second close changes nothing."""
        was = self.state
        if was not in _REGISTERED:
            return
        self._stop_beat()
        self._move(State.CLOSING)
        self._backlog = None
        self._bytes = 0
        self._close = (code, reason)
        if was is not State.ATTACHED:
            self._ensure_writer()  # before the handshake, `start` sends the close frame

    def leave(self) -> None:
        """Leave the registry without a close frame (the peer is gone); safe to call more than once."""
        if self.state in _REGISTERED:
            self._move(State.GONE)

    async def stop(self) -> None:
        """Called when the handler ends: leave the registry and stop the writer."""
        self._stop_beat()
        self._stop_watch()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.state is not State.GONE:
            self._move(State.GONE)
        task = self._writer
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _overflow(self) -> None:
        self._hub.stats.slow_consumers += 1
        log.warning(
            "slow consumer: user %s has %d messages (%d bytes) unsent; closing with 4008",
            self.user_id, len(self._backlog or ()), self._bytes,
            extra={"event": "slow_consumer", "user_id": self.user_id, "backlog": len(self._backlog or ()),
                   "backlog_bytes": self._bytes, "close_code": CloseCode.SLOW_CONSUMER},
        )  # fmt: skip
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect with since")
        # A peer that reads nothing would never read the close frame either, and uvicorn's send would wait
        # for it forever (docs/delivery.md, "Slow consumers"): free the connection, buffers and file descriptor, now.
        if self.sink.stalled() and not self.sink.abort() and self._writer is not None:
            self._writer.cancel()  # the best a server without the abort hook allows; the socket lingers in TCP

    def _check(self, seen: int) -> None:
        """The replay's stall watch: a replay that sent nothing for PING_TIMEOUT is dropped as a slow socket."""
        self._watch = None
        if self.state is not State.REPLAYING:
            return
        if self._replayed != seen:
            loop = asyncio.get_running_loop()
            self._watch = loop.call_later(self._hub.limits.stall_timeout, self._check, self._replayed)
            return
        self._hub.stats.slow_consumers += 1
        log.warning(
            "slow consumer: user %s's resume sent nothing for %.0f s (PING_TIMEOUT); dropping it",
            self.user_id, self._hub.limits.stall_timeout,
            extra={"event": "slow_consumer", "user_id": self.user_id, "replayed": self._replayed,
                   "close_code": CloseCode.SLOW_CONSUMER},
        )  # fmt: skip
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect with since")
        # A peer that took nothing for that long will not read a close frame either: free it now.
        if not self.sink.abort() and self._writer is not None:
            self._writer.cancel()

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def _stop_beat(self) -> None:
        self._beat_due = False
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None

    def _ensure_writer(self) -> None:
        if self._writer is None and self.state in _WRITING:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        send = self.sink.send_text
        try:
            since = self._floor
            if self.state is State.REPLAYING and since is not None:
                await self._replay(since)
            while True:
                if self._beat_due:
                    self._beat_due = False
                    await self.sink.send_heartbeat()
                    continue
                backlog = self._backlog  # read each time: close() may replace it while we wait on send
                if not backlog:
                    self._backlog = None  # drained: give the deque back until the socket falls behind again
                    break
                message = backlog.popleft()
                self._bytes -= message.size
                if self._floor is not None and message.id <= self._floor:
                    continue  # came live while we were replaying it
                await send(message.text, message.id)
            if self._close is not None:
                await self.sink.close(*self._close)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer is gone: any error from the server's send means that
            log.debug("socket of user %s failed while sending: %r", self.user_id, exc)
            self.leave()
        finally:
            self._writer = None

    async def _replay(self, since: MessageId) -> None:
        """Pull the replay from the history a page at a time, each no bigger than the backlog may be, and
        send it; then the resume frame. A page's frames are the history's own bytes, written straight onto
        a socket that takes them and waited on when it does not, so the replay moves at the peer's pace."""
        try:
            recovered = await self._replay_pages(since)
        except BrokerUnavailable:
            self.close(CloseCode.TRY_AGAIN_LATER, "broker unavailable: reconnect with since later")
            return
        finally:
            if self.state is State.REPLAYING:
                self._move(State.LIVE)
            self._stop_watch()
        if self.state is State.LIVE:
            resume = control_frame(type="resume", recovered=recovered, replayed=self._replayed)
            await self.sink.send_text(resume, None)

    async def _replay_pages(self, since: MessageId) -> bool:
        """Send every page; whether nothing was missing (False also when the socket closed meanwhile)."""
        backend, sink, limits = self._hub.backend, self.sink, self._hub.limits
        after, recovered = since, True
        reached: MessageId | None = None  # the newest history entry a page looked at
        while self.state is State.REPLAYING:
            page = await backend.replay_page(self.user_id, after, limits.send_queue_size, limits.send_queue_bytes)
            if self.state >= State.CLOSING:
                return False
            recovered = recovered and page.recovered
            stuck = page.last <= after and not page.messages  # a page that moved nowhere: never ask again
            if page.last > after:
                reached = page.last
                after = page.last
            if not page.more or stuck:
                # Caught up. From here on live messages are no longer left to the replay: they queue in the
                # backlog behind this page (the writer exists) and are sent after it and the resume frame.
                # Nothing at or below the floor goes out live: the client has it, or the replay sent it. A
                # `since` the history does not know (recovered: false) is no floor: from the future, it
                # would hold back every live message.
                self._move(State.LIVE)
                self._floor = (max(since, reached) if reached is not None else since) if recovered else reached
            for message in page.messages:
                if self.state >= State.CLOSING:
                    return False
                outcome = sink.try_write(message)
                if outcome == WriteResult.LATER:
                    await sink.send_text(message.text, message.id)  # waits while the peer is slow
                elif outcome == WriteResult.DEAD:
                    raise ConnectionError("the socket is gone")
                self._replayed += 1
            # One page per turn of the event loop: a replay to a fast peer never waits on a send, and would
            # otherwise hold every other socket and request for all of it.
            await asyncio.sleep(0)
        return recovered


class Hub:
    """This process's listeners and the publish path; one per app, kept on `app.state.hub`."""

    def __init__(self, backend: Backend, limits: Limits) -> None:
        self.backend = backend
        self.limits = limits
        self._users: dict[str, set[Connection]] = {}
        # The same users' ids in sorted order, kept as they come and go (a binary search and a move of
        # pointers), so `GET /api/v1/ws/status?limit=10` reads ten of them: a monitor polling it every 10 ms
        # at 18,500 users spent a fifth of the process's CPU picking ten out of a dict.
        self._ids: list[str] = []
        # One fan-out at a time, first come first served (asyncio.Lock is FIFO): a chunked fan-out yields
        # to the event loop, and the next message must not overtake it on any socket.
        self._delivering = asyncio.Lock()
        self._count = 0
        self.stats = HubStats()
        self.draining = False  # SIGTERM seen: /readyz says 503 so the balancer sends nobody new
        self.started = False
        # Ever started: a hub that never was is a host that forgot diary_ws.lifespan(), refused with NotStarted;
        # one that has stopped is shutting down and keeps its own answers.
        self.launched = False

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the backend; the app's lifespan calls this."""
        await self.backend.start(self)
        self.started = self.launched = True

    async def stop(self) -> None:
        """Close every socket that is still here (1012) and stop the backend."""
        self.draining = True
        for conn in list(self.connections()):
            conn.close(CloseCode.SERVICE_RESTART, "server shutting down: reconnect with since")
        self.started = False
        await self.backend.stop()

    def ready(self) -> bool:
        """What /readyz reports."""
        return self.started and not self.draining and self.backend.ready()

    # --- listeners -------------------------------------------------------------------------------------

    def session(self, user_id: str, sink: Sink, expires_at: float | None = None) -> Connection:
        """A listener's whole life with the Hub, for both transports: `async with hub.session(...) as conn:`
        takes its slot or raises 429/503 (`_admit`), arms its token's expiry, and stops it on the way out."""
        return Connection(self, user_id, sink, expires_at)

    async def attach(self, user_id: str, sink: Sink) -> Connection:
        """A session entered, for a caller that stops it itself (tests and tools)."""
        conn = self.session(user_id, sink)
        await self._admit(conn)
        return conn

    async def _admit(self, conn: Connection) -> None:
        """Take a slot for a new socket, or raise 429/503; messages queue for it from now on.

        The per-user limit holds across the cluster: the backend records the socket and refuses it when the
        user already has MAX_CONNECTIONS_PER_USER on all nodes together.
        """
        user_id = conn.user_id
        try:
            if not self.launched:
                raise NotStarted()
            conns = self._users.get(user_id)
            if conns is not None and len(conns) >= self.limits.max_connections_per_user:
                raise TooManyConnections(
                    f"user {user_id} already has {len(conns)} open connections, the most allowed "
                    f"(MAX_CONNECTIONS_PER_USER); close one first"
                )
            if self._count >= self.limits.max_connections:
                raise ServerFull("server is full: too many open connections (MAX_CONNECTIONS); retry later")
            if conns is None:
                self._users[user_id] = conns = set()
                bisect.insort(self._ids, user_id)
            conns.add(conn)
            self._count += 1
            conn._move(State.ATTACHED)
            await self.backend.join(user_id, self.limits.max_connections_per_user)
        except BaseException:
            conn._move(State.REFUSED)
            raise

    async def listen(self, conn: Connection, since: MessageId | None) -> None:
        """Start delivering to an attached socket; with `since`, replay what it missed first."""
        # The socket is attached before the history is read, so nothing published meanwhile is lost: the
        # writer replays from the history until it has caught up, and skips live ids it has replayed.
        conn.start(since)

    def drop(self, conn: Connection) -> None:
        """Forget a socket without a close frame; safe to call more than once."""
        conn.leave()

    def _forget(self, conn: Connection) -> None:
        """Take a socket out of the registry: `Connection._move` calls it once, when the socket leaves."""
        conns = self._users.get(conn.user_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._users[conn.user_id]
                del self._ids[bisect.bisect_left(self._ids, conn.user_id)]
        self._count -= 1
        self.backend.left(conn.user_id)

    async def disconnect_user(
        self, user_id: str, code: int = CloseCode.DISCONNECTED, reason: str = "disconnected by an operator"
    ) -> tuple[int, int]:
        """Close every socket of `user_id` with `code`, on every node: (closed, nodes that did not report)."""
        if not self.launched:
            raise NotStarted()
        if not self.backend.ready():
            raise BrokerUnavailable("broker unavailable: no connection was closed; retry later")
        return await self.backend.close_user(user_id, code, reason)

    def close_local(self, user_id: str, code: int, reason: str) -> int:
        """Close this process's sockets of `user_id` with `code`; how many there were (the backend calls it)."""
        conns = list(self._users.get(user_id, ()))
        for conn in conns:
            conn.close(code, reason)
        if conns:
            log.info("closed %d connections of user %s with %d", len(conns), user_id, code)
        return len(conns)

    def connections(self) -> Iterable[Connection]:
        """Every registered socket."""
        for conns in self._users.values():
            yield from conns

    # --- publishing -------------------------------------------------------------------------------------

    async def publish(self, note: Notification, claim: Claim | None = None) -> PublishResult:
        """Store and deliver one notification on every node.

        NobodyListening (404) when no targeted user is connected anywhere; BrokerUnavailable (503) when the
        broker is down, checked first, so an outage never reads as "nobody there"; OutcomeUnknown (504) when
        the broker did not answer in time. `claim`: the request's Idempotency-Key, for the backend to record.
        """
        if not self.launched:
            raise NotStarted()
        targets = frozenset(note.user_ids) if note.user_ids is not None else None
        if not self.backend.ready():
            raise BrokerUnavailable("broker unavailable: the notification was not sent; retry later")
        started = time.perf_counter()
        result = await self.backend.publish(targets, Draft(note.type, note.message, note.data), claim)
        seconds = time.perf_counter() - started
        self.stats.published += 1
        self.stats.observe_fanout(seconds)
        if log.isEnabledFor(logging.INFO):  # skip building the fields when nobody logs them
            self._log_publish(note, result, seconds)
        return result

    async def publish_batch(
        self, notes: Sequence[Notification], claim: Claim | None = None
    ) -> list[PublishResult | NobodyListening]:
        """Store and deliver each notification in order, each on its own; the backend makes it one round trip.

        Per item, a PublishResult or the NobodyListening (404) it got. For the whole batch: BrokerUnavailable
        (503, nothing stored), OutcomeUnknown (504), and with a `claim` Conflict (409) or ValidationError (422).
        """
        if not self.launched:
            raise NotStarted()
        if not self.backend.ready():
            raise BrokerUnavailable("broker unavailable: no notification of the batch was sent; retry later")
        started = time.perf_counter()
        items = [
            (None if n.user_ids is None else frozenset(n.user_ids), Draft(n.type, n.message, n.data)) for n in notes
        ]
        results = await self.backend.publish_batch(items, claim)
        seconds = time.perf_counter() - started
        stored = sum(1 for r in results if isinstance(r, PublishResult))
        self.stats.published += stored
        if log.isEnabledFor(logging.INFO):  # one line per batch: a thousand items must not make a thousand lines
            log.info(
                "published a batch: %d of %d notifications stored, in %.2f ms", stored, len(results), seconds * 1000,
                extra={"event": "publish_batch", "items": len(results), "stored": stored,
                       "duration_ms": round(seconds * 1000, 3)},
            )  # fmt: skip
        return results

    async def connections_of(self, user_id: str) -> int:
        """How many sockets and streams `user_id` has open, on every live node (the presence query)."""
        if not self.launched:
            raise NotStarted()
        if not self.backend.ready():
            raise BrokerUnavailable("broker unavailable: presence is not known now; retry later")
        return await self.backend.connections(user_id)

    def _log_publish(self, note: Notification, result: PublishResult, seconds: float) -> None:
        log.info(
            "published %s (%s) to %d of %d sockets, %d dropped, in %.2f ms",
            result.id, note.type, result.sent_count, result.total_connections, result.disconnected_users,
            seconds * 1000,
            extra={"event": "publish", "id": str(result.id), "type": note.type, "sent_count": result.sent_count,
                   "total_connections": result.total_connections, "dropped": result.disconnected_users,
                   "duration_ms": round(seconds * 1000, 3)},
        )  # fmt: skip

    async def notify(
        self,
        message: str,
        user_ids: Iterable[str] | None = None,
        type: str = "notification",
        data: Mapping[str, Any] | None = None,
    ) -> PublishResult:
        """Publish from Python in this process, checked like a POST body (the same ValidationError)."""
        started = time.perf_counter()
        note = check_notification(message, user_ids, type, data, max_message_chars=self.limits.max_message_chars)
        result = await self.publish(note)
        self.stats.observe_notify(time.perf_counter() - started)
        return result

    def presence(self) -> Mapping[str, Sized]:
        """User id -> this process's sockets of that user; for the backend (read only)."""
        return self._users

    async def deliver(self, message: Message, want_users: bool) -> Counts:
        """Fan one message out to this process's sockets; the backend calls it once per message, in order.

        Every FANOUT_CHUNK sockets it yields to the event loop, so a broadcast to 10,000 sockets does not
        hold a health check, a status call or a handshake for the whole fan-out. A socket that attaches
        during a pause may get this message live; if it resumed, its replay floor keeps it from getting it
        twice (see `offer`). One that leaves before its turn is not counted. Before the first pause nothing
        else runs, so a small fan-out is exactly a plain loop.
        """
        async with self._delivering:
            users = self._users
            # Only the user ids are copied, not a list per user: per-socket copies that outlive a pause
            # would reach the older GC generations and make full collections, the longest pauses, frequent.
            user_ids = list(users) if message.targets is None else [u for u in message.targets if u in users]
            sent = total = lost = reached = 0
            names: list[str] | None = [] if want_users else None
            budget = FANOUT_CHUNK
            for user_id in user_ids:
                conns = users.get(user_id)
                if conns is None:
                    continue  # every socket of this user left during a pause
                handed = 0
                for conn in list(conns):  # offer() may drop the socket from this set
                    total += 1
                    if conn.offer(message):
                        handed += 1
                    else:
                        lost += 1
                sent += handed
                if handed:
                    reached += 1
                    if names is not None:
                        names.append(user_id)
                budget -= len(conns) or 1
                if budget <= 0:
                    budget = FANOUT_CHUNK
                    await asyncio.sleep(0)
            self.stats.delivered += sent
            return Counts(sent, total, lost, reached, names)

    # --- status -------------------------------------------------------------------------------------------

    def sizes(self) -> tuple[int, int]:
        """(distinct users, sockets) on this node, without sorting anything: for the metrics gauges."""
        return len(self._users), self._count

    def user_ids(self, limit: int | None = None) -> list[str]:
        """The first `limit` user ids on this node in sorted order, all of them with None."""
        return self._ids[:limit]

    async def status(self, limit: int | None = None) -> dict[str, Any]:
        """The guide's status fields plus `total_connections`, over every live node."""
        ids, users, total = await self.backend.status(limit)
        return {
            "connected_users": users,
            "status": "active",
            "active_user_ids": ids,
            "total_connections": total,
        }
