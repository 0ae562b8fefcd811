"""Smooth weighted round robin: exact shares, nginx's interleaving, stability under change."""

from __future__ import annotations

from collections import Counter

import pytest

from policies import registry
from policies.base import PolicyContext, RequestInfo
from policies.round_robin import RoundRobin
from proxy.state import Health
from tests.unit.policy_sim import FakeClock, make_cluster

REQ = RequestInfo()


def _rr(clock: FakeClock, **options: object) -> RoundRobin:
    policy = registry.create("round_robin", options, PolicyContext(clock=clock))
    assert isinstance(policy, RoundRobin)
    return policy


def test_empty_ready_list() -> None:
    assert _rr(FakeClock()).pick((), REQ) is None


def test_weights_1_2_3_exact_shares_over_600_picks() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, {"a": 1, "b": 2, "c": 3})
    policy = _rr(clock)
    picks = Counter(policy.pick(cluster.ready(), REQ).id for _ in range(600))  # type: ignore[union-attr]
    assert picks == {"a": 100, "b": 200, "c": 300}


def test_nginx_smooth_sequence() -> None:
    # The example from nginx's commit introducing smooth weighted round robin.
    clock = FakeClock()
    cluster = make_cluster(clock, {"a": 5, "b": 1, "c": 1})
    policy = _rr(clock)
    seq = "".join(policy.pick(cluster.ready(), REQ).id for _ in range(14))  # type: ignore[union-attr]
    assert seq == "aabacaa" * 2


def test_stable_when_a_backend_leaves_and_returns() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, n=3)
    policy = _rr(clock)
    first = [policy.pick(cluster.ready(), REQ).id for _ in range(3)]  # type: ignore[union-attr]
    assert sorted(first) == ["b0", "b1", "b2"]
    cluster.set_health("b1", Health.EJECTED, "test")
    during = Counter(policy.pick(cluster.ready(), REQ).id for _ in range(10))  # type: ignore[union-attr]
    assert during == {"b0": 5, "b2": 5}
    cluster.set_health("b1", Health.HEALTHY, "test")
    after = Counter(policy.pick(cluster.ready(), REQ).id for _ in range(30))  # type: ignore[union-attr]
    assert after == {"b0": 10, "b1": 10, "b2": 10}


def test_retry_subset_does_not_disturb_the_cycle() -> None:
    # A retry passes the ready list minus the backend already tried; the full
    # cycle must keep exact shares around it.
    clock = FakeClock()
    cluster = make_cluster(clock, {"a": 1, "b": 1, "c": 2})
    policy = _rr(clock)
    counts: Counter[str] = Counter()
    for i in range(400):
        chosen = policy.pick(cluster.ready(), REQ)
        assert chosen is not None
        counts[chosen.id] += 1
        if i % 10 == 0:
            rest = tuple(b for b in cluster.ready() if b.id != chosen.id)
            retry = policy.pick(rest, REQ)
            assert retry is not None and retry.id != chosen.id
    total = sum(counts.values())
    assert counts["c"] / total == pytest.approx(0.5, abs=0.02)


def test_slow_start_scales_weight_exactly() -> None:
    # With the clock frozen half way through a 10 s window the returning
    # backend has effective weight 0.5 against 1 and 1: share 0.5 / 2.5.
    clock = FakeClock()
    cluster = make_cluster(clock, n=3)
    policy = _rr(clock, slow_start_s=10.0)
    cluster.set_health("b2", Health.EJECTED, "test")
    clock.advance(1.0)
    cluster.set_health("b2", Health.HEALTHY, "test")
    clock.advance(5.0)
    picks = Counter(policy.pick(cluster.ready(), REQ).id for _ in range(1000))  # type: ignore[union-attr]
    assert picks["b2"] == pytest.approx(200, abs=2)
    clock.advance(5.0)
    picks = Counter(policy.pick(cluster.ready(), REQ).id for _ in range(999))  # type: ignore[union-attr]
    assert picks == {"b0": 333, "b1": 333, "b2": 333}
