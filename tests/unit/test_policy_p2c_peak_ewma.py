"""Peak-EWMA: exact decayed estimates, the cost, and shares in a simulation."""

from __future__ import annotations

import math
import random

import pytest

from policies import registry
from policies.base import PolicyContext, RequestInfo
from policies.p2c_peak_ewma import P2CPeakEwma, peak_ewma_cost
from proxy.state import Outcome, PeakEwma
from tests.unit.policy_sim import (
    Behaviour,
    FakeClock,
    make_cluster,
    record,
    shares,
    simulate,
    simulate_queue,
)

REQ = RequestInfo()


def _policy(clock: FakeClock, seed: int, **options: object) -> P2CPeakEwma:
    policy = registry.create("p2c_peak_ewma", options,
                             PolicyContext(clock=clock, rng=random.Random(seed)))
    assert isinstance(policy, P2CPeakEwma)
    return policy


def test_peak_ewma_exact_decayed_values() -> None:
    clock = FakeClock(50.0)
    ewma = PeakEwma(clock, decay_s=10.0, initial_rtt_s=0.010)
    assert ewma.read() == 0.010
    ewma.observe(0.100)  # a new peak is taken at once
    assert ewma.read() == 0.100
    clock.advance(10.0)  # read decays toward zero: x e^-1 after one time constant
    assert ewma.read() == pytest.approx(0.100 * math.exp(-1), rel=1e-12)
    ewma.observe(0.020)  # below the (undecayed) estimate: blend with weight e^-1
    expected = 0.100 * math.exp(-1) + 0.020 * (1 - math.exp(-1))
    assert ewma.read() == pytest.approx(expected, rel=1e-12)
    clock.advance(5.0)
    assert ewma.read() == pytest.approx(expected * math.exp(-0.5), rel=1e-12)
    ewma.observe(0.0)  # same blend rule with elapsed 5 s
    assert ewma.read() == pytest.approx(expected * math.exp(-0.5), rel=1e-12)
    clock.advance(0.0)
    ewma.observe(0.5)  # peak again
    assert ewma.read() == 0.5
    # The first response replaces the prior outright, even when lower.
    fresh = PeakEwma(clock, decay_s=10.0, initial_rtt_s=0.010)
    fresh.observe(0.002)
    assert fresh.read() == 0.002
    clock.advance(20.0)
    assert fresh.read() == pytest.approx(0.002 * math.exp(-2), rel=1e-12)


def test_cost_is_rtt_times_inflight_plus_one() -> None:
    assert peak_ewma_cost(0.010, 0) == 0.010
    assert peak_ewma_cost(0.010, 3) == pytest.approx(0.040)
    # A request waiting longer than the EWMA sets the round-trip estimate.
    assert peak_ewma_cost(0.010, 3, waiting_s=0.5) == pytest.approx(2.0)
    assert peak_ewma_cost(0.010, 3, waiting_s=0.002) == pytest.approx(0.040)


def test_oldest_waiting_request_is_tracked_in_o1() -> None:
    clock = FakeClock(5.0)
    cluster = make_cluster(clock, n=1)
    state = cluster.get("b0")
    assert state.waiting_since is None
    first = cluster.track(state).__enter__()
    clock.advance(1.0)
    second = cluster.track(state).__enter__()
    clock.advance(1.0)
    third = cluster.track(state).__enter__()
    assert state.waiting_since == 5.0
    # The middle one answers: the oldest is unchanged, the answered one waits
    # in the deque behind it until it reaches the front.
    second.finish(Outcome(200, 1.0))
    assert state.waiting_since == 5.0 and len(state.waiting) == 3
    # The oldest answers (headers in, body still streaming: the slot is held):
    # it stops waiting, and the answered one behind it is dropped too.
    first.finish(Outcome(200, 2.0))
    assert state.inflight == 3 and state.waiting_since == 7.0 and len(state.waiting) == 1
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    # A cancelled attempt (exit without an outcome) stops waiting as well.
    third.__exit__(None, None, None)
    assert state.inflight == 0 and state.waiting_since is None and not state.waiting


def test_a_stalled_backend_is_priced_out_before_any_response() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, n=2)
    record(cluster, "b0", Outcome(200, 0.010))
    record(cluster, "b1", Outcome(200, 0.030))
    policy = _policy(clock, 4)
    with cluster.track(cluster.get("b0")):
        # 10 ms x 2 in flight-or-placed = 20 ms < 30 ms: b0 still wins...
        assert {policy.pick(cluster.ready(), REQ).id for _ in range(20)} == {"b0"}  # type: ignore[union-attr]
        clock.advance(0.020)
        # ...until its request has waited 20 ms: 20 ms x 2 = 40 ms > 30 ms.
        assert {policy.pick(cluster.ready(), REQ).id for _ in range(20)} == {"b1"}  # type: ignore[union-attr]


def test_empty_ready_list() -> None:
    assert _policy(FakeClock(), 1).pick((), REQ) is None


def test_faster_backend_wins_the_pair() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, n=2)
    record(cluster, "b0", Outcome(200, 0.050))
    record(cluster, "b1", Outcome(200, 0.020))
    policy = _policy(clock, 2)
    assert {policy.pick(cluster.ready(), REQ).id for _ in range(50)} == {"b1"}  # type: ignore[union-attr]
    # Three in flight make b1 cost 4 x 20 ms > 50 ms.
    with cluster.track(cluster.get("b1")), cluster.track(cluster.get("b1")), \
            cluster.track(cluster.get("b1")):
        assert {policy.pick(cluster.ready(), REQ).id for _ in range(50)} == {"b0"}  # type: ignore[union-attr]


def test_four_times_slower_backend_gets_clearly_less_share() -> None:
    def behaviour(backend_id: str, t: float) -> Behaviour:
        return Behaviour(0.040 if backend_id == "b0" else 0.010)

    clock = FakeClock()
    cluster = make_cluster(clock, n=4)
    policy = _policy(clock, 3)
    s = shares(simulate(cluster, policy, clock, behaviour, rate_per_s=400, duration_s=10.0))
    # Fair share is 0.25; a peak-EWMA P2C sends the slow one well under half of
    # it (about 0.05 here), and each fast one more than twice as much as it.
    assert s["b0"] < 0.10, s
    assert min(s["b1"], s["b2"], s["b3"]) > 2 * s["b0"], s


def test_a_stalled_backend_gets_nothing_once_its_stall_shows() -> None:
    """The bench's stall scenario: b0 holds every request from 6 s to 10 s.

    Nothing comes back from b0 until the clients give up at their 2 s
    deadline, so without the waiting age its EWMA stays where it was (and
    decays) and b0 kept getting 2-8 requests per run between 6.25 s and 8 s
    (14 over these 3 seeds), each stuck for the full deadline.
    """
    stuck = 0
    for seed in (1, 2, 3):
        clock = FakeClock(100.0)
        cluster = make_cluster(clock, n=8)
        result = simulate_queue(cluster, _policy(clock, seed), clock, rate_per_s=280.0,
                                duration_s=14.0, stall=("b0", 6.0, 10.0), seed=seed,
                                window=(6.25, 8.0))
        # From 250 ms into the stall until the first client deadline (8 s).
        stuck += result.picks["b0"]
    # Fair share would be 280 / 8 x 1.75 s = 61 per run.
    assert stuck <= 2, stuck
