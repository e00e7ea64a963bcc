"""The state service: versions, compare-and-set, conflict policies, history, integrity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import msgpack
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from mesh import AgentId
from mesh._connect import connect
from mesh._connection import Connection
from mesh.codec import encode
from mesh.config import ConnectConfig, StateConfig
from mesh.errors import (
    BadRequestError,
    ConflictError,
    DecodeError,
    NoWorkerAvailableError,
    PayloadTooLargeError,
    StateCorruptError,
    StateNotFoundError,
)
from mesh.handlers.state import StateService
from mesh.state import StateClient, StatePutReply, StatePutRequest, put_request_body
from mesh.subjects import Subjects
from mesh.testing import eventually
from tests.helpers import assert_error

COUNTER = AgentId("counter", "a")


@pytest.fixture(params=["nats-py", "mesh"])
async def nc(request: pytest.FixtureRequest, nats_url: str) -> AsyncIterator[NATS]:
    """Every test here twice: on nats-py's connection and on mesh's, where the service
    writes a put expecting the version it saw last straight to KV
    (`StateStore.put_many`). Service and client share it, so the client's first
    request always finds the service subscribed (across two connections, nats-server
    now and then answers "no responders" just after a subscription was confirmed)."""
    if request.param == "nats-py":
        connection = await nats.connect(nats_url, name="mesh-test")
    else:
        connection = await connect(ConnectConfig(url=nats_url), name="mesh-test")
        assert isinstance(connection, Connection)
    yield connection
    await connection.drain()


@pytest.fixture
async def service(nc: NATS, subjects: Subjects) -> AsyncIterator[StateService]:
    async with StateService(nc, subjects, StateConfig(history=8)) as service:
        yield service


@pytest.fixture
def store(nc: NATS, subjects: Subjects, service: StateService) -> StateClient:
    return StateClient(nc, subjects)


async def _request(nc: NATS, subjects: Subjects, op: str, body: bytes) -> object:
    return await nc.request(subjects.service("state", op), body, timeout=5)


async def test_versions_count_up_and_older_ones_can_be_read(store: StateClient) -> None:
    for n in range(1, 4):
        saved = await store.put(COUNTER, {"value": n}, expected_version=n - 1, writer="t")
        assert saved.version == n
    latest = await store.get(COUNTER)
    assert (latest.version, latest.state, latest.writer) == (3, {"value": 3}, "t")
    assert (await store.get(COUNTER, version=2)).state == {"value": 2}
    history = await store.history(COUNTER)
    assert [v.version for v in history] == [1, 2, 3]
    assert history[-1].checksum == latest.checksum


async def test_nothing_saved_is_a_404(store: StateClient) -> None:
    with pytest.raises(StateNotFoundError):
        await store.get(AgentId("counter", "nobody"))
    await store.put(COUNTER, {"value": 1})
    with pytest.raises(StateNotFoundError):
        await store.get(COUNTER, version=7)
    assert await store.history(AgentId("counter", "nobody")) == []


@pytest.mark.parametrize("batch", [True, False], ids=["put_many", "put"])
async def test_of_fifty_writers_expecting_one_version_exactly_one_wins(
    nc: NATS, subjects: Subjects, service: StateService, batch: bool
) -> None:
    store = StateClient(nc, subjects, batch=batch)
    await store.put(COUNTER, {"value": 0}, expected_version=0)
    outcomes = await asyncio.gather(
        *(store.put(COUNTER, {"value": n}, expected_version=1) for n in range(50)),
        return_exceptions=True,
    )
    wins = [o for o in outcomes if not isinstance(o, BaseException)]
    conflicts = [o for o in outcomes if isinstance(o, ConflictError)]
    assert len(wins) == 1 and len(conflicts) == 49, outcomes
    assert {c.current_version for c in conflicts} == {2}
    assert (await store.get(COUNTER)).version == 2


async def test_read_modify_write_with_retry_loses_no_increment(
    nc: NATS, subjects: Subjects, service: StateService
) -> None:
    # Two replicas of the service, so their remembered revisions go stale under each other.
    async with StateService(nc, subjects) as other:
        del other
        store = StateClient(nc, subjects)

        async def add_one() -> None:
            while True:
                try:
                    current = await store.get(COUNTER)
                    value, version = current.state["value"], current.version
                except StateNotFoundError:
                    value, version = 0, 0
                try:
                    await store.put(COUNTER, {"value": value + 1}, expected_version=version)
                    return
                except ConflictError:
                    continue

        await asyncio.gather(*(add_one() for _ in range(16) for _ in range(5)))
        saved = await store.get(COUNTER)
        assert saved.state == {"value": 80}
        assert saved.version == 80


async def test_last_write_wins_writes_over_a_newer_version(store: StateClient) -> None:
    await store.put(COUNTER, {"value": 1}, expected_version=0)
    await store.put(COUNTER, {"value": 2}, expected_version=1)
    saved = await store.put(COUNTER, {"value": 10}, expected_version=1, policy="last_write_wins")
    assert saved.version == 3 and not saved.merged
    assert (await store.get(COUNTER)).state == {"value": 10}


async def test_merge_takes_fields_changed_by_one_side_and_refuses_a_true_conflict(
    store: StateClient,
) -> None:
    profile = AgentId("profile", "p")
    base = {"name": "Ann", "city": "Oslo", "prefs": {"lang": "en", "theme": "dark"}}
    await store.put(profile, base, expected_version=0)
    theirs = {**base, "city": "Bergen", "prefs": {"lang": "en", "theme": "light"}}
    await store.put(profile, theirs, expected_version=1)
    ours = {**base, "name": "Anne", "prefs": {"lang": "nb", "theme": "dark"}, "age": 40}
    saved = await store.put(profile, ours, expected_version=1, policy="merge")
    expected = {
        "name": "Anne",
        "city": "Bergen",
        "prefs": {"lang": "nb", "theme": "light"},
        "age": 40,
    }
    assert saved.merged and saved.version == 3 and saved.state == expected
    assert (await store.get(profile)).state == expected
    clash = {**base, "city": "Trondheim"}  # they moved the city to Bergen meanwhile
    with pytest.raises(ConflictError, match="city") as caught:
        await store.put(profile, clash, expected_version=1, policy="merge")
    assert caught.value.current_version == 3
    assert (await store.get(profile)).state == expected


async def test_state_changed_behind_the_services_back_is_refused(
    nc: NATS, subjects: Subjects, store: StateClient
) -> None:
    await store.put(COUNTER, {"value": 1})
    kv = await nc.jetstream().key_value(subjects.bucket("state"))
    entry = await kv.get(Subjects.agent_key(COUNTER))
    assert entry.value is not None
    record = orjson.loads(entry.value)
    record["state"]["value"] = 1_000_000
    await kv.put(Subjects.agent_key(COUNTER), orjson.dumps(record))
    with pytest.raises(StateCorruptError, match="checksum"):
        await store.get(COUNTER)
    reply = await _request(nc, subjects, "get", orjson.dumps({"agent_type": "counter", "key": "a"}))
    assert_error(reply, 500, "StateCorrupt")  # type: ignore[arg-type]
    with pytest.raises(StateCorruptError):
        await store.put(COUNTER, {"value": 2}, expected_version=1)
    assert await store.delete(COUNTER)  # the way out: start again
    assert (await store.put(COUNTER, {"value": 0}, expected_version=0)).version == 1


async def test_large_state_round_trips_up_to_the_limit_and_gets_413_beyond(
    nc: NATS, subjects: Subjects, store: StateClient
) -> None:
    big = {"blob": "x" * 900_000}
    await store.put(COUNTER, big)
    assert (await store.get(COUNTER)).state == big
    with pytest.raises(PayloadTooLargeError):
        await store.put(COUNTER, {"blob": "x" * 1_048_576})
    async with StateService(
        nc, Subjects(f"{subjects.prefix}s"), StateConfig(max_state_bytes=10_000)
    ):
        small = StateClient(nc, Subjects(f"{subjects.prefix}s"))
        with pytest.raises(PayloadTooLargeError, match="over the limit of 10000"):
            await small.put(COUNTER, {"blob": "x" * 20_000})
        reply = await nc.request(
            Subjects(f"{subjects.prefix}s").service("state", "put"),
            orjson.dumps({"agent_type": "counter", "key": "a", "state": {"b": "x" * 20_000}}),
            timeout=5,
        )
        assert_error(reply, 413, "PayloadTooLarge")
    assert (await store.get(COUNTER)).state == big  # nothing else changed


async def test_delete_respects_the_expected_version(store: StateClient) -> None:
    assert not await store.delete(COUNTER)
    await store.put(COUNTER, {"value": 1})
    with pytest.raises(ConflictError):
        await store.delete(COUNTER, expected_version=5)
    assert await store.delete(COUNTER, expected_version=1)
    with pytest.raises(StateNotFoundError):
        await store.get(COUNTER)
    assert await store.history(COUNTER) == []
    assert (await store.put(COUNTER, {"value": 9}, expected_version=0)).version == 1


async def test_history_keeps_the_configured_number_of_versions(
    nc: NATS, subjects: Subjects
) -> None:
    async with StateService(nc, subjects, StateConfig(history=3)):
        store = StateClient(nc, subjects)
        for n in range(6):
            await store.put(COUNTER, {"value": n})
        assert [v.version for v in await store.history(COUNTER)] == [4, 5, 6]
        with pytest.raises(StateNotFoundError):
            await store.get(COUNTER, version=2)


@pytest.mark.parametrize(
    ("op", "body", "code", "error_type"),
    [
        ("get", b"{not json", 400, "InvalidPayload"),
        ("get", b'{"agent_type": "bad type!", "key": "a"}', 400, "InvalidId"),
        ("get", b'{"agent_type": "counter", "key": "a", "version": 0}', 400, "InvalidPayload"),
        ("put", b'{"agent_type": "counter", "key": "a", "state": [1, 2]}', 400, "InvalidPayload"),
        ("put", b'{"agent_type": "counter", "key": "a", "state": {}, "policy": "x"}', 400, None),
        (
            "put",
            b'{"agent_type": "counter", "key": "a", "state": {}, "expected_version": -1}',
            400,
            None,
        ),
        ("put", b'{"agent_type": "counter", "key": "\\u0007", "state": {}}', 400, "InvalidId"),
        ("history", b"\xff\xfe", 400, None),
        ("delete", b'{"agent_type": "counter"}', 400, "InvalidPayload"),
        ("get", b'{"agent_type": "counter", "key": "none"}', 404, "StateNotFound"),
    ],
)
async def test_bad_requests_get_the_protocols_codes(
    nc: NATS,
    subjects: Subjects,
    service: StateService,
    op: str,
    body: bytes,
    code: int,
    error_type: str | None,
) -> None:
    reply = await _request(nc, subjects, op, body)
    assert_error(reply, code, error_type)  # type: ignore[arg-type]


async def test_a_409_reply_carries_the_current_version(
    nc: NATS, subjects: Subjects, store: StateClient
) -> None:
    await store.put(COUNTER, {"value": 1})
    reply = await _request(
        nc,
        subjects,
        "put",
        orjson.dumps({"agent_type": "counter", "key": "a", "state": {}, "expected_version": 0}),
    )
    error = assert_error(reply, 409, "StateConflict")  # type: ignore[arg-type]
    assert error["current_version"] == 1


def _put(key: str, state: dict[str, object], **fields: object) -> dict[str, object]:
    return {"agent_type": "counter", "key": key, "state": state, **fields}


async def test_put_many_answers_each_put_as_put_would(
    nc: NATS, subjects: Subjects, service: StateService
) -> None:
    store = StateClient(nc, subjects, batch=False)
    await store.put(AgentId("counter", "b"), {"value": 1})  # b is at version 1
    puts = [
        _put("a", {"value": 1}, expected_version=0),
        _put("b", {"value": 2}, expected_version=5),
        _put("\x07", {"value": 3}),
        _put("c", {"blob": "x" * 1_000_100}),  # over the 1,000,000 limit
        _put("b", {"value": 2}, expected_version=5, policy="last_write_wins"),
        {"agent_type": "counter", "key": "d", "state": [1, 2]},  # not a put: its own 400
    ]
    for content_type, codec in (("application/json", orjson), ("application/msgpack", msgpack)):
        reply = await nc.request(
            subjects.service("state", "put_many"),
            codec.dumps({"puts": puts}),  # type: ignore[attr-defined]
            timeout=5,
            headers={"Content-Type": content_type},
        )
        assert reply.headers is not None and reply.headers["Content-Type"] == content_type
        answers = codec.loads(reply.data)["results"]  # type: ignore[attr-defined]
        ok, conflict, invalid, too_large, overwritten, malformed = answers
        if content_type == "application/json":
            assert ok["version"] == 1 and not ok["merged"]
            assert overwritten["version"] == 2
        else:  # the same puts again: a now exists, b is at version 2
            assert ok["error"]["code"] == 409 and ok["error"]["current_version"] == 1
            assert overwritten["version"] == 3
        assert conflict["error"]["type"] == "StateConflict"
        assert conflict["error"]["current_version"] == (1 if content_type.endswith("json") else 2)
        assert invalid["error"]["code"] == 400 and invalid["error"]["type"] == "InvalidId"
        assert too_large["error"]["code"] == 413
        assert malformed["error"]["type"] == "InvalidPayload"
        assert "state" in malformed["error"]["message"]
    assert (await store.get(AgentId("counter", "a"))).state == {"value": 1}
    assert (await store.get(AgentId("counter", "b"))).version == 3
    for never_written in ("c", "d"):
        with pytest.raises(StateNotFoundError):
            await store.get(AgentId("counter", never_written))


@pytest.mark.parametrize(
    "body",
    [
        b'{"puts": []}',
        orjson.dumps({"puts": [_put("a", {})] * 257}),
        b'{"puts": [5, "a"]}',
        b'{"puts": {"agent_type": "counter", "key": "a", "state": {}}}',
        b"[not json",
    ],
    ids=["none", "too-many", "not-objects", "not-a-list", "not-json"],
)
async def test_a_bad_put_many_is_400_and_writes_nothing(
    nc: NATS, subjects: Subjects, service: StateService, body: bytes
) -> None:
    reply = await _request(nc, subjects, "put_many", body)
    assert_error(reply, 400, "InvalidPayload")  # type: ignore[arg-type]
    assert await StateClient(nc, subjects).history(COUNTER) == []


async def test_puts_made_together_travel_together_and_a_lone_put_alone(
    nc: NATS, subjects: Subjects, service: StateService
) -> None:
    seen: dict[str, int] = {"put": 0, "put_many": 0}
    for op in seen:

        async def count(msg: object, op: str = op) -> None:
            seen[op] += 1

        await nc.subscribe(subjects.service("state", op), cb=count)
    store = StateClient(nc, subjects)
    agents = [AgentId("counter", f"k{n}") for n in range(40)]
    saved = await asyncio.gather(*(store.put(agent, {"n": 1}) for agent in agents))
    assert [s.version for s in saved] == [1] * 40
    again = await asyncio.gather(
        *(store.put(a, {"n": 2}, expected_version=1) for a in agents),
        store.put(agents[0], {"n": 3}, expected_version=1),  # loses to the first
        return_exceptions=True,
    )
    assert [getattr(r, "version", None) for r in again[1:40]] == [2] * 39
    first, rival = again[0], again[40]  # of two puts expecting version 1 of k0, one won
    assert {type(first), type(rival)} == {StatePutReply, ConflictError}, again
    conflict = first if isinstance(first, ConflictError) else rival
    assert isinstance(conflict, ConflictError) and conflict.current_version == 2
    await store.put(AgentId("counter", "alone"), {"n": 1})
    await nc.flush()
    await eventually(lambda: seen == {"put": 1, "put_many": 2}, timeout=5)


async def test_puts_made_together_without_a_service_each_fail_on_their_own(
    nc: NATS, subjects: Subjects
) -> None:
    store = StateClient(nc, subjects, timeout=1)
    outcomes = await asyncio.gather(
        *(store.put(AgentId("counter", f"k{n}"), {"n": n}) for n in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(o, NoWorkerAvailableError) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 3  # one error each, not one shared


@pytest.mark.parametrize(
    "state",
    [
        {"count": 1, "note": "ünïcode ✓", "nested": {"list": [1, 2.5, None, True]}},
        {"at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)},  # pydantic's form: ...Z
        {"tags": {"b", "a"}},  # pydantic writes a set as a list
        {"huge": 2**70},  # past orjson's 64 bits
        MappingProxyType({"count": 2}),  # a mapping that is not a dict
    ],
)
def test_a_put_request_body_is_what_the_request_model_encodes(state: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"expected_version": 3, "policy": "merge", "writer": "w", "epoch": 2}
    body = put_request_body(COUNTER, state, **fields)
    model = StatePutRequest(agent_type="counter", key="a", state=dict(state), **fields)
    assert body == encode(model)


def test_a_put_request_body_refuses_what_the_request_model_refuses() -> None:
    with pytest.raises(ValidationError):
        put_request_body(
            COUNTER,
            {1: "a key not a string"},
            expected_version=None,
            policy="reject",
            writer=None,
            epoch=None,
        )


async def test_puts_made_together_go_alone_to_a_service_without_put_many(
    nc: NATS, subjects: Subjects, service: StateService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client of this version against a state service of a version before put_many:
    every put is still saved, and once the service is seen to lack put_many, puts stop
    trying it for a while."""
    (put_many,) = [e for e in service._service._endpoints if e.name == "put_many"]
    await put_many.stop_taking_work()  # as if the service came before put_many
    await nc.flush()
    requested: list[str] = []
    request = nc.request
    ops = {subjects.service("state", op): op for op in ("put", "put_many")}

    async def recording(subject: str, *args: Any, **kwargs: Any) -> Any:
        if subject in ops:
            requested.append(ops[subject])
        return await request(subject, *args, **kwargs)

    monkeypatch.setattr(nc, "request", recording)
    store = StateClient(nc, subjects)
    agents = [AgentId("counter", f"k{n}") for n in range(5)]
    saved = await asyncio.gather(*(store.put(agent, {"n": 1}) for agent in agents))
    assert [s.version for s in saved] == [1] * 5
    assert sorted(requested) == ["put"] * 5 + ["put_many"]
    requested.clear()
    again = await asyncio.gather(*(store.put(a, {"n": 2}, expected_version=1) for a in agents))
    assert [s.version for s in again] == [2] * 5
    assert requested == ["put"] * 5


