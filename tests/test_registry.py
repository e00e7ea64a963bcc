"""The registry: records readable with plain KV calls, replicas, fencing, bad input."""

from __future__ import annotations

from datetime import UTC, datetime

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from mesh import AgentTypeNotFoundError, BadRequestError, WorkerNotRegisteredError
from mesh._control import control_request
from mesh.handlers.registry import Registry
from mesh.records import (
    AgentTypeSpec,
    DeregisterRequest,
    HeartbeatRequest,
    RegisterRequest,
    RegistrationReply,
    TypesReply,
    WorkerRecord,
    WorkersReply,
)
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.conftest import HEARTBEAT
from tests.helpers import assert_error, live_worker_ids


def _record(worker_id: str, subjects: Subjects, *types: str) -> WorkerRecord:
    return WorkerRecord(
        id=worker_id,
        subject=subjects.worker(worker_id),
        agent_types=list(types),
        started_at=datetime.now(UTC),
        heartbeat_interval=HEARTBEAT,
    )


async def _register(nc: NATS, subjects: Subjects, record: WorkerRecord) -> int:
    reply = await control_request(
        nc,
        subjects.service("registry", "register"),
        RegisterRequest(
            worker=record,
            types=[AgentTypeSpec(name=t, handlers=["Ping"]) for t in record.agent_types],
        ),
        RegistrationReply,
        timeout=2,
    )
    assert reply is not None
    return reply.revision


async def test_worker_and_type_records_are_plain_json_in_kv(
    nc: NATS, subjects: Subjects, registry: Registry, spawn_worker: type
) -> None:
    spawn_worker("workers.echo:Echo", "workers.counter:Counter", worker_id="readable")
    await eventually(lambda: live_worker_ids(nc, subjects, "echo"), timeout=15)
    js = nc.jetstream()

    workers = await js.key_value(subjects.workers_bucket)
    worker = orjson.loads((await workers.get("readable")).value)
    assert {
        "id",
        "subject",
        "agent_types",
        "started_at",
        "last_heartbeat",
        "load",
        "status",
    } <= set(worker)
    assert worker["id"] == "readable"
    assert worker["subject"] == f"{subjects.prefix}.worker.readable"
    assert worker["agent_types"] == ["counter", "echo"]
    assert worker["status"] == "healthy"
    assert {"inflight", "cpu", "rss", "latency", "error_rate"} <= set(worker["load"])
    assert worker["load"]["rss"] > 0
    datetime.fromisoformat(worker["last_heartbeat"])

    types = await js.key_value(subjects.types_bucket)
    registration = orjson.loads((await types.get("counter.readable")).value)
    assert {"capabilities", "metadata", "registered_at"} <= set(registration)
    assert registration["capabilities"]["handlers"] == ["GetCount", "Increment"]
    assert registration["capabilities"]["stateless"] is False
    echo = orjson.loads((await types.get("echo.readable")).value)
    assert echo["capabilities"]["stateless"] is True


async def test_agent_type_with_dots_is_escaped_in_type_keys(
    nc: NATS, subjects: Subjects, registry: Registry
) -> None:
    await _register(nc, subjects, _record("dotted", subjects, "billing.v2"))
    types = await nc.jetstream().key_value(subjects.types_bucket)
    entry = await types.get("billing=2Ev2.dotted")
    assert orjson.loads(entry.value)["agent_type"] == "billing.v2"
    assert await live_worker_ids(nc, subjects, "billing.v2") == {"dotted"}


async def test_two_registry_replicas_share_state_through_kv_only(
    nats_url: str, subjects: Subjects
) -> None:
    first_nc = await nats.connect(nats_url, name="registry-1")
    second_nc = await nats.connect(nats_url, name="registry-2")
    caller = await nats.connect(nats_url, name="caller")
    first = Registry(first_nc, subjects)
    second = Registry(second_nc, subjects)
    try:
        await first.start()
        await second.start()
        revision = await _register(caller, subjects, _record("w1", subjects, "echo"))
        await eventually(lambda: first.directory.live_workers("echo"), timeout=5)
        await eventually(lambda: second.directory.live_workers("echo"), timeout=5)

        # Heartbeats land on either replica (the queue group picks); each replica
        # continues from the revision the other one wrote.
        def heartbeats_served(replica: Registry) -> int:
            [endpoint] = [e for e in replica._service.stats().endpoints if e.name == "heartbeat"]
            return endpoint.num_requests

        for _ in range(200):
            reply = await control_request(
                caller,
                subjects.service("registry", "heartbeat"),
                HeartbeatRequest(worker=_record("w1", subjects, "echo"), revision=revision),
                RegistrationReply,
                timeout=2,
            )
            assert reply is not None and reply.revision > revision
            revision = reply.revision
            if heartbeats_served(first) and heartbeats_served(second):
                break
        assert heartbeats_served(first) > 0 and heartbeats_served(second) > 0

        await first.shutdown()
        assert await live_worker_ids(caller, subjects, "echo") == {"w1"}
    finally:
        await first.shutdown()
        await second.shutdown()
        for conn in (first_nc, second_nc, caller):
            await conn.drain()


