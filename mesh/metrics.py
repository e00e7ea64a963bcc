"""Prometheus metrics of a mesh process, and the ``/metrics`` endpoint that serves them.

Names follow Prometheus conventions: units in names, ``_total`` on counters, and labels
of bounded cardinality only (service, agent type, outcome code; never agent keys or
client ids). Any process may serve them (``--metrics-port``); figures a process does
not produce stay absent or zero there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

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
WORKER_REQUESTS = Counter(
    "mesh_worker_requests_total", "Requests a worker handled, by outcome.", ["agent_type", "code"]
)
HANDLER_DURATION = Histogram(
    "mesh_handler_duration_seconds", "Worker handler time.", ["agent_type"], buckets=_BUCKETS
)
WORKER_IN_FLIGHT = Gauge("mesh_worker_requests_in_flight", "Requests a worker is handling now.")
EVENTS_PUBLISHED = Counter("mesh_events_published_total", "Events published from this process.")
EVENTS_DELIVERED = Counter(
    "mesh_events_delivered_total", "Events handled by a subscriber.", ["agent_type"]
)
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


#: Labelled children by (agent type, code): looking them up again costs more than
#: counting, and this runs for every message a worker handles.
_handled: dict[tuple[str, str], tuple[Any, Any]] = {}


def observe_handled(agent_type: str, code: str, seconds: float) -> None:
    children = _handled.get((agent_type, code))
    if children is None:
        children = _handled[(agent_type, code)] = (
            WORKER_REQUESTS.labels(agent_type, code),
            HANDLER_DURATION.labels(agent_type),
        )
    children[0].inc()
    children[1].observe(seconds)


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
