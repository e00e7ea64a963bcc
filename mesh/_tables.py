"""Readable tables of workers and agent types, for ``mesh workers`` / ``mesh agents``."""

from __future__ import annotations

from datetime import UTC, datetime

from nats.aio.client import Client as NATS
from rich.console import Console
from rich.table import Table

from mesh._control import control_request
from mesh.handlers.router import ListReply, ListRequest, SubscriptionReport
from mesh.records import AgentTypeSummary, TypesReply, WorkerRecord, WorkersReply
from mesh.subjects import Subjects

TIMEOUT = 3.0


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