async def test_worker_without_heartbeats_lapses_from_lookups_and_kv(
    nc: NATS, subjects: Subjects, registry: Registry
) -> None:
    await _register(nc, subjects, _record("silent", subjects, "echo"))
    assert await live_worker_ids(nc, subjects, "echo") == {"silent"}

    async def gone_from_lookups() -> bool:
        return await live_worker_ids(nc, subjects, "echo") == set()

    await eventually(gone_from_lookups, timeout=3 * HEARTBEAT + 0.5, interval=0.02)
    workers = await nc.jetstream().key_value(subjects.workers_bucket)

    async def entry_lapsed() -> bool:
        try:
            entry = await workers.get("silent")
        except KeyNotFoundError:
            return True
        return entry.value is None

    # The KV entry's TTL is whole seconds, so it lapses a little after lookups drop it.
    await eventually(entry_lapsed, timeout=5)
    # Its type registration stays, so callers get 503 (known, no worker), not 404.
    listed = await control_request(
        nc, subjects.service("registry", "types"), None, TypesReply, timeout=2
    )
    assert listed is not None
    assert [(t.name, t.workers, t.live_workers) for t in listed.types] == [("echo", ["silent"], [])]


async def test_heartbeat_after_deregistration_is_refused_with_404(
    nc: NATS, subjects: Subjects, registry: Registry
) -> None:
    revision = await _register(nc, subjects, _record("fenced", subjects, "echo"))
    await control_request(
        nc,
        subjects.service("registry", "deregister"),
        DeregisterRequest(worker_id="fenced"),
        None,
        timeout=2,
    )
    with pytest.raises(WorkerNotRegisteredError):
        await control_request(
            nc,
            subjects.service("registry", "heartbeat"),
            HeartbeatRequest(worker=_record("fenced", subjects, "echo"), revision=revision),
            RegistrationReply,
            timeout=2,
        )
    workers = await nc.jetstream().key_value(subjects.workers_bucket)
    with pytest.raises(KeyNotFoundError):
        await workers.get("fenced")
    with pytest.raises(AgentTypeNotFoundError):
        await live_worker_ids(nc, subjects, "echo")


async def test_workers_endpoint_lists_live_workers(
    nc: NATS, subjects: Subjects, registry: Registry
) -> None:
    await _register(nc, subjects, _record("listed", subjects, "echo", "counter"))
    reply = await control_request(
        nc, subjects.service("registry", "workers"), None, WorkersReply, timeout=2
    )
    assert reply is not None
    assert [(w.id, w.agent_types) for w in reply.workers] == [("listed", ["echo", "counter"])]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"worker": {"id": "x"}}',
        orjson.dumps({"agent_type": "a"}),
    ],
)
async def test_malformed_registration_gets_400(
    nc: NATS, subjects: Subjects, registry: Registry, body: bytes
) -> None:
    reply = await nc.request(subjects.service("registry", "register"), body, timeout=2)
    assert_error(reply, 400, "InvalidPayload")


@pytest.mark.parametrize(
    ("worker_id", "agent_type"), [("bad.id", "echo"), ("ok", "bad/type"), ("ok", "")]
)
async def test_registration_with_invalid_ids_gets_400(
    nc: NATS, subjects: Subjects, registry: Registry, worker_id: str, agent_type: str
) -> None:
    record = WorkerRecord(
        id=worker_id,
        subject="x",
        agent_types=[agent_type],
        started_at=datetime.now(UTC),
        heartbeat_interval=1.0,
    )
    body = RegisterRequest(worker=record, types=[AgentTypeSpec(name=agent_type)])
    reply = await nc.request(
        subjects.service("registry", "register"), body.model_dump_json().encode(), timeout=2
    )
    assert_error(reply, 400, "InvalidId")
    with pytest.raises(BadRequestError):
        await control_request(
            nc, subjects.service("registry", "register"), body, RegistrationReply, timeout=2
        )
    workers = await nc.jetstream().key_value(subjects.workers_bucket)
    with pytest.raises(KeyNotFoundError):
        await workers.get(worker_id)


async def test_lookup_of_unknown_type_gets_404_and_of_bad_type_400(
    nc: NATS, subjects: Subjects, registry: Registry
) -> None:
    reply = await nc.request(
        subjects.service("registry", "lookup"), b'{"agent_type": "ghost"}', timeout=2
    )
    assert_error(reply, 404, "AgentTypeNotFound")
    reply = await nc.request(
        subjects.service("registry", "lookup"), b'{"agent_type": "no/slash"}', timeout=2
    )
    assert_error(reply, 400, "InvalidId")
