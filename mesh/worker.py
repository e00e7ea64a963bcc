"""A worker process: hosts agent types, serves their requests, heartbeats its load.

Life of a worker: register its agent types with the registry, serve
``mesh.worker.<id>.rpc.>`` (each agent one message at a time, agents concurrently),
heartbeat every interval with its load. On shutdown (SIGTERM, or ``ctl.drain``):
announce ``draining`` so gateways stop sending, stop receiving, let in-flight
requests finish, deregister, deactivate agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgpack
import psutil
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import __version__, metrics
from mesh._activations import ActivationTable
from mesh._control import control_request, model_reply, read_request
from mesh._deadlines import DeadlineWheel
from mesh._lifecycle import Lifecycle
from mesh._micro import MicroService, Reply
from mesh._persistence import StateKeeper
from mesh._placement import PlacementTable
from mesh._state_store import StateStore
from mesh._trace import hop
from mesh._wire import (
    CONTENT_TYPE,
    EPOCH,
    MSG_TYPE,
    REQUEST_ID,
    SENDER,
    TOPIC,
    TRACEPARENT,
    Deadline,
    current_deadline,
    new_request_id,
    parse_timeout,
    request_codec,
)
from mesh._worker_events import WorkerEvents
from mesh.agent import (
    Agent,
    AgentDefinitionError,
    HandlerSpec,
    MessageContext,
    RawMessage,
    RawReply,
    agent_types_of,
)
from mesh.client import MeshClient
from mesh.codec import JSON, MSGPACK, decode, encode
from mesh.config import StateConfig, WorkerConfig
from mesh.errors import (
    AgentTypeNotFoundError,
    DeadlineExceededError,
    DecodeError,
    HandlerError,
    InvalidIdError,
    MeshError,
    NoWorkerAvailableError,
    UnknownMessageTypeError,
    WorkerNotRegisteredError,
)
from mesh.handlers.router import SubscribeRequest
from mesh.ids import AgentId, TopicId
from mesh.records import (
    AgentTypeSpec,
    DeactivateReply,
    DeactivateRequest,
    DeregisterRequest,
    HeartbeatRequest,
    RegisterRequest,
    RegistrationReply,
    WorkerLoad,
    WorkerRecord,
    WorkerStatus,
)
from mesh.subjects import Subjects, validate_worker_id
from mesh.subscriptions import Subscription, declared_subscriptions

logger = logging.getLogger(__name__)

SERVICE = "worker"
#: The longest a handler may run when the request named no deadline.
MAX_HANDLER_TIME = 3600.0
#: Weight of the newest sample in the load averages reported to the registry.
EWMA_WEIGHT = 0.2
CONTROL_TIMEOUT = 2.0


def new_worker_id() -> str:
    """A readable, unique worker id: host, pid and a random suffix."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class _LoadMeter:
    """Counts and running averages reported with each heartbeat."""

    def __init__(self) -> None:
        self.requests = 0
        self.latency = 0.0
        self.error_rate = 0.0
        self._process = psutil.Process()
        self._process.cpu_percent(None)

    def record(self, seconds: float, failed: bool) -> None:
        self.requests += 1
        self.latency += EWMA_WEIGHT * (seconds - self.latency)
        self.error_rate += EWMA_WEIGHT * ((1.0 if failed else 0.0) - self.error_rate)

    def snapshot(self, inflight: int, capacity: int, activations: int) -> WorkerLoad:
        return WorkerLoad(
            inflight=inflight,
            capacity=capacity,
            activations=activations,
            cpu=self._process.cpu_percent(None) / 100.0,
            rss=self._process.memory_info().rss,
            latency=self.latency,
            error_rate=self.error_rate,
            requests=self.requests,
        )


