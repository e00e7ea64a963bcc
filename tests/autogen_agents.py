"""AutoGen agents for the mesh.autogen tests, written as any AutoGen user writes them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from autogen_core import (
    AgentId,
    AgentRuntime,
    DefaultTopicId,
    MessageContext,
    RoutedAgent,
    TopicId,
    default_subscription,
    event,
    message_handler,
    rpc,
    type_subscription,
)
from google.protobuf.wrappers_pb2 import StringValue
from pydantic import BaseModel

#: Core NATS subject on which agents announce what they handled, across processes.
SEEN_SUBJECT = "test.autogen.seen"


@dataclass
class Ping:
    text: str
    delay: float = 0.0


@dataclass
class Pong:
    text: str
    agent: str
    runtime: str


@dataclass
class Fail:
    reason: str


@dataclass
class Nothing:
    pass


@dataclass
class Unhandled:
    pass


@dataclass
class Note:
    text: str
    hops: int = 0


class Count(BaseModel):
    value: int


@dataclass
class Add:
    by: int


@dataclass
class Span:
    started: float
    ended: float


class Echo(RoutedAgent):
    """Answers pings; raises on Fail; answers None to Nothing."""

    def __init__(self, runtime_name: str) -> None:
        super().__init__("echo")
        self.runtime_name = runtime_name

    @rpc
    async def ping(self, message: Ping, ctx: MessageContext) -> Pong:
        if message.delay:
            await asyncio.sleep(message.delay)
        return Pong(message.text, str(self.id), self.runtime_name)

    @rpc
    async def fail(self, message: Fail, ctx: MessageContext) -> Pong:
        raise ValueError(message.reason)

    @rpc
    async def nothing(self, message: Nothing, ctx: MessageContext) -> None:
        return None

    @event
    async def only_as_event(self, message: Unhandled, ctx: MessageContext) -> None:
        pass


class Counter(RoutedAgent):
    """Keeps a count as its state."""

    def __init__(self) -> None:
        super().__init__("a counter")
        self.value = 0

    @message_handler
    async def add(self, message: Add, ctx: MessageContext) -> Count:
        self.value += message.by
        return Count(value=self.value)

    async def save_state(self) -> dict[str, Any]:
        return {"value": self.value}

    async def load_state(self, state: Any) -> None:
        self.value = int(state["value"])


class Listener(RoutedAgent):
    """Records each note it gets on core NATS: ``<agent id>|<topic>|<text>``."""

    def __init__(self, description: str = "listener") -> None:
        super().__init__(description)

    @message_handler
    async def on_note(self, message: Note, ctx: MessageContext) -> None:
        runtime: Any = self.runtime
        await runtime._nc.publish(SEEN_SUBJECT, f"{self.id}|{ctx.topic_id}|{message.text}".encode())


@type_subscription("news")
class NewsReader(Listener):
    pass


@default_subscription
class DefaultReader(Listener):
    pass


class Publisher(Listener):
    """Hears notes (on its subscriptions) and publishes one of its own for each."""

    @message_handler
    async def on_note(self, message: Note, ctx: MessageContext) -> None:
        await super().on_note(message, ctx)
        await self.publish_message(Note(message.text, message.hops + 1), TopicId("news", "s1"))


@dataclass
class Relay:
    text: str


class Cascade(RoutedAgent):
    """Level n of a publish cascade: for each note it hears at its level, it
    publishes one to the next level (until the last)."""

    def __init__(self, level: int, last: int) -> None:
        super().__init__(f"cascade level {level}")
        self.level = level
        self.last = last

    @message_handler
    async def on_note(self, message: Note, ctx: MessageContext) -> None:
        runtime: Any = self.runtime
        await runtime._nc.publish(SEEN_SUBJECT, f"{self.id}|{ctx.topic_id}|{message.text}".encode())
        if self.level < self.last:
            await self.publish_message(
                Note(message.text, self.level + 1), TopicId(f"level{self.level + 1}", "c")
            )


class Sequential(RoutedAgent):
    """Records when each of its handlers ran, to show they never overlap."""

    def __init__(self) -> None:
        super().__init__("sequential")
        self.spans: list[Span] = []

    @message_handler
    async def work(self, message: Ping, ctx: MessageContext) -> Span:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(message.delay)
        return Span(started, loop.time())


class Patient(RoutedAgent):
    """Waits; announces on core NATS when its wait is cancelled, and whether the
    handler's cancellation token said so too."""

    def __init__(self) -> None:
        super().__init__("patient")

    @message_handler
    async def wait(self, message: Ping, ctx: MessageContext) -> Pong:
        runtime: Any = self.runtime
        try:
            await asyncio.sleep(message.delay)
        except asyncio.CancelledError:
            said = ctx.cancellation_token.is_cancelled()
            await runtime._nc.publish(SEEN_SUBJECT, f"cancelled|{message.text}|{said}".encode())
            raise
        return Pong(message.text, str(self.id), "")


@dataclass
class Ask:
    target: str
    text: str
    delay: float = 0.0


class Asker(RoutedAgent):
    """Sends to another agent from inside its handler, and returns what it got."""

    def __init__(self) -> None:
        super().__init__("asker")

    @message_handler
    async def ask(self, message: Ask, ctx: MessageContext) -> Pong:
        await asyncio.sleep(message.delay)
        reply: Pong = await self.send_message(Ping(message.text), AgentId(message.target, "k"))
        return reply


async def register(runtime: AgentRuntime) -> None:
    """What ``mesh worker --autogen tests.autogen_agents:register`` runs."""
    name = getattr(runtime, "worker_id", None) or "remote"
    await Echo.register(runtime, "echo", lambda: Echo(str(name)))
    await Counter.register(runtime, "counter", Counter)


__all__ = ["DefaultTopicId"]


@dataclass
class Traces:
    outer: str
    inner: str


class TraceProbe(RoutedAgent):
    """Answers with the trace context its handler runs in."""

    def __init__(self) -> None:
        super().__init__("trace probe")

    @message_handler
    async def probe(self, message: Ping, ctx: MessageContext) -> Pong:
        from mesh._trace import outgoing

        return Pong(outgoing() or "", str(self.id), "")


class TraceAsker(RoutedAgent):
    """Asks the probe from inside its handler; answers with both trace contexts."""

    def __init__(self) -> None:
        super().__init__("trace asker")

    @message_handler
    async def ask(self, message: Ask, ctx: MessageContext) -> Traces:
        from mesh._trace import outgoing

        mine = outgoing() or ""
        reply: Pong = await self.send_message(Ping("probe"), AgentId(message.target, "k"))
        return Traces(mine, reply.text)


@dataclass
class Wrapped:
    value: str


class ProtoEcho(RoutedAgent):
    """Takes and returns a protobuf message."""

    def __init__(self) -> None:
        super().__init__("protobuf echo")

    @message_handler
    async def echo(self, message: StringValue, ctx: MessageContext) -> StringValue:
        return StringValue(value=message.value.upper())
