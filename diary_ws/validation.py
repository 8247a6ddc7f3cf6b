"""Pure checks at the edge: raw request parts in, frozen values or a `DiaryWSError` out.

Sizes are checked before anything is parsed, and nothing downstream checks again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson

from diary_ws.errors import BadRequest, UnsupportedMediaType, ValidationError
from diary_ws.messages import MessageId, parse_id

MAX_USER_IDS = 1000
USER_ID_RULE = "1-128 characters from A-Z a-z 0-9 _ . : @ -, and not . or .."
_USER_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_TYPE = re.compile(r"[a-z0-9_.-]{1,64}")
RESERVED_TYPES = frozenset({"resume", "heartbeat"})
FIELDS = ("message", "user_ids", "type", "data")
_FIELD_SET = frozenset(FIELDS)


@dataclass(frozen=True, slots=True)
class Notification:
    """A checked POST body."""

    message: str
    user_ids: tuple[str, ...] | None  # None: everyone; otherwise distinct, in the order given
    type: str = "notification"
    data: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ListenQuery:
    """A checked listener query string (WebSocket or SSE)."""

    since: MessageId | None = None
    heartbeat: float | None = None  # seconds between {"type": "heartbeat"} frames; WebSocket only, opt-in


def is_user_id(value: object) -> bool:
    """Whether `value` is a user id the service accepts."""
    return isinstance(value, str) and _USER_ID.fullmatch(value) is not None and value not in (".", "..")


def check_user_id(value: str) -> str:
    """The user id of a path, or BadRequest."""
    if not is_user_id(value):
        raise BadRequest(f"user_id {_show(value)} is not valid: it must be {USER_ID_RULE}")
    return value


def _show(value: str) -> str:
    shown = value if len(value) <= 40 else value[:40] + "..."
    return orjson.dumps(shown).decode()  # quoted and escaped: markup or control characters stay harmless


def check_content_type(header: str | None) -> None:
    """Only JSON bodies are taken; `application/json; charset=utf-8` is fine."""
    media = (header or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        got = f"got {header!r}" if header else "none was sent"
        raise UnsupportedMediaType(f"Content-Type must be application/json ({got})")


def parse_notification(body: bytes, max_message_chars: int) -> Notification:
    """A POST body -> Notification. The caller has already capped its size."""
    return notification_from(_parse_json(body), max_message_chars, "body")


def _parse_json(body: bytes) -> Any:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(_json_problem(body, exc)) from None
    if _LONG_DIGITS.search(body):  # rare, and cheap to rule out: only then is the body read a second time
        _refuse_wide_integers(body)
    return doc


# orjson reads an integer past 64 bits as a float, silently: 123456789012345678901234567890 would reach the
# listeners as 1.2345678901234568e+29. Such an integer has at least 19 digits (-2**63 - 1 has 19).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what orjson reads, and writes, as an integer


def _refuse_wide_integers(body: bytes) -> None:
    def integer(literal: str) -> int:
        # Past 20 digits it is out of range whatever they are (and int() refuses past 4,300 of them).
        value = int(literal) if len(literal.lstrip("-")) <= 20 else _INT_MAX + 1
        if not _INT_MIN <= value <= _INT_MAX:
            shown = literal if len(literal) <= 40 else literal[:40] + "..."
            raise ValidationError(
                "body", f"holds the integer {shown}, outside the 64-bit range JSON numbers are carried in; "
                "send it as a string",
            )  # fmt: skip
        return value

    with contextlib.suppress(RecursionError):  # too deep for this reader: the depth check refuses it
        json.loads(body, parse_int=integer)


def notification_from(doc: object, max_message_chars: int, what: str = "body") -> Notification:
    """One parsed JSON value -> Notification, with the POST body's checks; `what` names it in an error."""
    if not isinstance(doc, dict):
        raise ValidationError(what, f"must be a JSON object, not {_json_kind(doc)}")
    if not _FIELD_SET.issuperset(doc):
        unknown = sorted(set(doc) - _FIELD_SET)
        raise ValidationError(unknown[0], f"is not a known field (allowed: {', '.join(FIELDS)})")
    return Notification(
        message=_message(doc.get("message"), "message" in doc, max_message_chars),
        user_ids=_user_ids(doc["user_ids"]) if "user_ids" in doc else None,
        type=_type(doc["type"]) if "type" in doc else "notification",
        data=_data(doc["data"]) if "data" in doc else None,
    )


