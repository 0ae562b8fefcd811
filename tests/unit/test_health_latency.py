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
    """32-sample window, p90 = 29th of 32: four slow samples push it over 3x."""
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
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
