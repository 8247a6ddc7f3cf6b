"""deploy/grafana-dashboard.json queries only metrics a running server exposes, with labels they carry."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from tests.utils import ROOT, Server, run_server, wait_until

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\bdiary_ws_[a-z0-9_]+")
GROUPING = re.compile(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)")
SELECTOR_LABEL = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
SCRAPE_LABELS = {"instance", "job"}  # the ones Prometheus adds to every series it scrapes
# What the dashboard must show, as families: publishes and their latency, deliveries, sockets, handshakes,
# slow consumers, stalls, loop lag and the broker (Redis) state.
MUST_SHOW = {
    "diary_ws_messages_published", "diary_ws_publish_seconds", "diary_ws_messages_delivered", "diary_ws_connections",
    "diary_ws_handshakes", "diary_ws_slow_consumer_closes", "diary_ws_event_loop_stall_seconds",
    "diary_ws_event_loop_lag_seconds", "diary_ws_broker_reader_up",
}  # fmt: skip


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    return loaded


def queries() -> list[str]:
    """Every PromQL expression: each panel's targets and each templating variable's query."""
    board = dashboard()
    found = [target["expr"] for panel in panels(board["panels"]) for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query["query"])
    return found


@pytest.fixture(scope="module")
def exposed() -> Iterator[dict[str, tuple[str, set[str]]]]:
    """family -> (type, label names) from a running server's /metrics, after a socket came and went."""
    with run_server() as server:
        with connect(server.listen_url("dash")):
            wait_until(lambda: server.status()["total_connections"] == 1, 5, "the socket")
            assert server.post({"message": "hi"}).status_code == 200
        wait_until(lambda: "diary_ws_websocket_closes_total{" in server.get("/metrics").text, 5, "the close")
        yield families(server)
        server.assert_clean_log()


def families(server: Server) -> dict[str, tuple[str, set[str]]]:
    found = {}
    for family in text_string_to_metric_families(server.get("/metrics").text):
        labels = {name for sample in family.samples for name in sample.labels}
        found[family.name] = (family.type, labels)
    return found


def test_every_queried_metric_exists_on_a_running_server(exposed: dict[str, tuple[str, set[str]]]) -> None:
    exprs = queries()
    assert len(exprs) >= 15
    samples = {family + suffix: family for family, (kind, _) in exposed.items() for suffix in SUFFIXES.get(kind, ())}
    used: set[str] = set()
    for expr in exprs:
        names = METRIC.findall(expr)
        assert names, expr
        for name in names:
            assert name in samples, f"{name} (in {expr}) is not on /metrics"
            used.add(samples[name])
    assert used >= MUST_SHOW, MUST_SHOW - used


def test_every_label_a_query_names_exists(exposed: dict[str, tuple[str, set[str]]]) -> None:
    known = SCRAPE_LABELS | {label for _kind, labels in exposed.values() for label in labels}
    for expr in queries():
        named = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}
        named |= set(SELECTOR_LABEL.findall(expr))
        assert named <= known, (expr, named - known)


@pytest.mark.parametrize("expr", queries())
def test_each_query_is_balanced(expr: str) -> None:
    """No PromQL parser here: at least every bracket closes, in order, and quotes pair up."""
    stack: list[str] = []
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in ")]}":
            assert stack, expr
            assert "([{"[")]}".index(char)] == stack.pop(), expr
    assert not stack, expr
    assert expr.count('"') % 2 == 0, expr


def test_panels_fit_the_grid_and_use_the_datasource_variable() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in panels(board["panels"])]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in panels(board["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            assert all('instance=~"$instance"' in target["expr"] for target in panel["targets"]), panel["title"]
