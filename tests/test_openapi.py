"""The hand-written OpenAPI document: it matches the real route table, and schemathesis fuzzes a real server with it."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.routing import Route, WebSocketRoute
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from diary_ws import Settings, create_app
from tests.utils import Server, run_server

DOCUMENT: dict[str, Any] = orjson.loads(resources.files("diary_ws").joinpath("openapi.json").read_bytes())
API_KEY = "fuzz-key-0123456789abcdef"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# What schemathesis checks on every answer. Left out: positive_data_acceptance (a valid POST gets 404 when
# none of its users listens, which the contract wants), and checks for auth and resources this API lacks.
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
    "response_schema_conformance,negative_data_rejection,unsupported_method"
)


def template(path: str) -> str:
    """`/api/v1/ws/{user_id:anything}` -> `/api/v1/ws/{user_id}`: OpenAPI has no convertors."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def real_http_routes() -> dict[str, set[str]]:
    app = create_app(Settings())
    found: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, Route):
            # Starlette adds HEAD to every GET route by itself; OpenAPI leaves HEAD implied, so do we.
            methods = {m.lower() for m in route.methods or ()} - {"head"}
            found.setdefault(template(route.path), set()).update(methods)
        else:
            assert isinstance(route, WebSocketRoute), f"a route of an unexpected kind: {route!r}"
    return found


def documented_routes() -> dict[str, set[str]]:
    return {path: set(item) & HTTP_METHODS for path, item in DOCUMENT["paths"].items()}


def test_every_http_route_is_documented_and_nothing_else() -> None:
    assert documented_routes() == real_http_routes()


def test_the_document_is_openapi_3_1_with_the_error_schema() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    schemas = DOCUMENT["components"]["schemas"]
    assert schemas["Error"]["required"] == ["status", "message"]
    assert schemas["Sent"]["additionalProperties"] is False
    assert "nodes_missing" in schemas["Sent"]["properties"]
    assert "nodes_missing" not in schemas["Sent"]["required"]
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if not status.startswith(("2", "3")):  # a 304 has no body
                    ref = answer["content"]["application/json"]["schema"]["$ref"]
                    assert ref in ("#/components/schemas/Error", "#/components/schemas/NobodyListening"), (path, method)
    assert "404" in DOCUMENT["paths"]["/api/v1/ws/notification"]["post"]["responses"]


def test_the_websocket_endpoint_is_described() -> None:
    description = DOCUMENT["info"]["description"]
    assert "/api/v1/ws/{user_id}" in description
    for needle in ("since=", '"type": "resume"', "4008", "1012", "400", "429", "503"):
        assert needle in description, needle


def test_the_served_document_is_the_packaged_one(shared_server: Server) -> None:
    answer = shared_server.get("/api/v1/ws/openapi.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {**DOCUMENT, "servers": [{"url": "/"}]}


@pytest.fixture
def listened_server() -> Iterator[Server]:
    """A server with one reading listener, so that broadcasts reach the 200 path and not only the 404."""
    # With an API key, as in production: the authenticated paths are what gets fuzzed (401s are tested elsewhere).
    with run_server({"api_key": API_KEY, "console": "1"}) as server:
        with connect(server.listen_url("fuzz-listener"), max_size=None) as listener:
            reader = threading.Thread(target=_read_all, args=(listener,), daemon=True)
            reader.start()
            try:
                yield server
            finally:
                listener.close()
                reader.join(timeout=10)
        server.assert_clean_log()


def _read_all(ws: ClientConnection) -> None:
    try:
        for _frame in ws:
            pass
    except ConnectionClosed:
        pass


def schemathesis_run(server: Server, seconds: int, *selection: str) -> tuple[dict[str, Any], str]:
    """One bounded schemathesis run against `server`; its JSON report and the tail of its output."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    with tempfile.TemporaryDirectory(prefix="diary-ws-schemathesis-") as reports:
        run = subprocess.run(
            [str(schemathesis), "run", f"{server.http}/api/v1/ws/openapi.json",
             "--url", server.http, "--checks", CHECKS, "--max-examples", "150", "--max-time", str(seconds),
             "--workers", "1", "--request-timeout", "5", "--report", "json", "--report-dir", reports,
             "--header", f"Authorization: Bearer {API_KEY}", *selection],
            capture_output=True, text=True, timeout=60, cwd=reports,  # its .schemathesis cache goes there too
        )  # fmt: skip
        report: dict[str, Any] = orjson.loads(next(Path(reports).glob("*.json")).read_bytes())
    summary = f"{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    assert run.returncode == 0, summary
    assert report["failures"] == [], summary
    assert report["errors"] == [], summary
    return report, summary


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_break(listened_server: Server) -> None:
    # Two runs, so that the POST (the heart of the API, and the slowest to generate) gets a budget of its own.
    notify = "/api/v1/ws/notification"
    posts, summary = schemathesis_run(listened_server, 20, "--include-path", notify)
    assert posts["operations"]["tested"] == 1
    # The floors below say the fuzzer did real work; they are low because a time budget on a loaded 2-core box
    # (CI's, or a developer's with other jobs) yields far fewer cases than on a quiet one (19 seen, not 30).
    assert posts["test_cases"]["generated"] >= 10, summary
    assert posts["valid_rates"][f"POST {notify}"]["fuzzing"]["accepted"] > 0, "no POST reached a 200"
    # The batch, with a budget of its own too: its bodies are the largest to generate.
    batch = "/api/v1/ws/notifications"
    batches, summary = schemathesis_run(listened_server, 15, "--include-path", batch)
    assert batches["operations"]["tested"] == 1
    assert batches["test_cases"]["generated"] >= 8, summary
    assert batches["valid_rates"][f"POST {batch}"]["fuzzing"]["accepted"] > 0, "no batch reached a 200"
    # The rest. An accepted SSE stream never ends by itself, so every valid case would wait out the timeout:
    # SSE is left out (its refusals are tested in tests/test_sse.py).
    rest, summary = schemathesis_run(
        listened_server, 10, "--exclude-path", notify, "--exclude-path", batch, "--exclude-path-regex", "^/api/v1/sse/"
    )
    # Every other documented operation was tried, except the document itself, which schemathesis never fuzzes.
    documented = sum(len(methods) for methods in documented_routes().values())
    assert rest["operations"]["tested"] == documented - 4, summary
    assert rest["test_cases"]["generated"] >= 40, summary
    assert "Traceback" not in listened_server.log()


@pytest.mark.parametrize("limit", ["²", "٣", "1.5", "-1", "1" * 10])
def test_limit_outside_the_documented_integer_is_a_400(shared_server: Server, limit: str) -> None:
    """Found while writing the document: `"²".isdigit()` is True but int() refuses it, which was a 500."""
    answer = shared_server.get("/api/v1/ws/status", params={"limit": limit})
    assert answer.status_code == 400
    assert answer.json()["status"] == "error"


@pytest.mark.parametrize("user_id", ["a%2Fb", "a/b", "", "%20"])
def test_delete_with_a_bad_user_id_is_the_documented_400(shared_server: Server, user_id: str) -> None:
    """A / or an empty id used to miss the route and get a 404 that the document (and the README) did not list."""
    answer = httpx.delete(f"{shared_server.http}/api/v1/ws/users/{user_id}/connections", timeout=10)
    assert answer.status_code == 400
    assert "is not valid" in answer.json()["message"]
