"""Hostile input against a real server: every refusal is the JSON error body of docs/api.md, never a 500.

All cases share one server (`shared_server`, once on each event loop); its teardown checks that the log holds no
traceback and no ERROR line, and the last test proves the server still delivers after all of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sync_connect

from tests.utils import LOOPS, Server, run_server

API = "/api/v1/ws"
NOTIFY = f"{API}/notification"
MAX_MESSAGE_CHARS = 65536
MAX_BODY_BYTES = 262144
MAX_INCOMING_BYTES = 4096
TIMEOUT = 5.0
NOBODY = "nobody-listens-here"  # a valid user id nobody connects as: a valid POST to it answers 404
COUNTERS = frozenset({"sent_count", "total_connections", "disconnected_users"})  # the extra keys of that 404
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module", params=LOOPS)
def shared_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """One server for the module, once per event loop: every refusal here is the transport's as much as the app's."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed: make install brings it")
    with run_server({"loop": request.param}) as srv:
        assert f'loop="{request.param}"' in srv.get("/metrics").text
        yield srv
        srv.assert_clean_log()


# --- helpers ---------------------------------------------------------------------------------------------


def error_message(status: int, content_type: str | None, body: bytes, extra_keys: frozenset[str] = frozenset()) -> str:
    """Check the JSON error body of docs/api.md and return its message."""
    assert content_type is not None, f"no Content-Type on a {status} answer: {body!r}"
    assert content_type.split(";")[0].strip() == "application/json", f"{status} {content_type}: {body!r}"
    doc = orjson.loads(body)
    assert isinstance(doc, dict), doc
    assert doc.get("status") == "error", doc
    message = doc.get("message")
    assert isinstance(message, str), doc
    assert message.strip(), doc
    assert set(doc) == {"status", "message"} | extra_keys, doc
    return message


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    """`response` is a JSON error with `status` whose message names each of `words`."""
    assert response.status_code == status, (response.status_code, response.text)
    message = error_message(response.status_code, response.headers.get("content-type"), response.content)
    for word in words:
        assert word in message, f"{word!r} not named in {message!r}"
    return message


def assert_nobody(response: httpx.Response) -> None:
    """Valid input addressed to nobody: past validation, it gets the 404 with zero counters."""
    assert response.status_code == 404, (response.status_code, response.text)
    error_message(404, response.headers.get("content-type"), response.content, COUNTERS)
    assert response.json()["sent_count"] == 0


def post(server: Server, body: bytes, content_type: str | None = "application/json") -> httpx.Response:
    """POST raw bytes to the notification endpoint."""
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return httpx.post(f"{server.http}{NOTIFY}", content=body, headers=headers, timeout=10)


def post_json(server: Server, doc: Any) -> httpx.Response:
    return post(server, orjson.dumps(doc))


def raw_request(server: Server, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes httpx would not send; return status, headers (lower-case names) and body of the answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        data = head + body
        sent = 0
        # Stop sending once the server has answered: it may close without reading the rest.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while sent < len(data) and not select.select([sock], [], [], 0)[0]:
                sent += sock.send(data[sent : sent + 65536])
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buffer = b""
    deadline = time.monotonic() + TIMEOUT
    while b"\r\n\r\n" not in buffer:
        assert time.monotonic() < deadline, f"no complete answer head: {buffer!r}"
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the answer head: {buffer!r}"
        buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        assert time.monotonic() < deadline, f"answer body cut short: {body!r}"
        chunk = sock.recv(65536)
        assert chunk, f"connection closed in the answer body: {body!r}"
        body += chunk
    return int(status_line.split()[1]), headers, body[:length]


def chunked(body: bytes, size: int = 65536) -> bytes:
    """`body` in Transfer-Encoding: chunked framing."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def chunked_head(server: Server) -> bytes:
    return (
        f"POST {NOTIFY} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()


async def refusal(url: str) -> tuple[int, str]:
    """Connect to `url`, which must be refused before the upgrade; the status and the JSON message."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=TIMEOUT):
            pass
    response = refused.value.response
    message = error_message(response.status_code, response.headers.get("Content-Type"), bytes(response.body))
    return response.status_code, message


async def wait_closed(ws: ClientConnection) -> int | None:
    """Wait for the server to close `ws`; its close code."""
    await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
    return ws.close_code


async def apost(client: httpx.AsyncClient, server: Server, doc: Any) -> httpx.Response:
    return await client.post(f"{server.http}{NOTIFY}", content=orjson.dumps(doc), headers=JSON, timeout=10)


# --- malformed JSON: 400 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{", id="open-brace"),
        pytest.param(b'{"message": "hi"', id="truncated-object"),
        pytest.param(b'{"message": "hi', id="truncated-string"),
        pytest.param(b'{"message": "hi",}', id="trailing-comma"),
        pytest.param(b"{'message': 'hi'}", id="single-quotes"),
        pytest.param(b'{message: "hi"}', id="bare-key"),
        pytest.param(b'{"message": "hi"} {"message": "again"}', id="two-documents"),
        pytest.param(b'{"message": "hi"}garbage', id="trailing-garbage"),
        pytest.param(b"not json at all", id="text"),
        pytest.param(b'{"message": "\\ud800"}', id="lone-surrogate-escape"),
        pytest.param(b'{"message": "tab\tinside"}', id="raw-control-character"),
    ],
)
def test_malformed_json_is_400(shared_server: Server, body: bytes) -> None:
    assert_error(post(shared_server, body), 400, "JSON")


