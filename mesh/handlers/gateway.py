"""The gateway service (``mesh-gateway``): the single entry for agent requests.

It serves ``mesh.rpc.<type>.<key>`` in a queue group, so any number of replicas share
the load. For each request it checks the id and payload size; with auth on, the
credentials (401), the agent type against the client's patterns (403) and the client's
rate (429, shared across replicas: `mesh._ratelimit`); then the content type and
deadline, and then:

- **agents with identity** go to their one activation: the placement table
  (``mesh-placement``, watched locally) names the worker; a new agent is placed on
  the worker its type's load-balancing strategy picks (create-if-absent, so racing
  gateways agree), and an agent whose worker is gone, draining or unhealthy is moved
  (compare-and-set) before the request is forwarded to
  ``mesh.worker.<id>.rpc.<type>.<key>``;
- **stateless types** go to ``mesh.pool.<type>.<key>``, where their workers share a
  queue group, so any one of them takes it.

A forward that finds nobody there ("no responders": the worker died since the
directory last heard from it) marks the worker unhealthy for a cooling-off period and
is retried once on a new placement, so a crash costs callers nothing. A forward that
times out is not retried (it may have run): the caller gets 504, and repeated
timeouts mark the worker unhealthy too. The worker's reply is relayed unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from mesh import __version__, metrics
from mesh._auth import Authenticator
from mesh._balancing import (
    Candidate,
    Health,
    Strategy,
    WorkerStats,
    choose,
    make_strategy,
)
from mesh._connect import on_reconnect
from mesh._directory import WorkerDirectory
from mesh._lifecycle import Lifecycle
from mesh._micro import MicroService, Reply
from mesh._placement import Placement, PlacementTable
from mesh._ratelimit import SharedRateLimiter
from mesh._trace import TraceContext, hop
from mesh._wire import (
    CLIENT,
    CONTENT_TYPE,
    EPOCH,
    FORWARDED_HEADERS,
    REQUEST_ID,
    SERVICE_ERROR_CODE,
    TIMEOUT_MS,
    TRACEPARENT,
    Deadline,
    new_request_id,
    parse_timeout,
    request_codec,
)
from mesh.codec import is_opaque
from mesh.config import AuthConfig, GatewayConfig, RegistryConfig
from mesh.errors import (
    AgentTypeNotFoundError,
    DeadlineExceededError,
    MeshError,
    NoWorkerAvailableError,
    PayloadTooLargeError,
    RateLimitedError,
)
from mesh.ids import AgentId
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)

SERVICE = "gateway"
#: A heartbeat later than this many intervals makes a worker's health unknown.
LATE_HEARTBEATS = 1.5
#: Rounds of placement races a request takes part in before it goes with the winner.
PLACEMENT_ROUNDS = 3


class Gateway(Lifecycle):
    """One replica of the gateway.

    Args:
        nc: A connected NATS client; the gateway does not close it.
        subjects: The mesh's names.
        config: Deadlines, payload limit, in-flight limit, strategies, health.
        registry_config: How worker liveness is judged.
        auth: Credentials and rate limits; off unless it says ``enabled``.
        serve: Serve ``mesh.rpc.>``; without it the gateway only forwards what its owner
            hands to `deliver` (the router delivers events this way, one hop shorter).
    """

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects | None = None,
        config: GatewayConfig | None = None,
        registry_config: RegistryConfig | None = None,
        *,
        auth: AuthConfig | None = None,
        serve: bool = True,
    ) -> None:
        self._nc = nc
        self._serve = serve
        self._subjects = subjects or Subjects()
        self._config = config or GatewayConfig()
        self._authenticator: Authenticator | None = None
        self._limiter: SharedRateLimiter | None = None
        if serve and auth is not None and auth.enabled:
            self._authenticator = Authenticator(nc.jetstream(), self._subjects, auth)
            self._limiter = SharedRateLimiter(
                nc,
                self._subjects.service(SERVICE, "usage"),
                member=uuid.uuid4().hex,
                interval=auth.share_interval,
            )
        self.directory = WorkerDirectory(
            nc.jetstream(), self._subjects, registry_config, on_worker_gone=self._worker_gone
        )
        # Forwards waiting on each worker, so that they end when the worker is gone.
        self._waiting_on: dict[str, set[asyncio.Task[Any]]] = {}
        self._abandoned: set[asyncio.Task[Any]] = set()
        self.placements = PlacementTable(nc.jetstream(), self._subjects)
        self._stats: dict[str, WorkerStats] = {}
        self._strategies: dict[str, tuple[str, Strategy]] = {}
        self._service = MicroService(
            nc,
            name=self._subjects.micro_name(SERVICE),
            version=__version__,
            description="entry point for agent requests",
        )
        self._started = False
        self._forget_reconnect: Callable[[], None] = lambda: None
        #: Forwards that found their worker gone ("no responders").
        self.vanished_workers = 0

    async def start(self) -> None:
        """Load the worker directory and placements and start serving agent requests."""
        if self._started:
            return
        await self.directory.start()
        await self.placements.start()
        if self._authenticator is not None and self._limiter is not None:
            await self._authenticator.start()
            await self._limiter.start()
        if self._serve:
            await self._service.add_endpoint(
                "rpc",
                subject=self._subjects.rpc_all,
                handler=self._forward,
                queue_group=self._subjects.queue_group(SERVICE),
                max_in_flight=self._config.max_in_flight,
            )
            await self._service.start()
        self._forget_reconnect = on_reconnect(self._nc, self._rewatch)
        self._started = True

    def _worker_gone(self, worker_id: str) -> None:
        """A worker's entry went (it deregistered, or lapsed): requests waiting on it
        would wait for their deadline in vain, so they end now with 503."""
        for task in self._waiting_on.pop(worker_id, ()):
            if not task.done():
                self._abandoned.add(task)
                task.cancel()

    @property
    def requests_served(self) -> int:
        """Agent requests this gateway instance has taken since it started."""
        return sum(endpoint.num_requests for endpoint in self._service.stats().endpoints)

    async def _rewatch(self) -> None:
        await self.directory.restart()
        await self.placements.restart()
        if self._authenticator is not None:
            await self._authenticator.restart()

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop taking requests, let in-flight ones finish for `grace` seconds. Idempotent."""
        if not self._started:
            return
        self._started = False
        self._forget_reconnect()
        await self._service.stop(grace)
        if self._authenticator is not None and self._limiter is not None:
            await self._limiter.aclose()
            await self._authenticator.aclose()
        await self.placements.aclose()
        await self.directory.aclose()

    # Workers, their health and the strategies

    def stats(self, worker_id: str) -> WorkerStats:
        """What this gateway has measured of `worker_id`."""
        found = self._stats.get(worker_id)
        if found is None:
            found = self._stats[worker_id] = WorkerStats()
        return found

    def health(self, worker_id: str) -> Health:
        """Unhealthy while cooling off after failures (or gone); unknown when late."""
        record = self.directory.worker(worker_id)
        if record is None or not self.directory.takes_requests(worker_id):
            return Health.UNHEALTHY
        if self.stats(worker_id).unhealthy_until > time.monotonic():
            return Health.UNHEALTHY
        age = self.directory.heartbeat_age(worker_id)
        if age is None or age > LATE_HEARTBEATS * record.heartbeat_interval:
            return Health.UNKNOWN
        return Health.HEALTHY

    def mark_unhealthy(self, worker_id: str, why: str) -> None:
        """Keep `worker_id` from taking requests for the cooling-off period."""
        logger.warning("worker %s is unhealthy for %gs: %s", worker_id, self._config.cooldown, why)
        self.stats(worker_id).unhealthy_until = time.monotonic() + self._config.cooldown

    def candidates(self, agent_type: str) -> list[Candidate]:
        """Live workers of `agent_type` with their figures and health."""
        return [
            Candidate(record, self.stats(record.id), self.health(record.id))
            for record in self.directory.live_workers(agent_type)
        ]

    def strategy_name(self, agent_type: str) -> str:
        """Config override, else what the type registered, else the default."""
        return (
            self._config.strategies.get(agent_type)
            or self.directory.strategy_of(agent_type)
            or self._config.default_strategy
        )

    def _strategy(self, agent_type: str) -> Strategy:
        name = self.strategy_name(agent_type)
        cached = self._strategies.get(agent_type)
        if cached is None or cached[0] != name:
            try:
                cached = (name, make_strategy(name))
            except MeshError:
                logger.warning("%s registered unknown strategy %r", agent_type, name)
                cached = (name, make_strategy(self._config.default_strategy))
            self._strategies[agent_type] = cached
        return cached[1]

    def _unavailable(self, agent_type: str, candidates: list[Candidate]) -> MeshError:
        if not candidates:
            if self.directory.knows_type(agent_type):
                return NoWorkerAvailableError(f"no live worker hosts agent type {agent_type!r}")
            return AgentTypeNotFoundError(f"no worker has registered agent type {agent_type!r}")
        if all(c.health is Health.UNHEALTHY for c in candidates):
            return NoWorkerAvailableError(f"every worker of {agent_type!r} is unhealthy")
        return NoWorkerAvailableError(f"every worker of {agent_type!r} is at capacity")

    # Placement

    def _usable(self, worker_id: str, agent_type: str) -> bool:
        record = self.directory.worker(worker_id)
        return (
            record is not None
            and agent_type in record.agent_types
            and self.health(worker_id) is not Health.UNHEALTHY
        )

    async def placement_for(self, agent_id: AgentId) -> Placement:
        """The agent's placement on a worker that takes requests, placing or moving it."""
        placement = self.placements.get(agent_id)
        for _ in range(PLACEMENT_ROUNDS):
            if placement is not None and self._usable(placement.worker_id, agent_id.type):
                return placement
            candidates = self.candidates(agent_id.type)
            chosen = choose(
                self._strategy(agent_id.type), [c for c in candidates if not c.at_capacity]
            )
            if chosen is None:
                raise self._unavailable(agent_id.type, candidates)
            # Count the request against its worker already, so that requests placing
            # other agents meanwhile see it.
            chosen.stats.inflight += 1
            try:
                if placement is None:
                    placement = await self.placements.place(agent_id, chosen.id)
                else:
                    logger.info("moving %s from %s to %s", agent_id, placement.worker_id, chosen.id)
                    placement = await self.placements.move(agent_id, placement, chosen.id)
            finally:
                chosen.stats.inflight -= 1
        assert placement is not None
        return placement

    # Requests

    async def _forward(self, msg: Msg) -> Reply:
        headers = msg.headers or {}
        request_id = headers.get(REQUEST_ID) or new_request_id()
        with hop("mesh gateway forward", headers, request_id=request_id) as trace:
            started = time.monotonic()
            code = "200"
            metrics.GATEWAY_IN_FLIGHT.inc()
            try:
                body, reply_headers = await self._forward_checked(msg, headers, request_id, trace)
                code = (reply_headers or {}).get(SERVICE_ERROR_CODE, "200")
                return body, reply_headers
            except MeshError as exc:
                exc.request_id = request_id
                code = str(int(exc.code))
                raise
            finally:
                metrics.GATEWAY_IN_FLIGHT.dec()
                elapsed = time.monotonic() - started
                metrics.observe_forwarded(self._type_label(msg.subject), code, elapsed)
                logger.debug("%s answered %s in %.2f ms", msg.subject, code, elapsed * 1e3)

    def _type_label(self, subject: str) -> str:
        """The agent type as a metric label: only registered types, so labels stay few."""
        try:
            agent_type = self._subjects.parse_rpc(subject).type
        except MeshError:
            return "invalid"
        return agent_type if self.directory.knows_type(agent_type) else "unknown"

    async def _forward_checked(
        self, msg: Msg, headers: dict[str, str], request_id: str, trace: TraceContext
    ) -> Reply:
        agent_id = self._subjects.parse_rpc(msg.subject)
        if len(msg.data) > self._config.max_payload:
            raise PayloadTooLargeError(
                f"payload of {len(msg.data)} bytes is over the limit of {self._config.max_payload}"
            )
        client_id = self._admit(agent_id, headers)
        if not is_opaque(headers.get(CONTENT_TYPE)):
            request_codec(headers)  # refused here, before any worker is bothered
        deadline = Deadline(
            parse_timeout(headers, self._config.default_timeout, self._config.max_timeout)
        )
        # Never Authorization: credentials stop here; the worker learns who called.
        forwarded = {name: headers[name] for name in FORWARDED_HEADERS if name in headers}
        forwarded[REQUEST_ID] = request_id
        forwarded[TRACEPARENT] = trace.header()
        if client_id is not None:
            forwarded[CLIENT] = client_id
        body, reply_headers = await self.deliver(agent_id, msg.data, forwarded, deadline)
        reply_headers = dict(reply_headers or {})
        reply_headers.setdefault(TRACEPARENT, trace.header())
        return body, reply_headers

    def _admit(self, agent_id: AgentId, headers: dict[str, str]) -> str | None:
        """The authenticated client, checked for this agent type and its rate (with auth)."""
        if self._authenticator is None or self._limiter is None:
            return None
        principal = self._authenticator.authenticate(headers)
        principal.check(agent_id.type)
        wait = self._limiter.check(principal.client_id, principal.rate, principal.burst)
        if wait > 0:
            metrics.RATE_LIMITED.inc()
            raise RateLimitedError(
                f"client {principal.client_id!r} is over its {principal.rate:g} requests/s",
                retry_after=wait,
            )
        return principal.client_id

    async def deliver(
        self, agent_id: AgentId, data: bytes, headers: dict[str, str], deadline: Deadline
    ) -> Reply:
        """Forward one request to the agent's activation (or its pool) and relay the reply.

        `headers` must carry ``Mesh-Request-Id``; the reply may be an error reply.
        """
        if self.directory.is_stateless(agent_id.type):
            return await self._forward_to_pool(agent_id, data, headers, deadline)
        retried = False
        while True:
            placement = await self.placement_for(agent_id)
            headers[EPOCH] = str(placement.revision)
            try:
                return await self._forward_to_worker(
                    placement.worker_id, agent_id, data, headers, deadline
                )
            except NoRespondersError:
                self.vanished_workers += 1
                self.mark_unhealthy(placement.worker_id, f"no responders for {agent_id}")
                if retried:
                    raise NoWorkerAvailableError(
                        f"the workers placed for {agent_id} did not answer"
                    ) from None
                retried = True

    async def _forward_to_worker(
        self,
        worker_id: str,
        agent_id: AgentId,
        data: bytes,
        headers: dict[str, str],
        deadline: Deadline,
    ) -> Reply:
        if deadline.expired():
            raise DeadlineExceededError(f"deadline passed before {agent_id} was reached")
        headers[TIMEOUT_MS] = deadline.header_value()
        stats = self.stats(worker_id)
        stats.inflight += 1
        started = time.monotonic()
        task = asyncio.current_task()
        waiting = self._waiting_on.setdefault(worker_id, set())
        if task is not None:
            waiting.add(task)
        try:
            reply = await self._nc.request(
                self._subjects.worker_rpc(worker_id, agent_id),
                data,
                timeout=deadline.remaining(),
                headers=headers,
            )
        except asyncio.CancelledError:
            if task is None or task not in self._abandoned:
                raise
            self._abandoned.discard(task)
            task.uncancel()
            raise NoWorkerAvailableError(
                f"worker {worker_id} went away while handling {agent_id}; the request may"
                " or may not have taken effect"
            ) from None
        except NatsTimeoutError:
            stats.record_failure()
            if stats.consecutive_failures >= self._config.failures_before_unhealthy:
                self.mark_unhealthy(worker_id, f"{stats.consecutive_failures} timeouts in a row")
            raise DeadlineExceededError(
                f"worker {worker_id} did not answer for {agent_id} in time"
            ) from None
        finally:
            stats.inflight -= 1
            if task is not None:
                waiting.discard(task)
                if task in self._abandoned:
                    # The reply won the race with the worker's going: keep it, and take
                    # back the cancellation it absorbed.
                    self._abandoned.discard(task)
                    task.uncancel()
            if not waiting and self._waiting_on.get(worker_id) is waiting:
                del self._waiting_on[worker_id]
        reply_headers = dict(reply.headers or {})
        if reply_headers.get(SERVICE_ERROR_CODE) in ("503", "504"):
            stats.record_failure()
        else:
            stats.record_reply(time.monotonic() - started)
        reply_headers.setdefault(REQUEST_ID, headers[REQUEST_ID])
        return reply.data, reply_headers

    async def _forward_to_pool(
        self, agent_id: AgentId, data: bytes, headers: dict[str, str], deadline: Deadline
    ) -> Reply:
        # The pool's queue group is the truth about who serves it: no liveness check
        # here, so an overloaded gateway that hears heartbeats late still forwards.
        headers[TIMEOUT_MS] = deadline.header_value()
        try:
            reply = await self._nc.request(
                self._subjects.pool(agent_id), data, timeout=deadline.remaining(), headers=headers
            )
        except NoRespondersError:
            raise self._unavailable(agent_id.type, []) from None
        except NatsTimeoutError:
            raise DeadlineExceededError(f"no worker answered for {agent_id} in time") from None
        reply_headers = dict(reply.headers or {})
        reply_headers.setdefault(REQUEST_ID, headers[REQUEST_ID])
        return reply.data, reply_headers
