"""Agents' state in KV ``mesh-state``: the logic the state service and workers share.

Each agent's latest state is one KV key, ``<agent_type>.<key>``, holding a JSON
`StateRecord`: the state, its version (1, 2, 3... per agent), a checksum and the time.
KV history keeps the last versions (`StateConfig.history`), so older ones can be read.

Every write is a compare-and-set on the key's KV revision, so concurrent writers never
lose an update silently, wherever they run. A write that expects another version than
the saved one is resolved by its conflict policy:

- ``reject`` (the default): `ConflictError` (409) with the version saved now;
- ``last_write_wins``: written over it;
- ``merge``: the writer's changes since the version it expected (read from history)
  are applied to the saved state field by field; a field both changed is a 409.

Reads verify the checksum and refuse corrupt state with `StateCorruptError`.

`StateStore.put_many` saves many puts at once (the state service's way): a put that
expects the version this process saw last goes straight to KV as a `CasWrites` write,
its outcome handled as it comes back, with no task or future of its own; any other
put, and one whose write comes back without success, goes the way `put` goes.

A write that gets no acknowledgement (a stream leader change) is tried again until
`StateConfig.write_timeout`. If the retry finds the key moved on, the write may have
landed after all: it did if the key's history holds its exact bytes, and then it
succeeded, rather than being answered as a conflict the caller would retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mesh import metrics
from mesh._conflicts import (
    ConflictPolicy,
    FieldConflictError,
    canonical_json,
    checksum_of,
    merge_states,
    state_checksum,
)
from mesh._connection import Connection
from mesh._kv import BucketConfig, CasWrites, compare_and_set, ensure_bucket
from mesh._kv_watch import history
from mesh._placement import PlacementTable
from mesh._retry import JETSTREAM_UNAVAILABLE
from mesh.config import StateConfig
from mesh.errors import (
    BadRequestError,
    ConflictError,
    FencedError,
    MeshError,
    NoWorkerAvailableError,
    PayloadTooLargeError,
    StateCorruptError,
    StateNotFoundError,
)
from mesh.ids import AgentId
from mesh.records import utcnow
from mesh.state import StatePutReply, StatePutRequest, StateRecord, StateVersion
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)

#: Compare-and-set rounds before a write under constant contention gives up with 503.
MAX_WRITE_ROUNDS = 32
#: Pause between attempts at a write that got no acknowledgement.
WRITE_RETRY_PAUSE = 0.25


def state_bucket(subjects: Subjects, history: int) -> BucketConfig:
    return BucketConfig(
        name=subjects.bucket("state"), description="mesh agent state", history=history
    )


@dataclass(slots=True)
class _KnownWrite:
    """A put `StateStore.put_many` wrote at once: the record, and the reply it earns."""

    put: StatePutRequest
    agent_id: AgentId
    key: str
    ours: dict[str, Any]
    ours_json: bytes
    #: The revision it was written after.
    last: int
    data: bytes
    reply: StatePutReply


@dataclass(frozen=True, slots=True)
class _Saved:
    """An agent's latest record and the KV revision it is stored at."""

    revision: int
    record: StateRecord


