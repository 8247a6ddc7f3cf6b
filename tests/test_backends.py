"""The backend contract, run on every backend: memory, Redis (a real redis-server on a free port), and Redis
Cluster (three real redis-servers joined as a cluster).

The Node here is our own seam (protocols.Node; fakes only for our own seams), standing in for the Hub: it records
what the backend delivers and holds a presence the test sets.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sized

import orjson
import pytest

from diary_ws.backends import backend_for
from diary_ws.backends.redis.sharded import shard_of
from diary_ws.errors import NobodyListening, TooManyConnections
from diary_ws.messages import Draft, Message, MessageId
from diary_ws.protocols import Backend, CloseCode, Counts, WriteResult
from diary_ws.settings import Settings
from tests.utils import RedisClusterServers, RedisServer, async_wait_until, redis_cluster, redis_server


class RecordingNode:
    """Counts one socket per user in `users`; remembers every message delivered, in order."""

    def __init__(self) -> None:
        self.users: dict[str, list[int]] = {}
        self.got: list[Message] = []
        self.closed: list[tuple[str, int, str]] = []

    async def deliver(self, message: Message, want_users: bool) -> Counts:
        self.got.append(message)
        reached = [u for u in self.users if message.is_for(u)]
        sockets = sum(len(self.users[u]) for u in reached)
        return Counts(sockets, sockets, 0, len(reached), reached if want_users else None)

    def presence(self) -> Mapping[str, Sized]:
        return self.users

    def sizes(self) -> tuple[int, int]:
        return len(self.users), sum(map(len, self.users.values()))

    def user_ids(self, limit: int | None = None) -> list[str]:
        return sorted(self.users)[:limit]

    def close_local(self, user_id: str, code: int, reason: str) -> int:
        self.closed.append((user_id, code, reason))
        return len(self.users.pop(user_id, []))


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    with redis_cluster() as servers:
        yield servers


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "redis-cluster":
        import redis as redis_client

        found: RedisClusterServers = request.getfixturevalue("cluster")
        for node in found.servers:  # a cluster has one database: every test starts from an empty one
            redis_client.Redis(port=node.port).flushall()
        return found.url
    server: RedisServer = request.getfixturevalue("redis")
    # A database of its own per test, so tests share no stream or presence.
    database = (abs(hash(request.node.nodeid)) % 15) + 1
    import redis as redis_client

    redis_client.Redis(port=server.port, db=database).flushdb()
    return f"redis://127.0.0.1:{server.port}/{database}"


@contextlib.asynccontextmanager
async def started(url: str, node: RecordingNode, **settings: float) -> AsyncIterator[Backend]:
    backend = backend_for(Settings(broker_url=url, **settings))  # type: ignore[arg-type]
    await backend.start(node)
    await async_wait_until(backend.ready, 10, "the backend to be ready")
    try:
        yield backend
    finally:
        await backend.stop()


def draft(text: str) -> Draft:
    return Draft("notification", text, None)


async def join(backend: Backend, node: RecordingNode, user_id: str, limit: int = 16) -> None:
    node.users.setdefault(user_id, []).append(1)
    try:
        await backend.join(user_id, limit)
    except BaseException:
        node.users[user_id].pop()
        if not node.users[user_id]:
            del node.users[user_id]
        raise


@pytest.mark.anyio
async def test_nobody_listening_is_refused_and_nothing_is_stored(broker_url: str) -> None:
    node = RecordingNode()
    async with started(broker_url, node) as backend:
        with pytest.raises(NobodyListening):
            await backend.publish(None, draft("nobody"))
        await join(backend, node, "alice")
        with pytest.raises(NobodyListening):
            await backend.publish(frozenset({"bob"}), draft("not bob"))
        done = await backend.publish(frozenset({"alice"}), draft("alice"))
        replay = await backend.replay("alice", MessageId(0, 0))
        assert [m.id for m in replay.messages] == [done.id]


@pytest.mark.anyio
async def test_publish_delivers_once_in_order_with_the_id_in_the_frame(broker_url: str) -> None:
    node = RecordingNode()
    async with started(broker_url, node) as backend:
        await join(backend, node, "alice")
        await join(backend, node, "bob")
        ids = [(await backend.publish(None, draft(f"m{i}"))).id for i in range(20)]
        targeted = await backend.publish(frozenset({"bob"}), Draft("task.done", "t", {"n": 1}))

        def got(user: str) -> list[Message]:
            return [m for m in node.got if m.is_for(user)]

        await async_wait_until(lambda: len(got("alice")) == 20 and len(got("bob")) == 21, 5, "every message delivered")
        if broker_url.startswith("redis-cluster"):
            # alice and bob are in two shards: each gets the copy of a broadcast from their own shard, under
            # that shard's id, in that shard's order; the answer names the first shard's copy.
            assert shard_of("alice") != shard_of("bob")
            for user in ("alice", "bob"):
                assert [orjson.loads(m.text)["message"] for m in got(user)[:20]] == [f"m{i}" for i in range(20)]
                assert [m.id for m in got(user)] == sorted(m.id for m in got(user))
            assert ids[0] in {m.id for m in node.got[:2]}
            assert got("bob")[-1].id == targeted.id
        else:
            assert [m.id for m in node.got] == [*ids, targeted.id]
        assert ids == sorted(ids)
        frame = orjson.loads(node.got[-1].text)
        assert (frame["id"], frame["type"], frame["data"]) == (str(targeted.id), "task.done", {"n": 1})
        assert node.got[-1].targets == frozenset({"bob"})
        assert (
            targeted.sent_count,
            targeted.total_connections,
            targeted.disconnected_users,
            targeted.users_reached,
            targeted.nodes_missing,
        ) == (
            1,
            1,
            0,
            1,
            0,
        )


@pytest.mark.anyio
async def test_replay_keeps_the_users_messages_after_since(broker_url: str) -> None:
    node = RecordingNode()
    async with started(broker_url, node) as backend:
        await join(backend, node, "alice")
        await join(backend, node, "bob")
        first = await backend.publish(frozenset({"alice"}), draft("a0"))
        sent = [
            await backend.publish(frozenset({"bob"}), draft("b1")),
            await backend.publish(None, draft("all2")),
            await backend.publish(frozenset({"alice", "bob"}), draft("ab3")),
        ]
        replay = await backend.replay("alice", first.id)
        assert [orjson.loads(m.text)["message"] for m in replay.messages] == ["all2", "ab3"]
        if not broker_url.startswith("redis-cluster"):  # there, alice's copies have her shard's ids
            assert [m.id for m in replay.messages] == [sent[1].id, sent[2].id]
        assert replay.recovered
        assert (await backend.replay("alice", replay.messages[-1].id)) == ([], True)


@pytest.mark.anyio
async def test_since_older_than_the_history_is_not_recovered(broker_url: str) -> None:
    node = RecordingNode()
    async with started(broker_url, node, history_size=3) as backend:
        await join(backend, node, "alice")
        ids = [(await backend.publish(None, draft(f"m{i}"))).id for i in range(6)]
        old = await backend.replay("alice", ids[0])
        assert ([m.id for m in old.messages], old.recovered) == (ids[3:], False)
        kept = await backend.replay("alice", ids[2])
        assert ([m.id for m in kept.messages], kept.recovered) == (ids[3:], True)
        future = await backend.replay("alice", MessageId(ids[-1].ms + 10**6, 0))
        assert future == ([], False)
        assert (await backend.replay("alice", MessageId(0, 0))).recovered is False


@pytest.mark.anyio
async def test_since_between_the_last_id_and_now_is_recovered_in_both_backends(broker_url: str) -> None:
    """diary_ws.client resumes from its connect time when it has seen nothing: that must not read as a loss."""
    node = RecordingNode()
    async with started(broker_url, node) as backend:
        await join(backend, node, "alice")
        last = (await backend.publish(None, draft("m"))).id
        after = MessageId(last.ms, last.seq + 1)  # newer than anything published, not newer than now
        assert await backend.replay("alice", after) == ([], True)
        hour_ahead = MessageId(time.time_ns() // 1_000_000 + 3_600_000, 0)
        assert await backend.replay("alice", hour_ahead) == ([], False)  # a since from the future is unknown


@pytest.mark.anyio
async def test_status_and_the_per_user_limit(broker_url: str) -> None:
    node = RecordingNode()
    async with started(broker_url, node) as backend:
        await join(backend, node, "bob")
        await join(backend, node, "alice")
        await join(backend, node, "alice")
        assert await backend.status() == (["alice", "bob"], 2, 3)
        for name in ("carol", "dave", "erin", "frank"):
            await join(backend, node, name)
        # A limit picks the first ids in order while the counts stay everyone's.
        assert await backend.status(3) == (["alice", "bob", "carol"], 6, 7)
        assert await backend.status(0) == ([], 6, 7)
        assert await backend.status(100) == (["alice", "bob", "carol", "dave", "erin", "frank"], 6, 7)
        for name in ("carol", "dave", "erin", "frank"):
            del node.users[name]
            backend.left(name)
        del node.users["bob"]
        backend.left("bob")

        async def bob_gone() -> bool:
            return await backend.status() == (["alice"], 1, 2)

        await async_wait_until(bob_gone, 5, "bob to leave the status")
        if not broker_url.startswith("memory"):
            # The memory backend leaves the per-user limit to the Hub; Redis checks it across the cluster.
            with pytest.raises(TooManyConnections):
                await join(backend, node, "alice", limit=2)
            assert await backend.status() == (["alice"], 1, 2)


@pytest.mark.anyio
async def test_two_redis_nodes_share_one_feed_presence_and_counts(redis: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis.port}/0"
    import redis as redis_client

    redis_client.Redis(port=redis.port, db=0).flushdb()
    one, two = RecordingNode(), RecordingNode()
    async with started(url, one) as first:
        async with started(url, two) as second:
            await join(first, one, "alice")
            await join(second, two, "alice")
            await join(second, two, "bob")
            assert await first.status() == (["alice", "bob"], 2, 3)
            with pytest.raises(TooManyConnections):
                await join(first, one, "alice", limit=2)
            done = await second.publish(None, draft("everyone"))
            assert (done.sent_count, done.total_connections, done.users_reached, done.nodes_missing) == (3, 3, 2, 0)
            only = await first.publish(frozenset({"bob"}), draft("bob"))
            assert (only.sent_count, only.users_reached) == (1, 1)
            await async_wait_until(lambda: len(two.got) == 2, 5, "bob's node to get both")
            assert [m.id for m in two.got] == [done.id, only.id]
            # A targeted message goes to the nodes that hold its users only: the first node never sees bob's.
            third = await second.publish(None, draft("everyone again"))
            await async_wait_until(lambda: len(one.got) == 2, 5, "the first node to get the broadcasts")
            assert [m.id for m in one.got] == [done.id, third.id]
            replay = await first.replay("bob", MessageId(done.id.ms, done.id.seq))
            assert [m.id for m in replay.messages] == [only.id, third.id]
        # The second node left cleanly: its users are gone at once, not after the heartbeat TTL.
        assert await first.status() == (["alice"], 1, 1)


@pytest.mark.anyio
async def test_close_user_reaches_every_node_and_stays_out_of_the_history(redis: RedisServer) -> None:
    url = f"redis://127.0.0.1:{redis.port}/0"
    import redis as redis_client

    redis_client.Redis(port=redis.port, db=0).flushdb()
    one, two = RecordingNode(), RecordingNode()
    async with started(url, one) as first, started(url, two) as second:
        await join(first, one, "alice")
        await join(second, two, "alice")
        await join(second, two, "alice")
        before = await first.publish(None, draft("before"))
        assert await first.close_user("alice", 4003, "bye") == (3, 0)
        assert one.closed == two.closed == [("alice", 4003, "bye")]
        assert await second.close_user("nobody", 4003, "bye") == (0, 0)
        # The control entries are not messages: a resume never sees them.
        replay = await second.replay("alice", MessageId(0, 0))
        assert [m.id for m in replay.messages] == [before.id]


@pytest.mark.anyio
async def test_close_user_in_memory() -> None:
    node = RecordingNode()
    async with started("memory://", node) as backend:
        await join(backend, node, "alice")
        assert await backend.close_user("alice", 4003, "bye") == (1, 0)
        assert node.closed == [("alice", 4003, "bye")]


@pytest.mark.anyio
async def test_messages_past_the_ttl_are_not_replayed(broker_url: str) -> None:
    node = RecordingNode()
    async with started(broker_url, node, history_ttl=0.3) as backend:
        await join(backend, node, "alice")
        first = await backend.publish(None, draft("old"))
        await backend.publish(None, draft("older"))

        async def expired() -> bool:
            return await backend.replay("alice", first.id) == ([], False)

        await async_wait_until(expired, 5, "the history to expire")
        fresh = await backend.publish(None, draft("fresh"))
        replay = await backend.replay("alice", first.id)
        assert ([m.id for m in replay.messages], replay.recovered) == ([fresh.id], False)


@pytest.mark.anyio
async def test_a_resume_that_meets_a_broker_outage_closes_with_1013() -> None:
    """Redis goes away between the handshake and the history read: the socket is told to come back later."""
    from diary_ws.broadcaster import Hub, Limits

    with redis_server() as server:
        hub = Hub(backend_for(Settings(broker_url=server.url)), Limits(100, 16, 256, 1 << 20))
        await hub.start()
        try:
            await async_wait_until(hub.ready, 10, "the hub to be ready")
            sink = ClosingSink()
            conn = await hub.attach("alice", sink)
            server.kill()
            await hub.listen(conn, MessageId(1, 0))
            await async_wait_until(lambda: sink.closed is not None, 5, "the close")
            assert sink.closed is not None
            assert sink.closed[0] == CloseCode.TRY_AGAIN_LATER
            assert sink.texts == []  # no resume frame: nothing was read
        finally:
            await hub.stop()


class ClosingSink:
    """Records what the Hub sends one socket."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.closed: tuple[int, str] | None = None

    def try_write(self, message: Message) -> WriteResult:
        return WriteResult.LATER  # everything goes through send_text

    async def send_text(self, text: str, msg_id: MessageId | None) -> None:
        self.texts.append(text)

    async def send_heartbeat(self) -> None:
        pass

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def stalled(self) -> bool:
        return False

    def abort(self) -> bool:
        return False


