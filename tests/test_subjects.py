"""Names, subjects and the token escape (docs/protocol.md, "Names")."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.kv import _is_key_valid

from mesh.errors import BadRequestError, InvalidIdError
from mesh.ids import AgentId, TopicId
from mesh.subjects import Subjects, escape_token, unescape_token, validate_worker_id

TOKEN_RE = re.compile(r"[A-Za-z0-9_=\-]+")

# Any Unicode text that can be UTF-8 encoded (no lone surrogates).
encodable_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)),
    min_size=1,
)

# Printable text as `str.isprintable` understands it: no "Other" or "Separator"
# characters except the ASCII space.
printable_chars = st.characters(
    blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
) | st.just(" ")
printable_keys = st.text(alphabet=printable_chars, min_size=1, max_size=128).filter(str.isprintable)

agent_types = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
agent_ids = st.builds(AgentId, agent_types, printable_keys)

topic_segments = st.from_regex(r"[A-Za-z0-9_:=\-]{1,12}", fullmatch=True)
topic_types = (
    st.lists(topic_segments, min_size=1, max_size=8).map(".".join).filter(lambda t: len(t) <= 128)
)
topic_ids = st.builds(TopicId, topic_types, printable_keys)

worker_ids = st.from_regex(r"[A-Za-z0-9_\-]{1,64}", fullmatch=True)


def assert_invalid_id(exc_info: pytest.ExceptionInfo[InvalidIdError]) -> None:
    assert isinstance(exc_info.value, BadRequestError)
    assert exc_info.value.code == 400


# Token escape


@given(encodable_text)
def test_escape_round_trips_any_text(text: str) -> None:
    assert unescape_token(escape_token(text)) == text


@given(encodable_text)
def test_escaped_token_is_a_valid_subject_token_and_kv_key(text: str) -> None:
    token = escape_token(text)
    assert TOKEN_RE.fullmatch(token)
    assert not set(token) & {".", "*", ">", " ", "\t", "\r", "\n"}
    assert _is_key_valid(token)


@given(encodable_text, encodable_text)
def test_distinct_texts_escape_to_distinct_tokens(a: str, b: str) -> None:
    if a != b:
        assert escape_token(a) != escape_token(b)
    else:
        assert escape_token(a) == escape_token(b)


@given(
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1)
)
def test_safe_characters_are_left_untouched(text: str) -> None:
    assert escape_token(text) == text


def test_equals_sign_is_escaped_as_3d() -> None:
    assert escape_token("=") == "=3D"
    assert escape_token("a=b") == "a=3Db"


@pytest.mark.parametrize(
    ("text", "token"),
    [
        ("a.b c", "a=2Eb=20c"),
        ("shop/1", "shop=2F1"),
        ("*>", "=2A=3E"),
        ("é", "=C3=A9"),
        ("Ab_9-", "Ab_9-"),
    ],
)
def test_known_texts_escape_to_known_tokens(text: str, token: str) -> None:
    assert escape_token(text) == token
    assert unescape_token(token) == text


def test_escape_refuses_the_empty_string() -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        escape_token("")
    assert_invalid_id(exc_info)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("=3d", id="lowercase-hex"),
        pytest.param("a=3db", id="lowercase-hex-inside"),
        pytest.param("=41", id="needless-escape-of-letter"),
        pytest.param("=5F", id="needless-escape-of-underscore"),
        pytest.param("=2D", id="needless-escape-of-dash"),
        pytest.param("=4", id="truncated-escape"),
        pytest.param("=", id="bare-equals"),
        pytest.param("=G0", id="non-hex-digit"),
        pytest.param(".", id="dot"),
        pytest.param("a.b", id="dot-inside"),
        pytest.param("a b", id="space"),
        pytest.param("*", id="star"),
        pytest.param(">", id="gt"),
        pytest.param("é", id="non-ascii"),
        pytest.param("=FF", id="invalid-utf8"),
        pytest.param("=C3", id="truncated-utf8"),
        pytest.param("=C0=80", id="overlong-utf8"),
        pytest.param("=ED=A0=80", id="utf8-surrogate"),
        pytest.param("", id="empty"),
    ],
)
def test_unescape_refuses_tokens_escape_could_not_produce(token: str) -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        unescape_token(token)
    assert_invalid_id(exc_info)


# Agent ids


@pytest.mark.parametrize(
    ("agent_type", "key"),
    [
        ("echo", "1"),
        ("a", "k"),
        ("Chat_Bot-2.v1", "user 42"),
        ("t" * 64, "k" * 128),
        ("echo", "ключ/ü/日本語 !?#"),
        ("..", "."),
    ],
)
def test_agent_id_accepts_valid_types_and_keys(agent_type: str, key: str) -> None:
    agent_id = AgentId(agent_type, key)
    assert (agent_id.type, agent_id.key) == (agent_type, key)


@pytest.mark.parametrize(
    ("agent_type", "key"),
    [
        pytest.param("", "k", id="empty-type"),
        pytest.param("echo", "", id="empty-key"),
        pytest.param("t" * 65, "k", id="type-too-long"),
        pytest.param("echo", "k" * 129, id="key-too-long"),
        pytest.param("a/b", "k", id="type-with-slash"),
        pytest.param("a b", "k", id="type-with-space"),
        pytest.param("a*", "k", id="type-with-star"),
        pytest.param("é", "k", id="type-non-ascii"),
        pytest.param("echo", "a\nb", id="key-with-newline"),
        pytest.param("echo", "a\x00", id="key-with-nul"),
        pytest.param("echo", "a\tb", id="key-with-tab"),
        pytest.param("echo", "a\u2028b", id="key-with-line-separator"),
    ],
)
def test_agent_id_refuses_invalid_types_and_keys(agent_type: str, key: str) -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        AgentId(agent_type, key)
    assert_invalid_id(exc_info)


def test_agent_id_parse_keeps_slashes_in_the_key() -> None:
    agent_id = AgentId.parse("type/key/with/slash")
    assert agent_id == AgentId("type", "key/with/slash")


def test_agent_id_parse_refuses_text_without_a_slash() -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        AgentId.parse("typekey")
    assert_invalid_id(exc_info)


@given(agent_ids)
def test_agent_id_string_round_trips_through_parse(agent_id: AgentId) -> None:
    assert AgentId.parse(str(agent_id)) == agent_id


# Topic ids and event subjects


@pytest.mark.parametrize(
    "topic_type",
    [
        pytest.param("a..b", id="empty-middle-segment"),
        pytest.param(".a", id="empty-first-segment"),
        pytest.param("a.", id="empty-last-segment"),
        pytest.param(".", id="only-dot"),
        pytest.param("", id="empty"),
        pytest.param("a/b", id="slash"),
        pytest.param("a b", id="space"),
        pytest.param("a" * 129, id="too-long"),
    ],
)
def test_topic_id_refuses_invalid_types(topic_type: str) -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        TopicId(topic_type, "src")
    assert_invalid_id(exc_info)


def test_topic_id_refuses_a_non_printable_source() -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        TopicId("orders", "a\nb")
    assert_invalid_id(exc_info)


def test_events_subject_keeps_type_dots_and_escapes_the_source() -> None:
    subject = Subjects().events(TopicId("orders.created", "shop/1"))
    assert subject == "mesh.events.orders.created.shop=2F1"


def test_events_subject_escapes_colons_and_equals_in_type_segments() -> None:
    subject = Subjects().events(TopicId("a:b.c=d", "s"))
    assert subject == "mesh.events.a=3Ab.c=3Dd.s"


@given(topic_ids)
def test_event_subject_round_trips_through_parse_events(topic: TopicId) -> None:
    subjects = Subjects()
    subject = subjects.events(topic)
    tokens = subject.split(".")
    assert all(TOKEN_RE.fullmatch(t) for t in tokens[2:])
    assert subjects.parse_events(subject) == topic


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param("mesh.rpc.orders.src", id="wrong-head"),
        pytest.param("other.events.orders.src", id="wrong-prefix"),
        pytest.param("mesh.events.src", id="no-type"),
        pytest.param("mesh.events.orders.=4", id="bad-escape"),
        pytest.param("mesh.events.or=3ders.src", id="lowercase-hex"),
    ],
)
def test_parse_events_refuses_malformed_subjects(subject: str) -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        Subjects().parse_events(subject)
    assert_invalid_id(exc_info)


# Agent request subjects


def test_rpc_subject_escapes_type_and_key() -> None:
    subject = Subjects().rpc(AgentId("chat.bot", "user 1"))
    assert subject == "mesh.rpc.chat=2Ebot.user=201"


@given(agent_ids)
def test_rpc_subject_round_trips_through_parse_rpc(agent_id: AgentId) -> None:
    subjects = Subjects()
    subject = subjects.rpc(agent_id)
    head, rpc, type_token, key_token = subject.split(".")
    assert (head, rpc) == ("mesh", "rpc")
    assert TOKEN_RE.fullmatch(type_token)
    assert TOKEN_RE.fullmatch(key_token)
    assert subjects.parse_rpc(subject) == agent_id


@given(agent_ids)
def test_agent_key_is_a_valid_kv_key(agent_id: AgentId) -> None:
    assert _is_key_valid(Subjects.agent_key(agent_id))


@given(worker_ids, agent_ids)
def test_worker_rpc_subject_round_trips_through_parse_worker_rpc(
    worker_id: str, agent_id: AgentId
) -> None:
    subjects = Subjects()
    subject = subjects.worker_rpc(worker_id, agent_id)
    assert subject.startswith(f"mesh.worker.{worker_id}.rpc.")
    assert subjects.parse_worker_rpc(worker_id, subject) == agent_id


def test_parse_worker_rpc_refuses_another_workers_subject() -> None:
    subjects = Subjects()
    subject = subjects.worker_rpc("w1", AgentId("echo", "1"))
    with pytest.raises(InvalidIdError) as exc_info:
        subjects.parse_worker_rpc("w2", subject)
    assert_invalid_id(exc_info)


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param("mesh.events.echo.1", id="wrong-head"),
        pytest.param("other.rpc.echo.1", id="wrong-prefix"),
        pytest.param("mesh.rpc.echo", id="one-token"),
        pytest.param("mesh.rpc.echo.1.2", id="three-tokens"),
        pytest.param("mesh.rpc.", id="no-tokens"),
        pytest.param("mesh.rpc.echo.", id="empty-key-token"),
        pytest.param("mesh.rpc..1", id="empty-type-token"),
        pytest.param("mesh.rpc.echo.=4", id="truncated-escape"),
        pytest.param("mesh.rpc.echo.=3d", id="lowercase-hex"),
        pytest.param("mesh.rpc.=41.1", id="needless-escape"),
        pytest.param("mesh.rpc.echo.=FF", id="invalid-utf8"),
        pytest.param("mesh.rpc.a=2Fb.1", id="type-with-slash"),
        pytest.param("mesh.rpc.echo.a=0Ab", id="key-with-newline"),
    ],
)
def test_parse_rpc_refuses_malformed_subjects(subject: str) -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        Subjects().parse_rpc(subject)
    assert_invalid_id(exc_info)


# Prefixes, buckets, streams


def test_custom_prefix_names_subjects_buckets_and_streams() -> None:
    subjects = Subjects("prod-1")
    assert subjects.rpc(AgentId("echo", "1")) == "prod-1.rpc.echo.1"
    assert subjects.rpc_all == "prod-1.rpc.>"
    assert subjects.workers_bucket == "prod-1-workers"
    assert subjects.types_bucket == "prod-1-types"
    assert subjects.stream("events") == "PROD-1_EVENTS"


def test_default_prefix_names_subjects_buckets_and_streams() -> None:
    subjects = Subjects()
    assert subjects.prefix == "mesh"
    assert subjects.workers_bucket == "mesh-workers"
    assert subjects.stream("events") == "MESH_EVENTS"


def test_custom_prefix_parses_only_its_own_subjects() -> None:
    agent_id = AgentId("echo", "1")
    assert Subjects("prod-1").parse_rpc(Subjects("prod-1").rpc(agent_id)) == agent_id
    with pytest.raises(InvalidIdError):
        Subjects("prod-1").parse_rpc(Subjects().rpc(agent_id))


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("a.b", id="dot"),
        pytest.param("", id="empty"),
        pytest.param("p" * 33, id="33-chars"),
        pytest.param("a b", id="space"),
        pytest.param("a*", id="star"),
        pytest.param("a>", id="gt"),
    ],
)
def test_invalid_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        Subjects(prefix)
    assert_invalid_id(exc_info)


def test_prefix_of_32_chars_is_accepted() -> None:
    assert Subjects("p" * 32).prefix == "p" * 32


def test_from_env_reads_mesh_prefix() -> None:
    assert Subjects.from_env({"MESH_PREFIX": "prod-1"}).prefix == "prod-1"
    assert Subjects.from_env({}).prefix == "mesh"
    with pytest.raises(InvalidIdError):
        Subjects.from_env({"MESH_PREFIX": "a.b"})


# KV keys and worker ids


@given(agent_types, worker_ids)
def test_type_key_round_trips_through_parse_type_key(agent_type: str, worker_id: str) -> None:
    key = Subjects.type_key(agent_type, worker_id)
    assert _is_key_valid(key)
    assert key.count(".") == 1
    assert Subjects.parse_type_key(key) == (agent_type, worker_id)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("echo", id="no-worker"),
        pytest.param("echo.a.b", id="worker-with-dot"),
        pytest.param("=41.w1", id="needless-escape"),
        pytest.param("echo.", id="empty-worker"),
    ],
)
def test_parse_type_key_refuses_malformed_keys(key: str) -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        Subjects.parse_type_key(key)
    assert_invalid_id(exc_info)


@pytest.mark.parametrize(
    "worker_id",
    [
        pytest.param("a.b", id="dot"),
        pytest.param("", id="empty"),
        pytest.param("w" * 65, id="65-chars"),
        pytest.param("a b", id="space"),
        pytest.param("a*", id="star"),
    ],
)
def test_validate_worker_id_refuses_invalid_ids(worker_id: str) -> None:
    with pytest.raises(InvalidIdError) as exc_info:
        validate_worker_id(worker_id)
    assert_invalid_id(exc_info)
    with pytest.raises(InvalidIdError):
        Subjects().worker(worker_id)


@given(worker_ids)
def test_validate_worker_id_accepts_valid_ids(worker_id: str) -> None:
    assert validate_worker_id(worker_id) == worker_id


def test_parse_events_refuses_an_escaped_dot_inside_a_segment() -> None:
    subjects = Subjects()
    assert subjects.parse_events("mesh.events.a.b.src") == TopicId("a.b", "src")
    with pytest.raises(InvalidIdError):
        subjects.parse_events("mesh.events.a=2Eb.src")
