"""Embedding: docs/embedding.md's host app, run as written by real uvicorn, and `Hub.notify` checked like a POST."""

from __future__ import annotations

import asyncio
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import diary_ws
from diary_ws.client import Client
from tests.docs import block
from tests.utils import (
    START_TIMEOUT,
    Server,
    async_wait_until,
    free_port,
    next_frame,
    run_server,
    serve_in_process,
    wait_until,
)

LIMIT = 20.0


class Host:
    """The docs' host app under the docs' own uvicorn command, on a free port."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log_path = proc, port, log
        self.http = f"http://127.0.0.1:{port}"
        self.base = f"{self.http}/notify"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    (tmp_path / "host.py").write_text(block("embedding-host"))
    command = next(line for line in block("embedding-run").splitlines() if line.startswith("uvicorn "))
    argv = shlex.split(command.split("#")[0].strip().removesuffix("&"))
    assert argv[:4] == ["uvicorn", "host:app", "--port", "8000"], argv
    port = free_port()
    log = tmp_path / "host.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "host:app", "--port", str(port), *argv[4:]],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    running = Host(proc, port, log)
    try:
        wait_until(lambda: _healthy(running), START_TIMEOUT, "the host app to answer /notify/healthz")
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=LIMIT)


def _healthy(host: Host) -> bool:
    if host.proc.poll() is not None:
        raise AssertionError(f"the host app exited with {host.proc.returncode}:\n{host.log()}")
    try:
        return httpx.get(f"{host.base}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=LIMIT) as http:
        return await http.request(method, url, **kwargs)


@pytest.mark.anyio
async def test_the_docs_host_app_serves_http_websocket_and_in_process_publish(host: Host) -> None:
    ready = await request("GET", f"{host.base}/readyz")
    assert ready.json() == {"status": "ready"}  # the host's lifespan started the mounted hub
    async with connect(f"ws://127.0.0.1:{host.port}/notify/api/v1/ws/alice") as ws:
        posted = await request("POST", f"{host.base}/api/v1/ws/notification", json={"message": "over HTTP"})
        assert posted.status_code == 200, posted.text
        assert (await next_frame(ws))["id"] == posted.json()["id"]
        status = await request("GET", f"{host.base}/api/v1/ws/status")
        assert status.json() == {"connected_users": 1, "status": "active", "active_user_ids": ["alice"],
                                 "total_connections": 1}  # fmt: skip

        done = await request("POST", f"{host.http}/tasks/alice/done")  # the host's route: hub.notify in-process
        assert done.json() == {"delivered": True, "id": done.json()["id"]}
        frame = await next_frame(ws)
        assert (frame["type"], frame["message"], frame["id"]) == ("task.completed", "Task done", done.json()["id"])
        assert frame["data"] == {"task": 42}
        assert (await request("POST", f"{host.http}/tasks/bob/done")).json() == {"delivered": False}
        bad = await request("POST", f"{host.http}/tasks/a%20b/done")
        assert bad.status_code == 422
        assert "user_ids[0]" in bad.json()["error"]

        # The client and the CLI find everything under the prefix.
        async with Client(host.base, "carol") as client:
            reader = asyncio.create_task(anext(client))
            await async_wait_until(lambda: client.connections == 1, LIMIT, "the client to connect")
            cli = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "diary_ws", "send", "via the CLI", "--user", "carol",
                                 "--url", host.base], capture_output=True, text=True, timeout=LIMIT,
            )  # fmt: skip
            assert cli.returncode == 0, cli.stderr
            assert (await asyncio.wait_for(reader, LIMIT))["id"] == orjson.loads(cli.stdout)["id"]

        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{host.port}/notify/api/v1/ws/a%20b")
        assert refused.value.response.status_code == 400
        with pytest.raises(InvalidStatus) as unknown:
            await connect(f"ws://127.0.0.1:{host.port}/notify/elsewhere")
        assert b"listen at /notify/api/v1/ws/{user_id}" in bytes(unknown.value.response.body or b"")
        missing = await request("GET", f"{host.base}/api/v1/ws/alice")
        assert missing.status_code == 404
        assert missing.json()["message"].endswith("WebSocket endpoints need a WebSocket client")

        host.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), LIMIT)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1012
    assert re.fullmatch(r"server restarting: reconnect with since after \d+ ms", closed.value.rcvd.reason)
    # uvicorn re-raises the signal it handled once it has shut down cleanly.
    assert await asyncio.to_thread(host.proc.wait, LIMIT) == -signal.SIGTERM
    log = host.log()
    assert "Application shutdown complete" in log  # the host's lifespan stopped the hub
    assert "Traceback" not in log
    assert "ERROR" not in log  # the docs' --ws option keeps refusals quiet


# --- Hub.notify: the POST's checks, for Python callers ---------------------------------------------------------


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"d": value}
    return value


BAD_INPUTS: list[tuple[dict[str, Any], str]] = [
    ({"message": "   "}, "message"),
    ({"message": 42}, "message"),
    ({"message": "x" * 11}, "message"),
    ({"message": "hi", "user_ids": []}, "user_ids"),
    ({"message": "hi", "user_ids": "alice"}, "user_ids"),  # a bare string, not a list
    ({"message": "hi", "user_ids": ["alice", "a b"]}, "user_ids[1]"),
    ({"message": "hi", "type": "resume"}, "type"),
    ({"message": "hi", "type": "Bad Type"}, "type"),
    ({"message": "hi", "data": [1, 2]}, "data"),
    ({"message": "hi", "data": nested(70)}, "data"),  # past the 64 levels a body may nest
]


@pytest.fixture(scope="module")
def small_server() -> Iterator[Server]:
    with run_server({"max_message_chars": "10"}) as srv:
        yield srv
        srv.assert_clean_log()


@pytest.mark.anyio
@pytest.mark.parametrize(("fields", "field"), BAD_INPUTS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_INPUTS)])
async def test_notify_refuses_what_the_post_refuses_with_the_same_message(
    small_server: Server, fields: dict[str, Any], field: str
) -> None:
    app = diary_ws.create_app(diary_ws.Settings(max_message_chars=10))
    async with diary_ws.lifespan(app), connect(small_server.listen_url("alice")):
        with pytest.raises(diary_ws.ValidationError) as refused:
            await app.state.hub.notify(**fields)
        posted = await asyncio.to_thread(small_server.post, fields)
    assert refused.value.field == field
    assert posted.status_code == 422
    assert posted.json()["message"] == refused.value.message


@pytest.mark.anyio
async def test_notify_refuses_a_message_utf8_cannot_carry() -> None:
    """A lone surrogate is a Python str but not text a frame can carry: it was a TypeError from deep inside
    the publish, not the ValidationError the docs promise (a POST body cannot hold one: orjson refuses it)."""
    app = diary_ws.create_app()
    async with serve_in_process(app) as where, connect(f"ws://{where}/api/v1/ws/sue") as ws:
        await async_wait_until(lambda: len(list(app.state.hub.connections())) == 1, 5, "the listener")
        for message in ("\ud800", "half a pair \udfff"):
            with pytest.raises(diary_ws.ValidationError) as refused:
                await app.state.hub.notify(message, user_ids=["sue"])
            assert refused.value.field == "message"
        result = await app.state.hub.notify("fine", user_ids=["sue"])
        frame = await next_frame(ws)
        assert (frame["message"], frame["id"]) == ("fine", str(result.id))


@pytest.mark.anyio
async def test_notify_refuses_data_json_cannot_carry() -> None:
    app = diary_ws.create_app()
    async with diary_ws.lifespan(app):
        with pytest.raises(diary_ws.ValidationError, match="data: must be JSON-serialisable"):
            await app.state.hub.notify("hi", data={"tags": {"a", "b"}})
        # orjson would write these as null: the listener would get a value nobody sent.
        for odd in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(diary_ws.ValidationError, match="data: must not hold NaN or Infinity"):
                await app.state.hub.notify("hi", data={"deep": [{"x": odd}]})
        with pytest.raises(diary_ws.NobodyListening):  # valid, but nobody is connected: nothing stored
            await app.state.hub.notify("hi", user_ids=("alice", "bob"), type="x.y", data={"n": 1})
