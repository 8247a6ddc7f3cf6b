"""The guide's JavaScript client and its `wscat -c` example, run under Node against a real server.

tests/js/guide_client.js is the guide's `DiaryWebSocketClient` class verbatim, with the `ws` npm package standing
in for the browser's WebSocket, plus a driver that prints the first notification as one JSON line. The npm
packages (ws, wscat) are pinned in tests/js/package.json and package-lock.json; `make test` installs them with
`npm ci --prefix tests/js`. Without node or those modules the tests skip and say why.
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import IO, Any

import pytest

from tests.docs import GUIDE
from tests.utils import ROOT, Server, wait_until

WAIT = 5.0
JS = ROOT / "tests" / "js"
MODULES = JS / "node_modules"
WSCAT = MODULES / ".bin" / "wscat"
NODE = shutil.which("node")
ID_RE = re.compile(r"^\d+-\d+$")
RFC3339_UTC_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


def _missing(*needs: Path) -> str | None:
    if NODE is None:
        return "node is not installed: the guide's JavaScript examples cannot run"
    for path in needs:
        if not path.exists():
            return f"{path.relative_to(ROOT)} is missing: run `npm ci --prefix tests/js` (make test does)"
    return None


NODE_MISSING = _missing(MODULES / "ws")
WSCAT_MISSING = _missing(MODULES / "ws", WSCAT)
needs_node = pytest.mark.skipif(NODE_MISSING is not None, reason=NODE_MISSING or "")
needs_wscat = pytest.mark.skipif(WSCAT_MISSING is not None, reason=WSCAT_MISSING or "")


class LineReader:
    """Reads a child's stream on a thread, so the test can wait for a line with a timeout."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def next_line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout} s; so far: {self.seen}") from None
        if line is None:
            raise AssertionError(f"the process ended its output; so far: {self.seen}")
        self.seen.append(line)
        return line


def user_connected(server: Server, proc: subprocess.Popen[bytes], user_id: str) -> bool:
    """The server's status lists `user_id`; fails at once if the client process has already exited."""
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"the client exited with {proc.returncode} before connecting: {out!r} {err!r}")
    return user_id in server.status()["active_user_ids"]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=WAIT)


def post_ok(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    response = server.post(body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["message"] == "Notification sent to 1 user"
    assert (answer["sent_count"], answer["total_connections"], answer["disconnected_users"]) == (1, 1, 0)
    assert ID_RE.match(answer["id"]), answer
    return answer


def test_guide_client_js_holds_the_guides_class_verbatim() -> None:
    """guide_client.js = `require('ws')` + the guide's class unchanged + a driver (no edits inside the class)."""
    guide = GUIDE
    [block] = [b for b in re.findall(r"```javascript\n(.*?)```", guide.read_text(), re.S) if "class Diary" in b]
    guide_class = block[: block.index("// Usage Example")].rstrip("\n") + "\n"
    source = (JS / "guide_client.js").read_text()
    start, end = "// ----- the guide's class, verbatim -----\n", "// ----- end of the guide's class -----\n"
    assert source[source.index(start) + len(start) : source.index(end)] == guide_class
    assert "const WebSocket = require('ws');\n" in source[: source.index(start)]


@needs_node
@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"message": "Server maintenance scheduled for tomorrow"}, id="message"),
        pytest.param({"message": "Task completed", "data": {"task_id": 7, "tags": ["a"]}}, id="with-data"),
    ],
)
def test_guide_js_client_receives_notification(server: Server, body: dict[str, Any]) -> None:
    """The guide's class under Node: connect(), onNotification(handler) gets the POSTed frame, disconnect()."""
    assert NODE is not None
    user_id = "123456789"
    proc = subprocess.Popen(
        [NODE, "guide_client.js", server.ws, user_id, "10"], cwd=JS, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_until(lambda: user_connected(server, proc, user_id), WAIT, "the Node client in the status")
        answer = post_ok(server, body)
        out, err = proc.communicate(timeout=WAIT * 2)
    finally:
        stop(proc)
    assert proc.returncode == 0, (out, err)
    lines = out.decode().splitlines()
    assert "WebSocket connected (receive-only mode)" in lines  # the class's onopen ran
    assert "WebSocket error" not in err.decode()
    [line] = [line for line in lines if line.startswith("{")]
    message = json.loads(line)
    assert message["type"] == "notification"  # what the class dispatches on
    assert message["message"] == body["message"]
    assert message["id"] == answer["id"]
    assert RFC3339_UTC_RE.match(message["sent_at"]), message
    expected_keys = {"type", "message", "id", "sent_at"} | ({"data"} if "data" in body else set())
    assert set(message) == expected_keys, message
    if "data" in body:
        assert message["data"] == body["data"]
    # the class's disconnect() closed the socket and the server let go of it
    wait_until(lambda: server.status()["total_connections"] == 0, WAIT, "the Node client's socket to be released")


@needs_wscat
def test_wscat_prints_the_notification(server: Server) -> None:
    """The guide's `wscat -c ws://.../api/v1/ws/123456789`: the notification appears on wscat's stdout.

    wscat reads its prompt from stdin and quits at end of input, so stdin is an open pipe (no TTY needed);
    with stdout not a TTY it prints each received frame as a bare line.
    """
    user_id = "123456789"
    proc = subprocess.Popen(
        [str(WSCAT), "-c", server.listen_url(user_id)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdin is not None
    reader = LineReader(proc.stdout)
    try:
        wait_until(lambda: user_connected(server, proc, user_id), WAIT, "wscat in the status")
        answer = post_ok(server, {"message": "Test notification"})
        line = reader.next_line(WAIT)
        frame = json.loads(line.removeprefix("< "))
        assert frame["type"] == "notification"
        assert frame["message"] == "Test notification"
        assert frame["id"] == answer["id"]
        assert set(frame) == {"type", "message", "id", "sent_at"}, frame
        proc.stdin.close()  # end of input: wscat closes the socket and exits, as Ctrl+C would
        assert proc.wait(timeout=WAIT) == 0
    finally:
        stop(proc)
    wait_until(lambda: server.status()["total_connections"] == 0, WAIT, "wscat's socket to be released")
