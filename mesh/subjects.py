"""The only place that builds NATS subjects, KV bucket names and keys.

Every agent type, agent key and topic source becomes exactly one subject token (and
one KV key segment) through `escape_token`: each UTF-8 byte outside
``[A-Za-z0-9_-]`` is written ``=HH`` with upper-case hex. The escape is injective,
`unescape_token` reverses it, and its output is always a valid NATS token and KV
key segment. Topic types keep their dots as subject separators; each segment is
escaped the same way.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.errors import InvalidIdError
from mesh.ids import AgentId, TopicId, validate_agent_type, validate_key, validate_topic_type

DEFAULT_PREFIX = "mesh"
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_\-]{1,32}")
WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9_\-]{1,64}")
SERVICE_NAMES = ("registry", "router", "state", "gateway", "monitor")

_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPED = {b: f"={b:02X}" for b in range(256)}
_HEX_UPPER = frozenset("0123456789ABCDEF")


@functools.lru_cache(maxsize=65536)
def escape_token(text: str) -> str:
    """Escape `text` into one subject token: bytes outside ``[A-Za-z0-9_-]`` become ``=HH``."""
    if not text:
        raise InvalidIdError("an empty string cannot be a subject token")
    return "".join(chr(b) if b in _SAFE_BYTES else _ESCAPED[b] for b in text.encode("utf-8"))


def unescape_token(token: str) -> str:
    """Reverse `escape_token`; refuse anything `escape_token` could not have produced."""
    out = bytearray()
    i = 0
    n = len(token)
    if n == 0:
        raise InvalidIdError("empty subject token")
    while i < n:
        ch = token[i]
        if ch == "=":
            hex_digits = token[i + 1 : i + 3]
            if len(hex_digits) != 2 or not set(hex_digits) <= _HEX_UPPER:
                raise InvalidIdError(f"bad escape at {i} in token {token!r}")
            value = int(hex_digits, 16)
            if value in _SAFE_BYTES:
                raise InvalidIdError(f"needless escape at {i} in token {token!r}")
            out.append(value)
            i += 3
        elif ord(ch) < 128 and ord(ch) in _SAFE_BYTES:
            out.append(ord(ch))
            i += 1
        else:
            raise InvalidIdError(f"character {ch!r} not allowed in token {token!r}")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidIdError(f"token {token!r} is not escaped UTF-8") from exc


@functools.lru_cache(maxsize=4096)
def validate_worker_id(worker_id: str) -> str:
    """Return `worker_id` if it is 1-64 chars of ``[A-Za-z0-9_-]``, else raise."""
    if not isinstance(worker_id, str) or not WORKER_ID_PATTERN.fullmatch(worker_id):
        raise InvalidIdError(f"invalid worker id {worker_id!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return worker_id


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it is 1-32 chars of ``[A-Za-z0-9_-]``, else raise."""
    if not isinstance(prefix, str) or not PREFIX_PATTERN.fullmatch(prefix):
        raise InvalidIdError(f"invalid prefix {prefix!r}: use 1-32 of A-Z a-z 0-9 _ -")
    return prefix


