"""Load-balancing strategies: which worker takes a new activation.

Each strategy picks among `Candidate` workers, whose figures combine the worker's
last heartbeat (CPU, memory, capacity, its own view of in-flight work, latency and
errors) with what this gateway measured itself (requests it has in flight there,
response times, failures). `choose` applies the health rule first: healthy workers
only; workers of unknown health only when no healthy one is left; never an
unhealthy one.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from mesh.errors import BadRequestError
from mesh.records import WorkerRecord

#: Weight of the newest sample in the gateway's running averages.
EWMA_WEIGHT: Final = 0.2
#: The adaptive score's weights, from mesh's design: response time, CPU, load, errors.
ADAPTIVE_WEIGHTS: Final = (0.4, 0.3, 0.2, 0.1)


class Health(Enum):
    HEALTHY = "healthy"
    UNKNOWN = "unknown"
    UNHEALTHY = "unhealthy"


@dataclass(slots=True)
class WorkerStats:
    """What one gateway has seen of one worker."""

    inflight: int = 0
    latency: float | None = None
    error_rate: float = 0.0
    consecutive_failures: int = 0
    unhealthy_until: float = 0.0

    def record_reply(self, seconds: float) -> None:
        self.latency = (
            seconds
            if self.latency is None
            else (self.latency + EWMA_WEIGHT * (seconds - self.latency))
        )
        self.error_rate -= EWMA_WEIGHT * self.error_rate
        self.consecutive_failures = 0

    def record_failure(self) -> None:
        self.error_rate += EWMA_WEIGHT * (1.0 - self.error_rate)
        self.consecutive_failures += 1


@dataclass(slots=True)
class Candidate:
    """A live worker of the agent type, with everything a strategy may weigh."""

    record: WorkerRecord
    stats: WorkerStats = field(default_factory=WorkerStats)
    health: Health = Health.HEALTHY

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def inflight(self) -> int:
        """Requests at the worker: its own count, or ours if fresher and higher."""
        return max(self.stats.inflight, self.record.load.inflight)

    @property
    def capacity(self) -> int:
        return max(1, self.record.load.capacity)

    @property
    def at_capacity(self) -> bool:
        return self.inflight >= self.capacity

    @property
    def response_time(self) -> float:
        """Seconds per request: measured here when we have samples, else reported."""
        return self.stats.latency if self.stats.latency is not None else self.record.load.latency

    @property
    def error_rate(self) -> float:
        return max(self.stats.error_rate, self.record.load.error_rate)

    @property
    def cpu(self) -> float:
        return min(1.0, max(0.0, self.record.load.cpu))


Strategy = Callable[[Sequence[Candidate]], Candidate]


def least_connections(candidates: Sequence[Candidate]) -> Candidate:
    """Fewest requests in flight relative to capacity; ties go to the lower id."""
    return min(candidates, key=lambda c: (c.inflight / c.capacity, c.inflight, c.id))


def weighted_response_time(
    candidates: Sequence[Candidate], rng: random.Random | None = None
) -> Candidate:
    """Weighted random: weight ``(slowest - rt) / slowest + 0.1``, faster weighs more."""
    slowest = max(c.response_time for c in candidates)
    if slowest <= 0:
        weights = [1.0] * len(candidates)
    else:
        weights = [(slowest - c.response_time) / slowest + 0.1 for c in candidates]
    return (rng or random).choices(list(candidates), weights=weights, k=1)[0]


def by_load(candidates: Sequence[Candidate]) -> Candidate:
    """Lowest CPU share plus memory relative to the largest candidate's, equally weighted,
    as heartbeats report them."""
    largest = max(c.record.load.rss for c in candidates) or 1
    return min(candidates, key=lambda c: (c.cpu + c.record.load.rss / largest, c.id))


def adaptive_score(candidate: Candidate, slowest: float) -> float:
    """Lower is better: 40% response time (relative to the slowest candidate), 30% CPU,
    20% in-flight share of capacity, 10% error rate."""
    w_time, w_cpu, w_load, w_errors = ADAPTIVE_WEIGHTS
    relative_time = candidate.response_time / slowest if slowest > 0 else 0.0
    load = min(1.0, candidate.inflight / candidate.capacity)
    return (
        w_time * relative_time
        + w_cpu * candidate.cpu
        + w_load * load
        + w_errors * min(1.0, candidate.error_rate)
    )


def adaptive(candidates: Sequence[Candidate]) -> Candidate:
    """The lowest `adaptive_score`; ties go to fewer in flight, then the lower id."""
    slowest = max(c.response_time for c in candidates)
    return min(candidates, key=lambda c: (adaptive_score(c, slowest), c.inflight, c.id))


class RoundRobin:
    """Each candidate in turn (by id, so that the order survives membership changes)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def __call__(self, candidates: Sequence[Candidate]) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.id)
        return ordered[next(self._counter) % len(ordered)]


STRATEGIES: Final = (
    "adaptive",
    "least_connections",
    "load",
    "round_robin",
    "weighted_response_time",
)
DEFAULT_STRATEGY: Final = "adaptive"


def make_strategy(name: str) -> Strategy:
    """A fresh strategy by name.

    Raises:
        BadRequestError: Not one of `STRATEGIES`.
    """
    if name == "round_robin":
        return RoundRobin()
    found: dict[str, Strategy] = {
        "adaptive": adaptive,
        "least_connections": least_connections,
        "load": by_load,
        "weighted_response_time": weighted_response_time,
    }
    if name not in found:
        raise BadRequestError(
            f"unknown load-balancing strategy {name!r}; choose from {', '.join(STRATEGIES)}"
        )
    return found[name]


def choose(strategy: Strategy, candidates: Sequence[Candidate]) -> Candidate | None:
    """Apply the health rule, then `strategy`; ``None`` when nobody may be chosen."""
    healthy = [c for c in candidates if c.health is Health.HEALTHY]
    pool = healthy or [c for c in candidates if c.health is Health.UNKNOWN]
    return strategy(pool) if pool else None
