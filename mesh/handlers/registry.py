"""The registry service (``mesh-registry``): workers, the agent types they host, liveness.

All state lives in two KV buckets, so any number of replicas can serve at once:

- ``mesh-workers`` / ``<worker_id>``: the worker's record. Every heartbeat rewrites it
  with a per-key TTL of ``missed_heartbeats`` intervals, so a worker that stops
  heartbeating lapses by itself, and lookups drop it as soon as its last heartbeat is
  older than that. A heartbeat is a compare-and-set on the revision the worker last
  got back: a late heartbeat cannot resurrect a deregistered worker.
- ``mesh-types`` / ``<agent_type>.<worker_id>``: one registration per hosted type. It
  outlives a crashed worker for ``type_retention`` (callers then get 503, not 404) and
  is deleted when the worker deregisters.

Endpoints (``mesh.registry.<op>``): register, heartbeat, deregister, lookup, workers, types.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from mesh import __version__
from mesh._connect import on_reconnect
from mesh._control import model_reply, read_request
from mesh._directory import WorkerDirectory, types_bucket, workers_bucket
from mesh._kv import ensure_bucket, put_with_ttl
from mesh._lifecycle import Lifecycle
from mesh._micro import CONTROL_MAX_PAYLOAD, MicroService, Reply
from mesh.config import RegistryConfig
from mesh.errors import AgentTypeNotFoundError, BadRequestError, WorkerNotRegisteredError
from mesh.ids import validate_agent_type
from mesh.records import (
    AgentTypeSummary,
    DeregisterRequest,
    HeartbeatRequest,
    LookupReply,
    LookupRequest,
    RegisterRequest,
    RegistrationReply,
    TypeRecord,
    TypesReply,
    WorkerRecord,
    WorkersReply,
)
from mesh.subjects import Subjects, validate_worker_id

logger = logging.getLogger(__name__)

SERVICE = "registry"


class Registry(Lifecycle):
    """One replica of the registry service.

    Args:
        nc: A connected NATS client; the registry does not close it.
        subjects: The mesh's names.
        config: Liveness and retention settings.
    """

    def __init__(
        self, nc: NATS, subjects: Subjects | None = None, config: RegistryConfig | None = None
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subjects = subjects or Subjects()
        self._config = config or RegistryConfig()
        self.directory = WorkerDirectory(self._js, self._subjects, self._config)
        self._service = MicroService(
            nc,
            name=self._subjects.micro_name(SERVICE),
            version=__version__,
            description="workers, agent types and their liveness",
            max_payload=CONTROL_MAX_PAYLOAD,
        )
        self._workers_kv: KeyValue | None = None
        self._types_kv: KeyValue | None = None
        self._started = False
        self._forget_reconnect: Callable[[], None] = lambda: None

    async def start(self) -> None:
        """Open the buckets, load the directory and start serving."""
        if self._started:
            return
        self._workers_kv = await ensure_bucket(self._js, workers_bucket(self._subjects))
        self._types_kv = await ensure_bucket(self._js, types_bucket(self._subjects))
        await self.directory.start()
        queue = self._subjects.queue_group(SERVICE)
        endpoints = {
            "register": self._register,
            "heartbeat": self._heartbeat,
            "deregister": self._deregister,
            "lookup": self._lookup,
            "workers": self._list_workers,
            "types": self._list_types,
        }
        for op, handler in endpoints.items():
            await self._service.add_endpoint(
                op, subject=self._subjects.service(SERVICE, op), handler=handler, queue_group=queue
            )
        await self._service.start()
        self._forget_reconnect = on_reconnect(self._nc, self.directory.restart)
        self._started = True

    async def shutdown(self, grace: float = 5.0) -> None:
        """Finish in-flight requests and stop. Idempotent."""
        if not self._started:
            return
        self._started = False
        self._forget_reconnect()
        await self._service.stop(grace)
        await self.directory.aclose()

    # Writes

    def _worker_ttl(self, record: WorkerRecord) -> float:
        return self.directory.liveness_window(record)

    def _checked(self, record: WorkerRecord) -> WorkerRecord:
        validate_worker_id(record.id)
        for name in record.agent_types:
            validate_agent_type(name)
        if record.heartbeat_interval <= 0:
            raise BadRequestError("heartbeat_interval must be positive")
        return record.model_copy(update={"last_heartbeat": datetime.now(UTC)})

    async def _put_type(self, worker_id: str, spec_record: TypeRecord) -> None:
        key = Subjects.type_key(spec_record.agent_type, worker_id)
        await put_with_ttl(
            self._js,
            self._subjects.types_bucket,
            key,
            spec_record.model_dump_json().encode(),
            self._config.type_retention,
        )

    async def _register(self, msg: Msg) -> Reply:
        request = read_request(msg, RegisterRequest)
        record = self._checked(request.worker)
        for spec in request.types:
            validate_agent_type(spec.name)
        now = datetime.now(UTC)
        for spec in request.types:
            await self._put_type(
                record.id,
                TypeRecord(
                    agent_type=spec.name,
                    worker_id=record.id,
                    capabilities=spec,
                    metadata=spec.metadata,
                    registered_at=now,
                    refreshed_at=now,
                ),
            )
        revision = await put_with_ttl(
            self._js,
            self._subjects.workers_bucket,
            Subjects.worker_key(record.id),
            record.model_dump_json().encode(),
            self._worker_ttl(record),
        )
        logger.info("registered worker %s hosting %s", record.id, ", ".join(record.agent_types))
        return model_reply(msg, RegistrationReply(revision=revision, ttl=self._worker_ttl(record)))

    async def _heartbeat(self, msg: Msg) -> Reply:
        request = read_request(msg, HeartbeatRequest)
        record = self._checked(request.worker)
        try:
            revision = await put_with_ttl(
                self._js,
                self._subjects.workers_bucket,
                Subjects.worker_key(record.id),
                record.model_dump_json().encode(),
                self._worker_ttl(record),
                last_revision=request.revision,
            )
        except KeyWrongLastSequenceError:
            raise WorkerNotRegisteredError(
                f"worker {record.id} is not registered at revision {request.revision};"
                " register again"
            ) from None
        await self._refresh_types(record)
        return model_reply(msg, RegistrationReply(revision=revision, ttl=self._worker_ttl(record)))

    async def _refresh_types(self, record: WorkerRecord) -> None:
        """Keep a live worker's type registrations from lapsing."""
        registrations = self.directory.type_registrations()
        stale_before = datetime.now(UTC) - timedelta(seconds=self._config.type_retention / 2)
        for name in record.agent_types:
            existing = registrations.get(name, {}).get(record.id)
            if existing is not None and existing.refreshed_at < stale_before:
                await self._put_type(
                    record.id, existing.model_copy(update={"refreshed_at": datetime.now(UTC)})
                )

    async def _deregister(self, msg: Msg) -> Reply:
        request = read_request(msg, DeregisterRequest)
        worker_id = validate_worker_id(request.worker_id)
        assert self._workers_kv is not None and self._types_kv is not None
        # This replica's view may not have seen the registration yet: the worker's own
        # list of its types is the authority, the view only adds to it.
        agent_types = {validate_agent_type(name) for name in request.agent_types}
        record = self.directory.worker(worker_id)
        agent_types.update(record.agent_types if record else [])
        for name, registrations in self.directory.type_registrations().items():
            if worker_id in registrations:
                agent_types.add(name)
        for name in sorted(agent_types):
            with contextlib.suppress(KeyNotFoundError):
                await self._types_kv.delete(Subjects.type_key(name, worker_id))
        with contextlib.suppress(KeyNotFoundError):
            await self._workers_kv.delete(Subjects.worker_key(worker_id))
        logger.info("deregistered worker %s", worker_id)
        return model_reply(msg, None)

    # Reads

    async def _lookup(self, msg: Msg) -> Reply:
        request = read_request(msg, LookupRequest)
        agent_type = validate_agent_type(request.agent_type)
        if not self.directory.knows_type(agent_type):
            raise AgentTypeNotFoundError(f"no worker has registered agent type {agent_type!r}")
        workers = self.directory.live_workers(agent_type)
        return model_reply(msg, LookupReply(agent_type=agent_type, workers=workers))

    async def _list_workers(self, msg: Msg) -> Reply:
        workers = [record for record in self.directory.workers() if self.directory.is_live(record)]
        return model_reply(msg, WorkersReply(workers=workers))

    async def _list_types(self, msg: Msg) -> Reply:
        live = {record.id for record in self.directory.live_workers()}
        summaries = []
        for name, registrations in self.directory.type_registrations().items():
            specs = list(registrations.values())
            summaries.append(
                AgentTypeSummary(
                    name=name,
                    workers=sorted(registrations),
                    live_workers=sorted(w for w in registrations if w in live),
                    handlers=sorted({h for spec in specs for h in spec.capabilities.handlers}),
                    stateless=any(spec.capabilities.stateless for spec in specs),
                )
            )
        return model_reply(msg, TypesReply(types=summaries))


async def wait_for_registry(nc: NATS, subjects: Subjects, timeout: float) -> None:
    """Return once a registry replica answers, or raise `TimeoutError` after `timeout`."""
    subject = f"$SRV.PING.{subjects.micro_name(SERVICE)}"
    async with asyncio.timeout(timeout):
        while True:
            try:
                await nc.request(subject, b"", timeout=0.5)
                return
            except Exception:
                await asyncio.sleep(0.1)
