"""The life of a long-running component: `start`, an idempotent `shutdown`, `async with`."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Lifecycle:
    """Base of services and workers: ``async with`` starts them and shuts them down."""

    async def start(self) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()
