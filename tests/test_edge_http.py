"""The HTTP edge under attack, over a real server and raw sockets: every bound of docs/limits.md's HTTP rows.

Each test is the attack first (it held the server before the bound existed), then the bound it must meet:
refused or closed within its clock plus 1 s, memory and log bytes within the issue's figures, and an
ordinary POST or status answering meanwhile.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

import orjson
import pytest

from tests.utils import (
    LOOPS,
    ON_BOTH_LOOPS,
    Server,
    access_statuses,
    open_fds,
    raw_handshake,
    run_server,
    vm_rss_kib,
    wait_until,
)

LOG_BOUND = 5 * 1024 * 1024  # bytes of log any attack may cost
HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def read_answer(sock: socket.socket, limit: float = 5) -> tuple[int, dict[str, object] | None, bool]:
    """(status, JSON body or None, closed after it) of one answer the server sends on `sock`."""
    sock.settimeout(limit)
    data = b""
    deadline = time.monotonic() + limit
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"closed before an answer: {data!r}")
        data += chunk
        assert time.monotonic() < deadline
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    lines = head.split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    closed = closes_within(sock, 2) if b"connection: close" in head.lower() else False
    return status, orjson.loads(body[:length]) if length else None, closed


def closes_within(sock: socket.socket, limit: float) -> bool:
    """True when the server ends the connection (EOF or reset) within `limit` s, reading what comes first."""
    sock.settimeout(limit)
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def silent_close_within(sock: socket.socket, limit: float) -> bool:
    """True when the server closes `sock` within `limit` s without sending a byte."""
    sock.settimeout(limit)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def assert_bounded_log(server: Server) -> None:
    text = server.log()
    assert len(text.encode()) < LOG_BOUND, len(text)
    assert "Traceback" not in text, text[-3000:]
    assert "EMFILE" not in text, text[-3000:]
    assert "Too many open files" not in text, text[-3000:]


def still_serves(server: Server) -> None:
    """An ordinary sender and an operator are answered at once."""
    assert server.post({"message": "hi", "user_ids": ["nobody"]}).status_code == 404
    assert server.get("/api/v1/ws/status").status_code == 200


@pytest.fixture(scope="module", params=LOOPS)
def quick_clocks(request: pytest.FixtureRequest) -> Iterator[Server]:
    """Clocks of a second, small caps: what the edge does at its bounds, quickly; once per event loop."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed: make install brings it")
    settings = {"header_timeout": "1", "body_timeout": "1.5", "max_header_bytes": "4096", "loop": request.param}
    with run_server(settings) as srv:
        assert f'loop="{request.param}"' in srv.get("/metrics").text
        yield srv
        assert_bounded_log(srv)


# --- clocks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # a head that never ends
        b"GET /api/v1/ws/alice HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",  # an upgrade
        b"G",  # one byte
    ],
)
def test_a_partial_head_gets_408_within_its_clock(quick_clocks: Server, partial: bytes) -> None:
    sock = connect(quick_clocks.port)
    started = time.monotonic()
    sock.sendall(partial)
    status, body, closed = read_answer(sock, limit=3)
    assert status == 408
    assert body is not None
    assert body["status"] == "error"
    assert "1 s" in str(body["message"])
    assert closed
    assert time.monotonic() - started < 1 + 1.5  # clock + 1 s, and a little for a shared box
    still_serves(quick_clocks)


def test_a_connection_that_sends_nothing_is_closed_silently(quick_clocks: Server) -> None:
    sock = connect(quick_clocks.port)
    started = time.monotonic()
    assert silent_close_within(sock, 3)
    assert time.monotonic() - started < 2.5


def test_the_head_clock_restarts_after_each_answer(quick_clocks: Server) -> None:
    sock = connect(quick_clocks.port)
    for _ in range(3):  # each answer restarts the clock: three requests over more than one clock are fine
        sock.sendall(HEAD)
        status, _, _ = read_answer(sock)
        assert status == 200
        time.sleep(0.4)  # the pace of a slow but honest client, below the clock
    sock.sendall(HEAD[:10])
    status, _, closed = read_answer(sock, limit=3)
    assert status == 408
    assert closed


