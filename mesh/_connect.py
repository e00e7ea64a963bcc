"""Opening NATS connections the way every mesh process needs them."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS

from mesh._connection import Connection
from mesh.config import ConnectConfig
from mesh.errors import MeshConnectionError

logger = logging.getLogger(__name__)

ReconnectCallback = Callable[[], Awaitable[None]]
_reconnect_callbacks: weakref.WeakKeyDictionary[NATS, list[ReconnectCallback]] = (
    weakref.WeakKeyDictionary()
)


def on_reconnect(nc: NATS, callback: ReconnectCallback) -> Callable[[], None]:
    """Run `callback` each time `nc` (opened by `connect`) reconnects; returns an undo.

    KV watches can stall for many seconds after a server restart; components that
    keep one re-create it from here.
    """
    callbacks = _reconnect_callbacks.setdefault(nc, [])
    callbacks.append(callback)

    def remove() -> None:
        if callback in callbacks:
            callbacks.remove(callback)

    return remove


#: Re-watching right after a server restart can fail while JetStream recovers: retry.
REWATCH_ATTEMPTS = 20
_running: set[asyncio.Task[None]] = set()


async def _run_reconnect_callbacks(nc: NATS, name: str) -> None:
    """Run the callbacks in a task of their own, so that nats-py's reconnect goes on."""
    task = asyncio.create_task(_retry_callbacks(nc, name), name=f"after-reconnect:{name}")
    _running.add(task)
    task.add_done_callback(_running.discard)


async def _retry_callbacks(nc: NATS, name: str) -> None:
    for callback in list(_reconnect_callbacks.get(nc, [])):
        delay = 0.1
        for attempt in range(1, REWATCH_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(30):
                    await callback()
                break
            except Exception as exc:
                if nc.is_closed or attempt == REWATCH_ATTEMPTS:
                    logger.exception("after reconnecting %s, a callback failed", name)
                    break
                logger.info("after reconnecting %s: %s; trying again", name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def connect(config: ConnectConfig, *, name: str, reconnect: bool = True) -> NATS:
    """Connect to NATS as `name` (shown by the server's ``/connz``).

    Long-running processes reconnect forever; a CLI call (`reconnect=False`) fails fast.

    Raises:
        MeshConnectionError: No server could be reached within the connect timeout.
    """

    async def on_error(exc: Exception) -> None:
        logger.warning("NATS connection %s: %s", name, exc)

    async def on_disconnected() -> None:
        logger.info("NATS connection %s lost; reconnecting", name)

    async def on_reconnected() -> None:
        logger.info("NATS connection %s restored", name)
        if connection is not None:
            await _run_reconnect_callbacks(connection, name)

    options: dict[str, Any] = {
        "servers": [url.strip() for url in config.url.split(",") if url.strip()],
        "name": name,
        "connect_timeout": config.connect_timeout,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "max_reconnect_attempts": -1 if reconnect else 0,
        "allow_reconnect": reconnect,
    }
    if config.user:
        options["user"] = config.user
        options["password"] = config.password
    if config.token:
        options["token"] = config.token
    if config.creds_file:
        options["user_credentials"] = config.creds_file
    if config.nkeys_seed:
        options["nkeys_seed"] = config.nkeys_seed
    connection: NATS | None = None
    try:
        connection = Connection()
        await connection.connect(**options)
    except Exception as exc:
        raise MeshConnectionError(f"cannot connect to NATS at {config.url}: {exc}") from exc
    return connection
