"""AutoGen agents, unchanged, hosted on mesh.

Run them with ``mesh worker --autogen workers.autogen_greeter:register`` (needs
``pip install 'mesh[autogen]'``); any AutoGen runtime on the mesh can then reach them:

    runtime = NatsAgentRuntime("nats://localhost:4222")
    await runtime.start()
    await runtime.send_message(Greet("Ada"), AgentId("greeter", "en"))
"""

from __future__ import annotations

from dataclasses import dataclass

from autogen_core import AgentRuntime, MessageContext, RoutedAgent, message_handler


@dataclass
class Greet:
    name: str


@dataclass
class Greeting:
    text: str
    greeted: int


class Greeter(RoutedAgent):
    """Greets, and counts whom it greeted (its saved state)."""

    def __init__(self) -> None:
        super().__init__("greets people")
        self.greeted = 0

    @message_handler
    async def greet(self, message: Greet, ctx: MessageContext) -> Greeting:
        self.greeted += 1
        return Greeting(f"Hello {message.name}, from {self.id}", self.greeted)

    async def save_state(self) -> dict[str, int]:
        return {"greeted": self.greeted}

    async def load_state(self, state: object) -> None:
        self.greeted = int(dict(state)["greeted"])  # type: ignore[call-overload]


async def register(runtime: AgentRuntime) -> None:
    """What ``mesh worker --autogen`` calls with its runtime."""
    await Greeter.register(runtime, "greeter", Greeter)
