"""The state service (``mesh-state``): agents' state for any client, over NATS.

Endpoints (``mesh.state.<op>``): get, put, put_many (many puts in one request),
history, delete; requests and replies are the models in `mesh.state`. The work is
`StateStore`'s: versions, compare-and-set, conflict policies, checksums (see
`mesh._state_store`). Workers use the store directly for their agents' saves, one hop
fewer; every other client comes here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh import __version__
from mesh._control import model_reply, read_request
from mesh._lifecycle import Lifecycle
from mesh._micro import CONTROL_MAX_PAYLOAD, MicroService, Reply, answer_for
from mesh._state_store import StateStore
from mesh._wire import error_body, request_codec
from mesh.codec import validate
from mesh.config import StateConfig
from mesh.errors import DecodeError, NoWorkerAvailableError
from mesh.ids import AgentId
from mesh.state import (
    SERVICE,
    StateDeleteReply,
    StateDeleteRequest,
    StateGetRequest,
    StateHistoryReply,
    StateHistoryRequest,
    StatePutBodies,
    StatePutManyReply,
    StatePutManyRequest,
    StatePutReply,
    StatePutRequest,
)
from mesh.subjects import Subjects


class StateService(Lifecycle):
    """One replica of the state service.

    Args:
        nc: A connected NATS client; the service does not close it.
        subjects: The mesh's names.
        config: History depth, size limit.
    """

    def __init__(
        self, nc: NATS, subjects: Subjects | None = None, config: StateConfig | None = None
    ) -> None:
        self._nc = nc
        self._subjects = subjects or Subjects()
        config = config or StateConfig()
        self._max_puts_in_flight = config.max_puts_in_flight
        self._puts_in_flight = 0
        self.store = StateStore(nc.jetstream(), self._subjects, config)
        self._service = MicroService(
            nc,
            name=self._subjects.micro_name(SERVICE),
            version=__version__,
            description="versioned agent state",
            # Room for the largest state and its request around it; the store then
            # answers 413 for a state over its own limit, with the sizes.
            max_payload=config.max_state_bytes + CONTROL_MAX_PAYLOAD,
        )
        self._started = False

    async def start(self) -> None:
        """Open (or create) the bucket and start serving."""
        if self._started:
            return
        await self.store.start()
        queue = self._subjects.queue_group(SERVICE)
        endpoints = {
            "get": self._get,
            "put": self._put,
            "put_many": self._put_many,
            "history": self._history,
            "delete": self._delete,
        }
        for op, handler in endpoints.items():
            await self._service.add_endpoint(
                op, subject=self._subjects.service(SERVICE, op), handler=handler, queue_group=queue
            )
        await self._service.start()
        self._started = True

    async def shutdown(self, grace: float = 5.0) -> None:
        """Finish in-flight requests and stop. Idempotent."""
        if not self._started:
            return
        self._started = False
        await self._service.stop(grace)
        await self.store.stop()

    async def _get(self, msg: Msg) -> Reply:
        request = read_request(msg, StateGetRequest)
        agent_id = AgentId(request.agent_type, request.key)
        return model_reply(msg, await self.store.get(agent_id, request.version))

    async def _put(self, msg: Msg) -> Reply:
        request = read_request(msg, StatePutRequest)
        with self._holding_puts(1):
            (result,) = await self.store.put_many([request])
        if isinstance(result, Exception):
            raise result
        return model_reply(msg, result)

    async def _put_many(self, msg: Msg) -> Reply:
        puts: list[StatePutRequest | DecodeError]
        try:
            puts = list(read_request(msg, StatePutManyRequest).puts)
        except DecodeError:  # a put that does not fit is answered 400 on its own
            puts = self._each_put(msg)
        valid = [p for p in puts if not isinstance(p, DecodeError)]
        with self._holding_puts(len(valid)):
            saved = iter(await self.store.put_many(valid))
        results: list[StatePutReply | dict[str, Any]] = []
        for put in puts:
            outcome = put if isinstance(put, DecodeError) else next(saved)
            if isinstance(outcome, Exception):
                results.append(error_body(answer_for(outcome, f"{self._service.name}.put_many")))
            else:
                results.append(outcome)
        return model_reply(msg, StatePutManyReply.model_construct(results=results))

    @contextlib.contextmanager
    def _holding_puts(self, count: int) -> Iterator[None]:
        """Count `count` puts in flight for the block. A request is taken whatever its
        size when no other puts are in flight, so that any batch can go through.

        Raises:
            NoWorkerAvailableError: They would take the service beyond its limit (503:
                nothing is written, the caller may try again).
        """
        limit = self._max_puts_in_flight
        if self._puts_in_flight and self._puts_in_flight + count > limit:
            raise NoWorkerAvailableError(
                f"{self._service.name} holds {self._puts_in_flight} puts; {count} more would"
                f" go beyond its limit of {limit} in flight"
            )
        self._puts_in_flight += count
        try:
            yield
        finally:
            self._puts_in_flight -= count

    @staticmethod
    def _each_put(msg: Msg) -> list[StatePutRequest | DecodeError]:
        """The puts of a request whose puts are not all valid, each validated on its own.

        Raises:
            DecodeError: The request is not a list of 1 to 256 objects.
        """
        content_type = request_codec(msg.headers).content_type
        puts: list[StatePutRequest | DecodeError] = []
        for body in read_request(msg, StatePutBodies).puts:
            try:
                puts.append(validate(body, StatePutRequest, content_type))
            except DecodeError as exc:
                puts.append(exc)
        return puts

    async def _history(self, msg: Msg) -> Reply:
        request = read_request(msg, StateHistoryRequest)
        versions = await self.store.history(AgentId(request.agent_type, request.key))
        return model_reply(msg, StateHistoryReply(versions=versions))

    async def _delete(self, msg: Msg) -> Reply:
        request = read_request(msg, StateDeleteRequest)
        deleted = await self.store.delete(
            AgentId(request.agent_type, request.key), expected_version=request.expected_version
        )
        return model_reply(msg, StateDeleteReply(deleted=deleted))
