"""Security over the wire: a real server, real websockets and httpx clients, and the attacks of issue 3.

Every refused handshake must be an HTTP answer (never a 101), with the JSON error body and its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.jwt_keys import SECRET, claims, hs256_forged_with, public_pem, rsa_key, sign, unsigned, write_public_key
from tests.utils import Server, async_wait_until, next_frame, run_server

pytestmark = pytest.mark.anyio

KEY1 = "sender-key-one-0123456789abcdef"
KEY2 = "sender-key-two-0123456789abcdef"
AUD, ISS = "diary", "https://auth.example"
RSA = rsa_key()
OTHER_RSA = rsa_key()


async def refusal(url: str, **kwargs: Any) -> tuple[int, dict[str, Any], Any]:
    """Open a WebSocket that must be refused: the status, JSON body and headers of the denial response."""
    with pytest.raises(websockets.InvalidStatus) as caught:
        async with websockets.connect(url, open_timeout=5, **kwargs):
            pass
    response = caught.value.response
    body = orjson.loads(response.body)
    assert body["status"] == "error"
    assert body["message"]
    return response.status_code, body, response.headers


def disconnect(server: Server, user_id: str, **headers: str) -> httpx.Response:
    """DELETE the user's connections (the operator endpoint)."""
    return httpx.delete(f"{server.http}/api/v1/ws/users/{user_id}/connections", headers=headers, timeout=10)


def connect(url: str, **kwargs: Any) -> Any:
    return websockets.connect(url, open_timeout=5, **kwargs)


