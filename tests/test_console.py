"""The console page over HTTP: served only with CONSOLE=1, self-contained, and careful with what it renders.

What it does in a browser is tested in tests/test_browser.py.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from importlib.resources import files

import httpx
import pytest
from websockets.sync.client import connect

from tests.utils import Server, redis_server, run_server, wait_until

PAGES = {
    "/api/v1/ws/console": "text/html; charset=utf-8",
    "/api/v1/ws/console/console.js": "text/javascript; charset=utf-8",
    "/api/v1/ws/console/console.css": "text/css; charset=utf-8",
}
STATIC = files("diary_ws").joinpath("static")


@pytest.fixture(scope="module")
def console_server() -> Iterator[Server]:
    with run_server({"console": "1"}) as srv:
        yield srv
        srv.assert_clean_log()


@pytest.mark.parametrize("path", sorted(PAGES))
def test_console_is_a_json_404_when_off(shared_server: Server, path: str) -> None:
    answer = shared_server.get(path)
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
    assert "DIARY_WS_CONSOLE=1" in answer.json()["message"]


@pytest.mark.parametrize("path", sorted(PAGES))
def test_console_files_are_served_when_on(console_server: Server, path: str) -> None:
    answer = console_server.get(path)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == PAGES[path]
    assert answer.headers["x-content-type-options"] == "nosniff"
    csp = answer.headers["content-security-policy"]
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert answer.content


@pytest.mark.parametrize("path", ["/api/v1/ws/console/other.js", "/api/v1/ws/console/..%2Fsettings.py"])
def test_unknown_console_file_is_a_json_404(console_server: Server, path: str) -> None:
    answer = console_server.get(path)
    assert answer.status_code == 404
    assert answer.json()["status"] == "error"


def test_console_post_is_405(console_server: Server) -> None:
    answer = httpx.post(f"{console_server.http}/api/v1/ws/console", timeout=10)
    assert answer.status_code == 405
    assert answer.json()["status"] == "error"


@pytest.mark.parametrize("name", ["console.html", "console.js", "console.css"])
def test_console_loads_nothing_from_elsewhere(name: str) -> None:
    """No CDN, no build step: the page is these three files and nothing else."""
    text = STATIC.joinpath(name).read_text()
    assert not re.search(r"https?://", text), "an absolute URL in the console: it must work offline"
    assert "@import" not in text


def test_console_urls_are_relative_so_root_path_works() -> None:
    html = STATIC.joinpath("console.html").read_text()
    assert re.findall(r'(?:src|href)="([^"]*)"', html) == ["console/console.css", "console/console.js"]
    js = STATIC.joinpath("console.js").read_text()
    assert re.findall(r'fetch\("([^"?]*)', js) == ["console/overview", "notification"]
    assert re.findall(r"fetch\(`([^`?]*)", js) == ["users/${encodeURIComponent(id)}/connections"]
    assert not re.search(r"[\"'`]/api", js)


def test_console_never_renders_markup_from_data() -> None:
    js = STATIC.joinpath("console.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in js, sink
    assert "textContent" in js


# --- the overview the console polls ---------------------------------------------------------------------------

KEY = "overview-key-0123456789abcdef012"


def overview(server: Server, query: str = "", key: str | None = KEY) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return server.get(f"/api/v1/ws/console/overview{query}", headers=headers)


def test_overview_is_a_json_404_when_the_console_is_off(shared_server: Server) -> None:
    answer = overview(shared_server, key=None)
    assert answer.status_code == 404
    assert "DIARY_WS_CONSOLE=1" in answer.json()["message"]


@pytest.mark.parametrize("limit", ["-1", "x", "1.5", "²", "1" * 10])
def test_overview_refuses_a_bad_limit(console_server: Server, limit: str) -> None:
    answer = overview(console_server, f"?limit={limit}", key=None)
    assert answer.status_code == 400
    assert answer.json()["status"] == "error"


def test_overview_counts_sockets_per_user_and_lists_this_node() -> None:
    with run_server({"console": "1", "api_key": KEY}) as server:
        assert overview(server, key=None).status_code == 401
        assert overview(server, key="wrong-key-0123456789abcdef0123456").status_code == 401
        with connect(server.listen_url("ov-a")), connect(server.listen_url("ov-a")), connect(server.listen_url("ov-b")):
            wait_until(lambda: overview(server).json()["total_connections"] == 3, 5, "three sockets")
            assert server.post({"message": "hi"}, headers={"X-API-Key": KEY}).status_code == 200
            # Right after the ring's first sample the interval to now is too short to give a rate: wait one out.
            wait_until(lambda: overview(server).json()["rates"], 5, "an interval long enough for a rate")
            body = overview(server).json()
            assert body["connected_users"] == 2
            assert body["users"] == [{"user_id": "ov-a", "connections": 2}, {"user_id": "ov-b", "connections": 1}]
            assert overview(server, "?limit=1").json()["users"] == [{"user_id": "ov-a", "connections": 2}]
            [node] = body["nodes"]
            assert node["here"] is True
            assert (node["users"], node["connections"], node["heartbeat"]) == (2, 3, None)
            assert body["loop"] in ("asyncio", "uvloop")
            rates = body["rates"]
            assert rates, body
            assert sum(rate["publishes"] * rate["seconds"] for rate in rates) == pytest.approx(1, abs=0.01)
            assert sum(rate["deliveries"] * rate["seconds"] for rate in rates) == pytest.approx(3, abs=0.01)
            assert sum(rate["handshakes"] * rate["seconds"] for rate in rates) == pytest.approx(3, abs=0.01)
            stalls = body["stalls"]
            assert stalls["ticks"] > 0
            assert sum(count for _bound, count in stalls["buckets"]) == stalls["ticks"]
            assert stalls["buckets"][-1][0] is None
        server.assert_clean_log()


def test_overview_over_redis_sums_users_over_nodes_and_lists_each_node() -> None:
    with (
        redis_server() as redis,
        run_server({"broker_url": redis.url, "console": "1"}) as first,
        run_server({"broker_url": redis.url}) as second,
        connect(first.listen_url("ov-c")),
        connect(second.listen_url("ov-c")),
        connect(second.listen_url("ov-d")),
    ):
        wait_until(lambda: overview(first, key=None).json()["total_connections"] == 3, 10, "three sockets")
        body = overview(first, key=None).json()
        assert body["users"] == [{"user_id": "ov-c", "connections": 2}, {"user_id": "ov-d", "connections": 1}]
        here, there = body["nodes"]  # this node first
        assert (here["here"], here["users"], here["connections"]) == (True, 1, 1)
        assert (there["here"], there["users"], there["connections"]) == (False, 2, 2)
        assert here["node"] != there["node"]
        for node in (here, there):
            assert time.time() - 10 < node["heartbeat"] <= time.time() + 1
        # The other node leaves: within the heartbeat TTL it is no longer listed.
        assert second.terminate() < 10
        wait_until(lambda: len(overview(first, key=None).json()["nodes"]) == 1, 15, "the node to leave")
        first.assert_clean_log()


def test_overview_answers_within_the_request_bound_while_redis_is_paused() -> None:
    """Like the status it mirrors: a paused broker gets a 503 within 3 s, not a wait on the client's timeout."""
    with redis_server() as redis, run_server({"broker_url": redis.url, "console": "1"}) as server:
        assert overview(server, key=None).status_code == 200
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            answer = overview(server, key=None)
            took = time.monotonic() - started
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert answer.status_code == 503, answer.text
        assert answer.json()["status"] == "error"
        assert took < 3.5, f"the overview took {took:.1f} s"


