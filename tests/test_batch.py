"""POST /api/v1/ws/notifications (a batch) over a real server and real listeners, in memory mode."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.utils import Server, run_server

BATCH = "/api/v1/ws/notifications"
LIMIT = 10.0


def post_batch(server: Server, body: Any, **headers: str) -> httpx.Response:
    """POST a batch; a dict or list is sent as JSON, bytes as they are."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Content-Type": "application/json", **headers}
    return httpx.post(f"{server.http}{BATCH}", content=content, headers=sent, timeout=LIMIT)


def frames(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [orjson.loads(ws.recv(timeout=LIMIT)) for _ in range(n)]


@pytest.fixture(scope="module")
def batch_server() -> Iterator[Server]:
    with run_server({"max_batch": "6", "max_batch_bytes": "4KiB", "max_body_bytes": "1KiB"}) as srv:
        yield srv
        srv.assert_clean_log()


def test_each_item_is_published_in_order_on_its_own(batch_server: Server) -> None:
    with connect(batch_server.listen_url("alice")) as alice, connect(batch_server.listen_url("bob")) as bob:
        answer = post_batch(
            batch_server,
            {"notifications": [
                {"message": "one", "user_ids": ["alice"]},
                {"message": "nobody", "user_ids": ["carol"]},
                {"message": "   "},
                "not an object",
                {"message": "two", "type": "task.done", "data": {"n": 2}},
                {"message": "typo", "user_id": ["alice"]},
            ],
        })  # fmt: skip
        assert answer.status_code == 200, answer.text
        doc = answer.json()
        assert doc["status"] == "success"
        assert doc["failed"] == 4
        results = doc["results"]
        assert [r["status"] for r in results] == ["success", "error", "error", "error", "success", "error"]
        assert results[0]["message"] == "Notification sent to 1 user"
        assert results[0]["sent_count"] == 1
        assert results[1] == {"status": "error", "code": 404, "message": results[1]["message"]}
        assert "none of the given user_ids is connected" in results[1]["message"]
        assert results[2]["code"] == 422
        assert "message: must not be blank" in results[2]["message"]
        assert results[3]["code"] == 422
        assert "must be a JSON object, not a string" in results[3]["message"]
        assert results[4]["sent_count"] == 2  # a broadcast: both listeners
        assert results[5]["code"] == 422
        assert "user_id: is not a known field" in results[5]["message"]
        got = frames(alice, 2)
        assert [f["message"] for f in got] == ["one", "two"]
        assert [f["id"] for f in got] == [results[0]["id"], results[4]["id"]]
        assert got[1]["data"] == {"n": 2}
        assert got[1]["type"] == "task.done"
        assert frames(bob, 1)[0]["id"] == results[4]["id"]


def test_a_batch_where_every_item_fails_is_still_a_200(batch_server: Server) -> None:
    answer = post_batch(batch_server, {"notifications": [{"message": "x", "user_ids": ["ghost"]}, {"message": 1}]})
    assert answer.status_code == 200
    assert answer.json()["failed"] == 2
    assert [r["code"] for r in answer.json()["results"]] == [404, 422]


def test_an_item_is_held_to_the_single_posts_size_limit(batch_server: Server) -> None:
    # MAX_BODY_BYTES is 1 KiB here: a batch must not carry an item a single POST could not.
    with connect(batch_server.listen_url("dave")):
        big = {"message": "x" * 2000, "user_ids": ["dave"]}
        answer = post_batch(batch_server, {"notifications": [big, {"message": "ok", "user_ids": ["dave"]}]})
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert results[0]["code"] == 422
    assert "MAX_BODY_BYTES" in results[0]["message"]
    assert results[1]["status"] == "success"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"", 400, "body is empty"),
        (b"{", 400, "not valid JSON"),
        (b'{"notifications": [\xff]}', 400, "UTF-8"),
        (b"[]", 422, "body: must be a JSON object, not an array"),
        (b"{}", 422, "notifications: is required"),
        (b'{"notifications": {"message": "x"}}', 422, "must be a list of notifications, not an object"),
        (b'{"notifications": []}', 422, "must hold at least one notification"),
        (b'{"notifications": [{"message": "x"}], "extra": 1}', 422, "extra: is not a known field"),
        (orjson.dumps({"notifications": [{"message": "x"}] * 7}), 422, "at most 6 items (MAX_BATCH); got 7"),
        (orjson.dumps({"notifications": [{"message": "x" * 900}] * 5}), 413, "MAX_BATCH_BYTES"),
    ],
    ids=["empty", "broken", "utf8", "array", "no-list", "object", "empty-list", "unknown", "too-many", "too-big"],
)
def test_a_bad_envelope_fails_the_whole_request(batch_server: Server, body: bytes, status: int, needle: str) -> None:
    with connect(batch_server.listen_url("erin")) as erin:
        answer = post_batch(batch_server, body)
        assert answer.status_code == status, answer.text
        assert answer.json()["status"] == "error"
        assert needle in answer.json()["message"]
        with pytest.raises(TimeoutError):
            erin.recv(timeout=0.2)  # nothing of a refused batch went out (a bounded wait for a negative)


