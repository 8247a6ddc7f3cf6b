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
from diary_ws.app import DiaryApp
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
async def test_a_bug_behind_the_notification_shortcut_still_answers_the_json_500() -> None:
    """The POST skips Starlette's error middleware (app.DiaryApp): the shortcut must answer as it would."""
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


POSTS: list[tuple[dict[str, str], bytes]] = [
    ({"content-type": "application/json"}, b'{"message": "to alice", "user_ids": ["alice"]}'),
    ({"content-type": "application/json"}, b'{"message": "to nobody", "user_ids": ["zed"]}'),
    ({"content-type": "application/json"}, b'{"message": "a typo", "usr_ids": ["alice"]}'),
    ({"content-type": "application/json"}, b'{"message": '),
    ({"content-type": "text/plain"}, b"hello"),
    ({"content-type": "application/json", "idempotency-key": "k" * 256}, b'{"message": "hi"}'),
    ({"content-type": "application/json"}, b'{"message": "' + b"x" * 300_000 + b'"}'),
]


@pytest.mark.anyio
async def test_the_notification_shortcut_answers_exactly_as_the_whole_stack() -> None:
    """One app takes the shortcut; the other has a host's middleware, so every POST goes through Starlette.

    The answers must be the same, byte for byte but the message id, and the host's middleware sees the POSTs.
    """
    seen: list[tuple[str, str]] = []
    plain, hosted = create_app(), create_app()
    hosted.add_middleware(Recorder, seen=seen)
    answers: list[list[tuple[int, dict[str, Any], str]]] = []
    for app in (plain, hosted):
        async with (
            serve_in_process(app) as base,
            httpx.AsyncClient(timeout=10) as http,
            connect(f"ws://{base}/api/v1/ws/alice") as ws,
        ):
            got = []
            for headers, body in POSTS:
                answer = await http.post(f"http://{base}/api/v1/ws/notification", content=body, headers=headers)
                doc = answer.json()
                doc.pop("id", None)
                kept = {k: v for k, v in answer.headers.items() if k not in ("date", "server")}
                got.append((answer.status_code, kept, orjson.dumps(doc).decode()))
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 5))["message"] == "to alice"
        answers.append(got)
    assert [status for status, _, _ in answers[0]] == [200, 404, 422, 400, 415, 400, 413]
    assert answers[0] == answers[1]
    assert seen.count(("POST", "/api/v1/ws/notification")) == len(POSTS)
    assert isinstance(plain, DiaryApp)
    assert isinstance(hosted, DiaryApp)
    assert plain._shortcuts is not None  # the shortcuts were on for the plain app, and off for the hosted one
    assert hosted._shortcuts is None


LISTENS = [
    ("alice", ""),  # accepted
    ("a%20b", ""),  # bad user id: 400
    ("", ""),  # empty user id: 400
    ("alice", "?since=abc"),  # bad since: 400
    ("alice", "?heartbeat=0"),  # bad heartbeat: 400
    ("alice", "?since=0-0"),  # accepted, with a resume frame
]


@pytest.mark.anyio
async def test_the_websocket_shortcut_refuses_and_accepts_exactly_as_the_whole_stack() -> None:
    """As for the POST: one app takes the WebSocket shortcut, the other goes through a host's middleware."""
    seen: list[tuple[str, str]] = []
    plain, hosted = create_app(), create_app()
    hosted.add_middleware(Recorder, seen=seen)
    outcomes: list[list[object]] = []
    for app in (plain, hosted):
        got: list[object] = []
        async with serve_in_process(app) as base, httpx.AsyncClient(timeout=10) as http:
            for user, query in LISTENS:
                try:
                    async with connect(f"ws://{base}/api/v1/ws/{user}{query}", open_timeout=5) as ws:
                        note = {"message": f"to {user}", "user_ids": [user]}
                        assert (await http.post(f"http://{base}/api/v1/ws/notification", json=note)).status_code == 200
                        frames = [
                            orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(1 + ("since" in query))
                        ]
                        got.append([{k: v for k, v in f.items() if k not in ("id", "sent_at")} for f in frames])
                except InvalidStatus as refused:
                    got.append((refused.response.status_code, orjson.loads(refused.response.body or b"{}")))
        outcomes.append(got)
    assert [type(o).__name__ for o in outcomes[0]] == ["list", "tuple", "tuple", "tuple", "tuple", "list"]
    assert outcomes[0] == outcomes[1]
    assert [p for m, p in seen if m == "WS"] == [f"/api/v1/ws/{unquote(user)}" for user, _ in LISTENS]
