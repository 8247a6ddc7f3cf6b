"""Redis mode past one stream: a targeted message goes only to the nodes that hold its users, and a resume reads
only the user's messages (docs/cluster.md). Real redis-servers; the Node is the recording stand-in of
tests/test_backends.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis as redis_client

from diary_ws.backends.redis import PREFIX, RedisBackend
from diary_ws.errors import NobodyListening
from diary_ws.messages import Draft, Message, MessageId
from diary_ws.protocols import Counts
from tests.tcp_proxy import tcp_proxy
from tests.test_backends import RecordingNode, draft, join, started
from tests.utils import RedisServer, async_wait_until, redis_server

pytestmark = pytest.mark.anyio


class HangingNode(RecordingNode):
    """A node whose fan-out never finishes: it never reports a count for anything it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.handed = 0

    async def deliver(self, message: Message, want_users: bool) -> Counts:
        self.handed += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def url_of(server: RedisServer) -> str:
    return f"redis://127.0.0.1:{server.port}/0"


async def test_a_targeted_message_waits_only_for_the_nodes_that_hold_its_users(redis: RedisServer) -> None:
    one, two, stuck = RecordingNode(), RecordingNode(), HangingNode()
    url = url_of(redis)
    async with started(url, one) as first, started(url, two) as second, started(url, stuck) as third:
        await join(first, one, "alice")
        await join(second, two, "bob")
        await join(third, stuck, "carol")
        # The stuck node holds neither alice nor bob: it is not handed the message and not waited for.
        done = await first.publish(frozenset({"alice", "bob"}), draft("ab"))
        assert (done.sent_count, done.users_reached, done.nodes_missing) == (2, 2, 0)
        assert stuck.handed == 0
        assert [m.id for m in one.got] == [m.id for m in two.got] == [done.id]
        # A broadcast still goes to every node, so the stuck one is waited for and counted missing.
        everyone = await second.publish(None, draft("all"))
        assert (everyone.sent_count, everyone.nodes_missing) == (2, 1)
        assert stuck.handed == 1


async def test_the_history_window_counts_every_users_messages(redis: RedisServer) -> None:
    """HISTORY_SIZE is one window shared by all users, as in memory mode: other users' messages push yours out."""
    node = RecordingNode()
    async with started(url_of(redis), node, history_size=3) as backend:
        await join(backend, node, "alice")
        await join(backend, node, "bob")
        first = await backend.publish(frozenset({"bob"}), draft("b0"))
        mine = await backend.publish(frozenset({"alice"}), draft("a1"))
        others = [(await backend.publish(frozenset({"bob"}), draft(f"b{i}"))).id for i in (2, 3)]
        kept = await backend.replay("alice", first.id)
        assert ([m.id for m in kept.messages], kept.recovered) == ([mine.id], True)
        gone = (await backend.publish(frozenset({"bob"}), draft("b4"))).id  # a1 is now outside the window
        assert await backend.replay("alice", first.id) == ([], False)
        assert await backend.replay("alice", mine.id) == ([], True)
        bob = await backend.replay("bob", first.id)
        assert ([m.id for m in bob.messages], bob.recovered) == ([*others, gone], False)


async def test_a_resume_reads_only_what_it_returns(redis: RedisServer) -> None:
    node = RecordingNode()
    admin = redis_client.Redis(port=redis.port, decode_responses=True)
    async with started(url_of(redis), node, history_size=500) as backend:
        await join(backend, node, "alice")
        await join(backend, node, "bob")
        since = (await backend.publish(frozenset({"bob"}), draft("first"))).id
        for i in range(200):
            await backend.publish(frozenset({"bob"}), draft(f"bob {i}"))
        mine = await backend.publish(frozenset({"alice"}), draft("alice"))
        everyone = await backend.publish(None, draft("all"))
        admin.config_resetstat()
        replay = await backend.replay("alice", since)
        assert ([m.id for m in replay.messages], replay.recovered) == ([mine.id, everyone.id], True)
        stats = admin.info("commandstats")
        # One XRANGE per message returned; the index reads are two XREVRANGEs and the TTL floor one more:
        # none of it scales with bob's 200 messages in between.
        assert stats["cmdstat_xrange"]["calls"] == 2
        assert stats["cmdstat_xrevrange"]["calls"] == 3
    admin.close()


