"""Settings of mesh's processes: frozen dataclasses, each with `from_env`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh._balancing import make_strategy
from mesh.errors import BadRequestError


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be a number of seconds, not {raw!r}") from None
    if value <= 0:
        raise BadRequestError(f"{name} must be positive, not {raw!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be a whole number, not {raw!r}") from None
    if value <= 0:
        raise BadRequestError(f"{name} must be positive, not {raw!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectConfig:
    """How a mesh process connects to NATS.

    Attributes:
        url: One or more server URLs, comma-separated.
        user, password, token, creds_file, nkeys_seed: Credentials, when the server wants them.
        connect_timeout: Seconds to wait for the first connection.
    """

    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkeys_seed: str | None = None
    connect_timeout: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ConnectConfig:
        default = cls()
        return cls(
            url=env.get("MESH_NATS_URL") or default.url,
            user=env.get("MESH_NATS_USER") or None,
            password=env.get("MESH_NATS_PASSWORD") or None,
            token=env.get("MESH_NATS_TOKEN") or None,
            creds_file=env.get("MESH_NATS_CREDS") or None,
            nkeys_seed=env.get("MESH_NATS_NKEY") or None,
            connect_timeout=_float(env, "MESH_CONNECT_TIMEOUT", default.connect_timeout),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig:
    """Settings of the registry and of everything that judges worker liveness.

    Attributes:
        missed_heartbeats: A worker whose last heartbeat is older than this many of its
            heartbeat intervals is dead: it drops out of lookups and its entry lapses.
        type_retention: How long a dead worker's agent type registrations stay, so that
            callers get 503 (known type, no worker) rather than 404 meanwhile.
    """

    missed_heartbeats: int = 3
    type_retention: float = 3600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RegistryConfig:
        default = cls()
        return cls(
            missed_heartbeats=_int(env, "MESH_MISSED_HEARTBEATS", default.missed_heartbeats),
            type_retention=_float(env, "MESH_TYPE_RETENTION", default.type_retention),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """Settings of the gateway.

    Attributes:
        default_timeout: Deadline of a request that sets no ``Mesh-Timeout-Ms``.
        max_timeout: The longest deadline a caller may ask for.
        max_payload: Largest request body in bytes; larger ones get 413.
        max_in_flight: Requests one gateway holds at once; more are answered 503 at once.
        default_strategy: Load-balancing strategy for types that name none.
        strategies: Agent type -> strategy, overriding what the type registered.
        cooldown: Seconds a worker stays unhealthy after failing requests.
        failures_before_unhealthy: Timeouts in a row that make a worker unhealthy.
    """

    default_timeout: float = 30.0
    max_timeout: float = 300.0
    max_payload: int = 1024 * 1024
    max_in_flight: int = 200_000
    default_strategy: str = "adaptive"
    strategies: Mapping[str, str] = field(default_factory=dict)
    cooldown: float = 10.0
    failures_before_unhealthy: int = 3

    def __post_init__(self) -> None:
        make_strategy(self.default_strategy)
        for name in self.strategies.values():
            make_strategy(name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> GatewayConfig:
        default = cls()
        strategies = {}
        for pair in (env.get("MESH_LB_STRATEGIES") or "").split(","):
            if pair.strip():
                agent_type, sep, name = pair.partition("=")
                if not sep:
                    raise BadRequestError(f"MESH_LB_STRATEGIES wants type=strategy, not {pair!r}")
                strategies[agent_type.strip()] = name.strip()
        return cls(
            default_strategy=env.get("MESH_LB_STRATEGY") or default.default_strategy,
            strategies=strategies,
            cooldown=_float(env, "MESH_UNHEALTHY_COOLDOWN", default.cooldown),
            failures_before_unhealthy=_int(
                env, "MESH_FAILURES_BEFORE_UNHEALTHY", default.failures_before_unhealthy
            ),
            default_timeout=_float(env, "MESH_DEFAULT_TIMEOUT", default.default_timeout),
            max_timeout=_float(env, "MESH_MAX_TIMEOUT", default.max_timeout),
            max_payload=_int(env, "MESH_MAX_PAYLOAD", default.max_payload),
            max_in_flight=_int(env, "MESH_GATEWAY_MAX_IN_FLIGHT", default.max_in_flight),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """Settings of a worker process.

    Attributes:
        worker_id: Stable id; a fresh one (host, pid, random) when ``None``.
        heartbeat_interval: Seconds between heartbeats to the registry.
        max_in_flight: Requests one worker holds at once (running, or waiting for their
            agent's mailbox); more are answered 503 at once.
        capacity: Requests the worker serves well at once, advertised in heartbeats:
            gateways place no new agent on a worker this busy, and weigh load against it.
        drain_timeout: On shutdown, how long in-flight requests may run before cancellation.
        idle_timeout: An activation unused this long is deactivated.
        register_timeout: How long to keep trying to reach a registry at start.
        mailbox_limit: Messages one agent may have running or waiting; more are answered
            503 at once, so that a hot agent cannot take the worker's memory or slots.
    """

    worker_id: str | None = None
    heartbeat_interval: float = 2.0
    max_in_flight: int = 1024
    capacity: int = 64
    drain_timeout: float = 30.0
    idle_timeout: float = 600.0
    register_timeout: float = 30.0
    mailbox_limit: int = 256

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WorkerConfig:
        default = cls()
        return cls(
            worker_id=env.get("MESH_WORKER_ID") or None,
            heartbeat_interval=_float(env, "MESH_HEARTBEAT_INTERVAL", default.heartbeat_interval),
            max_in_flight=_int(env, "MESH_WORKER_MAX_IN_FLIGHT", default.max_in_flight),
            capacity=_int(env, "MESH_WORKER_CAPACITY", default.capacity),
            drain_timeout=_float(env, "MESH_DRAIN_TIMEOUT", default.drain_timeout),
            idle_timeout=_float(env, "MESH_IDLE_TIMEOUT", default.idle_timeout),
            register_timeout=_float(env, "MESH_REGISTER_TIMEOUT", default.register_timeout),
            mailbox_limit=_int(env, "MESH_MAILBOX_LIMIT", default.mailbox_limit),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsConfig:
    """Settings of event storage and delivery.

    Attributes:
        retention: Seconds ``MESH_EVENTS`` keeps an event (when the stream is created).
        max_deliveries: Deliveries of an event before it goes to the dead-letter subject.
        retry_delay: Delay before the first retry; it doubles with each further one.
        handler_timeout: Deadline of one delivery.
        ack_wait: Seconds before an unacknowledged delivery is made again.
        max_ack_pending: Events of one agent type the server lets out unacknowledged.
        max_held: Events of one agent type fetched and waiting here at most; keeps a
            backlog from outliving ``ack_wait`` in the lanes.
        batch: Events fetched per pull.
        pin_timeout: Seconds a type's reading worker may go without pulling before
            the server hands its events to a standby worker of the type.
    """

    retention: float = 7 * 24 * 3600.0
    max_deliveries: int = 5
    retry_delay: float = 0.5
    handler_timeout: float = 30.0
    ack_wait: float = 60.0
    max_ack_pending: int = 10_000
    max_held: int = 2048
    batch: int = 256
    pin_timeout: float = 6.0

    def __post_init__(self) -> None:
        if self.pin_timeout < 1.0:
            raise BadRequestError(f"pin_timeout ({self.pin_timeout:g}s) must be at least 1s")
        if self.handler_timeout >= self.ack_wait:
            raise BadRequestError(
                f"handler_timeout ({self.handler_timeout:g}s) must be below ack_wait"
                f" ({self.ack_wait:g}s), or events are redelivered while being handled"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> EventsConfig:
        default = cls()
        return cls(
            retention=_float(env, "MESH_EVENTS_RETENTION", default.retention),
            max_deliveries=_int(env, "MESH_EVENTS_MAX_DELIVERIES", default.max_deliveries),
            retry_delay=_float(env, "MESH_EVENTS_RETRY_DELAY", default.retry_delay),
            handler_timeout=_float(env, "MESH_EVENTS_HANDLER_TIMEOUT", default.handler_timeout),
            ack_wait=_float(env, "MESH_EVENTS_ACK_WAIT", default.ack_wait),
            max_ack_pending=_int(env, "MESH_EVENTS_MAX_ACK_PENDING", default.max_ack_pending),
            pin_timeout=_float(env, "MESH_EVENTS_PIN_TIMEOUT", default.pin_timeout),
            max_held=_int(env, "MESH_EVENTS_MAX_HELD", default.max_held),
            batch=_int(env, "MESH_EVENTS_BATCH", default.batch),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingConfig:
    """Settings of content-based routing (``mesh.router.route``).

    Attributes:
        default_target: The agent type for messages that nothing else routes.
        min_confidence: Rules less confident than this do not decide alone.
        min_similarity: Routed messages less similar than this do not vote.
    """

    default_target: str = "assistant"
    min_confidence: float = 0.6
    min_similarity: float = 0.3

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> RoutingConfig:
        default = cls()
        return cls(
            default_target=env.get("MESH_ROUTER_DEFAULT") or default.default_target,
            min_confidence=_float(env, "MESH_ROUTER_MIN_CONFIDENCE", default.min_confidence),
            min_similarity=_float(env, "MESH_ROUTER_MIN_SIMILARITY", default.min_similarity),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class StateConfig:
    """Settings of the state service (``mesh-state``).

    Attributes:
        history: Versions kept per agent (KV history, 1-64), when the bucket is created.
        max_state_bytes: Largest state (its JSON) accepted; larger ones get 413.
        known_revisions: Agents whose latest KV revision the service remembers, so that
            a write expecting the version it last wrote needs no read first.
        write_timeout: Seconds a write keeps trying while JetStream does not acknowledge
            it (a stream leader change takes 5-7 s after a node dies).
        max_puts_in_flight: Puts one state service holds at once, each put of a
            ``put_many`` counted; a request that would go beyond is answered 503 at once.
    """

    history: int = 16
    max_state_bytes: int = 1_000_000
    known_revisions: int = 100_000
    write_timeout: float = 10.0
    max_puts_in_flight: int = 10_000

    def __post_init__(self) -> None:
        if not 1 <= self.history <= 64:
            raise BadRequestError(f"state history must be 1 to 64 versions, not {self.history}")
        if self.max_puts_in_flight < 1:
            raise BadRequestError(
                f"the state service must take at least 1 put at once, not {self.max_puts_in_flight}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> StateConfig:
        default = cls()
        return cls(
            history=_int(env, "MESH_STATE_HISTORY", default.history),
            max_state_bytes=_int(env, "MESH_STATE_MAX_BYTES", default.max_state_bytes),
            known_revisions=_int(env, "MESH_STATE_KNOWN_REVISIONS", default.known_revisions),
            write_timeout=_float(env, "MESH_STATE_WRITE_TIMEOUT", default.write_timeout),
            max_puts_in_flight=_int(
                env, "MESH_STATE_MAX_PUTS_IN_FLIGHT", default.max_puts_in_flight
            ),
        )


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise BadRequestError(f"{name} must be on or off, not {raw!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Who may call through the gateway, and how often.

    Attributes:
        enabled: Check credentials (off for development, on in production).
        jwt_secret: Shared secret for HS256 bearer tokens.
        jwt_public_key_file: PEM public key for RS256/ES256 bearer tokens.
        jwks_file: A JWKS file of public keys, chosen by the token's ``kid``.
        jwt_issuer: Required ``iss`` claim, when set.
        jwt_audience: Required ``aud`` claim, when set.
        default_rate: Requests per second for clients whose record sets none.
        default_burst: Requests a client may make at once beyond its rate.
        share_interval: Seconds between gateways telling each other what they admitted.
    """

    enabled: bool = False
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwks_file: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    default_rate: float = 100.0
    default_burst: int = 200
    share_interval: float = 0.2

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> AuthConfig:
        default = cls()
        return cls(
            enabled=_switch(env, "MESH_AUTH", default.enabled),
            jwt_secret=env.get("MESH_JWT_SECRET") or None,
            jwt_public_key_file=env.get("MESH_JWT_PUBLIC_KEY") or None,
            jwks_file=env.get("MESH_JWT_JWKS") or None,
            jwt_issuer=env.get("MESH_JWT_ISSUER") or None,
            jwt_audience=env.get("MESH_JWT_AUDIENCE") or None,
            default_rate=_float(env, "MESH_RATE_LIMIT", default.default_rate),
            default_burst=_int(env, "MESH_RATE_BURST", default.default_burst),
            share_interval=_float(env, "MESH_RATE_SHARE_INTERVAL", default.share_interval),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MonitorConfig:
    """Settings of the monitor service (``mesh-monitor``).

    Attributes:
        interval: Seconds between evaluations of the alert rules.
        rules_file: The alert rules (JSON); the sample rules when unset.
        dedupe_window: Seconds within which an alert that fires again with a value
            within 10% of the last one is held back as a duplicate.
        escalation: Seconds after which an alert still firing is notified again, per
            severity (absent: never).
        ping_window: Seconds to wait for services to answer a health ping.
    """

    interval: float = 1.0
    rules_file: str | None = None
    dedupe_window: float = 300.0
    escalation: Mapping[str, float] = field(
        default_factory=lambda: {"critical": 300.0, "warning": 1800.0}
    )
    ping_window: float = 0.25

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> MonitorConfig:
        default = cls()
        return cls(
            interval=_float(env, "MESH_MONITOR_INTERVAL", default.interval),
            rules_file=env.get("MESH_ALERT_RULES") or None,
            dedupe_window=_float(env, "MESH_ALERT_DEDUPE_WINDOW", default.dedupe_window),
            escalation={
                "critical": _float(env, "MESH_ESCALATE_CRITICAL", default.escalation["critical"]),
                "warning": _float(env, "MESH_ESCALATE_WARNING", default.escalation["warning"]),
            },
        )
