"""GET /api/v1/sse/{user_id}: the WebSocket's messages as Server-Sent Events, over a real server."""

from __future__ import annotations

import asyncio
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from diary_ws import Settings, create_app
from tests.sse_client import open_stream, raw_stream
from tests.utils import (
    Server,
    async_wait_until,
    drain_until_closed,
    next_frame,
    run_server,
    serve_in_process,
    wait_until,
)

WAIT = 5.0
CURL = shutil.which("curl")


def sse_url(server: Server, user_id: str, query: str = "") -> str:
    return f"{server.http}/api/v1/sse/{user_id}" + (f"?{query}" if query else "")


async def apost(server: Server, body: dict[str, object]) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"{server.http}/api/v1/ws/notification", json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, object] = answer.json()
    return result


async def connected(server: Server, total: int) -> None:
    await async_wait_until(
        lambda: server.status()["total_connections"] == total, WAIT, f"{total} connections in the status"
    )


# --- the stream itself -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sse_carries_the_same_frames_as_the_websocket_and_counts_as_a_connection(server: Server) -> None:
    async with open_stream(sse_url(server, "alice")) as events, connect(server.listen_url("alice")) as ws:
        headers = events.response.headers
        assert events.response.status_code == 200
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["cache-control"] == "no-cache"
        assert headers["x-accel-buffering"] == "no"
        await connected(server, 2)
        status = server.status()
        assert (status["connected_users"], status["active_user_ids"]) == (1, ["alice"])

        answer = await apost(server, {"message": "hi\nthere <b>", "type": "task.done", "data": {"n": [1, 2]}})
        assert (answer["sent_count"], answer["total_connections"], answer["disconnected_users"]) == (2, 2, 0)
        assert answer["message"] == "Notification sent to 1 user"  # one user, two connections

        event = await events.next()
        frame = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(frame, str)
        # Exactly `id:` then `data:` with the WebSocket's very JSON, and no `event:` line (docs/api.md).
        assert event.lines == [f"id: {answer['id']}", f"data: {frame}"]
        assert event.json() == {
            "type": "task.done", "message": "hi\nthere <b>", "id": answer["id"], "sent_at": event.json()["sent_at"],
            "data": {"n": [1, 2]},
        }  # fmt: skip


@pytest.mark.anyio
async def test_targeted_messages_reach_only_their_streams(server: Server) -> None:
    async with open_stream(sse_url(server, "alice")) as alice, open_stream(sse_url(server, "bob")) as bob:
        await connected(server, 2)
        to_bob = await apost(server, {"message": "for bob", "user_ids": ["bob"]})
        assert (to_bob["sent_count"], to_bob["total_connections"]) == (1, 1)
        everyone = await apost(server, {"message": "for all"})
        assert (everyone["sent_count"], everyone["total_connections"]) == (2, 2)
        assert [(await bob.next()).json()["message"] for _ in range(2)] == ["for bob", "for all"]
        assert (await alice.next()).json()["message"] == "for all"


@pytest.mark.anyio
async def test_resume_with_since_then_last_event_id_wins(server: Server) -> None:
    async with connect(server.listen_url("carol")):  # keeps carol listening, so the messages are stored
        await connected(server, 1)
        ids = [str((await apost(server, {"message": f"m{i}"}))["id"]) for i in range(3)]

        async with open_stream(sse_url(server, "carol", f"since={ids[0]}")) as events:
            replayed = [await events.next() for _ in range(2)]
            assert [(e.id, e.json()["message"]) for e in replayed] == [(ids[1], "m1"), (ids[2], "m2")]
            resume = await events.next()
            # The control frame has no id line, so it does not move the browser's Last-Event-ID.
            assert resume.lines == ['data: {"type":"resume","recovered":true,"replayed":2}']
            live = await apost(server, {"message": "live"})
            assert (await events.next()).id == live["id"]

        # An EventSource reconnecting keeps its URL (?since=) and sends the newer id it saw: the header wins.
        async with open_stream(sse_url(server, "carol", f"since={ids[0]}"), {"Last-Event-ID": ids[1]}) as events:
            assert [(await events.next()).json()["message"] for _ in range(2)] == ["m2", "live"]
            assert (await events.next()).json() == {"type": "resume", "recovered": True, "replayed": 2}

        # An id from before anything retained (say, before a restart): told so, and what is kept is replayed.
        async with open_stream(sse_url(server, "carol"), {"Last-Event-ID": "1-0"}) as events:
            assert len([await events.next() for _ in range(4)]) == 4
            assert (await events.next()).json() == {"type": "resume", "recovered": False, "replayed": 4}