async def test_a_dead_node_leaves_the_users_index(redis: RedisServer) -> None:
    admin = redis_client.Redis(port=redis.port, decode_responses=True)
    one, two = RecordingNode(), RecordingNode()
    url = url_of(redis)
    async with started(url, one) as first:
        second = RedisBackend(url, history_size=100, history_ttl=60)
        await second.start(two)
        await join(second, two, "bob")
        assert admin.hkeys(f"{PREFIX}where:bob") == [second.node_id]
        # The second node dies without a word: its tasks stop and its heartbeat goes (as after the TTL).
        for task in second._tasks:
            task.cancel()
        await asyncio.wait(second._tasks, timeout=5)
        admin.delete(f"{PREFIX}node:{second.node_id}")
        with pytest.raises(NobodyListening):
            await first.publish(frozenset({"bob"}), draft("to a dead node"))
        assert admin.hkeys(f"{PREFIX}where:bob") == []
        assert await first.status() == ([], 0, 0)
        assert admin.exists(f"{PREFIX}presence:{second.node_id}", f"{PREFIX}inbox:{second.node_id}") == 0
        assert second._cmd is not None
        assert second._blocking is not None
        await second._cmd.aclose()
        await second._blocking.aclose()
    admin.close()


async def test_an_operator_disconnect_reaches_only_the_users_nodes(redis: RedisServer) -> None:
    one, stuck = RecordingNode(), HangingNode()
    url = url_of(redis)
    async with started(url, one) as first, started(url, stuck) as second:
        await join(first, one, "alice")
        await join(second, stuck, "carol")
        assert await first.close_user("alice", 4003, "bye") == (1, 0)
        assert one.closed == [("alice", 4003, "bye")]
        assert stuck.handed == 0
        assert await second.close_user("nobody", 4003, "bye") == (0, 0)
        assert (await first.replay("carol", MessageId(0, 0))).messages == []


async def test_a_batch_routes_each_item_to_the_nodes_of_its_users(redis: RedisServer) -> None:
    one, stuck = RecordingNode(), HangingNode()
    url = url_of(redis)
    async with started(url, one) as first, started(url, stuck) as second:
        await join(first, one, "alice")
        await join(second, stuck, "carol")
        items: list[tuple[frozenset[str] | None, Draft]] = [(frozenset({u}), draft(u)) for u in ("alice", "x", "alice")]
        a, nobody, b = await first.publish_batch(items)
        assert isinstance(nobody, NobodyListening)  # nobody called x is connected
        assert not isinstance(a, NobodyListening)
        assert not isinstance(b, NobodyListening)
        assert [(a.sent_count, a.nodes_missing), (b.sent_count, b.nodes_missing)] == [(1, 0), (1, 0)]
        assert stuck.handed == 0
        assert [m.id for m in one.got] == [a.id, b.id]
        assert (await first.connections("alice"), await first.connections("carol")) == (1, 1)


async def test_replay_pages_walk_the_users_index_by_count_and_bytes(redis: RedisServer) -> None:
    node = RecordingNode()
    async with started(url_of(redis), node, history_size=100) as backend:
        await join(backend, node, "alice")
        await join(backend, node, "bob")
        since = (await backend.publish(frozenset({"bob"}), draft("before"))).id
        for i in range(8):
            await backend.publish(None if i % 3 == 0 else frozenset({"alice" if i % 2 else "bob"}), draft(f"m{i}"))
        whole = [m.id for m in (await backend.replay("alice", since)).messages]
        assert len(whole) == 6  # three broadcasts and three of alice's
        walked, after, pages = [], since, 0
        while True:
            page = await backend.replay_page("alice", after, 2, 1 << 20)
            assert page.recovered
            assert len(page.messages) <= 2
            walked += [m.id for m in page.messages]
            after, pages = page.last, pages + 1
            if not page.more:
                break
        assert (walked, pages) == (whole, 3)
        tight = await backend.replay_page("alice", since, 10, 1)
        assert ([m.id for m in tight.messages], tight.more) == (whole[:1], True)  # at least one, then the bytes


