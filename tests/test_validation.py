"""Unit tests of the pure edge checks (`diary_ws.validation`) and of message ids and frames (`diary_ws.messages`)."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from diary_ws import messages
from diary_ws.errors import BadRequest, DiaryWSError, UnsupportedMediaType, ValidationError
from diary_ws.messages import IdClock, MessageId, parse_id, render, rfc3339
from diary_ws.validation import (
    ListenQuery,
    Notification,
    check_content_type,
    check_user_id,
    parse_listen_query,
    parse_notification,
    parse_stream_query,
)

LIMIT = 65536


def parse(doc: Any, limit: int = LIMIT) -> Notification:
    return parse_notification(orjson.dumps(doc), limit)


def invalid_field(doc: Any, limit: int = LIMIT) -> ValidationError:
    """The ValidationError `doc` raises; it is a 422."""
    with pytest.raises(ValidationError) as caught:
        parse(doc, limit)
    assert caught.value.status_code == 422
    assert caught.value.field in caught.value.message
    return caught.value


# --- parse_notification ----------------------------------------------------------------------------------


def test_minimal_notification_is_a_broadcast_with_defaults() -> None:
    assert parse({"message": "hi"}) == Notification(message="hi", user_ids=None, type="notification", data=None)


def test_every_field_is_kept() -> None:
    note = parse({"message": "hi", "user_ids": ["a", "b"], "type": "order.shipped", "data": {"n": [1, {"x": None}]}})
    assert note == Notification("hi", ("a", "b"), "order.shipped", {"n": [1, {"x": None}]})


def test_notification_is_frozen() -> None:
    note = parse({"message": "hi"})
    with pytest.raises(AttributeError):
        note.message = "changed"  # type: ignore[misc]


def test_user_ids_lose_duplicates_and_keep_their_order() -> None:
    assert parse({"message": "hi", "user_ids": ["b", "a", "b", "c", "a"]}).user_ids == ("b", "a", "c")


def test_message_keeps_its_whitespace_and_unicode() -> None:
    assert parse({"message": "  héllo 👋\n"}).message == "  héllo 👋\n"


@pytest.mark.parametrize(
    ("body", "word"),
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"{", "JSON"),
        (b'{"message": NaN}', "JSON"),
        (b'{"message": "\xff"}', "UTF-8"),
        (b"[" * 2000, "JSON"),
    ],
)
def test_unparsable_body_is_bad_request(body: bytes, word: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_notification(body, LIMIT)
    assert caught.value.status_code == 400
    assert word in caught.value.message


@pytest.mark.parametrize("doc", [[], "hi", 1, None, True])
def test_non_object_body_names_the_body(doc: Any) -> None:
    assert invalid_field(doc).field == "body"


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({}, "message"),
        ({"message": 1}, "message"),
        ({"message": None}, "message"),
        ({"message": ""}, "message"),
        ({"message": " \t\n"}, "message"),
        ({"message": "hi", "user_ids": "a"}, "user_ids"),
        ({"message": "hi", "user_ids": []}, "user_ids"),
        ({"message": "hi", "user_ids": None}, "user_ids"),
        ({"message": "hi", "user_ids": ["ok", "not ok"]}, "user_ids[1]"),
        ({"message": "hi", "user_ids": [3]}, "user_ids[0]"),
        ({"message": "hi", "type": "resume"}, "type"),
        ({"message": "hi", "type": "heartbeat"}, "type"),
        ({"message": "hi", "type": "UPPER"}, "type"),
        ({"message": "hi", "type": ""}, "type"),
        ({"message": "hi", "type": "x" * 65}, "type"),
        ({"message": "hi", "type": 5}, "type"),
        ({"message": "hi", "data": []}, "data"),
        ({"message": "hi", "data": "x"}, "data"),
        ({"message": "hi", "data": None}, "data"),
        ({"message": "hi", "extra": 1}, "extra"),
        ({"message": "hi", "zzz": 1, "aaa": 2}, "aaa"),
    ],
)
def test_invalid_field_is_named(doc: dict[str, Any], field: str) -> None:
    assert invalid_field(doc).field == field


def test_message_limit_counts_characters() -> None:
    assert parse({"message": "é" * 4}, limit=4).message == "é" * 4
    assert invalid_field({"message": "é" * 5}, limit=4).field == "message"


def test_user_ids_limit_is_1000() -> None:
    ids = [f"u{i}" for i in range(1000)]
    assert len(parse({"message": "hi", "user_ids": ids}).user_ids or ()) == 1000
    assert "1000" in invalid_field({"message": "hi", "user_ids": [*ids, "one-more"]}).message


def test_longest_type_is_taken() -> None:
    assert parse({"message": "hi", "type": "a" * 64}).type == "a" * 64


# --- check_user_id ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("user_id", ["a", "A-Z_a.z:0@9", "x" * 128, "user@example.com", "...", ".a", "a.", "-", "_"])
def test_valid_user_id_is_returned(user_id: str) -> None:
    assert check_user_id(user_id) == user_id


@pytest.mark.parametrize(
    "user_id", ["", ".", "..", "x" * 129, "a b", "a/b", "a\0b", "a\nb", '"', "<script>", "é", "\uff41", "a%20b", "a+b"]
)
def test_invalid_user_id_is_bad_request(user_id: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check_user_id(user_id)
    assert caught.value.status_code == 400
    assert "user_id" in caught.value.message


@pytest.mark.parametrize("user_id", ["a\0b\x1b[31m", "x" * 100_000])
def test_user_id_error_shows_the_value_harmlessly(user_id: str) -> None:
    """Control characters come back escaped and a huge id is not echoed whole."""
    with pytest.raises(BadRequest) as caught:
        check_user_id(user_id)
    message = caught.value.message
    assert not any(ord(c) < 0x20 for c in message), message
    assert len(message) < 500


# --- check_content_type ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", ["application/json", "application/json; charset=utf-8", "Application/JSON", " application/json"]
)
def test_json_content_type_passes(header: str) -> None:
    check_content_type(header)


@pytest.mark.parametrize("header", [None, "", "text/plain", "application/jsonx", "application/json-patch+json", "json"])
def test_other_content_type_is_415(header: str | None) -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        check_content_type(header)
    assert caught.value.status_code == 415
    assert "Content-Type" in caught.value.message


# --- parse_listen_query ----------------------------------------------------------------------------------


def test_empty_query_has_no_since() -> None:
    assert parse_listen_query(b"") == ListenQuery(since=None)


@pytest.mark.parametrize(
    ("query", "since"),
    [
        (b"since=1700000000000-5", MessageId(1700000000000, 5)),
        (b"since=0-0", MessageId(0, 0)),
        (b"since=18446744073709551615-18446744073709551615", MessageId(2**64 - 1, 2**64 - 1)),
    ],
)
def test_since_is_parsed(query: bytes, since: MessageId) -> None:
    assert parse_listen_query(query).since == since


@pytest.mark.parametrize(
    "query",
    [
        b"since=abc",
        b"since=",
        b"since",
        b"since=1",
        b"since=1-",
        b"since=-1-0",
        b"since=1-2-3",
        b"since=18446744073709551616-0",
        b"since=1-0&since=1-0",
        b"since=%ff",
        b"since=\xff",
        b"since=%D9%A1%D9%A2-0",  # Arabic-Indic digits: Python's \d takes them, a Redis stream id does not
    ],
)
def test_malformed_since_is_bad_request(query: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_listen_query(query)
    assert caught.value.status_code == 400
    assert isinstance(caught.value, DiaryWSError)


@pytest.mark.parametrize(
    ("query", "seconds"),
    [(b"heartbeat=1", 1.0), (b"heartbeat=300", 300.0), (b"heartbeat=2.5", 2.5), (b"since=1-0&heartbeat=30", 30.0)],
)
def test_heartbeat_is_parsed(query: bytes, seconds: float) -> None:
    assert parse_listen_query(query).heartbeat == seconds


def test_no_heartbeat_without_the_query() -> None:
    assert parse_listen_query(b"since=1-0").heartbeat is None


@pytest.mark.parametrize(
    "query",
    [b"heartbeat=0", b"heartbeat=0.5", b"heartbeat=301", b"heartbeat=-5", b"heartbeat=", b"heartbeat", b"heartbeat=abc",
     b"heartbeat=nan", b"heartbeat=inf", b"heartbeat=1e2", b"heartbeat=%201", b"heartbeat=1&heartbeat=2",
     b"heartbeat=%D9%A1"],
)  # fmt: skip
def test_bad_heartbeat_is_bad_request(query: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_listen_query(query)
    assert "heartbeat" in caught.value.message
    assert "1 to 300" in caught.value.message or "once" in caught.value.message


# --- parse_stream_query (SSE) --------------------------------------------------------------------------------


def test_stream_query_since_from_query_or_header() -> None:
    assert parse_stream_query(b"", None) == ListenQuery()
    assert parse_stream_query(b"since=5-1", None).since == MessageId(5, 1)
    assert parse_stream_query(b"", "7-2").since == MessageId(7, 2)


def test_last_event_id_wins_over_since() -> None:
    """An EventSource keeps its URL (and its ?since=) on reconnect, and sends the newer id in the header."""
    assert parse_stream_query(b"since=5-1", "9-0").since == MessageId(9, 0)


def test_empty_last_event_id_is_no_header() -> None:
    assert parse_stream_query(b"since=5-1", "").since == MessageId(5, 1)


@pytest.mark.parametrize(("query", "header"), [(b"", "abc"), (b"", "1-"), (b"since=x", None), (b"since=1-0", "1.0")])
def test_malformed_stream_resume_is_bad_request(query: bytes, header: str | None) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_stream_query(query, header)
    assert "Last-Event-ID" in caught.value.message or "since" in caught.value.message


def test_stream_refuses_heartbeat() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_stream_query(b"heartbeat=10", None)
    assert "PING_INTERVAL" in caught.value.message


# --- messages: ids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0-0", MessageId(0, 0)),
        ("1700000000000-3", MessageId(1700000000000, 3)),
        ("007-008", MessageId(7, 8)),
        (f"{2**64 - 1}-0", MessageId(2**64 - 1, 0)),
    ],
)
def test_parse_id(text: str, expected: MessageId) -> None:
    assert parse_id(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "1-",
        "-1",
        "a-b",
        "1-2-3",
        " 1-2",
        "1-2 ",
        "1-2\n",
        "+1-2",
        "1.0-2",
        "1_0-2",
        f"{2**64}-0",
        "\uff11-2",
        "\u0661\u0662\u0663-0",
    ],
)
def test_parse_id_refuses(text: str) -> None:
    assert parse_id(text) is None


def test_id_round_trips_through_str() -> None:
    assert str(MessageId(1700000000000, 12)) == "1700000000000-12"
    assert parse_id(str(MessageId(1700000000000, 12))) == MessageId(1700000000000, 12)


@pytest.mark.parametrize(("lower", "higher"), [("9-0", "10-0"), ("1-9", "1-10"), ("99-999", "100-0"), ("5-0", "5-1")])
def test_ids_compare_as_integers_not_strings(lower: str, higher: str) -> None:
    low, high = parse_id(lower), parse_id(higher)
    assert low is not None
    assert high is not None
    assert low < high
    assert not high < low
    assert max(low, high) == high


def test_sorting_ids_is_numeric() -> None:
    texts = ["10-0", "9-0", "1-10", "1-9", "100-0"]
    ids = [parse_id(t) for t in texts]
    assert [str(i) for i in sorted(i for i in ids if i is not None)] == ["1-9", "1-10", "9-0", "10-0", "100-0"]


def test_id_clock_is_strictly_increasing_in_a_tight_loop() -> None:
    clock = IdClock()
    ids = [clock.next() for _ in range(20_000)]
    assert all(a < b for a, b in pairwise(ids))
    assert len({i.ms for i in ids}) < len(ids)  # 20000 calls do not take 20000 ms: some shared a millisecond


def test_id_clock_counts_up_within_one_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages, "time", SimpleNamespace(time_ns=lambda: 1_700_000_000_000_123_456))
    clock = IdClock()
    assert [clock.next() for _ in range(1000)] == [MessageId(1_700_000_000_000, seq) for seq in range(1000)]


def test_id_clock_never_steps_back_with_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [2_000_000_000_000_000_000]
    monkeypatch.setattr(messages, "time", SimpleNamespace(time_ns=lambda: now[0]))
    clock = IdClock()
    first = clock.next()
    now[0] -= 60 * 10**9  # the clock steps back a minute
    second = clock.next()
    now[0] += 120 * 10**9
    third = clock.next()
    assert first < second < third
    assert second == MessageId(first.ms, first.seq + 1)
    assert third == MessageId(first.ms + 60_000, 0)


# --- messages: frames ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch_ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (5, "1970-01-01T00:00:00.005Z"),
        (1700000000123, "2023-11-14T22:13:20.123Z"),
        (1700000000999, "2023-11-14T22:13:20.999Z"),
    ],
)
def test_rfc3339(epoch_ms: int, text: str) -> None:
    assert rfc3339(epoch_ms) == text
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert parsed == datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)


def test_render_has_the_guide_keys_and_no_data_when_none_was_given() -> None:
    frame = orjson.loads(render("notification", "hello", None, MessageId(1700000000123, 4)))
    assert frame == {
        "type": "notification",
        "message": "hello",
        "id": "1700000000123-4",
        "sent_at": "2023-11-14T22:13:20.123Z",
    }


@pytest.mark.parametrize("data", [{}, {"order": 7, "items": [1, 2], "nested": {"ok": True}}])
def test_render_adds_data_when_given(data: dict[str, Any]) -> None:
    frame = orjson.loads(render("order.shipped", "héllo 👋", data, MessageId(1, 0)))
    assert set(frame) == {"type", "message", "id", "sent_at", "data"}
    assert frame["type"] == "order.shipped"
    assert frame["message"] == "héllo 👋"
    assert frame["data"] == data
