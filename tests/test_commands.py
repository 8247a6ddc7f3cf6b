"""`diary-ws listen | send | status | token` as real subprocesses against real servers."""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest

from diary_ws.messages import rfc3339
from tests.utils import ROOT, Server, free_port, run_server, wait_until

LIMIT = 20.0


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    env.update(extra or {})
    return env


def diary_ws(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one `diary-ws` command to the end."""
    return subprocess.run(
        [sys.executable, "-m", "diary_ws", *args], env=cli_env(env), capture_output=True, text=True, timeout=LIMIT,
        cwd=ROOT,
    )  # fmt: skip


class Listener:
    """A running `diary-ws listen`, its stdout read line by line in a thread so every read has a timeout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "diary_ws", "listen", *args], env=cli_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next(self) -> dict[str, Any]:
        """The next notification line, as JSON, within LIMIT seconds."""
        try:
            line = self.lines.get(timeout=LIMIT)
        except queue.Empty:
            raise AssertionError(f"no line from `diary-ws listen` within {LIMIT} s") from None
        frame: dict[str, Any] = orjson.loads(line)
        return frame

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Signal it; its exit code and stderr."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=LIMIT)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


@contextlib.contextmanager
def listening(*args: str) -> Iterator[Listener]:
    listener = Listener(*args)
    try:
        yield listener
    finally:
        if listener.proc.poll() is None:
            listener.proc.kill()
            listener.proc.wait(timeout=LIMIT)


def connected(server: Server, user_id: str) -> bool:
    return user_id in server.status()["active_user_ids"]


