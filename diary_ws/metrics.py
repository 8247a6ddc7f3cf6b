"""Prometheus metrics: one CollectorRegistry per app (never the global one), served at GET /metrics.

What is cheap to read when Prometheus asks (connections, users, the Hub's running totals, broker liveness)
is read at scrape time by a custom collector, so nothing is counted per delivery. What needs an observation
(fan-out latency, HTTP requests, close codes, event-loop lag) uses prometheus-client's own types.

With WORKERS above 1 each worker process has its own registry, and every series carries a `worker` label
with the process id, so figures from different workers are never summed or confused (see the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diary_ws.broadcaster import Hub

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes (CONTENT_TYPE_LATEST names 1.0.0)

# Seconds: a publish normally takes tens of microseconds to a few milliseconds; the top buckets catch stalls.
FANOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LAG_INTERVAL = 0.5  # seconds between event-loop lag probes
UNMATCHED = "unmatched"  # the route label of a request no route matched, so raw paths never become labels
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HubCollector(Collector):
    """Reads the Hub when Prometheus scrapes: gauges for sockets and users, counters from `Hub.stats`."""

    def __init__(self, hub: Hub, labels: Mapping[str, str]) -> None:
        self._hub = hub
        self._names = list(labels)
        self._values = list(labels.values())

    def _family(self, kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, doc: str,
                extra: Iterable[str] = ()) -> GaugeMetricFamily | CounterMetricFamily:  # fmt: skip
        return kind(name, doc, labels=[*extra, *self._names])

    def collect(self) -> Iterable[Metric]:
        hub, here = self._hub, self._values
        users, sockets = hub.sizes()
        stats = hub.stats
        gauges = [
            ("diary_ws_connections", "open connections (WebSockets and SSE streams) on this process", sockets),
            ("diary_ws_users", "distinct users with at least one open connection on this process", users),
            ("diary_ws_broker_reader_up", "1 while the broker reader is alive (memory:// is always up)",
             int(broker_up(hub))),
        ]  # fmt: skip
        for name, doc, value in gauges:
            gauge = self._family(GaugeMetricFamily, name, doc)
            gauge.add_metric(here, value)
            yield gauge
        counters = [
            ("diary_ws_messages_published", "messages this process stored and fanned out", stats.published),
            ("diary_ws_messages_delivered", "socket deliveries: a message handed to a socket, written or queued",
             stats.delivered),
            ("diary_ws_slow_consumer_closes", "sockets closed with 4008 (or aborted) for an overflowing backlog",
             stats.slow_consumers),
        ]  # fmt: skip
        for name, doc, value in counters:
            counter = self._family(CounterMetricFamily, name, doc)
            counter.add_metric(here, value)
            yield counter
        dropped = self._family(CounterMetricFamily, "diary_ws_messages_dropped",
                               "targeted sockets a message did not reach, by reason", ["reason"])  # fmt: skip
        dropped.add_metric(["slow_consumer", *here], stats.slow_consumers)
        dropped.add_metric(["disconnected", *here], stats.dropped_dead)
        yield dropped


def broker_up(hub: Hub) -> bool:
    """The backend's reader liveness: its `reader_up` attribute when it has one (Redis), else `ready()`."""
    backend = hub.backend
    flag = getattr(backend, "reader_up", None)  # a property or a method, where the backend has one
    if callable(flag):
        flag = flag()
    if isinstance(flag, bool):
        return flag
    return bool(backend.ready())


class Metrics:
    """Everything /metrics reports for one app; kept on `app.state.metrics`."""

    def __init__(self, hub: Hub, *, per_worker: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"worker": str(os.getpid())} if per_worker else {}
        names, values = list(labels), labels
        self.registry.register(HubCollector(hub, labels))
        fanout = Histogram(
            "diary_ws_fanout_seconds", "time from a publish's start to every local socket having its copy",
            names, buckets=FANOUT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        hub.stats.observe_fanout = (fanout.labels(**values) if values else fanout).observe
        self._requests = Counter(
            "diary_ws_http_requests", "HTTP requests by method, route template and status",
            ["method", "route", "status", *names], registry=self.registry,
        )  # fmt: skip
        self._closes = Counter(
            "diary_ws_websocket_closes", "WebSocket connections ended, by close code (1005/1006: no close frame)",
            ["code", *names], registry=self.registry,
        )  # fmt: skip
        self._refusals = Counter(
            "diary_ws_websocket_refusals", "WebSocket handshakes refused before the upgrade, by HTTP status",
            ["status", *names], registry=self.registry,
        )  # fmt: skip
        lag = Gauge("diary_ws_event_loop_lag_seconds", f"how late a {LAG_INTERVAL} s timer fired, last probe",
                    names, registry=self.registry)  # fmt: skip
        self._lag = lag.labels(**values) if values else lag
        self._labels = values
        # (method, route, status) -> its child counter: `labels()` costs a lock and a tuple build per call.
        self._request_counters: dict[tuple[str, str, int], Any] = {}

    def request(self, method: str, route: str, status: int) -> None:
        """Count one HTTP request."""
        counter = self._request_counters.get((method, route, status))
        if counter is None:
            known = method if method in METHODS else "other"  # the method is client-chosen: keep it bounded
            # Bounded too: route templates and statuses are ours, and every unknown method shares one entry.
            counter = self._requests.labels(method=known, route=route, status=str(status), **self._labels)
            if known == method:
                self._request_counters[(method, route, status)] = counter
        counter.inc()

    def closed(self, code: int) -> None:
        """Count one WebSocket that ended, by the code it ended with."""
        self._closes.labels(code=str(code), **self._labels).inc()

    def refused(self, status: int) -> None:
        """Count one WebSocket handshake refused with `status` (400, 401, 403, 429, 503)."""
        self._refusals.labels(status=str(status), **self._labels).inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    @contextlib.asynccontextmanager
    async def lag_probe(self) -> AsyncIterator[None]:
        """Measure event-loop lag (timer overshoot) every LAG_INTERVAL s while the app runs."""
        task = asyncio.get_running_loop().create_task(self._probe())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe(self) -> None:
        clock = asyncio.get_running_loop().time
        while True:
            started = clock()
            await asyncio.sleep(LAG_INTERVAL)
            self._lag.set(max(0.0, clock() - started - LAG_INTERVAL))


class RequestMetrics:
    """Raw ASGI middleware: counts HTTP requests by route template and status, so raw paths never become labels.

    Starlette's router records the matched route in `scope["route"]` (the dict we passed down), so after
    the call it names the template, `/api/v1/ws/status`, with no root_path and no path parameters.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._labels: dict[str, str] = {}  # one entry per route template, so it stays as small as the table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what Starlette's outer error middleware answers if the app raises before it responds

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            self.metrics.request(scope["method"], self._label(route) if isinstance(route, str) else UNMATCHED, status)

    def _label(self, path: str) -> str:
        """`/api/v1/sse/{user_id:anything}` -> `/api/v1/sse/{user_id}`, worked out once per route."""
        label = self._labels.get(path)
        if label is None:
            label = self._labels[path] = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)
        return label
