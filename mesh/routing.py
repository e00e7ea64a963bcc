"""Content-based routing: which agent type should handle a message.

A decision is made in three steps, each explainable:

1. **Rules** (KV ``mesh-routes``): a regular expression on the text, or the sender's
   agent type, each with a confidence. The most confident match wins when it
   reaches ``min_confidence``.
2. **Learned**: otherwise, the recent messages whose routing was confirmed by
   feedback (``mesh.router.feedback``) vote for their target, weighted by their
   word-overlap similarity to the new message (Jaccard over words and CJK
   characters); a failed routing votes against its target.
3. **Default**: otherwise, the default agent type.
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Literal

import orjson
from pydantic import BaseModel, Field, ValidationError, field_validator

from mesh.errors import BadRequestError
from mesh.ids import validate_agent_type

Strategy = Literal["rule", "sender", "learned", "default"]
_WORD = re.compile(r"[\u4e00-\u9fff]|[^\W_]+", re.UNICODE)


class RouteRule(BaseModel):
    """One routing rule, kept in ``mesh-routes`` under its id."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    target: str
    pattern: str | None = Field(None, description="regular expression searched in the text")
    sender_type: str | None = Field(None, description="agent type of the sender")
    confidence: float = Field(ge=0.0, le=1.0)
    description: str = ""

    @field_validator("target")
    @classmethod
    def _valid_target(cls, value: str) -> str:
        return validate_agent_type(value)

    def model_post_init(self, context: object) -> None:
        if (self.pattern is None) == (self.sender_type is None):
            raise BadRequestError(f"rule {self.id}: give exactly one of pattern, sender_type")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise BadRequestError(f"rule {self.id}: bad pattern: {exc}") from exc


class RoutingDecision(BaseModel):
    """Where a message should go, how sure the router is, and why."""

    id: str
    target: str
    confidence: float
    reasoning: str
    strategy: Strategy
    rule_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Example:
    words: frozenset[str]
    target: str
    success: bool


def words_of(text: str) -> frozenset[str]:
    """Lower-cased words, and each CJK character as a word of its own."""
    return frozenset(match.lower() for match in _WORD.findall(text))


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two word sets."""
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


class ContentRouter:
    """Rules, feedback-learned examples and a default, in one decision.

    Args:
        default_target: Where messages go that nothing else routes.
        min_confidence: A rule below this is not trusted on its own.
        min_similarity: Examples less similar than this do not vote.
        history: How many confirmed examples to remember.
    """

    def __init__(
        self,
        default_target: str,
        *,
        min_confidence: float = 0.6,
        min_similarity: float = 0.3,
        history: int = 1000,
    ) -> None:
        self.default_target = validate_agent_type(default_target)
        self.min_confidence = min_confidence
        self.min_similarity = min_similarity
        self._rules: dict[str, tuple[RouteRule, re.Pattern[str] | None]] = {}
        self._examples: deque[_Example] = deque(maxlen=history)
        self._decisions: OrderedDict[str, tuple[frozenset[str], str]] = OrderedDict()
        self._history = history

    def set_rule(self, rule: RouteRule) -> None:
        compiled = re.compile(rule.pattern, re.IGNORECASE) if rule.pattern else None
        self._rules[rule.id] = (rule, compiled)

    def remove_rule(self, rule_id: str) -> None:
        self._rules.pop(rule_id, None)

    @property
    def rules(self) -> list[RouteRule]:
        return [rule for rule, _ in sorted(self._rules.values(), key=lambda r: r[0].id)]

    def route(self, text: str, sender_type: str | None = None) -> RoutingDecision:
        """Decide where `text` (sent by an agent of `sender_type`, if any) should go."""
        decision_id = uuid.uuid4().hex
        words = words_of(text)
        decision = self._by_rules(decision_id, text, sender_type)
        if decision is None:
            decision = self._by_examples(decision_id, words)
        if decision is None:
            decision = RoutingDecision(
                id=decision_id,
                target=self.default_target,
                confidence=0.0,
                reasoning="no rule matched with enough confidence and no similar routed message",
                strategy="default",
            )
        self._decisions[decision_id] = (words, decision.target)
        while len(self._decisions) > self._history:
            self._decisions.popitem(last=False)
        return decision

    def _by_rules(
        self, decision_id: str, text: str, sender_type: str | None
    ) -> RoutingDecision | None:
        best: tuple[RouteRule, str] | None = None
        for rule, compiled in self._rules.values():
            if compiled is not None:
                match = compiled.search(text)
                if match is None:
                    continue
                why = f"rule {rule.id}: /{rule.pattern}/ matched {match.group(0)!r}"
            elif sender_type is not None and rule.sender_type == sender_type:
                why = f"rule {rule.id}: the sender is a {sender_type}"
            else:
                continue
            if best is None or (rule.confidence, rule.id) > (best[0].confidence, best[0].id):
                best = (rule, why)
        if best is None or best[0].confidence < self.min_confidence:
            return None
        rule, why = best
        return RoutingDecision(
            id=decision_id,
            target=rule.target,
            confidence=rule.confidence,
            reasoning=why,
            strategy="rule" if rule.pattern else "sender",
            rule_id=rule.id,
        )

    def _by_examples(self, decision_id: str, words: frozenset[str]) -> RoutingDecision | None:
        votes: dict[str, float] = defaultdict(float)
        support: dict[str, float] = defaultdict(float)
        for example in self._examples:
            score = similarity(words, example.words)
            if score < self.min_similarity:
                continue
            votes[example.target] += score if example.success else -score
            support[example.target] = max(support[example.target], score)
        winners = [(vote, target) for target, vote in votes.items() if vote > 0]
        if not winners:
            return None
        _, target = max(winners)
        return RoutingDecision(
            id=decision_id,
            target=target,
            confidence=round(min(1.0, support[target]), 3),
            reasoning=f"similar to messages that {target} handled well (similarity "
            f"{support[target]:.2f})",
            strategy="learned",
        )

    def feedback(self, decision_id: str, success: bool, correct_target: str | None = None) -> bool:
        """Learn from how a decision turned out; `correct_target` names the right type.

        Returns:
            Whether the decision was known (recent enough).
        """
        if correct_target is not None:
            validate_agent_type(correct_target)
        known = self._decisions.get(decision_id)
        if known is None:
            return False
        words, target = known
        self._examples.append(_Example(words, target, success))
        if correct_target is not None and correct_target != target:
            self._examples.append(_Example(words, correct_target, True))
        return True


def load_rules(text: str) -> list[RouteRule]:
    """Rules from a rules file's JSON (``{"rules": [...]}``, see mesh/samples/routes.json).

    Raises:
        BadRequestError: The file is not such JSON, or a rule is invalid.
    """
    try:
        document = orjson.loads(text)
        return [RouteRule.model_validate(rule) for rule in document["rules"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValidationError) as exc:
        raise BadRequestError(f"not a rules file: {exc}") from exc
