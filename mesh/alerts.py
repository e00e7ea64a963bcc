"""Alert rules and alert records: what the monitor evaluates and what it keeps in KV.

A rule names a figure of the mesh, a comparison and a threshold, how long the
condition must hold before the alert fires, and a severity::

    {"name": "no_live_workers", "figure": "live_workers", "op": "<", "threshold": 1,
     "for": 2, "severity": "critical"}

Figures, each per subject: ``live_workers`` (per agent type), ``error_rate``,
``latency`` (seconds), ``cpu`` (cores) and ``inflight_share`` (per worker, from
heartbeats), and ``health`` (the mesh: 0 ok, 1 degraded, 2 down).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter

from mesh.records import utcnow

Figure = Literal["live_workers", "error_rate", "latency", "cpu", "inflight_share", "health"]
Severity = Literal["critical", "warning", "info"]
AlertState = Literal["firing", "resolved", "silenced"]

#: An alert whose value is this many standard deviations from its recent values is an anomaly.
ANOMALY_Z = 3.0
#: Samples of a figure kept for the anomaly judgement.
WINDOW = 60


class AlertRule(BaseModel):
    """One rule of the monitor's rule file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    figure: Figure
    op: Literal["<", "<=", ">", ">="]
    threshold: float
    for_seconds: float = Field(0.0, ge=0, alias="for", description="how long it must hold")
    severity: Severity = "warning"
    description: str = ""

    model_config = {"populate_by_name": True}

    def breached(self, value: float) -> bool:
        if self.op == "<":
            return value < self.threshold
        if self.op == "<=":
            return value <= self.threshold
        if self.op == ">":
            return value > self.threshold
        return value >= self.threshold


RULES = TypeAdapter(list[AlertRule])


def load_rules(text: str) -> list[AlertRule]:
    """Rules from a JSON list; names must be unique."""
    rules = RULES.validate_json(text)
    names = [r.name for r in rules]
    if len(names) != len(set(names)):
        raise ValueError("alert rule names must be unique")
    return rules


class Alert(BaseModel):
    """An alert as ``nats kv get mesh-alerts <rule>.<subject>`` shows it."""

    id: str
    rule: str
    subject: str = Field(description="what it is about: an agent type, a worker, 'mesh'")
    severity: Severity
    state: AlertState
    value: float
    threshold: float
    description: str = ""
    anomaly: bool = Field(False, description="the value is far outside its recent values")
    zscore: float | None = None
    fired_at: datetime | None = None
    notified_at: datetime | None = None
    resolved_at: datetime | None = None
    escalations: int = 0
    suppressed: int = Field(0, description="repeats held back as duplicates")
    updated_at: datetime = Field(default_factory=utcnow)


class Silence(BaseModel):
    """Holds a rule's alerts back until `until`."""

    rule: str
    until: datetime
    reason: str = ""


class RollingZ:
    """A figure's recent values, to tell an anomaly from an ordinary breach."""

    def __init__(self, size: int = WINDOW) -> None:
        self._values: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> float | None:
        """Record `value`; its z-score against the values before it (None: too few)."""
        score = None
        if len(self._values) >= 5:
            mean = statistics.fmean(self._values)
            spread = statistics.pstdev(self._values)
            if spread > 0:
                score = (value - mean) / spread
            elif value != mean:
                score = math.inf if value > mean else -math.inf
        self._values.append(value)
        return score


def similar(a: float, b: float, tolerance: float = 0.1) -> bool:
    """Whether two values are within `tolerance` (relative) of each other."""
    if a == b:
        return True
    return abs(a - b) <= tolerance * max(abs(a), abs(b))
