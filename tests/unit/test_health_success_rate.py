from __future__ import annotations

from health.config import SuccessRate as Cfg
from health.success_rate import SuccessRate
from tests.unit.health_support import HTTP_503, OK, Clock


def feed(d: SuccessRate, clock: Clock, rates: dict[str, float], seconds: float,
         per_backend_rps: int = 40) -> None:
    """Deterministic streams: backend b fails every k-th request for failure rate 1/k."""
    steps = int(seconds * per_backend_rps)
    for i in range(steps):
        clock.advance(1.0 / per_backend_rps)
        for b, rate in rates.items():
            fail = rate > 0 and (i % round(1 / rate)) == 0
            d.observe(b, HTTP_503 if fail else OK)


def test_healthy_fleet_no_detection() -> None:
    clock = Clock()
    d = SuccessRate(Cfg(), clock)
    feed(d, clock, {f"b{i}": 0.0 for i in range(5)}, 3.0)
    assert not any(v.detected for v in d.evaluate(clock()))


def test_backend_failing_half_its_requests_is_detected() -> None:
    clock = Clock()
    d = SuccessRate(Cfg(), clock)
    fleet = {f"b{i}": 0.0 for i in range(4)} | {"bad": 0.5}
    feed(d, clock, fleet, 2.0)
    out = {v.backend_id: v for v in d.evaluate(clock())}
    assert out["bad"].detected
    assert out["bad"].reason == "failure rate 50% over 80 requests in 2 s >= 25% (fleet median 0%)"
    assert [b for b, v in out.items() if v.detected] == ["bad"]


def test_detection_time_after_a_switch_to_all_5xx() -> None:
    """32 req/s per backend (exact binary times), 0.25 s buckets, 2 s window.

    The k-th failure lands at t = 2 + k/32. At k = 15 the window still holds
    64 requests (15/64 = 23% < 25%); at k = 16 a bucket of 8 old successes
    rolls out: 16 failures in 57 requests = 28% >= 25%.
    """
    clock = Clock(0.0)
    d = SuccessRate(Cfg(), clock)
    feed(d, clock, {f"b{i}": 0.0 for i in range(5)}, 2.0, per_backend_rps=32)
    assert clock() == 2.0
    first = None
    for k in range(1, 41):
        clock.advance(1 / 32)
        for b in ("b0", "b1", "b2", "b3"):
            d.observe(b, OK)
        d.observe("b4", HTTP_503)
        if first is None and any(v.detected for v in d.evaluate(clock())):
            first = k
    assert first == 16


def test_fleet_wide_failures_eject_nobody() -> None:
    clock = Clock()
    d = SuccessRate(Cfg(), clock)
    feed(d, clock, {f"b{i}": 0.5 for i in range(5)}, 2.0)
    assert not any(v.detected for v in d.evaluate(clock()))


def test_minimum_volume_and_window_expiry() -> None:
    clock = Clock()
    d = SuccessRate(Cfg(min_requests=20), clock)
    for _ in range(19):
        d.observe("a", HTTP_503)
    (v,) = d.evaluate(clock())
    assert not v.detected and "(< 20, not judged)" in v.reason
    d.observe("a", HTTP_503)
    assert d.evaluate(clock())[0].detected
    clock.advance(2.0)  # every bucket has aged out
    assert d.rates(clock()) == {"a": (0, 0.0)}
