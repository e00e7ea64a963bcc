"""JetStream KV helpers: bucket set-up, keys with a TTL, and a watched local mirror."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mesh._connection import Connection
from mesh._deadlines import TICK
from mesh._kv_watch import watch
from mesh._retry import while_unavailable
from mesh.subjects import Subjects

logger = logging.getLogger(__name__)

EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"


def deployment_replicas() -> int:
    """Copies of each bucket and stream the deployment asks for: ``MESH_REPLICAS`` (1;
    3 on a 3-node cluster)."""
    raw = os.environ.get("MESH_REPLICAS") or "1"
    if not raw.isdigit() or not 1 <= int(raw) <= 5:
        raise ValueError(f"MESH_REPLICAS must be 1 to 5, not {raw!r}")
    return int(raw)


@dataclass(frozen=True, slots=True, kw_only=True)
class BucketConfig:
    """How a mesh bucket is created when it does not exist yet."""

    name: str
    description: str = ""
    history: int = 1
    #: Copies kept; None: the deployment's (`deployment_replicas`).
    replicas: int | None = None
    #: Buckets whose keys carry a TTL need the server to leave markers when they lapse.
    marker_ttl: float | None = None


async def ensure_bucket(js: JetStreamContext, config: BucketConfig) -> KeyValue:
    """Open `config.name`, creating it (with direct gets on) if it is absent; waits out
    a JetStream that is briefly unavailable (`while_unavailable`)."""
    return await while_unavailable(lambda: _open_bucket(js, config), f"bucket {config.name}")


async def _open_bucket(js: JetStreamContext, config: BucketConfig) -> KeyValue:
    try:
        return await js.key_value(config.name)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=config.name,
                description=config.description,
                history=config.history,
                replicas=config.replicas or deployment_replicas(),
                storage=StorageType.FILE,
                direct=True,
                limit_marker_ttl=config.marker_ttl,
            )
        )
    except Exception:
        # Another process may have created it between our two calls.
        return await js.key_value(config.name)


def ttl_seconds(seconds: float) -> int:
    """A per-key TTL as the server takes it: whole seconds, at least one."""
    return max(1, math.ceil(seconds))


async def put_with_ttl(
    js: JetStreamContext,
    bucket: str,
    key: str,
    value: bytes,
    ttl: float,
    *,
    last_revision: int | None = None,
) -> int:
    """Put `value` under `key` so that it lapses after `ttl` unless written again.

    With `last_revision`, the write is a compare-and-set on that revision.

    Raises:
        KeyWrongLastSequenceError: `last_revision` is not the key's latest revision.
    """
    headers = None
    if last_revision is not None:
        headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(last_revision)}
    try:
        ack = await js.publish(
            Subjects.kv_subject(bucket, key), value, headers=headers, msg_ttl=ttl_seconds(ttl)
        )
    except Exception as exc:
        if getattr(exc, "err_code", None) in (10071, 10164):
            raise KeyWrongLastSequenceError(description=str(exc)) from exc
        raise
    return int(ack.seq)


async def compare_and_set(
    js: JetStreamContext, bucket: str, key: str, value: bytes, last: int, timeout: float = 5.0
) -> int:
    """``KeyValue.update(key, value, last=last)``: store `value` if the key's revision is
    still `last`; its new revision. The acknowledgement is read with orjson rather than
    through nats-py's models, which cost a state write more than the rest of nats-py.

    Raises:
        KeyWrongLastSequenceError: The key's revision is not `last`.
        NoStreamResponseError, APIError: As ``KeyValue.update`` raises them.
    """
    headers = {EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)}
    try:
        reply = await js._nc.request(
            Subjects.kv_subject(bucket, key), value, timeout=timeout, headers=headers
        )
    except NoRespondersError:
        raise NoStreamResponseError from None
    return _stored_revision(reply.data)


def _stored_revision(acknowledgement: bytes) -> int:
    """The revision a JetStream acknowledgement of a compare-and-set gives.

    Raises:
        KeyWrongLastSequenceError: The key was at another revision.
        APIError: Any other error the server answered.
    """
    answer = orjson.loads(acknowledgement)
    error = answer.get("error")
    if error is not None:
        if error.get("err_code") in (10071, 10164):
            raise KeyWrongLastSequenceError(description=error.get("description"))
        raise APIError.from_error(error)
    return int(answer["seq"])


#: Writes a `CasWrites` buffers at most before handing them to the socket, rather than
#: waiting for the connection's flusher: many writes made at once reach the server in
#: parts, so it stores the first while the rest are being made.
WRITE_OUT_EVERY = 8

#: The header block of a compare-and-set on revision ``%d``.
_EXPECTED_LAST = b"NATS/1.0\r\n" + EXPECTED_LAST_SUBJECT_SEQUENCE.encode() + b": %d\r\n\r\n"

#: What becomes of a `CasWrites` write: the key's new revision, or why it failed.
Outcome = Callable[[int | Exception], None]


class CasWrites:
    """Compare-and-set writes whose outcomes are handed to a callback on the read loop:
    no task, future or coroutine per write, for a service that makes many at once.

    Every write started gets exactly one outcome: the key's new revision, or
    `KeyWrongLastSequenceError` (the key was at another revision), or another error:
    `NoStreamResponseError`, `APIError`, ``nats.errors.TimeoutError`` (no
    acknowledgement within `timeout`, noticed up to one 50 ms tick late; the write may
    still have been stored) or ``ConnectionClosedError`` (closed first; likewise).

    Args:
        nc: A mesh connection.
        timeout: Seconds to wait for each acknowledgement.
    """

    def __init__(self, nc: Connection, timeout: float = 5.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = ""
        self._subscription: Subscription | None = None
        self._written = 0
        self._waiting: dict[str, Outcome] = {}
        # Deadlines by tick: the tokens written in it, and the one timer that expires them.
        self._deadlines: dict[int, list[str]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Subscribe the inbox acknowledgements come back to."""
        if self._subscription is None:
            self._loop = asyncio.get_running_loop()
            self._prefix = f"{self._nc._inbox_prefix.decode()}.{self._nc._nuid.next().decode()}."
            self._subscription = await self._nc.subscribe_direct(
                self._prefix + "*", self._acknowledged
            )

    def write(self, bucket: str, key: str, value: bytes, last: int, outcome: Outcome) -> bool:
        """Store `value` under `key` if its revision is still `last`; `outcome` is called
        with what became of it. ``False``, and no call, when it cannot be sent now
        (not started, or the connection is not connected: see
        `Connection.publish_nowait`)."""
        loop = self._loop
        if self._subscription is None or loop is None:
            return False
        self._written += 1
        token = f"{self._written:x}"
        if not self._nc.publish_nowait(
            Subjects.kv_subject(bucket, key), value, self._prefix + token, _EXPECTED_LAST % last
        ):
            return False
        if self._written % WRITE_OUT_EVERY == 0:
            self._nc.write_out()  # the server can store these while more are made
        self._waiting[token] = outcome
        tick = math.ceil((loop.time() + self._timeout) / TICK)
        tokens = self._deadlines.get(tick)
        if tokens is None:
            tokens = self._deadlines[tick] = []
            self._timers[tick] = loop.call_at(tick * TICK, self._expire, tick)
        tokens.append(token)
        return True

    def _acknowledged(self, msg: Msg) -> None:
        outcome = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if outcome is None:
            return  # too late: its outcome was a timeout
        if not msg.data:  # a status: 503, no stream takes the subject
            outcome(NoStreamResponseError())
            return
        try:
            revision = _stored_revision(msg.data)
        except Exception as exc:
            outcome(exc)
            return
        outcome(revision)

    def _expire(self, tick: int) -> None:
        self._timers.pop(tick, None)
        for token in self._deadlines.pop(tick, ()):
            outcome = self._waiting.pop(token, None)
            if outcome is not None:
                outcome(NatsTimeoutError())

    async def close(self) -> None:
        """Stop: writes still waiting get ``ConnectionClosedError`` now."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._deadlines.clear()
        waiting, self._waiting = self._waiting, {}
        for outcome in waiting.values():
            outcome(ConnectionClosedError())


@dataclass(frozen=True, slots=True)
class MirroredEntry:
    """The latest value of a key, as a watcher saw it."""

    key: str
    value: bytes
    revision: int


ChangeCallback = Callable[[str, MirroredEntry | None], None]


class KvMirror:
    """A local copy of (part of) a bucket, kept fresh by one long-lived KV watch.

    With ``values=False`` it keeps no copy and only reports which keys change from now
    on (a headers-only watch): what a near cache needs to drop what it holds.

    Args:
        kv: The bucket.
        keys: The watch filter (``>`` for every key).
        on_change: Called with ``(key, entry)`` on every put, ``(key, None)`` on delete,
            purge or TTL expiry; with ``values=False``, on any change with an entry
            whose value is empty and whose revision is the change's, and for every key
            when the watch is made anew (changes may have gone unseen meanwhile).
        values: Mirror the values (else only report changes).
        check_interval: Seconds between checks that the watch still flows (see
            `_guard`); 0 turns them off.
    """

    def __init__(
        self,
        kv: KeyValue,
        keys: str = ">",
        on_change: ChangeCallback | None = None,
        *,
        values: bool = True,
        check_interval: float = 5.0,
    ):
        self._kv = kv
        self._keys = keys
        self._on_change = on_change
        self._values = values
        self._check_interval = check_interval
        self.entries: dict[str, MirroredEntry] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._guard_task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._reloaded: set[str] | None = None
        self._closed = False
        self._restarting = asyncio.Lock()
        #: The newest revision (stream sequence) this watch has delivered.
        self.last_revision = 0
        #: Checks of the watch made, and how often one found it stalled and watched anew.
        self.checks = 0
        self.stalls = 0

    async def start(self, timeout: float = 10.0) -> None:
        """Start watching and return once the current values are loaded."""
        if self._task is not None or self._closed:
            return
        await while_unavailable(lambda: self._watch_or_undo(timeout), f"watching {self._keys}")
        if self._check_interval > 0 and self._guard_task is None:
            self._guard_task = asyncio.create_task(
                self._guard(), name=f"kv-watch-guard:{self._keys}"
            )

    async def restart(self, timeout: float = 10.0) -> None:
        """Watch anew, e.g. after a reconnect, when the old watch may have stalled.

        Current values are loaded again; keys that vanished meanwhile are reported gone.
        Does nothing once closed.
        """
        async with self._restarting:
            if self._closed:
                return
            await self._stop()
            self._reloaded = set()
            await self._watch(timeout)

    async def _guard(self) -> None:
        """Watch anew when the watch stopped flowing without the connection noticing.

        nats-py's watch is an ordered consumer on one server. When that server restarts
        and this process's connection is to another one, nothing reconnects, and the
        client only re-creates the consumer on missed heartbeats, which can fail for
        good during a leader election. So every `check_interval` the consumer is asked
        how far it got: gone, or with changes the watch has not delivered on two checks
        in a row while nothing arrived, means stalled.
        """
        behind_since: int | None = None
        unready = 0
        while not self._closed:
            await asyncio.sleep(self._check_interval)
            watcher = self._watcher
            if watcher is None or not self.ready.is_set():
                # Loading, or a restart that failed: give it three checks.
                behind_since = None
                unready += 1
                if unready < 3 or self._restarting.locked():
                    continue
            else:
                subscription = watcher._sub
                try:
                    if subscription is None:
                        raise NotFoundError
                    async with asyncio.timeout(self._check_interval):
                        info = await subscription.consumer_info()
                except NotFoundError:
                    if watcher is not self._watcher:
                        continue  # watched anew meanwhile (a reconnect): not stalled
                except Exception:  # JetStream unavailable for now: ask at the next check
                    continue
                else:
                    if watcher is not self._watcher:
                        continue
                    delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
                    behind = bool(info.num_pending) or delivered > self.last_revision
                    stalled = behind and behind_since == self.last_revision
                    behind_since = self.last_revision if behind else None
                    self.checks += 1
                    if not stalled:
                        continue
            behind_since = None
            unready = 0
            self.stalls += 1
            logger.warning("KV watch on %s stalled; watching anew", self._keys)
            try:
                await self.restart()
            except Exception as exc:  # tried again at the next check
                logger.warning("watching %s anew failed: %s", self._keys, exc)

    async def _watch_or_undo(self, timeout: float) -> None:
        try:
            await self._watch(timeout)
        except BaseException:
            await self._stop()
            raise

    async def _watch(self, timeout: float) -> None:
        self.ready.clear()
        self._watcher = await watch(self._kv, self._keys, meta_only=not self._values)
        self._task = asyncio.create_task(self._follow(self._watcher), name=f"kv-watch:{self._keys}")
        self._task.add_done_callback(self._ended)
        async with asyncio.timeout(timeout):
            await self.ready.wait()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("KV watch on %s ended", self._keys, exc_info=task.exception())

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the current values are all in
                self._forget_vanished()
                self.ready.set()
                continue
            self.last_revision = max(self.last_revision, int(entry.revision or 0))
            if not self._values:
                # A change, or, when watching anew, a key that may have changed unseen.
                if self.ready.is_set() or self._reloaded is not None:
                    self._notify(entry.key, MirroredEntry(entry.key, b"", int(entry.revision or 0)))
                continue
            if self._reloaded is not None:
                self._reloaded.add(entry.key)
            if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
                self.entries.pop(entry.key, None)
                changed: MirroredEntry | None = None
            else:
                changed = MirroredEntry(entry.key, entry.value, int(entry.revision or 0))
                self.entries[entry.key] = changed
            self._notify(entry.key, changed)

    def _forget_vanished(self) -> None:
        if self._reloaded is None:
            return
        vanished = [key for key in self.entries if key not in self._reloaded]
        self._reloaded = None
        for key in vanished:
            del self.entries[key]
            self._notify(key, None)

    def _notify(self, key: str, entry: MirroredEntry | None) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(key, entry)
        except Exception:
            logger.exception("KV change callback failed for %s", key)

    async def _stop(self) -> None:
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        """Stop watching. Idempotent."""
        self._closed = True
        guard, self._guard_task = self._guard_task, None
        if guard is not None:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard
        async with self._restarting:
            await self._stop()
