"""A worker's side of event delivery: reading its types' events, handing them on.

For every agent type it hosts, a worker runs an `EventDispatcher` on the type's
delivery consumer; the server delivers to one of the type's workers at a time. An
event for an agent placed on this worker (or of a stateless type) is handled here,
with no further hop; one for an agent placed elsewhere goes to that worker in a
delivery batch (``mesh.worker.<id>.batch``). Placement is the gateway's own: an
embedded gateway that serves nothing, started when the first event comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh._batching import DeliveryBatcher
from mesh._dispatch import EventDispatcher
from mesh._wire import TIMEOUT_MS
from mesh.config import EventsConfig
from mesh.errors import NoWorkerAvailableError
from mesh.handlers.gateway import Gateway
from mesh.ids import AgentId
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)

ServeHere = Callable[[AgentId, bytes, dict[str, str], float, int | None], Awaitable[object]]
"""``serve_here(agent_id, body, headers, timeout, epoch)``: handle one delivery on this
worker (placed here at revision `epoch`, if placed), raising `MeshError` if it failed."""


class WorkerEvents:
    """The dispatchers of one worker's agent types, and the way to other workers.

    Args:
        nc: The worker's connection.
        subjects: The mesh's names.
        worker_id: This worker.
        serve_here: Runs a delivery on this worker.
        is_stateless: Whether a hosted type's agents are interchangeable.
        config: Pull sizes and limits.
    """

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        worker_id: str,
        serve_here: ServeHere,
        is_stateless: Callable[[str], bool],
        config: EventsConfig | None = None,
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._worker_id = worker_id
        self._serve_here = serve_here
        self._is_stateless = is_stateless
        self._config = config or EventsConfig.from_env()
        self.dispatchers: dict[str, EventDispatcher] = {}
        self._gateway: Gateway | None = None
        self._batcher: DeliveryBatcher | None = None
        self._gateway_ready: asyncio.Task[None] | None = None
        # Set once the embedded gateway has started: the way every later event takes.
        self._placing: tuple[Gateway, DeliveryBatcher] | None = None
        self._notices: Subscription | None = None

    async def follow(self, agent_types: Iterable[str]) -> None:
        """Deliver these types' events whenever their consumers exist."""
        if self._notices is None:
            self._notices = await self._nc.subscribe(
                self._subjects.service("router", "delivery_changed"), cb=self._changed
            )
        for agent_type in sorted(agent_types):
            if agent_type in self.dispatchers:
                continue
            dispatcher = EventDispatcher(
                self._nc,
                self._send,
                self._subjects,
                agent_type,
                self._config,
                self._worker_id,
            )
            self.dispatchers[agent_type] = dispatcher
            dispatcher.start()

    async def _changed(self, msg: Msg) -> None:
        """The router changed a type's consumer: its dispatcher here reads it again."""
        dispatcher = self.dispatchers.get(msg.data.decode(errors="replace"))
        if dispatcher is not None:
            dispatcher.look_again()

    async def _placer(self) -> tuple[Gateway, DeliveryBatcher]:
        """The embedded gateway, started on first use (and again if that failed)."""
        if self._placing is not None:
            return self._placing
        ready = self._gateway_ready
        if ready is None:
            self._gateway = Gateway(self._nc, self._subjects, serve=False)
            self._batcher = DeliveryBatcher(self._nc, self._subjects, self._gateway)
            ready = self._gateway_ready = asyncio.create_task(self._gateway.start())
        try:
            await asyncio.shield(ready)  # at once when it is done
        except Exception as exc:
            if self._gateway_ready is ready:
                self._gateway_ready = None
            raise NoWorkerAvailableError(f"placement is not available yet: {exc}") from exc
        assert self._gateway is not None and self._batcher is not None
        self._placing = (self._gateway, self._batcher)
        return self._placing

    async def _send(
        self, agent_id: AgentId, data: bytes, headers: dict[str, str], timeout: float
    ) -> None:
        if self._is_stateless(agent_id.type):
            await self._serve_here(agent_id, data, headers, timeout, None)
            return
        gateway, batcher = await self._placer()
        placement = gateway.placements.get(agent_id)
        if placement is None or placement.worker_id != self._worker_id:
            # Not placed here as far as the placement table shows: place it, or judge
            # its worker, as the gateway does. (Placed here: this worker is alive, and
            # a move elsewhere shows in the table.)
            placement = await gateway.placement_for(agent_id)
        if placement.worker_id != self._worker_id:
            headers[TIMEOUT_MS] = str(max(1, int(timeout * 1000)))
            await batcher.send(agent_id, data, headers, timeout)
            return
        await self._serve_here(agent_id, data, headers, timeout, placement.revision)

    async def stop(self, grace: float) -> None:
        """Stop reading, hand queued events back and give up the pins; deliveries under
        way get `grace` seconds."""
        if self._notices is not None:
            with contextlib.suppress(Exception):
                await self._notices.unsubscribe()
            self._notices = None
        await asyncio.gather(*(d.stop(grace) for d in self.dispatchers.values()))
        self.dispatchers.clear()

    async def aclose(self) -> None:
        """Close the way to other workers (after `stop`, once requests are drained)."""
        if self._batcher is not None:
            await self._batcher.aclose()
        if self._gateway_ready is not None:
            if not self._gateway_ready.done():
                self._gateway_ready.cancel()
            await asyncio.gather(self._gateway_ready, return_exceptions=True)
        if self._gateway is not None:
            await self._gateway.shutdown()
