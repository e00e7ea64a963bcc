"""Payload codecs (mesh.codec) and error replies and deadlines (mesh._wire)."""

from __future__ import annotations

import msgpack
import orjson
import pytest
from pydantic import BaseModel

from mesh import _wire
from mesh.codec import (
    JSON,
    JSON_CODEC,
    MSGPACK,
    MSGPACK_CODEC,
    Codec,
    UnsupportedContentTypeError,
    codec_for,
    decode,
    decode_plain,
    encode,
)
from mesh.errors import (
    AgentTypeNotFoundError,
    BadRequestError,
    ConflictError,
    DeadlineExceededError,
    DecodeError,
    ForbiddenError,
    HandlerError,
    InvalidIdError,
    MeshError,
    NoWorkerAvailableError,
    PayloadTooLargeError,
    RateLimitedError,
    UnauthorizedError,
    UnknownMessageTypeError,
    WorkerNotRegisteredError,
)


class Address(BaseModel):
    street: str
    city: str


class Order(BaseModel):
    id: int
    customer: str
    tags: list[str]
    address: Address
    lines: list[Address] = []
    note: str | None = None
    total: float = 0.0
    paid: bool = False


def sample_order() -> Order:
    return Order(
        id=7,
        customer="Zoë 日本語 🚀",
        tags=["a", "b", "ünï"],
        address=Address(street="Main St. 1", city="Köln"),
        lines=[Address(street="x", city="y"), Address(street="", city="z\nw")],
        note=None,
        total=12.5,
        paid=True,
    )


CODECS = [pytest.param(JSON_CODEC, id="json"), pytest.param(MSGPACK_CODEC, id="msgpack")]


# Codecs


@pytest.mark.parametrize("codec", CODECS)
def test_model_round_trips_through_encode_and_decode(codec: Codec) -> None:
    order = sample_order()
    data = encode(order, codec)
    assert isinstance(data, bytes)
    assert data
    assert decode(data, Order, codec) == order


def test_json_encoding_is_the_models_json_dump() -> None:
    order = sample_order()
    assert orjson.loads(encode(order, JSON_CODEC)) == order.model_dump(mode="json")


def test_msgpack_encoding_is_the_models_json_dump() -> None:
    order = sample_order()
    assert msgpack.unpackb(encode(order, MSGPACK_CODEC)) == order.model_dump(mode="json")


@pytest.mark.parametrize("codec", CODECS)
def test_plain_values_round_trip(codec: Codec) -> None:
    value = {"a": [1, 2.5, "ü", None, True], "b": {"c": []}}
    assert decode_plain(encode(value, codec), codec) == value


@pytest.mark.parametrize("codec", CODECS)
def test_decode_plain_of_an_empty_body_is_none(codec: Codec) -> None:
    assert decode_plain(b"", codec) is None


@pytest.mark.parametrize("codec", CODECS)
def test_encode_of_none_is_an_empty_body(codec: Codec) -> None:
    assert encode(None, codec) == b""


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        pytest.param(None, JSON, id="absent"),
        pytest.param("", JSON, id="empty"),
        pytest.param("application/json", JSON, id="json"),
        pytest.param("application/json; charset=utf-8", JSON, id="json-with-charset"),
        pytest.param("Application/JSON", JSON, id="json-mixed-case"),
        pytest.param("application/msgpack", MSGPACK, id="msgpack"),
        pytest.param("application/x-msgpack", MSGPACK, id="x-msgpack"),
        pytest.param("application/vnd.msgpack", MSGPACK, id="vnd-msgpack"),
    ],
)
def test_codec_for_picks_the_codec_by_content_type(content_type: str | None, expected: str) -> None:
    assert codec_for(content_type).content_type == expected


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "json"])
def test_codec_for_refuses_other_content_types(content_type: str) -> None:
    with pytest.raises(UnsupportedContentTypeError) as exc_info:
        codec_for(content_type)
    assert isinstance(exc_info.value, BadRequestError)
    assert exc_info.value.code == 400


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{", id="truncated"),
        pytest.param(b"not json", id="garbage"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b'{"a": 1} x', id="trailing-data"),
    ],
)
def test_invalid_json_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError) as exc_info:
        decode_plain(data, JSON_CODEC)
    assert exc_info.value.code == 400
    assert exc_info.value.content_type == JSON


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x92\x01", id="truncated-array"),
        pytest.param(b"\x01\x02", id="extra-data"),
        pytest.param(b"\x81\x01\x02", id="non-string-map-key"),
        pytest.param(b"\xd9\x02\xff\xfe", id="str-not-utf8"),
    ],
)
def test_invalid_msgpack_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError) as exc_info:
        decode_plain(data, MSGPACK_CODEC)
    assert exc_info.value.code == 400
    assert exc_info.value.content_type == MSGPACK


