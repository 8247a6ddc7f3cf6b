"""The Hub: this process's sockets, one bounded backlog each, fan-out, counts and clean-up.

A publish never waits on a socket. It renders and frames the message once, writes those same bytes at
once to every targeted socket that takes bytes now, and queues them for the others, whose writer task
drains the backlog in order. A backlog that overflows (SEND_QUEUE_SIZE messages or SEND_QUEUE_BYTES
bytes) marks a slow consumer: it leaves the registry at once and is closed with 4008, or aborted when
it reads nothing (see `Sink.abort`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol

from diary_ws.backends import Backend, Claim, Counts
from diary_ws.errors import BrokerUnavailable, NobodyListening, NotStarted, ServerFull, TooManyConnections
from diary_ws.messages import Draft, Message, MessageId, control_frame
from diary_ws.validation import Notification, check_notification

log = logging.getLogger("diary_ws.hub")

CLOSE_SLOW_CONSUMER = 4008
FANOUT_CHUNK = 256  # sockets per turn of the event loop in a fan-out: about 2-3 ms of work
CLOSE_GOING_AWAY = 1012
CLOSE_TRY_AGAIN = 1013  # the history could not be read (the broker went away after the handshake)
CLOSE_BY_OPERATOR = 4003


# What `Sink.try_write` reports.
WROTE, LATER, DEAD = 1, 0, -1


class Sink(Protocol):
    """What the Hub needs of one socket or stream; `routes` adapts an ASGI WebSocket to it, `sse` an SSE stream."""

    def try_write(self, message: Message) -> int:
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


@dataclass(frozen=True, slots=True)
class Limits:
    """The Hub's share of Settings."""

    max_connections: int
    max_connections_per_user: int
    send_queue_size: int
    send_queue_bytes: int
    max_message_chars: int = 65536  # what `notify` checks, as the POST does
    stall_timeout: float = 20.0  # PING_TIMEOUT: a replay that sends nothing for this long is dropped


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The counts of the POST's answer (docs/api.md): sockets, summed over the cluster; plus distinct users reached."""

    id: MessageId
    sent_count: int
    total_connections: int
    disconnected_users: int
    users_reached: int
    nodes_missing: int = 0  # nodes that did not report their counts in time (Redis only)


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


