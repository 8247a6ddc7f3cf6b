"""Logging set-up: text or JSON lines on stderr, for our loggers and uvicorn's alike."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import orjson

TRACE = 5  # uvicorn's extra level below DEBUG

# What every LogRecord has; anything else on a record came from `extra=` and becomes a JSON field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName", "color_message",  # uvicorn adds a coloured copy of its message
}  # fmt: skip
# Query parameters whose values are secrets (the listener's JWT).
SECRET_PARAMS = frozenset({"token", "access_token"})
REDACTED = "[redacted]"
_PARAM = re.compile(r"(^|[?&;'\"\s(])([^=&;\s'\"#?()]+)=([^&;\s'\"#]*)")
_HEADER_VALUE = re.compile(r"(?i)\b(authorization|x-api-key)(['\"]?\s*[:,]\s*(?-i:b)?['\"]?)[^'\"\r\n]+")
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\",]+")
# Every secret the expressions below find contains one of these (a %-encoded parameter name included).
_MARKS = ("token", "%", "authorization", "api-key", "bearer", "eyj")
_MARK = re.compile("|".join(re.escape(mark) for mark in _MARKS), re.IGNORECASE)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """`text` with every token and key replaced by [redacted]: query tokens, auth headers, JWT-shaped strings."""
    if not _MARK.search(text):
        return text  # the common line: one scan instead of four regular expressions

    def param(m: re.Match[str]) -> str:
        if unquote_plus(m.group(2)).strip().lower() in SECRET_PARAMS:
            return f"{m.group(1)}{m.group(2)}={REDACTED}"
        return m.group(0)

    text = _HEADER_VALUE.sub(rf"\1\2{REDACTED}", text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    text = _PARAM.sub(param, text)
    return _JWT.sub(REDACTED, text)


class RedactTokens(logging.Filter):
    """Takes tokens out of log records (PITFALLS 3: uvicorn logs the WebSocket path with its query string
    through uvicorn.error as well as uvicorn.access, and at debug level the request headers too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if not _MARK.search(record.getMessage()):
                # The common line, such as every access and publish line: each argument is part of the
                # message, so none holds a secret either. One scan, where the passes below cost ~10 us.
                return True
        except (TypeError, ValueError):
            pass  # a broken record: logging reports it itself, with its arguments, so they are cleaned too
        # Each argument first, so the record keeps its shape (uvicorn's access formatter unpacks the args).
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        clean = redact(message)
        if clean != message:  # a secret spread over arguments, such as ("Authorization", "Bearer x")
            record.msg, record.args = clean, ()
        return True


_REDACT = RedactTokens()


def redact_tokens() -> None:
    """Put the redaction filter on uvicorn's two loggers; safe to call more than once."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(_REDACT)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the `extra=` fields, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value  # e.g. a publish's id, counts and duration_ms
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str, fmt: str) -> None:
    """Route every logger to stderr in `fmt` ("text" or "json") at `level`."""
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_REDACT)  # every record that reaches the output, whichever logger it came from
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(TRACE if level == "trace" else level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    redact_tokens()


@dataclass(slots=True)
class _Kind:
    """One kind of throttled line: when the next may go out, and what was held back since the last."""

    open_at: float
    held: int = 0
    last: tuple[logging.Logger, int, str, tuple[object, ...]] | None = None
    flush: asyncio.TimerHandle | None = field(default=None, repr=False)


class Throttle:
    """At most one line a second per kind of repeated warning, however fast a peer makes them happen.

    A line over the rate is counted, not written; the last one held back goes out when the second is over,
    with the count ("... (and 41 more like it)"), so a burst costs two lines and still says how big it was.
    A kind is a constant of ours ("emfile", "refused"), never text from a client, so the table stays small.
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def log(self, logger: logging.Logger, level: int, kind: str, msg: str, *args: object) -> None:
        """Log `msg % args` now if no line of `kind` went out in the last interval; else count it."""
        if not logger.isEnabledFor(level):
            return
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None:
            self._kinds[kind] = _Kind(open_at=now + self.interval)
            logger.log(level, msg, *args)
            return
        if now >= state.open_at and state.held == 0:
            state.open_at = now + self.interval
            logger.log(level, msg, *args)
            return
        state.held += 1
        state.last = (logger, level, msg, args)
        if state.flush is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next line of this kind says it
                loop = asyncio.get_running_loop()
                state.flush = loop.call_later(max(0.0, state.open_at - now), self._flush, kind)
        if state.flush is None and now >= state.open_at:
            self._flush(kind)

    def _flush(self, kind: str) -> None:
        state = self._kinds[kind]
        state.flush = None
        if not state.held or state.last is None:
            return
        logger, level, msg, args = state.last
        held = state.held
        state.held, state.last = 0, None
        state.open_at = self._clock() + self.interval
        more = "" if held == 1 else f" (and {held - 1} more like it in the last {self.interval:g} s)"
        logger.log(level, msg + more, *args)


_THROTTLE = Throttle()  # per process, as logging itself is


def warn_throttled(logger: logging.Logger, kind: str, msg: str, *args: object) -> None:
    """A WARNING that a peer can repeat at will: at most one line a second per `kind`, with a count of the rest."""
    _THROTTLE.log(logger, logging.WARNING, kind, msg, *args)