class StateStore:
    """Reads and writes agents' state in KV, with the same calls as `StateClient`.

    Args:
        js: JetStream context.
        subjects: The mesh's names.
        config: History depth (when the bucket is created), size limit.
    """

    def __init__(
        self, js: JetStreamContext, subjects: Subjects, config: StateConfig | None = None
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._config = config or StateConfig()
        self._kv: KeyValue | None = None
        self._bucket_name = ""
        self._placements = PlacementTable(js, subjects, watch=False)
        # Agent key -> (revision, version) last written or read here: a write that
        # expects that version tries that revision first. Only a hint: CAS checks it.
        self._known: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._writes: CasWrites | None = None

    async def start(self) -> None:
        """Open the bucket, creating it if it is absent."""
        if self._kv is None:
            bucket = state_bucket(self._subjects, self._config.history)
            self._kv = await ensure_bucket(self._js, bucket)
            self._bucket_name = bucket.name
            await self._placements.start()

    async def get(self, agent_id: AgentId, version: int | None = None) -> StateRecord:
        """The latest state, or `version` while it is kept.

        Raises:
            StateNotFoundError: Nothing saved (or that version is gone).
            StateCorruptError: What is saved fails its checksum.
        """
        if version is None:
            saved = await self._read(agent_id)
            if saved is None:
                raise StateNotFoundError(f"no state saved for {agent_id}")
            return saved.record
        for saved in await self._versions(agent_id):
            if saved.record.version == version:
                return saved.record
        raise StateNotFoundError(f"version {version} of {agent_id} is not kept")

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
        """Save `state` as the agent's next version.

        With `epoch` (a worker saving for its activation: the placement revision it was
        placed under), the write is fenced: refused unless the agent's placement still
        names `writer` at that revision, and unless no newer epoch has written.

        Raises:
            ConflictError: Another version than `expected_version` is saved, and the
                policy did not resolve it.
            FencedError: The writer is a stale owner.
            PayloadTooLargeError: The state is over the configured limit.
            BadRequestError: The state is not JSON.
        """
        ours, ours_json = self._serialised(agent_id, state)
        if epoch is not None:
            await self._check_owner(agent_id, writer, epoch)
        return await self._write(agent_id, ours, ours_json, expected_version, policy, writer, epoch)

    async def put_many(self, puts: Sequence[StatePutRequest]) -> list[StatePutReply | Exception]:
        """Save each of `puts` as `put` would, all at once; each one's reply or error.

        A put that expects the version this process saw last (the common case) goes
        straight to KV, its outcome handled as it comes back, with no task of its own;
        the others, and those that lose their compare-and-set, take `put`'s way.
        """
        results: list[StatePutReply | Exception | None] = [None] * len(puts)
        others: list[int] = []
        unfinished: list[tuple[int, _KnownWrite, Exception]] = []
        waiting = 0
        all_back = asyncio.get_running_loop().create_future()
        writes = await self._cas_writes()

        def settle(index: int, write: _KnownWrite, outcome: int | Exception) -> None:
            nonlocal waiting
            if isinstance(outcome, Exception):
                unfinished.append((index, write, outcome))
            else:
                self._remember(write.key, outcome, write.reply.version)
                results[index] = write.reply
            waiting -= 1
            if waiting == 0 and not all_back.done():
                all_back.set_result(None)

        for index, put in enumerate(puts):
            try:
                write = self._known_write(put)
            except MeshError as exc:
                results[index] = exc
                continue
            if write is not None and writes is not None:
                outcome = functools.partial(settle, index, write)
                if writes.write(self._bucket_name, write.key, write.data, write.last, outcome):
                    waiting += 1
                    continue
            others.append(index)

        async def put_one(index: int) -> None:
            put = puts[index]
            try:
                results[index] = await self.put(
                    AgentId(put.agent_type, put.key),
                    put.state,
                    expected_version=put.expected_version,
                    policy=put.policy,
                    writer=put.writer,
                    epoch=put.epoch,
                )
            except Exception as exc:
                results[index] = exc

        async def finish(index: int, write: _KnownWrite, error: Exception) -> None:
            try:
                results[index] = await self._finish(write, error)
            except Exception as exc:
                results[index] = exc

        await asyncio.gather(*(put_one(index) for index in others))
        if waiting:
            await all_back  # each write has its outcome by its deadline
        await asyncio.gather(*(finish(*args) for args in unfinished))
        return [result if result is not None else MeshError("no outcome") for result in results]

    def _known_write(self, put: StatePutRequest) -> _KnownWrite | None:
        """`put` written at once, if it expects the version this process saw last and
        needs no fencing; None when it must take `put`'s way.

        Raises:
            MeshError: As `put` refuses the request (an invalid id, state not JSON...).
        """
        agent_id = AgentId(put.agent_type, put.key)
        key = Subjects.agent_key(agent_id)
        known = self._known_position(key, put.expected_version, put.epoch)
        if known is None:
            return None
        ours, ours_json = self._serialised(agent_id, put.state)
        data, reply = self._next_version(agent_id, ours, ours_json, put.writer, known, False)
        return _KnownWrite(put, agent_id, key, ours, ours_json, known[0], data, reply)

    async def _finish(self, write: _KnownWrite, error: Exception) -> StatePutReply:
        """A write `put_many` started that came back with `error`, finished as `put`
        finishes one."""
        put = write.put
        if not isinstance(error, KeyWrongLastSequenceError):
            try:  # unacknowledged: it may have been stored
                revision = await self._compare_and_set(
                    write.key, write.data, write.last, outcome_unknown=True
                )
            except KeyWrongLastSequenceError:
                pass
            else:
                self._remember(write.key, revision, write.reply.version)
                return write.reply
        if self._known.get(write.key) == (write.last, put.expected_version):
            del self._known[write.key]  # stale (unless another put of the batch renewed it)
        return await self._write(
            write.agent_id,
            write.ours,
            write.ours_json,
            put.expected_version,
            put.policy,
            put.writer,
        )

    async def _cas_writes(self) -> CasWrites | None:
        """What `put_many` writes with: on a mesh connection only."""
        nc = self._js._nc
        if self._writes is None and isinstance(nc, Connection):
            self._writes = CasWrites(nc)
            await self._writes.start()
        return self._writes

    async def stop(self) -> None:
        """Stop `put_many`'s writing; writes waiting for their outcome finish as `put`'s
        do."""
        writes, self._writes = self._writes, None
        if writes is not None:
            await writes.close()

    def _serialised(
        self, agent_id: AgentId, state: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bytes]:
        """The state to write (a copy of it as it is now) and its canonical JSON.

        Raises:
            BadRequestError: The state is not JSON.
            PayloadTooLargeError: Its JSON is over the configured limit.
        """
        ours = dict(state)
        try:
            ours_json = canonical_json(ours)
        except TypeError as exc:
            raise BadRequestError(f"the state of {agent_id} is not JSON: {exc}") from None
        size = len(ours_json)
        if size > self._config.max_state_bytes:
            raise PayloadTooLargeError(
                f"the state of {agent_id} is {size} bytes, over the limit of"
                f" {self._config.max_state_bytes}"
            )
        return ours, ours_json

    async def _check_owner(self, agent_id: AgentId, writer: str | None, epoch: int) -> None:
        placement = await self._placements.current(agent_id)
        if placement is None or placement.worker_id != writer or placement.revision != epoch:
            now = f"{placement.worker_id} at epoch {placement.revision}" if placement else "nobody"
            metrics.STATE_CONFLICTS.labels(agent_id.type).inc()
            raise FencedError(
                f"{writer} wrote for {agent_id} at epoch {epoch}, but it is placed on {now}"
            )

    async def history(self, agent_id: AgentId) -> list[StateVersion]:
        """The versions kept, oldest first; empty when nothing is saved."""
        return [
            StateVersion(
                version=s.record.version,
                checksum=s.record.checksum,
                updated_at=s.record.updated_at,
                writer=s.record.writer,
                epoch=s.record.epoch,
            )
            for s in await self._versions(agent_id)
        ]

    async def delete(self, agent_id: AgentId, *, expected_version: int | None = None) -> bool:
        """Delete the agent's state and its versions; whether there was any."""
        saved = await self._read(agent_id, verify=False)
        if saved is None:
            return False
        if expected_version is not None and saved.record.version != expected_version:
            raise self._conflict(agent_id, expected_version, saved.record.version)
        key = Subjects.agent_key(agent_id)
        # A purge, not a delete: the versions go too, so a new version 1 is unambiguous.
        await self._bucket().purge(key)
        self._known.pop(key, None)
        return True

    # Writing

    async def _write(
        self,
        agent_id: AgentId,
        ours: dict[str, Any],
        ours_json: bytes,
        expected: int | None,
        policy: ConflictPolicy,
        writer: str | None,
        epoch: int | None = None,
    ) -> StatePutReply:
        """Save `ours` (`ours_json`: its canonical JSON) after `expected`, as `policy`
        says when another version is there."""
        key = Subjects.agent_key(agent_id)
        known = self._known_position(key, expected, epoch)
        if known is not None:  # the common case: the writer expects what we saw last
            data, reply = self._next_version(agent_id, ours, ours_json, writer, known, False)
            try:
                return await self._store(key, data, reply, known)
            except KeyWrongLastSequenceError:
                self._known.pop(key, None)
        for _ in range(MAX_WRITE_ROUNDS):
            saved = await self._read(agent_id)
            current = saved.record.version if saved else 0
            if epoch is not None and saved is not None and (saved.record.epoch or 0) > epoch:
                metrics.STATE_CONFLICTS.labels(agent_id.type).inc()
                raise FencedError(
                    f"{agent_id} was written at epoch {saved.record.epoch}, after {epoch}"
                )
            state, state_json, merged = ours, ours_json, False
            if expected is not None and expected != current:
                if policy == "reject":
                    raise self._conflict(agent_id, expected, current)
                if policy == "merge":
                    state = await self._merged(agent_id, ours, saved, expected, current)
                    state_json, merged = canonical_json(state), True
            position = (saved.revision, current) if saved else None
            data, reply = self._next_version(
                agent_id, state, state_json, writer, position, merged, epoch
            )
            try:
                return await self._store(key, data, reply, position)
            except KeyWrongLastSequenceError:
                continue  # another write landed in between: judge again against it
        raise NoWorkerAvailableError(
            f"{agent_id}: {MAX_WRITE_ROUNDS} writes in a row lost to concurrent ones; try again"
        )

    async def _merged(
        self,
        agent_id: AgentId,
        ours: dict[str, Any],
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
            return merge_states(base, ours, saved.record.state)
        except FieldConflictError as exc:
            raise self._conflict(agent_id, expected, current, str(exc)) from None

    async def _store(
        self, key: str, data: bytes, reply: StatePutReply, position: tuple[int, int] | None
    ) -> StatePutReply:
        """Write `data`, the record of the version after `position` ((revision, version);
        None: absent); `reply` once it is stored."""
        revision = await self._compare_and_set(key, data, position[0] if position else None)
        self._remember(key, revision, reply.version)
        return reply

    @staticmethod
    def _next_version(
        agent_id: AgentId,
        state: dict[str, Any],
        state_json: bytes,
        writer: str | None,
        position: tuple[int, int] | None,
        merged: bool,
        epoch: int | None = None,
    ) -> tuple[bytes, StatePutReply]:
        """The record of the version after `position` ((revision, version); None:
        absent), and the reply that saving it earns; `state_json`: the state's canonical
        JSON."""
        version = position[1] + 1 if position else 1
        now = utcnow()
        checksum = checksum_of(state_json)
        data = orjson.dumps(
            {
                "agent_type": agent_id.type,
                "key": agent_id.key,
                "version": version,
                "state": orjson.Fragment(state_json),  # the very bytes the checksum covers
                "checksum": checksum,
                "updated_at": now,
                "writer": writer,
                "epoch": epoch,
            }
        )
        reply = StatePutReply(
            version=version,
            checksum=checksum,
            updated_at=now,
            merged=merged,
            state=state if merged else None,
        )
        return data, reply

    async def _compare_and_set(
        self, key: str, data: bytes, last: int | None, *, outcome_unknown: bool = False
    ) -> int:
        """Store `data` if the key's revision is still `last` (None: absent), trying again
        across a leader change; returns the new revision. `outcome_unknown`: an earlier
        attempt got no acknowledgement (so it may have been stored)."""
        kv = self._bucket()
        deadline = time.monotonic() + self._config.write_timeout
        while True:
            try:
                if last is None:
                    return await kv.create(key, data)  # also after a purge
                return await compare_and_set(self._js, self._bucket_name, key, data, last)
            except KeyWrongLastSequenceError:
                if outcome_unknown:
                    landed = await self._landed(kv, key, data)
                    if landed is not None:
                        return landed
                raise
            except JETSTREAM_UNAVAILABLE as exc:
                if time.monotonic() + WRITE_RETRY_PAUSE >= deadline:
                    raise
                outcome_unknown = True
                metrics.STATE_WRITE_RETRIES.inc()
                logger.info("state write of %s unacknowledged (%r); trying again", key, exc)
            await asyncio.sleep(WRITE_RETRY_PAUSE)

    async def _landed(self, kv: KeyValue, key: str, data: bytes) -> int | None:
        """The revision at which exactly `data` was stored under `key`, if it is kept."""
        with contextlib.suppress(KeyNotFoundError):
            latest = await kv.get(key)
            if latest.value == data:
                return int(latest.revision or 0)
        with contextlib.suppress(NoKeysError):
            for entry in reversed(await history(kv, key)):
                if entry.value == data:
                    return int(entry.revision or 0)
        return None

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
            entries = await history(self._bucket(), Subjects.agent_key(agent_id))
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

    def _known_position(
        self, key: str, expected: int | None, epoch: int | None
    ) -> tuple[int, int] | None:
        """(revision, version) of `key` as this process saw it last, when a write
        expecting version `expected` can try that revision first: unfenced writes only
        (a fenced one reads what is saved, to see its epoch)."""
        known = self._known.get(key)
        if known is None or expected != known[1] or epoch is not None:
            return None
        return known

    def _remember(self, key: str, revision: int, version: int) -> None:
        self._known[key] = (revision, version)
        self._known.move_to_end(key)
        while len(self._known) > self._config.known_revisions:
            self._known.popitem(last=False)

    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise NoWorkerAvailableError("the state store is not started")
        return self._kv

    @staticmethod
    def _conflict(agent_id: AgentId, expected: int, current: int, why: str = "") -> ConflictError:
        metrics.STATE_CONFLICTS.labels(agent_id.type).inc()
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
