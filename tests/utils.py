"""Real servers for the tests: `diary-ws serve` in a subprocess on a free port, with its log captured."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0


def access_statuses(log: str) -> list[int]:
    """The status of every access line in a server log (`... "GET /x HTTP/1.1" 503`), so a test can say "no
    503" without matching a client port such as 127.0.0.1:45032."""
    return [int(code) for code in re.findall(r'HTTP/[0-9.]+" ([0-9]{3})$', log, re.MULTILINE)]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_ports = random.Random(os.getpid() ^ time.monotonic_ns())  # not the shared generator: a test may seed that


def free_port() -> int:
    """A TCP port nobody listens on right now, below the ephemeral range.

    A port from bind(("127.0.0.1", 0)) is an ephemeral one, the range the kernel also gives to outgoing
    connections: between the pick and the server's own bind, a client socket of another test (or of a
    redis-server) could take it as its local port, and the server then fails with "address already in use"
    (seen in full runs). Below the range, only another listener can take it.
    """
    low = 20000
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = _ports.randint(low, high) if high > low else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            found: int = sock.getsockname()[1]
            return found
    raise AssertionError(f"no free port from {low} to {high} in 200 tries")


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `check` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(check: Callable[[], Any], limit: float, what: str, interval: float = 0.02) -> Any:
    """`wait_until` for async tests; `check` may be sync or return an awaitable. Returns its truthy value."""
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Server:
    """A running `diary-ws serve` process."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def listen_url(self, user_id: str, query: str = "") -> str:
        return f"{self.ws}/api/v1/ws/{user_id}" + (f"?{query}" if query else "")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_clean_log(self) -> None:
        """No traceback and no ERROR line: bad input must never look like a server bug."""
        text = self.log()
        assert "Traceback" not in text, text[-4000:]
        assert " ERROR " not in text, text[-4000:]

    def post(self, body: Any, **kwargs: Any) -> httpx.Response:
        """POST a notification (a dict is sent as JSON)."""
        content = orjson.dumps(body) if not isinstance(body, (bytes, str)) else body
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return httpx.post(f"{self.http}/api/v1/ws/notification", content=content, headers=headers, timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.http}{path}", timeout=10, **kwargs)

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.get("/api/v1/ws/status").json()
        return answer

    def terminate(self, timeout: float = 10.0) -> float:
        """SIGTERM, then wait for exit; returns the seconds it took."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        return time.monotonic() - started


# The event loops the transport hooks are tested on. A module opts in with `pytestmark = ON_BOTH_LOOPS`: each
# of its tests then runs twice, and every server it starts (run_server, or in-process on the test's own loop,
# which anyio_backend switches) runs on that loop.
LOOPS = ("asyncio", "uvloop")
ON_BOTH_LOOPS = pytest.mark.parametrize("server_loop", LOOPS, indirect=True)
_loop: list[str | None] = [None]  # the loop run_server uses when the settings name none (the test's param)


@contextlib.contextmanager
def default_loop(name: str | None) -> Iterator[None]:
    """Servers started meanwhile run on `name` (None: their own default) unless their settings say otherwise."""
    before, _loop[0] = _loop[0], name
    try:
        yield
    finally:
        _loop[0] = before


def _ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"server exited with {proc.returncode} before it was ready")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _limit_files(count: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


@contextlib.contextmanager
def run_server(
    settings: Mapping[str, str] | None = None,
    *,
    args: tuple[str, ...] = (),
    port: int | None = None,
    open_files: int | None = None,
) -> Iterator[Server]:
    """Start `python -m diary_ws serve` on a free port (or `port`) with DIARY_WS_* `settings`; stop it afterwards.

    `open_files` sets the server's open-file limit, soft and hard (it raises the soft one to the hard one).
    """
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    env.update({f"DIARY_WS_{k.upper()}": str(v) for k, v in (settings or {}).items()})
    # The test's loop; for a server a module or session fixture starts (before any test's loop is set), $TEST_LOOP.
    loop = _loop[0] or os.environ.get("TEST_LOOP")
    if loop and "loop" not in (settings or {}):
        env["DIARY_WS_LOOP"] = loop
    env["DIARY_WS_PORT"] = str(port)
    with tempfile.NamedTemporaryFile(prefix="diary-ws-", suffix=".log", delete=False) as log_file:
        log_path = Path(log_file.name)
    with log_path.open("wb") as log_out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diary_ws", "serve", *args], env=env, stdout=log_out, stderr=subprocess.STDOUT,
            cwd=ROOT, preexec_fn=None if open_files is None else functools.partial(_limit_files, open_files),
        )  # fmt: skip
    server = Server(port, proc, log_path, env)
    try:
        wait_until(lambda: _ready(port, proc), START_TIMEOUT, "the server to answer /healthz")
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def raw_handshake(port: int, path: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket that completes the handshake over a bare socket and then reads only when told to.

    A small `rcvbuf` makes the peer's receive window tiny, as a stalled phone on a bad network would.
    """
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte, so no frame after the head is consumed
        if not chunk:
            raise AssertionError(f"server closed during the handshake: {head!r}")
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def drain_until_closed(sock: socket.socket, limit: float) -> str:
    """Read and discard until the server ends the connection; 'reset' or 'eof'. Fails after `limit` s."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return "eof"
        except TimeoutError:
            continue
        except ConnectionResetError:
            return "reset"
    raise AssertionError(f"the server did not end the connection within {limit} s")


def vm_rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime and stime, in clock ticks


def open_fds(pid: int) -> int:
    """How many file descriptors a process holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.asynccontextmanager
async def serve_in_process(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with real uvicorn inside this event loop; yields its base URL (no scheme)."""
    import uvicorn

    from diary_ws.edge import DiaryWebSocketProtocol
    from diary_ws.metrics import loop_name

    if _loop[0] is not None:  # the test is parametrized over the loop: anyio_backend must have followed
        assert loop_name() == _loop[0], f"the test runs on {loop_name()}, not {_loop[0]}"
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ws=DiaryWebSocketProtocol, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await async_wait_until(lambda: server.started or task.done(), START_TIMEOUT, "uvicorn to start")
        assert server.started, "uvicorn did not start"
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def next_frame(ws: ClientConnection, limit: float = 5) -> dict[str, Any]:
    """The next JSON frame a listener gets, within `limit` seconds."""
    frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), limit))
    return frame


