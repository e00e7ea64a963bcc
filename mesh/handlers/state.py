"""The state service (``mesh-state``): agents' state, versioned, in KV ``mesh-state``.

Each agent's latest state is one KV key, ``<agent_type>.<key>``, holding a JSON
`StateRecord`: the state, its version (1, 2, 3... per agent), a checksum and the time.
KV history keeps the last versions (`StateConfig.history`), so older ones can be read.

Every write is a compare-and-set on the key's KV revision, so concurrent writers never
lose an update silently, across any number of replicas of this service. A write that
expects another version than the saved one is resolved by its conflict policy:

- ``reject`` (the default): 409 with the version saved now;
- ``last_write_wins``: written over it;
- ``merge``: the writer's changes since the version it expected (read from history)
  are applied to the saved state field by field; a field both changed is a 409.

Reads verify the checksum and refuse corrupt state with `StateCorruptError`.
Endpoints (``mesh.state.<op>``): get, put, history, delete.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mesh import __version__
from mesh._conflicts import FieldConflictError, canonical_json, merge_states, state_checksum
from mesh._control import model_reply, read_request
from mesh._kv import BucketConfig, ensure_bucket
from mesh._lifecycle import Lifecycle
from mesh._micro import MicroService, Reply
from mesh.config import StateConfig
from mesh.errors import (
    BadRequestError,
    ConflictError,
    NoWorkerAvailableError,
    PayloadTooLargeError,
    StateCorruptError,
    StateNotFoundError,
)
from mesh.ids import AgentId
from mesh.records import utcnow
from mesh.state import (
    SERVICE,
    StateDeleteReply,
    StateDeleteRequest,
    StateGetRequest,
    StateHistoryReply,
    StateHistoryRequest,
    StatePutReply,
    StatePutRequest,
    StateRecord,
    StateVersion,
)
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)

#: Compare-and-set rounds before a write under constant contention gives up with 503.
MAX_WRITE_ROUNDS = 32


def state_bucket(subjects: Subjects, history: int) -> BucketConfig:
    return BucketConfig(
        name=subjects.bucket("state"), description="mesh agent state", history=history
    )


@dataclass(frozen=True, slots=True)
class _Saved:
    """An agent's latest record and the KV revision it is stored at."""

    revision: int
    record: StateRecord


