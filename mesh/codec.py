"""Payload codecs: JSON (orjson, the default) and MessagePack, chosen by ``Content-Type``.

Messages are pydantic models. On the wire a model is its JSON-mode dump, so a
message reads the same in either encoding and `nats req` users can write JSON.
"""

from __future__ import annotations

from typing import Any, Final, Protocol, TypeVar

import msgpack
import orjson
from pydantic import BaseModel, ValidationError

from mesh.errors import BadRequestError, DecodeError

JSON: Final = "application/json"
MSGPACK: Final = "application/msgpack"

M = TypeVar("M", bound=BaseModel)


class Codec(Protocol):
    """Turns plain values (dicts, lists, str, numbers, bool, None) into bytes and back."""

    content_type: str

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


class JsonCodec:
    """JSON through orjson."""

    content_type = JSON

    def dumps(self, value: Any) -> bytes:
        try:
            return orjson.dumps(value)
        except TypeError as exc:
            raise TypeError(f"cannot encode {type(value).__name__} as JSON: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"invalid JSON: {exc}", content_type=JSON) from exc


class MsgpackCodec:
    """MessagePack, with str for text and bytes for binary."""

    content_type = MSGPACK

    def dumps(self, value: Any) -> bytes:
        try:
            packed: bytes = msgpack.packb(value, use_bin_type=True)
        except TypeError as exc:
            raise TypeError(f"cannot encode {type(value).__name__} as msgpack: {exc}") from exc
        return packed

    def loads(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise DecodeError(f"invalid msgpack: {exc}", content_type=MSGPACK) from exc


JSON_CODEC: Final = JsonCodec()
MSGPACK_CODEC: Final = MsgpackCodec()
_CODECS: Final[dict[str, Codec]] = {JSON: JSON_CODEC, MSGPACK: MSGPACK_CODEC}


class UnsupportedContentTypeError(BadRequestError):
    """The ``Content-Type`` names an encoding mesh does not speak (400)."""


#: Bodies the gateway forwards without being able to read them: for agent types that
#: decode their own messages (``raw=True``), such as AutoGen agents sending protobuf.
OPAQUE_CONTENT_TYPES = frozenset({"application/x-protobuf", "application/octet-stream"})


def is_opaque(content_type: str | None) -> bool:
    """Whether `content_type` is one mesh forwards but does not decode itself."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() in OPAQUE_CONTENT_TYPES


def codec_for(content_type: str | None) -> Codec:
    """The codec for a ``Content-Type`` header value; JSON when absent.

    Raises:
        UnsupportedContentTypeError: Neither JSON nor MessagePack.
    """
    if not content_type:
        return JSON_CODEC
    known = _BY_HEADER.get(content_type)
    if known is not None:
        return known
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in ("application/x-msgpack", "application/vnd.msgpack"):
        media_type = MSGPACK
    codec = _CODECS.get(media_type)
    if codec is None:
        raise UnsupportedContentTypeError(
            f"unsupported Content-Type {content_type!r}: use {JSON} or {MSGPACK}"
        )
    if len(_BY_HEADER) < 64:  # header values seen: a handful in practice
        _BY_HEADER[content_type] = codec
    return codec


#: Codecs by the exact header values that named them.
_BY_HEADER: dict[str, Codec] = {}


def to_plain(value: Any) -> Any:
    """A value ready for a codec: pydantic models become their JSON-mode dump."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def encode(value: Any, codec: Codec = JSON_CODEC) -> bytes:
    """Encode a message or plain value; ``None`` becomes an empty body."""
    if value is None:
        return b""
    if codec is JSON_CODEC and isinstance(value, BaseModel):
        # pydantic writes JSON itself, without an intermediate dict.
        return value.__pydantic_serializer__.to_json(value)
    return codec.dumps(to_plain(value))


def decode_plain(data: bytes, codec: Codec = JSON_CODEC) -> Any:
    """Decode a body into plain values; an empty body is ``None``."""
    if not data:
        return None
    return codec.loads(data)


def decode(data: bytes, model: type[M], codec: Codec = JSON_CODEC) -> M:
    """Decode a body and validate it as `model`.

    Raises:
        DecodeError: The body is not valid in its encoding or does not fit `model`.
    """
    try:
        if codec is JSON_CODEC:
            # pydantic parses JSON itself, without an intermediate dict.
            return model.model_validate_json(data or b"{}")
        plain = decode_plain(data, codec)
        return model.model_validate({} if plain is None else plain)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors(include_url=False)):
            raise DecodeError(
                f"invalid JSON: {exc.errors(include_url=False)[0]['msg']}", content_type=JSON
            ) from exc
        raise _does_not_fit(exc, model, codec.content_type) from exc


def validate(value: Any, model: type[M], content_type: str = JSON) -> M:
    """`value`, plain values a codec decoded (say, one item of a decoded list),
    validated as `model`.

    Raises:
        DecodeError: It does not fit `model`.
    """
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise _does_not_fit(exc, model, content_type) from exc


def _does_not_fit(exc: ValidationError, model: type[BaseModel], content_type: str) -> DecodeError:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )
    return DecodeError(
        f"payload does not fit {model.__name__}: {problems}", content_type=content_type
    )


def json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """`data` parsed as a JSON object.

    Raises:
        DecodeError: It is not JSON, or not an object (400); the message names `what`.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DecodeError(f"{what} must be a JSON object")
    return value