def test_after_data_loss_new_ids_follow_the_last_id_a_reader_saw(redis: RedisServer) -> None:
    """REPAIR marks everything up to now as deleted, and keeps ids increasing even if Redis's clock is behind."""
    import time

    import redis as redis_client

    from diary_ws.backends.redis import scripts
    from diary_ws.messages import parse_id

    client = redis_client.Redis(port=redis.port, db=0, decode_responses=True)
    client.flushdb()
    ahead = f"{time.time() * 1000 + 3_600_000:.0f}-5"  # a reader that saw an id an hour ahead of Redis's clock
    lost, top, epoch, deleted = client.eval(scripts.REPAIR, 2, "diary-ws:feed", "diary-ws:epoch", ahead)
    assert (lost, top, deleted) == (1, ahead, ahead)
    assert client.xinfo_stream("diary-ws:feed")["max-deleted-entry-id"] == ahead
    new = parse_id(str(client.xadd("diary-ws:feed", {"k": "notification", "m": "x"})))
    old = parse_id(ahead)
    assert new is not None
    assert old is not None
    assert new > old
    # The epoch is set now: the next reader to connect repairs nothing, and learns the same epoch.
    assert client.eval(scripts.REPAIR, 2, "diary-ws:feed", "diary-ws:epoch", "0-0")[::2] == [0, epoch]
