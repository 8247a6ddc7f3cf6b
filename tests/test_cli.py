"""docs/cli.md, run: every example, every row of the exit-code table, and the CLI habits it promises."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.utils import ROOT, Server, free_port, run_server, wait_until

PAGE = (ROOT / "docs" / "cli.md").read_text()
ROWS = re.findall(r"^\| (\d) \| (.+?) \| `(.+)` \|$", PAGE, re.MULTILINE)
LIMIT = 30.0
BIN = Path(sys.executable).parent  # where pip put the diary-ws script


def shell(command: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run a line of the docs as a user would, with the installed `diary-ws` first on PATH."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    full.update(env)
    full["PATH"] = f"{BIN}:{full.get('PATH', '')}"
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], env=full, input=stdin, capture_output=True, text=True,
        timeout=LIMIT, cwd=ROOT,
    )  # fmt: skip


def drain(ws: ClientConnection) -> None:
    try:
        for _frame in ws:
            pass
    except ConnectionClosed:
        pass


@contextlib.contextmanager
def listening(server: Server, user_id: str) -> Iterator[ClientConnection]:
    with connect(server.listen_url(user_id)) as ws:
        reader = threading.Thread(target=drain, args=(ws,), daemon=True)
        reader.start()
        wait_until(lambda: user_id in server.status()["active_user_ids"], LIMIT, f"{user_id} to connect")
        yield ws
    reader.join(timeout=LIMIT)


class Failing(http.server.BaseHTTPRequestHandler):
    """A server that answers every request with a JSON 500."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"status": "error", "message": "internal server error"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


@contextlib.contextmanager
def failing_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=LIMIT)


NGINX_CONF = """
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy; fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
    server {{ listen 127.0.0.1:{port}; location / {{ return 404; }} }}
}}
"""


@contextlib.contextmanager
def nginx_404() -> Iterator[str | None]:
    """A real nginx that answers everything with its own HTML 404 page; None without nginx."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="diary-ws-cli-nginx-") as tmp:
        port = free_port()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port))
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", tmp, "-g", "daemon off;"], stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: _answers(url), LIMIT, "nginx to answer")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=LIMIT)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 404
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, str]]:
    """A server with alice listening, a keyed server, a failing server, nginx's 404 page and a taken port."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(run_server())
        stack.enter_context(listening(server, "alice"))
        keyed = stack.enter_context(run_server({"api_key": "cli-key-0123456789abcdef"}))
        failing = stack.enter_context(failing_server())
        nginx = stack.enter_context(nginx_404())
        taken = stack.enter_context(socket.socket())
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            "DIARY_WS_URL": server.http, "KEYED_URL": keyed.http, "FAILING_URL": failing,
            "TAKEN_PORT": str(taken.getsockname()[1]), "NGINX_URL": nginx or "",
        }  # fmt: skip
        yield env
        server.assert_clean_log()


def test_the_table_has_a_row_for_every_code() -> None:
    assert {int(code) for code, _, _ in ROWS} == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(("code", "meaning", "example"), ROWS, ids=[f"{c}-{m[:30]}" for c, m, _ in ROWS])
def test_every_row_of_the_exit_code_table(world: dict[str, str], code: str, meaning: str, example: str) -> None:
    if "$NGINX_URL" in example and not world["NGINX_URL"]:
        pytest.skip("nginx not found (apt-get install nginx; .ci/run installs it)")
    result = shell(example, world)
    assert result.returncode == int(code), (example, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    if result.returncode != 0:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, whatever went wrong
        assert result.stdout == ""
    if "$NGINX_URL" in example:
        assert "not a diary-ws answer (text/html): 404 Not Found" in result.stderr
        assert "<" not in result.stderr
    if "serve" in example:
        assert "startup complete" not in result.stderr  # it stopped before anything started


def test_the_examples_at_the_top_run_as_written() -> None:
    block = re.search(r"^```bash\n(.*?)^```$", PAGE, re.MULTILINE | re.DOTALL)
    assert block
    with run_server() as server, listening(server, "alice"):
        for line in block.group(1).splitlines():
            command = line.split("  #")[0].strip()
            result = shell(command, {"DIARY_WS_URL": server.http})
            assert result.returncode == 0, (command, result.stderr)
            if command.startswith("diary-ws presence"):
                assert orjson.loads(result.stdout) == {"user_id": "alice", "connected": True, "connections": 1}
            if command.startswith("diary-ws disconnect"):
                assert orjson.loads(result.stdout)["closed"] == 1
        server.assert_clean_log()


def test_send_dash_reads_the_message_from_stdin(shared_server: Server) -> None:
    with connect(shared_server.listen_url("stdin-user")) as ws:
        wait_until(lambda: "stdin-user" in shared_server.status()["active_user_ids"], LIMIT, "the listener")
        text = "line one\nline two ✓"
        result = shell("diary-ws send - --user stdin-user", {"DIARY_WS_URL": shared_server.http}, stdin=text + "\n")
        assert result.returncode == 0, result.stderr
        sent = orjson.loads(result.stdout)
        frame = orjson.loads(ws.recv(timeout=LIMIT))
        assert frame["message"] == text  # the newline echo adds is dropped; the one inside is kept
        assert frame["id"] == sent["id"]


def test_the_client_commands_find_the_server_from_host_and_port(shared_server: Server) -> None:
    env = {"DIARY_WS_HOST": "0.0.0.0", "DIARY_WS_PORT": str(shared_server.port)}
    result = shell("diary-ws status", env)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["status"] == "active"
    bad = shell("diary-ws status", {"DIARY_WS_URL": "localhost:8000"})
    assert bad.returncode == 2
    assert "DIARY_WS_URL must be an http:// or https:// URL" in bad.stderr


def test_serve_ignores_the_client_setting_and_takes_flag_and_no_flag() -> None:
    with run_server({"url": "http://elsewhere.example:1234", "console": "1"}, args=("--no-console",)) as srv:
        assert srv.get("/api/v1/ws/console").status_code == 404  # --no-console beat DIARY_WS_CONSOLE=1
    with run_server(args=("--console",)) as srv:
        assert srv.get("/api/v1/ws/console").status_code == 200
    with run_server(args=("--console", "on", "--no-per-message-deflate")) as srv:
        assert srv.get("/api/v1/ws/console").status_code == 200


def test_help_shows_the_defaults() -> None:
    serve = " ".join(shell("diary-ws serve --help", {}).stdout.split())
    for needle in ("(default: 8000)", "(default: 127.0.0.1)", "(default: memory://)", "(default: off)",
                   "--no-console", "--no-per-message-deflate", "(default: 1000)"):  # fmt: skip
        assert needle in serve, needle
    send = " ".join(shell("diary-ws send --help", {}).stdout.split())
    for needle in ("(default: everyone)", "default: DIARY_WS_URL", "(default: 10)", "- reads it from stdin"):
        assert needle in send, needle
    for command in ("presence", "disconnect", "status", "listen"):
        assert shell(f"diary-ws {command} --help", {}).returncode == 0


def test_a_port_in_use_stops_serve_at_once_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = shell(f"diary-ws serve --port {port} --broker-url memory://", {})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"diary-ws: error: cannot listen on 127.0.0.1:{port}: address already in use: another process listens "
        "there; stop it, or pick another port with --port or DIARY_WS_PORT"
    ]