async def test_puts_beyond_the_limit_in_flight_get_503_and_write_nothing(
    nc: NATS, subjects: Subjects
) -> None:
    """Each put of a put_many counts against the service's limit of puts in flight."""

    def put(n: int) -> dict[str, Any]:
        return {"agent_type": "counter", "key": f"k{n}", "state": {}}

    async def versions(op: str, body: object) -> list[int]:
        reply = await _request(nc, subjects, op, orjson.dumps(body))
        answer = orjson.loads(reply.data)  # type: ignore[attr-defined]
        return (
            [r["version"] for r in answer["results"]] if op == "put_many" else [answer["version"]]
        )

    async with StateService(nc, subjects, StateConfig(max_puts_in_flight=4)) as service:
        with service._holding_puts(2):  # two puts of other requests, still unanswered
            body = orjson.dumps({"puts": [put(n) for n in range(3)]})
            refused = await _request(nc, subjects, "put_many", body)
            assert_error(refused, 503, "Unavailable")  # type: ignore[arg-type]
            assert await StateClient(nc, subjects).history(AgentId("counter", "k0")) == []
            assert await versions("put", put(0)) == [1]
            assert await versions("put_many", {"puts": [put(0), put(1)]}) == [2, 1]
        # With nothing else in flight, a request is taken whatever its size.
        six = await versions("put_many", {"puts": [put(n) for n in range(6)]})
        assert six == [3, 2, 1, 1, 1, 1]