@pytest.mark.anyio
async def test_a_fresh_stream_gets_no_control_frame(server: Server) -> None:
    async with open_stream(sse_url(server, "dave")) as events:
        await connected(server, 1)
        await apost(server, {"message": "first"})
        assert (await events.next()).json()["type"] == "notification"


@pytest.mark.anyio
async def test_ping_comment_every_ping_interval_not_stored_and_not_counted() -> None:
    with run_server({"ping_interval": "0.3"}) as srv:
        async with open_stream(sse_url(srv, "erin")) as events:
            started = time.monotonic()
            pings = [await events.next(2, pings=True) for _ in range(3)]
            assert all(p.lines == [": ping"] for p in pings)
            assert time.monotonic() - started > 0.6  # three pings take about 0.9 s, not a burst
            answer = await apost(srv, {"message": "after pings"})
            assert (answer["sent_count"], answer["total_connections"]) == (1, 1)
            assert (await events.next()).json()["message"] == "after pings"
        async with connect(srv.listen_url("erin", "since=1-0")) as ws:
            assert (await next_frame(ws))["message"] == "after pings"
            assert await next_frame(ws) == {"type": "resume", "recovered": False, "replayed": 1}
        srv.assert_clean_log()


@pytest.mark.anyio
async def test_hanging_up_frees_the_connection_at_once(server: Server) -> None:
    async with open_stream(sse_url(server, "frank")):
        await connected(server, 1)
    await async_wait_until(lambda: server.status()["total_connections"] == 0, 1.0, "the stream to be released")
    answer = server.post({"message": "anyone?", "user_ids": ["frank"]})
    assert answer.status_code == 404


# --- refusals: plain JSON answers before any stream starts ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "status", "words"),
    [
        ("/api/v1/sse/a%20b", {}, 400, "user_id"),
        ("/api/v1/sse/", {}, 400, "user_id"),
        ("/api/v1/sse/a/b", {}, 400, "user_id"),
        ("/api/v1/sse/" + "x" * 129, {}, 400, "user_id"),
        ("/api/v1/sse/%2E%2E", {}, 400, "user_id"),
        ("/api/v1/sse/ok?since=abc", {}, 400, "since"),
        ("/api/v1/sse/ok?since=1-0&since=2-0", {}, 400, "once"),
        ("/api/v1/sse/ok", {"Last-Event-ID": "nope"}, 400, "Last-Event-ID"),
        ("/api/v1/sse/ok?heartbeat=5", {}, 400, "PING_INTERVAL"),
        ("/api/v1/sse/ok?since=%FF", {}, 400, "since"),
    ],
)
def test_bad_requests_are_refused_with_json(
    shared_server: Server, path: str, headers: dict[str, str], status: int, words: str
) -> None:
    answer = shared_server.get(path, headers=headers)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["status"] == "error"
    assert words in body["message"]


