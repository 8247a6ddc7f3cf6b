"""Scale-out on Redis, end to end: real `diary-ws serve` processes sharing one real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from diary_ws.backends.redis import HEARTBEAT_TTL, PUBLISH_WAIT, READ_BLOCK, READ_GRACE
from tests.sse_client import open_stream
from tests.utils import RedisServer, Server, async_wait_until, next_frame, redis_server, run_server, wait_until


@contextlib.contextmanager
def cluster(nodes: int = 2, **settings: str) -> Iterator[tuple[RedisServer, list[Server]]]:
    """A redis-server and `nodes` diary-ws servers on it."""
    with redis_server() as redis, contextlib.ExitStack() as stack:
        servers = [stack.enter_context(run_server({"broker_url": redis.url, **settings})) for _ in range(nodes)]
        for srv in servers:
            wait_until(partial(readyz_is, srv, 200), 10, "every node to be ready")
        yield redis, servers


def readyz_is(srv: Server, code: int) -> bool:
    return srv.get("/readyz").status_code == code


@contextlib.asynccontextmanager
async def listeners(*urls: str) -> AsyncIterator[list[ClientConnection]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect(url)) for url in urls]


def node_id(srv: Server) -> str:
    found = re.search(r"diary_ws.redis: node (\S+) on ", srv.log())
    assert found, srv.log()[-2000:]
    return found.group(1)


def counts(answer: dict[str, Any]) -> tuple[int, int, int]:
    return answer["sent_count"], answer["total_connections"], answer["disconnected_users"]


@pytest.mark.anyio
async def test_two_nodes_deliver_count_and_report_status_as_one() -> None:
    with cluster(max_connections_per_user="2") as (_redis, (a, b)):
        async with listeners(a.listen_url("alice"), b.listen_url("alice"), b.listen_url("bob")) as (a1, b1, bob):
            everyone = a.post({"message": "hello"})
            assert everyone.status_code == 200, everyone.text
            body = everyone.json()
            assert counts(body) == (3, 3, 0)
            assert body["message"] == "Notification sent to 2 users"  # alice on two nodes is one user
            assert "nodes_missing" not in body
            for ws in (a1, b1, bob):
                assert (await next_frame(ws))["id"] == body["id"]

            only_bob = a.post({"message": "for bob", "user_ids": ["bob"]}).json()
            assert (counts(only_bob), only_bob["message"]) == ((1, 1, 0), "Notification sent to 1 user")
            only_alice = b.post({"message": "for alice", "user_ids": ["alice", "nobody"]}).json()
            assert (counts(only_alice), only_alice["message"]) == ((2, 2, 0), "Notification sent to 1 user")
            assert (await next_frame(bob))["id"] == only_bob["id"]
            for ws in (a1, b1):
                assert (await next_frame(ws))["id"] == only_alice["id"]  # bob's message never reached alice

            expected = {"connected_users": 2, "status": "active", "active_user_ids": ["alice", "bob"]}
            for srv in (a, b):
                assert srv.status() == {**expected, "total_connections": 3}
            nobody = a.post({"message": "x", "user_ids": ["carol"]})
            assert nobody.status_code == 404
            assert "id" not in nobody.json()

            # MAX_CONNECTIONS_PER_USER = 2 holds across the nodes: alice has one socket on each.
            for srv in (a, b):
                with pytest.raises(Exception, match="429"):
                    async with connect(srv.listen_url("alice")):
                        pass
        for srv in (a, b):
            srv.assert_clean_log()


@pytest.mark.anyio
async def test_every_node_delivers_in_the_same_order() -> None:
    with cluster() as (_redis, (a, b)):
        async with listeners(a.listen_url("u1"), b.listen_url("u2"), b.listen_url("u3")) as sockets:

            async def burst(srv: Server, tag: str) -> list[str]:
                async with httpx.AsyncClient(base_url=srv.http, timeout=10) as http:
                    return [
                        (await http.post("/api/v1/ws/notification", json={"message": f"{tag}{i}"})).json()["id"]
                        for i in range(25)
                    ]

            sent = await asyncio.gather(burst(a, "a"), burst(b, "b"))
            seen = [[(await next_frame(ws))["id"] for _ in range(50)] for ws in sockets]
            assert seen[0] == seen[1] == seen[2], "one order on every node"
            assert sorted(seen[0]) == sorted(sent[0] + sent[1])
            pairs = [tuple(map(int, i.split("-"))) for i in seen[0]]
            assert pairs == sorted(pairs), "the stream's order"


@pytest.mark.anyio
async def test_resume_on_another_node() -> None:
    with cluster() as (_redis, (a, b)):
        async with listeners(b.listen_url("bob")):
            async with connect(a.listen_url("alice")) as ws:
                first = a.post({"message": "seen", "user_ids": ["alice"]}).json()
                assert (await next_frame(ws))["id"] == first["id"]
            missed = [b.post({"message": f"m{i}"}).json()["id"] for i in range(3)]
            b.post({"message": "not hers", "user_ids": ["bob"]})
            async with connect(b.listen_url("alice", f"since={first['id']}")) as ws:
                assert [(await next_frame(ws))["id"] for _ in range(3)] == missed
                assert await next_frame(ws) == {"type": "resume", "recovered": True, "replayed": 3}
                live = a.post({"message": "live", "user_ids": ["alice"]}).json()
                assert (await next_frame(ws))["id"] == live["id"]


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_killed_node_leaves_status_and_the_other_keeps_serving() -> None:
    with cluster() as (_redis, (a, b)):
        dead = node_id(b)
        async with listeners(a.listen_url("alice")) as (alice,), connect(b.listen_url("bob")):
            wait_until(lambda: a.status()["active_user_ids"] == ["alice", "bob"], 5, "bob in status")
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait(timeout=5)
            killed = time.monotonic()
            # While bob's node still looks alive, a publish waits out the bound and says a node is missing.
            started = time.monotonic()
            answer = a.post({"message": "one node short"}).json()
            took = time.monotonic() - started
            assert answer["nodes_missing"] == 1, answer
            assert counts(answer) == (1, 1, 0)
            assert PUBLISH_WAIT * 0.9 < took < PUBLISH_WAIT + 1.5
            assert (await next_frame(alice))["id"] == answer["id"]
            assert f"from node(s) {dead}" in a.log()
            wait_until(lambda: a.status()["active_user_ids"] == ["alice"], HEARTBEAT_TTL + 4, "bob to leave")
            assert time.monotonic() - killed < 10
            started = time.monotonic()
            answer = a.post({"message": "whole again"}).json()
            assert "nodes_missing" not in answer
            assert time.monotonic() - started < PUBLISH_WAIT
            assert a.post({"message": "x", "user_ids": ["bob"]}).status_code == 404
            assert (await next_frame(alice))["id"] == answer["id"]
        a.assert_clean_log()


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_paused_node_catches_up_from_the_last_id_it_read() -> None:
    """A node that stops reading (SIGSTOP) delivers what it missed, in order, when it reads again."""
    with cluster() as (_redis, (a, b)):
        async with listeners(a.listen_url("alice"), b.listen_url("bob")) as (alice, bob):
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                sent = [b.post({"message": f"m{i}"}).json() for i in range(3)]
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            assert all(answer["nodes_missing"] == 1 for answer in sent), sent
            assert [(await next_frame(alice))["id"] for _ in range(3)] == [answer["id"] for answer in sent]
            assert [(await next_frame(bob))["id"] for _ in range(3)] == [answer["id"] for answer in sent]


@pytest.mark.anyio
@pytest.mark.slow
async def test_redis_restart_503_while_down_then_recovery_with_presence_rewritten() -> None:
    with cluster() as (redis, (a, b)):
        async with listeners(a.listen_url("alice"), b.listen_url("bob")) as (alice, bob):
            before = a.post({"message": "before"}).json()
            for ws in (alice, bob):
                assert (await next_frame(ws))["id"] == before["id"]
            redis.kill()
            for srv in (a, b):
                wait_until(partial(readyz_is, srv, 503), 10, "readyz to say 503")
                down = srv.post({"message": "lost?"})
                assert down.status_code == 503, down.text
                assert down.json() == {
                    "status": "error",
                    "message": "broker unavailable: the notification was not sent; retry later",
                }
                assert srv.get("/api/v1/ws/status").status_code == 503

            redis.start()  # the same port, and no data: everything Redis held is gone
            for srv in (a, b):
                wait_until(partial(readyz_is, srv, 200), 15, "readyz to recover")
            # Whatever the old Redis held that a node had not read yet is gone: no socket may miss it
            # silently, so each node closes its sockets with 1013 and they resume.
            for ws in (alice, bob):
                with pytest.raises(ConnectionClosed):
                    await next_frame(ws)
                assert ws.close_code == 1013
                assert "reconnect with since" in (ws.close_reason or "")
        async with listeners(
            a.listen_url("alice", f"since={before['id']}"), b.listen_url("bob", f"since={before['id']}")
        ) as (alice, bob):
            for ws in (alice, bob):  # the history went with Redis: a since from before is not recovered
                assert await next_frame(ws) == {"type": "resume", "recovered": False, "replayed": 0}
            # Each node wrote its presence again.
            wait_until(lambda: a.status()["active_user_ids"] == ["alice", "bob"], 5, "presence to be rewritten")
            after = b.post({"message": "after"})
            assert after.status_code == 200, after.text
            assert counts(after.json()) == (2, 2, 0)
            for ws in (alice, bob):
                assert (await next_frame(ws))["id"] == after.json()["id"]
            async with connect(b.listen_url("alice", f"since={before['id']}")) as ws:
                frame = await next_frame(ws)
                assert frame["id"] == after.json()["id"]
                assert await next_frame(ws) == {"type": "resume", "recovered": False, "replayed": 1}
        for srv in (a, b):
            srv.assert_clean_log()
            text = srv.log()
            # One line per change of state, not one per retry.
            assert text.count("stream reader: Redis unreachable") == 1, text[-3000:]
            assert text.count("stream reader: Redis is reachable again") == 1


@pytest.mark.anyio
async def test_redis_down_at_start_is_retried_and_not_ready() -> None:
    with redis_server() as redis:
        redis.kill()
        with run_server({"broker_url": redis.url}) as srv:
            assert srv.get("/readyz").status_code == 503
            assert srv.post({"message": "x"}).status_code == 503
            with pytest.raises(Exception, match="503"):
                async with connect(srv.listen_url("alice")):
                    pass
            redis.start()
            wait_until(lambda: srv.get("/readyz").status_code == 200, 15, "the node to reach Redis")
            async with connect(srv.listen_url("alice")) as ws:
                answer = srv.post({"message": "now"}).json()
                assert (await next_frame(ws))["id"] == answer["id"]
            srv.assert_clean_log()
            assert srv.log().count("stream reader: Redis unreachable") == 1


@pytest.mark.anyio
async def test_two_workers_share_the_port_and_both_serve() -> None:
    import redis as redis_client

    with redis_server() as redis, run_server({"broker_url": redis.url, "workers": "2"}) as srv:
        client = redis_client.Redis(port=redis.port, decode_responses=True)
        wait_until(lambda: len(client.smembers("diary-ws:nodes")) == 2, 15, "both workers to join")
        nodes = [str(n) for n in client.smembers("diary-ws:nodes")]
        async with contextlib.AsyncExitStack() as stack:
            sockets: list[ClientConnection] = []

            async def both_hold_sockets() -> bool:
                sockets.append(await stack.enter_async_context(connect(srv.listen_url(f"u{len(sockets)}"))))
                return all(client.hlen(f"diary-ws:presence:{n}") for n in nodes)

            await async_wait_until(both_hold_sockets, 30, "sockets on both workers", interval=0)
            answer = srv.post({"message": "to both"}).json()
            assert counts(answer) == (len(sockets), len(sockets), 0), answer
            for ws in sockets:
                assert (await next_frame(ws))["id"] == answer["id"]
        # A worker that dies is replaced: a new node joins.
        found = re.search(r"started 2 workers: (\d+), (\d+)", srv.log())
        assert found, srv.log()[-2000:]
        os.kill(int(found.group(1)), signal.SIGKILL)
        wait_until(lambda: bool(set(client.smembers("diary-ws:nodes")) - set(nodes)), 15, "a new worker to join")
        wait_until(lambda: srv.get("/readyz").status_code == 200, 10, "the service to stay ready")
        assert srv.terminate() < 10
        assert "exited (-9); started" in srv.log()
        srv.assert_clean_log()


@pytest.mark.anyio
async def test_a_stalled_reader_makes_the_node_not_ready() -> None:
    """Redis stops answering (SIGSTOP) without closing anything: past its block timeout the reader is stalled."""
    with cluster(nodes=1) as (redis, (a,)):
        assert redis.proc is not None
        async with listeners(a.listen_url("alice")) as (alice,):
            os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                wait_until(partial(readyz_is, a, 503), READ_BLOCK + READ_GRACE + 3, "readyz to say 503")
                assert time.monotonic() - stopped > READ_GRACE * 0.9  # a quiet feed alone is no stall
                assert a.post({"message": "x"}).status_code == 503
            finally:
                os.kill(redis.proc.pid, signal.SIGCONT)
            wait_until(partial(readyz_is, a, 200), 15, "readyz to recover")
            answer = a.post({"message": "after"}).json()
            assert (await next_frame(alice))["id"] == answer["id"]
        a.assert_clean_log()


@pytest.mark.anyio
async def test_the_operator_disconnect_closes_the_users_sockets_on_every_node() -> None:
    with cluster() as (_redis, (a, b)):
        async with listeners(a.listen_url("alice"), b.listen_url("alice"), b.listen_url("bob")) as (a1, b1, bob):
            async with httpx.AsyncClient(timeout=10) as http:
                answer = await http.delete(f"{a.http}/api/v1/ws/users/alice/connections")
            assert answer.json() == {"status": "success", "message": "Closed 2 connections of user alice", "closed": 2}
            for ws in (a1, b1):
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4003
            wait_until(lambda: b.status()["active_user_ids"] == ["bob"], 5, "alice to leave the status")
            assert a.post({"message": "bob stays"}).json()["sent_count"] == 1
            assert (await next_frame(bob))["message"] == "bob stays"
        for srv in (a, b):
            srv.assert_clean_log()


@pytest.mark.anyio
async def test_rate_limits_and_idempotency_keys_hold_across_the_cluster() -> None:
    with cluster(rate_limit="3/m", connect_rate_limit="3/m") as (_redis, (a, b)):
        async with listeners(a.listen_url("alice"), b.listen_url("bob")) as (alice, bob):
            key = {"Idempotency-Key": "order-42"}
            first = a.post({"message": "once"}, headers=key)
            assert first.status_code == 200, first.text
            again = b.post({"message": "once"}, headers=key)  # the retry lands on the other node
            assert (again.status_code, again.json()) == (200, first.json())
            assert again.headers["Idempotent-Replayed"] == "true"
            other = b.post({"message": "different"}, headers=key)
            assert other.status_code == 422
            # One bucket for the sender (this client address) across both nodes, 3 a minute: the first
            # publish, the replay and the 422 took all three, so the next is over the limit, on either node.
            refused = a.post({"message": "over"})
            assert refused.status_code == 429, refused.text
            assert refused.headers["RateLimit-Remaining"] == "0"
            assert int(refused.headers["Retry-After"]) >= 1
            assert b.post({"message": "over"}).status_code == 429
            for ws in (alice, bob):  # the message went out once
                assert (await next_frame(ws))["id"] == first.json()["id"]
            # Handshakes from one address, 3 a minute over the cluster: two were made above.
            async with connect(b.listen_url("carol")):
                pass
            with pytest.raises(Exception, match="429"):
                async with connect(a.listen_url("dave")):
                    pass
        for srv in (a, b):
            srv.assert_clean_log()


@pytest.mark.anyio
async def test_sse_streams_are_part_of_the_cluster_too() -> None:
    with cluster() as (_redis, (a, b)):
        async with open_stream(f"{b.http}/api/v1/sse/alice") as events, connect(a.listen_url("alice")) as ws:
            wait_until(lambda: a.status()["total_connections"] == 2, 5, "the stream in the cluster's status")
            answer = a.post({"message": "both kinds"}).json()
            assert (counts(answer), answer["message"]) == ((2, 2, 0), "Notification sent to 1 user")
            assert (await events.next()).id == answer["id"]
            assert (await next_frame(ws))["id"] == answer["id"]
        async with open_stream(f"{a.http}/api/v1/sse/alice?since={answer['id']}") as events:
            later = b.post({"message": "later"}).json()
            assert (await events.next()).json()["type"] == "resume"
            assert (await events.next()).id == later["id"]
