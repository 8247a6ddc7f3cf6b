"""Redis mode's answers when Redis fails, one fault at a time (tests/test_chaos.py mixes them all).

- 503 means not stored: the message is never delivered, even once Redis is back.
- 504 means the outcome is unknown; with an Idempotency-Key a retry gets 409 while the first answer may
  still come, then the first answer (or, for a request that never learnt it, the stored id), and the
  message goes out once.
- No POST, status or DELETE takes over 3 s whatever Redis does; /readyz says 503 within 3 s.
- Node clocks minutes off change no answer and no count.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from diary_ws.backends.redis import scripts
from diary_ws.deadline import REQUEST_SECONDS
from diary_ws.idempotency import BUSY_WINDOW
from tests.tcp_proxy import TcpProxy, tcp_proxy
from tests.test_cluster import counts, listeners, readyz_is
from tests.utils import RedisServer, Server, next_frame, redis_server, run_server, wait_until

SLACK = 1.0  # the test's own clock, on a shared machine


@contextlib.contextmanager
def proxied(nodes: int = 1) -> Iterator[tuple[RedisServer, TcpProxy, list[Server]]]:
    """A redis-server, a proxy in front of it, and `nodes` nodes that reach Redis through the proxy."""
    with redis_server() as redis, tcp_proxy(redis.port) as proxy, contextlib.ExitStack() as stack:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        servers = [stack.enter_context(run_server({"broker_url": url})) for _ in range(nodes)]
        for srv in servers:
            wait_until(partial(readyz_is, srv, 200), 15, "every node to be ready")
        yield redis, proxy, servers


def timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


def delete(srv: Server, user_id: str) -> httpx.Response:
    return httpx.delete(f"{srv.http}/api/v1/ws/users/{user_id}/connections", timeout=15)


@contextlib.contextmanager
def paused(redis: RedisServer) -> Iterator[None]:
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_503_is_never_delivered_later() -> None:
    with proxied() as (_redis, proxy, (srv,)):
        async with listeners(srv.listen_url("alice")) as (alice,):
            proxy.cut(refuse=True)
            refused = srv.post({"message": "refused"})
            assert refused.status_code == 503, refused.text
            assert "not sent" in refused.json()["message"]
            proxy.release()
            wait_until(partial(readyz_is, srv, 200), 15, "the node to be back")
            after = srv.post({"message": "after"})
            assert after.status_code == 200, after.text
            assert (await next_frame(alice))["message"] == "after"  # and not "refused" first


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_504_then_a_retry_with_the_key_delivers_once() -> None:
    with proxied() as (_redis, proxy, (srv,)):
        async with listeners(srv.listen_url("alice")) as (alice,):
            assert srv.post({"message": "warm"}).status_code == 200
            assert (await next_frame(alice))["message"] == "warm"
            key = {"Idempotency-Key": "order-504"}
            # The publish script reaches Redis and runs; its answer is lost on the way back.
            proxy.lose_answers_to(hashlib.sha1(scripts.PUBLISH.encode()).hexdigest().encode())
            unknown, took = timed(lambda: srv.post({"message": "once"}, headers=key))
            proxy.lose_answers_to(None)
            assert unknown.status_code == 504, unknown.text
            assert took < REQUEST_SECONDS + SLACK
            text = unknown.json()["message"]
            assert "may or may not have been sent" in text
            assert "a retry with the same Idempotency-Key is safe" in text
            stored = await next_frame(alice)  # it was stored, and delivered
            assert stored["message"] == "once"
            busy = srv.post({"message": "once"}, headers=key)
            assert busy.status_code == 409, busy.text  # the first request's answer might still come
            assert busy.headers["Retry-After"] == "1"
            # Past the first request's deadline nobody will answer it: the retry is told the stored id.
            wait_until(lambda: srv.post({"message": "once"}, headers=key).status_code == 200, BUSY_WINDOW + 5, "200")
            final = srv.post({"message": "once"}, headers=key)
            assert final.headers["Idempotent-Replayed"] == "true"
            assert final.json()["id"] == stored["id"]
            assert final.json()["nodes_missing"] >= 1  # its counts were never gathered, and it says so
            assert srv.post({"message": "other"}, headers=key).status_code == 422
            newer = srv.post({"message": "newer"})
            assert (await next_frame(alice))["id"] == newer.json()["id"]  # "once" went out once
        srv.assert_clean_log()


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_504_without_a_key_is_honest_too() -> None:
    """The message of a 504 may have been stored: here it was (Redis ran it when it woke)."""
    with proxied() as (redis, _proxy, (srv,)):
        async with listeners(srv.listen_url("alice")) as (alice,):
            assert srv.post({"message": "warm"}).status_code == 200
            assert (await next_frame(alice))["message"] == "warm"
            with paused(redis):
                unknown = srv.post({"message": "maybe"})
            assert unknown.status_code == 504, unknown.text
            assert (await next_frame(alice, 10))["message"] == "maybe"


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["blackhole", "pause", "cut", "kill"])
async def test_no_request_outlives_its_deadline_and_readyz_follows(fault: str) -> None:
    with proxied() as (redis, proxy, (srv,)):
        async with listeners(srv.listen_url("alice")):
            began = time.monotonic()
            if fault == "blackhole":
                proxy.blackhole()
            elif fault == "cut":
                proxy.cut(refuse=True)
            elif fault == "kill":
                redis.kill()
            else:
                assert redis.proc is not None
                os.kill(redis.proc.pid, signal.SIGSTOP)
            try:
                wait_until(partial(readyz_is, srv, 503), REQUEST_SECONDS + SLACK, "readyz to say 503")
                assert time.monotonic() - began < REQUEST_SECONDS + SLACK
                for call in (
                    lambda: srv.post({"message": "x"}),
                    lambda: srv.post({"message": "x"}, headers={"Idempotency-Key": f"k-{fault}"}),
                    lambda: srv.get("/api/v1/ws/status"),
                    lambda: delete(srv, "alice"),
                ):
                    answer, took = timed(call)
                    assert answer.status_code in (503, 504), answer.text
                    assert answer.json()["status"] == "error"
                    assert took < REQUEST_SECONDS + SLACK, (fault, answer.text, took)
            finally:
                if fault == "blackhole":
                    proxy.heal()
                elif fault == "cut":
                    proxy.release()
                elif fault == "kill":
                    redis.start()
                else:
                    assert redis.proc is not None
                    os.kill(redis.proc.pid, signal.SIGCONT)
            wait_until(partial(readyz_is, srv, 200), 20, "the node to be back")
        async with listeners(srv.listen_url("bob")) as (bob,):  # (a restart that lost the data closed alice's)
            back = srv.post({"message": "back"})
            assert back.status_code == 200, back.text
            assert (await next_frame(bob))["id"] == back.json()["id"]
        srv.assert_clean_log()


@pytest.mark.anyio
@pytest.mark.slow
async def test_node_clocks_minutes_off_change_no_answer_and_no_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """One node 5 minutes ahead, the other 5 minutes behind: every answer as if both were right."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent / "skewed_clock"))
    with redis_server() as redis, contextlib.ExitStack() as stack:
        nodes = []
        for offset in ("300", "-300"):
            monkeypatch.setenv("FAKE_CLOCK_OFFSET", offset)
            nodes.append(stack.enter_context(run_server({"broker_url": redis.url})))
        a, b = nodes
        for srv in nodes:
            wait_until(partial(readyz_is, srv, 200), 15, "every node to be ready")
        async with listeners(a.listen_url("alice"), b.listen_url("bob")) as (alice, bob):
            wait_until(lambda: a.status()["active_user_ids"] == ["alice", "bob"], 5, "both in status")
            sent = []
            for srv in (a, b, a, b):
                answer = srv.post({"message": "tick"})
                assert answer.status_code == 200, answer.text
                assert "nodes_missing" not in answer.json(), answer.json()  # every node reported in time
                assert counts(answer.json()) == (2, 2, 0)
                sent.append(answer.json()["id"])
            for ws in (alice, bob):
                assert [(await next_frame(ws))["id"] for _ in sent] == sent
            assert a.status() == b.status()
            # Ids and history are Redis's: a resume on either node from either node's id is recovered.
            async with connect(b.listen_url("alice", f"since={sent[0]}")) as ws:
                assert [(await next_frame(ws))["id"] for _ in sent[1:]] == sent[1:]
                assert await next_frame(ws) == {"type": "resume", "recovered": True, "replayed": 3}
            # An Idempotency-Key's first answer, replayed by the node with the other clock.
            key = {"Idempotency-Key": "skewed"}
            first = a.post({"message": "keyed"}, headers=key)
            again = b.post({"message": "keyed"}, headers=key)
            assert (again.status_code, again.json()) == (200, first.json())
        for srv in nodes:
            assert "no counts in time" not in srv.log()
            srv.assert_clean_log()


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_handshake_refused_while_redis_is_paused_leaves_no_ghost() -> None:
    """The handshake's presence write waits in Redis's socket while it sleeps, and runs when it wakes, after the
    client got its 503 and the node gave up on it: the user must not stay "connected" on this node, which made
    every POST to them a 200 "sent to 0 users" that nobody got, for as long as the node lived."""
    with redis_server() as redis, run_server({"broker_url": redis.url}) as srv:
        wait_until(lambda: srv.get("/readyz").status_code == 200, 10, "the node to be ready")
        # A listener that just joined: the presence writer's next command is the refused handshake's own,
        # not a heartbeat that would fail first and leave it unsent.
        async with listeners(srv.listen_url("warm")):
            with paused(redis):
                answer = srv.get("/api/v1/sse/ghost")  # the WebSocket's handshake takes the same path
                assert answer.status_code == 503, answer.text
                wait_until(lambda: "presence: Redis unreachable" in srv.log(), 15, "the presence writer to give up")
        wait_until(lambda: srv.get("/readyz").status_code == 200, 10, "Redis to be back")

        def gone() -> bool:
            presence = srv.get("/api/v1/ws/users/ghost")
            return presence.status_code == 200 and presence.json()["connected"] is False

        wait_until(gone, 10, "the refused handshake's presence to be cleared")
        assert srv.post({"message": "anyone?", "user_ids": ["ghost"]}).status_code == 404
        async with listeners(srv.listen_url("ghost")) as (ghost,):
            sent = srv.post({"message": "now", "user_ids": ["ghost"]})
            assert sent.status_code == 200, sent.text
            assert (await next_frame(ghost))["message"] == "now"
        srv.assert_clean_log()