def test_wrong_method_is_405_json(shared_server: Server) -> None:
    answer = httpx.post(f"{shared_server.http}/api/v1/sse/alice", timeout=10)
    assert answer.status_code == 405
    assert set(answer.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert answer.json()["status"] == "error"


def test_head_answers_the_stream_head_without_listening(server: Server) -> None:
    """A HEAD is not a listener: it must not take a slot, count as a connection, or turn a 404 into a 200
    for messages that a response without a body can never carry."""
    heads = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            heads.append(sock)
            sock.sendall(b"HEAD /api/v1/sse/holly HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                assert chunk, f"closed before the response head: {head!r}"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head
            assert b"text/event-stream" in head
        status = server.status()
        assert status["total_connections"] == 0, status
        assert server.post({"message": "anyone?", "user_ids": ["holly"]}).status_code == 404
        assert httpx.head(f"{server.http}/api/v1/sse/bad%20id", timeout=10).status_code == 400
    finally:
        for sock in heads:
            sock.close()


@pytest.mark.anyio
async def test_streams_and_sockets_share_the_per_user_and_global_limits() -> None:
    with run_server({"max_connections_per_user": "2", "max_connections": "3"}) as srv:
        async with open_stream(sse_url(srv, "gina")), connect(srv.listen_url("gina")):
            await connected(srv, 2)
            answer = srv.get("/api/v1/sse/gina")
            assert answer.status_code == 429
            assert "MAX_CONNECTIONS_PER_USER" in answer.json()["message"]
            async with open_stream(sse_url(srv, "hank")):
                await connected(srv, 3)
                answer = srv.get("/api/v1/sse/ivan")
                assert answer.status_code == 503
                assert "MAX_CONNECTIONS" in answer.json()["message"]
        await connected(srv, 0)
        srv.assert_clean_log()


# --- slow consumers, shutdown ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_stalled_stream_is_dropped_and_reset_while_a_reader_gets_everything(server: Server) -> None:
    stalled = raw_stream(server.port, "/api/v1/sse/stalled", rcvbuf=4096)
    async with open_stream(sse_url(server, "reader")) as events:
        await connected(server, 2)
        dropped = 0
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
            # 8 KB each: past what the kernel buffers hold (a few MB on loopback, docs/delivery.md), the 1 MiB backlog
            # overflows after about 130 more.
            for i in range(1500):
                body = (await client.post("/api/v1/ws/notification", json={"message": f"{i} " + "x" * 8000})).json()
                assert body["sent_count"] + body["disconnected_users"] == body["total_connections"]
                dropped += body["disconnected_users"]
                # The reader keeps up, so its own backlog never overflows.
                assert int((await events.next(10)).json()["message"].split()[0]) == i
                if dropped:
                    break
        assert dropped == 1
        assert server.status()["active_user_ids"] == ["reader"]
    assert drain_until_closed(stalled, 10) == "reset"  # aborted: it reads nothing, so it would never see an end
    stalled.close()
    assert "slow consumer: user stalled" in server.log()


@pytest.mark.anyio
async def test_a_stream_that_reads_nothing_for_the_ping_timeout_is_reset_below_the_backlog_caps() -> None:
    # Backlog caps far above the traffic: only the stall timer can free this reader.
    with run_server({"ping_timeout": "1", "send_queue_bytes": "64MiB", "send_queue_size": "100000"}) as srv:
        stalled = raw_stream(srv.port, "/api/v1/sse/sleepy", rcvbuf=4096)
        await connected(srv, 1)
        dropped = 0
        async with httpx.AsyncClient(base_url=srv.http, timeout=10) as client:
            for i in range(800):  # ~6.4 MB: past the kernel's buffers, so the transport pauses
                answer = (await client.post("/api/v1/ws/notification", json={"message": f"{i} " + "x" * 8000})).json()
                # On a slow box the stall timer fires before the loop ends. A publish may then still meet the
                # aborted stream before it is forgotten (more often on uvloop): "disconnected", never a cap.
                dropped += answer["disconnected_users"]
                if answer["total_connections"] == 0:
                    break
        assert dropped <= 1
        assert "diary_ws_slow_consumer_closes_total 0.0" in srv.get("/metrics").text  # no backlog cap fired
        await async_wait_until(lambda: srv.status()["total_connections"] == 0, 5, "the stalled stream to be freed")
        assert drain_until_closed(stalled, 5) == "reset"
        stalled.close()
        assert "aborting an event stream whose reader has read nothing for 1 s" in srv.log()
        srv.assert_clean_log()


@pytest.mark.anyio
async def test_sigterm_ends_open_streams_at_once_with_a_jittered_retry() -> None:
    with run_server() as srv:
        async with (
            open_stream(sse_url(srv, "a")) as a,
            open_stream(sse_url(srv, "b")) as b,
            open_stream(sse_url(srv, "c")) as c,
        ):
            await connected(srv, 3)
            started = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            for events in (a, b, c):
                last = await events.next(WAIT)
                retry = last.value("retry")
                assert retry is not None, last.lines
                assert 500 <= int(retry) <= 5000
                assert re.fullmatch(rf": closed \(1012\): server restarting: reconnect after {retry} ms", last.lines[1])
                with pytest.raises(EOFError):
                    await events.next(WAIT)  # and then the response is complete
            await asyncio.to_thread(srv.proc.wait, 10)
            took = time.monotonic() - started
        assert took < 2.0, f"exit took {took:.2f} s"  # uvicorn alone would wait out SHUTDOWN_TIMEOUT, then cancel
        assert srv.proc.returncode in (0, -signal.SIGTERM)
        srv.assert_clean_log()
        assert "Cancel" not in srv.log()


@pytest.mark.anyio
async def test_streams_stay_open_while_draining_then_end() -> None:
    with run_server({"drain_seconds": "1"}) as srv:
        async with open_stream(sse_url(srv, "drainer")) as events:
            await connected(srv, 1)
            srv.proc.send_signal(signal.SIGTERM)
            await async_wait_until(lambda: srv.get("/readyz").status_code == 503, WAIT, "readyz to turn 503")
            answer = await apost(srv, {"message": "still draining"})
            assert (await events.next()).id == answer["id"]
            last = await events.next(WAIT)
            assert last.value("retry") is not None
            assert last.lines[1].startswith(": closed (1012)")
        await asyncio.to_thread(srv.proc.wait, 10)
        srv.assert_clean_log()


# --- curl, and an app served by a plain uvicorn ----------------------------------------------------------------


@pytest.mark.skipif(CURL is None, reason="curl is not installed: the curl -N example cannot run")
def test_curl_n_prints_each_notification_as_it_arrives(server: Server) -> None:
    assert CURL is not None
    proc = subprocess.Popen([CURL, "-sN", sse_url(server, "123456789")], stdout=subprocess.PIPE)
    stdout = proc.stdout
    assert stdout is not None
    lines: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:  # curl's output, line by line, so that each wait has a timeout
        for line in iter(stdout.readline, b""):
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        for text in ("first", "second"):
            wait_until(lambda: server.status()["total_connections"] == 1, WAIT, "curl's stream in the status")
            answer = server.post({"message": text}).json()
            assert lines.get(timeout=WAIT) == f"id: {answer['id']}\n".encode()
            assert orjson.loads(lines.get(timeout=WAIT).removeprefix(b"data: "))["message"] == text
            assert lines.get(timeout=WAIT) == b"\n"
    finally:
        proc.terminate()
        proc.wait(WAIT)


@pytest.mark.anyio
async def test_sse_works_under_a_plain_uvicorn_without_the_hooks() -> None:
    app = create_app(Settings())
    async with serve_in_process(app) as where, open_stream(f"http://{where}/api/v1/sse/judy") as events:

        async def one_stream() -> bool:
            return bool((await app.state.hub.status())["total_connections"] == 1)  # cluster-wide, so awaited

        await async_wait_until(one_stream, WAIT, "the stream")
        async with httpx.AsyncClient() as client:
            answer = (await client.post(f"http://{where}/api/v1/ws/notification", json={"message": "embedded"})).json()
        event = await events.next()
        assert (event.id, event.json()["message"]) == (answer["id"], "embedded")
