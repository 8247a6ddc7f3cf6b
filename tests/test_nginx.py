"""deploy/nginx/, included by a real nginx in an existing server block in front of a real diary-ws.

The kit is two snippets: diary-ws-http.conf (map, log format, upstream) for the http level, and
diary-ws-location.conf for inside an existing `server { }` block. The test writes a minimal nginx.conf that
includes them the way an operator would, next to a server block of its own with the default access log,
and rewrites only addresses in the snippets (see their headers): the upstream address (one instance:
memory:// does not share messages between instances) and the log directory. Everything else (upgrade
headers, timeouts, buffering, the prefix, the X-Forwarded-For header and the access-log format) is shipped.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.docs import doc_pages, fenced
from tests.utils import ROOT, Server, access_statuses, async_wait_until, free_port, next_frame, run_server, wait_until

KIT = ROOT / "deploy" / "nginx"
HTTP_SNIPPET = KIT / "diary-ws-http.conf"
LOCATION_SNIPPET = KIT / "diary-ws-location.conf"
PREFIX = "/notify"
CLIENT_ADDRESS = "127.0.0.2"  # the test client's source address, so nginx (127.0.0.1) and the client differ
SECRET = "eyJhbGciOiJIUzI1NiJ9.bmdpbngtdGVzdA.c2lnbmF0dXJl"


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        pytest.skip("nginx not found (apt-get install nginx; .ci/run installs it): the proxy recipe is untested")
    return found


def render(snippet: str, upstream: str, tmp: Path) -> str:
    """A snippet with only its addresses replaced, as its header says."""
    text = snippet.replace("127.0.0.1:8001", upstream)
    text = re.sub(r"^\s*server 127\.0\.0\.1:8002;\n", "", text, flags=re.MULTILINE)
    return text.replace("/var/log/nginx/", f"{tmp}/")


def wrapper(port: int, tmp: Path) -> str:
    """The operator's own nginx.conf: an http block that includes part 1, a server block that includes part 2."""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp_paths = "".join(f"    {kind}_temp_path {tmp}/{kind};\n" for kind in kinds)
    return (
        f"worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/diary-ws-error.log warn;\n"
        "events {\n    worker_connections 1024;\n}\n"
        f"http {{\n{temp_paths}    include {tmp}/diary-ws-http.conf;\n"
        f"    access_log {tmp}/server-access.log;  # the default format: it prints the query string\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n        location / {{ return 404; }}\n"
        f"        include {tmp}/diary-ws-location.conf;\n    }}\n}}\n"
    )


@dataclass
class Nginx:
    port: int
    tmp: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}{PREFIX}"

    def access_log(self) -> str:
        return (self.tmp / "diary-ws-access.log").read_text()


