"""mesh: a distributed agent runtime on NATS and JetStream."""

__version__ = "0.1.0"

from mesh.agent import Agent, AgentDefinitionError, MessageContext, handler
from mesh.client import MeshClient
from mesh.codec import JSON, MSGPACK
from mesh.config import ConnectConfig, EventsConfig, GatewayConfig, RegistryConfig, WorkerConfig
from mesh.errors import (
    AgentTypeNotFoundError,
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    DecodeError,
    ErrorCode,
    ForbiddenError,
    HandlerError,
    InvalidIdError,
    MeshConnectionError,
    MeshError,
    NoWorkerAvailableError,
    PayloadTooLargeError,
    RateLimitedError,
    UnauthorizedError,
    UnknownMessageTypeError,
    WorkerNotRegisteredError,
)
from mesh.ids import AgentId, TopicId
from mesh.server import NatsServer
from mesh.subjects import Subjects
from mesh.subscriptions import (
    DefaultSubscription,
    Subscription,
    TypePrefixSubscription,
    TypeSubscription,
    default_subscription,
    type_prefix_subscription,
    type_subscription,
)
from mesh.worker import Worker

__all__ = [
    "JSON",
    "MSGPACK",
    "Agent",
    "AgentDefinitionError",
    "AgentId",
    "AgentTypeNotFoundError",
    "BadRequestError",
    "ConflictError",
    "ConnectConfig",
    "DeadlineExceededError",
    "DecodeError",
    "DefaultSubscription",
    "ErrorCode",
    "EventsConfig",
    "ForbiddenError",
    "GatewayConfig",
    "HandlerError",
    "InvalidIdError",
    "MeshClient",
    "MeshConnectionError",
    "MeshError",
    "MessageContext",
    "NatsServer",
    "NoWorkerAvailableError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RegistryConfig",
    "Subjects",
    "Subscription",
    "TopicId",
    "TypePrefixSubscription",
    "TypeSubscription",
    "UnauthorizedError",
    "UnknownMessageTypeError",
    "Worker",
    "WorkerConfig",
    "WorkerNotRegisteredError",
    "__version__",
    "default_subscription",
    "handler",
    "type_prefix_subscription",
    "type_subscription",
]
