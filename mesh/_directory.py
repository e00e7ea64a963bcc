"""A process-local, always-fresh view of the registry's KV buckets.

The registry service and every gateway hold one `WorkerDirectory`: a watch on
``mesh-workers`` and one on ``mesh-types`` keep it current, so a lookup on the
hot path is a dictionary read, and replicas share nothing but KV.

Liveness is judged on this process's own monotonic clock: a worker is alive while
its last heartbeat reached this process less than ``missed_heartbeats`` intervals
ago. No clock of another host is compared with ours, so skew between hosts does not
matter; only entries found at start-up are aged by their ``last_heartbeat`` field.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from nats.js.client import JetStreamContext
from pydantic import ValidationError

from mesh._kv import BucketConfig, KvMirror, MirroredEntry, ensure_bucket
from mesh.config import RegistryConfig
from mesh.errors import InvalidIdError
from mesh.records import TypeRecord, WorkerRecord
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)

#: The lapse markers of TTL'd keys must outlive the slowest watcher's catch-up.
MARKER_TTL = 60.0


def workers_bucket(subjects: Subjects) -> BucketConfig:
    return BucketConfig(
        name=subjects.workers_bucket,
        description="mesh workers, their agent types, load and heartbeats",
        marker_ttl=MARKER_TTL,
    )


def types_bucket(subjects: Subjects) -> BucketConfig:
    return BucketConfig(
        name=subjects.types_bucket,
        description="mesh agent types by worker",
        marker_ttl=MARKER_TTL,
    )


class WorkerDirectory:
    """Who hosts which agent type, and who is alive, from KV.

    Args:
        js: JetStream context of the process's connection.
        subjects: The mesh's names.
        config: Liveness settings.
        on_worker_gone: Called with a worker's id when its entry goes (deregistered,
            or its heartbeats lapsed past the entry's TTL).
    """

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        config: RegistryConfig | None = None,
        on_worker_gone: Callable[[str], None] | None = None,
    ) -> None:
        self._on_worker_gone = on_worker_gone
        self._js = js
        self._subjects = subjects
        self._config = config or RegistryConfig()
        self._workers: dict[str, WorkerRecord] = {}
        self._seen: dict[str, float] = {}
        self._loaded = False
        self._hosts: dict[str, dict[str, WorkerRecord]] = defaultdict(dict)
        self._types: dict[str, dict[str, TypeRecord]] = defaultdict(dict)
        self._worker_mirror: KvMirror | None = None
        self._type_mirror: KvMirror | None = None

    async def start(self) -> None:
        """Open (or create) the buckets and load their current contents."""
        workers_kv = await ensure_bucket(self._js, workers_bucket(self._subjects))
        types_kv = await ensure_bucket(self._js, types_bucket(self._subjects))
        self._worker_mirror = KvMirror(workers_kv, on_change=self._worker_changed)
        self._type_mirror = KvMirror(types_kv, on_change=self._type_changed)
        await self._worker_mirror.start()
        await self._type_mirror.start()
        self._loaded = True

    async def restart(self) -> None:
        """Watch both buckets anew (after a reconnect): stalled watches resume at once."""
        self._loaded = False
        try:
            for mirror in (self._worker_mirror, self._type_mirror):
                if mirror is not None:
                    await mirror.restart()
        finally:
            self._loaded = True
        logger.info("worker directory reloaded: %d workers", len(self._workers))

    async def aclose(self) -> None:
        for mirror in (self._worker_mirror, self._type_mirror):
            if mirror is not None:
                await mirror.aclose()

    def _worker_changed(self, key: str, entry: MirroredEntry | None) -> None:
        previous = self._workers.pop(key, None)
        if previous is not None:
            for agent_type in previous.agent_types:
                hosts = self._hosts.get(agent_type)
                if hosts is not None:
                    hosts.pop(key, None)
                    if not hosts:
                        del self._hosts[agent_type]
        if entry is None:
            self._seen.pop(key, None)
            if previous is not None and self._on_worker_gone is not None:
                self._on_worker_gone(previous.id)
            return
        try:
            record = WorkerRecord.model_validate_json(entry.value)
        except ValidationError:
            logger.warning("ignoring malformed worker record %r", key)
            return
        self._workers[key] = record
        self._seen[key] = self._arrival(record)
        for agent_type in record.agent_types:
            self._hosts[agent_type][key] = record

    def _type_changed(self, key: str, entry: MirroredEntry | None) -> None:
        try:
            agent_type, worker_id = Subjects.parse_type_key(key)
        except InvalidIdError:
            logger.warning("ignoring malformed type key %r", key)
            return
        if entry is None:
            registrations = self._types.get(agent_type)
            if registrations is not None:
                registrations.pop(worker_id, None)
                if not registrations:
                    del self._types[agent_type]
            return
        try:
            self._types[agent_type][worker_id] = TypeRecord.model_validate_json(entry.value)
        except ValidationError:
            logger.warning("ignoring malformed type record %r", key)

    # Liveness

    def liveness_window(self, record: WorkerRecord) -> float:
        """Seconds after its last heartbeat that a worker still counts as alive."""
        return record.heartbeat_interval * self._config.missed_heartbeats

    def _arrival(self, record: WorkerRecord) -> float:
        """When, on our monotonic clock, this heartbeat counts as received."""
        now = time.monotonic()
        if self._loaded:
            return now
        # Found at start-up: it may be old. Age it by the writer's clock, at most one window.
        age = (datetime.now(UTC) - record.last_heartbeat).total_seconds()
        return now - min(max(age, 0.0), self.liveness_window(record) + 1.0)

    def is_live(self, record: WorkerRecord) -> bool:
        """Whether `record`'s worker heartbeated recently enough, as this process saw it."""
        seen = self._seen.get(record.id)
        if seen is None:
            return False
        return time.monotonic() - seen <= self.liveness_window(record)

    def heartbeat_age(self, worker_id: str) -> float | None:
        """Seconds since this process last heard from `worker_id`; ``None`` if never."""
        seen = self._seen.get(worker_id)
        return None if seen is None else time.monotonic() - seen

    # Lookups

    def live_worker_counts(self) -> dict[str, float]:
        """Live workers per registered agent type (0 for types with none)."""
        types = {t for t, registrations in self._types.items() if registrations} | set(self._hosts)
        return {t: float(len(self.live_workers(t))) for t in sorted(types)}

    def knows_type(self, agent_type: str) -> bool:
        """Whether any worker, alive or not, has registered `agent_type`."""
        return bool(self._types.get(agent_type)) or agent_type in self._hosts

    def is_stateless(self, agent_type: str) -> bool:
        """Whether every registration of `agent_type` declares it stateless."""
        registrations = self._types.get(agent_type)
        if not registrations:
            return False
        return all(r.capabilities.stateless for r in registrations.values())

    def worker(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def workers(self) -> list[WorkerRecord]:
        """Every worker with an entry, alive or lapsing, by id."""
        return sorted(self._workers.values(), key=lambda record: record.id)

    def live_workers(self, agent_type: str | None = None) -> list[WorkerRecord]:
        """Workers that take new requests (for `agent_type`): alive and not draining."""
        pool = self._workers if agent_type is None else self._hosts.get(agent_type, {})
        return [
            record
            for record in pool.values()
            if record.status == "healthy" and self.is_live(record)
        ]

    def takes_requests(self, worker_id: str) -> bool:
        """Whether `worker_id` is alive and not draining."""
        record = self._workers.get(worker_id)
        return record is not None and record.status == "healthy" and self.is_live(record)

    def strategy_of(self, agent_type: str) -> str | None:
        """The load-balancing strategy the type's workers registered, if any."""
        for registration in self._types.get(agent_type, {}).values():
            if registration.capabilities.strategy:
                return registration.capabilities.strategy
        return None

    def type_registrations(self) -> dict[str, dict[str, TypeRecord]]:
        """Agent type -> worker id -> registration, for every known type."""
        return {name: dict(regs) for name, regs in sorted(self._types.items()) if regs}
