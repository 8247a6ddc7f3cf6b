"""`create_app` keeps all state on the app: two apps in one process share no listeners and no history."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import Response
from websockets.asyncio.client import connect

from diary_ws import Settings, create_app
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
