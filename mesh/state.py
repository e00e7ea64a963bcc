"""Agents' saved state, through the state service (``mesh.state.<op>``).

Each agent's state is a JSON object saved in KV ``mesh-state`` under
``<agent_type>.<key>`` with a version that counts 1, 2, 3... per agent and a checksum.
A write may say which version it expects: of two writers expecting the same version,
one wins and the other gets `ConflictError` (409) with the version saved now, unless
the write's conflict policy is ``last_write_wins`` or ``merge``.

Example::

    store = StateClient(nc)
    saved = await store.put(AgentId("counter", "a"), {"value": 1}, expected_version=0)
    record = await store.get(AgentId("counter", "a"))
    assert record.version == saved.version == 1
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol, TypeVar

import orjson
from nats.aio.client import Client as NATS
from pydantic import BaseModel, Field

from mesh._batched_requests import BatchedRequests
from mesh._conflicts import ConflictPolicy
from mesh._control import control_request
from mesh.codec import encode
from mesh.ids import AgentId
from mesh.records import utcnow
from mesh.subjects import Subjects

SERVICE = "state"

#: orjson options under which it writes only what pydantic would write the same way, and
#: refuses the rest (`TypeError`).
_PLAIN_JSON_ONLY = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS

M = TypeVar("M", bound=BaseModel)


class StateRecord(BaseModel):
    """One saved version of an agent's state: what ``nats kv get mesh-state`` shows."""

    agent_type: str
    key: str
    version: int = Field(ge=1, description="1, 2, 3... per agent")
    state: dict[str, Any]
    checksum: str = Field(description="sha256:<hex> of the state's JSON with sorted keys")
    updated_at: datetime = Field(default_factory=utcnow)
    writer: str | None = Field(None, description="the worker or client that wrote it")
    epoch: int | None = Field(
        None, description="the placement revision its worker wrote under (workers only)"
    )

    @property
    def agent_id(self) -> AgentId:
        return AgentId(self.agent_type, self.key)


class StateGetRequest(BaseModel):
    agent_type: str
    key: str
    version: int | None = Field(None, ge=1, description="an older version, while it is kept")


class StatePutRequest(BaseModel):
    agent_type: str
    key: str
    state: dict[str, Any]
    expected_version: int | None = Field(
        None, ge=0, description="the version this write replaces; 0: none yet; absent: any"
    )
    policy: ConflictPolicy = "reject"
    writer: str | None = None
    epoch: int | None = Field(
        None, ge=1, description="fence: refused unless the agent is placed on writer at it"
    )


class StatePutReply(BaseModel):
    version: int
    checksum: str
    updated_at: datetime
    merged: bool = Field(False, description="another writer's changes were merged in")
    state: dict[str, Any] | None = Field(None, description="the saved state, when merged")


#: Most puts one ``mesh.state.put_many`` request may carry.
MAX_PUTS_PER_REQUEST = 256


class StatePutManyRequest(BaseModel):
    puts: list[StatePutRequest] = Field(min_length=1, max_length=MAX_PUTS_PER_REQUEST)


class StatePutBodies(BaseModel):
    """A ``mesh.state.put_many`` request read leniently: its puts as plain objects, so
    that each can be validated (and refused) on its own."""

    puts: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_PUTS_PER_REQUEST)


class StatePutManyReply(BaseModel):
    results: list[StatePutReply | dict[str, Any]] = Field(
        description="per put, in order: what mesh.state.put answers (a put reply or an error body)"
    )


class StateHistoryRequest(BaseModel):
    agent_type: str
    key: str


class StateVersion(BaseModel):
    version: int
    checksum: str
    updated_at: datetime
    writer: str | None = None
    epoch: int | None = None


class StateHistoryReply(BaseModel):
    versions: list[StateVersion] = Field(description="oldest first, as far as kept")


class StateDeleteRequest(BaseModel):
    agent_type: str
    key: str
    expected_version: int | None = Field(None, ge=1)


class StateDeleteReply(BaseModel):
    deleted: bool


class StateAccess(Protocol):
    """What loading and saving agents' state needs: `StateClient` (through the state
    service) and `mesh._state_store.StateStore` (KV directly) both offer it."""

    async def get(self, agent_id: AgentId, version: int | None = None) -> StateRecord: ...

    async def put(
        self,
        agent_id: AgentId,
        state: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        policy: ConflictPolicy = "reject",
        writer: str | None = None,
        epoch: int | None = None,
    ) -> StatePutReply: ...