class Worker(Lifecycle):
    """Hosts agent types on one NATS connection.

    Args:
        nc: A connected NATS client; the worker does not close it.
        agents: The agent classes to host.
        config: Worker settings.
        subjects: The mesh's names.
    """

    def __init__(
        self,
        nc: NATS,
        agents: Sequence[type[Agent]],
        config: WorkerConfig | None = None,
        subjects: Subjects | None = None,
    ) -> None:
        self._nc = nc
        self._config = config or WorkerConfig()
        self._subjects = subjects or Subjects()
        self._classes = agent_types_of(list(agents))
        self.id = validate_worker_id(self._config.worker_id or new_worker_id())
        self._placements = PlacementTable(nc.jetstream(), self._subjects, watch=False)
        # Agents' state goes to KV directly, with the state service's own code.
        self._state_store: StateStore | None = None
        keeper = None
        if any(cls.persistent() for cls in self._classes.values()):
            self._state_store = StateStore(nc.jetstream(), self._subjects, StateConfig.from_env())
            keeper = StateKeeper(self._state_store, writer=self.id)
        self._activations = ActivationTable(
            self._classes,
            MeshClient(nc, subjects=self._subjects),
            on_deactivated=self._release_placement,
            keeper=keeper,
            mailbox_limit=self._config.mailbox_limit,
        )
        self._service = MicroService(
            nc,
            name=self._subjects.micro_name(SERVICE),
            version=__version__,
            description="hosts agents: " + ", ".join(sorted(self._classes)),
            metadata={"worker_id": self.id},
        )
        self._events = WorkerEvents(
            nc,
            self._subjects,
            self.id,
            self._serve_event,
            lambda agent_type: self._classes[agent_type].stateless,
        )
        self._load = _LoadMeter()
        # Handlers' deadlines: cheaper than asyncio.timeout, kept up to 50 ms late.
        self._deadlines = DeadlineWheel()
        self._inflight = 0
        self._started_at = datetime.now(UTC)
        self._status: WorkerStatus = "healthy"
        self._revision: int | None = None
        # One heartbeat at a time: two with the same revision would fail each other's CAS.
        self._heartbeat_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        # Requests running or waiting here, by request id: a caller's cancel finds them.
        self._running: dict[str, asyncio.Task[Any]] = {}
        # Cancels that came before their request (it was still on its way), briefly.
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._cancelled_here: set[asyncio.Task[Any]] = set()
        self._pinned: set[AgentId] = set()
        self._cancel_subscriptions: list[Any] = []
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._state = "new"

    def activation_counts(self) -> dict[str, float]:
        """Active agents per hosted type."""
        return {
            t: float(n) for t, n in self._activations.counts_by_type(list(self._classes)).items()
        }

    @property
    def agent_types(self) -> list[str]:
        return sorted(self._classes)

    @property
    def activations(self) -> int:
        return len(self._activations)

    # Lifecycle

    async def start(self) -> None:
        """Serve, register, and start heartbeating."""
        if self._state != "new":
            return
        self._state = "starting"
        if self._state_store is not None:
            await self._state_store.start()
        await self._service.add_endpoint(
            "rpc",
            subject=self._subjects.worker_rpc_all(self.id),
            handler=self._serve_rpc,
            max_in_flight=self._config.max_in_flight,
        )
        await self._serve_types(self._classes)
        await self._service.add_endpoint(
            "batch",
            subject=self._subjects.worker_batch(self.id),
            handler=self._serve_batch,
            max_in_flight=self._config.max_in_flight,
        )
        await self._service.add_endpoint(
            "stats", subject=self._subjects.worker_ctl(self.id, "stats"), handler=self._stats
        )
        await self._service.add_endpoint(
            "drain", subject=self._subjects.worker_ctl(self.id, "drain"), handler=self._drain
        )
        await self._service.add_endpoint(
            "deactivate",
            subject=self._subjects.worker_ctl(self.id, "deactivate"),
            handler=self._deactivate,
        )
        await self._service.start()
        try:
            await self._placements.start()
            await self._register(self._config.register_timeout)
        except BaseException:
            await self._service.stop(0)
            self._state = "stopped"
            self._stopped.set()
            raise
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat:{self.id}"),
            asyncio.create_task(self._eviction_loop(), name=f"evict:{self.id}"),
        ]
        self._subscribe_declared(self._classes)
        await self._events.follow(self._classes)
        self._state = "running"
        logger.info("worker %s serving %s", self.id, ", ".join(self.agent_types))

    async def add_agents(self, agents: Sequence[type[Agent]]) -> None:
        """Host more agent types, also while running: they are served, registered with
        the registry and their declared subscriptions made before this returns (the
        subscriptions only once a router takes them)."""
        added = agent_types_of(list(agents))
        for name, cls in added.items():
            if self._classes.get(name, cls) is not cls:
                raise AgentDefinitionError(f"worker {self.id} already hosts agent type {name!r}")
        added = {name: cls for name, cls in added.items() if name not in self._classes}
        if not added:
            return
        if self._state_store is None and any(cls.persistent() for cls in added.values()):
            self._state_store = StateStore(
                self._nc.jetstream(), self._subjects, StateConfig.from_env()
            )
            self._activations.use_keeper(StateKeeper(self._state_store, writer=self.id))
            if self._state != "new":
                await self._state_store.start()
        self._classes.update(added)
        if self._state != "running":
            return  # start() serves and registers them
        await self._serve_types(added)
        async with self._heartbeat_lock:
            await self._register(self._config.register_timeout)
        self._subscribe_declared(added)
        await self._events.follow(added)

    async def claim(self, agent_id: AgentId) -> None:
        """Pin `agent_id` to this worker: placed here (taken over by compare-and-set if
        it is placed elsewhere), never released when idle, and placed here again after
        a lapse. For agents only this worker can host, such as an instance registered
        by hand."""
        self._pinned.add(agent_id)
        placement = await self._placements.place(agent_id, self.id)
        for _ in range(MAX_CLAIM_ROUNDS):
            if placement.worker_id == self.id:
                return
            # Moved by compare-and-set from what we saw; the winner of a race comes back.
            placement = await self._placements.move(agent_id, placement, self.id)
        raise NoWorkerAvailableError(f"could not place {agent_id} on worker {self.id}")

    async def _serve_types(self, classes: dict[str, type[Agent]]) -> None:
        """Serve the stateless types' pools, and listen for callers' cancellations."""
        for name, cls in sorted(classes.items()):
            if cls.stateless:
                await self._service.add_endpoint(
                    f"pool-{name}",
                    subject=self._subjects.pool_all(name),
                    handler=self._serve_pool,
                    queue_group=self._subjects.pool_queue(name),
                    max_in_flight=self._config.max_in_flight,
                )
            self._cancel_subscriptions.append(
                await self._nc.subscribe(self._subjects.cancel_all(name), cb=self._cancel_request)
            )

    def _subscribe_declared(self, classes: dict[str, type[Agent]]) -> None:
        subscriptions = [
            sub
            for name, cls in sorted(classes.items())
            for sub in declared_subscriptions(cls, name)
        ]
        if subscriptions:
            self._tasks.append(
                asyncio.create_task(self._subscribe(subscriptions), name=f"subscribe:{self.id}")
            )

    def request_stop(self) -> None:
        """Ask `run` to shut down gracefully (safe from a signal handler)."""
        self._stop_requested.set()

    async def run(self, *, handle_signals: bool = False) -> None:
        """Start, serve until asked to stop (SIGTERM/SIGINT when `handle_signals`), drain."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await self.shutdown()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def shutdown(self) -> None:
        """Drain and leave: stop taking work, finish in-flight requests, deregister.

        Idempotent; concurrent callers wait for the first one to finish.
        """
        if self._state in ("stopping", "stopped"):
            await self._stopped.wait()
            return
        if self._state == "new":
            self._state = "stopped"
            self._stopped.set()
            return
        self._state = "stopping"
        try:
            # Heartbeats go on while draining, so the registry shows "draining", not lapsed.
            self._status = "draining"
            with contextlib.suppress(MeshError):
                await self._send_heartbeat()
            # Events first: what is queued goes back, and another worker takes over.
            await self._events.stop(self._config.drain_timeout)
            await self._service.stop(self._config.drain_timeout)
            await self._events.aclose()
            for subscription in self._cancel_subscriptions:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
            self._cancel_subscriptions.clear()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            try:
                await control_request(
                    self._nc,
                    self._subjects.service("registry", "deregister"),
                    DeregisterRequest(worker_id=self.id, agent_types=self.agent_types),
                    None,
                    timeout=CONTROL_TIMEOUT,
                )
            except MeshError as exc:
                logger.warning("worker %s could not deregister: %s", self.id, exc)
            await self._activations.deactivate_all()
            self._deadlines.close()
            logger.info("worker %s stopped", self.id)
        finally:
            self._state = "stopped"
            self._stopped.set()

    # Registry

    def _record(self) -> WorkerRecord:
        return WorkerRecord(
            id=self.id,
            subject=self._subjects.worker(self.id),
            agent_types=self.agent_types,
            started_at=self._started_at,
            heartbeat_interval=self._config.heartbeat_interval,
            load=self._load.snapshot(self._inflight, self._config.capacity, len(self._activations)),
            status=self._status,
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
        )

    def _type_specs(self) -> list[AgentTypeSpec]:
        return [
            AgentTypeSpec(
                name=name,
                handlers=sorted(cls.handlers),
                stateless=cls.stateless,
                strategy=cls.strategy,
                description=cls.description,
            )
            for name, cls in sorted(self._classes.items())
        ]

    async def _register(self, timeout: float) -> None:
        """Register, retrying until a registry answers or `timeout` passes."""
        subject = self._subjects.service("registry", "register")
        request = RegisterRequest(worker=self._record(), types=self._type_specs())
        delay = 0.05
        last_error: MeshError | None = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        reply = await control_request(
                            self._nc, subject, request, RegistrationReply, timeout=CONTROL_TIMEOUT
                        )
                        break
                    except (NoWorkerAvailableError, DeadlineExceededError) as exc:
                        last_error = exc
                        logger.info("worker %s waiting for a registry: %s", self.id, exc)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 1.0)
        except TimeoutError:
            raise NoWorkerAvailableError(
                f"no registry accepted worker {self.id} within {timeout:g}s: {last_error}"
            ) from None
        assert reply is not None
        self._revision = reply.revision

    async def _send_heartbeat(self) -> None:
        async with self._heartbeat_lock:
            await self._send_heartbeat_now()

    async def _send_heartbeat_now(self) -> None:
        if self._revision is None:
            await self._register(CONTROL_TIMEOUT)
            return
        try:
            reply = await control_request(
                self._nc,
                self._subjects.service("registry", "heartbeat"),
                HeartbeatRequest(worker=self._record(), revision=self._revision),
                RegistrationReply,
                timeout=CONTROL_TIMEOUT,
            )
        except WorkerNotRegisteredError:
            logger.warning("worker %s lost its registration; registering again", self.id)
            self._revision = None
            await self._register(CONTROL_TIMEOUT)
            # Lapsed (paused, cut off): agents may have moved elsewhere meanwhile.
            await self._drop_moved_agents()
            return
        assert reply is not None
        self._revision = reply.revision

    async def _subscribe(self, subscriptions: list[Subscription]) -> None:
        """Register the agent classes' declared subscriptions, until a router takes them."""
        subject = self._subjects.service("router", "subscribe")
        for subscription in subscriptions:
            request = SubscribeRequest(
                kind=subscription.kind,
                topic=subscription.topic,
                agent_type=subscription.agent_type,
            )
            delay = 0.1
            while True:
                try:
                    await control_request(self._nc, subject, request, None, timeout=CONTROL_TIMEOUT)
                    break
                except MeshError as exc:
                    if exc.code < 500:  # refused: retrying will not help
                        logger.error("worker %s: subscription refused: %s", self.id, exc)
                        break
                    logger.info("worker %s waiting for a router: %s", self.id, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        logger.info("worker %s registered %d subscriptions", self.id, len(subscriptions))

    async def _heartbeat_loop(self) -> None:
        # Past this long without a heartbeat going out, gateways count this worker
        # gone and may have moved its agents (a pause, a stall, a partition).
        lapse = LAPSE_HEARTBEATS * self._config.heartbeat_interval
        last_sent = time.monotonic()
        while True:
            await asyncio.sleep(self._config.heartbeat_interval)
            lapsed = time.monotonic() - last_sent > lapse
            try:
                await self._send_heartbeat()
                last_sent = time.monotonic()
            except (MeshError, TimeoutError) as exc:
                logger.warning("worker %s heartbeat failed: %s", self.id, exc)
            if lapsed:
                await self._drop_moved_agents()

    async def _eviction_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.idle_timeout / 2)
            evicted = await self._activations.evict_idle(self._config.idle_timeout)
            if evicted:
                logger.info("worker %s deactivated %d idle agents", self.id, evicted)

    # Requests

    @staticmethod
    def _handler_for(cls: type[Agent], agent_id: AgentId, headers: dict[str, str]) -> HandlerSpec:
        name = headers.get(MSG_TYPE)
        if not name:
            if len(cls.handlers) == 1:
                return next(iter(cls.handlers.values()))
            raise UnknownMessageTypeError(
                f"{agent_id.type} handles {', '.join(sorted(cls.handlers))}:"
                f" say which in {MSG_TYPE}"
            )
        spec = cls.handlers.get(name)
        if spec is None:
            shown = name if len(name) <= 80 else f"{name[:80]}... ({len(name)} characters)"
            raise UnknownMessageTypeError(
                f"{agent_id.type} has no handler for {shown!r};"
                f" it handles {', '.join(sorted(cls.handlers))}"
            )
        return spec

    async def _serve_rpc(self, msg: Msg) -> Reply:
        return await self._serve(msg, self._subjects.parse_worker_rpc(self.id, msg.subject))

    async def _serve_pool(self, msg: Msg) -> Reply:
        return await self._serve(msg, self._subjects.parse_pool(msg.subject))

    async def _serve(self, msg: Msg, agent_id: AgentId) -> Reply:
        return await self._serve_one(agent_id, msg.data, dict(msg.headers or {}))

    async def _serve_batch(self, msg: Msg) -> Reply:
        """Several events' deliveries in one message; each runs as a request of its own.

        Body (msgpack): ``{"items": [[agent_type, key, headers, body], ...]}``; reply:
        ``{"results": [[code, type, message], ...]}`` in the same order, code 0 for success.
        """
        try:
            batch = msgpack.unpackb(msg.data, raw=False)
            items = [(AgentId(str(t), str(k)), dict(h), bytes(d)) for t, k, h, d in batch["items"]]
        except MeshError:
            raise
        except Exception as exc:
            raise DecodeError(f"not a delivery batch: {exc}") from exc

        async def one(agent_id: AgentId, headers: dict[str, str], data: bytes) -> list[object]:
            try:
                await self._serve_event(agent_id, data, headers)
            except MeshError as exc:
                return [int(exc.code), exc.wire_type, exc.message]
            return [0, "", ""]

        results = await asyncio.gather(*(one(a, h, d) for a, h, d in items))
        return msgpack.packb({"results": results}), {CONTENT_TYPE: MSGPACK}

    async def _serve_one(self, agent_id: AgentId, data: bytes, headers: dict[str, str]) -> Reply:
        """A request: its reply, or the `MeshError` to answer with."""
        reply = await self._serve_message(agent_id, data, headers, True, None, _epoch_of(headers))
        assert reply is not None
        return reply

    def _serve_event(
        self,
        agent_id: AgentId,
        data: bytes,
        headers: dict[str, str],
        timeout: float | None = None,
        epoch: int | None = None,
    ) -> Awaitable[Reply | None]:
        """Serve an event: what the handler returns goes nowhere, and no caller can
        cancel it.

        Read here, its handler's `timeout` and the `epoch` of its placement here come as
        arguments; from another worker, in its headers."""
        if epoch is None:
            epoch = _epoch_of(headers)
        return self._serve_message(agent_id, data, headers, False, timeout, epoch)

    async def _serve_message(
        self,
        agent_id: AgentId,
        data: bytes,
        headers: dict[str, str],
        answer: bool,
        timeout: float | None,
        epoch: int | None,
    ) -> Reply | None:
        request_id = headers.get(REQUEST_ID) or new_request_id()
        # This task serves this one message: its log lines and what the handler sends
        # carry the message's trace.
        with hop(
            f"mesh handle {agent_id.type}",
            headers,
            agent_id=str(agent_id),
            request_id=request_id,
            server=TOPIC not in headers,
        ) as trace:
            started = time.monotonic()
            failed = True
            code = "200"
            self._inflight += 1
            metrics.HANDLED.in_flight += 1
            try:
                body, reply_headers = await self._handle(
                    agent_id, data, headers, request_id, answer, timeout, epoch
                )
                failed = False
                if not answer:
                    return None
                return body, {**(reply_headers or {}), TRACEPARENT: trace.header()}
            except MeshError as exc:
                exc.request_id = request_id
                code = str(int(exc.code))
                # The caller's mistakes (4xx) say nothing about this worker's health.
                failed = exc.code >= 500
                raise
            finally:
                self._inflight -= 1
                metrics.HANDLED.in_flight -= 1
                elapsed = time.monotonic() - started
                self._load.record(elapsed, failed)
                metrics.observe_handled(agent_id.type, code, elapsed)
                logger.debug("%s answered %s in %.2f ms", agent_id, code, elapsed * 1e3)

    async def _handle(
        self,
        agent_id: AgentId,
        data: bytes,
        headers: dict[str, str],
        request_id: str,
        answer: bool,
        timeout: float | None,
        epoch: int | None,
    ) -> Reply:
        cls = self._activations.agent_class(agent_id.type)
        if cls is None:
            raise AgentTypeNotFoundError(f"worker {self.id} does not host {agent_id.type!r}")
        if timeout is None:
            timeout = parse_timeout(headers, MAX_HANDLER_TIME, MAX_HANDLER_TIME)
        if cls.raw:
            return await self._handle_raw(
                agent_id, data, headers, request_id, answer, timeout, epoch
            )
        codec = request_codec(headers)
        spec = self._handler_for(cls, agent_id, headers)
        message = decode(data, spec.message_type, codec)
        # This task serves this one request: what the handler sends inherits its deadline.
        current_deadline.set(Deadline(timeout))
        ctx = self._context(agent_id, spec.message_type_name, request_id, headers, timeout)
        result = await self._run_handler(
            agent_id,
            spec.name,
            timeout,
            request_id,
            epoch,
            lambda a: spec.method(a, message, ctx),
            cancellable=answer,
        )
        if not answer:
            return b"", None
        try:
            body = encode(result, codec)
        except TypeError as exc:
            raise HandlerError(f"{spec.name} returned what cannot be encoded: {exc}") from exc
        return body, {CONTENT_TYPE: codec.content_type, REQUEST_ID: request_id}

    async def _handle_raw(
        self,
        agent_id: AgentId,
        data: bytes,
        headers: dict[str, str],
        request_id: str,
        answer: bool,
        timeout: float,
        epoch: int | None,
    ) -> Reply:
        """A message for a type that decodes its own: handed over as it came."""
        current_deadline.set(Deadline(timeout))
        message = RawMessage(
            data=data,
            content_type=headers.get(CONTENT_TYPE) or JSON,
            message_type=headers.get(MSG_TYPE) or None,
        )
        ctx = self._context(agent_id, message.message_type or "", request_id, headers, timeout)
        reply: RawReply = await self._run_handler(
            agent_id,
            "on_raw_message",
            timeout,
            request_id,
            epoch,
            lambda agent: agent.on_raw_message(message, ctx),
            cancellable=answer,
        )
        reply_headers = {CONTENT_TYPE: reply.content_type, REQUEST_ID: request_id}
        if reply.message_type:
            reply_headers[MSG_TYPE] = reply.message_type
        return reply.data, reply_headers

    def _context(
        self,
        agent_id: AgentId,
        message_type: str,
        request_id: str,
        headers: dict[str, str],
        timeout: float,
    ) -> MessageContext:
        sender_text = headers.get(SENDER)
        topic_text = headers.get(TOPIC)
        return MessageContext(
            agent_id=agent_id,
            message_type=message_type,
            request_id=request_id,
            sender=_agent_id_in(sender_text) if sender_text else None,
            worker_id=self.id,
            headers=headers,
            deadline=timeout,
            topic=_topic_in(topic_text) if topic_text else None,
        )

    async def _run_handler(
        self,
        agent_id: AgentId,
        name: str,
        timeout: float,
        request_id: str,
        epoch: int | None,
        call: Callable[[Agent], Awaitable[Any]],
        *,
        cancellable: bool,
    ) -> Any:
        """Run `call` on the agent in its mailbox, within `timeout`; when `cancellable`,
        a caller's cancel notice (`mesh.cancel`) cancels it. `epoch`: the revision of
        the agent's placement here, when the message names it."""

        task = asyncio.current_task()
        assert task is not None  # every message is served in a task of its own
        if cancellable:
            if self._cancelled.pop(request_id, None) is not None:
                raise NoWorkerAvailableError(f"request {request_id} was cancelled by its caller")
            self._running[request_id] = task
        deadline = self._deadlines.scope(timeout, task)
        try:
            with deadline:
                return await self._activations.run(agent_id, call, epoch)
        except asyncio.CancelledError:
            if task not in self._cancelled_here:
                raise  # shutting down
            self._cancelled_here.discard(task)
            task.uncancel()
            raise NoWorkerAvailableError(
                f"request {request_id} was cancelled by its caller"
            ) from None
        except TimeoutError as exc:
            if deadline.expired:
                raise DeadlineExceededError(
                    f"{agent_id} did not answer within {timeout:g}s"
                ) from None
            raise self._handler_failed(name, agent_id, request_id, exc) from exc
        except MeshError as exc:
            if exc.remote:
                # A call the handler made failed: that is this handler's failure, not
                # the caller's 404 or 504.
                raise self._handler_failed(name, agent_id, request_id, exc) from exc
            raise  # raised on purpose, with the code the handler chose
        except Exception as exc:
            raise self._handler_failed(name, agent_id, request_id, exc) from exc
        finally:
            if cancellable:
                self._cancelled_here.discard(task)
                if self._running.get(request_id) is task:
                    del self._running[request_id]

    async def _cancel_request(self, msg: Msg) -> None:
        """A caller gave up on a request: cancel it if it runs (or waits) here."""
        request_id = (msg.headers or {}).get(REQUEST_ID, "")
        if not request_id:
            return
        task = self._running.get(request_id)
        if task is not None and not task.done():
            logger.info("request %s cancelled by its caller", request_id)
            self._cancelled_here.add(task)
            task.cancel()
            return
        # Not here (yet): it may still be on its way through the gateway.
        now = time.monotonic()
        self._cancelled[request_id] = now + CANCEL_MEMORY
        while self._cancelled and (
            len(self._cancelled) > MAX_EARLY_CANCELS or next(iter(self._cancelled.values())) < now
        ):
            self._cancelled.popitem(last=False)

    @staticmethod
    def _handler_failed(
        name: str, agent_id: AgentId, request_id: str, exc: Exception
    ) -> HandlerError:
        logger.error(
            "handler %s of %s failed (request %s)",
            name,
            agent_id,
            request_id,
            exc_info=exc,
        )
        return HandlerError(f"{type(exc).__name__}: {exc}")

    async def _drop_moved_agents(self) -> None:
        """Deactivate agents whose placement now names another worker (or none); pinned
        agents are placed here again."""
        for agent_id in list(self._pinned):
            try:
                await self.claim(agent_id)
            except Exception as exc:
                logger.warning("could not place pinned %s here again: %s", agent_id, exc)
        for agent_id in self._activations.active_ids():
            if self._classes[agent_id.type].stateless:
                continue
            try:
                placement = await self._placements.current(agent_id)
            except Exception as exc:
                logger.warning("could not check the placement of %s: %s", agent_id, exc)
                continue
            if placement is None or placement.worker_id != self.id:
                logger.warning(
                    "%s moved to another worker while this one lapsed; dropping it", agent_id
                )
                await self._activations.deactivate(agent_id)

    async def _release_placement(self, agent_id: AgentId) -> None:
        """An agent left this worker: drop its placement, if it still names us."""
        if self._classes[agent_id.type].stateless or agent_id in self._pinned:
            return
        try:
            await self._placements.release(agent_id, self.id)
        except Exception as exc:
            logger.warning("could not release the placement of %s: %s", agent_id, exc)

    async def _stats(self, msg: Msg) -> Reply:
        return model_reply(msg, self._record())

    async def _deactivate(self, msg: Msg) -> Reply:
        request = read_request(msg, DeactivateRequest)
        agent_id = AgentId(request.type, request.key)
        found = await self._activations.deactivate(agent_id)
        return model_reply(msg, DeactivateReply(deactivated=found))

    async def _drain(self, msg: Msg) -> Reply:
        self.request_stop()
        return model_reply(msg, None)


