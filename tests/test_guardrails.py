"""The two embedding traps, refused out loud: a host that never started the hub, and several worker processes
sharing an in-memory app. Real uvicorn, real clients; the worker case with `uvicorn --workers 2` itself."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import diary_ws
from diary_ws import sharing
from tests.utils import START_TIMEOUT, free_port, redis_server, wait_until

LIMIT = 20.0
LIFESPAN_HINT = "diary_ws.lifespan("

FORGETFUL_HOST = """
from starlette.applications import Starlette
from starlette.routing import Mount

import diary_ws

notify_app = diary_ws.create_app()
app = Starlette(routes=[Mount("/notify", app=notify_app)])  # no lifespan: the hub is never started
"""

FACTORY = """
import os

import diary_ws


def make_app():
    return diary_ws.create_app(diary_ws.Settings(broker_url=os.environ.get("BROKER", "memory://")))
"""


def uvicorn(
    tmp: Path, module: str, source: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    (tmp / f"{module}.py").write_text(source)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", *args], cwd=tmp, env={**clean, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def stop(proc: Popen[str]) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=LIMIT)
    return output


def answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return True


# --- a host that forgot diary_ws.lifespan() ----------------------------------------------------------------------


@pytest.fixture
def forgetful(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = uvicorn(tmp_path, "host", FORGETFUL_HOST, "host:app", "--port", str(port))
    base = f"127.0.0.1:{port}/notify"
    try:
        wait_until(lambda: answers(f"http://{base}/healthz") or proc.poll() is not None, START_TIMEOUT, "the host")
        assert proc.poll() is None, stop(proc)
        yield base
    finally:
        output = stop(proc)
        assert "Traceback" not in output, output


def test_a_websocket_is_refused_before_the_hub_starts(forgetful: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://{forgetful}/api/v1/ws/alice", open_timeout=LIMIT)
    assert refused.value.response.status_code == 503
    assert LIFESPAN_HINT in (refused.value.response.body or b"").decode()


def test_sse_and_publishes_are_refused_before_the_hub_starts(forgetful: str) -> None:
    http = f"http://{forgetful}"
    with httpx.Client(timeout=LIMIT) as client:
        stream = client.get(f"{http}/api/v1/sse/alice")
        post = client.post(f"{http}/api/v1/ws/notification", json={"message": "hello"})
        targeted = client.post(f"{http}/api/v1/ws/notification", json={"message": "hi", "user_ids": ["alice"]})
        kick = client.delete(f"{http}/api/v1/ws/users/alice/connections")
        batch = client.post(f"{http}/api/v1/ws/notifications", json={"notifications": [{"message": "hello"}]})
        presence = client.get(f"{http}/api/v1/ws/users/alice")
        ready = client.get(f"{http}/readyz")
        alive = client.get(f"{http}/healthz")
    for refused in (stream, post, targeted, kick, batch, presence):
        assert refused.status_code == 503, refused.text
        assert refused.json()["status"] == "error"
        assert LIFESPAN_HINT in refused.json()["message"]
    assert stream.headers["content-type"].startswith("application/json")
    assert ready.status_code == 503
    assert alive.status_code == 200


@pytest.mark.anyio
async def test_notify_raises_before_the_hub_starts_and_works_after() -> None:
    app = diary_ws.create_app()
    hub = app.state.hub
    with pytest.raises(diary_ws.NotStarted, match=re.escape(LIFESPAN_HINT)) as refused:
        await hub.notify("hello")
    assert refused.value.status_code == 503
    assert isinstance(refused.value, diary_ws.DiaryWSError)
    async with diary_ws.lifespan(app):
        with pytest.raises(diary_ws.NobodyListening):  # started: the ordinary answer again
            await hub.notify("hello")


# --- several processes on one in-memory app ----------------------------------------------------------------------


@pytest.mark.slow
def test_uvicorn_workers_on_memory_are_refused_at_start(tmp_path: Path) -> None:
    port = free_port()
    proc = uvicorn(tmp_path, "factory", FACTORY, "factory:make_app", "--factory", "--workers", "2", "--port", str(port))
    try:
        proc.wait(timeout=60)  # the second worker's refusal stops uvicorn's supervisor, and with it the first
    finally:
        output = stop(proc)
    assert "BROKER_URL" in output, output
    assert "memory:// cannot be shared by several processes" in output
    assert f"another process already serves 127.0.0.1:{port}" in output
    assert not answers(f"http://127.0.0.1:{port}/healthz")  # nobody is left half-serving


@pytest.mark.slow
def test_uvicorn_workers_on_redis_are_fine(tmp_path: Path) -> None:
    with redis_server() as redis:
        port = free_port()
        proc = uvicorn(
            tmp_path, "factory", FACTORY, "factory:make_app", "--factory", "--workers", "2", "--port", str(port),
            env={"BROKER": redis.url},
        )  # fmt: skip
        try:
            wait_until(lambda: _ready(port) or proc.poll() is not None, 60, "two workers on Redis")
            assert proc.poll() is None
        finally:
            output = stop(proc)
    assert len(set(re.findall(r"Started server process \[(\d+)\]", output))) == 2, output
    assert "cannot be shared" not in output


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_one_worker_with_reload_style_parent_is_fine() -> None:
    """A parent that binds and hands the socket to ONE child (uvicorn --reload) holds no claim: no refusal."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
        assert address in sharing.listening_addresses()
        with sharing.one_process(), sharing.one_process():  # two apps of one process on the same socket
            child = subprocess.run(
                [sys.executable, "-c", f"from diary_ws import sharing\nwith sharing.one_process([{address!r}]): pass"],
                capture_output=True, text=True, timeout=LIMIT,
            )  # fmt: skip
            assert child.returncode != 0  # another process: refused
            assert "BROKER_URL" in child.stderr
        after = subprocess.run(
            [sys.executable, "-c", f"from diary_ws import sharing\nwith sharing.one_process([{address!r}]): pass"],
            capture_output=True, text=True, timeout=LIMIT,
        )  # fmt: skip
        assert after.returncode == 0, after.stderr  # released when the last app of this process let go