def put_request_body(
    agent_id: AgentId,
    state: Mapping[str, Any],
    *,
    expected_version: int | None,
    policy: ConflictPolicy,
    writer: str | None,
    epoch: int | None,
) -> bytes:
    """The JSON body of a ``mesh.state.put`` request: byte for byte what
    `StatePutRequest` encodes to, written by orjson when the state is a dict of JSON's
    own types (the usual case, at a fraction of the cost), by pydantic otherwise. The
    other fields are not checked here: a value the model refuses (a negative expected
    version, an unknown policy) is refused by the service, 400 ``InvalidPayload``."""
    fields = {
        "agent_type": agent_id.type,
        "key": agent_id.key,
        "state": state,
        "expected_version": expected_version,
        "policy": policy,
        "writer": writer,
        "epoch": epoch,
    }
    if type(state) is dict:
        with contextlib.suppress(TypeError):  # a datetime, a set, a 65-bit integer...
            return orjson.dumps(fields, option=_PLAIN_JSON_ONLY)
    return encode(StatePutRequest.model_validate({**fields, "state": dict(state)}))


class StateClient:
    """Reads and writes agents' state through the state service.

    Args:
        nc: A connected client.
        subjects: The mesh's names.
        timeout: Seconds to wait for each answer.
        batch: Send the puts made at the same moment (in the same event-loop iteration)
            as one ``mesh.state.put_many`` request (see `mesh._batched_requests`); a put
            alone still goes as ``mesh.state.put``. ``False``: every put on its own.
    """

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects | None = None,
        timeout: float = 5.0,
        *,
        batch: bool = True,
    ) -> None:
        self._nc = nc
        self._subjects = subjects or Subjects()
        self._timeout = timeout
        self._puts = BatchedRequests(
            nc,
            subject=self._subjects.service(SERVICE, "put"),
            batch_subject=self._subjects.service(SERVICE, "put_many"),
            field="puts",
            reply_type=StatePutReply,
            max_batch=MAX_PUTS_PER_REQUEST if batch else 1,
            timeout=timeout,
        )

    async def get(self, agent_id: AgentId, version: int | None = None) -> StateRecord:
        """The latest state, or `version` while it is kept.

        Raises:
            StateNotFoundError: Nothing saved (or that version is gone).
            StateCorruptError: What is saved fails its checksum.
        """
        request = StateGetRequest(agent_type=agent_id.type, key=agent_id.key, version=version)
        return await self._request("get", request, StateRecord)

    async def put(
        self,
        agent_id: AgentId,
        state: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        policy: ConflictPolicy = "reject",
        writer: str | None = None,
        epoch: int | None = None,
    ) -> StatePutReply:
        """Save `state` as the agent's next version (fenced by `epoch`, see `StateStore`).

        Raises:
            ConflictError: Another version than `expected_version` is saved, and the
                policy did not resolve it (``current_version`` says which).
            PayloadTooLargeError: The state is over the service's limit, or the request
                over the connection's.
        """
        body = put_request_body(
            agent_id,
            state,
            expected_version=expected_version,
            policy=policy,
            writer=writer,
            epoch=epoch,
        )
        return await self._puts.request(body)

    async def history(self, agent_id: AgentId) -> list[StateVersion]:
        """The versions kept, oldest first; empty when nothing is saved."""
        request = StateHistoryRequest(agent_type=agent_id.type, key=agent_id.key)
        return (await self._request("history", request, StateHistoryReply)).versions

    async def delete(self, agent_id: AgentId, *, expected_version: int | None = None) -> bool:
        """Delete the agent's state; whether there was any."""
        request = StateDeleteRequest(
            agent_type=agent_id.type, key=agent_id.key, expected_version=expected_version
        )
        return (await self._request("delete", request, StateDeleteReply)).deleted

    async def _request(self, op: str, request: BaseModel, reply: type[M]) -> M:
        answer = await control_request(
            self._nc, self._subjects.service(SERVICE, op), request, reply, timeout=self._timeout
        )
        assert answer is not None
        return answer
