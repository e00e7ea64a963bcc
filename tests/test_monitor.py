"""The monitor: health, and alerts that fire, resolve, dedupe, stay silent, and are
raised once by several replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh._control import control_request
from mesh.alerts import Alert
from mesh.config import MonitorConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.monitor import HealthReport, Monitor, SilenceRequest
from mesh.handlers.router import Router
from mesh.handlers.state import StateService
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.helpers import assert_error

RULES = [
    {"name": "no_live_workers", "figure": "live_workers", "op": "<", "threshold": 1,
     "for": 0.3, "severity": "critical"},
]  # fmt: skip


@pytest.fixture
def config(tmp_path: Path) -> MonitorConfig:
    rules = tmp_path / "rules.json"
    rules.write_bytes(orjson.dumps(RULES))
    return MonitorConfig(interval=0.1, rules_file=str(rules), dedupe_window=60, escalation={})


@pytest.fixture
async def mesh_services(
    nc: NATS, subjects: Subjects, gateway: Gateway, state_service: StateService
) -> AsyncIterator[None]:
    async with Router(nc, subjects):
        yield


@pytest.fixture
async def events(nc: NATS, subjects: Subjects) -> AsyncIterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def note(msg: Msg) -> None:
        seen.append({**orjson.loads(msg.data), "subject": msg.subject})

    sub = await nc.subscribe(f"{subjects.prefix}.alerts.>", cb=note)
    yield seen
    await sub.unsubscribe()


async def _health(nc: NATS, subjects: Subjects) -> HealthReport:
    report = await control_request(
        nc, subjects.service("monitor", "health"), None, HealthReport, timeout=5
    )
    assert report is not None
    return report


def _events(seen: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in seen if e["event"] == event and e["id"] == "no_live_workers.echo"]


async def test_a_killed_worker_degrades_health_and_raises_one_alert_that_resolves(
    nc: NATS,
    subjects: Subjects,
    mesh_services: None,
    spawn_worker: type,
    config: MonitorConfig,
    events: list[dict[str, Any]],
) -> None:
    async with Monitor(nc, subjects, config) as monitor, Monitor(nc, subjects, config):
        first = spawn_worker("workers.echo:Echo", worker_id="first")
        await eventually(lambda: monitor.directory.live_workers("echo"), timeout=15)

        async def healthy() -> bool:
            return (await _health(nc, subjects)).status == "ok"

        await eventually(healthy, timeout=15)
        first.kill()

        async def degraded() -> HealthReport | None:
            report = await _health(nc, subjects)
            return report if report.status == "degraded" else None

        report = await eventually(degraded, timeout=10)
        assert "no live worker for echo" in report.components["workers"].detail
        await eventually(lambda: _events(events, "firing"), timeout=10)
        fired = _events(events, "firing")[0]
        assert fired["subject"] == f"{subjects.prefix}.alerts.critical.no_live_workers"
        assert (fired["severity"], fired["value"], fired["state"]) == ("critical", 0.0, "firing")

        spawn_worker("workers.echo:Echo", worker_id="second")
        await eventually(lambda: _events(events, "resolved"), timeout=15)
        await eventually(healthy, timeout=10)

        # Flapping: the same alert again at once, same value: held back as a duplicate.
        kv = await nc.jetstream().key_value(subjects.bucket("alerts"))
        await _drain(nc, subjects, "second")

        async def suppressed() -> bool:
            entry = await kv.get("no_live_workers.echo")
            return (
                entry.value is not None and Alert.model_validate_json(entry.value).suppressed == 1
            )

        await eventually(suppressed, timeout=15)
        await asyncio.sleep(0.5)  # several more evaluations by both replicas
        assert len(_events(events, "firing")) == 1  # two replicas, a repeat: one notice
        assert len(_events(events, "resolved")) == 1


async def _drain(nc: NATS, subjects: Subjects, worker_id: str) -> None:
    """Ask a worker to drain and leave (its agent type is then without workers)."""
    await nc.request(subjects.worker_ctl(worker_id, "drain"), b"", timeout=5)


async def test_a_silenced_rule_records_but_does_not_publish(
    nc: NATS,
    subjects: Subjects,
    mesh_services: None,
    spawn_worker: type,
    config: MonitorConfig,
    events: list[dict[str, Any]],
) -> None:
    async with Monitor(nc, subjects, config):
        await control_request(
            nc,
            subjects.service("monitor", "silence"),
            SilenceRequest(rule="no_live_workers", seconds=60, reason="maintenance"),
            None,
            timeout=5,
        )
        worker = spawn_worker("workers.echo:Echo", worker_id="quiet")
        kv = await nc.jetstream().key_value(subjects.bucket("alerts"))
        await eventually(lambda: _registered(nc, subjects), timeout=15, message="echo registered")
        worker.kill()

        async def silenced() -> bool:
            try:
                entry = await kv.get("no_live_workers.echo")
            except Exception:
                return False
            return (
                entry.value is not None
                and Alert.model_validate_json(entry.value).state == "silenced"
            )

        await eventually(silenced, timeout=15)
        await asyncio.sleep(0.5)
        assert events == []
        reply = await nc.request(
            subjects.service("monitor", "silence"), b'{"rule": "x"}', timeout=5
        )
        assert_error(reply, 400, "InvalidPayload")


async def _registered(nc: NATS, subjects: Subjects) -> bool:
    from tests.helpers import live_worker_ids

    return bool(await live_worker_ids(nc, subjects, "echo"))


async def test_an_alert_that_stays_firing_is_escalated(
    nc: NATS,
    subjects: Subjects,
    mesh_services: None,
    spawn_worker: type,
    config: MonitorConfig,
    events: list[dict[str, Any]],
) -> None:
    from dataclasses import replace

    async with Monitor(nc, subjects, replace(config, escalation={"critical": 0.5})) as monitor:
        worker = spawn_worker("workers.echo:Echo", worker_id="short-lived")
        await eventually(lambda: monitor.directory.live_workers("echo"), timeout=15)
        worker.kill()
        await eventually(lambda: _events(events, "escalated"), timeout=15)
        escalated = _events(events, "escalated")[0]
        assert escalated["escalations"] == 1 and len(_events(events, "firing")) == 1


def test_anomalies_and_similar_values() -> None:
    from mesh.alerts import RollingZ, load_rules, similar

    scores = RollingZ()
    assert [scores.add(v) for v in (10, 11, 9, 10, 11)] == [None] * 5  # too few to judge
    steady = scores.add(10.5)
    assert steady is not None and abs(steady) < 1
    spike = scores.add(100)
    assert spike is not None and spike > 3
    assert similar(100, 109) and not similar(100, 120) and similar(0, 0)
    with pytest.raises(ValueError, match="unique"):
        load_rules(orjson.dumps([RULES[0], RULES[0]]).decode())
    with pytest.raises(ValueError):
        load_rules('[{"name": "_x", "figure": "cpu", "op": ">", "threshold": 1}]')


async def test_a_wedged_service_replica_turns_health_degraded(
    nats_url: str,
    nc: NATS,
    subjects: Subjects,
    mesh_services: None,
    config: MonitorConfig,
) -> None:
    import os
    import signal
    import sys

    from tests.conftest import REPO

    async with Monitor(nc, subjects, config) as monitor:
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "--nats", nats_url, "--prefix", subjects.prefix,
            "serve", "registry", env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        try:

            async def two_registries() -> bool:
                report = await monitor.health()
                return report.components["registry"].detail.startswith("2 instance")

            await eventually(two_registries, timeout=15)
            second.send_signal(signal.SIGSTOP)  # its event loop stops: it answers nothing

            async def degraded() -> HealthReport | None:
                report = await monitor.health()
                return report if report.components["registry"].status == "degraded" else None

            report = await eventually(degraded, timeout=15)
            assert "1 stopped answering" in report.components["registry"].detail
            assert report.status == "degraded"
        finally:
            second.send_signal(signal.SIGCONT)
            second.terminate()
            await second.wait()