@pytest.mark.parametrize("body", [b"", b"   ", b"\r\n\t "], ids=["empty", "spaces", "whitespace"])
def test_empty_body_is_400(shared_server: Server, body: bytes) -> None:
    assert_error(post(shared_server, body), 400, "empty")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"message": "\xff"}', id="ff-byte"),
        pytest.param(b'{"message": "\xc0\xaf"}', id="overlong-slash"),
        pytest.param(b'{"message": "\xed\xa0\x80"}', id="encoded-surrogate"),
        pytest.param(b'{"message": "caf\xe9"}', id="latin-1"),
        pytest.param(b'{"message": "\xe2\x82"}', id="truncated-sequence"),
        pytest.param(b"\xff\xfe{\x00}\x00", id="utf-16-bom"),
    ],
)
def test_invalid_utf8_is_400(shared_server: Server, body: bytes) -> None:
    assert_error(post(shared_server, body), 400, "UTF-8")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400", b"-1e400"])
def test_nan_and_infinity_are_400(shared_server: Server, literal: bytes) -> None:
    body = b'{"message": "hi", "user_ids": ["%s"], "data": {"x": %s}}' % (NOBODY.encode(), literal)
    assert_error(post(shared_server, body), 400)


@pytest.mark.parametrize(
    "literal", [b"123456789012345678901234567890", b"18446744073709551616", b"-9223372036854775809"]
)
def test_an_integer_past_64_bits_is_422_not_a_silent_float(shared_server: Server, literal: bytes) -> None:
    body = b'{"message": "hi", "user_ids": ["%s"], "data": {"n": %s}}' % (NOBODY.encode(), literal)
    assert "64-bit" in assert_error(post(shared_server, body), 422, "body")


def test_64_bit_integers_and_long_digit_strings_are_taken_exactly(shared_server: Server) -> None:
    with sync_connect(shared_server.listen_url("wide-ints")) as ws:
        body = b'{"message": "1234567890123456789012345", "user_ids": ["wide-ints"], "data": {"max": 18446744073709551615, "min": -9223372036854775808}}'  # noqa: E501
        answer = post(shared_server, body)
        assert answer.status_code == 200, answer.text
        frame = orjson.loads(ws.recv(timeout=5))
        assert frame["message"] == "1234567890123456789012345"
        assert frame["data"] == {"max": 18446744073709551615, "min": -9223372036854775808}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000, id="100000-arrays"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="100000-closed-arrays"),
        pytest.param(b'{"a":' * 50_000, id="50000-objects"),
        pytest.param(b'{"message": "hi", "data": ' + b'{"a":' * 40_000 + b"1" + b"}" * 40_001, id="deep-data"),
    ],
)
def test_nesting_bomb_is_refused(shared_server: Server, body: bytes) -> None:
    response = post(shared_server, body)
    assert response.status_code in (400, 422), (response.status_code, response.text)
    assert_error(response, response.status_code)


