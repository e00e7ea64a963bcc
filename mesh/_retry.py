"""Start-up steps that wait out a JetStream that is briefly unavailable: a cluster still
forming, a leader election, a node restarting."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Failures of JetStream itself (no leader, no quorum, no answer): worth a retry.
JETSTREAM_UNAVAILABLE = (
    NoStreamResponseError,
    ServiceUnavailableError,
    NatsTimeoutError,
    TimeoutError,
)

#: How long start-up waits for JetStream by default.
STARTUP_WAIT = 30.0


async def while_unavailable(
    step: Callable[[], Awaitable[T]], what: str, *, timeout: float = STARTUP_WAIT
) -> T:
    """Run `step`; while JetStream is unavailable, again with backoff for `timeout` s.

    Raises:
        The last unavailability error once `timeout` has passed; any other error at once.
    """
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        try:
            return await step()
        except (*JETSTREAM_UNAVAILABLE, NoRespondersError) as exc:
            if time.monotonic() + delay >= deadline:
                raise
            logger.warning("%s: JetStream unavailable (%r); trying again", what, exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
