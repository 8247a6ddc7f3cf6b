"""Token buckets, idempotency memory and log redaction, each with an injected clock or a plain record."""

from __future__ import annotations

import logging

import pytest

from diary_ws.errors import Answer, BadRequest, Conflict, RateLimited, ValidationError
from diary_ws.idempotency import IdempotencyCache, check_key, fingerprint
from diary_ws.logs import RedactTokens, redact
from diary_ws.ratelimit import Rate, RateLimiter
from diary_ws.validation import Notification, parse_notification


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- rates -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100/s", Rate(100, 1.0, 100)),
        ("100/s:200", Rate(100, 1.0, 200)),
        ("10/m", Rate(10, 60.0, 10)),
        ("1000/h:5", Rate(1000, 3600.0, 5)),
        (" 5 / S : 7 ", Rate(5, 1.0, 7)),
    ],
)
def test_rate_syntax(text: str, rate: Rate) -> None:
    assert Rate.parse(text) == rate


@pytest.mark.parametrize("text", ["", "100", "100/d", "0/s", "10/s:0", "-1/s", "1.5/s", "ten/s", "10/s:"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="COUNT/PERIOD"):
        Rate.parse(text)


# --- buckets -----------------------------------------------------------------------------------------------------


def test_exactly_the_burst_passes_then_one_token_per_interval() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate.parse("2/s:5"), clock=clock)
    verdicts = [limiter.take("a") for _ in range(6)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts] == [4, 3, 2, 1, 0, 0]
    refused = verdicts[-1]
    assert refused.retry_after == 1  # half a second to the next token, rounded up to whole seconds
    assert refused.reset == 3  # 5 tokens at 2 a second
    assert refused.headers() == {
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "3",
        "Retry-After": "1",
    }
    clock.now += 0.49
    assert not limiter.take("a").allowed
    clock.now += 0.02  # 0.51 s after the last success: one token back
    assert limiter.take("a").allowed
    assert not limiter.take("a").allowed


def test_retry_after_for_a_slow_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate.parse("3/m"), clock=clock)
    for _ in range(3):
        assert limiter.take("k").allowed
    refused = limiter.take("k")
    assert not refused.allowed
    assert refused.retry_after == 20
    assert refused.reset == 60
    clock.now += 19.9
    assert not limiter.take("k").allowed
    clock.now += 0.2
    assert limiter.take("k").allowed


def test_an_idle_bucket_refills_only_to_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate.parse("1/s:2"), clock=clock)
    limiter.take("a")
    clock.now += 3600
    assert [limiter.take("a").allowed for _ in range(3)] == [True, True, False]


def test_keys_have_their_own_buckets() -> None:
    limiter = RateLimiter(Rate.parse("1/h"), clock=Clock())
    assert limiter.take("a").allowed
    assert not limiter.take("a").allowed
    assert limiter.take("b").allowed


def test_the_number_of_buckets_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate.parse("1/h"), max_buckets=3, clock=clock)
    for key in ("a", "b", "c"):
        assert limiter.take(key).allowed
    assert not limiter.take("a").allowed  # touches a: b is now the least recently used
    assert limiter.take("d").allowed
    assert len(limiter) == 3
    assert limiter.take("b").allowed  # b was forgotten, so it has a full bucket again
    assert not limiter.take("a").allowed  # a was kept
    for number in range(10_000):
        limiter.take(str(number))
    assert len(limiter) == 3


def test_enforce_raises_429_with_the_headers() -> None:
    limiter = RateLimiter(Rate.parse("1/m"), clock=Clock())
    assert limiter.enforce("a", "things")["RateLimit-Remaining"] == "0"
    with pytest.raises(RateLimited) as caught:
        limiter.enforce("a", "things")
    assert caught.value.status_code == 429
    assert caught.value.headers["Retry-After"] == "60"
    assert "1 per minute" in caught.value.message


def test_no_setting_no_limiter() -> None:
    assert RateLimiter.from_setting(None) is None
    limiter = RateLimiter.from_setting("5/s:10")
    assert limiter is not None
    assert limiter.rate == Rate(5, 1.0, 10)


# --- idempotency -------------------------------------------------------------------------------------------------


def note(message: str = "hi") -> Notification:
    return Notification(message=message, user_ids=("alice",))


def test_first_request_goes_ahead_and_a_repeat_gets_its_answer() -> None:
    cache = IdempotencyCache(300, clock=Clock())
    print_ = fingerprint(note())
    assert cache.begin("k", print_) is None
    with pytest.raises(Conflict) as caught:  # a concurrent duplicate while the first is publishing
        cache.begin("k", print_)
    assert caught.value.status_code == 409
    assert caught.value.headers == {"Retry-After": "1"}
    cache.finish("k", Answer(200, b'{"id":"1-0"}'))
    assert cache.begin("k", print_) == Answer(200, b'{"id":"1-0"}')
    with pytest.raises(ValidationError) as refused:
        cache.begin("k", fingerprint(note("other")))
    assert refused.value.status_code == 422
    assert "Idempotency-Key" in refused.value.message