async def run_worker(
    nc: NATS,
    agents: Sequence[type[Agent]],
    config: WorkerConfig | None = None,
    subjects: Subjects | None = None,
) -> None:
    """Run a worker until SIGTERM or SIGINT, then drain and return."""
    worker = Worker(nc, agents, config, subjects)
    await worker.run(handle_signals=True)


#: Heartbeat intervals without a heartbeat after which gateways count a worker gone.
LAPSE_HEARTBEATS = 3
#: How long, and for how many requests, a cancel that came before its request is kept.
CANCEL_MEMORY = 60.0
MAX_EARLY_CANCELS = 10_000
#: Attempts at pinning an agent that other workers keep placing meanwhile.
MAX_CLAIM_ROUNDS = 8


@functools.lru_cache(maxsize=4096)
def _agent_id_in(text: str) -> AgentId | None:
    """The sender a header names (None if it names none); ids repeat, parsing is cached."""
    try:
        return AgentId.parse(text)
    except InvalidIdError:
        return None


@functools.lru_cache(maxsize=4096)
def _topic_in(text: str) -> TopicId | None:
    """The topic a header names (None if it names none); topics repeat, parsing is cached."""
    try:
        return TopicId.parse(text)
    except InvalidIdError:
        return None


def _epoch_of(headers: dict[str, str]) -> int | None:
    raw = headers.get(EPOCH, "")
    return int(raw) if raw.isascii() and raw.isdigit() else None