def test_a_slow_body_gets_408_within_its_clock(quick_clocks: Server) -> None:
    sock = connect(quick_clocks.port)
    started = time.monotonic()
    sock.sendall(
        b"POST /api/v1/ws/notification HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"message": '
    )
    deadline = time.monotonic() + 4
    answer: tuple[int, dict[str, object] | None, bool] | None = None
    sock.settimeout(0.3)
    while answer is None and time.monotonic() < deadline:  # a byte now and then, never the whole body
        try:
            sock.send(b" ")
        except OSError:
            break
        try:
            peek = sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            continue
        if peek:
            answer = read_answer(sock)
    assert answer is not None, "no answer to a body that never ends"
    status, body, closed = answer
    assert status == 408
    assert body is not None
    assert "body" in str(body["message"])
    assert closed
    assert time.monotonic() - started < 1.5 + 1.5


def test_a_chunked_body_that_never_ends_gets_408(quick_clocks: Server) -> None:
    sock = connect(quick_clocks.port)
    sock.sendall(
        b"POST /api/v1/ws/notification HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"
    )
    status, _, closed = read_answer(sock, limit=4)
    assert status == 408
    assert closed


# --- bytes of a head ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Many: b\r\n" * 500 + b"\r\n", 431),
        (b"GET /healthz?" + b"q" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (
            b"GET /api/v1/ws/alice HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"X-Big: " + b"a" * 5000 + b"\r\n\r\n",
            431,
        ),
    ],
    ids=["one-long-header", "many-headers", "long-request-line", "upgrade-long-header"],
)
def test_a_head_over_max_header_bytes_is_refused(quick_clocks: Server, request_bytes: bytes, expected: int) -> None:
    sock = connect(quick_clocks.port)
    with contextlib.suppress(OSError):  # the server may have answered and closed before it read it all
        sock.sendall(request_bytes)
    status, body, closed = read_answer(sock)
    assert status == expected
    assert body is not None
    assert "MAX_HEADER_BYTES" in str(body["message"])
    assert closed


def test_a_head_just_under_the_limit_passes(quick_clocks: Server) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: "
    padding = 4096 - len(head) - 4
    sock = connect(quick_clocks.port)
    sock.sendall(head + b"p" * padding + b"\r\n\r\n")
    status, _, _ = read_answer(sock)
    assert status == 200


def test_a_head_split_in_many_reads_passes(quick_clocks: Server) -> None:
    sock = connect(quick_clocks.port)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in HEAD:  # the empty line that ends the head straddles reads
        sock.send(bytes([byte]))
    status, _, _ = read_answer(sock)
    assert status == 200


