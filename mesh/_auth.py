"""Who is calling: API keys from ``mesh-clients`` and JWT bearer tokens, at the gateway.

`Authenticator.authenticate` turns a request's ``Authorization`` header into a
`Principal` or raises `UnauthorizedError` (401); `Principal.check` raises
`ForbiddenError` (403) for an agent type outside the client's patterns. Client
records are mirrored by one KV watch, so a revocation takes effect at every gateway
within the watch's delay, without a restart. Verified tokens are remembered until
they expire, so a client's steady stream of calls costs one verification.

Bearer tokens must carry ``sub`` (the client id) and ``exp``; ``nbf``, and ``iss`` and
``aud`` when configured, are checked. The agent types a token may call come from its
``agent_types`` claim, else from the ``mesh-clients`` record named by ``sub``; a token
with neither may call nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import jwt
from nats.js.client import JetStreamContext
from pydantic import ValidationError

from mesh._kv import KvMirror, MirroredEntry, ensure_bucket
from mesh._wire import AUTHORIZATION
from mesh.clients import ClientRecord, clients_bucket, parse_api_key
from mesh.config import AuthConfig
from mesh.errors import ForbiddenError, UnauthorizedError
from mesh.subjects import Subjects

#: Verified tokens remembered at most.
TOKEN_CACHE = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    client_id: str
    agent_types: tuple[str, ...]
    rate: float
    burst: int

    def check(self, agent_type: str) -> None:
        """Raise `ForbiddenError` unless this client may call `agent_type`."""
        if not any(fnmatchcase(agent_type, pattern) for pattern in self.agent_types):
            raise ForbiddenError(f"client {self.client_id!r} may not call {agent_type!r}")


class Authenticator:
    """Checks credentials against ``mesh-clients`` and the configured token keys.

    Args:
        js: JetStream context.
        subjects: The mesh's names.
        config: Token keys, issuer, audience, default limits.
    """

    def __init__(self, js: JetStreamContext, subjects: Subjects, config: AuthConfig) -> None:
        self._js = js
        self._subjects = subjects
        self._config = config
        self._clients: dict[str, ClientRecord] = {}
        self._mirror: KvMirror | None = None
        self._tokens: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._keys = _token_keys(config)

    async def start(self) -> None:
        kv = await ensure_bucket(self._js, clients_bucket(self._subjects))
        self._mirror = KvMirror(kv, on_change=self._client_changed)
        await self._mirror.start()

    async def restart(self) -> None:
        if self._mirror is not None:
            await self._mirror.restart()

    async def aclose(self) -> None:
        if self._mirror is not None:
            await self._mirror.aclose()

    def _client_changed(self, key: str, entry: MirroredEntry | None) -> None:
        self._tokens.clear()  # a token's rights may come from this record
        if entry is None:
            self._clients.pop(key, None)
            return
        try:
            self._clients[key] = ClientRecord.model_validate_json(entry.value)
        except ValidationError:
            self._clients.pop(key, None)

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller the ``Authorization`` header proves; 401 otherwise."""
        value = headers.get(AUTHORIZATION, "")
        scheme, _, credentials = value.strip().partition(" ")
        credentials = credentials.strip()
        if not credentials:
            raise UnauthorizedError("send Authorization: ApiKey <id>.<secret> or Bearer <JWT>")
        if scheme.lower() == "apikey":
            return self._api_key(credentials)
        if scheme.lower() == "bearer":
            return self._bearer(credentials)
        raise UnauthorizedError("unknown Authorization scheme; use ApiKey or Bearer")

    def _api_key(self, credentials: str) -> Principal:
        try:
            client_id, secret = parse_api_key(credentials)
        except ValueError:
            raise UnauthorizedError("malformed API key") from None
        record = self._clients.get(client_id)
        if record is None or not record.secret_matches(secret):
            raise UnauthorizedError("unknown client or wrong key")
        return self._principal(record.id, tuple(record.agent_types), record)

    def _bearer(self, token: str) -> Principal:
        cached = self._tokens.get(token)
        if cached is not None and cached[0] > time.time():
            return cached[1]
        if not self._keys:
            raise UnauthorizedError("bearer tokens are not accepted here")
        claims = self._verify(token)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise UnauthorizedError("the token has no subject")
        record = self._clients.get(subject)
        granted = claims.get("agent_types")
        if isinstance(granted, list) and all(isinstance(p, str) for p in granted):
            patterns: tuple[str, ...] = tuple(granted)
        elif record is not None:
            patterns = tuple(record.agent_types)
        else:
            patterns = ()
        principal = self._principal(subject, patterns, record)
        self._tokens[token] = (float(claims["exp"]), principal)
        while len(self._tokens) > TOKEN_CACHE:
            self._tokens.popitem(last=False)
        return principal

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
            key, algorithms = self._key_for(header)
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=algorithms,
                issuer=self._config.jwt_issuer,
                audience=self._config.jwt_audience,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self._config.jwt_audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise UnauthorizedError("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise UnauthorizedError("the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise UnauthorizedError("the token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise UnauthorizedError("the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise UnauthorizedError(f"invalid token: {type(exc).__name__}") from None
        return claims

    def _key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        kid = header.get("kid")
        if kid is not None and kid in self._keys:
            return self._keys[kid]
        if None in self._keys:
            return self._keys[None]
        raise UnauthorizedError("no key for this token")

    def _principal(
        self, client_id: str, agent_types: tuple[str, ...], record: ClientRecord | None
    ) -> Principal:
        rate = record.rate if record is not None and record.rate else self._config.default_rate
        burst = record.burst if record is not None and record.burst else self._config.default_burst
        return Principal(client_id, agent_types, rate, burst)


def _token_keys(config: AuthConfig) -> dict[str | None, tuple[Any, list[str]]]:
    """Verification keys by ``kid`` (``None``: for tokens without one)."""
    keys: dict[str | None, tuple[Any, list[str]]] = {}
    if config.jwt_secret:
        keys[None] = (config.jwt_secret, ["HS256"])
    if config.jwt_public_key_file:
        pem = Path(config.jwt_public_key_file).read_bytes()
        keys[None] = (pem, ["RS256", "ES256"])
    if config.jwks_file:
        jwks = jwt.PyJWKSet.from_json(Path(config.jwks_file).read_text())
        for jwk in jwks.keys:
            keys[jwk.key_id] = (jwk.key, [jwk.algorithm_name])
        if len(jwks.keys) == 1 and None not in keys:
            keys[None] = (jwks.keys[0].key, [jwks.keys[0].algorithm_name])
    return keys