def test_rates_are_per_second_between_samples() -> None:
    from diary_ws.console import rates
    from diary_ws.metrics import Sample

    # "Now" is a whole period after the newest ring sample: each interval stands on its own.
    samples = [Sample(100.0, 0, 0, 0, 0, 0.0), Sample(105.0, 10, 50, 5, 1, 0.002), Sample(110.0, 11, 51, 5, 1, 0.0)]
    assert rates(samples) == [
        {"at": 105.0, "seconds": 5.0, "publishes": 2.0, "deliveries": 10.0, "handshakes": 1.0, "refusals": 0.2,
         "worst_stall": 0.002},
        {"at": 110.0, "seconds": 5.0, "publishes": 0.2, "deliveries": 0.2, "handshakes": 0.0, "refusals": 0.0,
         "worst_stall": 0.0},
    ]  # fmt: skip


def test_the_rate_ending_now_spans_a_whole_period() -> None:
    """A burst just before a ring sample stays on the headline figure until a whole period has passed after
    it: the page polls every 2 s and must not read 0 between two samples (a CI run saw that)."""
    from diary_ws.console import rates
    from diary_ws.metrics import SAMPLE_PERIOD, Sample

    ring = [Sample(100.0, 0, 0, 0, 0, 0.0), Sample(105.0, 0, 0, 0, 0, 0.0), Sample(110.0, 5, 5, 0, 0, 0.003)]
    for age in (0.1, 1.0, 2.5, SAMPLE_PERIOD - 0.01):
        now = Sample(110.0 + age, 5, 5, 0, 0, 0.001)
        found = rates([*ring, now])
        assert [point["at"] for point in found] == [105.0, round(110.0 + age, 3)]
        assert found[-1]["seconds"] == round(5.0 + age, 3)
        assert found[-1]["publishes"] == round(5 / (5.0 + age), 3) > 0
        assert found[-1]["worst_stall"] == 0.003  # the folded sample's stall is kept
