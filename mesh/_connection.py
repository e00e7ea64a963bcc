"""Mesh's NATS client: nats-py's, with a faster way in and out for every message.

`Connection` keeps nats-py's API and behaviour and replaces what every message pays
for: the protocol parser (`mesh._parser`), header parsing and encoding, and the queue
and task nats-py puts between the socket reader and each subscriber (direct
subscriptions, used by the delivery consumers, the micro service endpoints and the
request reply inbox). Requests take their reply token from a counter and their
deadline from a shared wheel (`mesh._deadlines`). Tests check each part against
nats-py's own result.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh._deadlines import DeadlineWheel
from mesh._parser import FastParser

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s")


#: What nats-py accepts as a header name, and how it keeps line breaks out of values.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NO_LINE_BREAKS = str.maketrans({"\r": " ", "\n": " "})
#: Header names seen before, as given, with their encoded ``Name: `` (checked once).
_header_prefixes: dict[str, bytes] = {}
_KNOWN_HEADER_NAMES = 4096


def encode_headers(headers: dict[str, Any]) -> bytes:
    """A message's header block, as nats-py writes it (names stripped, empty ones
    skipped, line breaks in values made spaces).

    Raises:
        BadHeaderError: A name has characters a header name cannot have.
    """
    lines = [b"NATS/1.0\r\n"]
    for name, value in headers.items():
        prefix = _header_prefixes.get(name)
        if prefix is None:
            stripped = name.strip()
            if not stripped:
                continue
            if not _HEADER_NAME.fullmatch(stripped):
                raise nats.errors.BadHeaderError(stripped)
            prefix = (stripped + ": ").encode()
            if len(_header_prefixes) < _KNOWN_HEADER_NAMES:
                _header_prefixes[name] = prefix
        lines.append(prefix + value.strip().translate(_NO_LINE_BREAKS).encode() + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


#: Connection states in which nats-py publishes (connected, or draining subscriptions).
_PUBLISHING = frozenset({NATS.CONNECTED, NATS.DRAINING_SUBS})


def _publish_command(
    subject: str, reply: str, payload: bytes, headers: dict[str, Any] | bytes | None
) -> bytes:
    """The ``PUB`` (or, with headers, ``HPUB``) command that publishes `payload`;
    `headers` as a dict, or a block `encode_headers` made."""
    if headers is None:
        return b"PUB %b %b %d\r\n%b\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    block = headers if isinstance(headers, bytes) else encode_headers(headers)
    return b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
        subject.encode(),
        reply.encode(),
        len(block),
        len(block) + len(payload),
        block,
        payload,
    )


#: Called on the connection's read loop with each message of a direct subscription.
DirectHandler = Callable[[Msg], None]
_PLAIN_HEADER_START = b"NATS/1.0\r\n"


class Connection(NATS):
    """nats-py's client, faster per message (see the module), with direct
    subscriptions: messages handed to a plain function as they are read."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = FastParser(self)
        self._direct: dict[int, DirectHandler] = {}
        self._reply_prefix = ""
        self._requests_made = 0
        self._deadlines: DeadlineWheel | None = None

    async def subscribe_direct(
        self, subject: str, handler: DirectHandler, queue: str = ""
    ) -> Subscription:
        """Subscribe `subject` (in `queue` group, if any), calling `handler` with each
        message as it is read.

        The handler runs on the read loop: it must not block, and what it raises is
        logged and otherwise ignored. Unsubscribing the returned subscription (or
        closing the connection) ends the calls; it survives reconnects as any
        subscription does.
        """
        # nats-py numbers the subscription before it first waits: the handler is in
        # place before any message for it can be read.
        sid = self._sid + 1
        self._direct[sid] = handler
        try:
            subscription = await self.subscribe(subject, queue)
        except BaseException:
            self._direct.pop(sid, None)
            raise
        assert subscription._id == sid
        return subscription

    async def _send_publish(
        self,
        subject: str,
        reply: str,
        payload: bytes,
        payload_size: int,
        headers: dict[str, Any] | None,
    ) -> None:
        # nats-py's, with the header block encoded as `encode_headers` does it.
        if subject == "":
            raise nats.errors.BadSubjectError
        command = _publish_command(subject, reply, payload, headers)
        stats = self.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += payload_size
        await self._send_command(command)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def publish_nowait(
        self,
        subject: str,
        payload: bytes,
        reply: str = "",
        headers: dict[str, str] | bytes | None = None,
    ) -> bool:
        """Publish without waiting, for code that cannot (a direct handler): the message
        joins the outgoing buffer and the flusher is woken, as `publish` does while
        connected. `headers` may be a block `encode_headers` made. ``False``, and
        nothing sent, when the connection is not connected or is draining its
        publications, or `payload` is over the server's limit: `publish` says why, or
        buffers the message until a reconnect."""
        queue = self._flush_queue
        if (
            self._status not in _PUBLISHING
            or queue is None
            or len(payload) > self._max_payload
            or not subject
        ):
            return False
        command = _publish_command(subject, reply, payload, headers)
        stats = self.stats
        stats["out_msgs"] += 1
        stats["out_bytes"] += len(payload)
        self._pending.append(command)
        self._pending_data_size += len(command)
        if queue.empty():
            queue.put_nowait(asyncio.get_running_loop().create_future())  # the flusher's wake-up
        return True

    def write_out(self) -> None:
        """Hand what is buffered for the socket to it now (one system call), rather than
        when the flusher next runs: the server starts on those messages while more are
        being made. Order is kept: the flusher writes what is buffered after them."""
        transport = self._transport
        if self._pending and self.is_connected and transport is not None:
            transport.writelines(self._pending)
            self._pending = []
            self._pending_data_size = 0

    async def publish_reply(self, reply: str, payload: bytes = b"") -> None:
        """Publish `payload` without headers to `reply`, a subject the server handed us
        (a JetStream acknowledgement's, a request's reply): what `publish` does, without
        the checks a subject from elsewhere needs. Disconnected, it is `publish`."""
        if not self.is_connected or self.is_draining_pubs or len(payload) > self._max_payload:
            await self.publish(reply, payload)  # which buffers, or says why it cannot
            return
        await self._send_publish(reply, "", payload, len(payload), None)

    async def _request_new_style(
        self,
        subject: str,
        payload: bytes,
        timeout: float = 1,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        # nats-py's request, with a counter for the reply token (not random bytes from
        # the OS) and the deadline kept on a shared wheel (not a timer per request): a
        # timeout can be noticed up to one tick (50 ms) late.
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        if not self._resp_sub_prefix:
            await self._init_request_sub()
        self._requests_made += 1
        token = f"{self._requests_made:x}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._resp_map[token] = future
        try:
            await self.publish(subject, payload, reply=self._reply_prefix + token, headers=headers)
            if timeout is None:  # as nats-py: no limit
                return await future
            if self._deadlines is None:
                self._deadlines = DeadlineWheel()
            deadline = self._deadlines.scope(timeout)
            try:
                with deadline:
                    return await future
            except TimeoutError:
                if deadline.expired:
                    raise nats.errors.TimeoutError from None
                raise
        finally:
            self._resp_map.pop(token, None)

    async def _close(self, status: int, do_cbs: bool = True) -> None:
        await super()._close(status, do_cbs)
        # Requests still waiting get no answer now: they fail at once rather than wait
        # for their deadline (whose timers go with the connection).
        for future in list(self._resp_map.values()):
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())
        if self._deadlines is not None:
            self._deadlines.close()
        self._direct.clear()

    async def _init_request_sub(self) -> None:
        # nats-py's reply inbox (one wildcard subscription for every request's reply),
        # with each reply handed to its waiting request straight from the read loop.
        self._resp_map = {}
        self._resp_sub_prefix = self._inbox_prefix[:]
        self._resp_sub_prefix.extend(b".")
        self._resp_sub_prefix.extend(self._nuid.next())
        self._resp_sub_prefix.extend(b".")
        self._reply_prefix = self._resp_sub_prefix.decode()
        await self.subscribe_direct(self._reply_prefix + "*", self._resolve_reply)

    def _resolve_reply(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]  # the request's own, after the prefix
        future = self._resp_map.get(token)
        if future is not None and not future.done():
            future.set_result(msg)

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._direct.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        handler = self._direct.get(sid)
        if handler is None:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        subscription = self._subs.get(sid)
        if subscription is None:
            return  # unsubscribed meanwhile
        subscription._received += 1
        if 0 < subscription._max_msgs <= subscription._received:
            self._remove_sub(sid)  # `unsubscribe(limit=N)`: that was the last one
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        if not headers:
            parsed = None
        elif headers.startswith(_PLAIN_HEADER_START):  # no status line: the usual case
            parsed = self._parse_header_lines(headers[len(_PLAIN_HEADER_START) :]) or None
        else:
            parsed = await self._process_headers(headers)
        msg = Msg(self, subject.decode(), reply.decode(), data, parsed, _sid=sid)
        try:
            handler(msg)
        except Exception:
            logger.exception("handling a message on %s failed", msg.subject)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue  # not a header name: skipped, as nats-py does
            if _WHITESPACE.search(key) is None:
                headers[key] = value.strip().decode("utf-8", "replace")
        return headers


async def subscribe_calling(
    nc: NATS, subject: str, handler: DirectHandler, queue: str = "", **options: Any
) -> Subscription:
    """Subscribe `subject`, calling `handler` with each message: straight from the read
    loop on a mesh `Connection`, through nats-py's queue and task on any other client
    (`options` go to its ``subscribe``)."""
    if isinstance(nc, Connection):
        return await nc.subscribe_direct(subject, handler, queue)

    async def call(msg: Msg) -> None:
        handler(msg)

    return await nc.subscribe(subject, queue=queue, cb=call, **options)
