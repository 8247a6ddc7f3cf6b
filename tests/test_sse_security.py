"""SSE streams pass the same admission as WebSockets: JWTs, origins, connect rate, operator disconnects."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.jwt_keys import SECRET, claims, sign
from tests.sse_client import open_stream
from tests.utils import Server, async_wait_until, run_server

KEY = "sender-key-one-0123456789abcdef"
WAIT = 5.0


@pytest.fixture(scope="module")
def secured() -> Iterator[Server]:
    settings = {"jwt_secret": SECRET, "api_key": KEY, "allowed_origins": "https://app.example.com"}
    with run_server(settings) as srv:
        yield srv
        srv.assert_clean_log()


def token(sub: str, ttl: float = 3600) -> str:
    return sign(claims(sub=sub, ttl=ttl), SECRET, "HS256")


def sse(server: Server, user_id: str, query: str = "") -> str:
    return f"{server.http}/api/v1/sse/{user_id}" + (f"?{query}" if query else "")


# Tokens are signed when the test runs, not when the suite is collected: a long suite outlived them (401, not 403).
@pytest.mark.parametrize(
    ("query", "headers", "status", "words"),
    [
        ("", {}, 401, "token"),
        ("token=not-a-jwt", {}, 401, "token"),
        ("token={mallory}", {}, 403, ""),
        ("", {"Authorization": "Bearer {mallory}"}, 403, ""),
        ("token={alice}", {"Origin": "https://evil.example"}, 403, "ALLOWED_ORIGINS"),
    ],
)
def test_bad_credentials_are_refused_before_the_stream(
    secured: Server, query: str, headers: dict[str, str], status: int, words: str
) -> None:
    fresh = {"mallory": token("mallory"), "alice": token("alice")}
    query = query.format(**fresh)
    headers = {name: value.format(**fresh) for name, value in headers.items()}
    answer = httpx.get(sse(secured, "alice", query), headers=headers, timeout=10)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert words in answer.json()["message"]


@pytest.mark.anyio
async def test_a_token_in_the_query_or_a_bearer_header_opens_the_stream(secured: Server) -> None:
    good = token("alice")
    async with (
        open_stream(sse(secured, "alice", f"token={good}"), {"Origin": "https://app.example.com"}) as by_query,
        open_stream(sse(secured, "alice"), {"Authorization": f"Bearer {good}"}) as by_header,
    ):
        assert by_query.response.status_code == by_header.response.status_code == 200
        async with httpx.AsyncClient(timeout=10) as client:

            async def both_listed() -> bool:
                status = await client.get(f"{secured.http}/api/v1/ws/status", headers={"X-API-Key": KEY})
                return bool(status.json()["total_connections"] == 2)

            await async_wait_until(both_listed, WAIT, "both streams in the status")
            answer = await client.post(
                f"{secured.http}/api/v1/ws/notification", json={"message": "authed"}, headers={"X-API-Key": KEY}
            )
        assert answer.json()["sent_count"] == 2
        assert (await by_query.next()).json()["message"] == "authed"
        assert (await by_header.next()).json()["message"] == "authed"
    assert good not in secured.log()  # the access log line of GET /api/v1/sse/alice?token=... is redacted
    assert "/api/v1/sse/alice?token=[redacted]" in secured.log()


@pytest.mark.anyio
async def test_the_stream_ends_with_4001_when_its_token_expires(secured: Server) -> None:
    async with open_stream(sse(secured, "brief", f"token={token('brief', ttl=1.5)}")) as events:
        last = await events.next(WAIT)
        assert last.lines == [": closed (4001): token expired: reconnect with a new token"]
        with pytest.raises(EOFError):
            await events.next(WAIT)


@pytest.mark.anyio
async def test_an_operator_disconnect_ends_the_stream_with_4003(secured: Server) -> None:
    async with open_stream(sse(secured, "banned", f"token={token('banned')}")) as events:
        async with httpx.AsyncClient(timeout=10) as client:
            url = f"{secured.http}/api/v1/ws/users/banned/connections"

            async def closed_one() -> bool:
                answer = await client.delete(url, headers={"X-API-Key": KEY})
                return bool(answer.json()["closed"] == 1)

            await async_wait_until(closed_one, WAIT, "the operator to close the stream")
        last = await events.next(WAIT)
        assert last.lines[0].startswith(": closed (4003)")
        with pytest.raises(EOFError):
            await events.next(WAIT)


def test_connect_rate_limit_counts_streams() -> None:
    with run_server({"connect_rate_limit": "2/s:2"}) as srv:
        codes = [httpx.get(sse(srv, "x", "since=abc"), timeout=10).status_code for _ in range(4)]
        assert codes[:2] == [400, 400]  # let through to the query check (a bad since: refused, no stream)
        assert 429 in codes[2:]
        srv.assert_clean_log()