def bearer(token: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


async def closed_with(ws: ClientConnection, limit: float) -> tuple[int | None, str]:
    """Read until the server closes; its close code and reason."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(limit):
            async for _frame in ws:
                pass
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


# --- listener JWTs, RS256 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rs256(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    key_file = write_public_key(tmp_path_factory.mktemp("jwt") / "public.pem", RSA)
    settings = {"jwt_public_key_file": key_file, "jwt_audience": AUD, "jwt_issuer": ISS}
    with run_server(settings) as srv:
        yield srv
        srv.assert_clean_log()


def rs_claims(**extra: Any) -> dict[str, Any]:
    return claims(**{"sub": "alice", "aud": AUD, "iss": ISS, **extra})


def valid_rs256() -> str:
    return sign(rs_claims(), RSA, "RS256")


# The matrix of issue 3: each token, the status it gets. "missing" sends no token at all.
MATRIX: list[tuple[str, Any, int]] = [
    ("alg none", lambda: unsigned(rs_claims()), 401),
    ("HS256 signed with the RSA public key", lambda: hs256_forged_with(public_pem(RSA), rs_claims()), 401),
    ("wrong key", lambda: sign(rs_claims(), OTHER_RSA, "RS256"), 401),
    ("expired", lambda: sign(rs_claims(exp=int(time.time()) - 10), RSA, "RS256"), 401),
    ("nbf in the future", lambda: sign(rs_claims(nbf=int(time.time()) + 600), RSA, "RS256"), 401),
    ("wrong aud", lambda: sign(rs_claims(aud="another-service"), RSA, "RS256"), 401),
    ("no aud", lambda: sign(rs_claims(aud=None), RSA, "RS256"), 401),
    ("wrong iss", lambda: sign(rs_claims(iss="https://evil.example"), RSA, "RS256"), 401),
    ("no exp", lambda: sign(rs_claims(exp=None), RSA, "RS256"), 401),
    ("no sub", lambda: sign(rs_claims(sub=None), RSA, "RS256"), 401),
    ("sub of another user", lambda: sign(rs_claims(sub="bob"), RSA, "RS256"), 403),
    ("sub in another case", lambda: sign(rs_claims(sub="ALICE"), RSA, "RS256"), 403),
    ("malformed", lambda: "this-is-not-a-jwt", 401),
    ("truncated", lambda: valid_rs256()[:-20], 401),
    ("signature cut off", lambda: valid_rs256().rsplit(".", 1)[0], 401),
    ("empty", lambda: "", 401),
    ("missing", lambda: None, 401),
]


async def test_valid_rs256_token_in_query_or_header_opens(rs256: Server) -> None:
    for url, kwargs in ((rs256.listen_url("alice", f"token={valid_rs256()}"), {}),
                        (rs256.listen_url("alice"), bearer(valid_rs256()))):  # fmt: skip
        async with connect(url, **kwargs) as ws:
            await async_wait_until(lambda: rs256.status()["total_connections"] == 1, 5, "the socket to register")
            answer = rs256.post({"message": "hello alice", "user_ids": ["alice"]})
            assert answer.status_code == 200, answer.text
            assert (await next_frame(ws))["message"] == "hello alice"
        await async_wait_until(lambda: rs256.status()["total_connections"] == 0, 5, "the socket to go")


@pytest.mark.parametrize("where", ["query", "header"])
@pytest.mark.parametrize(("case", "make", "expected"), MATRIX, ids=[m[0] for m in MATRIX])
async def test_jwt_matrix_is_refused_before_the_upgrade(
    rs256: Server, case: str, make: Any, expected: int, where: str
) -> None:
    token = make()
    kwargs: dict[str, Any]
    if token is None:
        url, kwargs = rs256.listen_url("alice"), {}
    elif where == "query":
        url, kwargs = rs256.listen_url("alice", f"token={token}"), {}
    else:
        url, kwargs = rs256.listen_url("alice"), bearer(token) if token else {"additional_headers": {
            "Authorization": "Bearer"}}  # fmt: skip
    status, body, headers = await refusal(url, **kwargs)
    assert status == expected, (case, body)
    if expected == 401:
        assert headers["WWW-Authenticate"].startswith('Bearer realm="diary-ws"')
    if token:
        assert token not in body["message"]
    assert rs256.status()["total_connections"] == 0


# --- listener JWTs, HS256, and expiry while connected ----------------------------------------------------------


@pytest.fixture(scope="module")
def hs256() -> Iterator[Server]:
    with run_server({"jwt_secret": SECRET}) as srv:
        yield srv
        srv.assert_clean_log()


async def test_hs256_allowlist(hs256: Server) -> None:
    async with connect(hs256.listen_url("alice", f"token={sign(claims(), SECRET, 'HS256')}")):
        pass
    for token in (
        sign(claims(), SECRET, "HS512"),  # the right secret, another algorithm
        sign(claims(), RSA, "RS256"),
        unsigned(claims()),
        sign(claims(), "x" * 64, "HS256"),
    ):
        status, _body, _headers = await refusal(hs256.listen_url("alice", f"token={token}"))
        assert status == 401


async def test_token_sent_twice_is_400(hs256: Server) -> None:
    token = sign(claims(), SECRET, "HS256")
    status, body, _ = await refusal(hs256.listen_url("alice", f"token={token}"), **bearer(token))
    assert status == 400, body
    status, body, _ = await refusal(hs256.listen_url("alice", f"token={token}&token={token}"))
    assert status == 400, body


async def test_expiry_while_connected_closes_with_4001(hs256: Server) -> None:
    short = sign(claims(ttl=2), SECRET, "HS256")
    long = sign(claims(ttl=600), SECRET, "HS256")
    async with connect(hs256.listen_url("alice", f"token={short}")) as expiring, \
            connect(hs256.listen_url("alice", f"token={long}")) as lasting:  # fmt: skip
        await async_wait_until(lambda: hs256.status()["total_connections"] == 2, 5, "both sockets")
        started = time.monotonic()
        code, reason = await closed_with(expiring, 6)
        assert code == 4001
        assert "expired" in reason
        assert time.monotonic() - started < 4
        assert hs256.post({"message": "still here", "user_ids": ["alice"]}).json()["sent_count"] == 1
        assert (await next_frame(lasting))["message"] == "still here"


# --- the user header from a trusted proxy -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied() -> Iterator[Server]:
    with run_server({"user_header": "X-User-Id", "trusted_proxies": "127.0.0.1"}) as srv:
        yield srv
        srv.assert_clean_log()


def headers(**values: str) -> dict[str, Any]:
    return {"additional_headers": {k.replace("_", "-"): v for k, v in values.items()}}


async def test_user_header_from_the_trusted_proxy(proxied: Server) -> None:
    async with connect(proxied.listen_url("alice"), **headers(X_User_Id="alice")):
        pass
    # The proxy forwards a client from elsewhere: uvicorn rewrites the client address to 203.0.113.9, but the
    # direct peer is still the trusted proxy, so the header counts.
    async with connect(proxied.listen_url("alice"), **headers(X_User_Id="alice", X_Forwarded_For="203.0.113.9")):
        pass
    status, _, _ = await refusal(proxied.listen_url("alice"), **headers(X_User_Id="bob"))
    assert status == 403
    status, _, _ = await refusal(proxied.listen_url("alice"))
    assert status == 401
    status, _, _ = await refusal(proxied.listen_url("alice"), **headers(X_User_Id=""))
    assert status == 401


async def test_user_header_sent_twice_is_refused(proxied: Server) -> None:
    """A proxy that adds the header instead of overwriting it leaves the client's own copy in the request, and
    nothing tells which copy is the proxy's: the first one was believed, whoever sent it."""
    for pair in (("alice", "bob"), ("bob", "alice"), ("alice", "alice")):
        twice = {"additional_headers": [("X-User-Id", name) for name in pair]}
        status, body, _ = await refusal(proxied.listen_url("alice"), **twice)
        assert status == 401, body
        assert "more than once" in body["message"]
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(f"{proxied.http}/api/v1/sse/alice", headers=twice["additional_headers"])
        assert answer.status_code == 401, answer.text
    async with connect(proxied.listen_url("alice"), **headers(X_User_Id="alice")):
        pass


async def test_user_header_from_anyone_else_is_ignored(proxied: Server) -> None:
    elsewhere = {"local_addr": ("127.0.0.2", 0)}  # a client that is not the proxy
    status, body, _ = await refusal(proxied.listen_url("alice"), **headers(X_User_Id="alice"), **elsewhere)
    assert status == 401, body
    # Claiming to come through the proxy does not help: X-Forwarded-For from an untrusted peer is not read.
    spoof = headers(X_User_Id="alice", X_Forwarded_For="127.0.0.1")
    status, body, _ = await refusal(proxied.listen_url("alice"), **spoof, **elsewhere)
    assert status == 401, body


async def test_jwt_and_user_header_together(tmp_path: Path) -> None:
    settings = {"jwt_secret": SECRET, "user_header": "X-User-Id", "trusted_proxies": "127.0.0.1"}
    with run_server(settings) as srv:
        good = sign(claims("alice"), SECRET, "HS256")
        async with connect(srv.listen_url("alice"), **headers(X_User_Id="alice")):
            pass
        async with connect(srv.listen_url("alice", f"token={good}")):
            pass
        async with connect(srv.listen_url("alice", f"token={good}"), **headers(X_User_Id="alice")):
            pass
        # Either is enough, but the one presented must be valid.
        status, _, _ = await refusal(srv.listen_url("alice", "token=garbage"), **headers(X_User_Id="alice"))
        assert status == 401
        status, _, _ = await refusal(srv.listen_url("alice", f"token={good}"), **headers(X_User_Id="bob"))
        assert status == 403
        status, _, _ = await refusal(srv.listen_url("alice"))
        assert status == 401
        srv.assert_clean_log()


# --- origins ---------------------------------------------------------------------------------------------------


async def test_origins() -> None:
    with run_server({"allowed_origins": "https://app.example.com, http://localhost:3000"}) as srv:
        for origin in ("https://app.example.com", "http://localhost:3000", "https://APP.example.com:443"):
            async with connect(srv.listen_url("alice"), additional_headers={"Origin": origin}):
                pass
        async with connect(srv.listen_url("alice")):  # no Origin: not a browser
            pass
        for origin in ("https://evil.example", "http://app.example.com", "https://app.example.com.evil.example",
                       "null", "http://localhost:3001"):  # fmt: skip
            status, body, _ = await refusal(srv.listen_url("alice"), additional_headers={"Origin": origin})
            assert status == 403, (origin, body)
        srv.assert_clean_log()


# --- sender API keys ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"{KEY1}\n{KEY2}\n")
    with run_server({"api_key_file": str(key_file)}) as srv:
        yield srv
        srv.assert_clean_log()


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong-key-0123456789abcdef"}, 401),
        ({"X-API-Key": "wrong-key-0123456789abcdef"}, 401),
        ({"Authorization": f"Basic {KEY1}"}, 401),
        ({"Authorization": f"Bearer {KEY1}", "X-API-Key": KEY2}, 401),
        ({"Authorization": f"Bearer {KEY1}"}, 404),  # accepted: nobody listens, so the publish is a 404
        ({"Authorization": f"Bearer {KEY2}"}, 404),
        ({"X-API-Key": KEY1}, 404),
        ({"X-API-Key": KEY2}, 404),
    ],
)
def test_api_keys_on_publish(keyed: Server, sent: dict[str, str], status: int) -> None:
    answer = keyed.post({"message": "hi"}, headers=sent)
    assert answer.status_code == status, answer.text
    assert answer.json()["status"] == "error"
    if status == 401:
        assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="diary-ws"')
        assert KEY1 not in answer.text
        assert KEY2 not in answer.text