@dataclass(frozen=True, slots=True)
class Subjects:
    """Subjects, bucket names and KV keys of one mesh, named by its prefix."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        validate_prefix(self.prefix)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Subjects:
        """The mesh named by ``MESH_PREFIX``, or the default one."""
        return cls(env.get("MESH_PREFIX") or DEFAULT_PREFIX)

    # Agent requests

    def rpc(self, agent_id: AgentId) -> str:
        """``<prefix>.rpc.<type>.<key>``: where clients send requests to an agent."""
        return f"{self.prefix}.rpc.{escape_token(agent_id.type)}.{escape_token(agent_id.key)}"

    @property
    def rpc_all(self) -> str:
        """The filter the gateway serves: every agent request."""
        return f"{self.prefix}.rpc.>"

    def parse_rpc(self, subject: str) -> AgentId:
        """The agent id a request subject addresses."""
        return self._parse_agent_tail(subject, f"{self.prefix}.rpc.")

    # Workers

    def worker(self, worker_id: str) -> str:
        """``<prefix>.worker.<worker_id>``: the root of one worker's subjects."""
        return f"{self.prefix}.worker.{validate_worker_id(worker_id)}"

    def worker_rpc(self, worker_id: str, agent_id: AgentId) -> str:
        """Where the gateway forwards a request for `agent_id` to one worker."""
        return (
            f"{self.worker(worker_id)}.rpc."
            f"{escape_token(agent_id.type)}.{escape_token(agent_id.key)}"
        )

    def worker_batch(self, worker_id: str) -> str:
        """``<prefix>.worker.<worker_id>.batch``: several deliveries in one message."""
        return f"{self.worker(worker_id)}.batch"

    def worker_rpc_all(self, worker_id: str) -> str:
        """The filter one worker serves for agent requests."""
        return f"{self.worker(worker_id)}.rpc.>"

    def parse_worker_rpc(self, worker_id: str, subject: str) -> AgentId:
        """The agent id a worker request subject addresses."""
        return self._parse_agent_tail(subject, f"{self.worker(worker_id)}.rpc.")

    def cancel(self, agent_id: AgentId) -> str:
        """``<prefix>.cancel.<type>.<key>``: a caller gave up on a request to the agent
        (its ``Mesh-Request-Id`` in the header); the worker running it cancels it."""
        return f"{self.prefix}.cancel.{escape_token(agent_id.type)}.{escape_token(agent_id.key)}"

    def cancel_all(self, agent_type: str) -> str:
        """The filter a worker hosting `agent_type` listens to for cancellations."""
        return f"{self.prefix}.cancel.{escape_token(validate_agent_type(agent_type))}.*"

    def pool(self, agent_id: AgentId) -> str:
        """``<prefix>.pool.<type>.<key>``: a request any worker of a stateless type may take."""
        return f"{self.prefix}.pool.{escape_token(agent_id.type)}.{escape_token(agent_id.key)}"

    def pool_all(self, agent_type: str) -> str:
        """The filter the workers of one stateless type share, in a queue group."""
        return f"{self.prefix}.pool.{escape_token(validate_agent_type(agent_type))}.*"

    def pool_queue(self, agent_type: str) -> str:
        """The queue group of a stateless type's workers."""
        return f"{self.prefix}-pool-{escape_token(validate_agent_type(agent_type))}"

    def parse_pool(self, subject: str) -> AgentId:
        """The agent id a pool subject addresses."""
        return self._parse_agent_tail(subject, f"{self.prefix}.pool.")

    def worker_ctl(self, worker_id: str, op: str) -> str:
        """``<prefix>.worker.<worker_id>.ctl.<op>``: control of one worker."""
        return f"{self.worker(worker_id)}.ctl.{escape_token(op)}"

    # Control plane

    def service(self, service: str, op: str) -> str:
        """``<prefix>.<service>.<op>``: a control-plane endpoint."""
        if service not in SERVICE_NAMES:
            raise InvalidIdError(f"unknown service {service!r}")
        return f"{self.prefix}.{service}.{escape_token(op)}"

    def micro_name(self, service: str) -> str:
        """The NATS micro service name: ``mesh-registry``, ``mesh-worker``..."""
        return f"{self.prefix}-{service}"

    def queue_group(self, service: str) -> str:
        """The queue group that replicas of one service share."""
        return f"{self.prefix}-{service}"

    # Events, alerts, dead letters

    def events(self, topic: TopicId) -> str:
        """``<prefix>.events.<topic type segments>.<source>``."""
        segments = ".".join(escape_token(s) for s in validate_topic_type(topic.type).split("."))
        return f"{self.prefix}.events.{segments}.{escape_token(topic.source)}"

    @property
    def events_all(self) -> str:
        """Every event subject: what ``MESH_EVENTS`` stores."""
        return f"{self.prefix}.events.>"

    @property
    def dlq_all(self) -> str:
        """Every dead-letter subject."""
        return f"{self.prefix}.dlq.>"

    @property
    def subscriptions_bucket(self) -> str:
        return self.bucket("subscriptions")

    def parse_events(self, subject: str) -> TopicId:
        """The topic id an event subject names."""
        head = f"{self.prefix}.events."
        if not subject.startswith(head):
            raise InvalidIdError(f"{subject!r} is not an event subject")
        return _topic_of(subject[len(head) :])

    def alerts(self, severity: str, rule: str) -> str:
        """``<prefix>.alerts.<severity>.<rule>``."""
        return f"{self.prefix}.alerts.{escape_token(severity)}.{escape_token(rule)}"

    def dlq(self, agent_type: str) -> str:
        """``<prefix>.dlq.<agent_type>``: events that exhausted their deliveries."""
        return f"{self.prefix}.dlq.{escape_token(validate_agent_type(agent_type))}"

    # JetStream streams and KV buckets

    def stream(self, name: str) -> str:
        """A stream name: ``MESH_EVENTS`` for the default prefix."""
        return f"{self.prefix.upper()}_{name.upper()}"

    def bucket(self, name: str) -> str:
        """A KV bucket name: ``mesh-workers`` for the default prefix."""
        return f"{self.prefix}-{name}"

    @property
    def workers_bucket(self) -> str:
        return self.bucket("workers")

    @property
    def types_bucket(self) -> str:
        return self.bucket("types")

    @property
    def placement_bucket(self) -> str:
        return self.bucket("placement")

    @property
    def cache_bucket(self) -> str:
        return self.bucket("cache")

    @staticmethod
    def kv_subject(bucket: str, key: str) -> str:
        """The JetStream subject a KV key is stored under (``$KV.<bucket>.<key>``)."""
        return f"$KV.{bucket}.{key}"

    # KV keys

    @staticmethod
    def worker_key(worker_id: str) -> str:
        """Key of a worker in ``mesh-workers``."""
        return validate_worker_id(worker_id)

    @staticmethod
    def type_key(agent_type: str, worker_id: str) -> str:
        """Key of one worker's registration of one agent type in ``mesh-types``."""
        return f"{escape_token(validate_agent_type(agent_type))}.{validate_worker_id(worker_id)}"

    @staticmethod
    def type_keys_of(agent_type: str) -> str:
        """A watch filter for every registration of one agent type."""
        return f"{escape_token(validate_agent_type(agent_type))}.*"

    @staticmethod
    def parse_type_key(key: str) -> tuple[str, str]:
        """``(agent_type, worker_id)`` from a ``mesh-types`` key."""
        type_token, sep, worker_id = key.partition(".")
        if not sep:
            raise InvalidIdError(f"{key!r} is not a type registration key")
        return validate_agent_type(unescape_token(type_token)), validate_worker_id(worker_id)

    @staticmethod
    def agent_key(agent_id: AgentId) -> str:
        """Key of one agent in per-agent buckets (``mesh-placement``, ``mesh-state``)."""
        return f"{escape_token(agent_id.type)}.{escape_token(agent_id.key)}"

    @staticmethod
    def cache_key(namespace: str, key: str) -> str:
        """Key of a cache entry in ``mesh-cache``: ``<namespace>.<key segments>``.

        The cache key's dots separate segments (each escaped), so that patterns can
        select by segment.
        """
        return ".".join(
            [escape_token(validate_key(namespace, what="cache namespace"))]
            + [escape_token(validate_key(s, what="cache key segment")) for s in key.split(".")]
        )

    @staticmethod
    def cache_pattern(namespace: str, pattern: str) -> str:
        """A filter over a namespace's keys: segments, ``*`` for one, ``>`` for the rest."""
        segments = pattern.split(".")
        if ">" in segments[:-1]:
            raise InvalidIdError(f"'>' may only end a cache pattern, not {pattern!r}")
        return ".".join(
            [escape_token(validate_key(namespace, what="cache namespace"))]
            + [
                s if s in ("*", ">") else escape_token(validate_key(s, what="cache key segment"))
                for s in segments
            ]
        )

    @staticmethod
    def parse_agent_key(key: str) -> AgentId:
        """The agent id a per-agent bucket key names."""
        return Subjects._parse_agent_tail(key, "")

    # Parsing helpers

    @staticmethod
    def _parse_agent_tail(subject: str, head: str) -> AgentId:
        if not subject.startswith(head):
            raise InvalidIdError(f"{subject!r} is not under {head!r}")
        return _agent_id_of(subject[len(head) :])


@functools.lru_cache(maxsize=65536)
def _topic_of(tail: str) -> TopicId:
    """The topic of ``<escaped type segments>.<escaped source>`` (cached, like agent ids)."""
    tokens = tail.split(".")
    if len(tokens) < 2:
        raise InvalidIdError(f"{tail!r} has no topic type and source")
    topic_type = ".".join(unescape_token(t) for t in tokens[:-1])
    topic = TopicId(topic_type, unescape_token(tokens[-1]))
    canonical = ".".join([*(escape_token(s) for s in topic_type.split(".")), tokens[-1]])
    if canonical != tail:  # e.g. an escaped dot inside a segment
        raise InvalidIdError(f"{tail!r} is not the canonical subject of {topic}")
    return topic


@functools.lru_cache(maxsize=65536)
def _agent_id_of(tail: str) -> AgentId:
    """The agent id of ``<escaped type>.<escaped key>`` (cached: it is on every hot path)."""
    tokens = tail.split(".")
    if len(tokens) != 2:
        raise InvalidIdError(f"{tail!r} must be exactly two tokens: <escaped type>.<escaped key>")
    agent_type = validate_agent_type(unescape_token(tokens[0]))
    return AgentId(agent_type, validate_key(unescape_token(tokens[1])))
