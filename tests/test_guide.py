"""The integration guide's own examples, run unchanged against a real server.

docs/websocket-integration-guide.md is a contract: its Python clients, its curl sequence and the JSON shapes it
shows must work as written, with only the host and port changed. docs/api.md extends the shapes (`id`, `sent_at`,
`data`, `total_connections`, `?limit=`); these tests hold the server to both.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, Protocol

import anyio
import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.docs import GUIDE
from tests.guide_client import DiaryWebSocketClient
from tests.utils import ROOT, Server, async_wait_until, next_frame

WAIT = 5.0  # seconds any single step may take
ID_RE = re.compile(r"^\d+-\d+$")
RFC3339_UTC_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
GUIDE_ANSWER_KEYS = {"status", "message", "sent_count", "total_connections", "disconnected_users"}
STATUS_KEYS = {"connected_users", "status", "active_user_ids", "total_connections"}
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed: the guide's curl sequence cannot run")


class GuideClient(Protocol):
    """The typed face of the guide's `DiaryWebSocketClient` (tests/guide_client.py is the guide's untyped code)."""

    def on_message(self, message_type: str, handler: Callable[[dict[str, Any]], None]) -> None: ...
    async def connect(self) -> None: ...
    async def disconnect(self) -> None: ...
    async def listen(self) -> None: ...
    async def run(self, duration: int = 30) -> None: ...


def guide_client(user_id: str, base_url: str) -> GuideClient:
    client: GuideClient = DiaryWebSocketClient(user_id, base_url)
    return client


def guide_blocks(language: str) -> list[str]:
    """The guide's fenced blocks in one language, from the copy the repository ships."""
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.S)


def users_sentence(users: int) -> str:
    """The guide's sentence: singular for one user, `N users` otherwise."""
    return f"Notification sent to {users} user" + ("" if users == 1 else "s")


async def post(server: Server, body: dict[str, Any]) -> httpx.Response:
    """`Server.post` off the event loop, so the test's own sockets keep being served meanwhile."""
    return await anyio.to_thread.run_sync(functools.partial(server.post, body))


async def status(server: Server, query: str = "") -> dict[str, Any]:
    response = await anyio.to_thread.run_sync(functools.partial(server.get, "/api/v1/ws/status" + query))
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def wait_for_sockets(server: Server, count: int) -> dict[str, Any]:
    """Poll the status until exactly `count` sockets are connected; return that status."""

    async def check() -> dict[str, Any] | None:
        answer = await status(server)
        return answer if answer.get("total_connections") == count else None

    result: dict[str, Any] = await async_wait_until(check, WAIT, f"{count} sockets in the status")
    return result


@asynccontextmanager
async def listeners(server: Server, user_ids: list[str]) -> AsyncIterator[list[ClientConnection]]:
    """One guide-style receive-only socket per entry of `user_ids` (repeats give a user several sockets)."""
    async with AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(websockets.connect(server.listen_url(uid))) for uid in user_ids]
        await wait_for_sockets(server, len(user_ids))
        yield sockets


def assert_success(answer: httpx.Response, *, users: int, sockets: int) -> dict[str, Any]:
    """The guide's 200 answer to the letter, plus `id`."""
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert set(body) == GUIDE_ANSWER_KEYS | {"id"}, body
    assert body["status"] == "success"
    assert body["message"] == users_sentence(users)
    assert (body["sent_count"], body["total_connections"], body["disconnected_users"]) == (sockets, sockets, 0)
    assert isinstance(body["id"], str)
    assert ID_RE.match(body["id"]), body["id"]
    return body


def id_pair(message_id: str) -> tuple[int, int]:
    ms, seq = message_id.split("-")
    return int(ms), int(seq)


# --- the guide's Python clients ---------------------------------------------------------------------------


def test_guide_client_is_the_guides_code_verbatim() -> None:
    """tests/guide_client.py holds the guide's "Python Client Example" unchanged (below its comment header)."""
    [block] = [b for b in guide_blocks("python") if "class DiaryWebSocketClient" in b]
    copy = (ROOT / "tests" / "guide_client.py").read_text()
    assert copy.endswith(block)
    header = copy[: -len(block)]
    assert all(line.startswith("#") for line in header.splitlines() if line), header


@pytest.mark.anyio
async def test_guide_python_client_receives_notification(server: Server) -> None:
    """The guide's DiaryWebSocketClient: on_message("notification", ...) + listen() gets the POSTed message."""
    client = guide_client("123456789", server.ws)
    received: list[dict[str, Any]] = []
    client.on_message("notification", received.append)
    await client.connect()
    listening = asyncio.create_task(client.listen())
    try:
        await wait_for_sockets(server, 1)
        answer = assert_success(
            await post(server, {"message": "Server maintenance scheduled for tomorrow"}), users=1, sockets=1
        )
        await async_wait_until(lambda: received, WAIT, "the guide client's notification handler to run")
    finally:
        await client.disconnect()
        with anyio.fail_after(WAIT):
            await listening  # the guide's `async for` ends cleanly when the client closes
    [message] = received
    assert isinstance(message, dict)
    assert message["type"] == "notification"
    assert message["message"] == "Server maintenance scheduled for tomorrow"
    assert message["id"] == answer["id"]
    await wait_for_sockets(server, 0)


