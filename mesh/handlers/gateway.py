"""The gateway service (``mesh-gateway``): the single entry for agent requests.

It serves ``mesh.rpc.<type>.<key>`` in a queue group, so any number of replicas share
the load. For each request it checks the id, payload size, content type and deadline,
picks a live worker of the agent type from its `WorkerDirectory` (a KV-watched view,
no round trip on the hot path), forwards by request/reply to
``mesh.worker.<id>.rpc.<type>.<key>`` and relays the worker's reply unchanged.

A worker that vanished between the directory's last update and the forward (NATS
answers "no responders" at once) is skipped and the next candidate tried, so a
dying worker costs the caller nothing while another one hosts the type. A worker
that does not answer within the deadline is not retried: the request may have run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from mesh import __version__
from mesh._balancing import Balancer, RendezvousBalancer, RoundRobinBalancer
from mesh._connect import on_reconnect
from mesh._directory import WorkerDirectory
from mesh._micro import MicroService, Reply
from mesh._wire import (
    FORWARDED_HEADERS,
    REQUEST_ID,
    TIMEOUT_MS,
    Deadline,
    new_request_id,
    parse_timeout,
    request_codec,
)
from mesh.config import GatewayConfig, RegistryConfig
from mesh.errors import (
    AgentTypeNotFoundError,
    DeadlineExceededError,
    MeshError,
    NoWorkerAvailableError,
    PayloadTooLargeError,
)
from mesh.ids import AgentId
from mesh.records import WorkerRecord
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)

SERVICE = "gateway"


class Gateway:
    """One replica of the gateway.

    Args:
        nc: A connected NATS client; the gateway does not close it.
        subjects: The mesh's names.
        config: Deadlines, payload limit, requests in flight.
        registry_config: How worker liveness is judged.
    """

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects | None = None,
        config: GatewayConfig | None = None,
        registry_config: RegistryConfig | None = None,
    ) -> None:
        self._nc = nc
        self._subjects = subjects or Subjects()
        self._config = config or GatewayConfig()
        self.directory = WorkerDirectory(nc.jetstream(), self._subjects, registry_config)
        self._sticky: Balancer = RendezvousBalancer()
        self._spread: Balancer = RoundRobinBalancer()
        self._service = MicroService(
            nc,
            name=self._subjects.micro_name(SERVICE),
            version=__version__,
            description="entry point for agent requests",
        )
        self._started = False
        self._forget_reconnect: Callable[[], None] = lambda: None

    async def start(self) -> None:
        """Load the worker directory and start serving agent requests."""
        if self._started:
            return
        await self.directory.start()
        await self._service.add_endpoint(
            "rpc",
            subject=self._subjects.rpc_all,
            handler=self._forward,
            queue_group=self._subjects.queue_group(SERVICE),
            max_in_flight=self._config.max_in_flight,
        )
        await self._service.start()
        self._forget_reconnect = on_reconnect(self._nc, self.directory.restart)
        self._started = True

    async def shutdown(self, grace: float = 10.0) -> None:
        """Stop taking requests, let in-flight ones finish for `grace` seconds. Idempotent."""
        if not self._started:
            return
        self._started = False
        self._forget_reconnect()
        await self._service.stop(grace)
        await self.directory.aclose()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    def _balancer_for(self, agent_type: str) -> Balancer:
        return self._spread if self.directory.is_stateless(agent_type) else self._sticky

    def _candidates(self, agent_id: AgentId, tried: set[str]) -> list[WorkerRecord]:
        live = self.directory.live_workers(agent_id.type)
        candidates = [record for record in live if record.id not in tried]
        if candidates:
            return candidates
        if tried:
            raise NoWorkerAvailableError(
                f"no worker of {agent_id.type!r} answered; {len(tried)} tried"
            )
        if self.directory.knows_type(agent_id.type):
            raise NoWorkerAvailableError(f"no live worker hosts agent type {agent_id.type!r}")
        raise AgentTypeNotFoundError(f"no worker has registered agent type {agent_id.type!r}")

    async def _forward(self, msg: Msg) -> Reply:
        headers = msg.headers or {}
        request_id = headers.get(REQUEST_ID) or new_request_id()
        try:
            return await self._forward_checked(msg, headers, request_id)
        except MeshError as exc:
            exc.request_id = request_id
            raise

    async def _forward_checked(self, msg: Msg, headers: dict[str, str], request_id: str) -> Reply:
        agent_id = self._subjects.parse_rpc(msg.subject)
        if len(msg.data) > self._config.max_payload:
            raise PayloadTooLargeError(
                f"payload of {len(msg.data)} bytes is over the limit of {self._config.max_payload}"
            )
        request_codec(headers)
        deadline = Deadline(
            parse_timeout(headers, self._config.default_timeout, self._config.max_timeout)
        )
        forwarded = {name: headers[name] for name in FORWARDED_HEADERS if name in headers}
        forwarded[REQUEST_ID] = request_id
        balancer = self._balancer_for(agent_id.type)
        tried: set[str] = set()
        while True:
            worker = balancer.choose(agent_id, self._candidates(agent_id, tried))
            if deadline.expired():
                raise DeadlineExceededError(f"deadline passed before {agent_id} was reached")
            forwarded[TIMEOUT_MS] = deadline.header_value()
            try:
                reply = await self._nc.request(
                    self._subjects.worker_rpc(worker.id, agent_id),
                    msg.data,
                    timeout=deadline.remaining(),
                    headers=forwarded,
                )
            except NoRespondersError:
                logger.info("worker %s is gone; trying another for %s", worker.id, agent_id)
                tried.add(worker.id)
                self.directory.mark_suspect(worker.id)
                continue
            except NatsTimeoutError:
                raise DeadlineExceededError(
                    f"worker {worker.id} did not answer for {agent_id} in time"
                ) from None
            reply_headers = dict(reply.headers or {})
            reply_headers.setdefault(REQUEST_ID, request_id)
            return reply.data, reply_headers
