"""KV watches that mark the end of the current values only once they are all in.

nats-py's ``KeyValue.watch`` (and ``history`` and ``keys``, built on it) marks the end
of the current values with a ``None`` entry. When the consumer has nothing left to
deliver, it decides whether that end is reached already by counting the messages its
subscription has *received* when the consumer's info comes back. But the server may
send that info before messages it counts as delivered. On a mesh connection, which
hands a reply to its request straight from the socket reader, the info can then be
read first, and the watch announces the end before any value: ``history`` comes back
empty or short, and a mirror is ready without its values.

`watch` is nats-py's, except that it asks the server how many messages it has
delivered. When that count is 0, the end is now; otherwise the message that leaves
nothing pending marks it, as it always does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NoKeysError
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

#: Seconds a watch's consumer outlives its subscription on the server (nats-py's
#: default); one that only reads the current values goes sooner.
INACTIVE_THRESHOLD = 5 * 60.0
READ_ONCE_INACTIVE_THRESHOLD = 10.0


async def watch(
    kv: KeyValue,
    keys: str,
    *,
    include_history: bool = False,
    ignore_deletes: bool = False,
    meta_only: bool = False,
    inactive_threshold: float = INACTIVE_THRESHOLD,
) -> KeyValue.KeyWatcher:
    """Watch `keys` of `kv` as ``kv.watch`` does (see the module for the difference):
    the latest value of each key (every value kept, with `include_history`), then
    ``None``, then each change as it happens. The server drops the watch's consumer
    `inactive_threshold` seconds after the watch stops."""
    watcher = KeyValue.KeyWatcher(kv)  # type: ignore[no-untyped-call]
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    prefix = kv._pre

    async def end_of_current_values_if(pending: int) -> None:
        if pending == 0 and not watcher._init_done:
            watcher._init_done = True
            await watcher._updates.put(None)

    async def on_message(msg: Msg) -> None:
        await started
        meta = msg.metadata
        headers = msg.header or {}
        operation = headers.get(KV_OP)
        if operation is None and KV_MARKER_REASON in headers:
            # Markers the server leaves (2.11+) when a key's TTL or age runs out.
            reason = headers[KV_MARKER_REASON]
            operation = {"MaxAge": KV_PURGE, "Purge": KV_PURGE, "Remove": KV_DEL}.get(reason)
            if operation is None:  # a reason of a newer server: not a change of ours
                await end_of_current_values_if(meta.num_pending)
                return
        if not (ignore_deletes and operation in (KV_DEL, KV_PURGE)):
            await watcher._updates.put(
                KeyValue.Entry(
                    bucket=kv._name,
                    key=msg.subject[len(prefix) :],
                    value=msg.data,
                    revision=meta.sequence.stream,
                    delta=meta.num_pending,
                    created=meta.timestamp,  # type: ignore[arg-type]  # as nats-py sets it
                    operation=operation,
                )
            )
        await end_of_current_values_if(meta.num_pending)

    options: dict[str, Any] = {}
    if not include_history:
        options["deliver_policy"] = api.DeliverPolicy.LAST_PER_SUBJECT
    watcher._sub = await kv._js.subscribe(
        f"{prefix}{keys}",
        stream=kv._stream,
        cb=on_message,
        ordered_consumer=True,
        headers_only=meta_only,
        inactive_threshold=inactive_threshold,
        **options,
    )
    try:
        info = await watcher._sub.consumer_info()
    except BaseException:
        started.cancel()
        await watcher._sub.unsubscribe()
        raise
    if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
        await end_of_current_values_if(0)  # nothing there, and nothing on its way
    started.set_result(None)
    return watcher


async def history(kv: KeyValue, key: str) -> list[KeyValue.Entry]:
    """Every value of `key` kept, oldest first (``kv.history``).

    Raises:
        NoKeysError: Nothing is kept.
    """
    watcher = await watch(
        kv, key, include_history=True, inactive_threshold=READ_ONCE_INACTIVE_THRESHOLD
    )
    entries = await _current(watcher)
    if not entries:
        raise NoKeysError
    return entries


async def keys(kv: KeyValue, pattern: str = ">") -> list[str]:
    """The keys matching `pattern` (``*`` one segment, ``>`` the rest) that have a value
    (``kv.keys``)."""
    watcher = await watch(
        kv,
        pattern,
        ignore_deletes=True,
        meta_only=True,
        inactive_threshold=READ_ONCE_INACTIVE_THRESHOLD,
    )
    entries = await _current(watcher)
    return [entry.key for entry in entries]


async def _current(watcher: KeyValue.KeyWatcher) -> list[KeyValue.Entry]:
    """What `watcher` gives before its end-of-values mark; then it is stopped."""
    entries: list[KeyValue.Entry] = []
    try:
        async for entry in watcher:
            if entry is None:
                break
            entries.append(entry)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return entries