@pytest.mark.anyio
async def test_guide_python_client_run_as_in_its_usage_example(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    """The guide's usage: on_message + run(duration); a handler that disconnects ends run() without an error."""
    client = guide_client("123456789", server.ws)
    closing: list[asyncio.Task[None]] = []

    def on_notification(message: dict[str, Any]) -> None:
        print(f"Notification: {message['message']}")  # the guide's handler
        closing.append(asyncio.get_running_loop().create_task(client.disconnect()))

    client.on_message("notification", on_notification)
    running = asyncio.create_task(client.run(30))
    await wait_for_sockets(server, 1)
    assert_success(await post(server, {"message": "Goal progress: 3 of 5"}), users=1, sockets=1)
    with anyio.fail_after(WAIT):
        await running
    assert len(closing) == 1
    out = capsys.readouterr().out
    assert "Connected to WebSocket for user 123456789 (receive-only mode)" in out
    assert "Notification: Goal progress: 3 of 5" in out
    assert "Error:" not in out
    assert "Connection timeout" not in out
    assert "Received message:" not in out  # no frame of a type the guide's client does not know


@pytest.mark.anyio
async def test_guide_first_python_snippet(server: Server) -> None:
    """The guide's first snippet: `async with websockets.connect(uri)` then `async for message in websocket`."""
    received: list[dict[str, Any]] = []

    async def connect_websocket(user_id: str) -> None:
        uri = server.listen_url(user_id)  # the guide's f"ws://localhost:8000/api/v1/ws/{user_id}"
        async with websockets.connect(uri) as websocket:
            async for message in websocket:
                response = json.loads(message)
                received.append(response)
                break  # the guide listens forever; one message is enough here

    task = asyncio.create_task(connect_websocket("123456789"))
    await wait_for_sockets(server, 1)
    answer = assert_success(await post(server, {"message": "Test notification"}), users=1, sockets=1)
    with anyio.fail_after(WAIT):
        await task
    [response] = received
    assert response["message"] == "Test notification"
    assert response["type"] == "notification"
    assert response["id"] == answer["id"]


# --- the guide's curl sequence ----------------------------------------------------------------------------


async def curl(*args: str) -> tuple[int, dict[str, Any]]:
    """Run the real curl; return the HTTP status and the JSON body."""
    assert CURL is not None
    command = [CURL, "--silent", "--show-error", "--max-time", "10", "--write-out", "\n%{http_code}", *args]
    with anyio.fail_after(15):
        done = await anyio.run_process(command, check=False)
    assert done.returncode == 0, done.stderr.decode()
    body, _, code = done.stdout.decode().rpartition("\n")
    answer: dict[str, Any] = json.loads(body)
    return int(code), answer


@needs_curl
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("user_ids", "users"),
    [
        pytest.param(["123456789"], 1, id="1-user"),
        pytest.param(["123456789", "987654321", "555666777"], 3, id="3-users"),
        pytest.param(["123456789", "123456789"], 1, id="1-user-2-sockets"),
        pytest.param(["123456789", "123456789", "987654321"], 2, id="2-users-3-sockets"),
    ],
)
async def test_guide_curl_sequence(server: Server, user_ids: list[str], users: int) -> None:
    """The guide's "Testing Connection" commands with the real curl, as written but for the port."""
    base = f"http://localhost:{server.port}"
    code, before = await curl(f"{base}/api/v1/ws/status")
    assert code == 200
    assert before == {"connected_users": 0, "status": "active", "active_user_ids": [], "total_connections": 0}

    async with listeners(server, user_ids) as sockets:
        code, during = await curl(f"{base}/api/v1/ws/status")
        assert code == 200
        assert during["connected_users"] == users
        assert during["active_user_ids"] == sorted(set(user_ids))
        assert during["total_connections"] == len(user_ids)

        code, body = await curl(
            "-X", "POST", f"{base}/api/v1/ws/notification",
            "-H", "Content-Type: application/json",
            "-d", '{"message": "Test notification"}',
        )  # fmt: skip
        assert code == 200, body
        assert set(body) == GUIDE_ANSWER_KEYS | {"id"}, body
        assert body["status"] == "success"
        assert body["message"] == users_sentence(users)
        assert body["sent_count"] == len(user_ids)
        assert body["total_connections"] == len(user_ids)
        assert body["disconnected_users"] == 0
        assert isinstance(body["id"], str)
        assert ID_RE.match(body["id"]), body["id"]
        for websocket in sockets:
            frame = await next_frame(websocket)
            assert frame["message"] == "Test notification"  # what the guide says the clients get
            assert frame["type"] == "notification"
            assert frame["id"] == body["id"]


# --- 404 with nobody connected ----------------------------------------------------------------------------


def assert_nobody_answer(answer: httpx.Response) -> None:
    assert answer.status_code == 404, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert_nobody_body(answer.json())


