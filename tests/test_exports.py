"""The public surface of the `mesh` package: changing it must be deliberate."""

from __future__ import annotations

import re

import mesh

EXPECTED_ALL = [
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


def isort_style_key(name: str) -> tuple[int, list[int | str]]:
    """The order ruff's RUF022 keeps ``__all__`` in.

    SCREAMING_SNAKE_CASE names first, then CamelCase, then everything else; a
    natural sort within each group.
    """
    if len(name) > 1 and name.isupper():
        group = 0
    elif name[:1].isupper():
        group = 1
    else:
        group = 2
    natural = [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return group, natural


def test_all_is_sorted_in_ruffs_isort_style() -> None:
    assert mesh.__all__ == sorted(mesh.__all__, key=isort_style_key)


def test_all_is_sorted_as_python_sorts_strings_within_each_group() -> None:
    for group in (0, 1, 2):
        names = [n for n in mesh.__all__ if isort_style_key(n)[0] == group]
        assert names == sorted(names)


def test_all_has_no_duplicates() -> None:
    assert len(mesh.__all__) == len(set(mesh.__all__))


def test_every_name_in_all_resolves() -> None:
    missing = [name for name in mesh.__all__ if not hasattr(mesh, name)]
    assert missing == []


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from mesh import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == sorted(mesh.__all__)


def test_all_is_exactly_the_pinned_list() -> None:
    assert mesh.__all__ == EXPECTED_ALL


def test_version_is_exported_as_a_string() -> None:
    assert isinstance(mesh.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", mesh.__version__)
