"""Agent types that tests run in workers, in-process or as `mesh worker tests.agents:X`."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict

from pydantic import BaseModel, Field

from mesh import Agent, AgentId, ForbiddenError, MessageContext, TopicId, handler
from mesh.subscriptions import default_subscription, type_prefix_subscription, type_subscription
from workers.echo import Ping


class Nap(BaseModel):
    seconds: float = Field(ge=0, le=60)
    tag: str = ""


class Woke(BaseModel):
    tag: str
    worker: str
    key: str


class Boom(BaseModel):
    reason: str


class Sleeper(Agent, agent_type="sleeper", strategy="least_connections"):
    """Sleeps as long as asked, then answers; raises on Boom.

    Least connections spreads a burst of new sleepers over the workers, which the
    drain tests rely on.
    """

    @handler
    async def nap(self, message: Nap, ctx: MessageContext) -> Woke:
        await asyncio.sleep(message.seconds)
        return Woke(tag=message.tag, worker=ctx.worker_id, key=self.id.key)

    @handler
    async def boom(self, message: Boom, ctx: MessageContext) -> None:
        raise RuntimeError(message.reason)


class Visit(BaseModel):
    seconds: float = 0.05


class Overlap(BaseModel):
    key: str
    concurrent: int


#: agent key -> how many handlers ran at once at the peak (in-process tests read it).
PEAK_CONCURRENCY: dict[str, int] = defaultdict(int)
RUNNING: dict[str, int] = defaultdict(int)
RUNNING_TOTAL = [0, 0]  # now, peak across all keys


#: agent key -> how many instances were created, and their lifecycle events in order.
INSTANCES: dict[str, int] = defaultdict(int)
EVENTS: dict[str, list[str]] = defaultdict(list)


class Recorder(Agent, agent_type="recorder"):
    """Records how many of its handlers run at once, per key and overall."""

    async def on_activate(self) -> None:
        INSTANCES[self.id.key] += 1
        EVENTS[self.id.key].append("activate")

    async def on_deactivate(self) -> None:
        await asyncio.sleep(0.05)  # a slow goodbye: nobody may start meanwhile
        EVENTS[self.id.key].append("deactivate")

    @handler
    async def visit(self, message: Visit, ctx: MessageContext) -> Overlap:
        key = self.id.key
        RUNNING[key] += 1
        RUNNING_TOTAL[0] += 1
        PEAK_CONCURRENCY[key] = max(PEAK_CONCURRENCY[key], RUNNING[key])
        RUNNING_TOTAL[1] = max(RUNNING_TOTAL[1], RUNNING_TOTAL[0])
        try:
            await asyncio.sleep(message.seconds)
            return Overlap(key=key, concurrent=RUNNING[key])
        finally:
            RUNNING[key] -= 1
            RUNNING_TOTAL[0] -= 1


class Refuse(BaseModel):
    pass


class Impatient(BaseModel):
    pass


class Sulker(Agent, agent_type="sulker"):
    """Fails on purpose, in the ways a handler can."""

    @handler
    async def refuse(self, message: Refuse, ctx: MessageContext) -> None:
        raise ForbiddenError("sulker talks to nobody")

    @handler
    async def impatient(self, message: Impatient, ctx: MessageContext) -> None:
        # The handler's own timeout: a failure of the handler, not the caller's deadline.
        await asyncio.wait_for(asyncio.sleep(5), timeout=0.01)


class Forward(BaseModel):
    agent_type: str
    key: str
    text: str


class Relay(Agent, agent_type="relay"):
    """Passes a Ping on to another agent and returns its answer: a nested call."""

    @handler
    async def forward(self, message: Forward, ctx: MessageContext) -> dict[str, object]:
        reply = await self.send(
            AgentId(message.agent_type, message.key), Ping(text=message.text), timeout=5
        )
        return {"relayed_by": str(self.id), "reply": reply}


class Pace(BaseModel):
    """Take `seconds` (or the worker's MESH_TEST_PACE) to answer."""

    seconds: float | None = None
    unencodable: bool = False
    silent: bool = False


class Paced(BaseModel):
    key: str
    worker: str


#: agent key -> handler calls started, handlers cancelled, on_deactivate calls.
CALLS: dict[str, int] = defaultdict(int)
CANCELLED: dict[str, int] = defaultdict(int)
SAVED: dict[str, int] = defaultdict(int)


class Pacer(Agent, agent_type="pacer"):
    """Answers after a pause; counts calls, cancellations and deactivations per key."""

    @handler
    async def pace(self, message: Pace, ctx: MessageContext) -> Paced | None:
        CALLS[self.id.key] += 1
        seconds = message.seconds
        if seconds is None:
            seconds = float(os.environ.get("MESH_TEST_PACE", "0"))
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            CANCELLED[self.id.key] += 1
            raise
        if message.unencodable:
            return object()  # type: ignore[return-value]
        if message.silent:
            return None
        return Paced(key=self.id.key, worker=ctx.worker_id)

    async def on_deactivate(self) -> None:
        SAVED[self.id.key] += 1


class RelayPace(BaseModel):
    key: str
    seconds: float


class PaceRelay(Agent, agent_type="pace-relay"):
    """Waits on a Pacer: a nested call that outlives the outer deadline."""

    @handler
    async def relay(self, message: RelayPace, ctx: MessageContext) -> object:
        try:
            return await self.send(
                AgentId("pacer", message.key), Pace(seconds=message.seconds), timeout=30
            )
        except asyncio.CancelledError:
            CANCELLED[f"relay:{message.key}"] += 1
            raise


class OrderEvent(BaseModel):
    n: int


class GetLog(BaseModel):
    pass


class Log(BaseModel):
    seen: list[int]
    topics: list[str]
    worker: str


HANDLED_SUBJECT = "test.handled"


class _Recording(Agent):
    """Keeps what it handled, and announces each on core NATS for tests across processes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []
        self.topics: list[str] = []

    async def record(self, message: OrderEvent, ctx: MessageContext) -> None:
        self.seen.append(message.n)
        self.topics.append(str(ctx.topic))
        if self._client is not None:
            note = f"{self.id.type}/{self.id.key}/{message.n}".encode()
            await self._client.nc.publish(HANDLED_SUBJECT, note)

    @handler
    async def log(self, message: GetLog, ctx: MessageContext) -> Log:
        return Log(seen=self.seen, topics=self.topics, worker=ctx.worker_id)


@type_subscription("orders.created")
@type_prefix_subscription("orders.")
class Ledger(_Recording, agent_type="ledger", strategy="round_robin"):
    """Two overlapping subscriptions: each event must still arrive once.

    Round robin spreads its sources over the workers, which the ordering test needs.
    """

    @handler
    async def on_order(self, message: OrderEvent, ctx: MessageContext) -> None:
        await self.record(message, ctx)


@type_prefix_subscription("ord")
class Auditor(_Recording, agent_type="auditor"):
    """A prefix off the segment boundary: "orders.created", "ordinal"..."""

    @handler
    async def on_order(self, message: OrderEvent, ctx: MessageContext) -> None:
        await self.record(message, ctx)


@default_subscription
class Greeter(_Recording, agent_type="greeter"):
    @handler
    async def on_order(self, message: OrderEvent, ctx: MessageContext) -> None:
        await self.record(message, ctx)


@type_subscription("poison")
class Fragile(Agent, agent_type="fragile"):
    @handler
    async def on_order(self, message: OrderEvent, ctx: MessageContext) -> None:
        raise ValueError(f"cannot digest order {message.n}")


class Announce(BaseModel):
    order: int


class Announcer(Agent, agent_type="announcer"):
    """Publishes an event from inside its handler."""

    @handler
    async def announce(self, message: Announce, ctx: MessageContext) -> None:
        await self.publish(TopicId("orders.created", self.id.key), OrderEvent(n=message.order))


@type_subscription("slow.orders")
class SlowLedger(_Recording, agent_type="slow-ledger"):
    """Takes its time per event, so that a backlog outlives a short ack_wait."""

    @handler
    async def on_order(self, message: OrderEvent, ctx: MessageContext) -> None:
        await asyncio.sleep(0.3)
        await self.record(message, ctx)


class Notes(BaseModel):
    lines: list[str] = Field(default_factory=list)


class Jot(BaseModel):
    line: str
    fail_after: bool = False


class Read(BaseModel):
    pass


class Notebook(Agent, agent_type="notebook", state=Notes):
    """Saved state as a model: each line is saved before the reply."""

    state: Notes

    @handler
    async def jot(self, message: Jot, ctx: MessageContext) -> Notes:
        self.state.lines.append(message.line)
        if message.fail_after:
            raise ValueError("changed my mind")
        return self.state

    @handler
    async def read(self, message: Read, ctx: MessageContext) -> Notes:
        return self.state


class Journal(Agent, agent_type="journal", autosave=False, conflict_policy="merge"):
    """AutoGen-style hooks, saved only when it says so."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, str] = {}

    async def save_state(self) -> dict[str, object]:
        return {"entries": dict(self.entries)}

    async def load_state(self, state: object) -> None:
        assert isinstance(state, dict)
        self.entries = dict(state["entries"])

    @handler
    async def jot(self, message: Jot, ctx: MessageContext) -> Notes:
        self.entries[str(len(self.entries))] = message.line
        if not message.fail_after:  # here: "keep it unsaved for now"
            await self.persist()
        return Notes(lines=list(self.entries.values()))

    @handler
    async def read(self, message: Read, ctx: MessageContext) -> Notes:
        return Notes(lines=list(self.entries.values()))


class WhoAmI(BaseModel):
    pass


class Caller(BaseModel):
    client: str | None
    saw_authorization: bool


class Whoami(Agent, agent_type="whoami", stateless=True):
    """Tells who the gateway says is calling, and whether credentials leaked this far."""

    @handler
    async def who(self, message: WhoAmI, ctx: MessageContext) -> Caller:
        return Caller(
            client=ctx.headers.get("Mesh-Client"),
            saw_authorization="Authorization" in ctx.headers,
        )


class Spans(BaseModel):
    """Each committed handler run of a tracked agent: worker, start, end (wall clock)."""

    runs: list[tuple[str, float, float]] = Field(default_factory=list)


class Track(BaseModel):
    pass


class Tracker(Agent, agent_type="tracker", state=Spans):
    """Keeps, in its saved state, when each of its handler runs began and ended: the
    runs that committed, for the single-activation checker."""

    state: Spans

    @handler
    async def track(self, message: Track, ctx: MessageContext) -> int:
        import time

        started = time.time()
        await asyncio.sleep(0.01)
        self.state.runs = [*self.state.runs, (ctx.worker_id, started, time.time())][-200:]
        return len(self.state.runs)


CANCELLED_SUBJECT = "test.cancelled"


class Wait(BaseModel):
    seconds: float = Field(ge=0, le=60)


class Waiter(Agent, agent_type="waiter"):
    """Waits as long as asked; says on core NATS when a wait was cancelled."""

    @handler
    async def wait(self, message: Wait, ctx: MessageContext) -> None:
        try:
            await asyncio.sleep(message.seconds)
        except asyncio.CancelledError:
            if self._client is not None:
                await self._client.nc.publish(CANCELLED_SUBJECT, ctx.request_id.encode())
            raise
