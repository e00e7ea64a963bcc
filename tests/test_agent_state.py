"""Agents with saved state: loaded on activation, saved after each handler, kept across
worker failures, never overwritten by an overtaken instance, never loaded when corrupt."""

from __future__ import annotations

import orjson
import pytest
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from mesh import Agent, AgentDefinitionError, AgentId, ConflictError, MeshClient, MessageContext
from mesh import handler as mesh_handler
from mesh.errors import HandlerError, StateCorruptError
from mesh.handlers.gateway import Gateway
from mesh.handlers.state import StateService
from mesh.state import StateClient
from mesh.subjects import Subjects
from mesh.testing import eventually

AGENTS = ("tests.agents:Notebook", "tests.agents:Journal", "workers.counter:Counter")


@pytest.fixture
async def client(
    nc: NATS, subjects: Subjects, gateway: Gateway, state_service: StateService, spawn_worker: type
) -> MeshClient:
    """A worker hosting the stateful agents (which keep state in KV directly), and the
    state service, through which these tests look at (and meddle with) that state."""
    spawn_worker(*AGENTS, worker_id="keeper")
    await eventually(lambda: gateway.directory.live_workers("notebook"), timeout=15)
    return MeshClient(nc, subjects=subjects)


async def _lines(client: MeshClient, agent_id: AgentId) -> list[str]:
    reply = await client.call(agent_id, {}, message_type="Read")
    assert isinstance(reply, dict)
    return list(reply["lines"])


async def test_each_handler_saves_the_state_it_changed(
    nc: NATS, subjects: Subjects, client: MeshClient
) -> None:
    book = AgentId("notebook", "n1")
    for line in ("a", "b"):
        await client.call(book, {"line": line}, message_type="Jot")
    await client.call(book, {}, message_type="Read")  # changes nothing: no new version
    saved = await StateClient(nc, subjects).get(book)
    assert saved.state == {"lines": ["a", "b"]}
    assert saved.version == 2 and saved.writer == "keeper"


async def test_a_failed_handlers_changes_are_not_kept(client: MeshClient) -> None:
    book = AgentId("notebook", "n2")
    await client.call(book, {"line": "kept"}, message_type="Jot")
    with pytest.raises(HandlerError, match="changed my mind"):
        await client.call(book, {"line": "dropped", "fail_after": True}, message_type="Jot")
    assert await _lines(client, book) == ["kept"]


async def test_an_overtaken_instance_gets_409_and_then_continues_from_the_saved_state(
    nc: NATS, subjects: Subjects, client: MeshClient
) -> None:
    book = AgentId("notebook", "n3")
    await client.call(book, {"line": "one"}, message_type="Jot")
    # Another writer (a zombie's successor, an operator) saves version 2 meanwhile.
    await StateClient(nc, subjects).put(book, {"lines": ["one", "elsewhere"]}, expected_version=1)
    with pytest.raises(ConflictError) as caught:
        await client.call(book, {"line": "two"}, message_type="Jot")
    assert caught.value.current_version == 2
    assert await _lines(client, book) == ["one", "elsewhere"]
    await client.call(book, {"line": "two"}, message_type="Jot")
    assert (await StateClient(nc, subjects).get(book)).state == {
        "lines": ["one", "elsewhere", "two"]
    }


async def test_corrupt_state_is_never_loaded(
    nc: NATS, subjects: Subjects, client: MeshClient
) -> None:
    book = AgentId("notebook", "n4")
    await StateClient(nc, subjects).put(book, {"lines": ["fine"]})
    kv = await nc.jetstream().key_value(subjects.bucket("state"))
    entry = await kv.get(Subjects.agent_key(book))
    assert entry.value is not None
    record = orjson.loads(entry.value)
    record["state"]["lines"] = ["tampered"]
    await kv.put(Subjects.agent_key(book), orjson.dumps(record))
    with pytest.raises(StateCorruptError, match="checksum"):
        await client.call(book, {}, message_type="Read")


async def test_hooks_and_explicit_saves_as_in_autogen(
    nc: NATS, subjects: Subjects, client: MeshClient
) -> None:
    journal = AgentId("journal", "j1")
    await client.call(journal, {"line": "saved"}, message_type="Jot")
    await client.call(journal, {"line": "not yet", "fail_after": True}, message_type="Jot")
    store = StateClient(nc, subjects)
    assert (await store.get(journal)).state == {"entries": {"0": "saved"}}
    assert await _lines(client, journal) == ["saved", "not yet"]  # autosave off: held
    await client.call(journal, {"line": "third"}, message_type="Jot")
    saved = await store.get(journal)
    assert saved.state == {"entries": {"0": "saved", "1": "not yet", "2": "third"}}


async def test_a_merging_agent_keeps_a_concurrent_writers_fields(
    nc: NATS, subjects: Subjects, client: MeshClient
) -> None:
    journal = AgentId("journal", "j2")
    await client.call(journal, {"line": "mine"}, message_type="Jot")
    store = StateClient(nc, subjects)
    await store.put(journal, {"entries": {"0": "mine", "x": "theirs"}}, expected_version=1)
    await client.call(journal, {"line": "more"}, message_type="Jot")
    merged = {"entries": {"0": "mine", "1": "more", "x": "theirs"}}
    assert (await store.get(journal)).state == merged
    assert sorted(await _lines(client, journal)) == sorted(merged["entries"].values())


async def test_a_counter_keeps_its_count_when_its_worker_is_killed(
    nc: NATS, subjects: Subjects, gateway: Gateway, spawn_worker: type
) -> None:
    workers = {name: spawn_worker(*AGENTS, worker_id=name) for name in ("w-a", "w-b")}
    await eventually(lambda: len(gateway.directory.live_workers("counter")) == 2, timeout=15)
    client = MeshClient(nc, subjects=subjects)
    counter = AgentId("counter", "survivor")
    for _ in range(5):
        reply = await client.call(counter, {"by": 2}, message_type="Increment")
    first_worker = reply["worker"]
    workers[first_worker].kill()  # SIGKILL: no goodbye, no release of its placements
    reply = await eventually(
        lambda: client.call(counter, {"by": 1}, message_type="Increment", timeout=2),
        timeout=20,
        message="the counter answering from the other worker",
    )
    assert reply["worker"] != first_worker
    assert reply["value"] == 11


def test_agent_definitions_with_state_are_checked() -> None:
    class NoDefault(BaseModel):
        value: int

    class Ok(BaseModel):
        value: int = 0

    class Ping(BaseModel):
        pass

    with pytest.raises(AgentDefinitionError, match="needs a default"):

        class A(Agent, agent_type="a", state=NoDefault):
            @mesh_handler
            async def on(self, message: Ping, ctx: MessageContext) -> None: ...

    with pytest.raises(AgentDefinitionError, match="stateless"):

        class B(Agent, agent_type="b", state=Ok, stateless=True):
            @mesh_handler
            async def on(self, message: Ping, ctx: MessageContext) -> None: ...

    with pytest.raises(AgentDefinitionError, match="conflict policy"):

        class C(Agent, agent_type="c", state=Ok, conflict_policy="newest"):  # type: ignore[arg-type]
            @mesh_handler
            async def on(self, message: Ping, ctx: MessageContext) -> None: ...
