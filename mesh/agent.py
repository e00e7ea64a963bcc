"""Defining agents: a class per agent type, a typed async method per message type.

Example::

    class Ping(BaseModel):
        text: str

    class Pong(BaseModel):
        text: str

    class Echo(Agent, agent_type="echo"):
        @handler
        async def ping(self, message: Ping, ctx: MessageContext) -> Pong:
            return Pong(text=message.text)

A worker creates one instance per `AgentId` the first time a message reaches it and
hands it one message at a time; different ids run concurrently.

State that outlives the instance (a restart, a move to another worker) is declared as
a pydantic model; the worker loads it before the first message and saves it through
the state service after each handler that changed it::

    class Tally(BaseModel):
        count: int = 0

    class Counter(Agent, agent_type="counter", state=Tally):
        @handler
        async def add(self, message: Add, ctx: MessageContext) -> Tally:
            self.state.count += message.by
            return self.state
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel

from mesh._balancing import STRATEGIES
from mesh._conflicts import CONFLICT_POLICIES, ConflictPolicy
from mesh.ids import AgentId, TopicId, validate_agent_type

if TYPE_CHECKING:
    from mesh._persistence import StateKeeper
    from mesh.client import MeshClient

A = TypeVar("A", bound="Agent")
R = TypeVar("R")
HandlerMethod = Callable[[Any, Any, "MessageContext"], Awaitable[Any]]

_HANDLER_MARK = "__mesh_handler__"
_instantiating: ContextVar[tuple[AgentId, MeshClient | None] | None] = ContextVar(
    "mesh_agent_instantiating", default=None
)


class AgentDefinitionError(TypeError):
    """An agent class is defined wrongly (no type, a handler without a message model...)."""


@dataclass(frozen=True, slots=True)
class MessageContext:
    """What a handler knows about the message it is handling.

    Attributes:
        agent_id: The agent handling the message.
        message_type: The message type name (``Mesh-Msg-Type``).
        request_id: The request's ``Mesh-Request-Id``.
        sender: The sending agent, when an agent sent it.
        worker_id: The worker the agent is running on.
        headers: Every header the request carried.
        deadline: Seconds the caller was still waiting when the handler started.
        topic: The topic of the event being handled; ``None`` for a request.
    """

    agent_id: AgentId
    message_type: str
    request_id: str
    sender: AgentId | None = None
    worker_id: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    deadline: float | None = None
    topic: TopicId | None = None


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A message as it arrived, for agent types that decode their own (``raw=True``).

    Attributes:
        data: The body.
        content_type: Its ``Content-Type``.
        message_type: Its ``Mesh-Msg-Type``, if it named one.
    """

    data: bytes
    content_type: str
    message_type: str | None


@dataclass(frozen=True, slots=True)
class RawReply:
    """A reply an agent type that decodes its own messages encoded itself.

    Attributes:
        data: The body.
        content_type: Its ``Content-Type``.
        message_type: Its ``Mesh-Msg-Type``; ``None`` sends none.
    """

    data: bytes
    content_type: str
    message_type: str | None = None


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One handler of an agent type, found from the method's annotations."""

    name: str
    message_type: type[BaseModel]
    returns: Any
    method: HandlerMethod

    @property
    def message_type_name(self) -> str:
        return self.message_type.__name__


def handler(method: Callable[[A, Any, MessageContext], Awaitable[R]]) -> Any:
    """Mark an async method as the handler of the message model its first argument names."""
    if not inspect.iscoroutinefunction(method):
        raise AgentDefinitionError(f"handler {method.__qualname__} must be 'async def'")
    setattr(method, _HANDLER_MARK, True)
    return method


def _handler_spec(cls: type, name: str, method: HandlerMethod) -> HandlerSpec:
    try:
        hints = typing.get_type_hints(method)
    except Exception as exc:
        raise AgentDefinitionError(
            f"{cls.__name__}.{name}: cannot read annotations: {exc}"
        ) from exc
    params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
    if len(params) != 2:
        raise AgentDefinitionError(
            f"{cls.__name__}.{name} must take (self, message, ctx), not {len(params) + 1} arguments"
        )
    message_type = hints.get(params[0].name)
    if not (isinstance(message_type, type) and issubclass(message_type, BaseModel)):
        raise AgentDefinitionError(
            f"{cls.__name__}.{name}: annotate the message argument with a pydantic model"
        )
    return HandlerSpec(
        name=name, message_type=message_type, returns=hints.get("return"), method=method
    )


