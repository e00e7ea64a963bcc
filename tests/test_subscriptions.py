"""Subscriptions, their subject filters and the filter covering (docs/protocol.md,
"Events and subscriptions"). Pure logic: no NATS server needed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.kv import _is_key_valid

from mesh._event_consumer import _covers, covering_filters
from mesh.errors import InvalidIdError
from mesh.ids import TopicId
from mesh.subjects import Subjects
from mesh.subscriptions import (
    DefaultSubscription,
    Subscription,
    TypePrefixSubscription,
    TypeSubscription,
    declared_subscriptions,
    default_subscription,
    type_prefix_subscription,
    type_subscription,
)

# Helpers


def nats_match(subject_filter: str, subject: str) -> bool:
    """NATS wildcard rules: '*' is exactly one token, '>' one or more trailing tokens."""
    filter_tokens = subject_filter.split(".")
    subject_tokens = subject.split(".")
    for i, token in enumerate(filter_tokens):
        if token == ">":
            return len(subject_tokens) > i
        if i >= len(subject_tokens):
            return False
        if token != "*" and token != subject_tokens[i]:
            return False
    return len(filter_tokens) == len(subject_tokens)


def topic(topic_type: str, source: str = "src") -> TopicId:
    return TopicId(topic_type, source)


# Strategies

topic_segments = st.from_regex(r"[A-Za-z0-9_:=\-]{1,10}", fullmatch=True)
topic_types = st.lists(topic_segments, min_size=1, max_size=4).map(".".join)
printable_chars = st.characters(
    blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
) | st.just(" ")
sources = st.text(alphabet=printable_chars, min_size=1, max_size=32).filter(str.isprintable)
agent_types = st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
mesh_prefixes = st.from_regex(r"[A-Za-z0-9_\-]{1,32}", fullmatch=True)


@st.composite
def subscriptions_for(draw: st.DrawFn, topic_type: str) -> Subscription:
    """A type or prefix subscription built from `topic_type` (or a string prefix of it)."""
    agent_type = draw(agent_types)
    if draw(st.booleans()):
        return TypeSubscription(topic_type, agent_type)
    cut = draw(st.integers(min_value=1, max_value=len(topic_type)))
    return TypePrefixSubscription(topic_type[:cut], agent_type)


@st.composite
def topics_and_subscriptions(draw: st.DrawFn) -> tuple[TopicId, Subscription]:
    """An event topic and a subscription, usually (not always) one that matches it."""
    event_type = draw(topic_types)
    base = draw(st.one_of(st.just(event_type), topic_types))
    return TopicId(event_type, draw(sources)), draw(subscriptions_for(base))


# Constructors


def test_type_subscription_builds_a_subscription_of_kind_type() -> None:
    sub = TypeSubscription("orders.created", "billing")
    assert isinstance(sub, Subscription)
    assert (sub.kind, sub.topic, sub.agent_type) == ("type", "orders.created", "billing")


def test_type_prefix_subscription_builds_a_subscription_of_kind_prefix() -> None:
    sub = TypePrefixSubscription("orders.", "billing")
    assert isinstance(sub, Subscription)
    assert (sub.kind, sub.topic, sub.agent_type) == ("prefix", "orders.", "billing")


def test_default_subscription_is_a_type_subscription_on_topic_default() -> None:
    sub = DefaultSubscription("billing")
    assert (sub.kind, sub.topic, sub.agent_type) == ("type", "default", "billing")
    assert sub == TypeSubscription("default", "billing")


def test_a_new_subscription_gets_its_stable_id_when_none_is_given() -> None:
    sub = TypeSubscription("orders.created", "billing")
    assert sub.id == sub.stable_id()
    assert sub.id.startswith("type-")


def test_an_explicit_id_is_kept() -> None:
    sub = Subscription(id="dyn-1", kind="prefix", topic="orders.", agent_type="billing")
    assert sub.id == "dyn-1"


# matches


def test_a_type_subscription_matches_only_its_exact_topic_type() -> None:
    sub = TypeSubscription("orders.created", "billing")
    assert sub.matches(topic("orders.created"))
    assert sub.matches(topic("orders.created", "another-source"))
    assert not sub.matches(topic("orders"))
    assert not sub.matches(topic("orders.created.v2"))
    assert not sub.matches(topic("orders.create"))
    assert not sub.matches(topic("Orders.created"))


def test_a_prefix_subscription_matches_string_prefixes_even_off_segment_boundaries() -> None:
    sub = TypePrefixSubscription("ord", "billing")
    assert sub.matches(topic("orders.created"))
    assert sub.matches(topic("ordinal"))
    assert sub.matches(topic("ord"))
    assert not sub.matches(topic("or"))
    assert not sub.matches(topic("xord"))


def test_a_prefix_ending_with_a_dot_matches_deeper_types_but_not_the_bare_segment() -> None:
    sub = TypePrefixSubscription("orders.", "billing")
    assert sub.matches(topic("orders.created"))
    assert sub.matches(topic("orders.created.v2"))
    assert not sub.matches(topic("orders"))
    assert not sub.matches(topic("ordersx.created"))


# subject_filter


def test_a_type_subscription_filters_on_its_segments_and_any_source() -> None:
    sub = TypeSubscription("orders.created", "billing")
    assert sub.subject_filter(Subjects()) == "mesh.events.orders.created.*"


def test_a_prefix_on_a_segment_boundary_filters_on_the_whole_segments() -> None:
    sub = TypePrefixSubscription("orders.", "billing")
    assert sub.subject_filter(Subjects()) == "mesh.events.orders.>"


def test_a_partial_last_segment_of_a_prefix_is_dropped_from_the_filter() -> None:
    sub = TypePrefixSubscription("orders.cr", "billing")
    assert sub.subject_filter(Subjects()) == "mesh.events.orders.>"


def test_a_prefix_within_the_first_segment_filters_on_every_event() -> None:
    sub = TypePrefixSubscription("ord", "billing")
    assert sub.subject_filter(Subjects()) == "mesh.events.>"


def test_filter_segments_of_a_type_subscription_are_escaped() -> None:
    sub = TypeSubscription("a:b.c", "billing")
    assert sub.subject_filter(Subjects()) == "mesh.events.a=3Ab.c.*"
    assert TypeSubscription("x=y", "billing").subject_filter(Subjects()) == "mesh.events.x=3Dy.*"


def test_filter_segments_of_a_prefix_subscription_are_escaped() -> None:
    sub = TypePrefixSubscription("a:b.c:", "billing")
    assert sub.subject_filter(Subjects()) == "mesh.events.a=3Ab.>"


def test_the_filter_is_under_the_mesh_prefix_of_the_subjects() -> None:
    subjects = Subjects("p1")
    assert TypeSubscription("orders.created", "b").subject_filter(subjects) == (
        "p1.events.orders.created.*"
    )
    assert TypePrefixSubscription("orders.", "b").subject_filter(subjects) == "p1.events.orders.>"
    assert TypePrefixSubscription("ord", "b").subject_filter(subjects) == "p1.events.>"


def test_the_filter_matches_the_event_subject_of_a_matching_topic() -> None:
    subjects = Subjects()
    sub = TypeSubscription("a:b.c", "billing")
    event = subjects.events(topic("a:b.c", "s/1"))
    assert nats_match(sub.subject_filter(subjects), event)


@given(pair=topics_and_subscriptions(), mesh_prefix=mesh_prefixes)
def test_a_subscriptions_filter_never_misses_an_event_it_matches(
    pair: tuple[TopicId, Subscription], mesh_prefix: str
) -> None:
    event_topic, sub = pair
    subjects = Subjects(mesh_prefix)
    if sub.matches(event_topic):
        assert nats_match(sub.subject_filter(subjects), subjects.events(event_topic))


@given(event_type=topic_types, source=sources)
def test_a_subscription_built_from_the_topic_type_or_its_prefix_always_gets_the_event(
    event_type: str, source: str
) -> None:
    event_topic = TopicId(event_type, source)
    subjects = Subjects()
    subject = subjects.events(event_topic)
    subs = [TypeSubscription(event_type, "a")] + [
        TypePrefixSubscription(event_type[:cut], "a") for cut in range(1, len(event_type) + 1)
    ]
    for sub in subs:
        assert sub.matches(event_topic), sub
        assert nats_match(sub.subject_filter(subjects), subject), sub


@given(pair=topics_and_subscriptions())
def test_a_type_subscriptions_filter_admits_only_events_it_matches(
    pair: tuple[TopicId, Subscription],
) -> None:
    event_topic, sub = pair
    subjects = Subjects()
    if sub.kind == "type":
        admitted = nats_match(sub.subject_filter(subjects), subjects.events(event_topic))
        assert admitted == sub.matches(event_topic)


def test_nats_match_helper_follows_the_wildcard_rules() -> None:
    assert nats_match("a.*", "a.b")
    assert not nats_match("a.*", "a")
    assert not nats_match("a.*", "a.b.c")
    assert nats_match("a.>", "a.b.c")
    assert not nats_match("a.>", "a")
    assert nats_match("a.b", "a.b")
    assert not nats_match("a.b", "a.c")


# stable_id


def test_stable_id_is_the_same_for_identical_subscriptions() -> None:
    first = TypeSubscription("orders.created", "billing")
    second = TypeSubscription("orders.created", "billing")
    assert first.stable_id() == second.stable_id()
    assert first.id == second.id


def test_stable_id_differs_when_the_kind_differs() -> None:
    assert (
        TypeSubscription("orders", "billing").id != TypePrefixSubscription("orders", "billing").id
    )


def test_stable_id_differs_when_the_topic_differs() -> None:
    assert TypeSubscription("orders", "billing").id != TypeSubscription("order", "billing").id


def test_stable_id_differs_when_the_agent_type_differs() -> None:
    assert TypeSubscription("orders", "billing").id != TypeSubscription("orders", "billin").id


def test_stable_id_does_not_depend_on_times_or_an_explicit_id() -> None:
    now = datetime.now(UTC)
    plain = TypeSubscription("orders", "billing")
    timed = Subscription(
        id="dyn-1",
        kind="type",
        topic="orders",
        agent_type="billing",
        created_at=now,
        expires_at=now + timedelta(seconds=5),
    )
    assert timed.stable_id() == plain.id


@given(topic_type=topic_types, agent_type=agent_types, kind=st.sampled_from(["type", "prefix"]))
def test_stable_ids_are_valid_kv_keys(topic_type: str, agent_type: str, kind: str) -> None:
    sub = Subscription(kind=kind, topic=topic_type, agent_type=agent_type)  # type: ignore[arg-type]
    assert _is_key_valid(sub.id)
    assert _is_key_valid(sub.stable_id())


# Validation


@pytest.mark.parametrize(
    ("kind", "topic_text", "agent_type"),
    [
        ("type", "orders", "a/b"),
        ("prefix", "orders", "a/b"),
        ("type", "orders", ""),
        ("type", "a..b", "billing"),
        ("type", "", "billing"),
        ("type", ".orders", "billing"),
        ("type", "orders.", "billing"),
        ("type", "a b", "billing"),
        ("prefix", "a b", "billing"),
        ("prefix", "", "billing"),
        ("prefix", "orders/created", "billing"),
    ],
)
def test_an_invalid_agent_type_topic_or_prefix_raises_invalid_id_with_code_400(
    kind: str, topic_text: str, agent_type: str
) -> None:
    with pytest.raises(InvalidIdError) as info:
        Subscription(kind=kind, topic=topic_text, agent_type=agent_type)  # type: ignore[arg-type]
    assert info.value.code == 400


def test_the_constructor_helpers_validate_too() -> None:
    with pytest.raises(InvalidIdError):
        TypeSubscription("a..b", "billing")
    with pytest.raises(InvalidIdError):
        TypePrefixSubscription("a b", "billing")
    with pytest.raises(InvalidIdError):
        DefaultSubscription("a/b")


# is_expired


def test_a_subscription_without_expiry_never_expires() -> None:
    sub = TypeSubscription("orders", "billing")
    assert sub.expires_at is None
    assert not sub.is_expired(datetime.now(UTC))
    assert not sub.is_expired(datetime.max.replace(tzinfo=UTC))


def test_a_subscription_expiring_in_the_past_is_expired() -> None:
    now = datetime.now(UTC)
    sub = Subscription(
        kind="type", topic="orders", agent_type="billing", expires_at=now - timedelta(seconds=1)
    )
    assert sub.is_expired(now)


def test_a_subscription_expiring_in_the_future_is_not_expired() -> None:
    now = datetime.now(UTC)
    sub = Subscription(
        kind="type", topic="orders", agent_type="billing", expires_at=now + timedelta(seconds=1)
    )
    assert not sub.is_expired(now)
    assert sub.is_expired(now + timedelta(seconds=2))


def test_a_subscription_is_expired_at_its_expiry_instant() -> None:
    now = datetime.now(UTC)
    sub = Subscription(kind="type", topic="orders", agent_type="billing", expires_at=now)
    assert sub.is_expired(now)


# Class decorators


def test_a_class_with_several_decorators_declares_them_all() -> None:
    @default_subscription
    @type_subscription("orders.created")
    @type_prefix_subscription("payments.")
    class Billing:
        pass

    declared = declared_subscriptions(Billing, "billing")
    assert {(s.kind, s.topic, s.agent_type) for s in declared} == {
        ("prefix", "payments.", "billing"),
        ("type", "orders.created", "billing"),
        ("type", "default", "billing"),
    }
    assert len(declared) == 3
    assert all(isinstance(s, Subscription) for s in declared)


def test_the_decorators_return_the_class_itself() -> None:
    class Plain:
        pass

    assert type_subscription("orders")(Plain) is Plain
    assert type_prefix_subscription("orders.")(Plain) is Plain
    assert default_subscription(Plain) is Plain


def test_declared_subscriptions_take_the_agent_type_given() -> None:
    @type_subscription("orders")
    class Agent:
        pass

    assert declared_subscriptions(Agent, "one") == [TypeSubscription("orders", "one")]
    assert declared_subscriptions(Agent, "two") == [TypeSubscription("orders", "two")]


def test_an_undecorated_class_declares_no_subscriptions() -> None:
    class Plain:
        pass

    assert declared_subscriptions(Plain, "plain") == []


def test_a_subclass_keeps_its_parents_declarations_and_adds_its_own() -> None:
    @type_subscription("orders")
    class Parent:
        pass

    @type_prefix_subscription("payments.")
    class Child(Parent):
        pass

    child = {(s.kind, s.topic) for s in declared_subscriptions(Child, "x")}
    parent = {(s.kind, s.topic) for s in declared_subscriptions(Parent, "x")}
    assert child == {("type", "orders"), ("prefix", "payments.")}
    assert parent == {("type", "orders")}


def test_an_undecorated_subclass_inherits_its_parents_declarations() -> None:
    @default_subscription
    class Parent:
        pass

    class Child(Parent):
        pass

    assert declared_subscriptions(Child, "x") == [DefaultSubscription("x")]


def test_type_subscription_decorator_rejects_an_invalid_topic_type_at_once() -> None:
    with pytest.raises(InvalidIdError) as info:
        type_subscription("a..b")
    assert info.value.code == 400


def test_declared_subscriptions_rejects_an_invalid_agent_type() -> None:
    @type_subscription("orders")
    class Agent:
        pass

    with pytest.raises(InvalidIdError):
        declared_subscriptions(Agent, "a/b")


# covering_filters and _covers


def test_a_wider_tail_wildcard_filter_covers_a_narrower_one() -> None:
    assert covering_filters(["mesh.events.orders.created.*", "mesh.events.orders.>"]) == [
        "mesh.events.orders.>"
    ]


def test_the_all_events_filter_covers_everything_under_mesh_events() -> None:
    filters = [
        "mesh.events.orders.created.*",
        "mesh.events.orders.>",
        "mesh.events.payments.*",
        "mesh.events.>",
    ]
    assert covering_filters(filters) == ["mesh.events.>"]


def test_non_overlapping_filters_are_all_kept() -> None:
    filters = ["mesh.events.payments.*", "mesh.events.orders.>", "mesh.events.orders.*"]
    assert sorted(covering_filters(filters)) == sorted(
        ["mesh.events.payments.*", "mesh.events.orders.>"]
    )
    disjoint = ["mesh.events.a.*", "mesh.events.a.b.*", "mesh.events.c.>"]
    assert sorted(covering_filters(disjoint)) == sorted(disjoint)


def test_covering_filters_removes_duplicates() -> None:
    assert covering_filters(["mesh.events.a.*", "mesh.events.a.*"]) == ["mesh.events.a.*"]
    assert covering_filters(["mesh.events.>", "mesh.events.>"]) == ["mesh.events.>"]


def test_covering_filters_of_nothing_is_nothing() -> None:
    assert covering_filters([]) == []


def test_covers_follows_nats_wildcard_rules() -> None:
    assert not _covers("a.*", "a.>")
    assert _covers("a.>", "a.b")
    assert _covers("a.>", "a.b.c")
    assert _covers("a.>", "a.*")
    assert not _covers("a.>", "a")
    assert _covers("a.*", "a.b")
    assert not _covers("a.*", "a.b.c")
    assert not _covers("a.b", "a.*")
    assert not _covers("a.b", "a.c")


@given(
    st.lists(
        st.builds(
            lambda t, kind: (TypeSubscription if kind else TypePrefixSubscription)(t, "a"),
            topic_types,
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    ),
    topic_types,
    sources,
)
def test_covering_filters_still_admit_every_event_some_subscription_matches(
    subs: list[Subscription], event_type: str, source: str
) -> None:
    subjects = Subjects()
    filters = covering_filters([s.subject_filter(subjects) for s in subs])
    for f in filters:
        assert not any(g != f and _covers(g, f) for g in filters)
    event_topic = TopicId(event_type, source)
    subject = subjects.events(event_topic)
    if any(s.matches(event_topic) for s in subs):
        assert any(nats_match(f, subject) for f in filters)


# Prefixes with empty segments, eager validation, several bases


@pytest.mark.parametrize("prefix", ["a..b", ".orders", "a..", "."])
def test_prefix_with_an_empty_inner_segment_is_refused(prefix: str) -> None:
    with pytest.raises(InvalidIdError):
        TypePrefixSubscription(prefix, "billing")


def test_prefix_with_a_trailing_dot_is_accepted_and_has_a_filter() -> None:
    sub = TypePrefixSubscription("orders.", "billing")
    assert sub.subject_filter(Subjects()) == "mesh.events.orders.>"


def test_type_prefix_subscription_decorator_rejects_an_invalid_prefix_at_once() -> None:
    with pytest.raises(InvalidIdError):
        type_prefix_subscription("a b")


def test_subscriptions_declared_on_several_bases_are_all_kept() -> None:
    @type_subscription("a")
    class A:
        pass

    @type_prefix_subscription("b.")
    class B:
        pass

    @type_subscription("c")
    class C(A, B):
        pass

    declared = {(s.kind, s.topic) for s in declared_subscriptions(C, "agent")}
    assert declared == {("type", "a"), ("prefix", "b."), ("type", "c")}
    assert {(s.kind, s.topic) for s in declared_subscriptions(A, "agent")} == {("type", "a")}


def test_explicit_subscription_id_must_be_a_kv_key() -> None:
    with pytest.raises(InvalidIdError):
        Subscription(id="bad id/.", kind="type", topic="a", agent_type="x")


# Workers' statistics reports


def test_a_statistics_report_reads_back_as_written() -> None:
    from datetime import UTC, datetime

    from mesh._dispatch import SubscriptionStats, read_stats_report, stats_report

    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    sent = {"a": SubscriptionStats(3, 2, 0.5, when), "b": SubscriptionStats()}
    assert read_stats_report(stats_report("w1", "ledger", sent)) == ("w1", "ledger", sent)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"worker": "w"}',
        b'{"worker": "w", "agent_type": "t", "stats": {"a": [1, 2]}}',
        b'{"worker": "w", "agent_type": "t", "stats": {"a": [1, 2, 0.1, "yesterday"]}}',
        b'{"worker": "w", "agent_type": "t", "stats": []}',
    ],
)
def test_a_malformed_statistics_report_is_refused(body: bytes) -> None:
    from mesh._dispatch import read_stats_report

    with pytest.raises(ValueError, match="not a delivery statistics report"):
        read_stats_report(body)
