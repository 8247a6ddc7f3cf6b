"""`diary_ws.Sender` and `AsyncSender` against real servers, and a real flaky proxy where a failure is needed."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.sync.client import ClientConnection, connect

from diary_ws import AsyncSender, Failed, NoListeners, Presence, Refused, Sender, SenderError, Sent, Unavailable
from tests.utils import Server, free_port, run_server, wait_until

LIMIT = 10.0


def frames(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [orjson.loads(ws.recv(timeout=LIMIT)) for _ in range(n)]


def nothing_more(ws: ClientConnection) -> None:
    with pytest.raises(TimeoutError):
        ws.recv(timeout=0.3)  # a bounded wait for a negative


class FlakyProxy:
    """An HTTP server in front of `upstream` that plays a script of answers before it forwards for real.

    Each step is "503", "409", "504-after" (forward, then answer 504 as if the answer were lost), "close"
    (hang up without an answer), or an HTML status page such as "html-404". It records every request's
    Idempotency-Key.
    """

    def __init__(self, upstream: str, script: list[str]) -> None:
        self.upstream = upstream
        self.script = list(script)
        self.keys: list[str | None] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            do_POST = do_DELETE = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        self.keys.append(request.headers.get("Idempotency-Key"))
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        step = self.script.pop(0) if self.script else "forward"
        if step == "close":
            request.close_connection = True
            request.wfile.flush()
            request.connection.shutdown(2)
            return
        if step.startswith("html-"):
            page = f"<html>\r\n<head><title>{step[5:]} Not Found</title></head>\r\n<body>\r\n<center><h1>404</h1>"
            page += "</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
            return self.answer(request, int(step[5:]), page.encode(), "text/html")
        if step in ("503", "409"):
            doc = {"status": "error", "message": f"scripted {step}"}
            return self.answer(request, int(step), orjson.dumps(doc), "application/json", {"Retry-After": "0"})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        upstream = httpx.request(request.command, self.upstream + request.path, content=body, headers=headers)
        if step == "504-after":
            doc = {"status": "error", "message": "scripted 504: the message may or may not have been stored"}
            return self.answer(request, 504, orjson.dumps(doc), "application/json")
        kind = upstream.headers.get("content-type", "application/json")
        self.answer(request, upstream.status_code, upstream.content, kind, dict(upstream.headers))

    @staticmethod
    def answer(
        request: http.server.BaseHTTPRequestHandler, status: int, body: bytes, kind: str, extra: Any = None
    ) -> None:
        request.send_response(status)
        for name, value in (extra or {}).items():
            if name.lower() in ("retry-after", "idempotent-replayed"):
                request.send_header(name, value)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


@contextlib.contextmanager
def flaky(upstream: str, script: list[str]) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(upstream, script)
    thread = threading.Thread(target=proxy.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.server.shutdown()
        proxy.server.server_close()
        thread.join(timeout=LIMIT)


# --- the happy paths ------------------------------------------------------------------------------------------


def test_send_send_many_status_presence_disconnect(server: Server) -> None:
    with Sender(server.http) as sender, connect(server.listen_url("alice")) as alice:
        sent = sender.send("hello", ["alice"], type="task.done", data={"task": 42})
        assert isinstance(sent, Sent)
        assert sent.sent_count == 1
        assert sent.message == "Notification sent to 1 user"
        frame = frames(alice, 1)[0]
        assert (frame["id"], frame["type"], frame["data"]) == (sent.id, "task.done", {"task": 42})
        results = sender.send_many(["to all", {"message": "to bob", "user_ids": ["bob"]}, {"message": ""}])
        assert isinstance(results[0], Sent)
        assert results[1] == Failed(404, results[1].message)
        assert isinstance(results[2], Failed)
        assert results[2].code == 422
        assert [f["message"] for f in frames(alice, 1)] == ["to all"]
        assert sender.presence("alice") == Presence("alice", True, 1)
        assert sender.presence("bob") == Presence("bob", False, 0)
        assert sender.status()["active_user_ids"] == ["alice"]
        assert sender.disconnect("alice") == 1
    wait_until(lambda: not server.status()["active_user_ids"], LIMIT, "alice to be disconnected")
    server.assert_clean_log()


def test_send_many_splits_into_batches_and_keeps_the_order(server: Server) -> None:
    with Sender(server.http) as sender, connect(server.listen_url("alice")) as alice:
        results = sender.send_many([{"message": f"m{i}", "user_ids": ["alice"]} for i in range(7)], batch_size=3)
        assert all(isinstance(r, Sent) for r in results)
        assert [f["message"] for f in frames(alice, 7)] == [f"m{i}" for i in range(7)]
    assert "POST /api/v1/ws/notifications" in server.log()
    assert server.log().count("published a batch") == 3


@pytest.mark.anyio
async def test_the_async_sender_does_the_same(server: Server) -> None:
    with connect(server.listen_url("alice")) as alice:
        async with AsyncSender(server.http) as sender:
            sent = await sender.send("hi", ["alice"])
            assert frames(alice, 1)[0]["id"] == sent.id
            assert isinstance((await sender.send_many(["all"]))[0], Sent)
            assert (await sender.presence("alice")).connections == 1
            assert (await sender.status())["connected_users"] == 1
            with pytest.raises(NoListeners):
                await sender.send("x", ["nobody"])
            assert await sender.disconnect("alice") == 1


# --- settings from the environment ------------------------------------------------------------------------------


def test_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with run_server({"api_key": "first-key-0123456789,second-key-0123456789"}) as srv:
        monkeypatch.setenv("DIARY_WS_URL", srv.http + "/")
        monkeypatch.setenv("DIARY_WS_API_KEY", " second-key-0123456789 , first-key-0123456789")
        with Sender() as sender:
            assert sender.url == srv.http
            assert sender.status()["connected_users"] == 0  # the first key of the list was sent
        monkeypatch.delenv("DIARY_WS_URL")
        monkeypatch.setenv("DIARY_WS_HOST", "0.0.0.0")  # a server bound to every address: dial this machine
        monkeypatch.setenv("DIARY_WS_PORT", str(srv.port))
        with Sender() as sender:
            assert sender.url == f"http://127.0.0.1:{srv.port}"
            assert sender.presence("alice").connected is False
        with Sender(api_key="wrong") as sender, pytest.raises(Refused) as refused:
            sender.status()
        assert refused.value.status == 401
        srv.assert_clean_log()


def test_a_bad_url_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="must be an http:// or https:// URL"):
        Sender("ftp://example.com")
    monkeypatch.setenv("DIARY_WS_URL", "localhost:8000")
    with pytest.raises(ValueError, match="DIARY_WS_URL must be an http"):
        Sender()


# --- errors: the family, the status and the server's message ----------------------------------------------------


def test_errors_carry_the_status_and_the_servers_message(server: Server) -> None:
    with Sender(server.http) as sender:
        with pytest.raises(NoListeners) as nobody:
            sender.send("hello", ["bob"])
        assert nobody.value.status == 404
        assert "No active connections" in nobody.value.message
        with pytest.raises(Refused) as invalid:
            sender.send("hello", type="resume")
        assert invalid.value.status == 422
        assert "type: 'resume' is reserved" in invalid.value.message
        with pytest.raises(Refused) as bad_id:
            sender.presence("a b")
        assert bad_id.value.status == 400
        with pytest.raises(TypeError):
            sender.send("hello", "alice")  # a lone id, not a list
    with Sender(server.http + "/wrong/prefix") as sender, pytest.raises(Refused) as wrong:
        sender.send("hello")
    assert wrong.value.status == 404  # a missing route is not "nobody listening"
    assert "is the base URL right" in wrong.value.message
    assert not isinstance(wrong.value, NoListeners)


def test_an_html_error_page_is_summarised_on_one_line(server: Server) -> None:
    with flaky(server.http, ["html-404"]) as proxy, Sender(proxy.url) as sender, pytest.raises(Refused) as page:
        sender.send("hello")
    assert page.value.status == 404
    assert "\n" not in str(page.value)
    assert "not a diary-ws answer (text/html): 404 Not Found" in page.value.message


# --- retries: only what is safe, with the same key, up to the deadline ------------------------------------------


def test_a_lost_answer_is_retried_with_the_same_key_and_delivered_once(server: Server) -> None:
    with connect(server.listen_url("alice")) as alice, flaky(server.http, ["504-after", "503", "409"]) as proxy:
        with Sender(proxy.url) as sender:
            sent = sender.send("exactly once", ["alice"])
        assert len(proxy.keys) == 4
        assert len(set(proxy.keys)) == 1
        assert proxy.keys[0]
        assert frames(alice, 1)[0]["id"] == sent.id  # the retry got the first answer, with its id
        nothing_more(alice)
    server.assert_clean_log()


def test_a_batch_is_retried_with_the_same_key_too(server: Server) -> None:
    with connect(server.listen_url("alice")) as alice, flaky(server.http, ["504-after", "close"]) as proxy:
        with Sender(proxy.url) as sender:
            results = sender.send_many([{"message": f"b{i}", "user_ids": ["alice"]} for i in range(3)])
        assert len(set(proxy.keys)) == 1
        assert [f["id"] for f in frames(alice, 3)] == [r.id for r in results if isinstance(r, Sent)]
        nothing_more(alice)


def test_429_waits_for_retry_after_and_then_passes() -> None:
    with run_server({"rate_limit": "1/s:1"}) as srv, connect(srv.listen_url("alice")):
        with Sender(srv.http) as sender:
            sender.send("one", ["alice"])
            started = time.monotonic()
            assert sender.send("two", ["alice"]).sent_count == 1
            assert time.monotonic() - started >= 0.9  # it waited for the token, as Retry-After said
        srv.assert_clean_log()


def test_what_is_not_safe_to_retry_is_raised_at_once(server: Server) -> None:
    with flaky(server.http, []) as proxy, Sender(proxy.url) as sender:
        with pytest.raises(Refused):
            sender.send("x", type="heartbeat")
        with pytest.raises(NoListeners):
            sender.send("x", ["nobody"])
        assert len(proxy.keys) == 2  # one attempt each
        assert proxy.keys[0] != proxy.keys[1]  # and a key of its own per send


def test_a_server_that_comes_up_within_the_deadline_is_reached() -> None:
    port = free_port()
    sender = Sender(f"http://127.0.0.1:{port}", deadline=30)
    outcome: list[dict[str, Any] | BaseException] = []

    def ask() -> None:
        try:
            outcome.append(sender.status())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        with run_server(port=port):
            thread.join(timeout=40)
            assert outcome
            assert isinstance(outcome[0], dict), outcome
            assert outcome[0]["status"] == "active"
    finally:
        thread.join(timeout=40)
        sender.close()


def test_the_deadline_bounds_every_call(server: Server) -> None:
    with flaky(server.http, ["503"] * 1000) as proxy, Sender(proxy.url, deadline=1.5) as sender:
        started = time.monotonic()
        with pytest.raises(Unavailable) as down:
            sender.send("x")
        assert time.monotonic() - started < 1.5 + 1
        assert down.value.status == 503
        assert len(proxy.keys) >= 2
    with Sender(f"http://127.0.0.1:{free_port()}", deadline=1) as sender:
        started = time.monotonic()
        with pytest.raises(Unavailable) as gone:
            sender.status()
        assert gone.value.status is None
        assert "cannot reach" in gone.value.message
        assert time.monotonic() - started < 1 + 1
    assert issubclass(Unavailable, SenderError)
