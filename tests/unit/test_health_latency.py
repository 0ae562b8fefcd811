from __future__ import annotations

import pytest

from health.config import LatencyOutlier as Cfg
from health.latency import LatencyOutlier, nearest_rank
from tests.unit.health_support import CONNECT, Clock, ok


def test_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 11)]
    assert nearest_rank(xs, 90) == 9.0
    assert nearest_rank(xs, 50) == 5.0
    assert nearest_rank([3.0], 99) == 3.0


def test_spread_1x_to_3x_is_not_an_outlier() -> None:
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    for step in range(40):
        clock.advance(0.05)
        for i in range(8):
            speed = 1 + 2 * i / 7
            d.observe(f"b{i}", ok(0.010 * speed * (1 + (step % 5) / 4)))
    assert not any(v.detected for v in d.evaluate(clock()))


def test_ten_times_slower_backend_detected_after_enough_slow_samples() -> None:
    """Window rule alone: 32-sample window, p90 = 29th of 32: four slow samples push it over 4x."""
    clock = Clock()
    d = LatencyOutlier(Cfg(recent_requests=0), clock)
    for _ in range(32):
        clock.advance(0.02)
        for i in range(8):
            d.observe(f"b{i}", ok(0.010))
    slow_after = None
    for n in range(1, 10):
        clock.advance(0.05)
        d.observe("b7", ok(0.100))
        out = {v.backend_id: v for v in d.evaluate(clock())}
        if out["b7"].detected and slow_after is None:
            slow_after = n
            assert out["b7"].reason.startswith("p90 100.0 ms over 32 samples = 10.0x fleet median")
    assert slow_after == 4


def test_min_requests_min_hosts_and_window() -> None:
    clock = Clock()
    d = LatencyOutlier(Cfg(min_requests=8, min_hosts=4, window_s=5.0), clock)
    for _ in range(8):
        d.observe("a", ok(0.010))
        d.observe("b", ok(0.010))
        d.observe("slow", ok(1.0))
    out = d.evaluate(clock())
    assert not any(v.detected for v in out)
    assert "fleet too small" in out[0].reason
    for _ in range(7):
        d.observe("c", ok(0.010))
    assert not any(v.detected for v in d.evaluate(clock()))
    d.observe("c", ok(0.010))
    assert {v.backend_id for v in d.evaluate(clock()) if v.detected} == {"slow"}
    clock.advance(5.01)
    assert not any(v.detected for v in d.evaluate(clock()))


def test_absolute_floor_keeps_sub_millisecond_noise_out() -> None:
    clock = Clock()
    d = LatencyOutlier(Cfg(min_excess_s=0.010), clock)
    for _ in range(10):
        for b in "abc":
            d.observe(b, ok(0.0002))
        d.observe("d", ok(0.0010))  # 5x, but only 0.8 ms more
    assert not any(v.detected for v in d.evaluate(clock()))


def test_transport_errors_carry_no_latency() -> None:
    d = LatencyOutlier(Cfg(), Clock())
    d.observe("a", CONNECT)
    assert d.evaluate(0.0) == []


@pytest.mark.parametrize("q", [50.0, 99.0])
def test_quantile_is_configurable(q: float) -> None:
    clock = Clock()
    d = LatencyOutlier(Cfg(quantile=q, min_requests=1, min_hosts=1), clock)
    for i in range(1, 101):
        d.observe("a", ok(i / 1000))
    assert d.quantiles(clock())["a"] == (32, pytest.approx((68 + q / 100 * 32 + 0.5) // 1 / 1000,
                                                           abs=0.0011))


def _fleet(d: LatencyOutlier, clock: Clock, rounds: int = 32) -> None:
    """Eight backends at 10 ms; fleet median p90 10 ms, so the limit is 40 ms."""
    for _ in range(rounds):
        clock.advance(0.02)
        for i in range(8):
            d.observe(f"b{i}", ok(0.010))