class Connection:
    """One socket of one user, and its backlog.

    A message for a socket that takes bytes now is written at once, with no task and no queue (the common
    case). Only when the peer falls behind does the message wait in the backlog, and only then does a
    writer task exist, to drain it in order and end. Order holds because nothing is written directly
    while a writer exists.

    A `since` resume is pulled from the history by the writer, a page at a time as the socket drains (see
    `_replay`): the socket never holds more of it than its backlog caps allow, however long the replay.
    """

    __slots__ = ("user_id", "sink", "_hub", "_backlog", "_bytes", "_writer", "_close", "_resume", "_floor",
                 "_started", "active", "_beat", "_beat_due", "_replayed", "_watch")  # fmt: skip

    def __init__(self, hub: Hub, user_id: str, sink: Sink) -> None:
        self.user_id = user_id
        self.sink = sink
        self._hub = hub
        self._backlog: deque[Message] | None = None  # made when first needed: an empty deque is ~600 bytes
        self._bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._close: tuple[int, str] | None = None
        # While a resume replays: the id it has reached. Live messages are not queued meanwhile: the replay
        # reads them from the history when it gets there.
        self._resume: MessageId | None = None
        self._floor: MessageId | None = None  # live messages at or below it were replayed already
        self._replayed = 0  # frames replayed so far: what the stall watch looks at
        self._watch: asyncio.TimerHandle | None = None
        self._started = False  # the handshake is done: frames may go out
        self.active = True  # in the registry and taking messages
        self._beat: asyncio.TimerHandle | None = None
        self._beat_due = False  # a heartbeat waits for the writer; at most one ever does

    def offer(self, message: Message) -> bool:
        """Hand over one message without waiting; False when the socket is dead or just overflowed."""
        if not self.active:
            return False  # left the registry while a chunked fan-out was under way: nothing more goes out
        if self._resume is not None and self._hub.backend.replay_covers_live:
            # Replaying: the history got this message before any socket was offered it, so the replay reaches
            # it in its turn, and nothing is held for it here. Should the history lose it first, the resume
            # frame says `recovered: false`. (Otherwise it queues, within the caps, and the floor sorts it.)
            return True
        floor = self._floor
        if floor is not None and message.id <= floor:
            # Replayed already: this socket resumed while the message was on its way here (a paused fan-out
            # here, or a Redis reader that had not reached it yet when the history was read).
            # See docs/delivery.md, "Resume and the live feed".
            return True
        if self._writer is None and self._started:
            outcome = self.sink.try_write(message)
            if outcome == WROTE:
                return True
            if outcome == DEAD:
                self._hub.stats.dropped_dead += 1
                self._hub.drop(self)
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
        """The handshake is done; with `since`, replay what came after it and a control frame, then go live."""
        if since is not None and self._close is None:
            self._resume = self._floor = since  # nothing at or below `since` goes out: the client has it
            if self._hub.backend.replay_covers_live:
                # Queued since the socket attached: all of it is in the history already; the replay sends it.
                self._backlog = None
                self._bytes = 0
            self._watch = asyncio.get_running_loop().call_later(self._hub.limits.stall_timeout, self._check, 0)
        self._started = True
        if self._resume is not None or self._backlog or self._close:
            self._ensure_writer()

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
        """Leave the registry, drop what is unsent, and close with `code`."""
        self._stop_beat()
        self._hub.drop(self)
        self._backlog = None
        self._bytes = 0
        if self._close is None:
            self._close = (code, reason)
        self._ensure_writer()

    async def stop(self) -> None:
        """Called when the handler ends: leave the registry and stop the writer."""
        self._stop_beat()
        self._stop_watch()
        self._hub.drop(self)
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
                   "backlog_bytes": self._bytes, "close_code": CLOSE_SLOW_CONSUMER},
        )  # fmt: skip
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect with since")
        # A peer that reads nothing would never read the close frame either, and uvicorn's send would wait
        # for it forever (docs/delivery.md, "Slow consumers"): free the connection, buffers and file descriptor, now.
        if self.sink.stalled() and not self.sink.abort() and self._writer is not None:
            self._writer.cancel()  # the best a server without the abort hook allows; the socket lingers in TCP

    def _check(self, seen: int) -> None:
        """The replay's stall watch: a replay that sent nothing for PING_TIMEOUT is dropped as a slow socket."""
        self._watch = None
        if self._resume is None or not self.active:
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
                   "close_code": CLOSE_SLOW_CONSUMER},
        )  # fmt: skip
        self.close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect with since")
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
        if self._writer is None and self._started:
            self._writer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        send = self.sink.send_text
        try:
            if self._resume is not None:
                await self._replay(self._resume)
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
            self._hub.drop(self)
        finally:
            self._writer = None

    async def _replay(self, since: MessageId) -> None:
        """Pull the replay from the history a page at a time, each no bigger than the backlog may be, and
        send it; then the resume frame. A page's frames are the history's own bytes, written straight onto
        a socket that takes them and waited on when it does not, so the replay moves at the peer's pace."""
        try:
            recovered = await self._replay_pages(since)
        except BrokerUnavailable:
            self.close(CLOSE_TRY_AGAIN, "broker unavailable: reconnect with since later")
            return
        finally:
            self._resume = None
            self._stop_watch()
        if self._close is None:
            resume = control_frame(type="resume", recovered=recovered, replayed=self._replayed)
            await self.sink.send_text(resume, None)

    async def _replay_pages(self, since: MessageId) -> bool:
        """Send every page; whether nothing was missing (False also when the socket closed meanwhile)."""
        backend, sink, limits = self._hub.backend, self.sink, self._hub.limits
        after, recovered = since, True
        reached: MessageId | None = None  # the newest history entry a page looked at
        while self._resume is not None:
            page = await backend.replay_page(self.user_id, after, limits.send_queue_size, limits.send_queue_bytes)
            if self._close is not None:
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
                self._resume = None
                self._floor = (max(since, reached) if reached is not None else since) if recovered else reached
            for message in page.messages:
                if self._close is not None:
                    return False
                outcome = sink.try_write(message)
                if outcome == LATER:
                    await sink.send_text(message.text, message.id)  # waits while the peer is slow
                elif outcome == DEAD:
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
            conn.close(CLOSE_GOING_AWAY, "server shutting down: reconnect with since")
        self.started = False
        await self.backend.stop()

    def ready(self) -> bool:
        """What /readyz reports."""
        return self.started and not self.draining and self.backend.ready()

    # --- listeners -------------------------------------------------------------------------------------

    async def attach(self, user_id: str, sink: Sink) -> Connection:
        """Take a slot for a new socket, or raise 429/503; messages queue for it from now on.

        The per-user limit holds across the cluster: the backend records the socket and refuses it when the
        user already has MAX_CONNECTIONS_PER_USER on all nodes together.
        """
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
        conn = Connection(self, user_id, sink)
        self._users.setdefault(user_id, set()).add(conn)
        self._count += 1
        try:
            await self.backend.join(user_id, self.limits.max_connections_per_user)
        except BaseException:
            self.drop(conn)
            raise
        return conn

    async def listen(self, conn: Connection, since: MessageId | None) -> None:
        """Start delivering to an attached socket; with `since`, replay what it missed first."""
        # The socket is attached before the history is read, so nothing published meanwhile is lost: the
        # writer replays from the history until it has caught up, and skips live ids it has replayed.
        conn.start(since)

    def drop(self, conn: Connection) -> None:
        """Forget a socket; safe to call more than once."""
        if not conn.active:
            return
        conn.active = False
        conns = self._users.get(conn.user_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._users[conn.user_id]
        self._count -= 1
        self.backend.left(conn.user_id)

    async def disconnect_user(
        self, user_id: str, code: int = CLOSE_BY_OPERATOR, reason: str = "disconnected by an operator"
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
        done = await self.backend.publish(targets, Draft(note.type, note.message, note.data), claim)
        result = PublishResult(done.id, done.sent, done.total, done.lost, done.reached, done.nodes_missing)
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
        done = await self.backend.publish_batch(items, claim)
        seconds = time.perf_counter() - started
        results: list[PublishResult | NobodyListening] = [
            d
            if isinstance(d, NobodyListening)
            else PublishResult(d.id, d.sent, d.total, d.lost, d.reached, d.nodes_missing)
            for d in done
        ]
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

    async def status(self, limit: int | None = None) -> dict[str, Any]:
        """The guide's status fields plus `total_connections`, over every live node."""
        ids, total = await self.backend.status()
        return {
            "connected_users": len(ids),
            "status": "active",
            "active_user_ids": ids if limit is None else ids[:limit],
            "total_connections": total,
        }