@pytest.mark.anyio
@pytest.mark.parametrize("depth", [300, 1000])
async def test_deep_data_inside_the_parse_limit_is_delivered_or_refused(shared_server: Server, depth: int) -> None:
    """Nesting the parser takes but the serialiser may not: refused with 400/422, or delivered whole; never 500."""
    user = f"deep-{depth}"
    body = b'{"message": "deep", "user_ids": ["%s"], "data": {"a": %s}}' % (
        user.encode(),
        b"[" * depth + b"]" * depth,
    )
    async with connect(shared_server.listen_url(user), open_timeout=TIMEOUT) as ws, httpx.AsyncClient() as client:
        response = await client.post(f"{shared_server.http}{NOTIFY}", content=body, headers=JSON, timeout=10)
        if response.status_code == 200:
            frame = await asyncio.wait_for(ws.recv(decode=True), TIMEOUT)
            assert '"data":{"a":' + "[" * depth + "]" * depth + "}}" in frame
        else:
            assert response.status_code in (400, 422), (response.status_code, response.text)
            assert_error(response, response.status_code, *(["data"] if response.status_code == 422 else []))


# --- well-formed but invalid: 422 naming the field -------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "kind"),
    [
        pytest.param([{"message": "hi"}], "array", id="array"),
        pytest.param("message", "string", id="string"),
        pytest.param(42, "number", id="number"),
        pytest.param(4.5, "number", id="float"),
        pytest.param(None, "null", id="null"),
        pytest.param(True, "boolean", id="true"),
    ],
)
def test_non_object_body_is_422(shared_server: Server, doc: Any, kind: str) -> None:
    assert_error(post_json(shared_server, doc), 422, "object", kind)


@pytest.mark.parametrize(
    "doc",
    [
        pytest.param({}, id="empty-object"),
        pytest.param({"user_ids": [NOBODY]}, id="no-message"),
    ],
)
def test_missing_message_is_422(shared_server: Server, doc: dict[str, Any]) -> None:
    assert_error(post_json(shared_server, doc), 422, "message", "required")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("message", 1),
        ("message", 1.5),
        ("message", True),
        ("message", None),
        ("message", ["hi"]),
        ("message", {"text": "hi"}),
        ("user_ids", NOBODY),
        ("user_ids", 7),
        ("user_ids", None),
        ("user_ids", True),
        ("user_ids", {NOBODY: True}),
        ("type", 1),
        ("type", None),
        ("type", ["notification"]),
        ("type", {"name": "notification"}),
        ("type", False),
        ("data", [1, 2]),
        ("data", "text"),
        ("data", 3),
        ("data", True),
        ("data", None),
    ],
)
def test_wrong_type_names_the_field(shared_server: Server, field: str, value: Any) -> None:
    doc: dict[str, Any] = {"message": "hi", "user_ids": [NOBODY], field: value}
    assert_error(post_json(shared_server, doc), 422, field)


@pytest.mark.parametrize("message", ["", " ", "   \t\n  ", "\r\n", "\u00a0\u3000"])
def test_blank_message_is_422(shared_server: Server, message: str) -> None:
    assert_error(post_json(shared_server, {"message": message, "user_ids": [NOBODY]}), 422, "message", "blank")


def test_message_over_max_chars_is_422(shared_server: Server) -> None:
    doc = {"message": "x" * (MAX_MESSAGE_CHARS + 1), "user_ids": [NOBODY]}
    assert_error(post_json(shared_server, doc), 422, "message", str(MAX_MESSAGE_CHARS))


@pytest.mark.parametrize("char", ["x", "é"], ids=["ascii", "two-byte"])
def test_message_of_exactly_max_chars_is_taken(shared_server: Server, char: str) -> None:
    """The limit counts characters, not bytes: 65536 two-byte characters pass validation."""
    assert_nobody(post_json(shared_server, {"message": char * MAX_MESSAGE_CHARS, "user_ids": [NOBODY]}))


@pytest.mark.parametrize(
    "field", ["usr_ids", "messages", "user_id", "Message", "priority", "<script>alert(1)</script>"]
)
def test_unknown_field_is_422_and_named(shared_server: Server, field: str) -> None:
    doc = {"message": "hi", "user_ids": [NOBODY], field: 1}
    assert_error(post_json(shared_server, doc), 422, field)


def test_empty_user_ids_is_422(shared_server: Server) -> None:
    assert_error(post_json(shared_server, {"message": "hi", "user_ids": []}), 422, "user_ids", "empty")


def test_over_1000_user_ids_is_422(shared_server: Server) -> None:
    ids = [f"user-{i}" for i in range(1001)]
    assert_error(post_json(shared_server, {"message": "hi", "user_ids": ids}), 422, "user_ids", "1000")


