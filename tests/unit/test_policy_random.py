"""Weighted random: shares within 3 sigma of the weights, propensities exact."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from policies import registry
from policies.base import PolicyContext, RequestInfo
from proxy.state import Health, Outcome
from tests.unit.policy_sim import FakeClock, make_cluster, record

REQ = RequestInfo()


def _within_3_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p))


def test_empty_ready_list() -> None:
    policy = registry.create("random", {}, PolicyContext(clock=FakeClock(), rng=random.Random(1)))
    assert policy.pick((), REQ) is None


@pytest.mark.parametrize("weights", [{"a": 1, "b": 1, "c": 1, "d": 1}, {"a": 1, "b": 2, "c": 3}])
def test_shares_follow_weights(weights: dict[str, int]) -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, weights)
    policy = registry.create("random", {}, PolicyContext(clock=clock, rng=random.Random(2)))
    n = 6000
    total = sum(weights.values())
    counts: Counter[str] = Counter()
    for _ in range(n):
        chosen = policy.pick(cluster.ready(), REQ)
        assert chosen is not None
        counts[chosen.id] += 1
        assert policy.last_propensity == pytest.approx(weights[chosen.id] / total)  # type: ignore[attr-defined]
    for bid, w in weights.items():
        assert _within_3_sigma(counts[bid], n, w / total), (bid, counts)


def test_follows_ready_list_changes() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, n=3)
    policy = registry.create("random", {}, PolicyContext(clock=clock, rng=random.Random(3)))
    cluster.set_health("b1", Health.EJECTED, "test")
    picks = {policy.pick(cluster.ready(), REQ).id for _ in range(300)}  # type: ignore[union-attr]
    assert picks == {"b0", "b2"}


def test_slow_start_and_failure_penalty_scale_weights() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, n=3)
    policy = registry.create("random", {"slow_start_s": 10.0, "failure_penalty": 100.0},
                             PolicyContext(clock=clock, rng=random.Random(4)))
    cluster.set_health("b2", Health.EJECTED, "test")
    clock.advance(1.0)
    cluster.set_health("b2", Health.HEALTHY, "test")
    clock.advance(2.5)  # b2 at 25% weight
    for status in (500, 200):  # b0 at 50% errors: cost x (1 + 100 * 0.25) = x26
        record(cluster, "b0", Outcome(status, 0.01))
    w = {"b0": 1 / 26, "b1": 1.0, "b2": 0.25}
    total = sum(w.values())
    n = 6000
    counts = Counter(policy.pick(cluster.ready(), REQ).id for _ in range(n))  # type: ignore[union-attr]
    for bid, wi in w.items():
        assert _within_3_sigma(counts[bid], n, wi / total), (bid, counts)
