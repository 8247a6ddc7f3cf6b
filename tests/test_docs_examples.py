"""Every runnable block of README.md and docs/, run as written against a real server.

Only the address changes: `localhost:8000` and `127.0.0.1:8000` become a free port (`make run` and `diary-ws
serve` get it through DIARY_WS_PORT), and a Redis URL becomes a redis-server the test started. Shell blocks run
in bash in a session of their own, so whatever they leave running in the background is stopped afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from tests.docs import block
from tests.install import INSTALL_WAIT, Checkout, copy_checkout, user_env
from tests.test_node_client import MODULES, NODE_MISSING
from tests.utils import ROOT, Server, free_port, redis_cluster, redis_server, run_server, wait_until

WAIT = 30.0  # a block may start `make run`, which checks the install first
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed: the docs' shell blocks use it")
ID_RE = r"\d+-\d+"


def at_port(text: str, port: int) -> str:
    text = re.sub(r"--port 8000\b", f"--port {port}", text)
    return re.sub(r"(localhost|127\.0\.0\.1):8000\b", f"127.0.0.1:{port}", text)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without DIARY_WS_* (a block sets its own), with the venv's commands on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


class Run:
    """A block running in its own session; `output()` is everything it and its children printed so far."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc, self.log = proc, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, what: str) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def check() -> bool:
            match = re.search(pattern, self.output())
            if match:
                found.append(match)
            return match is not None

        try:
            wait_until(check, WAIT, what, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- output ---\n{self.output()}") from None
        return found[0]


@contextlib.contextmanager
def run(argv: list[str], tmp: Path, env: dict[str, str], cwd: Path = ROOT) -> Iterator[Run]:
    log = tmp / f"block-{len(list(tmp.glob('block-*')))}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Run(proc, log)
    finally:
        stop_session(proc.pid)
        proc.wait(timeout=WAIT)


def stop_session(pgid: int) -> None:
    """SIGTERM to everything the block started, then wait until it is gone (SIGKILL what stays past the clock)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)

    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        wait_until(gone, 10, "the block's processes to stop", interval=0.05)
    except AssertionError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def bash(script: str, tmp: Path, env: dict[str, str], cwd: Path = ROOT) -> contextlib.AbstractContextManager[Run]:
    return run(["bash", "-c", script], tmp, env, cwd)


def python(script: str, tmp: Path) -> contextlib.AbstractContextManager[Run]:
    path = tmp / f"block{len(list(tmp.glob('block*.py')))}.py"
    path.write_text(script)
    return run([sys.executable, str(path)], tmp, clean_env())


def wait_for_user(server: Server, user_id: str) -> None:
    wait_until(lambda: user_id in server.status()["active_user_ids"], WAIT, f"{user_id} to connect")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with run_server() as srv:
        yield srv


# --- README ----------------------------------------------------------------------------------------------------


@needs_curl
@pytest.mark.slow
@pytest.mark.timeout(INSTALL_WAIT + 120)  # the first test to use the fresh checkout builds its venv
def test_the_readme_five_lines(checkout: Checkout, tmp_path: Path) -> None:
    port = free_port()
    script = at_port(block("readme-try"), port)
    with bash(script, tmp_path, user_env(DIARY_WS_PORT=str(port)), cwd=checkout.path) as shell:
        shell.wait_for(r'"message":"Notification sent to 1 user"', "the POST's answer")
        shell.wait_for(r'\{"type":"notification","message":"hello","id":"' + ID_RE, "the listener's line")
    assert len(block("readme-try").strip().splitlines()) == 5


@pytest.mark.slow
@pytest.mark.timeout(INSTALL_WAIT + 120)  # the first test to use the fresh checkout builds its venv
def test_the_readme_install_from_a_checkout(tmp_path: Path) -> None:
    """The three lines, in another fresh copy of the checkout: pip installs it, and the service answers."""
    copy = copy_checkout(tmp_path / "checkout")
    port = free_port()
    with bash(block("readme-install"), tmp_path, user_env(DIARY_WS_PORT=str(port)), cwd=copy) as shell:
        wait_until(lambda: _healthy(port) or shell.proc.poll() is not None, INSTALL_WAIT, "the service", interval=0.5)
        assert _healthy(port), shell.output()
    probe = subprocess.run([str(copy / ".venv" / "bin" / "python"), "-c", "import redis"], capture_output=True)
    assert probe.returncode == 0  # the '.[redis]' extra came with it


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --- api.md ----------------------------------------------------------------------------------------------------


@needs_curl
def test_api_try_it_curl(server: Server, tmp_path: Path) -> None:
    with connect(server.listen_url("123456789")) as ws:
        wait_for_user(server, "123456789")
        with bash(at_port(block("api-try-curl"), server.port), tmp_path, clean_env()) as shell:
            assert shell.proc.wait(timeout=WAIT) == 0
        output = shell.output()
        assert '"active_user_ids":["123456789"]' in output
        assert output.count('"message":"Notification sent to 1 user"') == 2
        first, second = json.loads(ws.recv(timeout=5)), json.loads(ws.recv(timeout=5))
    assert first["message"] == "Test notification"
    assert (second["type"], second["data"]) == ("task.completed", {"task": 42})


def test_api_python_shortest(server: Server, tmp_path: Path) -> None:
    with python(at_port(block("api-python-shortest"), server.port), tmp_path) as shell:
        wait_for_user(server, "123456789")
        sent = server.post({"message": "short", "user_ids": ["123456789"]}).json()
        shell.wait_for(rf"'message': 'short', 'id': '{sent['id']}'", "the printed frame")


def test_api_python_resume_catches_up_after_a_drop(server: Server, tmp_path: Path) -> None:
    """Cut off by an operator's DELETE, it reconnects with since and gets what was sent meanwhile."""
    with (
        connect(server.listen_url("bystander")),
        python(at_port(block("api-python-resume"), server.port), tmp_path) as shell,
    ):
        wait_for_user(server, "123456789")
        assert server.post({"message": "one"}).status_code == 200
        shell.wait_for(r"notification one", "the first message")
        assert httpx.delete(f"{server.http}/api/v1/ws/users/123456789/connections").json()["closed"] == 1
        assert server.post({"message": "two"}).status_code == 200  # the bystander keeps it stored
        shell.wait_for(r"notification two", "the missed message, replayed after the reconnect")
    assert "missed" not in shell.output()


@pytest.mark.skipif(NODE_MISSING is not None, reason=NODE_MISSING or "")
def test_api_js_snippet_under_node(server: Server, tmp_path: Path) -> None:
    script = "globalThis.WebSocket = require('ws');\n" + block("api-js-browser").replace(
        "wss://push.example.com", f"ws://127.0.0.1:{server.port}"
    )
    (tmp_path / "snippet.js").write_text(script)
    env = clean_env(NODE_PATH=str(MODULES))
    with run(["node", str(tmp_path / "snippet.js")], tmp_path, env) as shell:
        wait_for_user(server, "123456789")
        assert server.post({"message": "to node"}).status_code == 200
        shell.wait_for(r"to node", "the logged message")


@needs_curl
def test_api_sse_curl(server: Server, tmp_path: Path) -> None:
    with bash(at_port(block("api-sse-curl"), server.port), tmp_path, clean_env()) as shell:
        wait_for_user(server, "123456789")
        sent = server.post({"message": "by sse"}).json()
        shell.wait_for(rf"id: {sent['id']}\ndata: \{{\"type\":\"notification\",\"message\":\"by sse\"", "the event")


def test_api_sse_snippet_in_a_browser(server: Server) -> None:
    from tests.test_browser import MISSING

    if MISSING is not None:
        pytest.skip(MISSING)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        try:
            tab = browser.new_page()
            tab.goto(f"{server.http}/healthz")  # the server's own origin: the snippet's URL is relative
            tab.add_script_tag(content=block("api-sse-browser"))
            wait_for_user(server, "123456789")
            with tab.expect_console_message(lambda m: m.text.startswith("in a page "), timeout=WAIT * 1000) as seen:
                sent = server.post({"message": "in a page"}).json()
            assert seen.value.text == f"in a page {sent['id']}"
        finally:
            browser.close()


def test_api_python_client(server: Server, tmp_path: Path) -> None:
    with python(at_port(block("api-python-client"), server.port), tmp_path) as shell:
        wait_for_user(server, "123456789")
        assert server.post({"message": "via Client", "type": "x.y", "data": {"n": 1}}).status_code == 200
        shell.wait_for(r"x\.y via Client \{'n': 1\}", "the printed notification")


@needs_curl
def test_api_commands(server: Server, tmp_path: Path) -> None:
    with bash(at_port(block("api-commands"), server.port), tmp_path, clean_env()) as shell:
        assert shell.proc.wait(timeout=WAIT) == 0, shell.output()
        shell.wait_for(r'"message":"Notification sent to 1 user"', "send's answer")
        shell.wait_for(r'\{"type":"task.completed","message":"Task done"', "the listener's line")
        shell.wait_for(r"\neyJ[\w-]+\.[\w-]+\.[\w-]+\n", "the minted token")


# --- security.md, scaling.md, embedding.md ---------------------------------------------------------------------------


@needs_curl
@pytest.mark.slow
@pytest.mark.timeout(INSTALL_WAIT + 120)  # the first test to use the fresh checkout builds its venv
def test_security_trying_it(checkout: Checkout, tmp_path: Path) -> None:
    port = free_port()
    script = at_port(block("security-try"), port)
    with bash(script, tmp_path, user_env(DIARY_WS_PORT=str(port)), cwd=checkout.path) as shell:
        shell.wait_for(r'"closed":1', "the operator's DELETE")
        output = shell.output()
        assert "no valid API key" in output or '"status":"error"' in output  # the POST without a key
        answers = re.findall(r'\{"status":"success","message":"Notification sent to 1 user"[^\n]*?\}', output)
        assert len(answers) == 2, output
        assert answers[0] == answers[1], output  # the retry got the first answer, byte for byte
        assert len(re.findall(r'"message":"hello","id"', output)) == 1, output  # delivered once


def test_scaling_four_workers_act_as_one(tmp_path: Path) -> None:
    with redis_server() as redis:
        port = free_port()
        script = block("scaling-workers").replace("redis://127.0.0.1:6379/0", redis.url)
        assert script != block("scaling-workers")
        with bash(script, tmp_path, clean_env(DIARY_WS_PORT=str(port))) as shell:
            try:
                wait_until(lambda: _ready(port), WAIT, "the workers to be ready", interval=0.1)
            except AssertionError:
                raise AssertionError(shell.output()) from None
            with contextlib.ExitStack() as stack:
                sockets = [stack.enter_context(connect(f"ws://127.0.0.1:{port}/api/v1/ws/u{n}")) for n in range(6)]
                wait_until(lambda: _total(port) == 6, WAIT, "six sockets cluster-wide")
                answer = httpx.post(f"http://127.0.0.1:{port}/api/v1/ws/notification", json={"message": "all"})
                assert answer.json()["sent_count"] == 6, answer.text
                assert all(json.loads(ws.recv(timeout=5))["message"] == "all" for ws in sockets)

            # The first worker up may serve all of the above alone; the others come up in their own time.
            def started() -> set[str]:
                return set(re.findall(r"Started server process \[(\d+)\]", shell.output()))

            wait_until(lambda: len(started()) == 4, WAIT, "all four workers to start")
        assert len(started()) == 4, shell.output()


def test_the_redis_cluster_line_serves_on_a_cluster(tmp_path: Path) -> None:
    with redis_cluster(masters=3) as cluster:
        port = free_port()
        script = block("redis-cluster-serve").replace("redis-cluster://10.0.0.5:7000", cluster.url)
        assert script != block("redis-cluster-serve")
        with bash(script, tmp_path, clean_env(DIARY_WS_PORT=str(port))) as shell:
            try:
                wait_until(lambda: _ready(port), WAIT, "the node to be ready", interval=0.1)
            except AssertionError:
                raise AssertionError(shell.output()) from None
            with connect(f"ws://127.0.0.1:{port}/api/v1/ws/alice") as alice:
                answer = httpx.post(f"http://127.0.0.1:{port}/api/v1/ws/notification", json={"message": "hi"})
                assert answer.json()["sent_count"] == 1, answer.text
                assert json.loads(alice.recv(timeout=5))["message"] == "hi"


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _total(port: int) -> int:
    total: int = httpx.get(f"http://127.0.0.1:{port}/api/v1/ws/status", timeout=5).json()["total_connections"]
    return total


@needs_curl
def test_embedding_run_lines(tmp_path: Path) -> None:
    (tmp_path / "host.py").write_text(block("embedding-host"))
    port = free_port()
    with bash(at_port(block("embedding-run"), port), tmp_path, clean_env(), cwd=tmp_path) as shell:
        shell.wait_for(r'\{"delivered":true,"id":"' + ID_RE, "the in-process publish's answer")
        shell.wait_for(r'"message":"over HTTP"', "the listener's line for the HTTP publish")
        shell.wait_for(r'"type":"task.completed","message":"Task done"', "the listener's line for the in-process one")