class StateService(Lifecycle):
    """One replica of the state service.

    Args:
        nc: A connected NATS client; the service does not close it.
        subjects: The mesh's names.
        config: History depth, size limit.
    """

    def __init__(
        self, nc: NATS, subjects: Subjects | None = None, config: StateConfig | None = None
    ) -> None:
        self._nc = nc
        self._subjects = subjects or Subjects()
        self._config = config or StateConfig()
        self._service = MicroService(
            nc,
            name=self._subjects.micro_name(SERVICE),
            version=__version__,
            description="versioned agent state",
        )
        self._kv: KeyValue | None = None
        # Agent key -> (revision, version) this replica last wrote or read: a write that
        # expects that version tries that revision first. Only a hint: CAS checks it.
        self._known: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._started = False

    async def start(self) -> None:
        """Open (or create) the bucket and start serving."""
        if self._started:
            return
        bucket = state_bucket(self._subjects, self._config.history)
        self._kv = await ensure_bucket(self._nc.jetstream(), bucket)
        queue = self._subjects.queue_group(SERVICE)
        endpoints = {
            "get": self._get,
            "put": self._put,
            "history": self._history,
            "delete": self._delete,
        }
        for op, handler in endpoints.items():
            await self._service.add_endpoint(
                op, subject=self._subjects.service(SERVICE, op), handler=handler, queue_group=queue
            )
        await self._service.start()
        self._started = True

    async def shutdown(self, grace: float = 5.0) -> None:
        """Finish in-flight requests and stop. Idempotent."""
        if not self._started:
            return
        self._started = False
        await self._service.stop(grace)

    # Endpoints

    async def _get(self, msg: Msg) -> Reply:
        request = read_request(msg, StateGetRequest)
        agent_id = AgentId(request.agent_type, request.key)
        if request.version is None:
            saved = await self._read(agent_id)
            if saved is None:
                raise StateNotFoundError(f"no state saved for {agent_id}")
            return model_reply(msg, saved.record)
        for saved in await self._versions(agent_id):
            if saved.record.version == request.version:
                return model_reply(msg, saved.record)
        raise StateNotFoundError(f"version {request.version} of {agent_id} is not kept")

    async def _put(self, msg: Msg) -> Reply:
        request = read_request(msg, StatePutRequest)
        agent_id = AgentId(request.agent_type, request.key)
        try:
            size = len(canonical_json(request.state))
        except TypeError as exc:
            raise BadRequestError(f"the state of {agent_id} is not JSON: {exc}") from None
        if size > self._config.max_state_bytes:
            raise PayloadTooLargeError(
                f"the state of {agent_id} is {size} bytes, over the limit of"
                f" {self._config.max_state_bytes}"
            )
        return model_reply(msg, await self._write(agent_id, request))

    async def _history(self, msg: Msg) -> Reply:
        request = read_request(msg, StateHistoryRequest)
        agent_id = AgentId(request.agent_type, request.key)
        versions = [
            StateVersion(
                version=s.record.version,
                checksum=s.record.checksum,
                updated_at=s.record.updated_at,
                writer=s.record.writer,
            )
            for s in await self._versions(agent_id)
        ]
        return model_reply(msg, StateHistoryReply(versions=versions))

    async def _delete(self, msg: Msg) -> Reply:
        request = read_request(msg, StateDeleteRequest)
        agent_id = AgentId(request.agent_type, request.key)
        key = Subjects.agent_key(agent_id)
        kv = self._bucket()
        saved = await self._read(agent_id, verify=False)
        if saved is None:
            return model_reply(msg, StateDeleteReply(deleted=False))
        if (
            request.expected_version is not None
            and saved.record.version != request.expected_version
        ):
            raise self._conflict(agent_id, request.expected_version, saved.record.version)
        # A purge, not a delete: the versions go too, so a new version 1 is unambiguous.
        await kv.purge(key)
        self._known.pop(key, None)
        return model_reply(msg, StateDeleteReply(deleted=True))

    # Writing

    async def _write(self, agent_id: AgentId, request: StatePutRequest) -> StatePutReply:
        key = Subjects.agent_key(agent_id)
        known = self._known.get(key)
        if known is not None and request.expected_version == known[1]:
            # The common case: the writer expects what this replica saw last.
            try:
                return await self._store(key, agent_id, request, request.state, known, False)
            except KeyWrongLastSequenceError:
                self._known.pop(key, None)
        for _ in range(MAX_WRITE_ROUNDS):
            saved = await self._read(agent_id)
            current = saved.record.version if saved else 0
            state, merged = request.state, False
            expected = request.expected_version
            if expected is not None and expected != current:
                if request.policy == "reject":
                    raise self._conflict(agent_id, expected, current)
                if request.policy == "merge":
                    state = await self._merged(agent_id, request, saved, expected, current)
                    merged = True
            position = (saved.revision, current) if saved else None
            try:
                return await self._store(key, agent_id, request, state, position, merged)
            except KeyWrongLastSequenceError:
                continue  # another write landed in between: judge again against it
        raise NoWorkerAvailableError(
            f"{agent_id}: {MAX_WRITE_ROUNDS} writes in a row lost to concurrent ones; try again"
        )

    async def _merged(
        self,
        agent_id: AgentId,
        request: StatePutRequest,
        saved: _Saved | None,
        expected: int,
        current: int,
    ) -> dict[str, Any]:
        if saved is None:
            raise self._conflict(agent_id, expected, current, "its state was deleted")
        base: dict[str, Any] | None = {} if expected == 0 else None
        if base is None:
            for older in await self._versions(agent_id):
                if older.record.version == expected:
                    base = older.record.state
        if base is None:
            raise self._conflict(
                agent_id, expected, current, f"version {expected} is no longer kept to merge from"
            )
        try:
            return merge_states(base, request.state, saved.record.state)
        except FieldConflictError as exc:
            raise self._conflict(agent_id, expected, current, str(exc)) from None

    async def _store(
        self,
        key: str,
        agent_id: AgentId,
        request: StatePutRequest,
        state: dict[str, Any],
        position: tuple[int, int] | None,
        merged: bool,
    ) -> StatePutReply:
        """Write the next version after `position` ((revision, version); None: absent)."""
        version = position[1] + 1 if position else 1
        now = utcnow()
        checksum = state_checksum(state)
        data = orjson.dumps(
            {
                "agent_type": agent_id.type,
                "key": agent_id.key,
                "version": version,
                "state": state,
                "checksum": checksum,
                "updated_at": now,
                "writer": request.writer,
            }
        )
        kv = self._bucket()
        if position is None:
            revision = await kv.create(key, data)  # also after a purge
        else:
            revision = await kv.update(key, data, last=position[0])
        self._remember(key, revision, version)
        return StatePutReply(
            version=version,
            checksum=checksum,
            updated_at=now,
            merged=merged,
            state=state if merged else None,
        )

    # Reading

    async def _read(self, agent_id: AgentId, *, verify: bool = True) -> _Saved | None:
        key = Subjects.agent_key(agent_id)
        try:
            entry = await self._bucket().get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.operation in (KV_DEL, KV_PURGE):
            return None
        revision = int(entry.revision or 0)
        try:
            record = _record(agent_id, entry.value, revision, verify=verify)
        except StateCorruptError:
            if verify:
                raise
            return None
        self._remember(key, revision, record.version)
        return _Saved(revision, record)

    async def _versions(self, agent_id: AgentId) -> list[_Saved]:
        """The versions kept, oldest first; corrupt ones left out."""
        try:
            entries = await self._bucket().history(Subjects.agent_key(agent_id))
        except (NoKeysError, KeyNotFoundError):
            return []
        kept: list[_Saved] = []
        for entry in entries:
            if entry.value is None or entry.operation in (KV_DEL, KV_PURGE):
                kept.clear()  # what came before a delete belongs to a former agent
                continue
            revision = int(entry.revision or 0)
            try:
                kept.append(_Saved(revision, _record(agent_id, entry.value, revision)))
            except StateCorruptError as exc:
                logger.error("%s", exc)
        return kept

    def _remember(self, key: str, revision: int, version: int) -> None:
        self._known[key] = (revision, version)
        self._known.move_to_end(key)
        while len(self._known) > self._config.known_revisions:
            self._known.popitem(last=False)

    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise NoWorkerAvailableError("the state service is not started")
        return self._kv

    @staticmethod
    def _conflict(agent_id: AgentId, expected: int, current: int, why: str = "") -> ConflictError:
        message = f"{agent_id} is at version {current}, not {expected}"
        return ConflictError(f"{message}: {why}" if why else message, current_version=current)


def _record(agent_id: AgentId, value: bytes, revision: int, *, verify: bool = True) -> StateRecord:
    """The record in `value`, checked against its checksum and its key."""
    try:
        record = StateRecord.model_validate_json(value)
    except ValueError as exc:
        raise StateCorruptError(
            f"the state of {agent_id} at revision {revision} is not a state record: {exc}"
        ) from None
    if record.agent_id != agent_id:
        raise StateCorruptError(
            f"the record at {agent_id}'s key (revision {revision}) belongs to {record.agent_id}"
        )
    if verify and state_checksum(record.state) != record.checksum:
        raise StateCorruptError(
            f"the state of {agent_id} at version {record.version} (revision {revision}) does"
            " not match its checksum; it was changed outside the state service"
        )
    return record
