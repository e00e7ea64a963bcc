"""Choosing the worker that takes a request.

Until placement lands, an agent with identity sticks to one worker by rendezvous
(highest random weight) hashing over the live workers of its type: every gateway
picks the same worker for the same id without talking to the others, and when a
worker leaves only its own agents move. Stateless agent types go round robin.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Protocol

from mesh.ids import AgentId
from mesh.records import WorkerRecord


class Balancer(Protocol):
    """Picks one of `candidates` (never empty) for a request to `agent_id`."""

    def choose(self, agent_id: AgentId, candidates: Sequence[WorkerRecord]) -> WorkerRecord: ...


def _weight(agent_id: AgentId, worker_id: str) -> int:
    digest = hashlib.blake2b(
        f"{agent_id.type}\x00{agent_id.key}\x00{worker_id}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


class RendezvousBalancer:
    """The same worker for the same agent id, as long as that worker is a candidate."""

    def choose(self, agent_id: AgentId, candidates: Sequence[WorkerRecord]) -> WorkerRecord:
        return max(candidates, key=lambda record: (_weight(agent_id, record.id), record.id))


class RoundRobinBalancer:
    """Each candidate in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, agent_id: AgentId, candidates: Sequence[WorkerRecord]) -> WorkerRecord:
        return candidates[next(self._counter) % len(candidates)]
