"""The JSON records mesh keeps in KV and sends to its control plane.

These are what ``nats kv get mesh-workers <id>`` and ``nats kv get mesh-types
<type>.<worker>`` show; docs/protocol.md lists their fields.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

WorkerStatus = Literal["healthy", "draining"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class WorkerLoad(BaseModel):
    """What a worker reports about its load with each heartbeat."""

    inflight: int = 0
    capacity: int = 64
    activations: int = 0
    cpu: float = Field(0.0, description="process CPU use, 1.0 is one full core")
    rss: int = Field(0, description="resident memory in bytes")
    latency: float = Field(0.0, description="average handler time in seconds, recent")
    error_rate: float = Field(0.0, description="share of recent requests that failed")
    requests: int = Field(0, description="requests served since start")


class AgentTypeSpec(BaseModel):
    """One agent type as a worker hosts it."""

    name: str
    handlers: list[str] = Field(default_factory=list, description="message type names")
    stateless: bool = False
    strategy: str | None = Field(None, description="load-balancing strategy for new activations")
    description: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)


class PlacementRecord(BaseModel):
    """Where one agent is activated, kept in ``mesh-placement`` under ``<type>.<key>``."""

    worker_id: str
    activated_at: datetime


class WorkerRecord(BaseModel):
    """A worker, as kept in ``mesh-workers`` under its id."""

    id: str
    subject: str
    agent_types: list[str]
    started_at: datetime
    last_heartbeat: datetime = Field(default_factory=utcnow)
    heartbeat_interval: float
    load: WorkerLoad = Field(default_factory=lambda: WorkerLoad())
    status: WorkerStatus = "healthy"
    host: str = ""
    pid: int = 0
    version: str = ""


class TypeRecord(BaseModel):
    """One worker's registration of one agent type, kept in ``mesh-types``."""

    agent_type: str
    worker_id: str
    capabilities: AgentTypeSpec
    metadata: dict[str, str] = Field(default_factory=dict)
    registered_at: datetime = Field(default_factory=utcnow)
    refreshed_at: datetime = Field(
        default_factory=utcnow, description="last rewrite; the entry lapses a retention after"
    )


class RegisterRequest(BaseModel):
    """Body of ``mesh.registry.register``."""

    worker: WorkerRecord
    types: list[AgentTypeSpec]


class HeartbeatRequest(BaseModel):
    """Body of ``mesh.registry.heartbeat``: the whole record and the revision it replaces."""

    worker: WorkerRecord
    revision: int


class RegistrationReply(BaseModel):
    """Reply to register and heartbeat: the worker entry's new revision."""

    revision: int
    ttl: float


class DeactivateRequest(BaseModel):
    """Body of ``mesh.worker.<id>.ctl.deactivate``: the agent to drop from memory."""

    type: str
    key: str


class DeactivateReply(BaseModel):
    deactivated: bool


class DeregisterRequest(BaseModel):
    worker_id: str
    agent_types: list[str] = Field(
        default_factory=list, description="types to forget, besides those the registry knows"
    )


class LookupRequest(BaseModel):
    agent_type: str


class LookupReply(BaseModel):
    agent_type: str
    workers: list[WorkerRecord]


class WorkersReply(BaseModel):
    workers: list[WorkerRecord]


class AgentTypeSummary(BaseModel):
    name: str
    workers: list[str]
    live_workers: list[str]
    handlers: list[str]
    stateless: bool


class TypesReply(BaseModel):
    types: list[AgentTypeSummary]
