"""One frozen `Settings`, read from `DIARY_WS_*` variables and `diary-ws serve` flags.

This is the only module that knows the variable names. Every value passes through a parser that raises
`SettingError` with a sentence naming the rule, so a bad value stops start-up with one clear line.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import resource
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "DIARY_WS_"


class SettingError(ValueError):
    """A setting has a bad value; `name` is the setting, `rule` says what it must be."""

    def __init__(self, name: str, rule: str) -> None:
        super().__init__(f"{name} {rule}")
        self.name = name
        self.rule = rule


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of docs/configuration.md; the defaults are the ones a fresh `make run` uses."""

    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = ""
    workers: int = 1
    broker_url: str = "memory://"
    api_key: str | None = None
    api_key_file: str | None = None
    jwt_secret: str | None = None
    jwt_secret_file: str | None = None
    jwt_public_key_file: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    user_header: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ("*",)
    rate_limit: str | None = None
    connect_rate_limit: str | None = None
    idempotency_ttl: float = 300.0
    max_connections_per_user: int = 16
    max_connections: int | None = None  # None: what the open-file limit leaves (fd_budget), decided at start
    max_http_connections: int | None = None  # None: min(1000, a tenth of the open-file limit)
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 16384
    max_message_chars: int = 65536
    max_body_bytes: int = 262144
    max_incoming_bytes: int = 4096
    max_incoming_rate: float = 50.0
    send_queue_size: int = 256
    send_queue_bytes: int = 1024 * 1024
    history_size: int = 10000
    history_ttl: float = 300.0
    history_bytes: int = 64 * 1024 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    per_message_deflate: bool = False
    drain_seconds: float = 0.0
    shutdown_timeout: float = 3.0
    console: bool = False
    max_batch: int = 1000
    max_batch_bytes: int = 1024 * 1024
    log_level: str = "info"
    log_format: str = "text"
    loop: str = "auto"
    gc_freeze: bool = True

    def __post_init__(self) -> None:
        check_combinations(self)


# What to run depends on where diary-ws came from: `pip install 'diary-ws[redis]'` in a checkout asks an index
# for the name and never installs the checkout, so the line names both ways.
REDIS_MISSING = (
    "needs the Redis client (redis-py), which is not installed: from a checkout run `make install` (or "
    "`pip install -c constraints.txt '.[redis]'`); from a package index, `pip install 'diary-ws[redis]'`"
)


# Settings whose feature is not built yet. docs/configuration.md: refused at start, never accepted and ignored.
NOT_BUILT_YET: dict[str, str] = {}


def check_combinations(s: Settings) -> None:
    """Rules that tie settings together, or refuse features this build does not have."""
    for name, feature in NOT_BUILT_YET.items():
        if getattr(s, name) is not None:
            raise SettingError(env_name(name), f"is not supported yet: {feature} are not built in this version")
    check_security(s)
    if s.broker_url.startswith("redis") and importlib.util.find_spec("redis") is None:
        raise SettingError(env_name("broker_url"), REDIS_MISSING)
    if s.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise SettingError(env_name("loop"), "is uvloop, which is not installed: pip install uvloop, or LOOP=auto")
    if s.workers > 1 and s.broker_url.startswith("memory://"):
        raise SettingError(env_name("workers"), "above 1 needs a redis:// BROKER_URL: memory:// lives in one process")


