"""Concurrent requests to one endpoint, sent together.

Requests a process makes in the same event-loop iteration (32 agents each saving
their state after a message, say) travel as one request to the endpoint's batch form
rather than one request each: the hop to the service, the service's reading and
answering, and the server's routing of both are paid once per batch instead of once
per request. Each request in a batch is still served on its own and gets its own
answer, as if it had been sent alone.

A request alone in its iteration goes to the plain endpoint: nothing ever waits for
company. A batch holds at most `max_batch` requests and `MAX_BATCH_BYTES` of them; a
request larger than `MAX_BATCHED_BYTES` always goes alone. When nobody serves the batch
form, each request of the batch is sent alone; if the plain endpoint answers (a service
of a version before the batch form), so is every request for the next
`BATCH_FORM_RETRY_AFTER` seconds.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import orjson
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from mesh._control import NoResponderError, json_request
from mesh._wire import error_from_body
from mesh.errors import MeshError

M = TypeVar("M", bound=BaseModel)

#: Most bytes of requests in one batch: well inside what any mesh service accepts on
#: top of what its plain endpoint does (`mesh._micro.CONTROL_MAX_PAYLOAD`, 256 KiB).
MAX_BATCH_BYTES = 192 * 1024
#: Larger requests are sent alone.
MAX_BATCHED_BYTES = 16 * 1024
#: Seconds requests go alone once the plain endpoint answered and its batch form had no
#: responder, before the batch form is tried again.
BATCH_FORM_RETRY_AFTER = 10.0


@dataclass(slots=True)
class _Batch(Generic[M]):
    bodies: list[bytes] = field(default_factory=list)
    waiting: list[asyncio.Future[M]] = field(default_factory=list)
    size: int = 0


class BatchedRequests(Generic[M]):
    """Sends JSON requests to `subject`, batched as the module says.

    The batch form of the endpoint, `batch_subject`, takes ``{"<field>": [request,
    ...]}`` and answers ``{"results": [answer, ...]}`` in the same order, each answer
    what `subject` would have answered: a `reply_type` body, or an error body.

    Args:
        nc: The connection.
        subject: The plain endpoint.
        batch_subject: Its batch form.
        field: The batch request's list of requests.
        reply_type: A successful answer's model.
        max_batch: Most requests the batch form takes at once; 1: never batch.
        timeout: Seconds to wait for each answer.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        subject: str,
        batch_subject: str,
        field: str,
        reply_type: type[M],
        max_batch: int,
        timeout: float,
    ) -> None:
        self._nc = nc
        self._subject = subject
        self._batch_subject = batch_subject
        self._batch_open = b'{"' + field.encode() + b'":['
        self._reply_type = reply_type
        self._max_batch = max_batch
        self._timeout = timeout
        self._open: _Batch[M] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._batch_form_missing_until = 0.0  # loop time

    async def request(self, body: bytes) -> M:
        """The endpoint's answer to the request whose JSON body is `body`.

        Raises:
            MeshError: The answer to this request was an error (its subclass), or the
                request carrying it failed (as `json_request` raises).
        """
        if self._max_batch <= 1 or len(body) > MAX_BATCHED_BYTES:
            return await self._alone(body)
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is not None and (
            len(batch.bodies) == self._max_batch or batch.size + len(body) > MAX_BATCH_BYTES
        ):
            self._send_open()
            batch = None
        if batch is None:
            batch = self._open = _Batch()
            loop.call_soon(self._send_open)
        future: asyncio.Future[M] = loop.create_future()
        batch.bodies.append(body)
        batch.waiting.append(future)
        batch.size += len(body) + 1
        return await future

    async def _alone(self, body: bytes) -> M:
        data = await json_request(self._nc, self._subject, body, timeout=self._timeout)
        return self._reply_type.model_validate_json(data)

    def _send_open(self) -> None:
        batch, self._open = self._open, None
        if batch is None:
            return  # sent already, when it filled up
        task = asyncio.create_task(self._send(batch), name=f"batch:{self._batch_subject}")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: _Batch[M]) -> None:
        if any(future.done() for future in batch.waiting):  # their callers gave up first
            pairs = zip(batch.bodies, batch.waiting, strict=True)
            kept = [(body, future) for body, future in pairs if not future.done()]
            if not kept:
                return
            batch.bodies, batch.waiting = [body for body, _ in kept], [f for _, f in kept]
        results: list[M | MeshError]
        try:
            results = await self._answers(batch.bodies)
        except MeshError as exc:
            results = [copy.copy(exc) for _ in batch.waiting]
        except BaseException as exc:  # cancelled with the loop, or a bug: nobody hangs
            for future in batch.waiting:
                if not future.done():
                    future.set_exception(MeshError(f"the request was not sent: {exc!r}"))
            raise
        for future, result in zip(batch.waiting, results, strict=True):
            if future.done():
                continue  # its caller gave up
            if isinstance(result, MeshError):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _answers(self, bodies: list[bytes]) -> list[M | MeshError]:
        """The answers to `bodies`: in one batch, or each alone (see the module).

        Raises:
            MeshError: The one request carrying them all failed.
        """
        loop = asyncio.get_running_loop()
        unserved = False
        if len(bodies) > 1 and loop.time() >= self._batch_form_missing_until:
            try:
                return await self._together(bodies)
            except NoResponderError:
                unserved = True
        if len(bodies) == 1:
            return [await self._alone(bodies[0])]
        results: list[M | MeshError] = []
        for answer in await asyncio.gather(*map(self._alone, bodies), return_exceptions=True):
            if isinstance(answer, MeshError):
                results.append(answer)
            elif isinstance(answer, BaseException):
                raise answer  # cancelled, or a bug: `_send` fails every caller
            else:
                results.append(answer)
        if unserved and not all(isinstance(r, NoResponderError) for r in results):
            # The plain endpoint is served, its batch form is not: an older service.
            self._batch_form_missing_until = loop.time() + BATCH_FORM_RETRY_AFTER
        return results

    async def _together(self, bodies: list[bytes]) -> list[M | MeshError]:
        payload = self._batch_open + b",".join(bodies) + b"]}"
        data = await json_request(self._nc, self._batch_subject, payload, timeout=self._timeout)
        answers = orjson.loads(data).get("results")
        if not isinstance(answers, list) or len(answers) != len(bodies):
            raise MeshError(f"{self._batch_subject} answered {len(bodies)} requests with {data!r}")
        return [
            error_from_body(answer) or self._reply_type.model_validate(answer) for answer in answers
        ]
