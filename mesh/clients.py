"""Clients allowed to call through the gateway: records in KV ``mesh-clients``.

A client calls with ``Authorization: ApiKey <client_id>.<secret>``. The secret is
shown once, when the client is added; the bucket keeps only a salted SHA-256 of it
(the secret is 32 random bytes, so a fast hash is as safe as a slow one) and the
gateway compares in constant time. Each record says which agent types the client
may call (shell-style patterns: ``billing``, ``billing-*``, ``*``) and its rate limit.

Example::

    clients = ClientRegistry(nc.jetstream())
    key = await clients.add("shop", agent_types=["billing", "orders-*"], rate=50)
    print(key)          # "shop.4f1c...": give it to the client, it is not kept
    await clients.revoke("shop")
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime
from fnmatch import fnmatchcase

from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field, field_validator

from mesh._kv import BucketConfig, ensure_bucket
from mesh._kv_watch import keys as kv_keys
from mesh.errors import BadRequestError
from mesh.records import utcnow
from mesh.subjects import Subjects

_CLIENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def clients_bucket(subjects: Subjects) -> BucketConfig:
    return BucketConfig(name=subjects.bucket("clients"), description="mesh gateway clients")


def validate_client_id(client_id: str) -> str:
    if not _CLIENT_ID.fullmatch(client_id):
        raise BadRequestError(f"client id {client_id!r} must be 1-64 of [A-Za-z0-9_-]")
    return client_id


def hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


class ClientRecord(BaseModel):
    """One client, as ``nats kv get mesh-clients <id>`` shows it."""

    id: str
    key_salt: str
    key_hash: str = Field(description="sha256 of '<salt>:<secret>'")
    agent_types: list[str] = Field(default_factory=lambda: ["*"])
    rate: float | None = Field(None, gt=0, description="requests per second; None: default")
    burst: int | None = Field(None, gt=0)
    description: str = ""
    created_at: datetime = Field(default_factory=utcnow)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return validate_client_id(value)

    def secret_matches(self, secret: str) -> bool:
        return hmac.compare_digest(hash_secret(self.key_salt, secret), self.key_hash)

    def may_call(self, agent_type: str) -> bool:
        return any(fnmatchcase(agent_type, pattern) for pattern in self.agent_types)


def parse_api_key(value: str) -> tuple[str, str]:
    """``(client_id, secret)`` from ``<client_id>.<secret>``."""
    client_id, sep, secret = value.partition(".")
    if not sep or not secret or not _CLIENT_ID.fullmatch(client_id):
        raise ValueError("an API key is <client_id>.<secret>")
    return client_id, secret


class ClientRegistry:
    """Adds, lists and revokes clients in ``mesh-clients``.

    Args:
        js: JetStream context.
        subjects: The mesh's names.
    """

    def __init__(self, js: JetStreamContext, subjects: Subjects | None = None) -> None:
        self._js = js
        self._subjects = subjects or Subjects()
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await ensure_bucket(self._js, clients_bucket(self._subjects))
        return self._kv

    async def add(
        self,
        client_id: str,
        *,
        agent_types: list[str] | None = None,
        rate: float | None = None,
        burst: int | None = None,
        description: str = "",
    ) -> str:
        """Add a client and return its API key, ``<client_id>.<secret>`` (not kept).

        Raises:
            BadRequestError: A client with that id exists (revoke it first).
        """
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        record = ClientRecord(
            id=validate_client_id(client_id),
            key_salt=salt,
            key_hash=hash_secret(salt, secret),
            agent_types=agent_types if agent_types is not None else ["*"],
            rate=rate,
            burst=burst,
            description=description,
        )
        kv = await self._bucket()
        try:
            await kv.create(client_id, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            raise BadRequestError(f"client {client_id!r} exists; revoke it first") from None
        return f"{client_id}.{secret}"

    async def list(self) -> list[ClientRecord]:
        kv = await self._bucket()
        records = []
        for key in sorted(await kv_keys(kv)):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value:
                records.append(ClientRecord.model_validate_json(entry.value))
        return records

    async def revoke(self, client_id: str) -> bool:
        """Remove the client; gateways refuse its key from their next request on."""
        kv = await self._bucket()
        try:
            await kv.get(validate_client_id(client_id))
        except KeyNotFoundError:
            return False
        await kv.purge(client_id)
        return True
