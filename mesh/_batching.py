"""Delivering many events to one worker in one message.

The router's lanes each wait for their own event's outcome, so order per source is
unchanged; but the events that become ready in the same turn of the event loop and
are placed on the same worker travel together to ``mesh.worker.<id>.batch``. One
request and one reply then carry many deliveries, which is most of what a delivery
costs in Python.
"""

from __future__ import annotations

import asyncio
import logging

import msgpack
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from mesh._wire import CONTENT_TYPE, EPOCH, TIMEOUT_MS, Deadline, error_from_reply
from mesh.codec import MSGPACK
from mesh.errors import DeadlineExceededError, MeshError, NoWorkerAvailableError, error_class
from mesh.handlers.gateway import Gateway
from mesh.ids import AgentId
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)

_Item = tuple[AgentId, dict[str, str], bytes, "asyncio.Future[None]"]


class DeliveryBatcher:
    """Sends deliveries bound for the same worker together.

    Args:
        nc: The connection to send on.
        subjects: The mesh's names.
        gateway: A (non-serving) gateway that places agents and judges workers.
        max_batch: The most deliveries in one message.
    """

    def __init__(
        self, nc: NATS, subjects: Subjects, gateway: Gateway, *, max_batch: int = 256
    ) -> None:
        self._nc = nc
        self._subjects = subjects
        self._gateway = gateway
        self._max_batch = max_batch
        self._pending: dict[str, list[_Item]] = {}
        self._timeouts: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def send(
        self, agent_id: AgentId, data: bytes, headers: dict[str, str], timeout: float
    ) -> None:
        """Deliver one event; raise the `MeshError` its handler (or the trip) ended in."""
        if self._gateway.directory.is_stateless(agent_id.type):
            body, reply_headers = await self._gateway.deliver(
                agent_id, data, headers, Deadline(timeout)
            )
            error = error_from_reply(body, reply_headers)
            if error is not None:
                raise error
            return
        placement = await self._gateway.placement_for(agent_id)
        worker_id = placement.worker_id
        headers[TIMEOUT_MS] = str(max(1, int(timeout * 1000)))
        headers[EPOCH] = str(placement.revision)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = self._pending.setdefault(worker_id, [])
        pending.append((agent_id, headers, data, done))
        self._timeouts[worker_id] = max(self._timeouts.get(worker_id, 0.0), timeout)
        if len(pending) >= self._max_batch:
            self._flush(worker_id)
        elif len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush, worker_id)
        await done

    def _flush(self, worker_id: str) -> None:
        items = self._pending.pop(worker_id, [])
        timeout = self._timeouts.pop(worker_id, 0.0)
        if not items:
            return
        task = asyncio.create_task(self._send_batch(worker_id, items, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_batch(self, worker_id: str, items: list[_Item], timeout: float) -> None:
        body = msgpack.packb(
            {"items": [[a.type, a.key, h, d] for a, h, d, _ in items]}, use_bin_type=True
        )
        failure: MeshError | None = None
        results: list[tuple[int, str, str]] = []
        try:
            reply = await self._nc.request(
                self._subjects.worker_batch(worker_id),
                body,
                timeout=timeout + 0.5,
                headers={CONTENT_TYPE: MSGPACK},
            )
            failure = error_from_reply(reply.data, reply.headers)
            if failure is None:
                results = [
                    (int(code), str(kind), str(message))
                    for code, kind, message in msgpack.unpackb(reply.data, raw=False)["results"]
                ]
        except NoRespondersError:
            self._gateway.mark_unhealthy(worker_id, "no responders for a delivery batch")
            failure = NoWorkerAvailableError(f"worker {worker_id} is gone")
        except (NatsTimeoutError, TimeoutError):
            failure = DeadlineExceededError(f"worker {worker_id} did not answer a batch in time")
        except Exception as exc:  # the connection, the reply's shape
            logger.warning("delivery batch to %s failed: %s", worker_id, exc)
            failure = NoWorkerAvailableError(f"delivery batch to {worker_id} failed: {exc}")
        if failure is None and len(results) != len(items):
            failure = NoWorkerAvailableError(
                f"worker {worker_id} answered {len(results)} of {len(items)} deliveries"
            )
        for n, (_, _, _, done) in enumerate(items):
            if done.done():
                continue
            if failure is not None:
                done.set_exception(_remote(failure))
                continue
            code, wire_type, message = results[n]
            if code:
                done.set_exception(_remote(error_class(code, wire_type)(message)))
            else:
                done.set_result(None)

    async def aclose(self) -> None:
        """Wait for batches under way (their outcomes settle their events)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _remote(error: MeshError) -> MeshError:
    copy = type(error)(error.message)
    copy.remote = True
    return copy
