"""GET /api/v1/ws/users/{user_id}: presence over a real server, with real sockets and SSE streams."""

from __future__ import annotations

import httpx
import pytest
from websockets.sync.client import connect

from tests.utils import Server, run_server, wait_until

LIMIT = 10.0


def presence(server: Server, user_id: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{server.http}/api/v1/ws/users/{user_id}", headers=headers, timeout=LIMIT)


def test_connected_or_not_is_a_200_with_the_count(server: Server) -> None:
    assert presence(server, "alice").json() == {"user_id": "alice", "connected": False, "connections": 0}
    with connect(server.listen_url("alice")), connect(server.listen_url("alice")):
        with httpx.stream("GET", f"{server.http}/api/v1/sse/alice", timeout=LIMIT) as stream:
            assert stream.status_code == 200
            answer = presence(server, "alice")
            assert answer.status_code == 200
            assert answer.json() == {"user_id": "alice", "connected": True, "connections": 3}  # SSE counts too
        wait_until(lambda: presence(server, "alice").json()["connections"] == 2, LIMIT, "the stream to leave")
        assert presence(server, "bob").json()["connected"] is False
    wait_until(lambda: not presence(server, "alice").json()["connected"], LIMIT, "the sockets to leave")


def test_get_on_the_connections_path_stays_a_405(shared_server: Server) -> None:
    # The presence route's convertor takes anything else, slashes included, so that a bad id gets its 400.
    for path in ("alice/connections", "a/b/connections", "a%2Fconnections"):  # the path is matched decoded
        answer = httpx.get(f"{shared_server.http}/api/v1/ws/users/{path}", timeout=LIMIT)
        assert answer.status_code == 405, path
        assert answer.headers["allow"] == "DELETE"
        assert answer.json()["status"] == "error"


@pytest.mark.parametrize("user_id", ["a%20b", "a/b", "", "%0A", "%2E", "%2E%2E", "x" * 129, "a%00"])
def test_a_bad_user_id_is_a_400(shared_server: Server, user_id: str) -> None:
    answer = presence(shared_server, user_id)
    assert answer.status_code == 400, answer.text
    assert "is not valid" in answer.json()["message"]


def test_the_api_key_is_required_when_keys_are_set() -> None:
    with run_server({"api_key": "presence-key-0123456789"}) as srv:
        assert presence(srv, "alice").status_code == 401
        assert presence(srv, "alice", Authorization="Bearer nope").status_code == 401
        assert presence(srv, "alice", **{"X-API-Key": "presence-key-0123456789"}).json()["connected"] is False
        srv.assert_clean_log()
