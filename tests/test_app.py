"""`create_app` keeps all state on the app: two apps in one process share no listeners and no history."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from diary_ws import Settings, create_app
from diary_ws.app import Front
from tests.utils import serve_in_process


@pytest.mark.anyio
async def test_two_apps_in_one_process_are_independent() -> None:
    first, second = create_app(Settings()), create_app(Settings(max_connections_per_user=1))
    assert first.state.hub is not second.state.hub
    async with (
        serve_in_process(first) as one,
        serve_in_process(second) as two,
        httpx.AsyncClient(timeout=10) as http,
        connect(f"ws://{one}/api/v1/ws/alice") as ws,
    ):
        assert (await http.get(f"http://{one}/api/v1/ws/status")).json()["active_user_ids"] == ["alice"]
        assert (await http.get(f"http://{two}/api/v1/ws/status")).json()["active_user_ids"] == []
        assert (await http.post(f"http://{two}/api/v1/ws/notification", json={"message": "hi"})).status_code == 404
        assert (await http.post(f"http://{one}/api/v1/ws/notification", json={"message": "hi"})).status_code == 200
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["message"] == "hi"


@pytest.mark.anyio
async def test_readyz_follows_the_lifespan() -> None:
    app = create_app()
    assert not app.state.hub.ready()  # nothing started yet
    async with serve_in_process(app) as base, httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"http://{base}/readyz")).json() == {"status": "ready"}
        assert (await http.get(f"http://{base}/healthz")).json() == {"status": "ok"}
    assert not app.state.hub.ready()  # the lifespan's shutdown stopped the hub


@pytest.mark.anyio
async def test_json_logs_are_one_object_a_line() -> None:
    from tests.utils import run_server

    with run_server({"log_format": "json"}) as srv:
        async with connect(srv.listen_url("alice")) as ws:
            assert srv.post({"message": "logged", "user_ids": ["alice"]}).status_code == 200
            await asyncio.wait_for(ws.recv(), 5)
        srv.terminate()
        lines = [orjson.loads(line) for line in srv.log().splitlines() if line.strip()]
    assert lines
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in lines)
    published = [e for e in lines if e["logger"] == "diary_ws.hub" and e["message"].startswith("published ")]
    assert len(published) == 1
    assert "to 1 of 1 sockets, 0 dropped" in published[0]["message"]


@pytest.mark.anyio
async def test_root_path_is_honoured_behind_a_prefix_stripping_proxy() -> None:
    """With ROOT_PATH=/push the proxy strips /push and the app still routes, HTTP and WebSocket alike."""
    from tests.utils import run_server

    with run_server({"root_path": "/push"}) as srv:
        assert srv.status()["status"] == "active"
        async with connect(srv.listen_url("alice")) as ws:
            assert srv.post({"message": "prefixed"}).status_code == 200
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["message"] == "prefixed"
        srv.assert_clean_log()


@pytest.mark.anyio
async def test_an_unexpected_error_still_answers_the_json_error_shape() -> None:
    app = create_app()

    async def boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    app.add_route("/boom", boom)  # a stand-in for a bug of ours: no real endpoint raises on purpose
    async with serve_in_process(app) as base, httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"http://{base}/boom")
    assert answer.status_code == 500
    assert answer.json()["status"] == "error"
    assert "internal server error" in answer.json()["message"]


@pytest.mark.anyio
async def test_a_bug_in_a_raw_asgi_endpoint_answers_the_json_500_and_is_counted() -> None:
    """The POST's endpoint is raw ASGI: a bug that escapes it is answered by `app.Front`, as any endpoint's."""
    app = create_app()

    async def boom(note: object) -> None:
        raise RuntimeError("a bug")

    app.state.hub.publish = boom  # a stand-in for a bug of ours: no real publish raises this
    async with serve_in_process(app) as base, httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(f"http://{base}/api/v1/ws/notification", json={"message": "hi"})
        exposition = (await http.get(f"http://{base}/metrics")).text
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"status": "error", "message": "internal server error; the server log has the details"}
    assert 'method="POST",route="/api/v1/ws/notification",status="500"' in exposition


class Recorder:
    """A host's own middleware: it records what it sees and passes everything on."""

    def __init__(self, app: ASGIApp, seen: list[tuple[str, str]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            self.seen.append((scope.get("method", "WS"), scope["path"]))
        await self.app(scope, receive, send)


POSTS: list[tuple[dict[str, str], bytes, int, str]] = [
    ({"content-type": "application/json"}, b'{"message": "to alice", "user_ids": ["alice"]}', 200, "Notification sent"),
    ({"content-type": "application/json"}, b'{"message": "to nobody", "user_ids": ["zed"]}', 404, "No active conn"),
    ({"content-type": "application/json"}, b'{"message": "a typo", "usr_ids": ["alice"]}', 422, "usr_ids"),
    ({"content-type": "application/json"}, b'{"message": ', 400, "JSON"),
    ({"content-type": "text/plain"}, b"hello", 415, "Content-Type"),
    ({"content-type": "application/json", "idempotency-key": "k" * 256}, b'{"message": "hi"}', 400, "Idempotency"),
    ({"content-type": "application/json"}, b'{"message": "' + b"x" * 300_000 + b'"}', 413, "MAX_BODY_BYTES"),
]


@pytest.mark.anyio
async def test_every_post_takes_the_one_path_through_a_hosts_middleware() -> None:
    """A host's middleware sees every POST; each is answered and counted by its route, whatever its outcome."""
    seen: list[tuple[str, str]] = []
    app = create_app()
    app.add_middleware(Recorder, seen=seen)
    async with (
        serve_in_process(app) as base,
        httpx.AsyncClient(timeout=10) as http,
        connect(f"ws://{base}/api/v1/ws/alice") as ws,
    ):
        for headers, body, status, words in POSTS:
            answer = await http.post(f"http://{base}/api/v1/ws/notification", content=body, headers=headers)
            assert (answer.status_code, answer.headers["content-type"]) == (status, "application/json"), body[:40]
            assert words.lower() in answer.json()["message"].lower(), answer.json()
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["message"] == "to alice"
        exposition = (await http.get(f"http://{base}/metrics")).text
    assert seen.count(("POST", "/api/v1/ws/notification")) == len(POSTS)
    for status in {s for _, _, s, _ in POSTS}:
        assert f'method="POST",route="/api/v1/ws/notification",status="{status}"' in exposition


@pytest.mark.anyio
async def test_the_routers_404_and_405_are_json_and_counted_as_such() -> None:
    app = create_app()
    async with serve_in_process(app) as base, httpx.AsyncClient(timeout=10) as http:
        missing = await http.get(f"http://{base}/api/v1/ws/alice")
        wrong = await http.get(f"http://{base}/api/v1/ws/notification")
        exposition = (await http.get(f"http://{base}/metrics")).text
    assert missing.status_code == 404
    assert missing.json() == {
        "status": "error",
        "message": "no route for GET /api/v1/ws/alice: WebSocket endpoints need a WebSocket client",
    }
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["message"] == "GET /api/v1/ws/notification is not allowed; use POST"
    assert 'method="GET",route="unmatched",status="404"' in exposition
    assert 'method="GET",route="/api/v1/ws/notification",status="405"' in exposition


LISTENS = [
    ("alice", "", None),  # accepted
    ("a%20b", "", 400),  # bad user id
    ("", "", 400),  # empty user id
    ("alice", "?since=abc", 400),  # bad since
    ("alice", "?heartbeat=0", 400),  # bad heartbeat
    ("alice", "?since=0-0", None),  # accepted, with a resume frame
]


@pytest.mark.anyio
async def test_every_websocket_takes_the_one_path_through_a_hosts_middleware() -> None:
    """A host's middleware sees every handshake; refusals are JSON, accepted sockets get their frames."""
    seen: list[tuple[str, str]] = []
    app = create_app()
    app.add_middleware(Recorder, seen=seen)
    async with serve_in_process(app) as base, httpx.AsyncClient(timeout=10) as http:
        for user, query, refused_with in LISTENS:
            outcome = await listen_once(base, http, user, query)
            if refused_with is None:
                assert isinstance(outcome, list)
                assert any(f.get("message") == f"to {user}" for f in outcome), outcome
                assert any(f["type"] == "resume" for f in outcome) == ("since" in query)
            else:
                assert outcome == refused_with
    assert [p for m, p in seen if m == "WS"] == [f"/api/v1/ws/{unquote(user)}" for user, _, _ in LISTENS]


async def listen_once(base: str, http: httpx.AsyncClient, user: str, query: str) -> list[dict[str, Any]] | int:
    """The frames a socket gets for one notification to it, or the status of its JSON refusal."""
    try:
        async with connect(f"ws://{base}/api/v1/ws/{user}{query}", open_timeout=5) as ws:
            note = {"message": f"to {user}", "user_ids": [user]}
            assert (await http.post(f"http://{base}/api/v1/ws/notification", json=note)).status_code == 200
            return [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(1 + ("since" in query))]
    except InvalidStatus as refused:
        response = refused.response
    assert orjson.loads(response.body or b"{}")["status"] == "error"
    return response.status_code


def test_the_app_has_one_layer_of_its_own_above_the_router() -> None:
    app = create_app()
    stack = app.build_middleware_stack()
    assert isinstance(stack, Front)
    assert stack.app == app.router.app  # the router's own stack, which has no middleware