@pytest.mark.parametrize("codec", CODECS)
def test_invalid_bytes_raise_decode_error_when_decoding_a_model(codec: Codec) -> None:
    with pytest.raises(DecodeError):
        decode(b"\xc1{", Order, codec)


@pytest.mark.parametrize("codec", CODECS)
def test_payload_that_does_not_fit_the_model_names_the_field(codec: Codec) -> None:
    plain = sample_order().model_dump(mode="json")
    plain["address"]["city"] = 5
    with pytest.raises(DecodeError) as exc_info:
        decode(codec.dumps(plain), Order, codec)
    assert exc_info.value.code == 400
    assert "address.city" in exc_info.value.message
    assert "Order" in exc_info.value.message
    assert exc_info.value.content_type == codec.content_type


@pytest.mark.parametrize("codec", CODECS)
def test_missing_field_is_named_in_the_decode_error(codec: Codec) -> None:
    plain = sample_order().model_dump(mode="json")
    del plain["customer"]
    with pytest.raises(DecodeError) as exc_info:
        decode(codec.dumps(plain), Order, codec)
    assert "customer" in exc_info.value.message


class AllDefaults(BaseModel):
    x: int = 1


def test_empty_body_decodes_as_an_empty_object() -> None:
    assert decode(b"", AllDefaults) == AllDefaults()
    with pytest.raises(DecodeError) as exc_info:
        decode(b"", Address)
    assert "street" in exc_info.value.message


# Error replies


ERRORS_WITH_CODES = [
    pytest.param(AgentTypeNotFoundError, 404, "AgentTypeNotFound", id="agent-type-not-found"),
    pytest.param(WorkerNotRegisteredError, 404, "WorkerNotRegistered", id="worker-not-registered"),
    pytest.param(NoWorkerAvailableError, 503, "Unavailable", id="no-worker-available"),
    pytest.param(DeadlineExceededError, 504, "DeadlineExceeded", id="deadline-exceeded"),
    pytest.param(HandlerError, 500, "HandlerFailed", id="handler"),
    pytest.param(DecodeError, 400, "InvalidPayload", id="decode"),
    pytest.param(UnknownMessageTypeError, 400, "UnknownMessageType", id="unknown-message-type"),
    pytest.param(InvalidIdError, 400, "InvalidId", id="invalid-id"),
    pytest.param(BadRequestError, 400, "BadRequest", id="bad-request"),
    pytest.param(UnauthorizedError, 401, "Unauthorized", id="unauthorized"),
    pytest.param(ForbiddenError, 403, "Forbidden", id="forbidden"),
    pytest.param(ConflictError, 409, "StateConflict", id="conflict"),
    pytest.param(PayloadTooLargeError, 413, "PayloadTooLarge", id="payload-too-large"),
    pytest.param(RateLimitedError, 429, "RateLimited", id="rate-limited"),
]

REQUEST_HEADERS = [
    pytest.param(None, JSON, id="no-headers"),
    pytest.param({"Content-Type": "application/json"}, JSON, id="json"),
    pytest.param({"Content-Type": "application/msgpack"}, MSGPACK, id="msgpack"),
    pytest.param({"Content-Type": "text/plain"}, JSON, id="unsupported-falls-back-to-json"),
]


@pytest.mark.parametrize(("request_headers", "reply_type"), REQUEST_HEADERS)
@pytest.mark.parametrize(("cls", "code", "wire_type"), ERRORS_WITH_CODES)
def test_error_reply_round_trips_through_error_from_reply(
    cls: type[MeshError],
    code: int,
    wire_type: str,
    request_headers: dict[str, str] | None,
    reply_type: str,
) -> None:
    error = cls("it went wrong: ü", request_id="req-1")
    body, headers = _wire.error_reply(error, request_headers)

    assert headers["Content-Type"] == reply_type
    assert headers["Nats-Service-Error-Code"] == str(code)
    assert headers["Nats-Service-Error"] == "it went wrong: ü"
    assert headers["Mesh-Request-Id"] == "req-1"
    loads = orjson.loads if reply_type == JSON else msgpack.unpackb
    assert loads(body) == {
        "error": {
            "code": code,
            "type": wire_type,
            "message": "it went wrong: ü",
            "request_id": "req-1",
        }
    }

    back = _wire.error_from_reply(body, headers)
    assert type(back) is cls
    assert back is not None
    assert back.code == code
    assert back.message == "it went wrong: ü"
    assert back.request_id == "req-1"


