"""Batch publish and presence on Redis: two real nodes sharing one real redis-server."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
from redis import Redis

from diary_ws import Sender, Sent
from diary_ws.backends.redis.client import _hashed
from diary_ws.validation import parse_batch
from tests.test_cluster import cluster, listeners, readyz_is
from tests.utils import RedisServer, Server, next_frame, wait_until

BATCH = "/api/v1/ws/notifications"


def presence(srv: Server, user_id: str) -> httpx.Response:
    return srv.get(f"/api/v1/ws/users/{user_id}")


def batch(srv: Server, items: list[dict[str, Any]], **headers: str) -> httpx.Response:
    body = orjson.dumps({"notifications": items})
    return httpx.post(
        f"{srv.http}{BATCH}", content=body, headers={"Content-Type": "application/json", **headers}, timeout=10
    )


def script_calls(redis: RedisServer) -> int:
    """How many EVALSHA and EVAL commands the redis-server has run so far (INFO commandstats)."""
    with Redis(port=redis.port, socket_timeout=5) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


@pytest.mark.anyio
async def test_presence_is_cluster_wide() -> None:
    with cluster() as (_redis, (a, b)):
        async with listeners(a.listen_url("alice"), a.listen_url("alice"), b.listen_url("alice"), b.listen_url("bob")):
            for srv in (a, b):
                assert presence(srv, "alice").json() == {"user_id": "alice", "connected": True, "connections": 3}
                assert presence(srv, "bob").json()["connections"] == 1
                assert presence(srv, "carol").json() == {"user_id": "carol", "connected": False, "connections": 0}
        wait_until(lambda: presence(a, "alice").json()["connections"] == 0, 10, "alice's sockets to leave")
        for srv in (a, b):
            srv.assert_clean_log()


@pytest.mark.anyio
async def test_a_batch_is_one_round_trip_with_counts_summed_over_the_nodes() -> None:
    with cluster() as (redis, (a, b)):
        async with listeners(a.listen_url("alice"), b.listen_url("alice"), b.listen_url("carol")) as sockets:
            alice_a, alice_b, carol = sockets
            items: list[dict[str, Any]] = []
            for i in range(40):
                items.append({"message": f"a{i}", "user_ids": ["alice"]})
                items.append({"message": f"nobody{i}", "user_ids": ["nobody"]})
            items.append({"message": "carol", "user_ids": ["carol", "nobody"]})
            items.append({"message": "everyone"})
            before = script_calls(redis)
            answer = batch(a, items)
            after = script_calls(redis)
            assert answer.status_code == 200, answer.text
            # One script for the batch; the rest is the nodes' own background work, never one per item.
            assert after - before < 5, after - before
            results = answer.json()["results"]
            assert answer.json()["failed"] == 40
            for i in range(40):
                assert results[2 * i]["sent_count"] == 2  # alice on both nodes
                assert results[2 * i]["message"] == "Notification sent to 1 user"  # one user, on two nodes
                assert results[2 * i + 1]["code"] == 404
            assert results[80]["sent_count"] == 1
            assert results[81]["sent_count"] == 3
            assert results[81]["message"] == "Notification sent to 2 users"
            ids = [r["id"] for r in results if r["status"] == "success"]
            for ws in (alice_a, alice_b):
                got = [(await next_frame(ws))["id"] for _ in range(41)]
                assert got == ids[:40] + ids[41:]  # in order, everywhere
            assert [(await next_frame(carol))["id"] for _ in range(2)] == ids[40:]
        for srv in (a, b):
            srv.assert_clean_log()


@pytest.mark.anyio
async def test_idempotency_and_rate_limits_hold_across_the_cluster_for_batches() -> None:
    with cluster(rate_limit="100/m:10") as (redis, (a, b)):
        async with listeners(a.listen_url("alice")) as (alice,):
            items = [{"message": f"m{i}", "user_ids": ["alice"]} for i in range(6)]
            first = batch(a, items, **{"Idempotency-Key": "cluster-batch"})
            assert first.status_code == 200
            again = batch(b, items, **{"Idempotency-Key": "cluster-batch"})  # on the other node
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json() == first.json()
            assert [(await next_frame(alice))["message"] for _ in range(6)] == [f"m{i}" for i in range(6)]
            over = batch(b, items)  # 6 more tokens from the shared bucket of 10: 4 left, not 6
            assert over.status_code == 429
            assert batch(b, items[:4]).status_code == 200
            too_big = batch(a, [{"message": "x"}] * 11)
            assert too_big.status_code == 422
            assert "bursts of up to 10" in too_big.json()["message"]
        # Past the rate checks (a request under a taken key may cost its tokens before the key is checked):
        with Redis(port=redis.port, socket_timeout=5) as client:
            client.delete(*client.keys("diary-ws:rate:*"))  # a full bucket again
        other = batch(b, items[:2], **{"Idempotency-Key": "cluster-batch"})  # another body, the same key
        assert other.status_code == 422
        assert "Idempotency-Key" in other.json()["message"]
        single = a.post({"message": "m0", "user_ids": ["alice"]}, headers={"Idempotency-Key": "cluster-batch"})
        assert single.status_code == 422  # a single POST under a batch's key is another request


@pytest.mark.anyio
async def test_with_the_broker_down_presence_and_batches_are_503_and_the_sender_gives_up() -> None:
    with cluster(nodes=1) as (redis, (a,)):
        async with listeners(a.listen_url("alice")):
            with Sender(a.http) as sender:
                assert isinstance(sender.send_many([{"message": "up", "user_ids": ["alice"]}])[0], Sent)
            redis.kill()
            wait_until(partial(readyz_is, a, 503), 10, "readyz to say 503")
            down = presence(a, "alice")
            assert down.status_code == 503
            assert "broker unavailable" in down.json()["message"]
            refused = batch(a, [{"message": "lost?", "user_ids": ["alice"]}])
            assert refused.status_code == 503
            assert "no notification of the batch was sent" in refused.json()["message"]
        a.assert_clean_log()


@pytest.mark.anyio
async def test_a_batch_whose_first_request_never_answered_is_replayed_as_a_whole_batch() -> None:
    # What a request that stored its batch and then lost its answer (a 504) leaves in Redis: the key's record
    # with the stored ids, older than the busy window. A retry under the key is told what was stored, item by
    # item, with the invalid item back in its place, and nothing is sent again.
    with cluster(nodes=1) as (redis, (a,)):
        async with listeners(a.listen_url("alice")) as (alice,):
            items: list[dict[str, Any]] = [
                {"message": "stored", "user_ids": ["alice"]}, {"message": ""}, {"message": "x", "user_ids": ["bob"]},
            ]  # fmt: skip
            body = orjson.dumps({"notifications": items})
            print_ = parse_batch(body, 1000, 65536, 262144).fingerprint.hex()
            old = f"{int(time.time() * 1000) - 60_000}-0"
            with Redis(port=redis.port, socket_timeout=5) as client:
                record = _hashed("idem", "lost-answer")
                client.hset(record, mapping={"r": "earlier", "fp": print_, "id": old, "ids": f"batch:{old},-"})
                client.pexpire(record, 60_000)
            retry = batch(a, items, **{"Idempotency-Key": "lost-answer"})
            assert retry.status_code == 200, retry.text
            assert retry.headers["idempotent-replayed"] == "true"
            doc = retry.json()
            assert [r["status"] for r in doc["results"]] == ["success", "error", "error"]
            assert doc["results"][0]["id"] == old
            assert doc["results"][0]["nodes_missing"] >= 1  # its counts were never gathered, and it says so
            assert [r["code"] for r in doc["results"][1:]] == [422, 404]
            assert doc["failed"] == 2
            with pytest.raises(TimeoutError):
                await next_frame(alice, 0.5)  # nothing sent again (a bounded wait for a negative)
        a.assert_clean_log()