def test_exactly_1000_user_ids_are_taken(shared_server: Server) -> None:
    ids = [f"nobody-{i}" for i in range(1000)]
    assert_nobody(post_json(shared_server, {"message": "hi", "user_ids": ids}))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("", id="empty"),
        pytest.param("a" * 129, id="129-chars"),
        pytest.param("a b", id="space"),
        pytest.param("a/b", id="slash"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="dot-dot"),
        pytest.param("a\u0000b", id="nul"),
        pytest.param("<script>alert(1)</script>", id="markup"),
        pytest.param('a"b', id="quote"),
        pytest.param("ünïcode", id="non-ascii"),
        pytest.param(7, id="number"),
        pytest.param(None, id="null"),
        pytest.param(["alice"], id="nested-list"),
        pytest.param({"id": "alice"}, id="object"),
    ],
)
def test_invalid_user_id_in_user_ids_is_422(shared_server: Server, bad: Any) -> None:
    doc = {"message": "hi", "user_ids": ["alice", bad]}
    assert_error(post_json(shared_server, doc), 422, "user_ids")


@pytest.mark.parametrize("kind", ["resume", "heartbeat"])
def test_reserved_type_is_422(shared_server: Server, kind: str) -> None:
    doc = {"message": "hi", "user_ids": [NOBODY], "type": kind}
    assert_error(post_json(shared_server, doc), 422, "type", "reserved")


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("", id="empty"),
        pytest.param("Notification", id="upper-case"),
        pytest.param("has space", id="space"),
        pytest.param("x" * 65, id="65-chars"),
        pytest.param("ünï", id="non-ascii"),
        pytest.param("<script>", id="markup"),
        pytest.param("notification\n", id="trailing-newline"),
        pytest.param("a/b", id="slash"),
    ],
)
def test_bad_type_pattern_is_422(shared_server: Server, kind: str) -> None:
    doc = {"message": "hi", "user_ids": [NOBODY], "type": kind}
    assert_error(post_json(shared_server, doc), 422, "type")


def test_longest_type_and_empty_data_are_taken(shared_server: Server) -> None:
    doc = {"message": "hi", "user_ids": [NOBODY], "type": "a.b_c-" + "x" * 58, "data": {}}
    assert_nobody(post_json(shared_server, doc))


# --- body size: 413 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 4 * 1024 * 1024])
def test_oversize_body_with_content_length_is_413(shared_server: Server, size: int) -> None:
    body = b'{"message": "' + b"x" * (size - 15) + b'"}'
    assert len(body) == size
    assert_error(post(shared_server, body), 413, str(MAX_BODY_BYTES))


def test_body_of_exactly_max_bytes_is_taken(shared_server: Server) -> None:
    doc = orjson.dumps({"message": "hi", "user_ids": [NOBODY]})
    assert_nobody(post(shared_server, doc + b" " * (MAX_BODY_BYTES - len(doc))))


def test_oversize_chunked_body_without_content_length_is_413(shared_server: Server) -> None:
    body = b'{"message": "' + b"x" * (MAX_BODY_BYTES + 65536) + b'"}'
    status, headers, answer = raw_request(shared_server, chunked_head(shared_server), chunked(body))
    assert status == 413, (status, answer)
    assert str(MAX_BODY_BYTES) in error_message(status, headers.get("content-type"), answer)


def test_small_chunked_body_is_read(shared_server: Server) -> None:
    """The chunked path reads the body for real: a valid one gets past validation to the 404."""
    body = orjson.dumps({"message": "hi", "user_ids": [NOBODY]})
    status, headers, answer = raw_request(shared_server, chunked_head(shared_server), chunked(body, size=7))
    assert status == 404, (status, answer)
    error_message(status, headers.get("content-type"), answer, COUNTERS)


def test_chunked_bad_json_is_400(shared_server: Server) -> None:
    status, headers, answer = raw_request(shared_server, chunked_head(shared_server), chunked(b'{"message": '))
    assert status == 400, (status, answer)
    assert "JSON" in error_message(status, headers.get("content-type"), answer)


# --- Content-Type: 415 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/jsonx",
        "application/json-patch+json",
        "text/json",
        "",
    ],
)
def test_wrong_or_missing_content_type_is_415(shared_server: Server, content_type: str | None) -> None:
    body = orjson.dumps({"message": "hi", "user_ids": [NOBODY]})
    assert_error(post(shared_server, body, content_type), 415, "Content-Type", "application/json")


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", "application/json;charset=UTF-8"]
)
def test_json_content_type_variants_are_taken(shared_server: Server, content_type: str) -> None:
    assert_nobody(post(shared_server, orjson.dumps({"message": "hi", "user_ids": [NOBODY]}), content_type))