def check_security(s: Settings) -> None:
    """Secrets come from one place each, and the JWT and user-header settings only make sense together."""
    for plain, from_file in (("api_key", "api_key_file"), ("jwt_secret", "jwt_secret_file")):
        if getattr(s, plain) is not None and getattr(s, from_file) is not None:
            raise SettingError(env_name(from_file), f"and {env_name(plain)} are both set; set one of them")
    has_secret = s.jwt_secret is not None or s.jwt_secret_file is not None
    if has_secret and s.jwt_public_key_file is not None:
        raise SettingError(
            env_name("jwt_public_key_file"), "and a JWT secret are both set; tokens are HS256 or RS256/ES256, not both"
        )
    if not has_secret and s.jwt_public_key_file is None:
        for name in ("jwt_audience", "jwt_issuer"):
            if getattr(s, name) is not None:
                raise SettingError(env_name(name), "needs DIARY_WS_JWT_SECRET(_FILE) or DIARY_WS_JWT_PUBLIC_KEY_FILE")
    if s.user_header is not None and not s.trusted_proxies:
        raise SettingError(
            env_name("user_header"), "needs DIARY_WS_TRUSTED_PROXIES: the header is honoured only from those proxies"
        )


# Descriptors kept back below the open-file limit: 64 for the listening socket, Redis, logs and files, and 128 for
# the connections accepted before the caps act on them (two of the edge's accept batches of 64, edge/serve.py).
FD_RESERVE = 64 + 2 * 64
NO_FILE_LIMIT = 1_000_000  # what an unlimited open-file limit counts as


