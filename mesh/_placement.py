"""Where each agent is activated: the ``mesh-placement`` bucket and a local copy of it.

One activation per agent id, across any number of gateways:

- placing a new agent is a create-if-absent on ``<type>.<key>``: of two gateways that
  race, one write wins and the other reads and follows it;
- moving an agent off a dead worker is a compare-and-set on the revision the mover
  saw: of two movers, one wins and the other follows;
- a worker releasing an agent (idle, drained) deletes the entry only if it still
  names that worker, also by compare-and-set.

A watch keeps the local copy fresh, so the hot path reads a dictionary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from mesh._kv import BucketConfig, KvMirror, MirroredEntry, ensure_bucket
from mesh.ids import AgentId
from mesh.records import PlacementRecord
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)


def placement_bucket(subjects: Subjects) -> BucketConfig:
    return BucketConfig(name=subjects.placement_bucket, description="mesh agent placements")


@dataclass(frozen=True, slots=True)
class Placement:
    """An agent's worker, and the KV revision that says so."""

    worker_id: str
    revision: int


class PlacementTable:
    """The placement bucket, read locally and written with compare-and-set.

    Args:
        js: JetStream context.
        subjects: The mesh's names.
        watch: Keep a local copy (gateways); workers only write and need none.
    """

    def __init__(self, js: JetStreamContext, subjects: Subjects, *, watch: bool = True) -> None:
        self._js = js
        self._subjects = subjects
        self._watch = watch
        self._kv: KeyValue | None = None
        self._mirror: KvMirror | None = None
        self._cache: dict[str, Placement] = {}

    async def start(self) -> None:
        self._kv = await ensure_bucket(self._js, placement_bucket(self._subjects))
        if self._watch:
            self._mirror = KvMirror(self._kv, on_change=self._changed)
            await self._mirror.start()

    async def restart(self) -> None:
        if self._mirror is not None:
            await self._mirror.restart()

    async def aclose(self) -> None:
        if self._mirror is not None:
            await self._mirror.aclose()

    def __len__(self) -> int:
        return len(self._cache)

    def _changed(self, key: str, entry: MirroredEntry | None) -> None:
        if entry is None:
            self._cache.pop(key, None)
            return
        known = self._cache.get(key)
        if known is not None and known.revision > entry.revision:
            return  # we wrote a newer one ourselves; the watch will catch up
        try:
            record = PlacementRecord.model_validate_json(entry.value)
        except ValidationError:
            logger.warning("ignoring malformed placement %r", key)
            return
        self._cache[key] = Placement(record.worker_id, entry.revision)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "PlacementTable.start() first"
        return self._kv

    def get(self, agent_id: AgentId) -> Placement | None:
        """The placement as this process last saw it (no round trip)."""
        return self._cache.get(Subjects.agent_key(agent_id))

    async def current(self, agent_id: AgentId) -> Placement | None:
        """The placement as KV has it now (a round trip)."""
        return await self._read(Subjects.agent_key(agent_id))

    async def _read(self, key: str) -> Placement | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        placement = Placement(
            PlacementRecord.model_validate_json(entry.value).worker_id, entry.revision
        )
        self._cache[key] = placement
        return placement

    def _value(self, worker_id: str) -> bytes:
        record = PlacementRecord(worker_id=worker_id, activated_at=datetime.now(UTC))
        return record.model_dump_json().encode()

    async def place(self, agent_id: AgentId, worker_id: str) -> Placement:
        """Place a new agent on `worker_id`, unless someone placed it first: the winner."""
        key = Subjects.agent_key(agent_id)
        try:
            revision = await self.kv.create(key, self._value(worker_id))
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            # Someone placed it first; or (not found) nats-py's create met a key that was
            # released between its two steps.
            current = await self._read(key)
            if current is not None:
                return current
            return await self.place(agent_id, worker_id)  # deleted meanwhile: try again
        placement = Placement(worker_id, revision)
        self._cache[key] = placement
        return placement

    async def move(self, agent_id: AgentId, seen: Placement, worker_id: str) -> Placement:
        """Move an agent from the placement we `seen` to `worker_id`: the winner of a race."""
        key = Subjects.agent_key(agent_id)
        try:
            revision = await self.kv.update(key, self._value(worker_id), last=seen.revision)
        except KeyWrongLastSequenceError:
            current = await self._read(key)
            if current is not None:
                return current
            return await self.place(agent_id, worker_id)
        placement = Placement(worker_id, revision)
        self._cache[key] = placement
        return placement

    async def release(self, agent_id: AgentId, worker_id: str) -> bool:
        """Remove the agent's placement if it still names `worker_id`."""
        key = Subjects.agent_key(agent_id)
        current = await self._read(key)
        if current is None or current.worker_id != worker_id:
            return False
        try:
            await self.kv.delete(key, last=current.revision)
        except KeyWrongLastSequenceError:
            return False
        self._cache.pop(key, None)
        return True