@contextlib.contextmanager
def run_nginx(upstream: str, location: str | None = None) -> Iterator[Nginx]:
    """nginx running the recipe (with a variant of its location snippet's text, `location`) in front of `upstream`."""
    binary = nginx_binary()
    with tempfile.TemporaryDirectory(prefix="diary-ws-nginx-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)  # nginx's workers drop root and must still reach their temp dirs
        port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(wrapper(port, tmp))
        for snippet in (HTTP_SNIPPET, LOCATION_SNIPPET):
            text = location if snippet is LOCATION_SNIPPET and location is not None else snippet.read_text()
            (tmp / snippet.name).write_text(render(text, upstream, tmp))
        proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        nginx = Nginx(port, tmp)
        try:
            wait_until(lambda: _answers(nginx, proc), 15, "nginx to proxy /healthz")
            yield nginx
        finally:
            proc.send_signal(signal.SIGQUIT)  # graceful stop
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _answers(nginx: Nginx, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        errors = nginx.tmp / "diary-ws-error.log"
        logged = errors.read_text() if errors.exists() else ""
        raise AssertionError(f"nginx exited with {proc.returncode}: {output} {logged}")
    try:
        return httpx.get(f"{nginx.http}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def proxied() -> Iterator[tuple[Nginx, Server]]:
    with run_server({"root_path": PREFIX, "trusted_proxies": "127.0.0.1"}) as server:
        with run_nginx(f"127.0.0.1:{server.port}") as nginx:
            yield nginx, server
        server.assert_clean_log()


def client() -> httpx.Client:
    """An HTTP client that connects from CLIENT_ADDRESS, so the app's view of the client can be checked."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=CLIENT_ADDRESS), timeout=10)


def test_the_kit_has_what_it_promises() -> None:
    recipe = HTTP_SNIPPET.read_text() + LOCATION_SNIPPET.read_text()
    assert "map $http_upgrade $connection_upgrade" in recipe
    assert "proxy_set_header Upgrade $http_upgrade;" in recipe
    assert "proxy_buffering off;" in recipe
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in recipe
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", recipe)
    assert read_timeout is not None
    assert int(read_timeout.group(1)) > 20  # above the default PING_INTERVAL
    assert len(re.findall(r"^\s*server 127\.0\.0\.1:\d+;", recipe, re.MULTILINE)) >= 2  # several instances
    log_format = recipe[recipe.index("log_format") : recipe.index("access_log")]
    assert "$uri" in log_format
    assert "$request_uri" not in log_format
    assert '"$request"' not in log_format


@pytest.mark.anyio
async def test_listen_post_status_and_resume_through_nginx(proxied: tuple[Nginx, Server]) -> None:
    nginx, server = proxied
    url = f"{nginx.ws}/api/v1/ws/nx-user?token={SECRET}"
    async with connect(url, local_addr=(CLIENT_ADDRESS, 0)) as ws:
        with client() as http:
            status = http.get(f"{nginx.http}/api/v1/ws/status").json()
            assert "nx-user" in status["active_user_ids"]
            answer = http.post(f"{nginx.http}/api/v1/ws/notification", json={"message": "one", "user_ids": ["nx-user"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["sent_count"] == 1
        first = await next_frame(ws)
        assert (first["message"], first["id"]) == ("one", answer.json()["id"])
    await async_wait_until(lambda: "nx-user" not in server.status()["active_user_ids"], 5, "the socket to close")

    # Missed while away; the next connection through nginx resumes from the last id it saw.
    with client() as http:
        assert http.post(f"{nginx.http}/api/v1/ws/notification", json={"message": "two"}).status_code == 404
        async with connect(f"{nginx.ws}/api/v1/ws/nx-other", local_addr=(CLIENT_ADDRESS, 0)) as other:
            await async_wait_until(lambda: "nx-other" in server.status()["active_user_ids"], 5, "nx-other")
            sent = http.post(f"{nginx.http}/api/v1/ws/notification", json={"message": "two"})
            assert sent.status_code == 200
            assert (await next_frame(other))["message"] == "two"
    async with connect(f"{nginx.ws}/api/v1/ws/nx-user?since={first['id']}", local_addr=(CLIENT_ADDRESS, 0)) as ws:
        replayed = await next_frame(ws)
        assert (replayed["message"], replayed["id"]) == ("two", sent.json()["id"])
        assert await next_frame(ws) == {"type": "resume", "recovered": True, "replayed": 1}


def test_refusals_and_the_prefix_come_through(proxied: tuple[Nginx, Server]) -> None:
    nginx, _server = proxied
    with client() as http:
        json_type = {"Content-Type": "application/json"}
        bad = http.post(f"{nginx.http}/api/v1/ws/notification", content=b"{", headers=json_type)
        assert bad.status_code == 400
        assert bad.json()["status"] == "error"
        # The app knows its prefix (ROOT_PATH), so its OpenAPI document points clients at /notify.
        assert http.get(f"{nginx.http}/api/v1/ws/openapi.json").json()["servers"] == [{"url": PREFIX}]


def test_x_forwarded_for_reaches_the_app(proxied: tuple[Nginx, Server]) -> None:
    nginx, server = proxied
    with client() as http:
        # A forged header from the client is kept to the left of the address nginx saw, and ignored.
        answer = http.get(f"{nginx.http}/api/v1/ws/status?limit=1", headers={"X-Forwarded-For": "198.51.100.9"})
        assert answer.status_code == 200
    wait_until(lambda: "/api/v1/ws/status?limit=1 HTTP/1.1" in server.log(), 5, "the app's access line")
    line = next(line for line in server.log().splitlines() if "/api/v1/ws/status?limit=1 HTTP/1.1" in line)
    assert f"{CLIENT_ADDRESS}:" in line, line
    assert "198.51.100.9" not in line


@pytest.mark.anyio
async def test_no_token_in_either_log(proxied: tuple[Nginx, Server]) -> None:
    nginx, server = proxied
    async with connect(f"{nginx.ws}/api/v1/ws/nx-token?token={SECRET}", local_addr=(CLIENT_ADDRESS, 0)):
        pass
    wait_until(lambda: "/notify/api/v1/ws/nx-token" in nginx.access_log(), 5, "nginx's access line")
    assert f"{CLIENT_ADDRESS} - " in nginx.access_log()
    assert SECRET not in nginx.access_log()
    assert "token=" not in nginx.access_log()
    assert SECRET not in server.log()
    # The location's own log replaces the server block's, whose default format would print ?token=.
    server_log = nginx.tmp / "server-access.log"
    assert not server_log.exists() or SECRET not in server_log.read_text()


def test_the_docs_show_the_kit_the_test_runs() -> None:
    """Every nginx snippet in the docs is a verbatim piece of the tested files: no untested variant."""
    shown = [block for _page, text in doc_pages() for block in fenced(text, "nginx")]
    assert shown
    kit = HTTP_SNIPPET.read_text() + LOCATION_SNIPPET.read_text()
    for snippet in shown:
        assert snippet.strip() in kit
    assert "location /notify/" in "".join(shown)  # the part an operator adapts is shown, not only mentioned


def test_an_sse_stream_comes_through_unbuffered(proxied: tuple[Nginx, Server]) -> None:
    """Each event reaches the client at once through the recipe (`proxy_buffering off`; the app's
    `X-Accel-Buffering: no` would also turn buffering off for the stream, so this checks the pair)."""
    nginx, server = proxied
    with client() as http, http.stream("GET", f"{nginx.http}/api/v1/sse/nx-sse", timeout=10) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        wait_until(lambda: "nx-sse" in server.status()["active_user_ids"], 5, "the stream to be attached")
        sent = httpx.post(f"{nginx.http}/api/v1/ws/notification", json={"message": "by sse", "user_ids": ["nx-sse"]})
        assert sent.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("id:")) == f"id: {sent.json()['id']}"
        assert '"message":"by sse"' in next(lines)


# --- the edge's attacks through the recipe (docs/limits.md, "Behind nginx") ------------------------------------


def _raw(nginx: Nginx) -> socket.socket:
    return socket.create_connection(("127.0.0.1", nginx.port), timeout=5)


def _first_line(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_nginx_absorbs_slow_heads_and_oversized_heads(proxied: tuple[Nginx, Server]) -> None:
    """Slow and oversized request heads stop at nginx: diary-ws never sees a connection for them."""
    nginx, server = proxied
    log_before = len(server.log())
    slow = []
    for _ in range(200):  # more than a small MAX_HTTP_CONNECTIONS: nginx holds them, not diary-ws
        sock = _raw(nginx)
        sock.sendall(b"GET /notify/healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(sock)
    try:
        # nginx's large_client_header_buffers (4 x 8 KiB): a longer header line is a 400, a longer request line a 414.
        long_header = _raw(nginx)
        with contextlib.suppress(OSError):
            long_header.sendall(b"GET /notify/healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert b" 400 " in _first_line(long_header)
        long_line = _raw(nginx)
        with contextlib.suppress(OSError):
            long_line.sendall(b"GET /notify/healthz?" + b"q" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 414 " in _first_line(long_line)
        with client() as http:
            answer = http.post(f"{nginx.http}/api/v1/ws/notification", json={"message": "hi", "user_ids": ["none"]})
        assert answer.status_code == 404
    finally:
        for sock in slow:
            sock.close()
    seen = server.log()[log_before:]
    assert not {431, 414, 408} & set(access_statuses(seen))
    assert "waited longest" not in seen