def test_api_keys_on_status_and_disconnect(keyed: Server) -> None:
    assert keyed.get("/api/v1/ws/status").status_code == 401
    assert keyed.get("/api/v1/ws/status", headers={"X-API-Key": KEY2}).json()["total_connections"] == 0
    assert disconnect(keyed, "alice").status_code == 401
    assert disconnect(keyed, "alice", Authorization=f"Bearer {KEY1}").json()["closed"] == 0
    assert keyed.get("/healthz").status_code == 200  # operations stay open for the balancer


async def test_listening_needs_no_api_key(keyed: Server) -> None:
    async with connect(keyed.listen_url("alice")) as ws:
        answer = keyed.post({"message": "hi", "user_ids": ["alice"]}, headers={"X-API-Key": KEY1})
        assert answer.status_code == 200
        assert (await next_frame(ws))["message"] == "hi"


# --- rate limits -------------------------------------------------------------------------------------------------


def from_address(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


async def test_publish_rate_limit_per_client_address() -> None:
    with run_server({"rate_limit": "5/m"}) as srv:
        async with connect(srv.listen_url("alice")) as ws:
            remaining = []
            for i in range(5):
                answer = srv.post({"message": f"n{i}", "user_ids": ["alice"]})
                assert answer.status_code == 200, answer.text
                remaining.append(int(answer.headers["RateLimit-Remaining"]))
                assert answer.headers["RateLimit-Limit"] == "5"
            assert remaining == [4, 3, 2, 1, 0]
            over = srv.post({"message": "one too many", "user_ids": ["alice"]})
            assert over.status_code == 429
            assert over.json()["status"] == "error"
            assert 1 <= int(over.headers["Retry-After"]) <= 12  # one token every 12 s
            assert over.headers["RateLimit-Limit"] == "5"
            assert over.headers["RateLimit-Remaining"] == "0"
            assert 0 < int(over.headers["RateLimit-Reset"]) <= 60
            assert [(await next_frame(ws))["message"] for _ in range(5)] == [f"n{i}" for i in range(5)]
            # Another client address has its own bucket.
            with from_address("127.0.0.2") as other:
                answer = other.post(f"{srv.http}/api/v1/ws/notification", json={"message": "x", "user_ids": ["alice"]})
            assert answer.status_code == 200, answer.text
            assert (await next_frame(ws))["message"] == "x"  # and the refused one was never delivered
        srv.assert_clean_log()


def test_publish_rate_limit_per_api_key() -> None:
    with run_server({"rate_limit": "2/h", "api_key": f"{KEY1},{KEY2}"}) as srv:
        one, two = {"X-API-Key": KEY1}, {"Authorization": f"Bearer {KEY2}"}
        assert [srv.post({"message": "x"}, headers=one).status_code for _ in range(3)] == [404, 404, 429]
        assert srv.post({"message": "x"}, headers=two).status_code == 404  # the other key's own bucket
        with from_address("127.0.0.2") as other:  # the same key from elsewhere: the same bucket
            answer = other.post(f"{srv.http}/api/v1/ws/notification", json={"message": "x"}, headers=one)
        assert answer.status_code == 429
        assert int(answer.headers["Retry-After"]) > 1700  # one token every 30 minutes
        assert srv.post({"message": "x"}).status_code == 401  # no key: refused before it can use a bucket
        srv.assert_clean_log()


async def test_connect_rate_limit_per_client_address() -> None:
    with run_server({"connect_rate_limit": "3/m"}) as srv:
        for _ in range(3):
            async with connect(srv.listen_url("alice")):
                pass
        status, body, headers_ = await refusal(srv.listen_url("alice"))
        assert status == 429, body
        assert 1 <= int(headers_["Retry-After"]) <= 20
        assert headers_["RateLimit-Remaining"] == "0"
        # A spoofed X-Forwarded-For does not dodge it: no proxy is trusted.
        status, _, _ = await refusal(srv.listen_url("alice"), **headers(X_Forwarded_For="198.51.100.7"))
        assert status == 429
        async with connect(srv.listen_url("alice"), local_addr=("127.0.0.2", 0)):
            pass
        srv.assert_clean_log()


async def test_connect_rate_limit_per_client_behind_a_trusted_proxy() -> None:
    with run_server({"connect_rate_limit": "2/m", "trusted_proxies": "127.0.0.1"}) as srv:
        client_a, client_b = headers(X_Forwarded_For="198.51.100.1"), headers(X_Forwarded_For="198.51.100.2")
        for _ in range(2):
            async with connect(srv.listen_url("alice"), **client_a):
                pass
        status, _, _ = await refusal(srv.listen_url("alice"), **client_a)
        assert status == 429
        async with connect(srv.listen_url("alice"), **client_b):
            pass
        srv.assert_clean_log()


# --- idempotent publish ----------------------------------------------------------------------------------------


async def test_idempotent_replay_delivers_once_and_answers_the_same(server: Server) -> None:
    async with connect(server.listen_url("alice")) as ws:
        await async_wait_until(lambda: server.status()["total_connections"] == 1, 5, "the socket")
        body = {"message": "once", "user_ids": ["alice"], "data": {"a": 1, "b": 2}}
        key = {"Idempotency-Key": "order-42"}
        first = server.post(body, headers=key)
        assert first.status_code == 200, first.text
        respelled = b'{"data": {"b": 2, "a": 1}, "user_ids": ["alice"], "message": "once"}'
        again = [server.post(body, headers=key), server.post(respelled, headers=key)]
        for answer in again:
            assert answer.status_code == 200
            assert answer.content == first.content  # the same id and counts
            assert answer.headers["Idempotent-Replayed"] == "true"
        different = server.post({"message": "twice", "user_ids": ["alice"]}, headers=key)
        assert different.status_code == 422
        assert "Idempotency-Key" in different.json()["message"]
        assert server.post({"message": "after", "user_ids": ["alice"]}).status_code == 200
        assert (await next_frame(ws))["message"] == "once"
        assert (await next_frame(ws))["message"] == "after"  # nothing in between: delivered once


async def test_a_404_is_not_remembered(server: Server) -> None:
    key = {"Idempotency-Key": "retry-me"}
    assert server.post({"message": "m", "user_ids": ["alice"]}, headers=key).status_code == 404
    async with connect(server.listen_url("alice")) as ws:
        await async_wait_until(lambda: server.status()["total_connections"] == 1, 5, "the socket")
        answer = server.post({"message": "m", "user_ids": ["alice"]}, headers=key)
        assert answer.status_code == 200
        assert "Idempotent-Replayed" not in answer.headers
        assert (await next_frame(ws))["message"] == "m"


async def test_bad_idempotency_key_is_400(server: Server) -> None:
    answer = server.post({"message": "m"}, headers={"Idempotency-Key": "x" * 300})
    assert answer.status_code == 400
    assert "Idempotency-Key" in answer.json()["message"]


async def test_idempotency_ttl() -> None:
    with run_server({"idempotency_ttl": "1"}) as srv:
        async with connect(srv.listen_url("alice")) as ws:
            await async_wait_until(lambda: srv.status()["total_connections"] == 1, 5, "the socket")
            key = {"Idempotency-Key": "short-lived"}
            first = srv.post({"message": "m", "user_ids": ["alice"]}, headers=key).json()["id"]

            def sent_again() -> bool:
                return bool(srv.post({"message": "m", "user_ids": ["alice"]}, headers=key).json()["id"] != first)

            await async_wait_until(sent_again, 5, "the key to expire", interval=0.1)
            assert [(await next_frame(ws))["id"] == first for _ in range(2)] == [True, False]
        srv.assert_clean_log()


# --- operator disconnect ---------------------------------------------------------------------------------------


async def test_operator_disconnect_closes_every_socket_of_the_user_with_4003(server: Server) -> None:
    async with connect(server.listen_url("alice")) as a1, connect(server.listen_url("alice")) as a2, \
            connect(server.listen_url("bob")) as b:  # fmt: skip
        await async_wait_until(lambda: server.status()["total_connections"] == 3, 5, "three sockets")
        answer = disconnect(server, "alice")
        assert answer.status_code == 200
        assert answer.json() == {"status": "success", "message": "Closed 2 connections of user alice", "closed": 2}
        for ws in (a1, a2):
            code, reason = await closed_with(ws, 5)
            assert code == 4003
            assert "operator" in reason
        status = server.status()
        assert status["active_user_ids"] == ["bob"]
        assert status["total_connections"] == 1
        assert server.post({"message": "bob stays"}).json()["sent_count"] == 1
        assert (await next_frame(b))["message"] == "bob stays"
    again = disconnect(server, "alice")
    assert again.json()["closed"] == 0
    bad = disconnect(server, "a%20b")
    assert bad.status_code == 400
    assert server.get("/api/v1/ws/users/alice/connections").status_code == 405


# --- no token in any log line ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("log_format", "log_level"), [("text", "trace"), ("json", "info")])
async def test_no_token_or_key_in_the_log(log_format: str, log_level: str) -> None:
    settings = {"jwt_secret": SECRET, "api_key": KEY1, "log_level": log_level, "log_format": log_format}
    with run_server(settings) as srv:
        good = sign(claims("alice"), SECRET, "HS256")
        header_good = sign(claims("alice", ttl=301), SECRET, "HS256")
        refused = {
            "expired": sign(claims("alice", ttl=-10), SECRET, "HS256"),
            "other user": sign(claims("bob"), SECRET, "HS256"),
            "wrong key": sign(claims("alice"), "y" * 64, "HS256"),
        }
        async with connect(srv.listen_url("alice", f"token={good}&since=0-0")) as ws:
            assert (await next_frame(ws))["type"] == "resume"
        async with connect(srv.listen_url("alice"), **bearer(header_good)):
            pass
        for token in refused.values():
            await refusal(srv.listen_url("alice", f"token={token}"))
            await refusal(srv.listen_url("alice"), **bearer(token))
        assert srv.post({"message": "x"}, headers={"X-API-Key": KEY1}).status_code == 404
        assert srv.post({"message": "x"}, headers={"Authorization": f"Bearer {KEY1}"}).status_code == 404
        srv.terminate()
        log = srv.log()
    assert "/api/v1/ws/alice?token=[redacted]" in log  # the lines are there, and redacted
    for token in [good, header_good, *refused.values()]:
        for part in token.split("."):  # not the token, nor its payload or signature alone
            assert part not in log, part
    assert KEY1 not in log
    assert SECRET not in log