@dataclass(frozen=True, slots=True)
class Batch:
    """A checked batch envelope: per item, in order, a Notification or the 422 that item gets."""

    items: tuple[Notification | ValidationError, ...]
    fingerprint: bytes  # the items, keys sorted: what makes two batches the same under one Idempotency-Key


def parse_batch(body: bytes, max_batch: int, max_message_chars: int, max_item_bytes: int) -> Batch:
    """A batch POST body -> Batch. The envelope's errors are raised; each item's is kept in its place.

    An item is held to the single POST's rules, MAX_BODY_BYTES included (measured as compact JSON), so a
    batch can carry nothing that one POST could not.
    """
    doc = _parse_json(body)
    if not isinstance(doc, dict):
        raise ValidationError("body", f"must be a JSON object, not {_json_kind(doc)}")
    unknown = sorted(set(doc) - {"notifications"})
    if unknown:
        raise ValidationError(unknown[0], "is not a known field (allowed: notifications)")
    if "notifications" not in doc:
        raise ValidationError("notifications", 'is required: {"notifications": [{"message": "hello"}, ...]}')
    items = doc["notifications"]
    if not isinstance(items, list):
        raise ValidationError("notifications", f"must be a list of notifications, not {_json_kind(items)}")
    if not items:
        raise ValidationError("notifications", "must hold at least one notification")
    if len(items) > max_batch:
        # 422 as for too many user_ids in one POST; 413 is for bytes (MAX_BATCH_BYTES), before anything is parsed
        raise ValidationError("notifications", f"must hold at most {max_batch} items (MAX_BATCH); got {len(items)}")
    checked: list[Notification | ValidationError] = []
    for item in items:
        try:
            checked.append(_batch_item(item, max_message_chars, max_item_bytes))
        except ValidationError as exc:
            checked.append(exc)
    try:
        canonical = orjson.dumps(items, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # nested past what orjson writes (an invalid item): the bytes as sent, then
        canonical = body
    return Batch(tuple(checked), hashlib.sha256(b"batch\0" + canonical).digest())


def _batch_item(item: object, max_message_chars: int, max_item_bytes: int) -> Notification:
    note = notification_from(item, max_message_chars, "notification")
    size = len(orjson.dumps(item))
    if size > max_item_bytes:
        raise ValidationError(
            "notification", f"is {size} bytes as JSON; one may be at most {max_item_bytes} (MAX_BODY_BYTES)"
        )
    return note


def check_notification(
    message: object,
    user_ids: Iterable[str] | None = None,
    type: str = "notification",
    data: Mapping[str, Any] | None = None,
    *,
    max_message_chars: int,
) -> Notification:
    """The POST body's checks, in the same order, for Python callers: a Notification or the same error."""
    if isinstance(user_ids, (str, bytes)):  # a lone id would otherwise be taken letter by letter
        raise ValidationError("user_ids", f"must be a list of user ids, not {_json_kind(user_ids)}")
    return Notification(
        message=_text(_message(message, True, max_message_chars)),
        user_ids=_user_ids(list(user_ids)) if user_ids is not None else None,
        type=_type(type),
        data=_serialisable(_data(dict(data) if isinstance(data, Mapping) else data)) if data is not None else None,
    )


def _text(message: str) -> str:
    # A Python str may hold a lone surrogate, which no UTF-8 frame can carry (a POST body cannot: orjson
    # refuses it): without this check it was a TypeError from inside the publish.
    try:
        message.encode()
    except UnicodeEncodeError as exc:
        raise ValidationError("message", f"must be valid Unicode text: a lone surrogate at {exc.start}") from None
    return message


def _serialisable(data: dict[str, Any]) -> dict[str, Any]:
    # A POST body is JSON by construction; a Python dict may hold what JSON cannot (a set, a non-str key).
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        raise ValidationError("data", f"must be JSON-serialisable: {exc}") from None
    if _holds_non_finite(data):  # orjson writes NaN and Infinity as null: a silent change, refused as the POST does
        raise ValidationError("data", "must not hold NaN or Infinity: JSON has no such number")
    return data


def _holds_non_finite(value: object) -> bool:
    """Whether a float NaN or infinity is anywhere in `value`; a walk with a stack, as `_depth_over`."""
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def _json_problem(body: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"body is not valid UTF-8 (bad byte at position {bad.start})"
    if not body.strip():
        return 'body is empty: send a JSON object such as {"message": "hello"}'
    return f"body is not valid JSON: {exc.msg} at position {exc.pos}"


def _json_kind(value: object) -> str:
    kinds = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _message(value: object, present: bool, max_chars: int) -> str:
    if not present:
        raise ValidationError("message", "is required")
    if not isinstance(value, str):
        raise ValidationError("message", f"must be a string, not {_json_kind(value)}")
    if not value.strip():
        raise ValidationError("message", "must not be blank")
    if len(value) > max_chars:
        raise ValidationError("message", f"must be at most {max_chars} characters (got {len(value)})")
    return value


def _user_ids(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValidationError("user_ids", f"must be a list of user ids, not {_json_kind(value)}")
    if not value:
        raise ValidationError("user_ids", "must not be empty (leave it out to send to everyone)")
    if len(value) > MAX_USER_IDS:
        raise ValidationError("user_ids", f"must hold at most {MAX_USER_IDS} user ids (got {len(value)})")
    for i, item in enumerate(value):
        if not is_user_id(item):
            shown = _show(item) if isinstance(item, str) else _json_kind(item)
            raise ValidationError(f"user_ids[{i}]", f"{shown} is not valid: a user id is {USER_ID_RULE}")
    return tuple(dict.fromkeys(value))


def _type(value: object) -> str:
    if not isinstance(value, str) or not _TYPE.fullmatch(value):
        raise ValidationError("type", "must be 1-64 characters from a-z 0-9 _ . -")
    if value in RESERVED_TYPES:
        raise ValidationError("type", f"{value!r} is reserved for the server's own frames")
    return value


MAX_DATA_DEPTH = 64


def _data(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError("data", f"must be a JSON object, not {_json_kind(value)}")
    # orjson parses 1024 levels but serialises only about 254, so a deep `data` would fail at publish time.
    if _depth_over(value, MAX_DATA_DEPTH):
        raise ValidationError("data", f"must not nest more than {MAX_DATA_DEPTH} levels deep")
    return value


def _depth_over(value: object, limit: int) -> bool:
    """Whether containers nest deeper than `limit`; a walk with a stack, so a deep value cannot recurse us."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values() if isinstance(child, (dict, list)))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return False


HEARTBEAT_MIN, HEARTBEAT_MAX = 1, 300


def parse_listen_query(query_string: bytes) -> ListenQuery:
    """The WebSocket query string -> ListenQuery, or BadRequest."""
    pairs = _query_pairs(query_string)
    return ListenQuery(since=_since(pairs), heartbeat=_heartbeat(pairs))


def parse_stream_query(query_string: bytes, last_event_id: str | None) -> ListenQuery:
    """The SSE query string and `Last-Event-ID` header -> ListenQuery, or BadRequest.

    The header wins over `?since=`: an EventSource reconnecting by itself keeps the URL it was given
    (with the `since` it started from) and sends the id of the last event it saw, which is newer.
    """
    pairs = _query_pairs(query_string)
    if any(name == "heartbeat" for name, _ in pairs):
        raise BadRequest(
            "query parameter heartbeat is for WebSockets; an SSE stream sends a comment line every PING_INTERVAL"
        )
    since = _since(pairs)
    if last_event_id:  # an empty header means none: EventSource sends an id of "" as no header at all
        since = _parse_since(last_event_id, "header Last-Event-ID")
    return ListenQuery(since=since)


def _query_pairs(query_string: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(query_string.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("query string is not valid UTF-8") from None


def _once(pairs: list[tuple[str, str]], name: str) -> str | None:
    values = [value for key, value in pairs if key == name]
    if len(values) > 1:
        raise BadRequest(f"query parameter {name}: give it once")
    return values[0] if values else None


def _since(pairs: list[tuple[str, str]]) -> MessageId | None:
    since = _once(pairs, "since")
    return None if since is None else _parse_since(since, "query parameter since")


def _parse_since(text: str, where: str) -> MessageId:
    parsed = parse_id(text)
    if parsed is None:
        raise BadRequest(f"{where}: {_show(text)} is not a message id such as 1700000000000-0")
    return parsed


def _heartbeat(pairs: list[tuple[str, str]]) -> float | None:
    raw = _once(pairs, "heartbeat")
    if raw is None:
        return None
    seconds = float(raw) if re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3})?", raw) else 0.0  # no nan, inf or 1e2
    if not HEARTBEAT_MIN <= seconds <= HEARTBEAT_MAX:
        raise BadRequest(
            f"query parameter heartbeat: {_show(raw)} is not a number of seconds from {HEARTBEAT_MIN} to "
            f"{HEARTBEAT_MAX}"
        )
    return seconds
