"""Least request with P2C: theory for the sampled pair, weights, failure penalty."""

from __future__ import annotations

import math
import random
from collections import Counter
from contextlib import ExitStack

from policies import registry
from policies.base import PolicyContext, RequestInfo
from policies.least_request import LeastRequest, least_request_cost
from proxy.state import Cluster, Outcome
from tests.unit.policy_sim import FakeClock, make_cluster, record

REQ = RequestInfo()


def _policy(clock: FakeClock, seed: int, **options: object) -> LeastRequest:
    policy = registry.create("least_request", options,
                             PolicyContext(clock=clock, rng=random.Random(seed)))
    assert isinstance(policy, LeastRequest)
    return policy


def _hold(stack: ExitStack, cluster: Cluster, backend_id: str, n: int) -> None:
    """Keep n requests in flight on a backend until the stack closes."""
    for _ in range(n):
        stack.enter_context(cluster.track(cluster.get(backend_id)))


def test_cost() -> None:
    assert least_request_cost(0, 1) == 1.0
    assert least_request_cost(3, 2) == 2.0


def test_empty_ready_list() -> None:
    assert _policy(FakeClock(), 1).pick((), REQ) is None


def test_lower_inflight_wins_with_p2c_probability() -> None:
    # inflight 0, 1, 2: the idle backend wins whenever it is sampled (2/3),
    # the middle one only against the busiest (1/3), the busiest never.
    clock = FakeClock()
    cluster = make_cluster(clock, n=3)
    policy = _policy(clock, 2)
    n = 6000
    with ExitStack() as stack:
        _hold(stack, cluster, "b1", 1)
        _hold(stack, cluster, "b2", 2)
        counts = Counter(policy.pick(cluster.ready(), REQ).id for _ in range(n))  # type: ignore[union-attr]
    for bid, p in (("b0", 2 / 3), ("b1", 1 / 3)):
        # Binomial count: 4 sigma tolerance (false alarm < 1e-4 for a fixed seed anyway).
        assert abs(counts[bid] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), counts
    assert counts["b2"] == 0


def test_weights_divide_the_cost() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, {"light": 1, "heavy": 3})
    policy = _policy(clock, 3)
    assert {policy.pick(cluster.ready(), REQ).id for _ in range(50)} == {"heavy"}  # type: ignore[union-attr]
    with ExitStack() as stack:
        _hold(stack, cluster, "heavy", 3)  # (3 + 1) / 3 > (0 + 1) / 1
        assert {policy.pick(cluster.ready(), REQ).id for _ in range(50)} == {"light"}  # type: ignore[union-attr]
        _hold(stack, cluster, "light", 1)  # (1 + 1) / 1 > 4 / 3
        assert {policy.pick(cluster.ready(), REQ).id for _ in range(50)} == {"heavy"}  # type: ignore[union-attr]


def test_failure_penalty_outweighs_inflight() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, n=2)
    for _ in range(4):
        record(cluster, "b0", Outcome(502, 0.001))
    policy = _policy(clock, 4)
    with ExitStack() as stack:
        _hold(stack, cluster, "b1", 50)  # 51 < 101
        assert {policy.pick(cluster.ready(), REQ).id for _ in range(50)} == {"b1"}  # type: ignore[union-attr]
    # Without the penalty the idle failing backend would win every time.
    plain = _policy(clock, 4, failure_penalty=0.0)
    with ExitStack() as stack:
        _hold(stack, cluster, "b1", 1)
        assert {plain.pick(cluster.ready(), REQ).id for _ in range(50)} == {"b0"}  # type: ignore[union-attr]
