"""A NATS micro service whose endpoints serve requests concurrently.

nats-py's own micro endpoints run one request at a time, which serialises a
gateway and deadlocks nested calls. `MicroService` speaks the same discovery
protocol (``$SRV.PING``, ``$SRV.INFO``, ``$SRV.STATS``, so ``nats micro ls`` sees
it) but runs each request in its own owned task and drains in-flight requests on
shutdown. Handlers return ``(body, headers)`` or raise `MeshError`; either way the
caller gets an answer.

The subscription never waits: a request that arrives while an endpoint already has
``max_in_flight`` requests running is answered 503 at once. Waiting instead would
let requests that are themselves waiting on nested requests (an agent calling an
agent) hold every slot while the nested ones queue behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import (
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
)

from mesh._connection import subscribe_calling
from mesh._retry import JETSTREAM_UNAVAILABLE
from mesh._wire import error_reply
from mesh.errors import MeshError, NoWorkerAvailableError, PayloadTooLargeError

logger = logging.getLogger(__name__)

Reply = tuple[bytes, dict[str, str] | None]
Handler = Callable[[Msg], Awaitable[Reply]]

SRV_PREFIX = "$SRV"
#: Bound on handing over the messages the server sent before an unsubscribe.
DRAIN_SUBSCRIPTION_TIMEOUT = 5.0


def answer_for(exc: Exception, where: str) -> MeshError:
    """The error a caller gets for `exc`, raised while serving `where`: a `MeshError` as
    it is, JetStream unavailable (a leader election, a lost quorum) as 503 the caller
    may retry, anything else as an internal error (logged with its traceback)."""
    if isinstance(exc, MeshError):
        return exc
    if isinstance(exc, JETSTREAM_UNAVAILABLE):
        logger.warning("%s: JetStream unavailable: %r", where, exc)
        return NoWorkerAvailableError(f"JetStream is unavailable right now: {exc!r}")
    logger.error("%s failed", where, exc_info=exc)
    return MeshError(f"internal error in {where.partition('.')[0]}: {exc!r}")


class _Endpoint:
    """One endpoint: a subscription, its in-flight tasks and its counters."""

    def __init__(
        self,
        service: MicroService,
        *,
        name: str,
        subject: str,
        handler: Handler,
        queue_group: str | None,
        max_in_flight: int,
        metadata: dict[str, str] | None,
    ) -> None:
        self.service = service
        self.name = name
        self.subject = subject
        self.handler = handler
        self.queue_group = queue_group
        self.metadata = metadata or {}
        self.max_in_flight = max_in_flight
        self.tasks: set[asyncio.Task[None]] = set()
        self.subscription: Subscription | None = None
        self.num_requests = 0
        self.num_errors = 0
        self.processing_ns = 0
        self.last_error = ""

    async def start(self) -> None:
        self.subscription = await subscribe_calling(
            self.service.nc, self.subject, self._dispatch, self.queue_group or ""
        )

    def _dispatch(self, msg: Msg) -> None:
        limit = self.service.max_payload
        if limit is not None and len(msg.data) > limit:
            self.num_requests += 1
            too_large = PayloadTooLargeError(
                f"a request of {len(msg.data)} bytes is over {self.service.name}'s limit of {limit}"
            )
            self._count_error(too_large)
            self._run(self._respond(msg, *error_reply(too_large, msg.headers)))
            return
        if len(self.tasks) >= self.max_in_flight:
            self.num_requests += 1
            overloaded = NoWorkerAvailableError(
                f"{self.service.name} is at its limit of {self.max_in_flight} requests in flight"
            )
            self._count_error(overloaded)
            self._run(self._respond(msg, *error_reply(overloaded, msg.headers)))
            return
        self._run(self._serve(msg))

    def _run(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"{self.service.name}:{self.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, msg: Msg) -> None:
        started = time.perf_counter_ns()
        self.num_requests += 1
        try:
            try:
                body, headers = await self.handler(msg)
            except MeshError as exc:
                self._count_error(exc)
                body, headers = error_reply(exc, msg.headers)
            except asyncio.CancelledError:
                shutting_down = NoWorkerAvailableError("the service is shutting down")
                self._count_error(shutting_down)
                body, headers = error_reply(shutting_down, msg.headers)
                await self._respond(msg, body, headers)
                raise
            except Exception as exc:
                error = answer_for(exc, f"{self.service.name}.{self.name}")
                self._count_error(error)
                body, headers = error_reply(error, msg.headers)
            await self._respond(msg, body, headers)
        finally:
            self.processing_ns += time.perf_counter_ns() - started

    def _count_error(self, exc: MeshError) -> None:
        self.num_errors += 1
        self.last_error = str(exc)

    async def _respond(self, msg: Msg, body: bytes, headers: dict[str, str] | None) -> None:
        if not msg.reply:
            return
        try:
            await self.service.nc.publish(msg.reply, body, headers=headers)
        except Exception:
            logger.warning("could not reply on %s", msg.reply, exc_info=True)

    async def stop_taking_work(self) -> None:
        """Stop receiving; requests already received still run.

        Draining only hands what the server already sent to `_dispatch`, which never
        waits, so it ends promptly.
        """
        if self.subscription is not None:
            sub, self.subscription = self.subscription, None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(DRAIN_SUBSCRIPTION_TIMEOUT):
                    await sub.drain()  # type: ignore[no-untyped-call]

    def info(self) -> EndpointInfo:
        return EndpointInfo(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group or "",
            metadata=self.metadata,
        )

    def stats(self) -> EndpointStats:
        average = self.processing_ns // self.num_requests if self.num_requests else 0
        return EndpointStats(
            name=self.name,
            subject=self.subject,
            queue_group=self.queue_group or "",
            num_requests=self.num_requests,
            num_errors=self.num_errors,
            processing_time=self.processing_ns,
            average_processing_time=average,
            last_error=self.last_error,
            data={"in_flight": len(self.tasks)},
        )


#: Largest control-plane request (registrations, subscriptions, rules...).
CONTROL_MAX_PAYLOAD = 256 * 1024


class MicroService:
    """A discoverable NATS micro service with concurrent endpoints.

    Args:
        nc: The connection to serve on.
        name: The micro service name, e.g. ``mesh-gateway``.
        version: Semantic version reported by ``$SRV.INFO``.
        description: One line for ``nats micro info``.
        metadata: Extra key/values reported by discovery.
        max_payload: Larger request bodies get 413 at once, before any decoding.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        name: str,
        version: str,
        description: str = "",
        metadata: dict[str, str] | None = None,
        max_payload: int | None = None,
    ) -> None:
        self.nc = nc
        self.name = name
        self.version = version
        self.description = description
        self.metadata = metadata or {}
        self.max_payload = max_payload
        self.id = nc._nuid.next().decode()
        self.started = datetime.now(UTC).replace(tzinfo=None)
        self._endpoints: list[_Endpoint] = []
        self._control: list[Subscription] = []

    async def add_endpoint(
        self,
        name: str,
        *,
        subject: str,
        handler: Handler,
        queue_group: str | None = None,
        max_in_flight: int = 10_000,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Serve `subject` with `handler`; beyond `max_in_flight` requests, answer 503."""
        endpoint = _Endpoint(
            self,
            name=name,
            subject=subject,
            handler=handler,
            queue_group=queue_group,
            max_in_flight=max_in_flight,
            metadata=metadata,
        )
        await endpoint.start()
        self._endpoints.append(endpoint)

    async def start(self) -> None:
        """Answer discovery requests, and make every subscription known to the server."""
        handlers: dict[str, Callable[[], dict[str, Any]]] = {
            "PING": lambda: ServicePing(
                id=self.id, name=self.name, version=self.version, metadata=self.metadata
            ).to_dict(),
            "INFO": lambda: self.info().to_dict(),
            "STATS": lambda: self.stats().to_dict(),
        }
        for verb, build in handlers.items():
            for subject in (
                f"{SRV_PREFIX}.{verb}",
                f"{SRV_PREFIX}.{verb}.{self.name}",
                f"{SRV_PREFIX}.{verb}.{self.name}.{self.id}",
            ):
                self._control.append(
                    await self.nc.subscribe(subject, cb=self._control_handler(build))
                )
        await self.nc.flush()

    def _control_handler(
        self, build: Callable[[], dict[str, Any]]
    ) -> Callable[[Msg], Awaitable[None]]:
        async def respond(msg: Msg) -> None:
            if msg.reply:
                await self.nc.publish(msg.reply, orjson.dumps(build()))

        return respond

    def info(self) -> ServiceInfo:
        return ServiceInfo(
            id=self.id,
            name=self.name,
            version=self.version,
            description=self.description,
            metadata=self.metadata,
            endpoints=[endpoint.info() for endpoint in self._endpoints],
        )

    def stats(self) -> ServiceStats:
        return ServiceStats(
            id=self.id,
            name=self.name,
            version=self.version,
            metadata=self.metadata,
            endpoints=[endpoint.stats() for endpoint in self._endpoints],
            started=self.started,
        )

    @property
    def in_flight(self) -> int:
        """Requests being served now, over all endpoints."""
        return sum(len(endpoint.tasks) for endpoint in self._endpoints)

    async def stop_taking_work(self) -> None:
        """Unsubscribe every endpoint; requests already received keep running."""
        for endpoint in self._endpoints:
            await endpoint.stop_taking_work()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; ``False`` if `timeout` passed first."""
        pending = {task for endpoint in self._endpoints for task in endpoint.tasks}
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=timeout)
        return not still

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking work, let in-flight requests finish for `grace` seconds, cancel the rest.

        Cancelled requests are answered with 503. Idempotent.
        """
        await self.stop_taking_work()
        if not await self.wait_idle(grace):
            leftovers = [task for endpoint in self._endpoints for task in endpoint.tasks]
            logger.warning("%s: cancelling %d requests after grace", self.name, len(leftovers))
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
        for sub in self._control:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._control.clear()
