"""Compare-and-set writes answered by callback (`mesh._kv.CasWrites`), and what the
state store does with the ones that come back without an acknowledgement."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyWrongLastSequenceError, NoStreamResponseError
from nats.js.kv import KeyValue

from mesh._connection import Connection, encode_headers
from mesh._kv import BucketConfig, CasWrites, compare_and_set, ensure_bucket
from mesh._state_store import StateStore, _KnownWrite
from mesh.errors import ConflictError
from mesh.ids import AgentId
from mesh.state import StatePutRequest
from mesh.subjects import Subjects


@pytest.fixture
async def kv(mesh_nc: Connection, subjects: Subjects) -> AsyncIterator[KeyValue]:
    name = f"{subjects.prefix}-cas"
    yield await ensure_bucket(mesh_nc.jetstream(), BucketConfig(name=name))
    await mesh_nc.jetstream().delete_key_value(name)


class Outcomes:
    """Collects outcomes; `next()` waits (with a deadline) for the next one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[int | Exception] = asyncio.Queue()

    def __call__(self, outcome: int | Exception) -> None:
        self.queue.put_nowait(outcome)

    async def next(self, timeout: float = 5.0) -> int | Exception:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def test_a_write_comes_back_with_its_revision_or_why_it_failed(
    mesh_nc: Connection, kv: KeyValue
) -> None:
    writes = CasWrites(mesh_nc)
    outcomes = Outcomes()
    assert not writes.write(kv._name, "k", b"x", 1, outcomes)  # not started: nothing sent
    await writes.start()
    first = await kv.put("k", b"one")
    assert writes.write(kv._name, "k", b"two", first, outcomes)
    second = await outcomes.next()
    assert isinstance(second, int) and second > first
    assert (await kv.get("k")).value == b"two"
    assert writes.write(kv._name, "k", b"stale", first, outcomes)
    assert isinstance(await outcomes.next(), KeyWrongLastSequenceError)
    assert writes.write("no-such-bucket", "k", b"x", 1, outcomes)
    assert isinstance(await outcomes.next(), NoStreamResponseError)
    assert (await kv.get("k")).value == b"two"
    await writes.close()
    assert not writes.write(kv._name, "k", b"three", second, outcomes)


async def test_an_unacknowledged_write_times_out_and_a_close_ends_the_wait(
    mesh_nc: Connection, subjects: Subjects
) -> None:
    silent = f"{subjects.prefix}-silent"
    await mesh_nc.subscribe(Subjects.kv_subject(silent, ">"))  # takes writes, never answers
    writes = CasWrites(mesh_nc, timeout=0.1)
    await writes.start()
    outcomes = Outcomes()
    assert writes.write(silent, "k", b"x", 1, outcomes)
    assert isinstance(await outcomes.next(timeout=2), NatsTimeoutError)
    assert writes.write(silent, "k", b"x", 1, outcomes)
    await writes.close()
    assert isinstance(outcomes.queue.get_nowait(), ConnectionClosedError)  # at once


async def test_publish_nowait_sends_only_while_it_can(mesh_nc: Connection) -> None:
    received = await mesh_nc.subscribe("nowait.check")
    assert mesh_nc.publish_nowait("nowait.check", b"hello", headers={"A": "1"})
    message = await received.next_msg(timeout=2)
    assert (message.data, message.headers) == (b"hello", {"A": "1"})
    assert mesh_nc.publish_nowait("nowait.check", b"block", headers=encode_headers({"B": "2"}))
    message = await received.next_msg(timeout=2)
    assert (message.data, message.headers) == (b"block", {"B": "2"})
    assert not mesh_nc.publish_nowait("", b"no subject")
    assert not mesh_nc.publish_nowait("nowait.check", b"x" * (mesh_nc.max_payload + 1))
    await mesh_nc.close()
    assert not mesh_nc.publish_nowait("nowait.check", b"closed")


async def test_write_out_hands_buffered_messages_over_in_order(mesh_nc: Connection) -> None:
    received = await mesh_nc.subscribe("writeout.check")
    await mesh_nc.flush()
    assert mesh_nc.publish_nowait("writeout.check", b"1")
    assert mesh_nc.publish_nowait("writeout.check", b"2")
    mesh_nc.write_out()
    assert mesh_nc._pending == []  # in the socket's hands, not waiting for the flusher
    await mesh_nc.publish("writeout.check", b"3")
    mesh_nc.write_out()  # nothing buffered, or only what the flusher will also see
    got = [(await received.next_msg(timeout=2)).data for _ in range(3)]
    assert got == [b"1", b"2", b"3"]
    await mesh_nc.close()
    mesh_nc.write_out()  # closed: nothing to do, no error


COUNTER = AgentId("counter", "a")


#: A put expecting version 1 of COUNTER, the version `_store_knowing_version_1` saved.
NEXT = StatePutRequest(agent_type="counter", key="a", state={"value": 2}, expected_version=1)


async def _store_knowing_version_1(mesh_nc: Connection, subjects: Subjects) -> StateStore:
    store = StateStore(mesh_nc.jetstream(), subjects)
    await store.start()
    await store.put(COUNTER, {"value": 1})  # version 1, now known to the store
    return store


async def _known_write(store: StateStore) -> _KnownWrite:
    write = store._known_write(NEXT)
    assert write is not None
    return write


async def test_an_unacknowledged_write_that_was_stored_succeeds_once(
    mesh_nc: Connection, subjects: Subjects
) -> None:
    store = await _store_knowing_version_1(mesh_nc, subjects)
    write = await _known_write(store)
    # Stored, but its acknowledgement lost (a leader change):
    await compare_and_set(
        mesh_nc.jetstream(), store._bucket_name, write.key, write.data, write.last
    )
    saved = await store._finish(write, NatsTimeoutError())
    assert saved.version == 2
    assert [v.version for v in await store.history(COUNTER)] == [1, 2]  # not written twice
    assert (await store.get(COUNTER)).state == {"value": 2}


async def test_an_unacknowledged_write_that_lost_to_another_is_a_conflict(
    mesh_nc: Connection, subjects: Subjects
) -> None:
    store = await _store_knowing_version_1(mesh_nc, subjects)
    write = await _known_write(store)
    other = StateStore(mesh_nc.jetstream(), subjects)
    await other.start()
    await other.put(COUNTER, {"value": 7}, expected_version=1)  # got there first
    with pytest.raises(ConflictError) as caught:
        await store._finish(write, NatsTimeoutError())
    assert caught.value.current_version == 2
    assert (await store.get(COUNTER)).state == {"value": 7}


async def test_put_many_gives_each_put_its_own_outcome(
    mesh_nc: Connection, subjects: Subjects
) -> None:
    store = await _store_knowing_version_1(mesh_nc, subjects)
    rival = NEXT.model_copy(update={"state": {"value": 3}})
    fresh = StatePutRequest(agent_type="counter", key="b", state={"value": 1})
    results = await store.put_many([NEXT, rival, fresh])
    assert [type(r).__name__ for r in results] == [
        "StatePutReply",
        "ConflictError",
        "StatePutReply",
    ]
    assert (await store.get(COUNTER)).state == {"value": 2}
    await store.stop()
