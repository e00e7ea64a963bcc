"""Reading a durable JetStream pull consumer continuously, into a callback.

nats-py's ``fetch`` sends a request for every batch and waits on a queue for every
message; when events arrive one by one that is a request, a status reply and a
queue wait per event, which is most of what reading them costs. `PullConsumer`
keeps pull requests outstanding instead, as the Go and Java clients' ``Consume``
does: messages go straight from the connection to a callback, and more are asked
for when what is asked for and not yet received falls below half a batch, as far
as the receiver has room. Requests expire after a while (the server says how many
of one went unused); when neither messages nor the server's idle heartbeats arrive
for a few heartbeat intervals (a reconnect, a leader change), what was asked for is
written off and asked for again.

With a priority `group`, the consumer has the ``pinned_client`` policy: the server
delivers to one client at a time, which learns so from the ``Nats-Pin-Id`` header of
its first message and names that id in its later pulls. A client that stops pulling
for the consumer's priority timeout loses the pin to the next one that pulls; its
pulls are then refused (423) and it pulls again without an id, as a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh._connection import Connection, subscribe_calling

logger = logging.getLogger(__name__)

_STATUS = "Status"
_DESCRIPTION = "Description"
_PENDING_MESSAGES = "Nats-Pending-Messages"
_PIN_ID = "Nats-Pin-Id"
_API_PREFIX = "$JS.API"


def consumer_api(op: str, stream: str, durable: str) -> str:
    """The JetStream API subject of operation `op` on a consumer."""
    return f"{_API_PREFIX}.CONSUMER.{op}.{stream}.{durable}"


def delivery_of(msg: Msg) -> tuple[int, int]:
    """(stream sequence, times delivered) of a message a consumer delivered, read from
    its reply subject, ``$JS.ACK.[<domain>.<account>.]<stream>.<consumer>.<delivered>.
    <stream sequence>...``: what nats-py's full ``Msg.metadata`` costs several times."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        at = 4
    elif len(tokens) >= 11:  # with the domain and account
        at = 6
    else:
        at = 0
    if not at or tokens[0] != "$JS" or tokens[1] != "ACK":
        raise ValueError(f"not a JetStream delivery: {msg.reply!r}")
    return int(tokens[at + 1]), int(tokens[at])


async def ack(msg: Msg) -> None:
    """``msg.ack()``: on a mesh connection, written straight to its outgoing buffer."""
    nc = msg._client
    if isinstance(nc, Connection) and msg.reply and not msg._ackd:
        await nc.publish_reply(msg.reply)
        msg._ackd = True
    else:
        await msg.ack()


