"""Redis Cluster, end to end: real `diary-ws serve` nodes on a real Redis Cluster the test starts.

`BROKER_URL=redis-cluster://host:port` names any one node of the cluster. The users are spread over shards,
each a whole layout under a hash tag of its own, so each shard's keys live in one slot and its scripts keep
the atomicity they have on one Redis; the shards' slots are spread over the masters (docs/cluster.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import pytest
import redis as redis_client
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from diary_ws.backends.redis.sharded import shard_of, shard_prefixes
from tests.test_cluster import counts, listeners, readyz_is
from tests.utils import (
    RedisClusterServers,
    RedisServer,
    Server,
    async_wait_until,
    free_port,
    next_frame,
    redis_cluster,
    run_server,
    wait_until,
)

PREFIXES = shard_prefixes()


@contextlib.contextmanager
def nodes_on(rc: RedisClusterServers, count: int = 2, **settings: str) -> Iterator[list[Server]]:
    """`count` diary-ws nodes on the cluster, each given another cluster node to start from."""
    with contextlib.ExitStack() as stack:
        servers = []
        for i in range(count):
            start = rc.servers[(2 * i) % len(rc.servers)]
            url = f"redis-cluster://127.0.0.1:{start.port}"
            servers.append(stack.enter_context(run_server({"broker_url": url, **settings})))
        for srv in servers:
            wait_until(partial(readyz_is, srv, 200), 15, "every node to be ready")
        yield servers


def keys_by_master(rc: RedisClusterServers) -> dict[int, list[str]]:
    """Every key of every live master, by port."""
    found: dict[int, list[str]] = {}
    for server in rc.servers:
        if server.proc is None or server.proc.poll() is not None:
            continue
        client = redis_client.Redis(port=server.port, decode_responses=True)
        if client.role()[0] == "master":
            found[server.port] = sorted(client.scan_iter(count=1000))
    return found


@pytest.mark.anyio
async def test_two_nodes_on_a_three_master_cluster_deliver_count_resume_and_report_as_one() -> None:
    with redis_cluster(masters=3) as rc, nodes_on(rc, max_connections_per_user="2") as (a, b):
        async with listeners(a.listen_url("alice"), b.listen_url("alice"), b.listen_url("bob")) as (a1, b1, bob):
            assert shard_of("alice") != shard_of("bob")
            everyone = a.post({"message": "hello"})
            assert everyone.status_code == 200, everyone.text
            assert counts(everyone.json()) == (3, 3, 0), "counts summed over both nodes and both shards"
            got = [await next_frame(ws) for ws in (a1, b1, bob)]
            assert [frame["message"] for frame in got] == ["hello"] * 3
            # Each user gets the copy of their own shard, under its id; the answer names one of them.
            assert got[0]["id"] == got[1]["id"]
            assert everyone.json()["id"] in {frame["id"] for frame in got}

            to_bob = b.post({"message": "just bob", "user_ids": ["bob"]})
            assert counts(to_bob.json()) == (1, 1, 0)
            assert (await next_frame(bob))["message"] == "just bob"

            assert a.status() == {"connected_users": 2, "status": "active", "active_user_ids": ["alice", "bob"],
                                  "total_connections": 3}  # fmt: skip
            assert a.get("/api/v1/ws/users/alice").json()["connections"] == 2
            with pytest.raises(InvalidStatus) as third:  # the per-user limit holds across the cluster
                await connect(a.listen_url("alice"))
            assert third.value.response.status_code == 429

            items = [{"message": "b1", "user_ids": ["bob"]}, {"message": "b2"}]
            url = f"{a.http}/api/v1/ws/notifications"
            batch = (await asyncio.to_thread(httpx.post, url, json={"notifications": items}, timeout=10)).json()
            assert [r.get("sent_count") for r in batch["results"]] == [1, 3]
            assert [(await next_frame(bob))["message"] for _ in range(2)] == ["b1", "b2"]

        # A resume on the other node reads the user's history from the cluster.
        async with connect(a.listen_url("carol")) as ws:
            first = a.post({"message": "seen", "user_ids": ["carol"]}).json()
            assert (await next_frame(ws))["id"] == first["id"]
        assert shard_of("carol") != shard_of("dave")
        async with listeners(a.listen_url("dave")) as (dave,):
            # To dave (here) and carol (away, in another shard): kept for carol too, as one Redis keeps it.
            both = a.post({"message": "for both", "user_ids": ["carol", "dave"]})
            assert counts(both.json()) == (1, 1, 0)
            assert (await next_frame(dave))["message"] == "for both"
        missed = [b.post({"message": f"m{i}"}).json().get("id") for i in range(2)]  # nobody: 404, not stored
        assert missed == [None, None]
        async with listeners(b.listen_url("dave")):
            stored = [b.post({"message": f"m{i}"}).json()["id"] for i in range(2)]
            assert all(stored)
            async with connect(b.listen_url("carol", f"since={first['id']}")) as ws:
                # Stored in carol's shard too, though nobody of it was connected: she finds them on resume.
                assert [(await next_frame(ws))["message"] for _ in range(3)] == ["for both", "m0", "m1"]
                assert await next_frame(ws) == {"type": "resume", "recovered": True, "replayed": 3}

                # An operator's disconnect from the other node reaches the socket.
                url = f"{a.http}/api/v1/ws/users/carol/connections"
                closed = await asyncio.to_thread(httpx.delete, url, timeout=10)
                assert closed.status_code == 200, closed.text
                assert closed.json()["closed"] == 1
                with pytest.raises(ConnectionClosed):
                    await next_frame(ws)
                assert ws.close_code == 4003

        # Every key is in a shard's slot; a user's keys are in their shard's; the shards are on every master.
        by_master = keys_by_master(rc)
        every_key = [key for keys in by_master.values() for key in keys]
        assert all(key.startswith(tuple(PREFIXES)) for key in every_key), every_key
        for user in ("bob", "carol"):  # the two with targeted messages, in their own index
            prefix = PREFIXES[shard_of(user)]
            assert f"{prefix}u:{user}" in every_key
            holder = rc.master_of(prefix.strip(":"))
            assert f"{prefix}u:{user}" in by_master[holder.port]
        assert all(by_master.values()), "each master holds some shards"
        for srv in (a, b):
            srv.assert_clean_log()


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_master_of_the_slot_fails_over_and_the_nodes_carry_on() -> None:
    """Kill the master of alice's shard: its replica takes over (cluster-node-timeout 1 s), and
    the nodes follow it. Publishes during the failover get a 503 or 504, never a 200 for a lost message; a
    retry with the same Idempotency-Key lands once; a listener gets it, live or by resuming with `since`."""
    with redis_cluster(masters=3, replicas=1) as rc, nodes_on(rc) as (a, b):
        async with connect(b.listen_url("alice")) as ws:
            first = a.post({"message": "before", "user_ids": ["alice"]}).json()
            assert (await next_frame(ws))["id"] == first["id"]
            # Let the replica catch up with what was written, so the failover loses nothing acknowledged.
            old = rc.master_of(PREFIXES[shard_of("alice")].strip(":"))  # alice's shard
            redis_client.Redis(port=old.port).wait(1, 2000)
            old.kill()
            killed = time.monotonic()

            answers: list[int] = []

            def delivered() -> bool:
                answer = a.post({"message": "after", "user_ids": ["alice"]}, headers={"Idempotency-Key": "k-1"})
                answers.append(answer.status_code)
                return answer.status_code == 200

            wait_until(delivered, 30, "a publish to be stored after the failover", interval=0.2)
            took = time.monotonic() - killed
            assert set(answers) <= {200, 503, 504, 409}, answers
            assert rc.master_of(PREFIXES[shard_of("alice")].strip(":")).port != old.port

            got: list[str] = []
            try:
                while True:
                    got.append((await next_frame(ws, 10))["message"])
                    if got[-1] == "after":
                        break
            except ConnectionClosed:
                assert ws.close_code == 1013, (ws.close_code, ws.close_reason)  # told to resume
                async with connect(b.listen_url("alice", f"since={first['id']}")) as again:
                    frames = [await next_frame(again, 10) for _ in range(2)]
                    assert [f.get("message") for f in frames[:1]] == ["after"], frames
                    assert frames[1]["type"] == "resume", frames
            else:
                assert got.count("after") == 1, got
        await async_wait_until(lambda: readyz_is(a, 200) and readyz_is(b, 200), 15, "both nodes ready again")
        for srv in (a, b):
            srv.assert_clean_log()
        print(f"failover: a publish was stored again {took:.1f} s after the master was killed; answers {answers}")


def batch(srv: Server, items: list[Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{srv.http}/api/v1/ws/notifications", json={"notifications": items}, headers=headers, timeout=10)


async def drain_until(ws: ClientConnection, last: str, limit: float = 10) -> list[str]:
    """The messages a listener gets up to and including `last`."""
    got: list[str] = []
    while not got or got[-1] != last:
        got.append((await next_frame(ws, limit))["message"])
    return got


def key_off(rc: RedisClusterServers, down: RedisServer) -> str:
    """An Idempotency-Key whose own shard (where its record lives) is on another master than `down`."""
    return next(f"k-{n}" for n in range(1000) if rc.master_of(PREFIXES[shard_of(f"k-{n}")].strip(":")) != down)


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["paused", "killed"])
async def test_a_keyed_message_across_shards_reaches_everybody_once_after_a_shard_failed(fault: str) -> None:
    """alice and bob are in shards on two masters, and bob's fails while a POST to both is stored: paused
    (SIGSTOP: the script waits in its socket and runs when the master wakes) or killed (it comes back empty).
    The POST is a 504 when alice's part was stored and bob's is unknown, a 503 when nothing was; never a 200.
    The retries with the same Idempotency-Key, once the master is back, end in a 200, and each of them got
    the message exactly once."""
    with redis_cluster(masters=3, full_coverage=False) as rc, nodes_on(rc) as (a, b):
        alices = rc.master_of(PREFIXES[shard_of("alice")].strip(":"))
        bobs = rc.master_of(PREFIXES[shard_of("bob")].strip(":"))
        assert alices.port != bobs.port
        key = {"Idempotency-Key": key_off(rc, bobs)}
        body = {"message": "to both", "user_ids": ["alice", "bob"]}
        async with listeners(a.listen_url("alice"), b.listen_url("bob")) as (alice, bob):
            first = a.post({"message": "hi", "user_ids": ["bob"]}).json()
            assert (await next_frame(bob))["id"] == first["id"]
            assert bobs.proc is not None
            if fault == "paused":
                bobs.proc.send_signal(signal.SIGSTOP)
            else:
                bobs.kill()
            answer = await asyncio.to_thread(a.post, body, headers=key)
            assert answer.status_code in (503, 504), answer.text
            if fault == "paused":
                assert answer.status_code == 504, answer.text  # alice's part was stored, bob's is not known
                assert "Idempotency-Key" in answer.json()["message"]
                bobs.proc.send_signal(signal.SIGCONT)
            else:
                bobs.start()  # back, empty (no persistence), as the master of the same slots
            wait_until(rc.ready, 30, "the cluster to cover every slot again")
            await async_wait_until(lambda: readyz_is(a, 200) and readyz_is(b, 200), 20, "both nodes ready")

            def retried() -> httpx.Response | None:
                again = a.post(body, headers=key)
                assert again.status_code in (200, 409, 503, 504), again.text
                return again if again.status_code == 200 else None

            again = await async_wait_until(retried, 20, "a retry to be answered 200")
            assert a.post(body, headers=key).json() == again.json()  # the answer is kept for the key
            a.post({"message": "end", "user_ids": ["alice", "bob"]})
            assert (await drain_until(alice, "end")).count("to both") == 1
            if fault == "paused":
                assert (await drain_until(bob, "end")).count("to both") == 1
        if fault == "killed":
            # bob's socket was closed when his shard lost its data; on resume he hears of the loss, then
            # gets what was stored since: the message once.
            async with connect(b.listen_url("bob", f"since={first['id']}")) as bob:
                got = [await next_frame(bob) for _ in range(3)]
                assert [f.get("message") for f in got[:2]] == ["to both", "end"], got
                assert got[2] == {"type": "resume", "recovered": False, "replayed": 2}, got
        for srv in (a, b):
            srv.assert_clean_log()


@pytest.mark.anyio
async def test_a_keyed_batch_across_shards_is_answered_and_delivered_once() -> None:
    with redis_cluster(masters=3) as rc, nodes_on(rc) as (a, b):
        async with listeners(a.listen_url("alice"), b.listen_url("bob")) as (alice, bob):
            items = [
                {"message": "1", "user_ids": ["alice"]},
                {"message": "2", "user_ids": ["alice", "bob"]},
                {"message": "3"},
                {"message": "4", "user_ids": ["nobody-here"]},
            ]
            first = await asyncio.to_thread(batch, a, items, **{"Idempotency-Key": "b-1"})
            assert first.status_code == 200, first.text
            results = first.json()["results"]
            assert [r.get("sent_count") for r in results] == [1, 2, 2, None]
            assert results[3]["code"] == 404
            assert [(await next_frame(alice))["message"] for _ in range(3)] == ["1", "2", "3"]
            assert [(await next_frame(bob))["message"] for _ in range(2)] == ["2", "3"]
            again = await asyncio.to_thread(batch, b, items, **{"Idempotency-Key": "b-1"})
            assert again.json() == first.json()  # the first answer, from the other node too
            other = await asyncio.to_thread(batch, b, items[:1], **{"Idempotency-Key": "b-1"})
            assert other.status_code == 422
            last = a.post({"message": "last"}).json()
            assert (await next_frame(alice))["message"] == "last"
            assert (await next_frame(bob))["message"] == "last"
            assert last["sent_count"] == 2


@pytest.mark.anyio
async def test_a_retry_that_finds_a_target_back_stores_nothing_twice() -> None:
    """A keyed message to alice (here) and bob (away, in another shard) is kept in bob's shard by the second
    step. If its request never recorded the key (its home shard failed after the parts were stored: here the
    record is deleted), the retry finds bob connected, and his shard's part must still count as stored."""
    from diary_ws.backends.redis.client import _hashed
    from diary_ws.backends.redis.sharded import ShardedRedisBackend
    from diary_ws.messages import Draft, MessageId
    from diary_ws.protocols import Claim
    from tests.test_backends import RecordingNode, join

    with redis_cluster(masters=3) as rc:
        node = RecordingNode()
        backend = ShardedRedisBackend(rc.url, 100, 300.0)
        await backend.start(node)
        try:
            await async_wait_until(backend.ready, 10, "the backend to be ready")
            await join(backend, node, "alice")
            claim = Claim("retry-1", "f" * 64, 60.0)
            first = await backend.publish(frozenset({"alice", "bob"}), Draft("n", "once", None), claim)
            assert first.sent_count == 1
            home = PREFIXES[shard_of("retry-1")]
            record = _hashed("idem", "retry-1", home)
            assert redis_client.Redis(port=rc.master_of(home.strip(":")).port).delete(record) == 1
            await join(backend, node, "bob")
            again = await backend.publish(frozenset({"alice", "bob"}), Draft("n", "once", None), claim)
            replay = await backend.replay("bob", MessageId(0, 0))
            assert [m.text.count('"once"') for m in replay.messages] == [1], replay
            # The answer names one of the message's copies (one id per shard): alice's, or bob's.
            assert again.id in {first.id, replay.messages[0].id}
            assert [m.text.count('"once"') for m in (await backend.replay("alice", MessageId(0, 0))).messages] == [1]
        finally:
            await backend.stop()


def test_an_unreachable_cluster_is_a_503_with_a_clean_log() -> None:
    """Nothing listens where BROKER_URL points: redis-py's cluster client raises RedisClusterException (not a
    RedisError) there, which must read as the broker being down, as with one Redis (found by an attack)."""
    with run_server({"broker_url": f"redis-cluster://127.0.0.1:{free_port()}"}) as srv:
        wait_until(lambda: "Redis unreachable" in srv.log(), 10, "the node to say Redis is unreachable")
        answers = {path: srv.get(path).status_code for path in ("/api/v1/ws/status", "/api/v1/ws/users/alice")}
        answers["post"] = srv.post({"message": "x"}).status_code
        answers["readyz"] = srv.get("/readyz").status_code
        assert set(answers.values()) == {503}, answers
        srv.assert_clean_log()