def open_file_limit() -> int:
    """The soft limit on open files of this process (raise it first: `cli.raise_open_file_limit`)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return NO_FILE_LIMIT if soft == resource.RLIM_INFINITY else soft


def fd_budget(s: Settings, limit: int) -> tuple[int, int]:
    """(MAX_HTTP_CONNECTIONS, MAX_CONNECTIONS) for the open-file limit `limit`: every socket is a descriptor,
    and past the limit accept() fails with EMFILE, which stalls the accept loop for everybody.

    Raises SettingError when the two, with the reserve, add up past the limit.
    """
    http = s.max_http_connections or max(1, min(1000, limit // 10))
    listeners = s.max_connections or max(1, limit - http - FD_RESERVE)
    if http + listeners + FD_RESERVE > limit:
        given = [env_name(n) for n in ("max_connections", "max_http_connections") if getattr(s, n) is not None]
        raise SettingError(
            " and ".join(given) or env_name("max_connections"),
            f"add up past the open-file limit: {listeners} listeners + {http} HTTP connections + {FD_RESERVE} "
            f"reserved > {limit}; lower them or raise the limit (ulimit -n, LimitNOFILE=)",
        )
    return http, listeners


# --- parsers: str -> value, raising ValueError with the rule -------------------------------------------------


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        text = raw.strip().replace("_", "")
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(_range_rule("a whole number", lo, hi))
        value = int(text)
        if value < lo or (hi is not None and value > hi):
            raise ValueError(_range_rule("a whole number", lo, hi))
        return value

    return parse


def _range_rule(kind: str, lo: float, hi: float | None) -> str:
    return f"must be {kind} from {lo:g} to {hi:g}" if hi is not None else f"must be {kind} of at least {lo:g}"


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}


def _size(lo: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", raw)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _SIZE_UNITS or int(m.group(1)) * _SIZE_UNITS[unit] < lo:
            raise ValueError(f"must be a size in bytes of at least {lo} (a number, optionally with KiB or MiB)")
        return int(m.group(1)) * _SIZE_UNITS[unit]

    return parse


def _seconds(lo: float, hi: float | None = None, *, open_lo: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        text = raw.strip().removesuffix("s").strip()
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = value == value and (value > lo if open_lo else value >= lo) and (hi is None or value <= hi)
        if not ok or value in (float("inf"), float("-inf")):
            above = "above" if open_lo else "at least"
            upper = f" and at most {hi:g}" if hi is not None else ""
            raise ValueError(f"must be a number of seconds {above} {lo:g}{upper}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError("must be a number above 0")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be one of 1, 0, true, false, on, off, yes, no")


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        text = raw.strip().lower()
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return parse


def _text(raw: str) -> str:
    return raw.strip()


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


def _root_path(raw: str) -> str:
    text = raw.strip().rstrip("/")
    if text and (not text.startswith("/") or not re.fullmatch(r"[A-Za-z0-9._~/-]+", text)):
        raise ValueError("must be empty or a path such as /push (letters, digits and . _ ~ - /)")
    return text


def _host(raw: str) -> str:
    text = raw.strip()
    if not text or not re.fullmatch(r"[A-Za-z0-9.:\-\[\]%]+", text):
        raise ValueError("must be a host name or an IP address, such as 127.0.0.1 or 0.0.0.0")
    return text


# The query options a Redis URL may carry (TLS, for rediss://), with their values where redis-py takes only some
# (empty: a path). Any other would reach redis-py's client unchecked and stop the server after start-up.
_URL_OPTIONS: dict[str, tuple[str, ...]] = {
    "ssl_cert_reqs": ("none", "optional", "required"),
    "ssl_ca_certs": (),
    "ssl_certfile": (),
    "ssl_keyfile": (),
    "ssl_check_hostname": ("true", "false", "yes", "no", "1", "0"),
}


def _broker_url(raw: str) -> str:
    text = raw.strip()
    rule = (
        "must be memory://, a redis://[:password@]host[:port][/db] (or rediss://) URL, or a Redis Cluster's "
        "redis-cluster://[:password@]host[:port] (or rediss-cluster://)"
    )
    if text.startswith("memory://"):
        return text
    try:
        parts = urllib.parse.urlsplit(text)
        _port = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValueError(rule) from None
    bad_path = not re.fullmatch(r"(/\d*)?", parts.path)
    if parts.scheme not in ("redis", "rediss", "redis-cluster", "rediss-cluster") or bad_path:
        raise ValueError(rule)
    if any(c.isspace() for c in text) or parts.fragment:
        raise ValueError(rule)
    if parts.scheme.endswith("-cluster") and (parts.path.strip("/0") or not parts.hostname):
        raise ValueError(rule + "; a Redis Cluster URL names one of its nodes, and has only database 0")
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        allowed = _URL_OPTIONS.get(name)
        if allowed is None or (allowed and value.lower() not in allowed):
            raise ValueError(f"{rule}; of query options it takes only {', '.join(_URL_OPTIONS)} ({name!r}={value!r})")
    return parts.scheme + text[len(parts.scheme) :]  # the scheme in lower case, as the backends look it up


def _proxies(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"must be a comma list of IP addresses or networks (or *); {item!r} is neither") from None
    return items


_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _origins(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip().rstrip("/").lower() for item in raw.split(",") if item.strip())
    rule = "must be * or a comma list of origins such as https://app.example.com (scheme, host, optional port)"
    if not items or ("*" in items and len(items) > 1):
        raise ValueError(rule)
    if items == ("*",):
        return items
    origins = []
    for item in items:
        m = _ORIGIN.fullmatch(item)
        if m is None:
            raise ValueError(f"{rule}; {item!r} is not one")
        # A browser leaves the default port out of Origin, so https://a:443 must compare equal to https://a.
        port = m.group(3)
        origins.append(
            f"{m.group(1)}://{m.group(2)}" + (f":{port}" if port and port != _DEFAULT_PORTS[m.group(1)] else "")
        )
    return tuple(origins)


_RATE = re.compile(r"(\d{1,9})\s*/\s*(s|m|h)(?:\s*:\s*(\d{1,9}))?")
RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def rate_parts(raw: str) -> tuple[int, float, int]:
    """`100/s:200` -> (100 requests, per 1.0 s, burst 200); the burst defaults to the count."""
    m = _RATE.fullmatch(raw.strip().lower())
    if m is None or int(m.group(1)) < 1 or (m.group(3) is not None and int(m.group(3)) < 1):
        raise ValueError(
            "must be COUNT/PERIOD with PERIOD s, m or h and an optional :BURST, such as 100/s or 100/s:200"
        )
    count = int(m.group(1))
    return count, RATE_PERIODS[m.group(2)], int(m.group(3)) if m.group(3) is not None else count


def _rate(raw: str) -> str | None:
    if not raw.strip():
        return None
    count, period, burst = rate_parts(raw)
    unit = next(u for u, p in RATE_PERIODS.items() if p == period)
    return f"{count}/{unit}:{burst}"


# An HTTP header name (RFC 9110 token); the ones that already mean something else cannot carry a user id.
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_RESERVED_HEADERS = {"authorization", "cookie", "host", "origin", "x-forwarded-for", "x-api-key", "content-type"}


def _header_name(raw: str) -> str | None:
    text = raw.strip()
    if not text:
        return None
    if not _HEADER.fullmatch(text) or text.lower() in _RESERVED_HEADERS:
        raise ValueError("must be an HTTP header name such as X-User-Id (not one with another meaning)")
    return text


# name -> (parser, help). Order is the order of --help and of the README table.
Parser = Callable[[str], Any]
SPECS: dict[str, tuple[Parser, str]] = {
    "host": (_host, "address to listen on"),
    "port": (_int_in(1, 65535), "TCP port to listen on"),
    "root_path": (_root_path, "path prefix the proxy mounts the service under (ASGI root_path)"),
    "workers": (_int_in(1, 64), "worker processes; more than 1 needs redis://"),
    "broker_url": (_broker_url, "memory:// (one process), redis://host:6379/0, or redis-cluster://host:port"),
    "api_key": (_optional_text, "sender API keys, a comma list (secret)"),
    "api_key_file": (_optional_text, "file holding the sender API keys"),
    "jwt_secret": (_optional_text, "HS256 secret for listener tokens (secret)"),
    "jwt_secret_file": (_optional_text, "file holding the HS256 secret"),
    "jwt_public_key_file": (_optional_text, "PEM public key for RS256/ES256 listener tokens"),
    "jwt_audience": (_optional_text, "required aud claim of listener tokens"),
    "jwt_issuer": (_optional_text, "required iss claim of listener tokens"),
    "user_header": (_header_name, "user-id header set by a trusted proxy"),
    "trusted_proxies": (_proxies, "proxies allowed to set X-Forwarded-For (comma list of IPs/networks)"),
    "allowed_origins": (_origins, "allowed Origin values for browser handshakes, or *"),
    "rate_limit": (_rate, "publish rate limit per API key or client address, e.g. 100/s or 100/s:200"),
    "connect_rate_limit": (_rate, "WebSocket handshake rate limit per client address, e.g. 10/s:20"),
    "idempotency_ttl": (_seconds(1, 86400), "how long an Idempotency-Key is remembered"),
    "max_connections_per_user": (_int_in(1), "open sockets allowed per user"),
    "max_connections": (
        _int_in(1),
        "open sockets and streams allowed in all (default: what the open-file limit "
        "leaves after MAX_HTTP_CONNECTIONS and a reserve of 64)",
    ),
    "max_http_connections": (
        _int_in(1),
        "open HTTP connections that are not listeners (default: min(1000, a "
        "tenth of the open-file limit)); when full, the one waiting longest for a head goes",
    ),
    "header_timeout": (_seconds(0, open_lo=True), "seconds a request head may take (408 after a partial one)"),
    "body_timeout": (_seconds(0, open_lo=True), "seconds a whole request body may take (408)"),
    "max_header_bytes": (_size(1024), "largest request line plus headers (431, or 414 for the request line)"),
    "max_message_chars": (_int_in(1), "longest message, in characters"),
    "max_body_bytes": (_size(64), "largest POST body"),
    "max_incoming_bytes": (_size(1), "largest frame a client may send (closed with 1009 above it)"),
    "max_incoming_rate": (_positive_float, "client frames per second before a 1008 close"),
    "send_queue_size": (_int_in(1), "backlog of unsent messages per socket before a 4008 close"),
    "send_queue_bytes": (_size(1024), "backlog of unsent bytes per socket before a 4008 close"),
    "history_size": (_int_in(0), "messages kept for ?since= resume (0: no resume)"),
    "history_ttl": (_seconds(0, open_lo=True), "how long a message stays resumable"),
    "history_bytes": (_size(1024), "bytes the history may hold for ?since= resume (oldest evicted first)"),
    "ping_interval": (_seconds(0, open_lo=True), "seconds between server pings"),
    "ping_timeout": (_seconds(0, open_lo=True), "seconds to wait for a pong (and for a stalled socket)"),
    "per_message_deflate": (_bool, "negotiate per-message deflate"),
    "drain_seconds": (_seconds(0, 3600), "after SIGTERM, seconds /readyz answers 503 before shutdown"),
    "shutdown_timeout": (_seconds(0, 600, open_lo=True), "seconds to wait for connections at shutdown"),
    "console": (_bool, "serve the console page at /api/v1/ws/console"),
    "max_batch": (_int_in(1, 100_000), "notifications allowed in one batch POST"),
    "max_batch_bytes": (_size(64), "largest batch POST body"),
    "log_level": (_choice("critical", "error", "warning", "info", "debug", "trace"), "log level"),
    "log_format": (_choice("text", "json"), "log line format"),
    "loop": (_choice("auto", "asyncio", "uvloop"), "event loop: asyncio, uvloop, or auto (uvloop when installed)"),
    "gc_freeze": (_bool, "freeze the garbage collector's survivors: no full collection walks every socket"),
}

# On/off settings: `serve` offers --NAME and --no-NAME for each.
SWITCHES = frozenset(name for name, (parser, _help) in SPECS.items() if parser is _bool)

# Secrets: each also has an environment variable and a *_FILE setting, so no one has to pass it as a flag.
SECRETS = frozenset({"api_key", "jwt_secret"})

assert set(SPECS) == {f.name for f in fields(Settings)}, "every setting needs a parser"


def env_name(name: str) -> str:
    """`max_body_bytes` -> `DIARY_WS_MAX_BODY_BYTES`."""
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """`max_body_bytes` -> `--max-body-bytes`."""
    return "--" + name.replace("_", "-")


def parse_value(name: str, raw: str, label: str) -> Any:
    """Parse one raw value; `label` is what the error names (the variable or the flag)."""
    parser = SPECS[name][0]
    try:
        return parser(raw)
    except ValueError as exc:
        if name == "broker_url":  # a Redis URL may carry a password: never echo it
            raw = re.sub(r"(?<=://)[^@/]*@", "***@", raw)
        raise SettingError(label, f"{exc} (got {raw!r})") from None


def from_env(environ: Mapping[str, str], overrides: Mapping[str, str] | None = None) -> Settings:
    """Settings from `DIARY_WS_*` variables; `overrides` (flag values by setting name) win over them."""
    known = SPECS.keys() | CLIENT_SPECS.keys()  # a client-side name in the environment of `serve` is no typo
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :].lower() not in known)
    if unknown:
        raise SettingError(unknown[0], "is not a diary-ws setting (check the spelling against the README)")
    values: dict[str, Any] = {}
    for name in SPECS:
        if (raw := environ.get(env_name(name))) is not None:
            values[name] = parse_value(name, raw, env_name(name))
    for name, raw in (overrides or {}).items():
        values[name] = parse_value(name, raw, flag_name(name))
    try:
        return Settings(**values)
    except SettingError as exc:
        if exc.name in (env_name(n) for n in (overrides or {})):
            raise SettingError(flag_name(exc.name[len(ENV_PREFIX) :].lower()), exc.rule) from None
        raise


# --- the client side: diary_ws.Sender and the CLI's client commands ---------------------------------------------

# Names only a client reads; `serve` accepts them in its environment and ignores them. The client also reads
# the server's HOST, PORT and API_KEY(_FILE), so one environment serves both ends on a developer's machine.
CLIENT_SPECS: dict[str, str] = {
    "url": "base URL of the server for the client commands and diary_ws.Sender, path prefix included "
    "(default: http:// + HOST:PORT)",
}


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where a client finds the server, and the API key it sends."""

    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None