def sent(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = orjson.loads(result.stdout)
    assert answer["status"] == "success"
    return answer


# --- send, listen, status -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_send_reaches_listen_and_status_shows_it(server: Server, sig: int) -> None:
    with listening("alice", "--url", server.http) as listener:
        wait_until(lambda: connected(server, "alice"), LIMIT, "listen to connect")
        status = diary_ws("status", "--url", server.http)
        assert status.returncode == 0, status.stderr
        assert orjson.loads(status.stdout) == server.status()
        args = ("--user", "alice", "--type", "task.done", "--data", '{"task": 42}', "--url", server.http)
        answer = sent(diary_ws("send", "hello", *args))
        assert answer["sent_count"] == 1
        assert listener.next() == {
            "type": "task.done", "message": "hello", "id": answer["id"], "sent_at": rfc3339_of(answer["id"]),
            "data": {"task": 42},
        }  # fmt: skip
        code, err = listener.stop(sig)
    assert code == 0, err
    assert "Traceback" not in err
    wait_until(lambda: not connected(server, "alice"), LIMIT, "listen's socket to close")


def rfc3339_of(msg_id: str) -> str:
    return rfc3339(int(msg_id.split("-")[0]))


def test_listen_survives_a_server_restart_with_nothing_lost() -> None:
    port = free_port()
    with run_server(port=port) as first, listening("alice", "--url", first.http) as listener:
        wait_until(lambda: connected(first, "alice"), LIMIT, "listen to connect")
        before = [sent(diary_ws("send", f"before {i}", "--user", "alice", "--url", first.http)) for i in range(3)]
        got = [listener.next() for _ in range(3)]
        first.terminate()
        with run_server(port=port) as second:
            wait_until(lambda: connected(second, "alice"), LIMIT, "listen to reconnect by itself")
            after = [sent(diary_ws("send", f"after {i}", "--user", "alice", "--url", second.http)) for i in range(3)]
            got += [listener.next() for _ in range(3)]
            code, err = listener.stop()
            second.assert_clean_log()
    assert [g["id"] for g in got] == [a["id"] for a in before + after]
    assert listener.lines.empty()  # nothing twice
    assert code == 0
    assert "1012" in err  # it says on stderr what happened: the restart, and that history was lost
    assert "may have been missed" in err


def test_listen_stops_cleanly_while_waiting_for_a_server_that_is_down() -> None:
    with listening("alice", "--url", f"http://127.0.0.1:{free_port()}") as listener:
        assert listener.proc.stderr is not None
        first = listener.proc.stderr.readline()  # blocks until it has tried once; bounded by the fixture's kill
        assert "cannot connect" in first
        assert "retrying in" in first
        code, err = listener.stop()
    assert code == 0
    assert "Traceback" not in err


def test_listen_into_a_pipe_that_closes_exits_quietly(server: Server) -> None:
    # Like `diary-ws listen alice | head -1`. No reader thread here: closing a pipe a thread reads would block.
    proc = subprocess.Popen(
        [sys.executable, "-m", "diary_ws", "listen", "alice", "--url", server.http], env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        wait_until(lambda: connected(server, "alice"), LIMIT, "listen to connect")
        sent(diary_ws("send", "one", "--user", "alice", "--url", server.http))
        assert select.select([proc.stdout], [], [], LIMIT)[0], "no line from listen"
        assert orjson.loads(proc.stdout.readline())["message"] == "one"
        proc.stdout.close()
        for _ in range(3):  # the first write after the close can still land in the pipe's buffer
            diary_ws("send", "more", "--user", "alice", "--url", server.http)
        assert proc.wait(timeout=LIMIT) == 0
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=LIMIT)


def test_send_exit_codes(server: Server) -> None:
    nobody = diary_ws("send", "hello", "--user", "bob", "--url", server.http)
    assert nobody.returncode == 3
    assert "HTTP 404: No active connections" in nobody.stderr
    assert nobody.stdout == ""
    refused = diary_ws("send", "hello", "--type", "resume", "--url", server.http)
    assert refused.returncode == 4
    assert "HTTP 422: type: 'resume' is reserved" in refused.stderr
    bad_data = diary_ws("send", "hello", "--data", "{oops", "--url", server.http)
    assert bad_data.returncode == 2
    assert "--data is not valid JSON" in bad_data.stderr
    unreachable = diary_ws("send", "hello", "--url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1
    assert "cannot reach" in unreachable.stderr
    for result in (nobody, refused, bad_data, unreachable):
        assert "Traceback" not in result.stderr
    server.assert_clean_log()


def test_listen_refused_for_good_exits_4(server: Server) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "diary_ws", "listen", "alice", "--url", server.http + "/wrong/prefix"],
        env=cli_env(), capture_output=True, text=True, timeout=LIMIT, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 4
    assert "refused the connection (HTTP 404): no WebSocket endpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_listen_arguments_exit_2() -> None:
    result = diary_ws("listen", "a b")
    assert result.returncode == 2
    assert "user_id 'a b' is not valid" in result.stderr


def test_api_keys_from_the_flag_the_variable_or_its_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("old-key-0123456789\nnew-key-0123456789\n")
    with run_server({"api_key": "new-key-0123456789,old-key-0123456789"}) as srv:

        def status(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return diary_ws("status", "--url", srv.http, *args, env=env)

        assert status("--api-key", "old-key-0123456789").returncode == 0
        assert (
            status(env={"DIARY_WS_API_KEY": " new-key-0123456789 , wrong"}).returncode == 0
        )  # the first key of the list
        assert status(env={"DIARY_WS_API_KEY_FILE": str(key_file)}).returncode == 0
        for refused in (
            status(),
            status("--api-key", "wrong"),
            status(env={"DIARY_WS_API_KEY": "wrong,new-key-0123456789"}),
        ):
            assert refused.returncode == 4
            assert "HTTP 401" in refused.stderr
        nobody = diary_ws("send", "hi", "--url", srv.http, "--api-key", "new-key-0123456789")
        assert nobody.returncode == 3  # past the key check: nobody listens
        srv.assert_clean_log()


def test_a_minted_token_lets_listen_in_and_no_token_is_refused() -> None:
    secret = "a-secret-of-at-least-32-bytes-for-hs256"
    with run_server({"jwt_secret": secret}) as srv:
        token = diary_ws("token", "alice", "--ttl", "60", env={"DIARY_WS_JWT_SECRET": secret}).stdout.strip()
        with listening("alice", "--url", srv.http, "--token", token) as listener:
            wait_until(lambda: connected(srv, "alice"), LIMIT, "listen to connect with its token")
            answer = sent(diary_ws("send", "for alice", "--user", "alice", "--url", srv.http))
            assert listener.next()["id"] == answer["id"]
            # An operator disconnect (log-out, ban) is final: listen stops and says why.
            assert httpx.delete(f"{srv.http}/api/v1/ws/users/alice/connections", timeout=LIMIT).status_code == 200
            assert listener.proc.wait(timeout=LIMIT) == 4
            assert listener.proc.stderr is not None
            assert "ended the connection with 4003" in listener.proc.stderr.read()
        for args in ((), ("--token", token + "x")):
            refused = subprocess.run(
                [sys.executable, "-m", "diary_ws", "listen", "alice", "--url", srv.http, *args],
                env=cli_env(), capture_output=True, text=True, timeout=LIMIT, cwd=ROOT,
            )  # fmt: skip
            assert refused.returncode == 4
            assert "refused the connection (HTTP 401)" in refused.stderr
        srv.assert_clean_log()


# --- token ------------------------------------------------------------------------------------------------


def test_token_mints_a_verifiable_hs256_jwt() -> None:
    secret = "a-secret-of-at-least-32-bytes-for-hs256"
    before = int(time.time())
    result = diary_ws("token", "alice", "--ttl", "120", env={"DIARY_WS_JWT_SECRET": secret})
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["sub", "exp", "iat"]})
    assert claims["sub"] == "alice"
    assert claims["exp"] - claims["iat"] == 120
    assert before <= claims["iat"] <= int(time.time())
    assert "aud" not in claims
    assert "iss" not in claims
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another secret of at least 32 bytes!", algorithms=["HS256"])


