"""Prometheus metrics: one CollectorRegistry per app (never the global one), served at GET /metrics.

What is cheap to read when Prometheus asks (connections, users, the Hub's running totals, broker liveness,
the stall probe's buckets) is read at scrape time by custom collectors, so nothing is counted per delivery.
What needs an observation (publish and fan-out latency, HTTP requests, handshakes, close codes, event-loop
lag) uses prometheus-client's own types. docs/observability.md lists every metric with its type and labels.

With WORKERS above 1 each worker process has its own registry, and every series carries a `worker` label
with the process id, so figures from different workers are never summed or confused (see the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import importlib.metadata
import os
import platform
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, NamedTuple

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from diary_ws import __version__, gcpolicy
from diary_ws.broadcaster import Hub
from diary_ws.loopwatch import BUCKETS as STALL_BUCKETS
from diary_ws.loopwatch import StallProbe
from diary_ws.protocols import CloseCode

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes (CONTENT_TYPE_LATEST names 1.0.0)

# Seconds: a publish normally takes tens of microseconds to a few milliseconds; the top buckets catch stalls.
FANOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# A publish, from the request's first byte to its answer, or one `Hub.notify`: 100 us to 3 s.
PUBLISH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0)
LAG_INTERVAL = 0.5  # seconds between event-loop lag probes
SAMPLE_EVERY = 10  # lag probes between two samples of the console's rates ring (5 s)
SAMPLE_PERIOD = SAMPLE_EVERY * LAG_INTERVAL  # seconds between two samples of the rates ring
RING_SIZE = 60  # samples the ring keeps: five minutes
# Every outcome a handshake can have, so each series exists (at 0) from the start and rate() works at once.
HANDSHAKE_OUTCOMES = {
    "websocket": ("accepted", "400", "401", "403", "404", "429", "503"),
    "sse": ("accepted", "400", "401", "403", "429", "503"),
}
UNMATCHED = "unmatched"  # the route label of a request no route matched, so raw paths never become labels
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CLOSE_CODES = frozenset(CloseCode)


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


class BuildInfo(Collector):
    """`diary_ws_build_info`: always 1; the labels say what runs (the loop is read at scrape time)."""

    def __init__(self, backend: str, labels: Mapping[str, str]) -> None:
        self._names = ["version", "python", "uvicorn", "backend", "loop", *labels]
        self._fixed = [__version__, platform.python_version(), _version_of("uvicorn"), backend]
        self._extra = list(labels.values())

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("diary_ws_build_info", "what runs: diary-ws, Python and uvicorn versions, the "
                                 "backend and the event loop; always 1", labels=self._names)  # fmt: skip
        info.add_metric([*self._fixed, loop_name(), *self._extra], 1)
        yield info


class StallCollector(Collector):
    """`diary_ws_event_loop_stall_seconds` from the probe's plain counts, read at scrape time."""

    def __init__(self, probe: StallProbe, labels: Mapping[str, str]) -> None:
        self._probe = probe
        self._names = list(labels)
        self._values = list(labels.values())

    def collect(self) -> Iterable[Metric]:
        probe = self._probe
        family = HistogramMetricFamily(
            "diary_ws_event_loop_stall_seconds",
            "how late each wake-up of a 10 ms event-loop timer came: a stall of the whole process",
            labels=self._names,
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*STALL_BUCKETS, float("inf")), probe.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        family.add_metric(self._values, buckets, probe.total)
        yield family


class GcCollector(Collector):
    """The garbage collector's state: objects frozen (GC_FREEZE, diary_ws/gcpolicy.py) and collections."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self._names = list(labels)
        self._values = list(labels.values())

    def collect(self) -> Iterable[Metric]:
        frozen = GaugeMetricFamily(
            "diary_ws_gc_frozen_objects",
            "objects in the garbage collector's permanent generation, which no collection walks (GC_FREEZE); "
            "estimated without walking it: the last count plus half the memory blocks grown since",
            labels=self._names,
        )
        frozen.add_metric(self._values, gcpolicy.VALVE.estimate() if gcpolicy.freezing else gc.get_freeze_count())
        yield frozen
        runs = CounterMetricFamily(
            "diary_ws_gc_collections", "garbage collections, by generation (2: full)",
            labels=["generation", *self._names],
        )  # fmt: skip
        for generation, stats in enumerate(gc.get_stats()):
            runs.add_metric([str(generation), *self._values], stats["collections"])
        yield runs
        thaws = CounterMetricFamily(
            "diary_ws_gc_thaws", "times the frozen generation doubled and was thawed, collected once and frozen "
            "again (GC_FREEZE's bound; each is one full collection)", labels=self._names,
        )  # fmt: skip
        thaws.add_metric(self._values, gcpolicy.VALVE.thaws)
        yield thaws
        pauses = HistogramMetricFamily(
            "diary_ws_gc_pause_seconds", "CPU time of each garbage collection, by generation (timed under "
            "diary-ws serve)", labels=["generation", *self._names],
        )  # fmt: skip
        for generation, counts in enumerate(gcpolicy.PAUSES.counts):
            cumulative, buckets = 0, []
            for bound, count in zip((*STALL_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            pauses.add_metric([str(generation), *self._values], buckets, gcpolicy.PAUSES.totals[generation])
        yield pauses


def _version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def loop_name() -> str:
    """`uvloop` or `asyncio`: the event loop this code runs on (`none` outside one)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