def base_url(raw: str, label: str) -> str:
    """An http(s) base URL with no query or fragment, without its trailing slash; SettingError otherwise."""
    text = raw.strip().rstrip("/")
    try:
        parts = urllib.parse.urlsplit(text)
        _port = parts.port  # raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise SettingError(label, f"must be an http:// or https:// URL such as http://127.0.0.1:8000 (got {raw!r})")
    return text


def client_from_env(environ: Mapping[str, str]) -> ClientSettings:
    """The client's settings: DIARY_WS_URL, else http:// + DIARY_WS_HOST:DIARY_WS_PORT; the first API key."""
    raw_url = environ.get(env_name("url"))
    if raw_url is not None and raw_url.strip():
        url = base_url(raw_url, env_name("url"))
    else:
        defaults = Settings()
        host = defaults.host
        if (raw := environ.get(env_name("host"))) is not None:
            host = parse_value("host", raw, env_name("host"))
        port = defaults.port
        if (raw := environ.get(env_name("port"))) is not None:
            port = parse_value("port", raw, env_name("port"))
        url = f"http://{_reachable(host)}:{port}"
    return ClientSettings(url=url, api_key=first_api_key(environ))


def _reachable(host: str) -> str:
    """The address a client dials for a server bound to `host`: a wildcard means this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def first_api_key(environ: Mapping[str, str]) -> str | None:
    """The first key of DIARY_WS_API_KEY (a comma or newline list, for rotation) or of DIARY_WS_API_KEY_FILE."""
    keys = environ.get(env_name("api_key"))
    path = environ.get(env_name("api_key_file"))
    if not (keys or "").strip() and path:
        try:
            with open(path, encoding="utf-8") as handle:
                keys = handle.read()
        except OSError as exc:
            raise SettingError(env_name("api_key_file"), f"cannot be read: {path}: {exc.strerror}") from None
    listed = [key.strip() for key in re.split(r"[,\n]", keys or "") if key.strip()]  # as the server splits them
    return listed[0] if listed else None


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """What `diary-ws token` signs with: the server's HS256 secret, the variable it came from, aud and iss."""

    secret: str
    source: str  # DIARY_WS_JWT_SECRET or DIARY_WS_JWT_SECRET_FILE, for messages about the secret
    audience: str | None = None
    issuer: str | None = None


def token_from_env(environ: Mapping[str, str]) -> TokenSettings:
    """The HS256 secret from DIARY_WS_JWT_SECRET or DIARY_WS_JWT_SECRET_FILE, and DIARY_WS_JWT_AUDIENCE and
    DIARY_WS_JWT_ISSUER when they are set; SettingError when there is no secret, or two."""
    inline_name, file_name = env_name("jwt_secret"), env_name("jwt_secret_file")
    inline, path = (environ.get(inline_name) or "").strip(), environ.get(file_name)
    if inline and path:
        raise SettingError(inline_name, f"or {file_name}: set one, not both")
    secret = inline
    if not inline and path:
        try:
            with open(path, encoding="utf-8") as handle:
                secret = handle.read().strip()  # a trailing newline from `echo secret > file` is not part of it
        except OSError as exc:
            raise SettingError(file_name, f"cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise SettingError(
            inline_name,
            f"or {file_name} must be set: no JWT secret configured (the server's HS256 secret); tokens for "
            "RS256/ES256 come from whoever holds the private key",
        )
    audience, issuer = environ.get(env_name("jwt_audience")) or None, environ.get(env_name("jwt_issuer")) or None
    return TokenSettings(secret, file_name if path else inline_name, audience, issuer)