def test_a_body_over_the_limit_without_content_length_is_cut_off(batch_server: Server) -> None:
    # Chunked: no Content-Length to refuse up front; the reader stops at MAX_BATCH_BYTES, not at the end.
    with socket.create_connection(("127.0.0.1", batch_server.port), timeout=LIMIT) as sock:
        head = (
            f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = b" " * 4096
        for _ in range(3):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"MAX_BATCH_BYTES" in answer


def test_content_type_is_checked(batch_server: Server) -> None:
    answer = httpx.post(f"{batch_server.http}{BATCH}", content=b'{"notifications": [{"message": "x"}]}', timeout=LIMIT)
    assert answer.status_code == 415


def test_one_idempotency_key_covers_the_batch() -> None:
    with run_server() as srv, connect(srv.listen_url("alice")) as alice:
        body = {"notifications": [{"message": "a", "user_ids": ["alice"]}, {"message": "b", "user_ids": ["nobody"]}]}
        first = post_batch(srv, body, **{"Idempotency-Key": "batch-1"})
        assert first.status_code == 200
        assert "idempotent-replayed" not in first.headers
        again = post_batch(srv, body, **{"Idempotency-Key": "batch-1"})
        assert again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content  # the whole answer, the per-item 404 included
        assert [f["message"] for f in frames(alice, 1)] == ["a"]
        with pytest.raises(TimeoutError):
            alice.recv(timeout=0.3)  # delivered once (a bounded wait for a negative)
        other = post_batch(srv, {"notifications": [{"message": "c"}]}, **{"Idempotency-Key": "batch-1"})
        assert other.status_code == 422
        assert "Idempotency-Key" in other.json()["message"]
        # A single POST under a batch's key is another request, not a replay.
        single = srv.post({"message": "a", "user_ids": ["alice"]}, headers={"Idempotency-Key": "batch-1"})
        assert single.status_code == 422
        srv.assert_clean_log()


def test_rate_limits_count_items_and_a_batch_over_the_burst_is_a_422() -> None:
    with run_server({"rate_limit": "10/m:10"}) as srv, connect(srv.listen_url("alice")):
        six = {"notifications": [{"message": f"m{i}", "user_ids": ["alice"]} for i in range(6)]}
        first = post_batch(srv, six)
        assert first.status_code == 200
        assert first.headers["ratelimit-remaining"] == "4"
        second = post_batch(srv, six)
        assert second.status_code == 429
        assert int(second.headers["retry-after"]) >= 1
        assert "too many notifications" in second.json()["message"]
        four = post_batch(srv, {"notifications": six["notifications"][:4]})
        assert four.status_code == 200  # the refused batch took nothing: all or none
        eleven = post_batch(srv, {"notifications": [{"message": "x"}] * 11})
        assert eleven.status_code == 422
        assert "bursts of up to 10" in eleven.json()["message"]
        srv.assert_clean_log()


def test_the_api_key_is_required_when_keys_are_set() -> None:
    with run_server({"api_key": "batch-key-0123456789"}) as srv:
        body = {"notifications": [{"message": "x"}]}
        assert post_batch(srv, body).status_code == 401
        assert post_batch(srv, body, Authorization="Bearer wrong").status_code == 401
        answer = post_batch(srv, body, Authorization="Bearer batch-key-0123456789")
        assert answer.status_code == 200
        assert answer.json()["results"][0]["code"] == 404  # past the key: nobody listens
        srv.assert_clean_log()