# --- methods and paths: 405 and 404 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", NOTIFY, "POST"),
        ("PUT", NOTIFY, "POST"),
        ("DELETE", NOTIFY, "POST"),
        ("PATCH", NOTIFY, "POST"),
        ("OPTIONS", NOTIFY, "POST"),
        ("POST", f"{API}/status", "GET"),
        ("PUT", f"{API}/status", "GET"),
        ("DELETE", f"{API}/status", "GET"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/healthz", "GET"),
        ("POST", "/readyz", "GET"),
        ("PUT", "/readyz", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(shared_server: Server, method: str, path: str, allowed: str) -> None:
    response = httpx.request(method, f"{shared_server.http}{path}", timeout=10)
    assert_error(response, 405, method, allowed)
    allow = {item.strip() for item in response.headers.get("allow", "").split(",")}
    assert allowed in allow, response.headers
    assert method not in allow, response.headers


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nope"),
        ("POST", "/api/v1/ws/notificationz"),
        ("POST", "/api/v2/ws/notification"),
        ("GET", "/api/v1/ws/status/extra"),
        ("GET", "/api/v1/ws/alice"),
        ("GET", "/api/v1"),
        ("GET", "/%3Cscript%3E"),
        ("GET", "/../../etc/passwd"),
    ],
)
def test_unknown_path_is_404_json(shared_server: Server, method: str, path: str) -> None:
    response = httpx.request(method, f"{shared_server.http}{path}", timeout=10)
    assert_error(response, 404)


# --- WebSocket handshakes refused before the upgrade -----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "user_id",
    [
        pytest.param("a" * 129, id="129-chars"),
        pytest.param("a/b", id="slash"),
        pytest.param("a%2Fb", id="encoded-slash"),
        pytest.param("a%20b", id="space"),
        pytest.param("a%00b", id="nul"),
        pytest.param("a%22b", id="double-quote"),
        pytest.param("a%27b", id="single-quote"),
        pytest.param("%3Cscript%3Ealert(1)%3C%2Fscript%3E", id="markup"),
        pytest.param(".", id="dot"),
        pytest.param("..", id="dot-dot"),
        pytest.param("%2E%2E", id="encoded-dot-dot"),
        pytest.param("", id="empty"),
        pytest.param("%FF", id="bad-utf8"),
        pytest.param("%E2%80%8B", id="zero-width-space"),
        pytest.param("a%0Ab", id="newline"),
        pytest.param("a%0Db", id="carriage-return"),
        pytest.param("a%09b", id="tab"),
    ],
)
async def test_bad_user_id_is_refused_with_400(shared_server: Server, user_id: str) -> None:
    status, message = await refusal(shared_server.listen_url(user_id))
    assert status == 400, message
    assert "user_id" in message


@pytest.mark.anyio
async def test_longest_user_id_is_accepted(shared_server: Server) -> None:
    """The boundary beside the 129-character refusal, and every allowed character."""
    user = ("Az09_.:@-" * 15)[:128]
    async with connect(shared_server.listen_url(user), open_timeout=TIMEOUT) as ws:
        assert ws.close_code is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    [
        "since=abc",
        "since=",
        "since=1-",
        "since=-1-0",
        "since=1-2-3",
        "since=1.5-0",
        "since=%20170-0",
        "since=99999999999999999999-0",
        "since=1-0&since=2-0",
        "since=%FF",
        "since=%D9%A1%D9%A2-0",  # Arabic-Indic digits: not an id, though Python's \d matches them
    ],
)
async def test_malformed_since_is_refused_with_400(shared_server: Server, query: str) -> None:
    status, message = await refusal(shared_server.listen_url("since-user", query))
    assert status == 400, message
    assert "since" in message


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/other", "/", "/api/v2/ws/alice", "/healthz", "/api/v1/sse"])
async def test_unknown_websocket_path_is_404_json(shared_server: Server, path: str) -> None:
    status, message = await refusal(f"{shared_server.ws}{path}")
    assert status == 404, message


