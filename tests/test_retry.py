"""Start-up steps wait out a briefly unavailable JetStream, and only that."""

from __future__ import annotations

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from mesh._retry import while_unavailable


async def test_a_step_is_tried_again_while_jetstream_is_unavailable() -> None:
    failures = [NatsTimeoutError(), ServiceUnavailableError()]
    calls = 0

    async def step() -> str:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        return "opened"

    assert await while_unavailable(step, "test", timeout=5) == "opened"
    assert calls == 3


async def test_it_gives_up_after_its_timeout_with_the_last_error() -> None:
    async def step() -> None:
        raise ServiceUnavailableError()

    with pytest.raises(ServiceUnavailableError):
        await while_unavailable(step, "test", timeout=0.3)


async def test_other_errors_are_not_retried() -> None:
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad config")

    with pytest.raises(ValueError, match="bad config"):
        await while_unavailable(step, "test", timeout=5)
    assert calls == 1
