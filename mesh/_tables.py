"""Readable tables for the CLI: workers, agent types, subscriptions, alerts, status."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from nats.aio.client import Client as NATS
from rich.console import Console
from rich.table import Table

from mesh._control import control_request
from mesh.alerts import Alert, Silence
from mesh.errors import MeshError
from mesh.handlers.monitor import AlertsReply, HealthReport
from mesh.handlers.router import ListReply, ListRequest, SubscriptionReport
from mesh.records import AgentTypeSummary, TypesReply, WorkerRecord, WorkersReply
from mesh.subjects import Subjects

TIMEOUT = 3.0
T = TypeVar("T")


async def fetch_workers(nc: NATS, subjects: Subjects) -> list[WorkerRecord]:
    reply = await control_request(
        nc, subjects.service("registry", "workers"), None, WorkersReply, timeout=TIMEOUT
    )
    return reply.workers if reply else []


async def fetch_types(nc: NATS, subjects: Subjects) -> list[AgentTypeSummary]:
    reply = await control_request(
        nc, subjects.service("registry", "types"), None, TypesReply, timeout=TIMEOUT
    )
    return reply.types if reply else []


def workers_table(workers: list[WorkerRecord]) -> Table:
    table = Table(title=f"{len(workers)} live workers", title_justify="left")
    for column in ("worker", "status", "agent types", "in flight", "agents", "cpu", "rss", "seen"):
        table.add_column(column)
    now = datetime.now(UTC)
    for w in workers:
        table.add_row(
            w.id,
            w.status,
            ", ".join(w.agent_types),
            f"{w.load.inflight}/{w.load.capacity}",
            str(w.load.activations),
            f"{w.load.cpu:.0%}",
            f"{w.load.rss / 2**20:.0f} MiB",
            f"{(now - w.last_heartbeat).total_seconds():.1f}s ago",
        )
    return table


def types_table(types: list[AgentTypeSummary]) -> Table:
    table = Table(title=f"{len(types)} agent types", title_justify="left")
    for column in ("agent type", "live workers", "registered", "handles", "stateless"):
        table.add_column(column)
    for t in types:
        table.add_row(
            t.name,
            ", ".join(t.live_workers) or "-",
            str(len(t.workers)),
            ", ".join(t.handlers),
            "yes" if t.stateless else "no",
        )
    return table


def print_workers(workers: list[WorkerRecord], console: Console | None = None) -> None:
    (console or Console()).print(workers_table(workers))


def print_types(types: list[AgentTypeSummary], console: Console | None = None) -> None:
    (console or Console()).print(types_table(types))


async def fetch_subscriptions(
    nc: NATS, subjects: Subjects, *, never_matched: bool = False
) -> list[SubscriptionReport]:
    reply = await control_request(
        nc,
        subjects.service("router", "subscriptions"),
        ListRequest(never_matched=never_matched),
        ListReply,
        timeout=TIMEOUT,
    )
    return reply.subscriptions if reply else []


def subscriptions_table(reports: list[SubscriptionReport]) -> Table:
    table = Table(title=f"{len(reports)} subscriptions", title_justify="left")
    for column in ("agent type", "kind", "topic", "matches", "handled", "avg", "expires"):
        table.add_column(column)
    for r in reports:
        sub = r.subscription
        avg = r.average_handling_time
        table.add_row(
            sub.agent_type,
            sub.kind,
            sub.topic,
            str(r.matches),
            str(r.successes),
            f"{avg * 1000:.1f} ms" if avg is not None else "-",
            sub.expires_at.isoformat(timespec="seconds") if sub.expires_at else "-",
        )
    return table


def print_subscriptions(reports: list[SubscriptionReport], console: Console | None = None) -> None:
    (console or Console()).print(subscriptions_table(reports))


def alerts_table(alerts: list[Alert], silences: list[Silence]) -> Table:
    active = [a for a in alerts if a.state != "resolved"]
    table = Table(title=f"{len(active)} alerts firing or silenced", title_justify="left")
    for column in ("alert", "severity", "state", "value", "threshold", "since", "anomaly"):
        table.add_column(column)
    for a in active:
        table.add_row(
            a.id,
            a.severity,
            a.state,
            f"{a.value:g}",
            f"{a.threshold:g}",
            a.fired_at.isoformat(timespec="seconds") if a.fired_at else "-",
            "yes" if a.anomaly else "no",
        )
    for s in silences:
        table.add_row(
            f"{s.rule} (silence)", "-", "silenced", "-", "-", f"until {s.until:%H:%M}", "-"
        )
    return table


def print_alerts(
    alerts: list[Alert], silences: list[Silence], console: Console | None = None
) -> None:
    (console or Console()).print(alerts_table(alerts, silences))


def health_table(report: HealthReport) -> Table:
    table = Table(title=f"mesh is {report.status}", title_justify="left")
    for column in ("component", "status", "detail"):
        table.add_column(column)
    for name, component in report.components.items():
        color = {"ok": "green", "degraded": "yellow", "down": "red"}[component.status]
        table.add_row(name, f"[{color}]{component.status}[/]", component.detail)
    return table


@dataclass
class Status:
    """What ``mesh status`` shows; parts that did not answer are None or empty."""

    health: HealthReport | None
    workers: list[WorkerRecord]
    types: list[AgentTypeSummary]
    alerts: AlertsReply | None


async def fetch_status(nc: NATS, subjects: Subjects) -> Status:
    async def optional(coro: Awaitable[T]) -> T | None:
        try:
            return await coro
        except MeshError:
            return None

    health, workers, types, alerts = await asyncio.gather(
        optional(
            control_request(
                nc, subjects.service("monitor", "health"), None, HealthReport, timeout=TIMEOUT
            )
        ),
        optional(fetch_workers(nc, subjects)),
        optional(fetch_types(nc, subjects)),
        optional(
            control_request(
                nc, subjects.service("monitor", "alerts"), None, AlertsReply, timeout=TIMEOUT
            )
        ),
    )
    return Status(health, workers or [], types or [], alerts)


def print_status(status: Status, *, clear: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    if clear:
        console.clear()
    if status.health is None:
        console.print("[red]no monitor answered: health unknown[/] (mesh serve monitor)")
    else:
        console.print(health_table(status.health))
    console.print(workers_table(status.workers))
    console.print(types_table(status.types))
    if status.alerts is not None:
        console.print(alerts_table(status.alerts.alerts, status.alerts.silences))