# --- frames from the client --------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("x" * (MAX_INCOMING_BYTES + 1), id="text-4097"),
        pytest.param(b"\0" * (MAX_INCOMING_BYTES + 1), id="binary-4097"),
        pytest.param("é" * (MAX_INCOMING_BYTES // 2 + 1), id="text-4098-bytes-in-2049-chars"),
        pytest.param("x" * 1_000_000, id="text-1MB"),
    ],
)
async def test_oversize_client_frame_closes_with_1009(shared_server: Server, frame: str | bytes) -> None:
    async with connect(shared_server.listen_url("big-frame"), open_timeout=TIMEOUT) as ws:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(frame)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None, closed.value
        assert closed.value.rcvd.code == 1009
        assert await wait_closed(ws) == 1009


@pytest.mark.anyio
async def test_frame_flood_closes_with_1008(shared_server: Server) -> None:
    async with connect(shared_server.listen_url("flooder"), open_timeout=TIMEOUT) as ws:
        with contextlib.suppress(ConnectionClosed):
            for i in range(500):
                await ws.send(f"frame {i}")
        assert await wait_closed(ws) == 1008


@pytest.mark.anyio
async def test_a_few_frames_of_the_largest_size_are_discarded_and_the_socket_lives(shared_server: Server) -> None:
    """The boundary: frames of exactly MAX_INCOMING_BYTES, well under the rate, leave the socket working."""
    user = "polite-talker"
    async with connect(shared_server.listen_url(user), open_timeout=TIMEOUT) as ws, httpx.AsyncClient() as client:
        for _ in range(5):
            await ws.send("x" * MAX_INCOMING_BYTES)
        await ws.send(b"\0" * MAX_INCOMING_BYTES)
        response = await apost(client, shared_server, {"message": "after talk", "user_ids": [user]})
        assert response.status_code == 200, response.text
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert frame["message"] == "after talk"


# --- last: the server still serves ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_still_delivers_after_the_abuse(shared_server: Server) -> None:
    """After everything above, a listener still gets a POSTed notification (teardown checks the log)."""
    user = "survivor"
    async with connect(shared_server.listen_url(user), open_timeout=TIMEOUT) as ws, httpx.AsyncClient() as client:
        response = await apost(client, shared_server, {"message": "still here", "user_ids": [user]})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["status"] == "success"
        assert answer["sent_count"] == 1
        frame = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert frame["type"] == "notification"
        assert frame["message"] == "still here"
        assert frame["id"] == answer["id"]
    health = await asyncio.wait_for(asyncio.to_thread(shared_server.get, "/healthz"), TIMEOUT)
    assert health.status_code == 200


def upgrade_head(server: Server, target: str, extra: bytes = b"") -> bytes:
    return (
        (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


@pytest.mark.parametrize(
    ("target", "extra", "status", "words"),
    [
        pytest.param(f"{API}/alice?token={'x' * 9000}", b"", 414, ("request line", "Authorization"), id="long-token"),
        pytest.param(f"{API}/alice", b"X-Big: " + b"y" * 9000 + b"\r\n", 431, ("header",), id="long-header"),
        pytest.param(
            f"{API}/alice", b"".join(b"X-%d: 1\r\n" % i for i in range(200)), 431, ("headers",), id="200-headers"
        ),
    ],
)
def test_an_upgrade_too_big_for_the_websocket_parser_is_answered_not_left_hanging(
    shared_server: Server, target: str, extra: bytes, status: int, words: tuple[str, ...]
) -> None:
    """httptools hands these over for the upgrade; websockets' own limits refuse them. Before the fix the
    client got no answer at all and waited for its own timeout."""
    got, headers, body = raw_request(shared_server, upgrade_head(shared_server, target, extra), b"")
    assert got == status, body
    message = error_message(got, headers.get("content-type"), body)
    assert all(word in message for word in words), message


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/healthz/"), ("GET", "/api/v1/ws/status/"), ("POST", "/api/v1/ws/notification/"), ("GET", "/metrics/")],
)
def test_a_trailing_slash_is_a_json_404_not_a_redirect_to_the_clients_host(
    shared_server: Server, method: str, path: str
) -> None:
    answer = httpx.request(
        method, f"{shared_server.http}{path}", headers={"Host": "evil.example", "Content-Type": "application/json"},
        content=b'{"message": "hi"}' if method == "POST" else None, follow_redirects=False, timeout=5,
    )  # fmt: skip
    assert "location" not in answer.headers
    assert_error(answer, 404, path)
