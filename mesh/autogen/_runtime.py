"""`NatsAgentRuntime`: AutoGen's ``AgentRuntime`` on mesh.

The runtime hosts the AutoGen agents registered on it in this process, as a mesh
worker (so any number of processes may host the same agent type: mesh places each
agent id on one of them), and reaches every other agent through the mesh:
``send_message`` is a mesh request through the gateway, ``publish_message`` a mesh
event on JetStream, subscriptions are the router's, and agents' state is kept in
``mesh-state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast, overload

import orjson
from autogen_core import (
    JSON_DATA_CONTENT_TYPE,
    AgentInstantiationContext,
    AgentMetadata,
    AgentRuntime,
    AgentType,
    BaseAgent,
    CancellationToken,
    MessageContext,
    MessageHandlerContext,
    MessageSerializer,
    RoutedAgent,
    Subscription,
    TopicId,
    TypePrefixSubscription,
    TypeSubscription,
)
from autogen_core import Agent as AutogenAgent
from autogen_core import AgentId as AutogenAgentId
from nats.aio.client import Client as NATS

from mesh import ids
from mesh._connect import connect
from mesh._control import control_request
from mesh._wire import CONTENT_TYPE, MSG_ID, MSG_TYPE, SENDER
from mesh.agent import Agent, AgentDefinitionError, RawMessage, RawReply
from mesh.agent import MessageContext as MeshContext
from mesh.autogen._errors import autogen_error
from mesh.autogen._hosting import hosted_agent_class
from mesh.autogen._wire import LOAD_STATE, SAVE_STATE, AutogenCodec
from mesh.client import MeshClient
from mesh.codec import json_object
from mesh.config import ConnectConfig, WorkerConfig
from mesh.errors import (
    BadRequestError,
    MeshError,
    UnknownMessageTypeError,
)
from mesh.handlers.router import RemovedReply, SubscribeRequest, UnsubscribeRequest
from mesh.subjects import Subjects
from mesh.subscriptions import Subscription as MeshSubscription
from mesh.worker import Worker

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=AutogenAgent)
R = TypeVar("R")

#: How long `send_message` waits for a reply unless told otherwise: mesh's longest.
DEFAULT_TIMEOUT = 300.0
CONTROL_TIMEOUT = 5.0
#: How often a cancelled handler that is still running is reported.
CANCEL_GRACE = 5.0
_JSON = {CONTENT_TYPE: JSON_DATA_CONTENT_TYPE}

AgentFactory = Callable[[], AutogenAgent | Awaitable[AutogenAgent]]


class NatsAgentRuntime(AgentRuntime):
    """An AutoGen ``AgentRuntime`` that runs on a mesh.

    Args:
        servers: NATS URL(s), comma-separated or a list; ``MESH_NATS_URL`` by default.
        prefix: The mesh's name (``MESH_PREFIX``, default ``mesh``).
        connect_config: Credentials and timeouts (``MESH_NATS_*`` by default); `servers`
            overrides its URL.
        worker_config: The hosting worker's settings (id, heartbeats, idle timeout...).
        nc: An open connection to use instead (it is not closed by `close`).
        timeout: Seconds `send_message` waits for a reply.
        payload_format: AutoGen's content type for messages whose type has several
            serializers: JSON (default) or protobuf.
    """

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        prefix: str | None = None,
        connect_config: ConnectConfig | None = None,
        worker_config: WorkerConfig | None = None,
        nc: NATS | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        payload_format: str = JSON_DATA_CONTENT_TYPE,
    ) -> None:
        config = connect_config or ConnectConfig.from_env()
        if servers is not None:
            url = servers if isinstance(servers, str) else ",".join(servers)
            config = ConnectConfig(**{**_fields(config), "url": url})
        self._connect_config = config
        self._subjects = Subjects(prefix) if prefix else Subjects.from_env()
        self._worker_config = worker_config or WorkerConfig.from_env()
        self._nc = nc
        self._owns_connection = nc is None
        self._timeout = timeout
        self._codec = AutogenCodec(_registry(), payload_format)
        self._factories: dict[str, Callable[[AutogenAgentId], Awaitable[AutogenAgent]]] = {}
        self._hosted: dict[str, type[Agent]] = {}
        self._instances: dict[AutogenAgentId, AutogenAgent] = {}
        self._fixed: dict[AutogenAgentId, AutogenAgent] = {}
        self._subscriptions: dict[str, tuple[Subscription, str]] = {}
        self._worker: Worker | None = None
        self._client: MeshClient | None = None
        self._running = False
        self._busy = 0
        self._idle: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None

    # Life

    @property
    def worker_id(self) -> str | None:
        """The id of the mesh worker hosting this runtime's agents, once started."""
        return self._worker.id if self._worker else None

    async def start(self) -> None:
        """Connect, and host the agent types registered so far (and any registered later)."""
        if self._running:
            return
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = asyncio.Event()
        if self._nc is None:
            self._nc = await connect(self._connect_config, name="mesh-autogen")
        self._client = MeshClient(self._nc, subjects=self._subjects, default_timeout=self._timeout)
        worker = Worker(self._nc, [], self._worker_config, self._subjects)
        await worker.add_agents(list(self._hosted.values()))
        await worker.start()
        try:
            for agent_id in list(self._fixed):
                await worker.claim(_mesh_id(agent_id))
            self._worker = worker
            self._running = True
            for subscription_id, (subscription, _) in list(self._subscriptions.items()):
                self._subscriptions[subscription_id] = (
                    subscription,
                    await self._subscribe(subscription),
                )
        except BaseException:
            self._running = False
            self._worker = None
            await worker.shutdown()
            raise

    async def stop(self) -> None:
        """Stop hosting: in-flight messages finish, agents are closed. The connection
        stays open until `close`."""
        if not self._running:
            return
        try:
            if self._worker is not None:
                # Handlers still running while the worker drains may send and publish.
                await self._worker.shutdown()
        finally:
            self._running = False
            if self._stopped is not None:
                self._stopped.set()

    async def stop_when_idle(self) -> None:
        """Stop once no message is being handled or sent by this runtime."""
        while self._running and self._idle is not None:
            await self._idle.wait()
            await asyncio.sleep(0)  # let a message that just arrived start
            if self._busy == 0:
                break
        await self.stop()

    async def stop_when(self, condition: Callable[[], bool], check_period: float = 1.0) -> None:
        """Stop once `condition()` holds, checked every `check_period` seconds."""
        while self._running and not condition():  # noqa: ASYNC110 - a condition, no event
            await asyncio.sleep(check_period)
        await self.stop()

    async def stop_when_signal(
        self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Stop (draining in-flight messages) on the first of `signals`."""
        loop = asyncio.get_running_loop()
        received = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, received.set)
        try:
            await received.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        await self.stop()

    async def close(self) -> None:
        """Stop, and close the connection if this runtime opened it."""
        await self.stop()
        if self._nc is not None and self._owns_connection:
            with contextlib.suppress(Exception):
                # The worker has drained already: nothing is left to hand over.
                await self._nc.close()
            self._nc = None

    async def __aenter__(self) -> NatsAgentRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # Registering agents

    async def register_factory(
        self,
        type: str | AgentType,
        agent_factory: Callable[[], T | Awaitable[T]],
        *,
        expected_class: type[T] | None = None,
    ) -> AgentType:
        agent_type = type.type if isinstance(type, AgentType) else type
        if agent_type in self._factories:
            raise ValueError(f"Agent with type {agent_type} already exists.")

        async def create(agent_id: AutogenAgentId) -> AutogenAgent:
            with AgentInstantiationContext.populate_context((self, agent_id)):
                made = agent_factory()
                agent = await made if inspect.isawaitable(made) else made
            if expected_class is not None and not isinstance(agent, expected_class):
                raise ValueError(
                    f"Factory registered using the wrong type: expected"
                    f" {expected_class.__name__}, got {agent.__class__.__name__}"
                )
            return cast(AutogenAgent, agent)

        if inspect.isclass(expected_class) and issubclass(expected_class, BaseAgent):
            # Readable here before the type is hosted: AutoGen's `BaseAgent.register` adds
            # them only after registering (and subscribing), and a request may come first.
            for _, serializers in expected_class._handles_types():
                self.add_message_serializer(serializers)
        description = _description(expected_class)
        await self._host(agent_type, create, description)
        return AgentType(agent_type)

    async def register_agent_instance(
        self, agent_instance: AutogenAgent, agent_id: AutogenAgentId
    ) -> AutogenAgentId:
        if agent_id in self._fixed:
            raise ValueError(f"Agent with id {agent_id} already exists.")
        if agent_id.type in self._factories and not any(
            known.type == agent_id.type for known in self._fixed
        ):
            raise ValueError(
                "Agent factories and agent instances cannot be registered to the same type."
            )
        await agent_instance.bind_id_and_runtime(id=agent_id, runtime=self)
        if isinstance(agent_instance, BaseAgent):  # what it handles must be readable here
            for _, serializers in type(agent_instance)._handles_types():
                self.add_message_serializer(serializers)
        self._fixed[agent_id] = agent_instance
        if agent_id.type not in self._factories:

            async def only_registered(unknown: AutogenAgentId) -> AutogenAgent:
                found = self._fixed.get(unknown)
                if found is None:
                    raise BadRequestError(
                        f"{unknown} is not registered here: only its registered instances"
                        " exist (register_agent_instance)"
                    )
                return found

            await self._host(agent_id.type, only_registered, agent_instance.metadata["description"])
        if self._worker is not None and self._running:
            await self._worker.claim(_mesh_id(agent_id))  # it lives here, and stays
        return agent_id

    async def _host(
        self,
        agent_type: str,
        create: Callable[[AutogenAgentId], Awaitable[AutogenAgent]],
        description: str,
    ) -> None:
        try:
            ids.validate_agent_type(agent_type)
        except MeshError as exc:
            raise ValueError(exc.message) from None
        self._factories[agent_type] = create
        hosted = hosted_agent_class(self, agent_type, description)
        self._hosted[agent_type] = hosted
        if self._worker is not None and self._running:
            await self._worker.add_agents([hosted])

    async def try_get_underlying_agent_instance(
        self,
        id: AutogenAgentId,
        type: type[T] = AutogenAgent,  # type: ignore[assignment]
    ) -> T:
        agent = self._instances.get(id) or self._fixed.get(id)
        if agent is None:
            raise LookupError(f"{id} is not active in this runtime")
        if not isinstance(agent, type):
            raise TypeError(f"{id} is a {agent.__class__.__name__}, not a {type.__name__}")
        return agent

    @overload
    async def get(
        self, id_or_type: AutogenAgentId, /, key: str = ..., *, lazy: bool = ...
    ) -> AutogenAgentId: ...

    @overload
    async def get(
        self, id_or_type: AgentType | str, /, key: str = ..., *, lazy: bool = ...
    ) -> AutogenAgentId: ...

    async def get(
        self,
        id_or_type: AutogenAgentId | AgentType | str,
        /,
        key: str = "default",
        *,
        lazy: bool = True,
    ) -> AutogenAgentId:
        if isinstance(id_or_type, AutogenAgentId):
            agent_id = id_or_type
        else:
            name = id_or_type.type if isinstance(id_or_type, AgentType) else id_or_type
            agent_id = AutogenAgentId(name, key)
        if not lazy:
            await self.agent_save_state(agent_id)  # activated wherever mesh places it
        return agent_id

    def add_message_serializer(
        self, serializer: MessageSerializer[Any] | Sequence[MessageSerializer[Any]]
    ) -> None:
        self._codec.add(serializer)

    # Messages

    async def send_message(
        self,
        message: Any,
        recipient: AutogenAgentId,
        *,
        sender: AutogenAgentId | None = None,
        cancellation_token: CancellationToken | None = None,
        message_id: str | None = None,
    ) -> Any:
        """Send `message` to `recipient` through the mesh and return its reply.

        Raises:
            UndeliverableException: No process hosts the recipient's type.
            CantHandleException: The recipient has no handler for the message's type.
            AgentHandlerError: The recipient's handler raised.
            asyncio.CancelledError: `cancellation_token` was cancelled; so was the
                recipient's handler.
            MeshError: The mesh could not get an answer (503, 504...).
        """
        client = self._connected()
        data, headers = self._outgoing(message, sender)
        try:
            reply = await self._tracked(
                client.send_raw(_mesh_id(recipient), data, headers=headers, timeout=self._timeout),
                cancellation_token,
            )
        except MeshError as exc:
            raise autogen_error(exc) from None
        try:
            return self._codec.decode(reply.data, dict(reply.headers or {}))
        except MeshError as exc:  # this runtime's own failure to read it, not the recipient's
            raise ValueError(
                f"the reply from {recipient} cannot be read here: {exc.message}; register its"
                " type with runtime.add_message_serializer(try_get_known_serializers_for_type(...))"
            ) from None

    async def publish_message(
        self,
        message: Any,
        topic_id: TopicId,
        *,
        sender: AutogenAgentId | None = None,
        cancellation_token: CancellationToken | None = None,
        message_id: str | None = None,
    ) -> None:
        """Publish `message` on `topic_id` as a mesh event; returns once JetStream
        stored it. Each subscribed agent (but the sender) gets it at least once."""
        client = self._connected()
        data, headers = self._outgoing(message, sender)
        # The message id de-duplicates: the same id published again within JetStream's
        # duplicate window (2 minutes) is dropped. Recipients see it as ctx.message_id.
        headers[MSG_ID] = message_id or uuid.uuid4().hex
        topic = ids.TopicId(topic_id.type, topic_id.source)
        await self._tracked(client.publish_raw(topic, data, headers=headers), cancellation_token)

    def _outgoing(
        self, message: Any, sender: AutogenAgentId | None
    ) -> tuple[bytes, dict[str, str]]:
        data, headers = self._codec.encode(message)
        if sender is not None:
            headers[SENDER] = str(_mesh_id(sender))
        return data, headers

    async def _tracked(self, work: Awaitable[R], token: CancellationToken | None) -> R:
        """Await `work`, cancelled with `token`, counted as this runtime being busy."""
        future = asyncio.ensure_future(work)
        if token is not None:
            token.link_future(future)
        self._enter()
        try:
            return await future
        finally:
            self._leave()

    # Subscriptions

    async def add_subscription(self, subscription: Subscription) -> None:
        if subscription.id in self._subscriptions:
            raise ValueError(f"Subscription {subscription.id} already exists")
        mesh_id = await self._subscribe(subscription) if self._running else ""
        self._subscriptions[subscription.id] = (subscription, mesh_id)

    async def remove_subscription(self, id: str) -> None:
        found = self._subscriptions.pop(id, None)
        if found is None:
            raise LookupError(f"Subscription with id {id} not found")
        if not self._running:
            return
        reply = await control_request(
            self._connected().nc,
            self._subjects.service("router", "unsubscribe"),
            UnsubscribeRequest(id=found[1]),
            RemovedReply,
            timeout=CONTROL_TIMEOUT,
        )
        if reply is None or not reply.removed:
            logger.info("subscription %s was already gone from the router", id)

    async def _subscribe(self, subscription: Subscription) -> str:
        if isinstance(subscription, TypeSubscription):
            request = SubscribeRequest(
                kind="type", topic=subscription.topic_type, agent_type=subscription.agent_type
            )
        elif isinstance(subscription, TypePrefixSubscription):
            request = SubscribeRequest(
                kind="prefix",
                topic=subscription.topic_type_prefix,
                agent_type=subscription.agent_type,
            )
        else:
            raise ValueError(
                f"{subscription.__class__.__name__} is not supported: mesh routes"
                " TypeSubscription, TypePrefixSubscription and DefaultSubscription"
            )
        reply = await control_request(
            self._connected().nc,
            self._subjects.service("router", "subscribe"),
            request,
            MeshSubscription,
            timeout=CONTROL_TIMEOUT,
        )
        assert reply is not None
        return reply.id

    # State

    async def save_state(self) -> Mapping[str, Any]:
        """The state of every agent active in this runtime, by ``str(agent_id)`` (agents
        placed on other processes are saved by those; `agent_save_state` reaches any)."""
        return {
            str(agent_id): await self.agent_save_state(agent_id)
            for agent_id in list(self._instances)
        }

    async def load_state(self, state: Mapping[str, Any]) -> None:
        """Give each agent named in `state` its state, wherever mesh places it."""
        for name, agent_state in state.items():
            await self.agent_load_state(AutogenAgentId.from_str(name), agent_state)

    async def agent_save_state(self, agent: AutogenAgentId) -> Mapping[str, Any]:
        """The agent's ``save_state()``, taken in its own mailbox wherever it runs (so
        not from inside one of its own handlers: that waits for itself)."""
        reply = await self._control(agent, SAVE_STATE, b"")
        state: Mapping[str, Any] = orjson.loads(reply) if reply else {}
        return state

    async def agent_load_state(self, agent: AutogenAgentId, state: Mapping[str, Any]) -> None:
        """Give the agent `state` (``load_state()`` in its own mailbox wherever it runs);
        it is saved in ``mesh-state`` like any change it makes itself."""
        await self._control(agent, LOAD_STATE, orjson.dumps(dict(state)))

    async def agent_metadata(self, agent: AutogenAgentId) -> AgentMetadata:
        local = self._instances.get(agent) or self._fixed.get(agent)
        if local is not None:
            return local.metadata
        hosted = self._hosted.get(agent.type)
        description = hosted.description if hosted is not None else ""
        return AgentMetadata(type=agent.type, key=agent.key, description=description)

    async def _control(self, agent: AutogenAgentId, message_type: str, data: bytes) -> bytes:
        client = self._connected()
        headers = {**_JSON, MSG_TYPE: message_type}
        try:
            reply = await client.send_raw(
                _mesh_id(agent), data, headers=headers, timeout=self._timeout
            )
        except MeshError as exc:
            raise autogen_error(exc) from None
        return bytes(reply.data)

    # Hosting (called by the hosted agents, in their mailbox)

    async def handle(self, agent: Agent, message: RawMessage, ctx: MeshContext) -> RawReply:
        agent_id = AutogenAgentId(agent.id.type, agent.id.key)
        instance = await self._instance(agent_id)
        headers = dict(ctx.headers)
        if message.message_type == SAVE_STATE:
            state = await instance.save_state()
            return RawReply(orjson.dumps(dict(state)), JSON_DATA_CONTENT_TYPE)
        if message.message_type == LOAD_STATE:
            await instance.load_state(json_object(message.data, "the state to load"))
            return RawReply(b"", JSON_DATA_CONTENT_TYPE)
        sender = AutogenAgentId(ctx.sender.type, ctx.sender.key) if ctx.sender else None
        topic = TopicId(ctx.topic.type, ctx.topic.source) if ctx.topic else None
        if topic is not None and sender == agent_id:
            return RawReply(b"", JSON_DATA_CONTENT_TYPE)  # no agent gets its own publication
        decoded = self._codec.decode(message.data, headers)
        token = CancellationToken()
        autogen_ctx = MessageContext(
            sender=sender,
            topic_id=topic,
            is_rpc=topic is None,
            cancellation_token=token,
            message_id=headers.get(MSG_ID) or ctx.request_id,
        )
        if topic is None and not _handles(instance, decoded, autogen_ctx):
            raise UnknownMessageTypeError(
                f"{agent_id} has no handler for {message.message_type or type(decoded).__name__}"
            )
        self._enter()
        try:
            with MessageHandlerContext.populate_context(agent_id):
                # Its own task, linked to its token: a cancellation (the caller's, or
                # the deadline) cancels the token first, as AutoGen handlers expect.
                running = token.link_future(
                    asyncio.ensure_future(instance.on_message(decoded, autogen_ctx))
                )
            try:
                result = await asyncio.shield(running)
            except asyncio.CancelledError:
                token.cancel()
                await _outlive(running, agent_id)
                raise
        finally:
            self._leave()
        if topic is not None:
            return RawReply(b"", JSON_DATA_CONTENT_TYPE)
        data, reply_headers = self._codec.encode(result)
        return RawReply(data, reply_headers[CONTENT_TYPE], reply_headers.get(MSG_TYPE))

    async def agent_state(self, agent: Agent) -> Mapping[str, Any] | None:
        instance = await self._instance(AutogenAgentId(agent.id.type, agent.id.key))
        if _keeps_no_state(instance):
            return None
        return await instance.save_state()

    async def restore_state(self, agent: Agent, state: Mapping[str, Any]) -> None:
        instance = await self._instance(AutogenAgentId(agent.id.type, agent.id.key))
        if not _keeps_no_state(instance):
            await instance.load_state(state)

    async def deactivated(self, agent: Agent) -> None:
        agent_id = AutogenAgentId(agent.id.type, agent.id.key)
        instance = self._instances.pop(agent_id, None)
        if instance is not None and agent_id not in self._fixed:
            try:
                await instance.close()
            except Exception:
                logger.exception("closing %s failed", agent_id)

    async def _instance(self, agent_id: AutogenAgentId) -> AutogenAgent:
        found = self._instances.get(agent_id)
        if found is not None:
            return found
        create = self._factories.get(agent_id.type)
        if create is None:
            raise AgentDefinitionError(f"no factory for agent type {agent_id.type!r}")
        instance = await create(agent_id)
        if isinstance(instance, BaseAgent) and agent_id not in self._fixed:
            await instance.bind_id_and_runtime(id=agent_id, runtime=self)
        self._instances[agent_id] = instance
        return instance

    # Helpers

    def _connected(self) -> MeshClient:
        if self._client is None or not self._running:
            raise ValueError("Runtime must be running when sending message.")
        return self._client

    def _enter(self) -> None:
        self._busy += 1
        if self._idle is not None:
            self._idle.clear()

    def _leave(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self._idle is not None:
            self._idle.set()


async def _outlive(running: asyncio.Future[Any], agent_id: AutogenAgentId) -> None:
    """Wait for a cancelled handler to end: the agent's mailbox stays held until then,
    so no other message runs beside it."""
    while not running.done():
        done, _ = await asyncio.wait({running}, timeout=CANCEL_GRACE)
        if not done:
            logger.warning("a cancelled handler of %s is still running", agent_id)
    if not running.cancelled():
        running.exception()  # retrieved: it was cancelled, its outcome is not wanted


def _registry() -> Any:
    from autogen_core._serialization import SerializationRegistry

    return SerializationRegistry()


def _fields(config: ConnectConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def _mesh_id(agent_id: AutogenAgentId) -> ids.AgentId:
    return ids.AgentId(agent_id.type, agent_id.key)


def _description(cls: type[Any] | None) -> str:
    if cls is None:
        return ""
    return inspect.cleandoc(cls.__doc__ or "").split("\n", 1)[0]


def _keeps_no_state(instance: AutogenAgent) -> bool:
    """BaseAgent's own save_state warns and returns nothing: there is nothing to keep."""
    return isinstance(instance, BaseAgent) and (
        type(instance).save_state is BaseAgent.save_state
        and type(instance).load_state is BaseAgent.load_state
    )


def _handles(instance: AutogenAgent, message: Any, ctx: MessageContext) -> bool:
    """Whether a routed agent has a handler that takes `message` as an RPC; other agents
    decide themselves."""
    if not isinstance(instance, RoutedAgent):
        return True
    handlers = instance._handlers.get(type(message)) or []
    return any(h.router(message, ctx) for h in handlers)
