"""AutoGen agents hosted as mesh agents: one mesh agent type per AutoGen agent type.

The mesh side (placement, the mailbox, deadlines, cancellation, saved state) is the
worker's; the AutoGen side is the runtime's (`AutogenHost`): the factory, the
serializers, the ``MessageContext`` a handler gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from mesh.agent import Agent, MessageContext, RawMessage, RawReply


class AutogenHost(Protocol):
    """What a hosted agent asks of the runtime hosting it."""

    async def handle(self, agent: Agent, message: RawMessage, ctx: MessageContext) -> RawReply: ...

    async def agent_state(self, agent: Agent) -> Mapping[str, Any] | None: ...

    async def restore_state(self, agent: Agent, state: Mapping[str, Any]) -> None: ...

    async def deactivated(self, agent: Agent) -> None: ...


def hosted_agent_class(host: AutogenHost, agent_type: str, description: str) -> type[Agent]:
    """A mesh agent class whose instances stand for the AutoGen agents of `agent_type`.

    Its state is the AutoGen agent's ``save_state()``, saved after each message that
    changed it, and loaded into the next activation wherever that is.
    """

    class HostedAutogenAgent(Agent, agent_type=agent_type, raw=True):
        async def on_raw_message(self, message: RawMessage, ctx: MessageContext) -> RawReply:
            return await host.handle(self, message, ctx)

        async def save_state(self) -> Mapping[str, Any] | None:
            return await host.agent_state(self)

        async def load_state(self, state: Mapping[str, Any]) -> None:
            await host.restore_state(self, state)

        async def on_deactivate(self) -> None:
            await host.deactivated(self)

    HostedAutogenAgent.__name__ = HostedAutogenAgent.__qualname__ = f"AutoGen[{agent_type}]"
    HostedAutogenAgent.description = description
    return HostedAutogenAgent