@dataclass
class RedisServer:
    """A `redis-server` of our own on a free port: no persistence, so a restart loses everything, unless
    `persistent` (an append-only file synced on every write, as a deployment that must not lose keys runs it)."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    persistent: bool = False
    extra: tuple[str, ...] = ()  # more redis-server arguments (a cluster node's)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server not found: install Debian's redis-server package (.ci/run does)")
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *(("--appendonly", "yes", "--appendfsync", "always") if self.persistent else ("--appendonly", "no")),
             "--dir", str(self.workdir), *self.extra],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_until(self.pings, START_TIMEOUT, f"redis-server on port {self.port} to answer PING")

    def pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the data goes with it (unless persistent: then what was acknowledged is in the file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class RedisClusterServers:
    """A Redis Cluster of our own: `masters` redis-servers (each with `replicas` replicas) joined by
    `redis-cli --cluster create`, every slot covered."""

    servers: list[RedisServer]

    @property
    def url(self) -> str:
        """diary-ws's URL for it: any one node will do; the client finds the others."""
        return f"redis-cluster://127.0.0.1:{self.servers[0].port}"

    def ask(self, server: RedisServer, *command: str) -> str:
        """One redis-cli command to one node, its output."""
        cli = shutil.which("redis-cli")
        assert cli is not None
        done = subprocess.run([cli, "-p", str(server.port), *command], capture_output=True, text=True, timeout=10)
        return done.stdout

    def ready(self) -> bool:
        """Every slot covered, and every replica in sync with its master (a replica that never synced cannot
        take over when its master dies)."""
        live = [server for server in self.servers if server.proc is not None and server.proc.poll() is None]
        for server in live:
            if "cluster_state:ok" not in self.ask(server, "cluster", "info"):
                return False
            replication = self.ask(server, "info", "replication")
            if "role:slave" in replication and "master_link_status:up" not in replication:
                return False
        return True

    def master_of(self, key: str) -> RedisServer:
        """The node that serves `key`'s slot now."""
        slot = int(self.ask(self.servers[0], "cluster", "keyslot", key).strip())
        for line in self.ask(self.servers[0], "cluster", "nodes").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
                    return next(s for s in self.servers if s.port == port)
        raise AssertionError(f"no master serves slot {slot}")


@contextlib.contextmanager
def redis_cluster(masters: int = 3, replicas: int = 0, full_coverage: bool = True) -> Iterator[RedisClusterServers]:
    """A fresh Redis Cluster for a test; skips when redis-server or redis-cli is missing. Without
    `full_coverage`, the masters left serve their slots while another is down."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not found: install Debian's redis-tools package (.ci/run does)")
    with tempfile.TemporaryDirectory(prefix="diary-ws-rcluster-") as top:
        servers: list[RedisServer] = []
        try:
            for i in range(masters * (1 + replicas)):
                workdir = Path(top) / str(i)
                workdir.mkdir()
                # The bus port is a free one of its own: the default, port + 10,000, may be an ephemeral port
                # another test's connection holds.
                extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "1000", "--cluster-port", str(free_port()),
                         "--repl-diskless-sync-delay", "0",
                         "--cluster-require-full-coverage", "yes" if full_coverage else "no")  # fmt: skip
                server = RedisServer(free_port(), workdir, extra=extra)
                servers.append(server)
                server.start()
            cluster = RedisClusterServers(servers)
            cli = shutil.which("redis-cli")
            assert cli is not None
            subprocess.run(
                [cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            wait_until(cluster.ready, START_TIMEOUT * 3, "the Redis Cluster to cover every slot")
            yield cluster
        finally:
            for server in servers:
                server.kill()


@contextlib.contextmanager
def redis_server(persistent: bool = False) -> Iterator[RedisServer]:
    """A fresh redis-server for a test (never the one on 6379); skips when the binary is missing."""
    with tempfile.TemporaryDirectory(prefix="diary-ws-redis-") as workdir:
        server = RedisServer(free_port(), Path(workdir), persistent=persistent)
        try:
            server.start()
            yield server
        finally:
            server.kill()
