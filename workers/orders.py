"""Agents that react to events: billing for new orders, an audit trail of all order events.

``Billing`` subscribes to topic type ``orders.created``; ``Audit`` to every topic type
that starts with ``orders.``. Both receive an event published on
``TopicId("orders.created", "shop-1")`` as ``AgentId(<type>, "shop-1")``.
Run them with ``python -m workers.orders`` or ``mesh worker workers.orders:Billing ...``.
"""

from __future__ import annotations

from pydantic import BaseModel

from mesh import (
    Agent,
    MessageContext,
    handler,
    type_prefix_subscription,
    type_subscription,
)


class OrderEvent(BaseModel):
    order_id: str
    amount: float = 0.0


class GetLedger(BaseModel):
    pass


class Ledger(BaseModel):
    agent: str
    worker: str
    entries: list[str]


class _Book(Agent):
    def __init__(self) -> None:
        super().__init__()
        self.entries: list[str] = []

    @handler
    async def ledger(self, message: GetLedger, ctx: MessageContext) -> Ledger:
        return Ledger(agent=str(self.id), worker=ctx.worker_id, entries=self.entries)


@type_subscription("orders.created")
class Billing(_Book, agent_type="billing"):
    """Bills each new order of its shop."""

    @handler
    async def on_order(self, message: OrderEvent, ctx: MessageContext) -> None:
        self.entries.append(f"billed {message.order_id}: {message.amount:.2f}")


@type_prefix_subscription("orders.")
class Audit(_Book, agent_type="audit"):
    """Keeps every order event of its shop: created, shipped, cancelled..."""

    @handler
    async def on_order(self, message: OrderEvent, ctx: MessageContext) -> None:
        self.entries.append(f"{ctx.topic.type if ctx.topic else '?'} {message.order_id}")


if __name__ == "__main__":
    from mesh.cli import worker_main

    worker_main([Billing, Audit])