def test_token_adds_aud_and_iss_and_reads_the_secret_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "jwt-secret"
    secret_file.write_text("from-a-file-of-at-least-32-bytes-long\n")  # the newline of `echo ... > file`
    env = {"DIARY_WS_JWT_SECRET_FILE": str(secret_file), "DIARY_WS_JWT_AUDIENCE": "diary", "DIARY_WS_JWT_ISSUER": "me"}
    result = diary_ws("token", "alice", env=env)
    assert result.returncode == 0, result.stderr
    secret = "from-a-file-of-at-least-32-bytes-long"
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"], audience="diary", issuer="me")
    assert claims["exp"] - claims["iat"] == 3600


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("alice",), {}, "no JWT secret configured"),
        (("alice",), {"DIARY_WS_JWT_SECRET": "x" * 32, "DIARY_WS_JWT_SECRET_FILE": "/x"}, "not both"),
        (("alice",), {"DIARY_WS_JWT_SECRET_FILE": "/nonexistent/secret"}, "cannot read /nonexistent/secret"),
        (("a b",), {"DIARY_WS_JWT_SECRET": "x" * 32}, "user id 'a b' is not valid"),
        (("alice", "--ttl", "0"), {"DIARY_WS_JWT_SECRET": "x" * 32}, "--ttl must be at least 1"),
        (("alice",), {"DIARY_WS_JWT_SECRET": "short"}, "DIARY_WS_JWT_SECRET must be at least 32 bytes"),
    ],
    ids=["no-secret", "both", "unreadable-file", "bad-user", "bad-ttl", "short-secret"],
)
def test_token_errors_exit_2(args: tuple[str, ...], env: dict[str, str], message: str) -> None:
    result = diary_ws("token", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_serve_is_unchanged_and_every_command_has_help() -> None:
    for command in ("serve", "listen", "send", "status", "token"):
        result = diary_ws(command, "--help")
        assert result.returncode == 0, result.stderr
        assert f"diary-ws {command}" in result.stdout
    assert "--max-connections-per-user" in diary_ws("serve", "--help").stdout