def test_a_failed_first_request_is_forgotten() -> None:
    cache = IdempotencyCache(300, clock=Clock())
    assert cache.begin("k", fingerprint(note())) is None
    cache.abandon("k")
    assert cache.begin("k", fingerprint(note("other"))) is None  # a fresh start, any body


def test_keys_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = IdempotencyCache(300, clock=clock)
    cache.begin("k", fingerprint(note()))
    cache.finish("k", Answer(200, b"{}"))
    clock.now += 299.9
    assert cache.begin("k", fingerprint(note())) == Answer(200, b"{}")
    clock.now += 0.2
    assert cache.begin("k", fingerprint(note())) is None
    assert len(cache) == 1


def test_the_memory_is_bounded() -> None:
    cache = IdempotencyCache(300, max_entries=100, clock=Clock())
    for i in range(1000):
        assert cache.begin(f"k{i}", fingerprint(note())) is None
        cache.finish(f"k{i}", Answer(200, b"{}"))
    assert len(cache) == 100
    assert cache.begin("k999", fingerprint(note())) == Answer(200, b"{}")
    assert cache.begin("k0", fingerprint(note())) is None  # the oldest went first


def test_the_fingerprint_is_the_meaning_not_the_spelling() -> None:
    one = parse_notification(b'{"message": "hi", "data": {"a": 1, "b": 2}}', 100)
    two = parse_notification(b'{"data":{"b":2,"a":1},"message":"hi"}', 100)
    three = parse_notification(b'{"message": "hi", "data": {"a": 1, "b": 3}}', 100)
    assert fingerprint(one) == fingerprint(two) != fingerprint(three)


@pytest.mark.parametrize("key", ["", " ", "x" * 256, "tab\there", "é"])
def test_bad_idempotency_keys(key: str) -> None:
    with pytest.raises(BadRequest):
        check_key(key)


def test_good_idempotency_key() -> None:
    assert check_key("7f1c1d9e-2a4b-4c55-9a4e-1d2b3c4d5e6f") == "7f1c1d9e-2a4b-4c55-9a4e-1d2b3c4d5e6f"


# --- redaction -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ('127.0.0.1:5 - "WebSocket /api/v1/ws/u?token=s3cr3t-value&since=1-0" [accepted]', "s3cr3t-value"),
        ("/api/v1/ws/u?since=1-0&tok%65n=s3cr3t-value", "s3cr3t-value"),
        ("/api/v1/ws/u?access_token=s3cr3t-value", "s3cr3t-value"),
        ("< Authorization: Bearer s3cr3t-value", "s3cr3t-value"),
        ("(b'authorization', b'Bearer s3cr3t-value')", "s3cr3t-value"),
        ("(b'x-api-key', b's3cr3t-value')", "s3cr3t-value"),
        ("'query_string': b'token=s3cr3t-value'", "s3cr3t-value"),
        ("user eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl went away", "eyJzdWIiOiJhIn0"),
    ],
)
def test_redact_takes_the_secret_out(line: str, secret: str) -> None:
    clean = redact(line)
    assert secret not in clean
    assert "[redacted]" in clean


def test_redact_leaves_the_rest_alone() -> None:
    line = '127.0.0.1:5 - "WebSocket /api/v1/ws/u?since=1-0&tokens=3" 403'
    assert redact(line) == line


def test_filter_keeps_the_access_log_args_shape() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/api/v1/ws/u?token=abc", "1.1", 101), None,
    )  # fmt: skip
    assert RedactTokens().filter(record)
    assert isinstance(record.args, tuple)
    assert len(record.args) == 5  # uvicorn's AccessFormatter unpacks five
    assert record.getMessage() == '127.0.0.1:5 - "GET /api/v1/ws/u?token=[redacted] HTTP/1.1" 101'


def test_filter_catches_a_secret_split_over_arguments() -> None:
    record = logging.LogRecord(
        "uvicorn.error", logging.DEBUG, __file__, 1, "< %s: %s", ("X-API-Key", "s3cr3t-value"), None
    )
    RedactTokens().filter(record)
    assert "s3cr3t-value" not in record.getMessage()


def test_filter_cleans_the_arguments_of_a_broken_record() -> None:
    """A record whose arguments do not fit its format is printed by logging with its raw arguments."""
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, "%d %s", ("not a number", "/api/v1/ws/u?token=abc.def"), None
    )
    assert RedactTokens().filter(record)
    assert record.args == ("not a number", "/api/v1/ws/u?token=[redacted]")


def test_filter_leaves_an_ordinary_record_untouched() -> None:
    args = ("1795644937368-3", "notification", 1, 1, 0, 0.02)
    record = logging.LogRecord(
        "diary_ws.hub", logging.INFO, __file__, 1, "published %s (%s) to %d of %d sockets, %d dropped, in %.2f ms",
        args, None,
    )  # fmt: skip
    assert RedactTokens().filter(record)
    assert record.args is args  # the fast path: nothing rebuilt
