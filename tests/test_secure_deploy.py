"""deploy/nats-secure.conf: clients reach agents through the gateway and nowhere else."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

from mesh import AgentId, MeshClient, TopicId
from mesh._streams import ensure_event_streams
from mesh.clients import ClientRegistry
from mesh.config import AuthConfig
from mesh.handlers.gateway import Gateway
from mesh.handlers.registry import Registry
from mesh.handlers.state import StateService
from mesh.server import NatsServer, find_nats_server
from mesh.subjects import Subjects
from mesh.testing import WorkerProcess, eventually
from tests.conftest import REPO

CONFIG = REPO / "deploy" / "nats-secure.conf"
PASSWORDS = {
    "MESH_SERVICE_PASSWORD": "service-pw-0123456789",
    "MESH_WORKER_PASSWORD": "worker-pw-0123456789",
    "MESH_CLIENT_PASSWORD": "client-pw-0123456789",
}


@pytest.fixture
def secure_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    with NatsServer(
        config_file=CONFIG, store_dir=tmp_path, extra_args=["-p", "-1", "-m", "-1"]
    ) as server:
        yield server


def test_the_secure_config_passes_the_servers_own_check(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    result = subprocess.run(
        [find_nats_server(), "-c", str(CONFIG), "-t"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr + result.stdout


async def _as(url: str, user: str, errors: list[Exception] | None = None) -> NATS:
    async def record(exc: Exception) -> None:
        if errors is not None:
            errors.append(exc)

    password = PASSWORDS[f"MESH_{user.removeprefix('mesh-').upper()}_PASSWORD"]
    return await nats.connect(url, user=user, password=password, error_cb=record)


@pytest.fixture
async def mesh_on_secure_nats(secure_server: NatsServer) -> AsyncIterator[tuple[str, str]]:
    """Services as mesh-service, a worker as mesh-worker; yields (url, client API key)."""
    subjects = Subjects()
    services = await _as(secure_server.url, "mesh-service")
    await ensure_event_streams(services.jetstream(), subjects, retention=60)
    auth = AuthConfig(enabled=True)
    async with (
        Registry(services, subjects),
        StateService(services, subjects),
        Gateway(services, subjects, auth=auth) as gateway,
    ):
        key = await ClientRegistry(services.jetstream(), subjects).add("shop")
        worker = WorkerProcess(
            secure_server.url,
            ["workers.counter:Counter", "workers.echo:Echo"],
            worker_id="secure-w",
            heartbeat_interval=0.3,
            env={
                "PYTHONPATH": str(REPO),
                "MESH_NATS_USER": "mesh-worker",
                "MESH_NATS_PASSWORD": PASSWORDS["MESH_WORKER_PASSWORD"],
            },
        ).start()
        try:
            await eventually(lambda: gateway.directory.live_workers("counter"), timeout=20)
            yield secure_server.url, key
        finally:
            await worker.aclose()
    await services.close()


async def test_a_client_calls_through_the_gateway_and_cannot_go_around_it(
    mesh_on_secure_nats: tuple[str, str],
) -> None:
    url, key = mesh_on_secure_nats
    errors: list[Exception] = []
    nc = await _as(url, "mesh-client", errors)
    try:
        client = MeshClient(nc, authorization=f"ApiKey {key}")
        counter = AgentId("counter", "secure")
        reply = await eventually(
            lambda: client.call(counter, {"by": 2}, message_type="Increment"), timeout=10
        )
        assert reply["value"] == 2  # the worker saved it in mesh-state: its KV rights work
        ack = await client.publish(TopicId("orders.created", "s"), {"n": 1})
        assert ack.seq >= 1

        def violations() -> list[str]:
            # nats-py reports the server's -ERR in lower case.
            return [str(e).lower() for e in errors if "permissions violation" in str(e).lower()]

        # Around the gateway, straight to the worker:
        worker_subject = Subjects().worker_rpc("secure-w", counter)
        await nc.publish(worker_subject, b'{"by": 100}', headers={"Mesh-Msg-Type": "Increment"})
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(worker_subject, b'{"by": 100}', timeout=1)
        await eventually(lambda: any(worker_subject in v for v in violations()), timeout=5)
        # Reading agent state or the clients' keys from KV:
        with pytest.raises(Exception):  # noqa: B017 - a permissions error or its timeout
            kv = await nc.jetstream(timeout=1).key_value("mesh-state")
            await kv.get("counter.secure")
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(
                "$JS.API.DIRECT.GET.KV_mesh-state",
                b'{"last_by_subj": "$KV.mesh-state.counter.secure"}',
                timeout=1,
            )
        await eventually(lambda: any("$js.api" in v for v in violations()), timeout=5)
        # The control plane:
        await nc.publish("mesh.registry.deregister", b'{"worker_id": "secure-w"}')
        await eventually(lambda: any("mesh.registry" in v for v in violations()), timeout=5)
        # Listening in on workers traffic:
        await nc.subscribe("mesh.worker.>")
        await eventually(
            lambda: any("subscription" in v and "mesh.worker" in v for v in violations()),
            timeout=5,
        )
        # Nothing of that got through: the count is as the gateway left it.
        reply = await client.call(counter, {}, message_type="GetCount")
        assert reply["value"] == 2
    finally:
        await nc.close()


def test_the_production_settings_turn_auth_on() -> None:
    from mesh.config import AuthConfig

    env = {}
    for line in (REPO / "deploy" / "mesh-production.env").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            env[name.strip()] = value.strip()
    config = AuthConfig.from_env(env)
    assert config.enabled and config.default_rate == 100 and config.default_burst == 200