def test_the_state_services_settings_come_from_the_environment() -> None:
    config = StateConfig.from_env(
        {"MESH_STATE_MAX_PUTS_IN_FLIGHT": "64", "MESH_STATE_HISTORY": "5"}
    )
    assert (config.max_puts_in_flight, config.history) == (64, 5)
    assert StateConfig.from_env({}).max_puts_in_flight == 10_000
    with pytest.raises(BadRequestError, match="at least 1 put"):
        StateConfig(max_puts_in_flight=0)
    with pytest.raises(BadRequestError, match="1 to 64"):
        StateConfig(history=65)


@pytest.mark.parametrize(
    "fields", [{"expected_version": -1}, {"policy": "sometimes"}, {"epoch": 0}]
)
async def test_a_put_the_request_model_refuses_is_400_alone_or_together(
    store: StateClient, fields: dict[str, Any]
) -> None:
    alone = AgentId("counter", "alone")
    with pytest.raises(DecodeError) as refused:
        await store.put(alone, {"n": 1}, **fields)
    assert (refused.value.code, refused.value.wire_type) == (400, "InvalidPayload")
    bad, good = await asyncio.gather(
        store.put(COUNTER, {"n": 1}, **fields), store.put(alone, {"n": 1}), return_exceptions=True
    )
    assert isinstance(bad, DecodeError) and bad.code == 400, bad
    assert isinstance(good, StatePutReply) and good.version == 1
    assert await store.history(COUNTER) == []
