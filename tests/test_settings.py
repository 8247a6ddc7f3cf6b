"""`diary_ws.settings.from_env` and the `diary-ws serve` command line (docs/configuration.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from diary_ws.settings import SettingError, Settings, from_env
from tests.utils import ROOT

# Every setting of docs/configuration.md but the two secrets, which are read from the environment or a *_FILE only.
FLAGS = [
    "--host",
    "--port",
    "--root-path",
    "--workers",
    "--broker-url",
    "--api-key",
    "--api-key-file",
    "--jwt-secret",
    "--jwt-secret-file",
    "--jwt-public-key-file",
    "--jwt-audience",
    "--jwt-issuer",
    "--user-header",
    "--trusted-proxies",
    "--allowed-origins",
    "--rate-limit",
    "--connect-rate-limit",
    "--idempotency-ttl",
    "--max-connections-per-user",
    "--max-connections",
    "--max-message-chars",
    "--max-body-bytes",
    "--max-incoming-bytes",
    "--max-incoming-rate",
    "--send-queue-size",
    "--send-queue-bytes",
    "--history-size",
    "--history-ttl",
    "--ping-interval",
    "--ping-timeout",
    "--per-message-deflate",
    "--drain-seconds",
    "--shutdown-timeout",
    "--console",
    "--log-level",
    "--log-format",
    "--gc-freeze",
]


def env(**values: str) -> dict[str, str]:
    """`env(port="1")` -> `{"DIARY_WS_PORT": "1"}`."""
    return {f"DIARY_WS_{name.upper()}": value for name, value in values.items()}


def refused(environ: dict[str, str], overrides: dict[str, str] | None = None) -> SettingError:
    with pytest.raises(SettingError) as caught:
        from_env(environ, overrides)
    assert caught.value.name in str(caught.value)
    return caught.value


# --- defaults ------------------------------------------------------------------------------------------------


def test_defaults_are_the_design_table() -> None:
    s = from_env({})
    assert s == Settings()
    assert (s.host, s.port, s.root_path, s.workers, s.broker_url) == ("127.0.0.1", 8000, "", 1, "memory://")
    assert s.api_key is None
    assert s.jwt_secret is None
    assert s.user_header is None
    assert s.trusted_proxies == ()
    assert s.allowed_origins == ("*",)
    assert s.rate_limit is None
    assert s.connect_rate_limit is None
    assert s.idempotency_ttl == 300
    assert s.max_connections_per_user == 16
    assert s.max_message_chars == 65536
    assert s.max_body_bytes == 262144
    assert s.max_incoming_bytes == 4096
    assert s.max_incoming_rate == 50
    assert s.send_queue_size == 256
    assert s.send_queue_bytes == 1024 * 1024
    assert s.history_size == 10000
    assert s.history_ttl == 300
    assert (s.ping_interval, s.ping_timeout) == (20, 20)
    assert s.per_message_deflate is False
    assert s.drain_seconds == 0
    assert s.shutdown_timeout == 3
    assert s.console is False
    assert (s.log_level, s.log_format) == ("info", "text")
    assert s.gc_freeze is True


def test_other_variables_are_ignored() -> None:
    assert from_env({"PATH": "/bin", "DIARY_WSX": "1", "DIARY_WS": "1", "diary_ws_port": "1"}) == Settings()


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


# --- each kind of parser -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("port", "9000", 9000),
        ("port", " 65535 ", 65535),
        ("max_connections_per_user", "1_000", 1000),
        ("history_size", "0", 0),
        ("max_body_bytes", "64", 64),
        ("max_body_bytes", "512KiB", 512 * 1024),
        ("max_body_bytes", "1 MiB", 1024 * 1024),
        ("max_body_bytes", "2mb", 2_000_000),
        ("max_incoming_bytes", "8k", 8000),
        ("ping_interval", "2.5", 2.5),
        ("ping_timeout", "10s", 10.0),
        ("drain_seconds", "0", 0.0),
        ("shutdown_timeout", "600", 600.0),
        ("max_incoming_rate", "0.5", 0.5),
        ("per_message_deflate", "on", True),
        ("console", "1", True),
        ("console", "off", False),
        ("per_message_deflate", "YES", True),
        ("per_message_deflate", "1", True),
        ("per_message_deflate", "off", False),
        ("per_message_deflate", "", False),
        ("log_level", "DEBUG", "debug"),
        ("log_format", " json ", "json"),
        ("host", "0.0.0.0", "0.0.0.0"),
        ("host", "::1", "::1"),
        ("root_path", "/push/", "/push"),
        ("root_path", "", ""),
        ("broker_url", "memory://", "memory://"),
        ("broker_url", "redis://x", "redis://x"),
        ("broker_url", " rediss://:secret@cache:6380/1 ", "rediss://:secret@cache:6380/1"),
        ("broker_url", "redis-cluster://cache-0:7000", "redis-cluster://cache-0:7000"),
        ("broker_url", "rediss-cluster://:secret@cache-0:7000/0", "rediss-cluster://:secret@cache-0:7000/0"),
        ("broker_url", "REDIS-CLUSTER://cache-0:7000", "redis-cluster://cache-0:7000"),
        ("broker_url", "rediss://c:6380/0?ssl_cert_reqs=none", "rediss://c:6380/0?ssl_cert_reqs=none"),
        ("trusted_proxies", "10.0.0.0/8, 127.0.0.1,", ("10.0.0.0/8", "127.0.0.1")),
        ("trusted_proxies", "*", ("*",)),
        ("allowed_origins", "*", ("*",)),
        (
            "allowed_origins",
            "https://App.Example.com/, http://localhost:3000",
            ("https://app.example.com", "http://localhost:3000"),
        ),
        ("allowed_origins", "https://a.example:443,http://b.example:80", ("https://a.example", "http://b.example")),
        ("allowed_origins", "https://a.example:8443", ("https://a.example:8443",)),
        ("rate_limit", "100/s", "100/s:100"),
        ("rate_limit", "100/s:200", "100/s:200"),
        ("rate_limit", " 10 / M ", "10/m:10"),
        ("rate_limit", "", None),
        ("connect_rate_limit", "1000/h:20", "1000/h:20"),
        ("idempotency_ttl", "60", 60.0),
        ("idempotency_ttl", "86400s", 86400.0),
        ("user_header", "", None),
        ("api_key", " k ", "k"),
    ],
)
def test_value_is_parsed(name: str, raw: str, expected: Any) -> None:
    assert getattr(from_env(env(**{name: raw})), name) == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("port", "abc"),
        ("port", "0"),
        ("port", "65536"),
        ("port", "80.5"),
        ("port", ""),
        ("max_connections_per_user", "0"),
        ("history_size", "-1"),
        ("max_message_chars", "1e6"),
        ("max_body_bytes", "63"),
        ("max_body_bytes", "1GB"),
        ("max_body_bytes", "-1"),
        ("send_queue_bytes", "lots"),
        ("ping_interval", "0"),
        ("ping_interval", "-1"),
        ("ping_interval", "nan"),
        ("ping_interval", "inf"),
        ("ping_timeout", "soon"),
        ("history_ttl", "0"),
        ("drain_seconds", "3601"),
        ("shutdown_timeout", "0"),
        ("max_incoming_rate", "0"),
        ("max_incoming_rate", "-5"),
        ("max_incoming_rate", "inf"),
        ("max_incoming_rate", "nan"),
        ("per_message_deflate", "maybe"),
        ("console", "2"),
        ("log_level", "verbose"),
        ("log_format", "xml"),
        ("root_path", "push"),
        ("root_path", "/a b"),
        ("host", ""),
        ("host", "bad host"),
        ("broker_url", "http://localhost"),
        ("broker_url", "redis://cache:port/0"),
        ("broker_url", "redis://cache:6379/zero"),
        ("broker_url", "redis-cluster://cache:7000/1"),  # a Redis Cluster has database 0 only
        ("broker_url", "redis-cluster://"),  # no node to start from
        ("broker_url", "redis+cluster://cache:7000"),
        ("broker_url", "redis-cluster://cache:7000?foo=bar"),  # would reach redis-py unchecked
        ("broker_url", "redis-cluster://cache:7000?socket_timeout=abc"),
        ("broker_url", "redis-cluster://cache:7000/0?db=2"),
        ("broker_url", "rediss://cache:6380/0?ssl_cert_reqs=maybe"),
        ("broker_url", "redis://cache:6379/0#x"),
        ("trusted_proxies", "10.0.0.1,not-an-ip"),
        ("allowed_origins", " , "),
        ("allowed_origins", "*,https://a.example"),
        ("allowed_origins", "app.example.com"),
        ("allowed_origins", "https://a.example/path"),
        ("allowed_origins", "ftp://a.example"),
        ("rate_limit", "100"),
        ("rate_limit", "100/d"),
        ("rate_limit", "0/s"),
        ("rate_limit", "10/s:0"),
        ("connect_rate_limit", "fast"),
        ("idempotency_ttl", "0"),
        ("idempotency_ttl", "86401"),
        ("user_header", "X User"),
        ("user_header", "Authorization"),
    ],
)
def test_bad_value_names_the_variable(name: str, raw: str) -> None:
    error = refused(env(**{name: raw}))
    assert error.name == f"DIARY_WS_{name.upper()}"
    assert repr(raw) in str(error)


# --- not built yet: refused, never accepted and ignored ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("workers", "2"),  # with memory://: several workers need redis://
    ],
)
def test_feature_not_built_yet_is_refused(name: str, raw: str) -> None:
    assert refused(env(**{name: raw})).name == f"DIARY_WS_{name.upper()}"


# --- security settings that do not go together ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"api_key": "k" * 16, "api_key_file": "/run/secrets/keys"}, "DIARY_WS_API_KEY_FILE"),
        ({"jwt_secret": "s" * 32, "jwt_secret_file": "/run/secrets/jwt"}, "DIARY_WS_JWT_SECRET_FILE"),
        ({"jwt_secret": "s" * 32, "jwt_public_key_file": "/etc/jwt.pem"}, "DIARY_WS_JWT_PUBLIC_KEY_FILE"),
        ({"jwt_secret_file": "/s", "jwt_public_key_file": "/etc/jwt.pem"}, "DIARY_WS_JWT_PUBLIC_KEY_FILE"),
        ({"jwt_audience": "diary"}, "DIARY_WS_JWT_AUDIENCE"),
        ({"jwt_issuer": "https://auth.example"}, "DIARY_WS_JWT_ISSUER"),
        ({"user_header": "X-User-Id"}, "DIARY_WS_USER_HEADER"),
    ],
)
def test_security_settings_that_clash_are_refused(values: dict[str, str], named: str) -> None:
    assert refused(env(**values)).name == named


def test_security_settings_that_go_together() -> None:
    s = from_env(env(jwt_secret="s" * 32, jwt_audience="diary", user_header="X-User-Id", trusted_proxies="10.0.0.1"))
    assert (s.jwt_audience, s.user_header, s.trusted_proxies) == ("diary", "X-User-Id", ("10.0.0.1",))


def test_unknown_variable_is_refused() -> None:
    assert refused({"DIARY_WS_PROT": "9000", "DIARY_WS_PORT": "9000"}).name == "DIARY_WS_PROT"


def test_a_bad_broker_url_is_named_without_its_password() -> None:
    error = refused(env(broker_url="redis://:hunter2@cache:port/0"))
    assert "hunter2" not in str(error)
    assert "redis://***@cache:port/0" in str(error)


def test_several_workers_need_redis() -> None:
    assert refused(env(workers="2")).name == "DIARY_WS_WORKERS"
    assert from_env(env(workers="2", broker_url="redis://cache:6379/0")).workers == 2


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(SettingError):
        Settings(workers=2)
    assert Settings(port=1).port == 1


# --- flags -----------------------------------------------------------------------------------------------------


def test_flag_wins_over_variable() -> None:
    s = from_env(env(port="9000", log_level="debug"), {"port": "9001"})
    assert s.port == 9001
    assert s.log_level == "debug"


def test_bad_flag_value_names_the_flag() -> None:
    error = refused(env(port="9000"), {"port": "abc"})
    assert error.name == "--port"


def test_flag_for_a_feature_not_built_names_the_flag() -> None:
    assert refused({}, {"workers": "2"}).name == "--workers"


def test_bad_variable_is_named_even_when_a_flag_is_given() -> None:
    assert refused(env(ping_interval="-1"), {"port": "9001"}).name == "DIARY_WS_PING_INTERVAL"


# --- the command line, as a subprocess -----------------------------------------------------------------------


def run_cli(*args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """`python -m diary_ws ...` with only the given DIARY_WS_* variables; a hang fails after 30 s."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DIARY_WS_")}
    environ.update(env(**variables))
    return subprocess.run(
        [sys.executable, "-m", "diary_ws", *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("args", "variables", "named"),
    [
        (("serve", "--port", "abc"), {}, "--port"),
        (("serve",), {"ping_interval": "-1"}, "DIARY_WS_PING_INTERVAL"),
        (("serve", "--workers", "2"), {}, "--workers"),
        (("serve",), {"broker_url": "redis://x:y"}, "DIARY_WS_BROKER_URL"),
        (("serve",), {"api_key": "k"}, "DIARY_WS_API_KEY"),  # too short: refused when the app is made
        (("serve",), {"api_key": "k" * 16, "api_key_file": "/nope"}, "DIARY_WS_API_KEY_FILE"),
        (("serve",), {"api_key_file": "/nonexistent/keys"}, "DIARY_WS_API_KEY_FILE"),
        (("serve",), {"jwt_secret": "short"}, "DIARY_WS_JWT_SECRET"),
        (("serve",), {"jwt_secret_file": "/nonexistent/secret"}, "DIARY_WS_JWT_SECRET_FILE"),
        (("serve",), {"jwt_public_key_file": "/etc/hostname"}, "DIARY_WS_JWT_PUBLIC_KEY_FILE"),
        (("serve",), {"rate_limit": "lots"}, "DIARY_WS_RATE_LIMIT"),
        (("serve",), {"prot": "9000"}, "DIARY_WS_PROT"),
        (("serve", "--max-body-bytes", "1"), {"max_body_bytes": "1MiB"}, "--max-body-bytes"),
    ],
)
def test_cli_bad_setting_exits_2_with_one_line(args: tuple[str, ...], variables: dict[str, str], named: str) -> None:
    done = run_cli(*args, **variables)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_cli_help_lists_every_flag() -> None:
    done = run_cli("serve", "--help")
    assert done.returncode == 0, done.stderr
    missing = [flag for flag in FLAGS if flag not in done.stdout]
    assert not missing, done.stdout
    for flag in FLAGS:
        variable = "DIARY_WS_" + flag.removeprefix("--").replace("-", "_").upper()
        assert variable in done.stdout.replace("\n", "").replace(" ", ""), variable