def test_recent_rule_three_of_the_last_four_while_the_window_is_still_fast() -> None:
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    _fleet(d, clock)
    for n in (1, 2):
        clock.advance(0.1)
        d.observe("b7", ok(0.100))
        assert not {v.backend_id: v for v in d.evaluate(clock())}["b7"].detected, n
    clock.advance(0.1)
    d.observe("b7", ok(0.100))
    v = {v.backend_id: v for v in d.evaluate(clock())}["b7"]
    assert v.detected and v.score == pytest.approx(10.0)
    assert v.reason == ("3 of the last 4 requests >= limit 40.0 ms (100, 100, 100 ms; "
                        "fleet median p90 10.0 ms)")
    # A fast answer in between delays detection by one slow answer.
    d2 = LatencyOutlier(Cfg(), clock)
    _fleet(d2, clock)
    seen = []
    for lat in (0.100, 0.010, 0.100, 0.100):
        clock.advance(0.1)
        d2.observe("b7", ok(lat))
        seen.append({v.backend_id: v for v in d2.evaluate(clock())}["b7"].detected)
    assert seen == [False, False, False, True]


def test_starved_slow_backend_detected_when_its_waiting_request_passes_the_limit() -> None:
    """Two slow answers, then routing sends one more request that stays waiting: it counts
    as a third slow observation exactly when its age reaches the 40 ms limit."""
    clock = Clock()
    waiting: dict[str, float] = {}
    d = LatencyOutlier(Cfg(), clock, lambda b: clock() - waiting[b] if b in waiting else None)
    _fleet(d, clock)
    for _ in range(2):
        clock.advance(0.1)
        d.observe("b0", ok(0.100))
    waiting["b0"] = clock.advance(0.5)
    clock.advance(0.0399)
    v = {v.backend_id: v for v in d.evaluate(clock())}["b0"]
    assert not v.detected
    assert v.reason == "p90 10.0 ms over 32 samples = 1.0x fleet median 10.0 ms (< limit 40.0 ms)"
    clock.advance(0.0002)
    v = {v.backend_id: v for v in d.evaluate(clock())}["b0"]
    assert v.detected
    assert v.reason == ("3 of the last 4 requests >= limit 40.0 ms (100, 100, 40+ still waiting "
                        "ms; fleet median p90 10.0 ms)")
    # Once it answers fast the evidence is gone: 2 of the last 4 again.
    del waiting["b0"]
    d.observe("b0", ok(0.010))
    assert not {v.backend_id: v for v in d.evaluate(clock())}["b0"].detected


def test_waiting_request_is_a_lower_bound_in_the_window_rule() -> None:
    """Window rule alone: three slow answers and one request waiting past the limit make
    the 29th of 33 observations slow."""
    clock = Clock()
    waiting: dict[str, float] = {}
    d = LatencyOutlier(Cfg(recent_requests=0), clock,
                       lambda b: clock() - waiting[b] if b in waiting else None)
    _fleet(d, clock)
    for _ in range(3):
        clock.advance(0.05)
        d.observe("b0", ok(0.100))
    assert not {v.backend_id: v for v in d.evaluate(clock())}["b0"].detected
    waiting["b0"] = clock()
    clock.advance(0.050)
    v = {v.backend_id: v for v in d.evaluate(clock())}["b0"]
    assert v.detected
    assert v.reason.startswith("p90 50.0 ms over 33 samples (1 still waiting) = 5.0x fleet median")


def test_recent_rule_never_fires_on_a_healthy_3x_backend_with_noise() -> None:
    """Speeds 1x..3x with lognormal noise (sigma 0.5, as in the bench fleet), seeded:
    no backend is ever detected over 2,000 evaluations."""
    import random

    rng = random.Random(7)
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    for step in range(2000):
        clock.advance(0.01)
        for i in range(8):
            if rng.random() < 0.6 / (1 + 2 * i / 7):  # slower backends get fewer requests
                d.observe(f"b{i}", ok(0.020 * (1 + 2 * i / 7) * rng.lognormvariate(0, 0.5)))
        if step % 25 == 0:
            assert not any(v.detected for v in d.evaluate(clock())), step
