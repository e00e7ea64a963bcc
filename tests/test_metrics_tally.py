"""The handled-message tally serves what prometheus_client's own metrics would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from mesh.metrics import _BUCKETS, HandledTally


def _samples(registry: CollectorRegistry) -> set[str]:
    """Exposition lines, without ``_created`` samples (the tally keeps none)."""
    return {
        line
        for line in generate_latest(registry).decode().splitlines()
        if line and "_created" not in line
    }


def test_the_tally_exposes_what_counters_and_a_histogram_would() -> None:
    expected = CollectorRegistry()
    requests = Counter(
        "mesh_worker_requests_total",
        "Requests a worker handled, by outcome.",
        ["agent_type", "code"],
        registry=expected,
    )
    durations = Histogram(
        "mesh_handler_duration_seconds",
        "Worker handler time.",
        ["agent_type"],
        buckets=_BUCKETS,
        registry=expected,
    )
    in_flight = Gauge(
        "mesh_worker_requests_in_flight", "Requests a worker is handling now.", registry=expected
    )
    delivered = Counter(
        "mesh_events_delivered_total",
        "Events handled by a subscriber.",
        ["agent_type"],
        registry=expected,
    )
    tally = HandledTally()
    served = CollectorRegistry()
    served.register(tally)

    rng = random.Random(3)
    # Bounds themselves included: a value equal to a bound counts in that bucket.
    values = [*_BUCKETS, 0.0, 45.0] + [rng.expovariate(200) for _ in range(500)]
    for n, seconds in enumerate(values):
        agent_type, code = ("echo", "200") if n % 3 else ("counter", "500" if n % 2 else "200")
        requests.labels(agent_type, code).inc()
        durations.labels(agent_type).observe(seconds)
        tally.handled(agent_type, code, seconds)
        if n % 5 == 0:
            delivered.labels(agent_type).inc()
            tally.event_delivered(agent_type)
    in_flight.set(4)
    tally.in_flight = 4

    assert _samples(served) == _samples(expected)
    assert 'mesh_handler_duration_seconds_bucket{agent_type="echo",le="+Inf"}' in "\n".join(
        _samples(served)
    )
