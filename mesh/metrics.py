"""Prometheus metrics of a mesh process, and the ``/metrics`` endpoint that serves them.

Names follow Prometheus conventions: units in names, ``_total`` on counters, and labels
of bounded cardinality only (service, agent type, outcome code; never agent keys or
client ids). Any process may serve them (``--metrics-port``); figures a process does
not produce stay absent or zero there.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import accumulate

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: The buckets' ``le`` labels, written as prometheus_client writes them.
_BUCKET_LABELS = [floatToGoString(b) for b in _BUCKETS]  # type: ignore[no-untyped-call]

GATEWAY_REQUESTS = Counter(
    "mesh_gateway_requests_total",
    "Requests through the gateway, by outcome.",
    ["agent_type", "code"],
)
GATEWAY_DURATION = Histogram(
    "mesh_gateway_request_duration_seconds",
    "Gateway end-to-end request time.",
    ["agent_type"],
    buckets=_BUCKETS,
)
GATEWAY_IN_FLIGHT = Gauge("mesh_gateway_requests_in_flight", "Requests the gateway holds now.")
RATE_LIMITED = Counter("mesh_rate_limited_total", "Requests refused with 429.")
EVENTS_PUBLISHED = Counter("mesh_events_published_total", "Events published from this process.")
EVENTS_RETRIED = Counter(
    "mesh_events_retried_total", "Event deliveries that failed and will be retried.", ["agent_type"]
)
EVENTS_DEAD_LETTERED = Counter(
    "mesh_events_dead_lettered_total", "Events sent to the dead-letter subject.", ["agent_type"]
)
STATE_CONFLICTS = Counter(
    "mesh_state_conflicts_total", "State writes refused with 409.", ["agent_type"]
)
STATE_WRITE_RETRIES = Counter(
    "mesh_state_write_retries_total",
    "State writes tried again after JetStream did not acknowledge them.",
)


class HandledTally(Collector):
    """What the workers of this process handle, counted in plain numbers and read at
    scrape time: this runs for every message, and prometheus_client takes a lock for
    every count. Served as ``mesh_worker_requests_total``, ``mesh_handler_duration_seconds``,
    ``mesh_worker_requests_in_flight`` and ``mesh_events_delivered_total``."""

    def __init__(self) -> None:
        #: Requests and events handled, by (agent type, code).
        self.requests: dict[tuple[str, str], int] = {}
        #: Handler times by agent type: a count per bucket (the last one past them all),
        #: then their sum.
        self.durations: dict[str, list[float]] = {}
        #: Messages being handled now.
        self.in_flight = 0
        #: Events handled, by agent type.
        self.delivered: dict[str, int] = {}

    def handled(self, agent_type: str, code: str, seconds: float) -> None:
        key = (agent_type, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        counts = self.durations.get(agent_type)
        if counts is None:
            counts = self.durations[agent_type] = [0.0] * (len(_BUCKETS) + 2)
        counts[bisect_left(_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def event_delivered(self, agent_type: str) -> None:
        self.delivered[agent_type] = self.delivered.get(agent_type, 0) + 1

    def collect(self) -> Iterable[Metric]:
        # Read in another thread (the /metrics server's): copy before iterating.
        requests = CounterMetricFamily(
            "mesh_worker_requests_total",
            "Requests a worker handled, by outcome.",
            labels=["agent_type", "code"],
        )
        for (agent_type, code), count in sorted(list(self.requests.items())):
            requests.add_metric([agent_type, code], count)
        yield requests
        durations = HistogramMetricFamily(
            "mesh_handler_duration_seconds", "Worker handler time.", labels=["agent_type"]
        )
        for agent_type, tally in sorted(list(self.durations.items())):
            counts = list(tally)
            cumulative = list(accumulate(counts[:-1]))
            buckets = list(zip(_BUCKET_LABELS, cumulative, strict=False))
            buckets.append(("+Inf", cumulative[-1]))
            durations.add_metric([agent_type], buckets, sum_value=counts[-1])
        yield durations
        yield GaugeMetricFamily(
            "mesh_worker_requests_in_flight",
            "Requests a worker is handling now.",
            value=self.in_flight,
        )
        delivered = CounterMetricFamily(
            "mesh_events_delivered_total",
            "Events handled by a subscriber.",
            labels=["agent_type"],
        )
        for agent_type, count in sorted(list(self.delivered.items())):
            delivered.add_metric([agent_type], count)
        yield delivered


HANDLED = HandledTally()
REGISTRY.register(HANDLED)


def observe_handled(agent_type: str, code: str, seconds: float) -> None:
    HANDLED.handled(agent_type, code, seconds)


def observe_forwarded(agent_type: str, code: str, seconds: float) -> None:
    GATEWAY_REQUESTS.labels(agent_type, code).inc()
    GATEWAY_DURATION.labels(agent_type).observe(seconds)


class FigureCollector(Collector):
    """Gauges read at scrape time from a live object (a directory, a worker)."""

    def __init__(
        self, name: str, documentation: str, label: str, read: Callable[[], dict[str, float]]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=[self._label])
        for value_label, value in sorted(self._read().items()):
            family.add_metric([value_label], value)
        yield family


def register_figures(
    name: str, documentation: str, label: str, read: Callable[[], dict[str, float]]
) -> None:
    """Serve `read()`'s figures as gauge `name`, one sample per `label` value."""
    REGISTRY.register(FigureCollector(name, documentation, label, read))


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` over HTTP on `port` (a thread of its own)."""
    start_http_server(port, addr=host)
