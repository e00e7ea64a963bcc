"""Rate limits per client that hold across any number of gateway replicas.

Each gateway keeps a token bucket per client (rate and burst from the client's
record). Every `interval` it publishes what it admitted since the last time, per
client, on ``mesh.gateway.usage``; every other gateway takes those requests out of its
own bucket for that client. So all gateways together admit about `rate` per second
(plus the burst, plus at most one interval's worth in flight between them), however
the queue group spreads a client's requests, without a round trip per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TokenBucket:
    """Tokens refill at `rate` per second up to `burst`; each request takes one."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, now: float | None = None) -> float:
        """Take a token: 0.0 when granted, else the seconds until one is there."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def spend(self, count: float, now: float | None = None) -> None:
        """Requests admitted elsewhere: take them out, down to at most one burst of debt."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        self.tokens = max(-self.burst, self.tokens - count)


class SharedRateLimiter:
    """Per-client token buckets, shared with the other gateways over NATS.

    Args:
        nc: The connection.
        subject: Where gateways tell each other what they admitted.
        member: This gateway's id (its own reports are ignored).
        interval: Seconds between reports.
    """

    def __init__(self, nc: NATS, subject: str, member: str, interval: float = 0.2) -> None:
        self._nc = nc
        self._subject = subject
        self._member = member
        self._interval = interval
        self._buckets: dict[str, TokenBucket] = {}
        self._admitted: dict[str, int] = {}
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._subscription = await self._nc.subscribe(self._subject, cb=self._heard)
        self._task = asyncio.create_task(self._report(), name="rate-limit-report")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    def check(self, client_id: str, rate: float, burst: int) -> float:
        """0.0 when the request may go ahead, else seconds until the client may retry."""
        bucket = self._bucket(client_id, rate, burst)
        wait = bucket.take()
        if wait == 0.0:
            self._admitted[client_id] = self._admitted.get(client_id, 0) + 1
        return wait

    def _bucket(self, client_id: str, rate: float, burst: int) -> TokenBucket:
        bucket = self._buckets.get(client_id)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            bucket = self._buckets[client_id] = TokenBucket(rate, float(burst))
        return bucket

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if not self._admitted:
                continue
            admitted, self._admitted = self._admitted, {}
            report = {
                client_id: [count, self._buckets[client_id].rate, self._buckets[client_id].burst]
                for client_id, count in admitted.items()
                if client_id in self._buckets
            }
            body = orjson.dumps({"from": self._member, "admitted": report})
            try:
                await self._nc.publish(self._subject, body)
            except Exception as exc:  # disconnected: the others just see less for a while
                logger.warning("could not share rate-limit usage: %s", exc)

    async def _heard(self, msg: Msg) -> None:
        try:
            report = orjson.loads(msg.data)
            if report["from"] == self._member:
                return
            admitted = {
                str(client_id): (float(count), float(rate), int(burst))
                for client_id, (count, rate, burst) in report["admitted"].items()
                if rate > 0 and burst > 0
            }
        except Exception:
            logger.warning("ignoring a malformed rate-limit report on %s", msg.subject)
            return
        now = time.monotonic()
        for client_id, (count, rate, burst) in admitted.items():
            # Create the bucket if this gateway has not seen the client yet, so that the
            # client does not find a full burst here after spending it elsewhere.
            self._bucket(str(client_id), float(rate), int(burst)).spend(float(count), now)
