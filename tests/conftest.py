"""Fixtures: a real nats-server for the session, a fresh mesh prefix per test.

Set MESH_NATS_URL to run the suite against a server of your own instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from mesh._connect import connect
from mesh._connection import Connection
from mesh.config import ConnectConfig, GatewayConfig, RegistryConfig, StateConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.handlers.state import StateService
from mesh.server import NatsServer
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess

REPO = Path(__file__).resolve().parent.parent
HEARTBEAT = 0.3


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    external = os.environ.get("MESH_NATS_URL")
    if external:
        yield external
        return
    with NatsServer() as server:
        yield server.url


@pytest.fixture
def subjects() -> Subjects:
    """A mesh of its own for each test: every subject and bucket is under this prefix."""
    return Subjects(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url, name="mesh-test")
    yield conn
    await conn.drain()


@pytest.fixture
async def mesh_nc(nats_url: str) -> AsyncIterator[Connection]:
    """A connection as mesh's processes open them (`mesh._connection.Connection`)."""
    conn = await connect(ConnectConfig(url=nats_url), name="mesh-test")
    assert isinstance(conn, Connection)
    yield conn
    await conn.close()


@pytest.fixture
async def registry(nc: NATS, subjects: Subjects) -> AsyncIterator[Registry]:
    async with Registry(nc, subjects, RegistryConfig()) as service:
        yield service


@pytest.fixture
async def state_service(nc: NATS, subjects: Subjects) -> AsyncIterator[StateService]:
    async with StateService(nc, subjects, StateConfig(history=8)) as service:
        yield service


@pytest.fixture
async def gateway(nc: NATS, subjects: Subjects, registry: Registry) -> AsyncIterator[Gateway]:
    config = GatewayConfig(default_timeout=10.0, max_payload=64 * 1024)
    async with Gateway(nc, subjects, config) as service:
        yield service


@pytest.fixture
def connect_config(nats_url: str) -> ConnectConfig:
    return ConnectConfig(url=nats_url)


@pytest.fixture
async def spawn_worker(nats_url: str, subjects: Subjects) -> AsyncIterator[type[WorkerProcess]]:
    """Start `mesh worker` processes for this test's mesh; all are stopped afterwards."""
    started: list[WorkerProcess] = []

    def spawn(
        *agents: str,
        worker_id: str,
        heartbeat_interval: float = HEARTBEAT,
        env: dict[str, str] | None = None,
        **kw: object,
    ):
        process = WorkerProcess(
            nats_url,
            agents,
            worker_id=worker_id,
            heartbeat_interval=heartbeat_interval,
            prefix=subjects.prefix,
            env={"PYTHONPATH": str(REPO), **(env or {})},
            **kw,  # type: ignore[arg-type]
        ).start()
        started.append(process)
        return process

    yield spawn  # type: ignore[misc]
    for process in started:
        process.terminate()
    for process in started:
        await process.aclose()
