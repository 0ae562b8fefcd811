"""The shared P2C core and the cost adjustments (failure penalty, slow start)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from policies import registry
from policies.base import PolicyContext
from policies.p2c import CostAdjuster, CostOptions, failure_factor, pick_p2c, slow_start_factor
from proxy.state import Health, Outcome
from tests.unit.policy_sim import Behaviour, FakeClock, make_cluster, record, shares, simulate


def test_empty_and_single() -> None:
    rng = random.Random(1)
    assert pick_p2c([], lambda b: 0.0, rng) is None
    assert pick_p2c(["only"], lambda b: 0.0, rng) == "only"  # type: ignore[type-var]


def test_two_samples_are_distinct_so_the_worst_is_never_picked() -> None:
    rng = random.Random(2)
    cost = {"a": 1.0, "b": 2.0}
    picks = Counter(pick_p2c(["a", "b"], cost.__getitem__, rng) for _ in range(1000))  # type: ignore[type-var]
    assert picks == {"a": 1000}


def test_shares_match_p2c_theory() -> None:
    # With distinct costs the k-th cheapest of n wins exactly when it is in the
    # sampled pair and the other is costlier: P = 2 (n-1-k) / (n (n-1)).
    n, picks_n = 5, 20_000
    items = [f"b{k}" for k in range(n)]
    cost = {b: float(k) for k, b in enumerate(items)}
    rng = random.Random(3)
    counts = Counter(pick_p2c(items, cost.__getitem__, rng) for _ in range(picks_n))  # type: ignore[type-var]
    for k, b in enumerate(items):
        p = 2 * (n - 1 - k) / (n * (n - 1))
        sigma = math.sqrt(picks_n * p * (1 - p))
        assert abs(counts[b] - picks_n * p) <= 4 * sigma + 1e-9, (b, counts[b], picks_n * p)
    assert counts[items[-1]] == 0


def test_ties_are_broken_fairly() -> None:
    items = ["a", "b", "c"]
    rng = random.Random(4)
    picks_n = 9000
    counts = Counter(pick_p2c(items, lambda b: 1.0, rng) for _ in range(picks_n))  # type: ignore[type-var]
    p = 1 / 3
    sigma = math.sqrt(picks_n * p * (1 - p))
    for b in items:
        assert abs(counts[b] - picks_n * p) <= 4 * sigma


def test_failure_factor_exact_and_fading() -> None:
    clock = FakeClock(100.0)
    cluster = make_cluster(clock, n=2)
    for status in (200, 500, 200, 500):  # error rate 0.5, last error at t=100
        record(cluster, "b0", Outcome(status, 0.001))
    b0, b1 = cluster.get("b0"), cluster.get("b1")
    assert failure_factor(b1, clock(), 100.0, 10.0) == 1.0
    assert failure_factor(b0, clock(), 100.0, 10.0) == pytest.approx(1 + 100 * 0.5**2, rel=1e-12)
    assert failure_factor(b0, clock(), 0.0, 10.0) == 1.0
    clock.advance(10.0)
    faded = 0.5 * math.exp(-1)
    assert failure_factor(b0, clock(), 100.0, 10.0) == pytest.approx(1 + 100 * faded**2, rel=1e-12)
    # The cap: a backend failing every request costs at most 1 + penalty times more.
    for _ in range(200):
        record(cluster, "b1", Outcome(503, 0.001))
    assert failure_factor(b1, clock(), 100.0, 10.0) == pytest.approx(101.0, rel=1e-12)


def test_slow_start_factor_envoy_formula() -> None:
    since = 0.0
    # (t / window) ^ (1 / aggression), floored at min_weight_percent.
    assert slow_start_factor(10.0, 12.5, since, 10.0, 1.0, 10.0) == pytest.approx(0.25)
    assert slow_start_factor(10.0, 12.5, since, 10.0, 2.0, 10.0) == pytest.approx(0.5)
    assert slow_start_factor(10.0, 10.5, since, 10.0, 1.0, 10.0) == pytest.approx(0.10)
    assert slow_start_factor(10.0, 10.0, since, 10.0, 1.0, 10.0) == pytest.approx(0.10)
    assert slow_start_factor(10.0, 20.0, since, 10.0, 1.0, 10.0) == 1.0
    assert slow_start_factor(10.0, 12.5, since, 0.0, 1.0, 10.0) == 1.0  # disabled
    # Present when the policy was created: never ramped.
    assert slow_start_factor(0.0, 0.5, since, 10.0, 1.0, 10.0) == 1.0


def test_readmission_starts_slow_start() -> None:
    clock = FakeClock(0.0)
    cluster = make_cluster(clock, n=2)
    adjust = CostAdjuster(CostOptions(slow_start_s=10.0, failure_penalty=0.0), created_at=clock())
    b0 = cluster.get("b0")
    assert adjust.factor(b0, clock()) == 1.0
    clock.advance(5.0)
    cluster.set_health("b0", Health.EJECTED, "test")
    clock.advance(5.0)
    cluster.set_health("b0", Health.HEALTHY, "test")  # admitted_at = 10
    clock.advance(5.0)
    assert adjust.factor(b0, clock()) == pytest.approx(1 / 0.5)
    assert adjust.weight_scale(b0, clock()) == pytest.approx(0.5)
    clock.advance(5.0)
    assert adjust.factor(b0, clock()) == 1.0


@pytest.mark.parametrize("kind", ["least_request", "p2c_peak_ewma", "hcl"])
def test_fast_failing_backend_gets_much_less_share(kind: str) -> None:
    # b3 answers 500 in 1 ms, the others 200 in 10 ms. Without the penalty a
    # load-aware policy sends it more than its fair share (it frees up fastest
    # and looks fastest); with the penalty it gets a small fraction.
    def behaviour(backend_id: str, t: float) -> Behaviour:
        return Behaviour(0.001, 500) if backend_id == "b3" else Behaviour(0.010, 200)

    result = {}
    for penalty in (0.0, 100.0):
        clock = FakeClock(0.0)
        cluster = make_cluster(clock, n=4)
        policy = registry.create(kind, {"failure_penalty": penalty},
                                 PolicyContext(clock=clock, rng=random.Random(5)))
        picks = simulate(cluster, policy, clock, behaviour, rate_per_s=800, duration_s=10.0)
        result[penalty] = shares(picks)["b3"]
    assert result[0.0] > 0.25, result
    assert result[100.0] < 0.05, result


def test_slow_start_ramps_share_under_load() -> None:
    # Four equal backends at ~4 requests in flight each; b3 is ejected and
    # re-admitted at t=10 s with a 10 s slow start. Its share must grow through
    # the window and be back to about a quarter after it.
    clock = FakeClock(0.0)
    cluster = make_cluster(clock, n=4)
    policy = registry.create("least_request", {"slow_start_s": 10.0},
                             PolicyContext(clock=clock, rng=random.Random(6)))

    def behaviour(backend_id: str, t: float) -> Behaviour:
        return Behaviour(0.010, 200)

    simulate(cluster, policy, clock, behaviour, rate_per_s=1600, duration_s=5.0, seed=7)
    cluster.set_health("b3", Health.EJECTED, "test")
    simulate(cluster, policy, clock, behaviour, rate_per_s=1600, duration_s=5.0, seed=8)
    cluster.set_health("b3", Health.HEALTHY, "test")
    # Shares in the 2-second segments starting 0, 4, 8 and 12 s after re-admission.
    segments = [simulate(cluster, policy, clock, behaviour, rate_per_s=1600, duration_s=2.0,
                         seed=10 + k) for k in range(7)]
    ramp = [shares(segments[k]).get("b3", 0.0) for k in (0, 2, 4, 6)]
    assert ramp == sorted(ramp), ramp
    assert ramp[0] < 0.10, ramp
    assert ramp[-1] == pytest.approx(0.25, abs=0.03), ramp