@pytest.mark.parametrize(("request_headers", "reply_type"), REQUEST_HEADERS)
def test_rate_limited_reply_carries_retry_after_ms(
    request_headers: dict[str, str] | None, reply_type: str
) -> None:
    error = RateLimitedError("slow down", retry_after=1.5)
    body, headers = _wire.error_reply(error, request_headers)
    assert headers["Retry-After-Ms"] == "1500"
    assert headers["Nats-Service-Error-Code"] == "429"
    assert "Mesh-Request-Id" not in headers

    back = _wire.error_from_reply(body, headers)
    assert isinstance(back, RateLimitedError)
    assert back.retry_after == 1.5
    assert back.request_id is None


def test_rate_limited_reply_without_retry_after_has_no_header() -> None:
    body, headers = _wire.error_reply(RateLimitedError("slow down"), None)
    assert "Retry-After-Ms" not in headers
    back = _wire.error_from_reply(body, headers)
    assert isinstance(back, RateLimitedError)
    assert back.retry_after is None


def test_error_header_is_one_line_of_at_most_1024_chars() -> None:
    message = "line one\r\nline two " + "x" * 2000
    body, headers = _wire.error_reply(HandlerError(message), None)
    header = headers["Nats-Service-Error"]
    assert len(header) == 1024
    assert "\r" not in header
    assert "\n" not in header
    assert header.startswith("line one  line two ")
    back = _wire.error_from_reply(body, headers)
    assert back is not None
    assert back.message == message


def test_successful_reply_is_not_an_error() -> None:
    assert _wire.error_from_reply(b'{"ok": true}', {"Content-Type": JSON}) is None
    assert _wire.error_from_reply(b"", None) is None


def test_error_reply_without_a_body_uses_the_headers() -> None:
    headers = {"Nats-Service-Error-Code": "404", "Nats-Service-Error": "no such type"}
    back = _wire.error_from_reply(b"", headers)
    assert isinstance(back, AgentTypeNotFoundError)
    assert back.message == "no such type"


def test_error_reply_with_an_unreadable_body_uses_the_headers() -> None:
    headers = {
        "Nats-Service-Error-Code": "504",
        "Nats-Service-Error": "too slow",
        "Mesh-Request-Id": "r9",
    }
    back = _wire.error_from_reply(b"{not json", headers)
    assert isinstance(back, DeadlineExceededError)
    assert back.message == "too slow"
    assert back.request_id == "r9"


def test_error_reply_with_a_non_numeric_code_is_a_handler_error() -> None:
    back = _wire.error_from_reply(b"", {"Nats-Service-Error-Code": "oops"})
    assert back is not None
    assert back.code == 500


def test_untyped_400_reply_is_a_plain_bad_request_error() -> None:
    back = _wire.error_from_reply(b"", {"Nats-Service-Error-Code": "400"})
    assert type(back) is BadRequestError


def test_non_ascii_retry_after_header_is_ignored_not_fatal() -> None:
    back = _wire.error_from_reply(b"", {"Nats-Service-Error-Code": "429", "Retry-After-Ms": "²"})
    assert isinstance(back, RateLimitedError)
    assert back.retry_after is None


# Deadlines


def test_parse_timeout_without_the_header_is_the_default() -> None:
    assert _wire.parse_timeout(None, 5.0, 30.0) == 5.0
    assert _wire.parse_timeout({}, 5.0, 30.0) == 5.0
    assert _wire.parse_timeout({"Mesh-Timeout-Ms": ""}, 5.0, 30.0) == 5.0


def test_parse_timeout_caps_the_default_at_the_maximum() -> None:
    assert _wire.parse_timeout(None, 60.0, 30.0) == 30.0


def test_parse_timeout_reads_milliseconds() -> None:
    assert _wire.parse_timeout({"Mesh-Timeout-Ms": "250"}, 5.0, 30.0) == 0.25


def test_parse_timeout_caps_the_header_at_the_maximum() -> None:
    assert _wire.parse_timeout({"Mesh-Timeout-Ms": "90000"}, 5.0, 30.0) == 30.0


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "1.5", "2s"])
def test_parse_timeout_refuses_values_that_are_not_positive_milliseconds(raw: str) -> None:
    with pytest.raises(BadRequestError) as exc_info:
        _wire.parse_timeout({"Mesh-Timeout-Ms": raw}, 5.0, 30.0)
    assert exc_info.value.code == 400


@pytest.mark.parametrize("value", ["1_000", " 7 ", "\u0663", "1e3", "+5"])
def test_parse_timeout_takes_only_plain_ascii_digits(value: str) -> None:
    with pytest.raises(BadRequestError):
        _wire.parse_timeout({"Mesh-Timeout-Ms": value}, default=1.0, maximum=10.0)