class Sample(NamedTuple):
    """One point of the console's rates ring: running totals at `at` (Unix seconds), and the worst stall since
    the sample before."""

    at: float
    published: int
    delivered: int
    handshakes: int
    refused: int
    worst_stall: float


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

    def __init__(self, hub: Hub, *, per_worker: bool = False, backend: str = "memory") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"worker": str(os.getpid())} if per_worker else {}
        names, values = list(labels), labels
        self._hub = hub
        self.stalls = StallProbe()
        self.registry.register(BuildInfo(backend, labels))
        self.registry.register(HubCollector(hub, labels))
        self.registry.register(StallCollector(self.stalls, labels))
        self.registry.register(GcCollector(labels))
        publish = Histogram(
            "diary_ws_publish_seconds", "a successful publish: a POST from its first byte to its answer "
            "(source=http), or one Hub.notify call (source=python)",
            ["source", *names], buckets=PUBLISH_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.observe_http_publish = publish.labels(source="http", **values).observe
        hub.stats.observe_notify = publish.labels(source="python", **values).observe
        handshakes = Counter(
            "diary_ws_handshakes", "WebSocket and SSE handshakes by transport and outcome: accepted, or the "
            "HTTP status of the refusal", ["transport", "outcome", *names], registry=self.registry,
        )  # fmt: skip
        # transport -> outcome -> its child counter, made up front: the outcomes are a closed set.
        self._handshakes = {
            transport: {outcome: handshakes.labels(transport=transport, outcome=outcome, **values)
                        for outcome in outcomes}
            for transport, outcomes in HANDSHAKE_OUTCOMES.items()
        }  # fmt: skip
        self._handshake_family = handshakes
        self.accepted = 0  # handshakes accepted and refused, as plain totals for the console's rates ring
        self.refusals = 0
        self.ring: deque[Sample] = deque(maxlen=RING_SIZE)
        self.lag = 0.0  # the lag gauge's last value, for the console
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
        # A peer may close with any code from 3000 to 4999: those that are not ours share one label.
        label = str(code) if code < 3000 or code in CLOSE_CODES else "other"
        self._closes.labels(code=label, **self._labels).inc()

    def refused(self, status: int, transport: str = "websocket") -> None:
        """Count one handshake refused with `status` (400, 401, 403, 429, 503; 404 for an unknown socket path)."""
        if transport == "websocket":
            self._refusals.labels(status=str(status), **self._labels).inc()
        self._handshake(transport, str(status)).inc()
        self.refusals += 1

    def accepted_handshake(self, transport: str) -> None:
        """Count one WebSocket upgrade or SSE stream that was let in."""
        self._handshakes[transport]["accepted"].inc()
        self.accepted += 1

    def _handshake(self, transport: str, outcome: str) -> Any:
        child = self._handshakes[transport].get(outcome)
        if child is None:  # a status outside the usual set (a host's guard, say): still bounded, our codes only
            child = self._handshakes[transport][outcome] = self._handshake_family.labels(
                transport=transport, outcome=outcome, **self._labels
            )
        return child

    def sample(self, *, take: bool = True) -> Sample:
        """The running totals now; `take` starts a new window for the worst stall (the ring's samples do)."""
        stats = self._hub.stats
        worst = self.stalls.take_worst() if take else self.stalls.worst
        return Sample(time.time(), stats.published, stats.delivered, self.accepted, self.refusals, worst)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)

    @contextlib.asynccontextmanager
    async def probes(self) -> AsyncIterator[None]:
        """While the app runs: the stall probe, the lag gauge every LAG_INTERVAL s, and the rates ring."""
        loop = asyncio.get_running_loop()
        self.stalls.start(loop)
        task = loop.create_task(self._probe())
        try:
            yield
        finally:
            self.stalls.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe(self) -> None:
        clock = asyncio.get_running_loop().time
        self.ring.append(self.sample())
        turns = 0
        while True:
            started = clock()
            await asyncio.sleep(LAG_INTERVAL)
            self.lag = max(0.0, clock() - started - LAG_INTERVAL)
            self._lag.set(self.lag)
            turns += 1
            if turns % SAMPLE_EVERY == 0:
                self.ring.append(self.sample())


@functools.cache
def route_label(template: str) -> str:
    """`/api/v1/sse/{user_id:anything}` -> `/api/v1/sse/{user_id}`: the route's template as a label, worked out
    once per route (the templates are ours, so the cache is as small as the route table)."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", template)