def assert_nobody_body(body: dict[str, Any]) -> None:
    """The 404 body: the error shape plus the three counters at zero, and no `id`."""
    assert set(body) == {"status", "message", "sent_count", "total_connections", "disconnected_users"}, body
    assert body["status"] == "error"
    assert isinstance(body["message"], str)
    assert body["message"].strip()
    assert (body["sent_count"], body["total_connections"], body["disconnected_users"]) == (0, 0, 0)
    assert "id" not in body


@pytest.mark.anyio
async def test_404_when_nobody_is_connected(server: Server) -> None:
    """The guide's "No Active Connections: 404": error shape, three zero counters, no `id`."""
    assert_nobody_answer(await post(server, {"message": "anyone there?"}))


@pytest.mark.anyio
async def test_404_again_after_the_last_listener_leaves(server: Server) -> None:
    """The guide's "Automatic cleanup of disconnected users": once the only listener is gone, 404 again."""
    async with listeners(server, ["123456789"]):
        assert_success(await post(server, {"message": "hello"}), users=1, sockets=1)
    await wait_for_sockets(server, 0)
    assert_nobody_answer(await post(server, {"message": "anyone left?"}))


@needs_curl
@pytest.mark.anyio
async def test_404_through_curl(server: Server) -> None:
    """The guide's exact POST with nobody listening gets the JSON 404, not an HTML page or an empty body."""
    code, body = await curl(
        "-X", "POST", f"http://localhost:{server.port}/api/v1/ws/notification",
        "-H", "Content-Type: application/json",
        "-d", '{"message": "Test notification"}',
    )  # fmt: skip
    assert code == 404, body
    assert_nobody_body(body)


# --- status -----------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_status_fields(server: Server) -> None:
    """connected_users counts distinct users, total_connections sockets; ids sorted; ?limit= caps the list."""
    assert await status(server) == {
        "connected_users": 0,
        "status": "active",
        "active_user_ids": [],
        "total_connections": 0,
    }
    async with listeners(server, ["zeta", "alpha", "mid", "mid"]) as sockets:
        full = await status(server)
        assert set(full) == STATUS_KEYS, full
        assert full["status"] == "active"
        assert full["connected_users"] == 3
        assert full["total_connections"] == 4
        assert full["active_user_ids"] == ["alpha", "mid", "zeta"]

        capped = await status(server, "?limit=1")
        assert capped["active_user_ids"] == ["alpha"]
        assert capped["connected_users"] == 3  # the cap is on the list, not on the counts
        assert capped["total_connections"] == 4
        assert (await status(server, "?limit=2"))["active_user_ids"] == ["alpha", "mid"]
        assert (await status(server, "?limit=100"))["active_user_ids"] == ["alpha", "mid", "zeta"]

        await sockets[3].close()  # one of mid's two sockets: mid is still connected
        after = await wait_for_sockets(server, 3)
        assert after["connected_users"] == 3
        assert after["active_user_ids"] == ["alpha", "mid", "zeta"]

        await sockets[2].close()  # mid's last socket
        after = await wait_for_sockets(server, 2)
        assert after["connected_users"] == 2
        assert after["active_user_ids"] == ["alpha", "zeta"]


# --- the pushed frame -------------------------------------------------------------------------------------


def assert_frame(
    frame: dict[str, Any], answer: dict[str, Any], message: str, sent_between: tuple[float, float]
) -> None:
    assert frame["type"] == "notification"
    assert frame["message"] == message
    assert frame["id"] == answer["id"]
    sent_at = frame["sent_at"]
    assert isinstance(sent_at, str)
    assert RFC3339_UTC_RE.match(sent_at), sent_at
    stamp = datetime.fromisoformat(sent_at)
    assert stamp.utcoffset() == timedelta(0)
    first, last = sent_between
    assert first - 1 <= stamp.timestamp() <= last + 1, (sent_at, first, last)


@pytest.mark.anyio
async def test_pushed_frame_shape(server: Server) -> None:
    """{"type", "message", "id", "sent_at"} exactly, `data` only when the sender gave one; sent_at in UTC `Z`."""
    async with listeners(server, ["123456789"]) as [websocket]:
        started = time.time()
        plain = assert_success(await post(server, {"message": "Task completed"}), users=1, sockets=1)
        frame = await next_frame(websocket)
        assert set(frame) == {"type", "message", "id", "sent_at"}, frame
        assert_frame(frame, plain, "Task completed", (started, time.time()))

        data = {"task_id": 42, "tags": ["goal", "daily"], "progress": {"done": 3, "of": 5}, "note": None}
        started = time.time()
        rich = assert_success(await post(server, {"message": "Goal progress", "data": data}), users=1, sockets=1)
        frame = await next_frame(websocket)
        assert set(frame) == {"type", "message", "id", "sent_at", "data"}, frame
        assert frame["data"] == data
        assert_frame(frame, rich, "Goal progress", (started, time.time()))

        # ids are "<ms>-<seq>", milliseconds since the epoch, increasing as a pair of integers
        assert id_pair(rich["id"]) > id_pair(plain["id"])
        assert abs(id_pair(plain["id"])[0] / 1000 - started) < 60
