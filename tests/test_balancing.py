"""Pure-logic tests of the load-balancing strategies in `mesh._balancing`."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from mesh._balancing import (
    ADAPTIVE_WEIGHTS,
    EWMA_WEIGHT,
    STRATEGIES,
    Candidate,
    Health,
    RoundRobin,
    WorkerStats,
    adaptive,
    adaptive_score,
    by_load,
    choose,
    least_connections,
    make_strategy,
    weighted_response_time,
)
from mesh.errors import BadRequestError, ErrorCode
from mesh.records import WorkerLoad, WorkerRecord

DRAWS = 2_000


def cand(
    id: str,
    *,
    cpu: float = 0.0,
    rss: int = 100,
    inflight: int = 0,
    capacity: int = 64,
    latency: float = 0.0,
    error_rate: float = 0.0,
    local_inflight: int = 0,
    local_latency: float | None = None,
    local_errors: float = 0.0,
    health: Health = Health.HEALTHY,
) -> Candidate:
    """A candidate whose heartbeat reports the plain figures and whose gateway
    measurements are the ``local_*`` ones."""
    record = WorkerRecord(
        id=id,
        subject=f"mesh.worker.{id}",
        agent_types=["t"],
        started_at=datetime.now(UTC),
        heartbeat_interval=1.0,
        load=WorkerLoad(
            cpu=cpu,
            rss=rss,
            inflight=inflight,
            capacity=capacity,
            latency=latency,
            error_rate=error_rate,
        ),
    )
    stats = WorkerStats(inflight=local_inflight, latency=local_latency, error_rate=local_errors)
    return Candidate(record, stats, health)


def draw_counts(candidates: Sequence[Candidate], seed: int = 1234) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(weighted_response_time(candidates, rng).id for _ in range(DRAWS))


# least_connections


def test_least_connections_picks_the_worker_with_fewer_requests_in_flight() -> None:
    chosen = least_connections([cand("a", inflight=5), cand("b", inflight=2)])
    assert chosen.id == "b"


def test_least_connections_weighs_in_flight_requests_against_capacity() -> None:
    # 10/100 = 0.1 beats 5/20 = 0.25 although 10 > 5.
    chosen = least_connections(
        [cand("a", inflight=5, capacity=20), cand("b", inflight=10, capacity=100)]
    )
    assert chosen.id == "b"


def test_least_connections_counts_the_gateways_own_in_flight_when_higher() -> None:
    # "a" reports nothing in flight but this gateway has 10 requests there.
    chosen = least_connections([cand("a", local_inflight=10), cand("b", inflight=5)])
    assert chosen.id == "b"


def test_least_connections_counts_the_reported_in_flight_when_higher() -> None:
    # The gateway has nothing at "a", but "a" reports 10 from other gateways.
    chosen = least_connections([cand("a", inflight=10), cand("b", local_inflight=5)])
    assert chosen.id == "b"


def test_least_connections_breaks_ties_by_the_lower_id() -> None:
    chosen = least_connections([cand("b", inflight=3), cand("a", inflight=3)])
    assert chosen.id == "a"


# weighted_response_time


def test_weighted_response_time_prefers_the_fast_worker_by_the_formula() -> None:
    # Weights: fast (0.5 - 0.01) / 0.5 + 0.1 = 1.08, slow 0.1, about 10.8 : 1.
    counts = draw_counts([cand("fast", latency=0.01), cand("slow", latency=0.5)])
    assert counts["fast"] + counts["slow"] == DRAWS
    assert counts["slow"] > 0
    assert counts["fast"] > 5 * counts["slow"]
    assert counts["fast"] / counts["slow"] == pytest.approx(10.8, rel=0.35)


def test_weighted_response_time_picks_uniformly_when_all_response_times_are_zero() -> None:
    counts = draw_counts([cand("a"), cand("b")])
    assert set(counts) == {"a", "b"}
    assert 800 < counts["a"] < 1200
    assert 800 < counts["b"] < 1200


@pytest.mark.parametrize("latency", [0.0, 0.3])
def test_weighted_response_time_always_picks_a_single_candidate(latency: float) -> None:
    only = cand("only", latency=latency)
    rng = random.Random(7)
    assert all(weighted_response_time([only], rng) is only for _ in range(50))


def test_weighted_response_time_uses_measured_latency_over_the_reported_one() -> None:
    # "a" reports itself fast but the gateway measured it slow; "b" the other way.
    counts = draw_counts(
        [
            cand("a", latency=0.01, local_latency=0.5),
            cand("b", latency=0.5, local_latency=0.01),
        ]
    )
    assert counts["a"] > 0
    assert counts["b"] > 5 * counts["a"]


def test_candidate_response_time_is_the_measured_one_even_when_zero() -> None:
    assert cand("a", latency=0.4).response_time == 0.4
    assert cand("a", latency=0.4, local_latency=0.1).response_time == 0.1
    assert cand("a", latency=0.4, local_latency=0.0).response_time == 0.0


# by_load


def test_by_load_picks_the_lower_cpu_at_equal_memory() -> None:
    chosen = by_load([cand("a", cpu=0.6), cand("b", cpu=0.2)])
    assert chosen.id == "b"


def test_by_load_weighs_cpu_and_relative_memory_equally() -> None:
    # a = 0.1 + 1000/1000 = 1.1, b = 0.5 + 100/1000 = 0.6: much less memory outweighs
    # some more CPU; c = 0.1 + 0.6 = 0.7 shows CPU still counts.
    chosen = by_load([cand("a", cpu=0.1, rss=1_000), cand("b", cpu=0.5, rss=100)])
    assert chosen.id == "b"
    chosen = by_load([cand("a", cpu=0.1, rss=1_000), cand("c", cpu=0.1, rss=600)])
    assert chosen.id == "c"


def test_by_load_picks_the_lower_memory_at_equal_cpu() -> None:
    chosen = by_load([cand("a", cpu=0.3, rss=900), cand("b", cpu=0.3, rss=300)])
    assert chosen.id == "b"


def test_by_load_breaks_ties_by_the_lower_id() -> None:
    chosen = by_load([cand("b", cpu=0.3, rss=300), cand("a", cpu=0.3, rss=300)])
    assert chosen.id == "a"


def test_by_load_handles_workers_reporting_no_memory() -> None:
    chosen = by_load([cand("a", cpu=0.4, rss=0), cand("b", cpu=0.1, rss=0)])
    assert chosen.id == "b"


def test_by_load_clamps_cpu_above_one_core() -> None:
    # Unclamped "a" (3 cores) would lose to "b"; clamped both are 1.0 and "a" wins on id.
    chosen = by_load([cand("b", cpu=1.0), cand("a", cpu=3.0)])
    assert chosen.id == "a"


def test_by_load_clamps_negative_cpu_to_zero() -> None:
    # Unclamped "b" (-0.5) would win; clamped both are 0.0 and "a" wins on id.
    chosen = by_load([cand("b", cpu=-0.5), cand("a", cpu=0.0)])
    assert chosen.id == "a"


@pytest.mark.parametrize(("reported", "clamped"), [(-1.0, 0.0), (0.25, 0.25), (4.0, 1.0)])
def test_candidate_cpu_is_clamped_to_zero_to_one(reported: float, clamped: float) -> None:
    assert cand("a", cpu=reported).cpu == clamped


# adaptive


def test_adaptive_weights_are_forty_thirty_twenty_ten() -> None:
    assert ADAPTIVE_WEIGHTS == (0.4, 0.3, 0.2, 0.1)


def test_adaptive_score_matches_the_weighted_sum_computed_by_hand() -> None:
    worker = cand(
        "a",
        cpu=0.5,
        inflight=16,
        capacity=64,
        latency=9.0,  # ignored: the measured latency wins
        local_latency=0.2,
        error_rate=0.05,
        local_errors=0.1,
    )
    # time 0.2/0.4 = 0.5, cpu 0.5, load 16/64 = 0.25, errors max(0.05, 0.1) = 0.1
    expected = 0.4 * 0.5 + 0.3 * 0.5 + 0.2 * 0.25 + 0.1 * 0.1
    assert expected == pytest.approx(0.41)
    assert adaptive_score(worker, slowest=0.4) == pytest.approx(expected)


def test_adaptive_score_caps_load_and_errors_at_one() -> None:
    worker = cand("a", cpu=0.0, inflight=200, capacity=64, error_rate=5.0)
    assert adaptive_score(worker, slowest=0.0) == pytest.approx(0.2 * 1.0 + 0.1 * 1.0)


def test_adaptive_score_ignores_time_when_every_response_time_is_zero() -> None:
    worker = cand("a", cpu=0.2)
    assert adaptive_score(worker, slowest=0.0) == pytest.approx(0.3 * 0.2)


def test_adaptive_picks_the_lowest_score() -> None:
    workers = [
        cand("a", cpu=0.9, latency=0.3, inflight=40),
        cand("b", cpu=0.2, latency=0.1, inflight=4),
        cand("c", cpu=0.5, latency=0.3, inflight=10, error_rate=0.2),
    ]
    slowest = max(w.response_time for w in workers)
    best = min(workers, key=lambda w: adaptive_score(w, slowest))
    assert best.id == "b"
    assert adaptive(workers).id == "b"


def test_adaptive_prefers_the_fast_worker_at_equal_cpu_and_load() -> None:
    chosen = adaptive(
        [cand("a", cpu=0.3, inflight=8, latency=2.0), cand("b", cpu=0.3, inflight=8, latency=0.1)]
    )
    assert chosen.id == "b"


def test_adaptive_prefers_the_idle_cpu_at_equal_response_time() -> None:
    chosen = adaptive(
        [cand("a", cpu=0.95, latency=0.2, inflight=4), cand("b", cpu=0.1, latency=0.2, inflight=4)]
    )
    assert chosen.id == "b"


def test_adaptive_avoids_the_worker_the_gateway_saw_failing() -> None:
    chosen = adaptive([cand("a", local_errors=0.5), cand("b")])
    assert chosen.id == "b"


def test_adaptive_avoids_the_worker_reporting_errors() -> None:
    chosen = adaptive([cand("a", error_rate=0.5), cand("b")])
    assert chosen.id == "b"


def test_adaptive_breaks_score_ties_by_fewer_in_flight() -> None:
    # Both are half full (2/4 and 4/8), so their scores are equal; "z" has fewer in flight.
    z = cand("z", inflight=2, capacity=4)
    a = cand("a", inflight=4, capacity=8)
    assert adaptive_score(z, 0.0) == adaptive_score(a, 0.0)
    assert adaptive([a, z]).id == "z"


def test_adaptive_breaks_full_ties_by_the_lower_id() -> None:
    chosen = adaptive([cand("b", cpu=0.4, inflight=3), cand("a", cpu=0.4, inflight=3)])
    assert chosen.id == "a"


# RoundRobin


def test_round_robin_cycles_through_candidates_in_id_order() -> None:
    workers = [cand("c"), cand("a"), cand("b")]
    rr = RoundRobin()
    assert [rr(workers).id for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_order_does_not_depend_on_input_order() -> None:
    rr = RoundRobin()
    orders = [
        [cand("a"), cand("b"), cand("c")],
        [cand("c"), cand("b"), cand("a")],
        [cand("b"), cand("c"), cand("a")],
    ]
    assert [rr(order).id for order in orders] == ["a", "b", "c"]


def test_a_new_round_robin_starts_from_the_first_candidate() -> None:
    workers = [cand("b"), cand("a")]
    used = RoundRobin()
    used(workers)
    assert RoundRobin()(workers).id == "a"


# make_strategy


@pytest.mark.parametrize("name", STRATEGIES)
def test_make_strategy_returns_a_callable_strategy_for_every_name(name: str) -> None:
    strategy = make_strategy(name)
    assert callable(strategy)
    only = cand("only")
    assert strategy([only]) is only


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adaptive", adaptive),
        ("least_connections", least_connections),
        ("load", by_load),
        ("weighted_response_time", weighted_response_time),
    ],
)
def test_make_strategy_maps_names_to_their_functions(name: str, expected: object) -> None:
    assert make_strategy(name) is expected


def test_make_strategy_round_robin_is_a_round_robin() -> None:
    assert isinstance(make_strategy("round_robin"), RoundRobin)


def test_make_strategy_rejects_an_unknown_name_listing_the_choices() -> None:
    with pytest.raises(BadRequestError) as caught:
        make_strategy("fastest")
    assert caught.value.code == ErrorCode.BAD_REQUEST == 400
    assert "fastest" in caught.value.message
    for name in STRATEGIES:
        assert name in caught.value.message


def test_make_strategy_round_robin_instances_are_independent() -> None:
    workers = [cand("a"), cand("b")]
    first = make_strategy("round_robin")
    second = make_strategy("round_robin")
    assert first is not second
    assert [first(workers).id, first(workers).id] == ["a", "b"]
    assert second(workers).id == "a"


# choose


def test_choose_ignores_unknown_workers_while_a_healthy_one_exists() -> None:
    workers = [
        cand("a", inflight=50, health=Health.HEALTHY),
        cand("b", inflight=0, health=Health.UNKNOWN),
    ]
    chosen = choose(least_connections, workers)
    assert chosen is not None
    assert chosen.id == "a"


def test_choose_passes_only_the_healthy_workers_to_the_strategy() -> None:
    seen: list[list[str]] = []

    def record(pool: Sequence[Candidate]) -> Candidate:
        seen.append([c.id for c in pool])
        return pool[0]

    choose(
        record,
        [
            cand("a", health=Health.UNKNOWN),
            cand("b", health=Health.HEALTHY),
            cand("c", health=Health.UNHEALTHY),
            cand("d", health=Health.HEALTHY),
        ],
    )
    assert seen == [["b", "d"]]


def test_choose_falls_back_to_unknown_workers_when_none_is_healthy() -> None:
    workers = [
        cand("a", inflight=0, health=Health.UNHEALTHY),
        cand("b", inflight=30, health=Health.UNKNOWN),
        cand("c", inflight=40, health=Health.UNKNOWN),
    ]
    chosen = choose(least_connections, workers)
    assert chosen is not None
    assert chosen.id == "b"


def test_choose_never_picks_an_unhealthy_worker() -> None:
    workers = [cand("a", health=Health.UNHEALTHY), cand("b", health=Health.UNHEALTHY)]
    assert choose(least_connections, workers) is None


def test_choose_returns_none_for_no_candidates() -> None:
    assert choose(least_connections, []) is None


# WorkerStats


def test_record_reply_takes_the_first_sample_as_the_latency() -> None:
    stats = WorkerStats()
    stats.record_reply(0.3)
    assert stats.latency == 0.3


def test_record_reply_moves_latency_toward_new_samples_by_the_ewma_weight() -> None:
    assert EWMA_WEIGHT == 0.2
    stats = WorkerStats()
    stats.record_reply(0.3)
    stats.record_reply(0.8)
    assert stats.latency == pytest.approx(0.3 + 0.2 * (0.8 - 0.3))  # 0.4
    stats.record_reply(0.0)
    assert stats.latency == pytest.approx(0.4 * 0.8)


def test_record_reply_decays_the_error_rate_and_resets_consecutive_failures() -> None:
    stats = WorkerStats(error_rate=0.5, consecutive_failures=3)
    stats.record_reply(0.1)
    assert stats.error_rate == pytest.approx(0.4)
    assert stats.consecutive_failures == 0
    stats.record_reply(0.1)
    assert stats.error_rate == pytest.approx(0.32)


def test_record_failure_raises_the_error_rate_toward_one_and_counts_failures() -> None:
    stats = WorkerStats()
    stats.record_failure()
    assert stats.error_rate == pytest.approx(0.2)
    assert stats.consecutive_failures == 1
    stats.record_failure()
    assert stats.error_rate == pytest.approx(0.36)
    assert stats.consecutive_failures == 2
    for _ in range(50):
        stats.record_failure()
    assert 0.99 < stats.error_rate <= 1.0
    assert stats.consecutive_failures == 52


def test_record_failure_leaves_latency_alone() -> None:
    stats = WorkerStats(latency=0.25)
    stats.record_failure()
    assert stats.latency == 0.25


# Candidate


@pytest.mark.parametrize(
    ("inflight", "local_inflight", "full"),
    [(63, 0, False), (64, 0, True), (65, 0, True), (0, 64, True), (10, 63, False)],
)
def test_candidate_is_at_capacity_when_in_flight_reaches_capacity(
    inflight: int, local_inflight: int, full: bool
) -> None:
    worker = cand("a", inflight=inflight, local_inflight=local_inflight, capacity=64)
    assert worker.at_capacity is full


@pytest.mark.parametrize("capacity", [0, -3])
def test_candidate_treats_a_capacity_below_one_as_one(capacity: int) -> None:
    assert cand("a", capacity=capacity).capacity == 1
    assert cand("a", capacity=capacity).at_capacity is False
    assert cand("a", capacity=capacity, inflight=1).at_capacity is True


def test_candidate_error_rate_is_the_higher_of_measured_and_reported() -> None:
    assert cand("a", error_rate=0.3, local_errors=0.1).error_rate == 0.3
    assert cand("a", error_rate=0.1, local_errors=0.3).error_rate == 0.3
