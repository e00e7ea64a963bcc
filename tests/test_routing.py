"""Content routing: rules from the sample file, learning from feedback, the default."""

from __future__ import annotations

import orjson
import pytest
from nats.aio.client import Client as NATS

from mesh._control import control_request
from mesh.errors import BadRequestError
from mesh.handlers.router import FeedbackReply, FeedbackRequest, Router, RouteRequest
from mesh.routing import ContentRouter, RouteRule, RoutingDecision, load_rules, words_of
from mesh.subjects import Subjects
from tests.conftest import REPO
from tests.helpers import assert_error

SAMPLE = REPO / "mesh" / "samples" / "routes.json"


def _sample_router() -> ContentRouter:
    router = ContentRouter("assistant")
    for rule in load_rules(SAMPLE.read_text()):
        router.set_rule(rule)
    return router


@pytest.mark.parametrize("rule", orjson.loads(SAMPLE.read_bytes())["rules"], ids=lambda r: r["id"])
def test_each_sample_rule_routes_its_example(rule: dict[str, object]) -> None:
    decision = _sample_router().route(str(rule["example"]))
    assert (decision.target, decision.strategy, decision.rule_id) == (
        rule["target"],
        "rule",
        rule["id"],
    )
    assert decision.confidence == rule["confidence"]
    assert str(rule["id"]) in decision.reasoning


def test_unmatched_message_falls_back_to_the_default() -> None:
    decision = _sample_router().route("tell me a story about a lighthouse keeper")
    assert (decision.target, decision.strategy, decision.confidence) == ("assistant", "default", 0)


def test_feedback_changes_a_later_decision() -> None:
    router = _sample_router()
    first = router.route("summarize this article about lighthouses for me")
    assert first.target == "assistant"
    assert router.feedback(first.id, success=False, correct_target="summarizer")
    later = router.route("please summarize this article about ships")
    assert (later.target, later.strategy) == ("summarizer", "learned")
    assert 0 < later.confidence <= 1
    # The failed routing votes against its target, the correction for the right one.
    again = router.route("summarize this article about lighthouses for me")
    assert (again.target, again.strategy) == ("summarizer", "learned")
    # Too little in common with what was learned: back to the default.
    assert router.route("what time is it in Lima").strategy == "default"


def test_sender_rules_and_confidence_threshold() -> None:
    router = ContentRouter("assistant", min_confidence=0.6)
    router.set_rule(
        RouteRule(id="from-ops", target="oncall", sender_type="monitor", confidence=0.8)
    )
    router.set_rule(RouteRule(id="weak", target="guesser", pattern="maybe", confidence=0.3))
    assert router.route("disk full", sender_type="monitor").target == "oncall"
    assert router.route("disk full", sender_type="monitor").strategy == "sender"
    assert router.route("maybe this").target == "assistant"  # too weak to decide alone


def test_cjk_text_is_compared_character_by_character() -> None:
    assert {"天", "气"} <= words_of("天气很好")
    assert "hello" in words_of("Hello, 世界")


@pytest.mark.parametrize(
    "rule",
    [
        {"id": "x", "target": "t", "confidence": 0.5},  # neither pattern nor sender
        {"id": "x", "target": "t", "pattern": "(", "confidence": 0.5},  # bad regex
        {"id": "x", "target": "a/b", "pattern": "p", "confidence": 0.5},  # bad type
        {"id": "x y", "target": "t", "pattern": "p", "confidence": 0.5},  # bad id
        {"id": "x", "target": "t", "pattern": "p", "confidence": 1.5},  # confidence > 1
    ],
)
def test_invalid_rules_are_refused(rule: dict[str, object]) -> None:
    with pytest.raises((BadRequestError, ValueError)):
        RouteRule.model_validate(rule)


async def test_router_service_routes_learns_and_refuses_bad_input(
    nc: NATS, subjects: Subjects
) -> None:
    async with Router(nc, subjects) as router:
        for rule in load_rules(SAMPLE.read_text()):
            reply = await nc.request(
                subjects.service("router", "rule_put"), rule.model_dump_json().encode(), timeout=2
            )
            assert orjson.loads(reply.data)["id"] == rule.id
        kv = await nc.jetstream().key_value(subjects.bucket("routes"))
        assert orjson.loads((await kv.get("weather")).value)["target"] == "weather"

        async def route(text: str) -> RoutingDecision:
            decision = await control_request(
                nc,
                subjects.service("router", "route"),
                RouteRequest(text=text),
                RoutingDecision,
                timeout=2,
            )
            assert decision is not None
            return decision

        assert (await route("上海今天气温多少度")).target == "weather"
        first = await route("draft a haiku about autumn")
        assert first.strategy == "default"
        known = await control_request(
            nc,
            subjects.service("router", "feedback"),
            FeedbackRequest(decision_id=first.id, success=False, correct_target="poet"),
            FeedbackReply,
            timeout=2,
        )
        assert known is not None and known.known
        assert (await route("draft a haiku about winter")).target == "poet"

        bad = await nc.request(
            subjects.service("router", "rule_put"),
            orjson.dumps({"id": "x", "target": "t", "pattern": "(", "confidence": 0.5}),
            timeout=2,
        )
        assert_error(bad, 400)
        bad = await nc.request(
            subjects.service("router", "route"),
            orjson.dumps({"text": "x", "sender": "nope"}),
            timeout=2,
        )
        assert_error(bad, 400, "InvalidId")
        assert len(router.content_router.rules) == 4