class PullConsumer:
    """Delivers a durable consumer's messages to `on_message` as they come.

    Args:
        nc: The connection.
        stream: The stream's name.
        durable: The durable consumer's name (it must exist).
        on_message: Called with each message, in delivery order, on the event loop.
        room: How many more messages the receiver takes now; asked again after `wake`.
        on_gone: Called when the consumer turns out not to exist (deleted, or a new
            server); the pull goes on, so re-creating the consumer is enough.
        batch: The most messages one pull request asks for.
        expires: Seconds a pull request waits on the server.
        heartbeat: Seconds between the server's idle heartbeats.
        group: The priority group to pull in, for a consumer with priority groups.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        durable: str,
        on_message: Callable[[Msg], None],
        room: Callable[[], int],
        on_gone: Callable[[], None],
        *,
        batch: int = 256,
        expires: float = 30.0,
        heartbeat: float = 5.0,
        group: str | None = None,
    ) -> None:
        self._nc = nc
        self._next_subject = consumer_api("MSG.NEXT", stream, durable)
        self._unpin_subject = consumer_api("UNPIN", stream, durable)
        self._on_message = on_message
        self._room = room
        self._on_gone = on_gone
        self._batch = batch
        self._expires = expires
        self._heartbeat = heartbeat
        self._group = group
        #: The id the server pinned this client with, while it is the pinned one.
        self.pin_id: str | None = None
        self._outstanding = 0
        self._last_heard = time.monotonic()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"pull:{self._next_subject}")

    @property
    def running(self) -> bool:
        """Whether it is pulling (false once stopped, or if its task ended by mistake)."""
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """The receiver has room again (call after it settled messages)."""
        self._wake.set()

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a cancellation lost in an expiring timeout (Python 3.11) ends the
            # loop at its next turn instead, through the flag.
            await asyncio.wait([task], timeout=timeout)

    async def unpin(self, timeout: float = 2.0) -> None:
        """Give up the pin (after `stop`), so that a standby takes over at once rather
        than after the priority timeout."""
        pin_id, self.pin_id = self.pin_id, None
        if self._group is None or pin_id is None:
            return
        try:
            await self._nc.request(
                self._unpin_subject, orjson.dumps({"group": self._group}), timeout=timeout
            )
        except Exception as exc:  # the server moves the pin after its timeout anyway
            logger.info("unpinning %s failed: %s", self._unpin_subject, exc)

    async def _run(self) -> None:
        inbox = self._nc.new_inbox()
        subscription: Subscription | None = None
        try:
            while subscription is None and not self._stopping:
                try:
                    subscription = await subscribe_calling(
                        self._nc, inbox, self._receive, pending_msgs_limit=1_000_000
                    )
                except Exception as exc:  # reconnecting: try again shortly
                    logger.info("subscribing for %s failed: %s", self._next_subject, exc)
                    await asyncio.sleep(min(1.0, self._heartbeat))
            while not self._stopping:
                self._wake.clear()
                wanted = min(self._room() - self._outstanding, self._batch)
                if wanted >= max(1, min(self._batch // 2, self._room())):
                    await self._request(inbox, wanted)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._heartbeat):
                        await self._wake.wait()
                silent = time.monotonic() - self._last_heard
                if self._outstanding and silent > 3 * self._heartbeat:
                    logger.info("no word on %s for %.0fs; pulling again", inbox, silent)
                    self._outstanding = 0
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def _request(self, inbox: str, count: int) -> None:
        request: dict[str, object] = {
            "batch": count,
            "expires": int(self._expires * 1e9),
            "idle_heartbeat": int(self._heartbeat * 1e9),
        }
        if self._group is not None:
            request["group"] = self._group
            if self.pin_id is not None:
                request["id"] = self.pin_id
        try:
            await self._nc.publish(self._next_subject, orjson.dumps(request), reply=inbox)
        except Exception as exc:  # disconnected: the watchdog asks again later
            logger.warning("pull request on %s failed: %s", self._next_subject, exc)
            await asyncio.sleep(min(1.0, self._heartbeat))
            return
        self._outstanding += count
        self._last_heard = time.monotonic()

    def _receive(self, msg: Msg) -> None:
        self._last_heard = time.monotonic()
        headers = msg.headers
        if msg.data or not headers or _STATUS not in headers:
            if headers and _PIN_ID in headers:
                self.pin_id = headers[_PIN_ID]
            self._outstanding = max(0, self._outstanding - 1)
            if self._outstanding < self._batch // 2:
                self._wake.set()
            self._on_message(msg)
            return
        status = headers[_STATUS]
        if status == "100":  # idle heartbeat (or flow control, which pull does not use)
            return
        if status == "423":  # pinned no more (or never): pull again as a standby
            if self.pin_id is not None:
                logger.info("%s: another client holds the pin now", self._next_subject)
            self.pin_id = None
            unused = headers.get(_PENDING_MESSAGES, "")
            self._outstanding = max(0, self._outstanding - int(unused)) if unused.isdigit() else 0
            self._wake.set()
            return
        if _PENDING_MESSAGES in headers:  # a request expired or ended with this many unused
            with contextlib.suppress(ValueError):
                self._outstanding = max(0, self._outstanding - int(headers[_PENDING_MESSAGES]))
            self._wake.set()
            return
        description = headers.get(_DESCRIPTION, "")
        if status in ("404", "408"):  # nothing (more) for a request that held no count
            return
        if status == "503" or "deleted" in description.lower():
            logger.warning("consumer %s is gone (%s %s)", self._next_subject, status, description)
            self._outstanding = 0
            self._on_gone()
            return
        logger.info("pull on %s: %s %s", self._next_subject, status, description)
        self._outstanding = 0  # leadership change, server shutdown...: ask afresh
        self._wake.set()