@ON_BOTH_LOOPS  # servers of its own: on each event loop
def test_a_50_mb_header_line_is_answered_with_bounded_memory() -> None:
    with run_server() as server:
        rss = vm_rss_kib(server.proc.pid)
        sock = connect(server.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        block = b"z" * 65536
        sock.settimeout(2)
        try:
            while sent < 50 * 1024 * 1024:
                sent += sock.send(block)
        except OSError:
            pass  # answered and closed: the server read no further
        status, body, _ = read_answer(sock)
        assert status == 431
        assert body is not None
        assert sent < 50 * 1024 * 1024, "the server read the whole line"
        assert vm_rss_kib(server.proc.pid) - rss < 20 * 1024
        still_serves(server)
        assert_bounded_log(server)


# --- pipelining -----------------------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(quick_clocks: Server) -> None:
    post = (
        b"POST /api/v1/ws/notification HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 41\r\n\r\n{"message": "hi", "user_ids": ["nobody"]}'
    )
    sock = connect(quick_clocks.port)
    sock.sendall((HEAD + post) * 50)
    sock.settimeout(5)
    answers = sock.makefile("rb")
    statuses = []
    for _ in range(100):
        status = int(answers.readline().split()[1])
        length = 0
        while (line := answers.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        answers.read(length)
        statuses.append(status)
    assert statuses == [200, 404] * 50


@ON_BOTH_LOOPS  # servers of its own: on each event loop
def test_20_mb_of_pipelined_requests_never_read_cost_bounded_memory() -> None:
    with run_server() as server:
        rss = vm_rss_kib(server.proc.pid)
        sock = connect(server.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        batch = HEAD * 2000
        sent = 0
        sock.settimeout(3)
        try:
            while sent < 20 * 1024 * 1024:
                sent += sock.send(batch)
        except TimeoutError:
            pass  # the server stopped reading: its answers are not read, so it reads no further requests
        grown = vm_rss_kib(server.proc.pid) - rss
        assert grown < 100 * 1024, f"+{grown} KiB"
        still_serves(server)
        sock.close()
        assert_bounded_log(server)


# --- file descriptors -----------------------------------------------------------------------------------------


def slow_head(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return sock


@ON_BOTH_LOOPS  # servers of its own: on each event loop
def test_slow_heads_past_the_cap_are_evicted_and_a_post_still_answers() -> None:
    """1,100 slow connections against an open-file limit of 512: the oldest go, nobody meets EMFILE."""
    with run_server({"header_timeout": "60"}, open_files=512) as server:
        socks: list[socket.socket] = []
        try:
            for _ in range(600):  # past the HTTP cap (51) and past the open-file limit itself
                with contextlib.suppress(OSError):  # evicted between connect and send
                    socks.append(slow_head(server.port))
            still_serves(server)
            assert open_fds(server.proc.pid) < 512
            # The oldest slow heads were evicted, the newest still wait.
            assert closes_within(socks[0], 2)
            assert not closes_within(socks[-1], 0.2)
        finally:
            for sock in socks:
                sock.close()
        still_serves(server)
        text = server.log()
        assert text.count("waited longest") < 40, "one eviction line a second at most"
        assert_bounded_log(server)


@ON_BOTH_LOOPS  # servers of its own: on each event loop
def test_when_nobody_can_be_evicted_a_new_connection_gets_503() -> None:
    body_start = (
        b"POST /api/v1/ws/notification HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    with run_server({"max_http_connections": "10", "body_timeout": "60"}) as server:
        socks: list[socket.socket] = []
        deadline = time.monotonic() + 30  # a loaded box reads the ten heads late: room for a few rounds
        while True:
            # Ten bodies under way; one the server had not read the head of yet may have been evicted: replace it.
            socks = [sock for sock in socks if is_open(sock)]
            if len(socks) < 10:
                while len(socks) < 10:
                    socks.append(connect(server.port))
                    socks[-1].sendall(body_start)
                # A newcomer accepted in the same batch as these finds their heads unread and evicts one (as it
                # should): give the server a beat to read them before the newcomer comes, each round.
                time.sleep(0.2)
            refused = connect(server.port)
            refused.settimeout(2.0)
            try:
                if refused.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                pass
            refused.close()  # waiting for a head, it would be the next one evicted
            assert time.monotonic() < deadline, "no 503"
        status, body, closed = read_answer(refused)
        assert status == 503
        assert body is not None
        assert "too many HTTP connections" in str(body["message"])
        assert closed
        for sock in socks:
            sock.close()
        wait_until(lambda: _answers(server), 5, "room once the bodies hang up")
        assert_bounded_log(server)


def is_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return bool(sock.recv(1, socket.MSG_PEEK)) or False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def _answers(server: Server) -> bool:
    try:
        return server.get("/healthz").status_code == 200
    except Exception:
        return False


def test_settings_past_the_open_file_limit_stop_start_up(tmp_path: object) -> None:
    import subprocess
    import sys

    from tests.utils import ROOT, _limit_files

    env = {"DIARY_WS_MAX_CONNECTIONS": "1000", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "diary_ws", "serve"], env=env, cwd=ROOT, capture_output=True, timeout=30,
        preexec_fn=lambda: _limit_files(512),
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "open-file limit" in lines[0], lines


@ON_BOTH_LOOPS  # servers of its own: on each event loop
def test_listeners_do_not_count_as_http_connections() -> None:
    """SSE streams and upgraded WebSockets are listeners (MAX_CONNECTIONS): they leave the HTTP cap free."""
    with run_server({"max_http_connections": "4"}) as server:
        streams = []
        for i in range(6):
            sock = connect(server.port)
            sock.sendall(f"GET /api/v1/sse/s{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert b" 200 " in sock.recv(4096).split(b"\r\n", 1)[0]
            streams.append(sock)
        sockets = [raw_handshake(server.port, f"/api/v1/ws/w{i}") for i in range(6)]
        for _ in range(3):  # each answer is a new connection: it is admitted, not refused
            still_serves(server)
        assert server.status()["total_connections"] == 12
        for sock in streams + sockets:
            sock.close()
        assert 503 not in access_statuses(server.log())
        assert "with 503" not in server.log()  # nor a refusal logged
        assert_bounded_log(server)


@pytest.mark.parametrize(("limit", "http", "listeners"), [(1024, 102, 730), (65536, 1000, 64344), (4096, 409, 3495)])
def test_the_descriptor_budget_follows_the_open_file_limit(limit: int, http: int, listeners: int) -> None:
    from diary_ws.settings import FD_RESERVE, Settings, fd_budget

    assert fd_budget(Settings(), limit) == (http, listeners)
    assert http + listeners + FD_RESERVE == limit
