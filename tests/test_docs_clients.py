"""Every bash and Python block of docs/clients.md runs, as written, against a real server with `alice` listening."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.utils import ROOT, Server, run_server, wait_until

PAGE = (ROOT / "docs" / "clients.md").read_text()
BLOCKS = re.findall(r"^```(bash|python)\n(.*?)^```$", PAGE, re.MULTILINE | re.DOTALL)
LIMIT = 30.0


class Alice:
    """A listener that keeps every frame it gets."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for frame in self.ws:
                self.frames.append(orjson.loads(frame))
        except ConnectionClosed:
            pass


@pytest.fixture(scope="module")
def docs_server() -> Iterator[tuple[Server, Alice]]:
    with run_server() as srv:
        with connect(srv.listen_url("alice")) as ws:
            alice = Alice(ws)
            wait_until(lambda: "alice" in srv.status()["active_user_ids"], LIMIT, "alice to connect")
            yield srv, alice
        alice.thread.join(timeout=LIMIT)
        srv.assert_clean_log()


def test_the_page_has_its_examples() -> None:
    assert [kind for kind, _ in BLOCKS].count("bash") >= 2
    assert [kind for kind, _ in BLOCKS].count("python") >= 2


@pytest.mark.parametrize(("kind", "code"), BLOCKS, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(BLOCKS)])
def test_every_example_runs(docs_server: tuple[Server, Alice], kind: str, code: str) -> None:
    server, alice = docs_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    env["DIARY_WS_URL"] = server.http
    before = len(alice.frames)
    command = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LIMIT, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    if kind == "bash" and "notifications" in code:
        answer = orjson.loads(run.stdout)
        assert answer["failed"] == 2
        assert [r["status"] for r in answer["results"]] == ["success", "error", "error"]
    if kind == "bash" and "/users/alice" in code:
        assert orjson.loads(run.stdout) == {"user_id": "alice", "connected": True, "connections": 1}
    if kind == "python":
        assert "not delivered: 404" in run.stdout or "Hello from asyncio" in code
        wait_until(lambda: len(alice.frames) > before, LIMIT, "the example's notifications to reach alice")