class OrderNode(RecordingNode):
    """Also notes, for each message delivered, which users still had sockets here at that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.held: dict[MessageId, list[str]] = {}

    async def deliver(self, message: Message, want_users: bool) -> Counts:
        self.held[message.id] = sorted(self.users)
        return await super().deliver(message, want_users)


async def test_a_node_taken_for_dead_closes_its_sockets_even_when_the_heartbeat_that_revives_it_goes_unanswered(
    redis: RedisServer,
) -> None:
    """Redis paused past the client's timeout runs the heartbeat it had queued when it wakes: the node is live
    again in Redis, but never hears that its old heartbeat had expired. The messages that skipped it meanwhile
    must still not be missed silently: the node closes its sockets with 1013 before it delivers anything newer."""
    admin = redis_client.Redis(port=redis.port, decode_responses=True)
    one, two = RecordingNode(), OrderNode()
    with tcp_proxy(redis.port) as proxy:
        async with (
            started(url_of(redis), one) as first,
            started(f"redis://127.0.0.1:{proxy.port}/0", two) as second,
        ):
            await join(first, one, "alice")
            await join(second, two, "alice")
            assert isinstance(second, RedisBackend)
            heartbeat = f"{PREFIX}node:{second.node_id}"
            proxy.lose_answers_to(heartbeat.encode())
            admin.delete(heartbeat)  # as after a pause longer than HEARTBEAT_TTL
            missed = await first.publish(frozenset({"alice"}), draft("missed"))
            assert missed.sent_count == 1  # to the first node's socket alone: the second was not routed to
            await async_wait_until(lambda: admin.exists(heartbeat) == 1, 10, "the unanswered heartbeat to run")
            proxy.lose_answers_to(None)
            after = await first.publish(None, draft("after"))
            await async_wait_until(lambda: after.id in two.held, 10, "the broadcast to reach the second node")
            assert missed.id not in two.held
            # Delivered to alice's socket there, `after` would hide the gap (her next since would be past `missed`).
            assert two.held[after.id] == [], two.held
            assert [(user, code) for user, code, _why in two.closed] == [("alice", 1013)]
    admin.close()


async def test_a_socket_that_joins_a_node_taken_for_dead_is_routed_to_and_left_open(redis: RedisServer) -> None:
    """The join brings the node back (or finds it back): the sockets from before are closed for what skipped the
    node, the new one is routed to at once and stays."""
    admin = redis_client.Redis(port=redis.port, decode_responses=True)
    one, two = RecordingNode(), OrderNode()
    async with started(url_of(redis), one) as first, started(url_of(redis), two) as second:
        await join(first, one, "alice")
        await join(second, two, "alice")
        assert isinstance(second, RedisBackend)
        admin.delete(f"{PREFIX}node:{second.node_id}")  # as after a pause longer than HEARTBEAT_TTL
        missed = await first.publish(frozenset({"alice"}), draft("missed"))
        assert missed.sent_count == 1
        await join(second, two, "bob")
        to_bob = await first.publish(frozenset({"bob"}), draft("bob"))
        assert (to_bob.sent_count, to_bob.nodes_missing) == (1, 0)
        await async_wait_until(lambda: to_bob.id in two.held, 10, "bob's message at the second node")
        assert [(user, code) for user, code, _why in two.closed] == [("alice", 1013)]
        assert two.held[to_bob.id] == ["bob"]
    admin.close()


async def test_a_rejoin_mark_from_before_redis_lost_its_data_closes_no_socket_that_joins_after(
    redis: RedisServer,
) -> None:
    admin = redis_client.Redis(port=redis.port, decode_responses=True)
    node = RecordingNode()
    async with started(url_of(redis), node) as backend:
        assert isinstance(backend, RedisBackend)
        await join(backend, node, "alice")
        heartbeat = f"{PREFIX}node:{backend.node_id}"
        admin.delete(heartbeat)
        await async_wait_until(lambda: node.closed, 10, "alice closed for the node's rejoin mark")
        # Redis loses everything, the marks with it; the node's heartbeat comes back before any reader repairs.
        admin.flushall()
        await async_wait_until(lambda: admin.exists(heartbeat) == 1, 10, "the heartbeat to be back")
        await join(backend, node, "bob")
        assert [user for user, _code, _why in node.closed] == ["alice"]
        assert "bob" in node.users
    admin.close()
