"""diary_ws.client against real servers: it reconnects by itself, resumes with `since`, loses and repeats nothing.

Connections are cut for real: by stopping the server and starting a new one on the same port, and by a small
TCP proxy in the test that drops every connection while the server keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import httpx
import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from diary_ws.client import Backoff, Client, Ended, Refused, listen_url, reconnect_hint
from tests.utils import Server, async_wait_until, free_port, run_server

LIMIT = 20.0  # seconds any one wait may take on a busy 2-core machine


class TcpProxy:
    """Forwards 127.0.0.1:`port` to a server; `cut()` drops every connection at once, `refuse()` stops
    accepting (clients get ECONNREFUSED) until `accept()`. It also keeps each connection's first bytes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.requests: list[bytes] = []
        self._listener: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def accept(self) -> None:
        self._listener = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)

    async def refuse(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None

    def cut(self) -> int:
        """Abort every proxied connection, both sides, as a dead network would; how many there were."""
        writers = list(self._writers)
        for writer in writers:
            writer.transport.abort()
        return len(writers) // 2

    async def close(self) -> None:
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.refuse()

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((down_w, up_w))
        first = await down_r.read(65536)
        self.requests.append(first)
        up_w.write(first)
        pipes = [asyncio.create_task(self._pipe(down_r, up_w)), asyncio.create_task(self._pipe(up_r, down_w))]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._tasks.difference_update(pipes)
            for writer in (down_w, up_w):
                self._writers.discard(writer)
                writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


@contextlib.asynccontextmanager
async def proxy_to(server: Server) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(server.port)
    await proxy.accept()
    try:
        yield proxy
    finally:
        await proxy.close()


@contextlib.asynccontextmanager
async def consuming(client: Client) -> AsyncIterator[list[dict[str, Any]]]:
    """Iterate `client` in a task, collecting what it yields; stop it on the way out (and surface its error)."""
    got: list[dict[str, Any]] = []

    async def consume() -> None:
        async for note in client:
            got.append(note)

    task = asyncio.create_task(consume())
    try:
        yield got
    finally:
        await client.aclose()
        await asyncio.wait_for(task, LIMIT)


async def post(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    response = await asyncio.to_thread(server.post, body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def user_connected(server: Server, user_id: str, sockets: int = 1) -> bool:
    status = await asyncio.to_thread(server.get, "/api/v1/ws/status")
    return bool(status.json()["active_user_ids"].count(user_id) and status.json()["total_connections"] >= sockets)


def delays_logged(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The reconnect delays the client logged, in order."""
    found = (re.search(r"(?:retrying|reconnecting) in ([0-9.]+) s", r.getMessage()) for r in caplog.records)
    return [float(m.group(1)) for m in found if m]


# --- pure parts -------------------------------------------------------------------------------------------


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    backoff = Backoff(base=0.5, cap=8.0, factor=2.0, random=lambda: 1.0)  # the top of each jitter range
    assert [backoff.delay(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert Backoff(base=0.5, cap=8.0, random=lambda: 0.25).delay(3) == 1.0
    assert backoff.delay(10_000) == 8.0  # no overflow however long the outage


def test_backoff_is_fully_jittered() -> None:
    draws = random.Random(6)  # seeded: the same run every time
    backoff = Backoff(base=1.0, cap=30.0, random=draws.random)
    delays = [backoff.delay(4) for _ in range(200)]  # ceiling 16 s
    assert all(0 <= d < 16.0 for d in delays)
    assert min(delays) < 2.0  # spread over the whole range, not clustered at the top
    assert max(delays) > 14.0
    assert len(set(delays)) == 200


def test_the_1012_reason_hint_is_read() -> None:
    assert reconnect_hint(1012, "server restarting: reconnect with since after 2201 ms") == 2.201
    assert reconnect_hint(1012, "server shutting down: reconnect with since") is None
    assert reconnect_hint(4008, "slow consumer: reconnect with since after 50 ms") is None  # only on 1012


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/api/v1/ws/alice?since=1-0"),
        ("https://push.example.com/notify/", "wss://push.example.com/notify/api/v1/ws/alice?since=1-0"),
        ("ws://h:1/p", "ws://h:1/p/api/v1/ws/alice?since=1-0"),
    ],
)
def test_listen_url_keeps_a_path_prefix(base: str, expected: str) -> None:
    assert listen_url(base, "alice", {"since": "1-0"}) == expected


def test_bad_arguments_fail_at_once() -> None:
    with pytest.raises(ValueError, match="user_id"):
        Client("http://127.0.0.1:1", "a b")
    with pytest.raises(ValueError, match="since"):
        Client("http://127.0.0.1:1", "alice", since="yesterday")
    with pytest.raises(ValueError, match="url"):
        Client("ftp://127.0.0.1:1", "alice")


# --- against real servers -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_it_yields_notifications_and_stops_cleanly(server: Server) -> None:
    async with Client(server.http, "alice") as client:
        async with consuming(client) as got:
            await async_wait_until(lambda: user_connected(server, "alice"), LIMIT, "alice to connect")
            sent = await post(server, {"message": "hello", "user_ids": ["alice"], "data": {"n": 1}})
            await async_wait_until(lambda: got, LIMIT, "the notification")
        assert got == [
            {
                "type": "notification",
                "message": "hello",
                "id": sent["id"],
                "sent_at": got[0]["sent_at"],
                "data": {"n": 1},
            }
        ]
        assert client.last_id == sent["id"]
    await async_wait_until(lambda: server.status()["total_connections"] == 0, LIMIT, "the socket to close")
    assert client.connections == 1


@pytest.mark.anyio
async def test_it_survives_a_real_server_restart_on_the_same_port(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="diary_ws.client")
    port = free_port()
    with contextlib.ExitStack() as stack:
        first = await asyncio.to_thread(stack.enter_context, run_server(port=port))
        client = Client(first.http, "alice")
        async with consuming(client) as got:
            await async_wait_until(lambda: user_connected(first, "alice"), LIMIT, "alice to connect")
            before = [await post(first, {"message": f"before {i}", "user_ids": ["alice"]}) for i in range(3)]
            await async_wait_until(lambda: len(got) == 3, LIMIT, "the first three")
            await asyncio.to_thread(first.terminate)
            first.assert_clean_log()
            second = await asyncio.to_thread(stack.enter_context, run_server(port=port))
            # Nobody reconnects it: the client does so by itself, after the delay the 1012 asked for.
            await async_wait_until(lambda: user_connected(second, "alice"), LIMIT, "alice to come back")
            after = [await post(second, {"message": f"after {i}", "user_ids": ["alice"]}) for i in range(3)]
            await async_wait_until(lambda: len(got) == 6, LIMIT, "the last three")
        assert [n["id"] for n in got] == [m["id"] for m in before + after]
        assert client.connections == 2
        assert client.duplicates == 0
        assert client.recovered is False  # the memory backend forgot its history; the client says so
        second.assert_clean_log()
    lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
    assert len(lost) == 1, lost
    hint = re.search(r"1012: .* after (\d+) ms", lost[0])
    assert hint, lost
    assert delays_logged(caplog)[0] == pytest.approx(int(hint.group(1)) / 1000, abs=0.01)
    assert any("may have been missed" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.anyio
async def test_a_cut_connection_resumes_with_since_losing_and_repeating_nothing(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="diary_ws.client")
    resumes: list[tuple[bool, int]] = []
    async with proxy_to(server) as proxy, connect(server.listen_url("alice")):  # keeps alice deliverable
        backoff = Backoff(base=0.05, cap=0.4, random=lambda: 1.0)
        client = Client(proxy.http, "alice", backoff=backoff, healthy_after=0.0, on_resume=lambda *a: resumes.append(a))
        async with consuming(client) as got:
            await async_wait_until(lambda: user_connected(server, "alice", 2), LIMIT, "the proxied socket")
            sent = [await post(server, {"message": f"m{i}", "user_ids": ["alice"]}) for i in range(2)]
            await async_wait_until(lambda: len(got) == 2, LIMIT, "m0 and m1")
            await proxy.refuse()
            assert proxy.cut() == 1
            # While the client knocks on a closed door, the server keeps running and stores what it misses.
            await async_wait_until(lambda: len(delays_logged(caplog)) >= 6, LIMIT, "failed reconnects up to the cap")
            sent += [await post(server, {"message": f"m{i}", "user_ids": ["alice"]}) for i in range(2, 5)]
            await proxy.accept()
            await async_wait_until(lambda: len(got) == 5, LIMIT, "the three missed ones, replayed")
            sent.append(await post(server, {"message": "m5", "user_ids": ["alice"]}))
            await async_wait_until(lambda: len(got) == 6, LIMIT, "the live one after the replay")
            delays = delays_logged(caplog)
            # A second cut: after a healthy connection (healthy_after=0: any is) the backoff starts over.
            assert proxy.cut() == 1
            await async_wait_until(lambda: client.connections == 3, LIMIT, "the third connection")
        assert [n["id"] for n in got] == [m["id"] for m in sent]
        assert [n["message"] for n in got] == [f"m{i}" for i in range(6)]
        assert resumes == [(True, 3), (True, 0)]
        assert client.recovered is True
        assert client.duplicates == 0
    # The second handshake asked for what came after the last id seen.
    assert f"since={sent[1]['id']}".encode() in proxy.requests[1]
    # Backoff: doubling up to the cap while refused (random() pinned to the top of each range), then reset.
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4]
    assert set(delays[4:]) == {0.4}
    assert delays_logged(caplog)[len(delays)] == 0.05


@pytest.mark.anyio
async def test_a_reconnect_before_any_notification_loses_nothing_either(server: Server) -> None:
    async with proxy_to(server) as proxy, connect(server.listen_url("alice")):
        client = Client(proxy.http, "alice", backoff=Backoff(base=0.05, cap=0.2))
        async with consuming(client) as got:
            await async_wait_until(lambda: user_connected(server, "alice", 2), LIMIT, "the proxied socket")
            await proxy.refuse()
            proxy.cut()
            missed = await post(server, {"message": "while away", "user_ids": ["alice"]})
            await proxy.accept()
            await async_wait_until(lambda: got, LIMIT, "the message published while it was away")
        assert [n["id"] for n in got] == [missed["id"]]
        assert client.recovered is True


@pytest.mark.anyio
async def test_the_token_goes_in_the_authorization_header_or_the_query(server: Server) -> None:
    async with proxy_to(server) as proxy:
        for token_in in ("header", "query"):
            client = Client(proxy.http, "alice", token="tok.en.value", token_in=token_in)
            async with consuming(client):
                await async_wait_until(lambda: len(proxy.requests) >= 1, LIMIT, "the handshake")
                await async_wait_until(lambda: user_connected(server, "alice"), LIMIT, "alice to connect")
    header, query = proxy.requests
    assert b"\r\nAuthorization: Bearer tok.en.value\r\n" in header
    assert b"token=" not in header
    assert b"GET /api/v1/ws/alice?token=tok.en.value HTTP/1.1" in query
    assert b"Authorization" not in query


@pytest.mark.anyio
async def test_a_permanent_refusal_raises_and_is_not_retried(server: Server) -> None:
    client = Client(server.http + "/no/such/prefix", "alice")
    with pytest.raises(Refused) as refused:
        await asyncio.wait_for(anext(client), LIMIT)
    assert refused.value.status == 404
    assert "no WebSocket endpoint" in refused.value.reason  # the server's own JSON message
    assert client.connections == 0


@pytest.mark.anyio
async def test_429_is_retried_until_a_slot_frees(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="diary_ws.client")
    with run_server({"max_connections_per_user": "1"}) as srv:
        async with connect(srv.listen_url("alice")) as first:
            client = Client(srv.http, "alice", backoff=Backoff(base=0.05, cap=0.2))
            async with consuming(client) as got:
                await async_wait_until(
                    lambda: any("HTTP 429" in r.getMessage() for r in caplog.records), LIMIT, "a 429"
                )
                await first.close()
                await async_wait_until(lambda: client.connections == 1, LIMIT, "the slot to be taken")
                sent = await post(srv, {"message": "hi", "user_ids": ["alice"]})
                await async_wait_until(lambda: got, LIMIT, "the notification")
            assert got[0]["id"] == sent["id"]
        srv.assert_clean_log()


@pytest.mark.anyio
async def test_a_429_retry_after_is_honoured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="diary_ws.client")
    with run_server({"connect_rate_limit": "1/s"}) as srv:
        async with connect(srv.listen_url("first")):  # takes this second's only handshake
            client = Client(srv.http, "alice", backoff=Backoff(base=0.01, cap=0.01))
            async with consuming(client):
                await async_wait_until(lambda: client.connections == 1, LIMIT, "a handshake once the limit allows")
        refusals = [r.getMessage() for r in caplog.records if "HTTP 429" in r.getMessage()]
        assert refusals, "the second handshake in the same second should have met a 429"
        # The backoff alone would wait at most 0.01 s; the server's Retry-After asked for a whole second.
        assert all(delay >= 1.0 for delay in delays_logged(caplog)[: len(refusals)])
        srv.assert_clean_log()


@pytest.mark.anyio
async def test_aclose_ends_a_client_that_is_waiting_to_retry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="diary_ws.client")
    client = Client(f"http://127.0.0.1:{free_port()}", "alice", backoff=Backoff(base=60, cap=60, random=lambda: 1.0))
    task = asyncio.create_task(anext(client, None))
    await async_wait_until(lambda: delays_logged(caplog) == [60.0], LIMIT, "a refused connect and a long wait")
    await client.aclose()
    assert await asyncio.wait_for(task, 2) is None  # ended at once, not after the 60 s wait


def test_a_frame_at_or_below_the_last_id_is_dropped() -> None:
    # The server never sends one (test_resume checks that); this is the client's own guard against overlap.
    client = Client("http://127.0.0.1:1", "alice", since="100-1")
    frames = ['{"type":"notification","message":"a","id":"100-1"}', '{"type":"notification","message":"b","id":"99-7"}',
              '{"type":"notification","message":"c","id":"100-2"}', '{"type":"resume","recovered":true,"replayed":1}',
              '{"type":"notification","message":"c","id":"100-2"}', "not json"]  # fmt: skip
    kept = [note for note in map(client._accept, frames) if note is not None]
    assert [n["message"] for n in kept] == ["c"]
    assert client.duplicates == 3
    assert client.recovered is True
    assert client.last_id == "100-2"


SECRET = "a-secret-of-at-least-32-bytes-for-hs256"


def mint(user_id: str, ttl: float) -> str:
    now = time.time()
    return jwt.encode({"sub": user_id, "iat": int(now), "exp": int(now + ttl)}, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def jwt_server() -> Iterator[Server]:
    with run_server({"jwt_secret": SECRET}) as srv:
        yield srv
        srv.assert_clean_log()


@pytest.mark.anyio
@pytest.mark.parametrize("token_in", ["header", "query"])
async def test_the_server_takes_the_token_either_way(jwt_server: Server, token_in: Literal["header", "query"]) -> None:
    client = Client(jwt_server.http, "tina", token=mint("tina", 60), token_in=token_in)
    async with consuming(client) as got:
        await async_wait_until(lambda: user_connected(jwt_server, "tina"), LIMIT, "tina to connect")
        sent = await post(jwt_server, {"message": "hi", "user_ids": ["tina"]})
        await async_wait_until(lambda: got, LIMIT, "the notification")
    assert got[0]["id"] == sent["id"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("token", "status"), [(None, 401), ("not.a.token", 401), ("other", 403)], ids=["none", "garbage", "other-user"]
)
async def test_a_bad_token_is_refused_for_good(jwt_server: Server, token: str | None, status: int) -> None:
    client = Client(jwt_server.http, "tina", token=mint("someone-else", 60) if token == "other" else token)
    with pytest.raises(Refused) as refused:
        await asyncio.wait_for(anext(client), LIMIT)
    assert refused.value.status == status
    assert client.connections == 0


@pytest.mark.anyio
async def test_an_operator_disconnect_ends_the_client(jwt_server: Server) -> None:
    client = Client(jwt_server.http, "olga", token=mint("olga", 60))
    task = asyncio.create_task(anext(client))
    await async_wait_until(lambda: user_connected(jwt_server, "olga"), LIMIT, "olga to connect")
    closed = await asyncio.to_thread(httpx.delete, f"{jwt_server.http}/api/v1/ws/users/olga/connections")
    assert closed.status_code == 200
    with pytest.raises(Ended) as ended:
        await asyncio.wait_for(task, LIMIT)
    assert ended.value.code == 4003
    await client.aclose()


@pytest.mark.anyio
async def test_an_expired_token_ends_the_client_unless_it_can_fetch_a_fresh_one(jwt_server: Server) -> None:
    fixed = Client(jwt_server.http, "eve", token=mint("eve", 1.5))
    with pytest.raises(Ended) as ended:
        await asyncio.wait_for(anext(fixed), LIMIT)
    assert ended.value.code == 4001
    await fixed.aclose()

    minted: list[str] = []

    async def fresh() -> str:  # an async source, as a call to an identity provider would be
        minted.append(mint("eve", 1.5))
        return minted[-1]

    async with connect(jwt_server.listen_url("eve", f"token={mint('eve', 60)}")):  # keeps eve deliverable
        client = Client(jwt_server.http, "eve", token=fresh, backoff=Backoff(base=0.05, cap=0.2))
        async with consuming(client) as got:
            sent: list[dict[str, Any]] = []
            while client.connections < 3:  # two expiries, each followed by a reconnect with a fresh token
                sent.append(await post(jwt_server, {"message": f"m{len(sent)}", "user_ids": ["eve"]}))
                await asyncio.sleep(0.2)  # a steady trickle of messages across the expiries, not a wait for state
            sent.append(await post(jwt_server, {"message": "last", "user_ids": ["eve"]}))
            await async_wait_until(lambda: len(got) == len(sent), LIMIT, "every message, across the expiries")
    assert [n["id"] for n in got] == [m["id"] for m in sent]
    assert len(minted) >= 3
    assert client.duplicates == 0


@pytest.mark.anyio
async def test_other_closes_are_reconnected() -> None:
    closes = [4008, 1011, 1000]

    async def close_then_serve(ws: ServerConnection) -> None:
        if closes:
            await ws.close(closes.pop(0), "reconnect with since")
        else:
            await ws.send('{"type":"notification","message":"finally","id":"5-0"}')
            await ws.wait_closed()

    async with serve(close_then_serve, "127.0.0.1", 0) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        async with Client(f"http://127.0.0.1:{port}", "alice", backoff=Backoff(base=0.01, cap=0.01)) as client:
            note = await asyncio.wait_for(anext(client), LIMIT)
    assert note["message"] == "finally"
    assert client.connections == 4