class Agent:
    """Base class of agent types.

    Subclass it with ``agent_type="name"`` and decorate handlers with `handler`.
    Pass ``stateless=True`` for types whose every instance is interchangeable: any
    worker takes each request, and an instance handles its messages concurrently
    (no mailbox). Pass ``strategy="least_connections"`` (or another of
    `mesh._balancing.STRATEGIES`) to choose how new activations are placed.

    Pass ``raw=True`` for a type that decodes its own messages: every message goes to
    `on_raw_message` undecoded (how `mesh.autogen` hosts AutoGen agents).

    Saved state: pass ``state=Model`` (a pydantic model whose fields all have
    defaults) and use ``self.state``; or override `save_state` and `load_state`, as in
    AutoGen. ``conflict_policy`` (``reject``, ``last_write_wins``, ``merge``) says what
    a save does when another writer saved first; ``autosave=False`` saves only when the
    agent calls `persist`.

    Attributes:
        id: This instance's `AgentId`.
        state: The instance of the declared state model, when there is one.
    """

    agent_type: ClassVar[str]
    stateless: ClassVar[bool] = False
    strategy: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    handlers: ClassVar[dict[str, HandlerSpec]] = {}
    state_model: ClassVar[type[BaseModel] | None] = None
    conflict_policy: ClassVar[ConflictPolicy] = "reject"
    autosave: ClassVar[bool] = True
    raw: ClassVar[bool] = False
    state: Any

    def __init_subclass__(
        cls,
        *,
        agent_type: str | None = None,
        stateless: bool | None = None,
        strategy: str | None = None,
        state: type[BaseModel] | None = None,
        conflict_policy: ConflictPolicy | None = None,
        autosave: bool | None = None,
        raw: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if raw is not None:
            cls.raw = raw
        if agent_type is not None:
            cls.agent_type = validate_agent_type(agent_type)
        if stateless is not None:
            cls.stateless = stateless
        if state is not None:
            cls.state_model = _checked_state_model(cls, state)
        if conflict_policy is not None:
            if conflict_policy not in CONFLICT_POLICIES:
                raise AgentDefinitionError(
                    f"{cls.__name__}: unknown conflict policy {conflict_policy!r};"
                    f" use one of {CONFLICT_POLICIES}"
                )
            cls.conflict_policy = conflict_policy
        if autosave is not None:
            cls.autosave = autosave
        if cls.stateless and cls.persistent():
            raise AgentDefinitionError(
                f"{cls.__name__}: a stateless agent type cannot keep saved state"
            )
        if strategy is not None:
            if strategy not in STRATEGIES:
                raise AgentDefinitionError(
                    f"{cls.__name__}: unknown strategy {strategy!r}; use one of {STRATEGIES}"
                )
            cls.strategy = strategy
        cls.description = inspect.cleandoc(cls.__doc__ or "").split("\n", 1)[0]
        found: dict[str, HandlerSpec] = {}
        for klass in reversed(cls.__mro__):
            for name, member in vars(klass).items():
                if callable(member) and getattr(member, _HANDLER_MARK, False):
                    spec = _handler_spec(cls, name, member)
                    clash = found.get(spec.message_type_name)
                    if clash is not None and clash.name != name:
                        raise AgentDefinitionError(
                            f"{cls.__name__}: {clash.name} and {name} both handle"
                            f" {spec.message_type_name}"
                        )
                    found[spec.message_type_name] = spec
        cls.handlers = found

    def __init__(self) -> None:
        bound = _instantiating.get()
        if bound is None:
            raise AgentDefinitionError(
                f"{type(self).__name__} is created by a worker; in tests use"
                " mesh.testing.make_agent()"
            )
        self.id: AgentId = bound[0]
        self._client = bound[1]
        self._keeper: StateKeeper | None = None
        #: The saved version this instance holds, and the JSON it was saved as.
        self._saved_as: tuple[int, bytes] = (0, b"")
        #: The placement revision this instance was (last) placed under; fences its saves.
        self._epoch: int | None = None
        if self.state_model is not None:
            self.state = self.state_model()

    @classmethod
    def persistent(cls) -> bool:
        """Whether the worker loads and saves this type's state."""
        return cls.state_model is not None or cls.save_state is not Agent.save_state

    async def save_state(self) -> Mapping[str, Any] | None:
        """The state to save, as a JSON object; ``None`` saves nothing.

        By default the declared state model's fields. Override it (with `load_state`)
        to keep state some other way.
        """
        if self.state_model is None:
            return None
        state: BaseModel = self.state
        return state.model_dump(mode="json")

    async def load_state(self, state: Mapping[str, Any]) -> None:
        """Take on saved `state` (what `save_state` returned once)."""
        if self.state_model is not None:
            self.state = self.state_model.model_validate(state)

    async def persist(self) -> None:
        """Save the state now, rather than after the handler (or with ``autosave=False``).

        Raises:
            ConflictError: Another writer saved a newer version first (409).
        """
        if self._keeper is None:
            raise AgentDefinitionError(f"{self.id} is not hosted with a state service")
        await self._keeper.save(self)

    async def on_raw_message(self, message: RawMessage, ctx: MessageContext) -> RawReply:
        """Handle a message undecoded (agent types declared with ``raw=True``)."""
        raise AgentDefinitionError(f"{type(self).__name__} is not declared with raw=True")

    @classmethod
    def create(cls: type[A], agent_id: AgentId, client: MeshClient | None = None) -> A:
        """Instantiate the agent for `agent_id` (what a worker does on first use)."""
        token = _instantiating.set((agent_id, client))
        try:
            return cls()
        finally:
            _instantiating.reset(token)

    async def on_activate(self) -> None:
        """Called once after the instance is created, before its first message."""

    async def on_deactivate(self) -> None:
        """Called once before the instance is dropped (idle, or worker shutdown)."""

    async def publish(
        self,
        topic: TopicId,
        message: BaseModel,
        *,
        message_id: str | None = None,
    ) -> None:
        """Publish an event on `topic`, with this agent as ``Mesh-Sender``."""
        if self._client is None:
            raise AgentDefinitionError(f"{self.id} has no connection to publish with")
        await self._client.publish(topic, message, message_id=message_id, sender=self.id)

    async def send(
        self,
        target: AgentId,
        message: BaseModel,
        *,
        response_type: type[R] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send `message` to another agent through the gateway and return its reply.

        The target sees this agent as ``Mesh-Sender``. Sending to oneself deadlocks the
        mailbox until the deadline, as in any actor system.
        """
        if self._client is None:
            raise AgentDefinitionError(f"{self.id} has no connection to send with")
        return await self._client.call(
            target, message, response_type=response_type, timeout=timeout, sender=self.id
        )


def _checked_state_model(cls: type, model: type[BaseModel]) -> type[BaseModel]:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise AgentDefinitionError(f"{cls.__name__}: state must be a pydantic model class")
    try:
        model()
    except Exception as exc:
        raise AgentDefinitionError(
            f"{cls.__name__}: every field of state model {model.__name__} needs a default"
            f" (a new agent starts from it): {exc}"
        ) from None
    return model


def agent_types_of(agents: list[type[Agent]]) -> dict[str, type[Agent]]:
    """Map agent type names to classes, refusing duplicates and classes without a type."""
    by_name: dict[str, type[Agent]] = {}
    for cls in agents:
        if not (isinstance(cls, type) and issubclass(cls, Agent)):
            raise AgentDefinitionError(f"{cls!r} is not an Agent subclass")
        name = getattr(cls, "agent_type", None)
        if not name:
            raise AgentDefinitionError(f"{cls.__name__} has no agent_type")
        if not cls.handlers and not cls.raw:
            raise AgentDefinitionError(f"{cls.__name__} has no @handler methods")
        if name in by_name and by_name[name] is not cls:
            raise AgentDefinitionError(f"two classes claim agent type {name!r}")
        by_name[name] = cls
    return by_name
