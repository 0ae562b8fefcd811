from __future__ import annotations

import pytest

from health.config import LatencyOutlier as Cfg
from health.latency import LatencyOutlier, nearest_rank
from health.route_mix import route_factors
from proxy.state import Outcome
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


@pytest.mark.parametrize("slow_answers", [1, 2])
def test_one_slow_answer_alone_does_not_decide_the_window_rule(slow_answers: int) -> None:
    """b7 has 8 samples: p90 is their maximum, so one 100 ms answer (10x) would decide
    alone; it takes two."""
    clock = Clock()
    d = LatencyOutlier(Cfg(recent_requests=0), clock)
    _fleet(d, clock, backends=7)
    for i in range(8):
        clock.advance(0.1)
        d.observe("b7", ok(0.100 if i < slow_answers else 0.010))
    v = {v.backend_id: v for v in d.evaluate(clock())}["b7"]
    assert v.detected is (slow_answers == 2)
    if slow_answers == 1:
        assert v.reason.endswith("(>= limit 80.0 ms, but 1 answer alone)"), v.reason


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


@pytest.mark.parametrize(("q", "expected_ms"), [(50.0, 84), (99.0, 100)])
def test_quantile_is_configurable(q: float, expected_ms: int) -> None:
    """The last 32 of 1..100 ms are kept: 69..100; nearest rank p50 is the 16th."""
    clock = Clock()
    d = LatencyOutlier(Cfg(quantile=q, min_requests=1, min_hosts=1, recent_requests=0), clock)
    for i in range(1, 101):
        d.observe("a", ok(i / 1000))
    (v,) = d.evaluate(clock())
    assert v.reason.startswith(f"p{q:g} {expected_ms:.1f} ms over 32 samples"), v.reason


FLEET_MS = (5.0, 10.0, 10.0, 10.0, 20.0)


def _fleet(d: LatencyOutlier, clock: Clock, rounds: int = 32, backends: int = 8) -> None:
    """Eight backends (b0..b7; fewer: the last left to the test) cycling 5/10/10/10/20 ms:
    fleet median p50 10 ms and p90 20 ms, so the window limit is 80 ms and the recent
    rule's 40 ms (a geometric mean of 4x)."""
    for r in range(rounds):
        clock.advance(0.02)
        for i in range(backends):
            d.observe(f"b{i}", ok(FLEET_MS[r % 5] / 1e3))


def test_recent_rule_geometric_mean_of_the_last_five_while_the_window_is_still_fast() -> None:
    """60 ms answers are under the window limit (80 ms) however many come; in the last five
    the geometric mean passes 4x the fleet p50 with the fourth: (6^4 x 1)^(1/5) = 4.19."""
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    _fleet(d, clock)
    seen = []
    for _ in range(6):
        clock.advance(0.1)
        d.observe("b7", ok(0.060))
        seen.append({v.backend_id: v for v in d.evaluate(clock())}["b7"])
    assert [v.detected for v in seen] == [False, False, False, True, True, True]
    assert seen[2].reason == ("p90 20.0 ms over 32 samples = 1.0x fleet median 20.0 ms "
                              "(< limit 80.0 ms)")
    assert seen[3].reason == ("last 5 requests: geometric mean 4.2x fleet median p50 10.0 ms "
                              "(>= 4.0x): 10, 60, 60, 60, 60 ms")
    assert seen[3].score == pytest.approx(6 ** 0.8)


def test_recent_rule_needs_a_change_so_a_steadily_slower_backend_is_left_to_the_window() -> None:
    """b7 has always been ~3x the fleet (30 ms); its last five happen to be slower
    (geometric mean 4.1x the fleet p50, p90 3.8x): noise, not a change. The recent rule
    wants them 2x b7's own earlier median (60 ms); the window rule judges b7 as it is."""
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    for r in range(27):
        clock.advance(0.02)
        for i in range(7):
            d.observe(f"b{i}", ok(FLEET_MS[r % 5] / 1e3))
        d.observe("b7", ok(0.030))
    for lat_ms in (36, 38, 40, 42, 50):
        clock.advance(0.02)
        d.observe("b7", ok(lat_ms / 1e3))
    v = {v.backend_id: v for v in d.evaluate(clock())}["b7"]
    assert not v.detected
    assert v.reason.startswith("p90 38.0 ms over 32 samples = 1.9x fleet median 20.0 ms")


@pytest.mark.parametrize(("before_ms", "detected"), [(30, False), (10, True), (70, True)])
def test_at_low_rates_the_change_is_judged_against_samples_from_before_the_window(
        before_ms: int, detected: bool) -> None:
    """b7 gets a request every 1.2 s: its five in the window are all it has there. Its
    kept samples from before say whether they are a change: not when it has always been
    ~3x the fleet (30 ms), yes when it used to answer in 10 ms; and one that has been 7x
    the fleet all along (70 ms, past the limit itself) needs no change to be found."""
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    for _ in range(20):  # 24 s of b7 at before_ms
        clock.advance(1.2)
        d.observe("b7", ok(before_ms / 1e3))
    for lat_ms in (36, 38, 40, 42, 50):  # geometric mean 4.1x the fleet's p50
        clock.advance(1.0)
        d.observe("b7", ok(lat_ms / 1e3))
    _fleet(d, clock, backends=7)  # the others, busy, inside the window
    v = {v.backend_id: v for v in d.evaluate(clock())}["b7"]
    assert v.detected is detected, v.reason
    if not detected:
        assert v.reason.endswith("(>= 4.0x, but < 2x its earlier median 30.0 ms)"), v.reason


@pytest.mark.parametrize(("recent_max_age_s", "detected_at"), [(30.0, 4), (5.0, None)])
def test_a_backend_starved_below_five_answers_per_window_is_judged_on_its_last_five(
        recent_max_age_s: float, detected_at: int | None) -> None:
    """Routing sends b7 one request every 2.6 s once it turns 7x the fleet (70 ms): its
    window (5 s) never holds more than three, so the window rule cannot judge it. Its last
    five, reaching back up to recent_max_age_s, pass 4x with the fourth slow one
    ((7^4 x 1)^(1/5) = 4.7x); kept to the window (recent_max_age_s = window_s, the rule
    before) it was never found."""
    clock = Clock()
    d = LatencyOutlier(Cfg(recent_max_age_s=recent_max_age_s), clock)
    for _ in range(8):
        clock.advance(2.0)
        d.observe("b7", ok(0.010))
    found = []
    for n in range(1, 9):
        clock.advance(2.0)
        d.observe("b7", ok(0.070))
        _fleet(d, clock, backends=7)  # the others, busy, inside the window
        v = {v.backend_id: v for v in d.evaluate(clock())}["b7"]
        if v.detected:
            found.append((n, v.reason))
    if detected_at is None:
        assert found == []
    else:
        assert found[0] == (detected_at, "last 5 requests over 11 s: geometric mean 4.7x fleet "
                            "median p50 10.0 ms (>= 4.0x): 10, 70, 70, 70, 70 ms")


def test_answers_older_than_recent_max_age_s_are_not_recent() -> None:
    """Five 70 ms answers 31 s ago, nothing since: no evidence about b7 now."""
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    for _ in range(8):
        clock.advance(0.5)
        d.observe("b7", ok(0.010))
    for _ in range(5):
        clock.advance(0.5)
        d.observe("b7", ok(0.070))
    clock.advance(29.0)
    _fleet(d, clock, backends=7)
    v = {v.backend_id: v for v in d.evaluate(clock())}["b7"]
    assert not v.detected
    assert v.reason == "0 samples in 5 s (< 8, not judged)"


def test_recent_max_age_s_shorter_than_the_window_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="recent_max_age_s must be at least window_s"):
        Cfg(window_s=5.0, recent_max_age_s=4.0)
    # Unset, it follows a longer window (a config with window_s 60 stays valid).
    assert Cfg(window_s=60.0).recent_horizon_s == 60.0 and Cfg().recent_horizon_s == 30.0


def test_recent_rule_caps_each_request_so_a_brief_stall_does_not_decide() -> None:
    """Three requests caught in a 2 s stall count as 8x each: (8^3 x 1 x 1)^(1/5) = 3.5x < 4x."""
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    _fleet(d, clock, rounds=34)
    for lat in (2.0, 2.0, 2.0, 0.010, 0.010):
        clock.advance(0.05)
        d.observe("b3", ok(lat))
    v = {v.backend_id: v for v in d.evaluate(clock())}["b3"]
    assert not v.detected


def test_starved_slow_backend_detected_when_its_waiting_request_passes_the_limit() -> None:
    """Three 60 ms answers, then routing sends one more request that stays waiting: it counts
    once its age reaches the window limit (80 ms), and the last five then pass 4x."""
    clock = Clock()
    waiting: dict[str, float] = {}
    d = LatencyOutlier(Cfg(), clock, lambda b: clock() - waiting[b] if b in waiting else None)
    _fleet(d, clock)
    for _ in range(3):
        clock.advance(0.1)
        d.observe("b0", ok(0.060))
    waiting["b0"] = clock.advance(0.5)
    clock.advance(0.0799)
    v = {v.backend_id: v for v in d.evaluate(clock())}["b0"]
    assert not v.detected
    assert v.reason == "p90 20.0 ms over 32 samples = 1.0x fleet median 20.0 ms (< limit 80.0 ms)"
    clock.advance(0.0002)
    v = {v.backend_id: v for v in d.evaluate(clock())}["b0"]
    assert v.detected
    assert v.reason == ("last 5 requests incl. 1 still waiting: geometric mean 4.4x fleet median "
                        "p50 10.0 ms (>= 4.0x): 10, 60, 60, 60, 80+ ms")
    # Once it answers fast the evidence is gone.
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
    clock.advance(0.0801)
    v = {v.backend_id: v for v in d.evaluate(clock())}["b0"]
    assert v.detected
    assert v.reason.startswith("p90 80.1 ms over 33 samples (1 still waiting) = 4.0x fleet median")


def _request_aware_fleet(d: LatencyOutlier, clock: Clock, steps: int,
                         slow: dict[str, float] | None = None, b1_render_every: int = 5) -> None:
    """Request-aware routing on the demo fleet's costs: b0 gets the renders (30 ms), b1
    one render in five, b2 and b3 only searches (5 ms). `slow`: backend -> factor."""
    factor = slow or {}
    for step in range(steps):
        clock.advance(0.05)
        jitter = 1 + (step % 5) / 10
        b1_route = "render" if step % b1_render_every == 0 else "search"
        for backend_id, route in (("b0", "render"), ("b1", b1_route),
                                  ("b2", "search"), ("b3", "search")):
            base_s = 0.030 if route == "render" else 0.005
            d.observe(backend_id, Outcome(200, base_s * jitter * factor.get(backend_id, 1.0),
                                          route_class=route))


@pytest.mark.parametrize("route_adjusted", [True, False])
def test_a_backend_given_the_expensive_route_is_not_an_outlier(route_adjusted: bool) -> None:
    clock = Clock()
    d = LatencyOutlier(Cfg(route_adjusted=route_adjusted), clock)
    _request_aware_fleet(d, clock, 40, b1_render_every=20)
    out = {v.backend_id: v for v in d.evaluate(clock())}
    # Raw, b0's p90 (renders) is ~6x the fleet's median p90 (searches): ejected.
    assert out["b0"].detected is not route_adjusted
    assert not any(v.detected for b, v in out.items() if b != "b0")
    if not route_adjusted:
        assert out["b0"].reason.startswith("p90 42.0 ms over 32 samples = 6.0x fleet median")


@pytest.mark.parametrize("sick", ["b0", "b2"])
def test_a_slow_backend_is_found_whatever_route_it_serves(sick: str) -> None:
    """b0 is the only backend that gets most renders: its own samples must not set the
    render reference (b1's renders do: the lower median of the two backends' medians)."""
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    _request_aware_fleet(d, clock, 40, slow={sick: 10.0})
    out = {v.backend_id: v for v in d.evaluate(clock())}
    assert [b for b, v in out.items() if v.detected] == [sick]
    assert out[sick].reason.startswith("route-adjusted p90")


def test_an_ordinary_expensive_request_still_waiting_is_not_a_slow_one() -> None:
    """Seven samples per backend (b1 renders every other request, so renders have two
    voters): b0's render that has waited 45 ms (renders take 30-42 ms) would be the
    largest of b0's eight observations, its p90, and past the limit in the cheapest
    class's terms (4 x ~7 ms). Its class is unknown, so it is scaled as the most
    expensive class's and stays an ordinary request."""
    clock = Clock()
    d = LatencyOutlier(Cfg(max_samples=7, min_requests=7), clock,
                       waiting_age_s=lambda b: 0.045 if b == "b0" else None)
    _request_aware_fleet(d, clock, 40, b1_render_every=2)
    out = {v.backend_id: v for v in d.evaluate(clock())}
    assert not any(v.detected for v in out.values()), out["b0"].reason
    assert "route-adjusted p90" in out["b0"].reason


def test_a_class_one_backend_serves_alone_is_judged_against_its_own_median() -> None:
    """b1 renders one request in 20 (one or two in its window), fewer than the 3 samples
    a vote takes: b0 is the renders' only voter. Its renders are typical renders (not 6x the
    searches), and a sudden 10x slowdown still shows against the window."""
    clock = Clock()
    d = LatencyOutlier(Cfg(), clock)
    _request_aware_fleet(d, clock, 40, b1_render_every=20)
    assert not any(v.detected for v in d.evaluate(clock()))
    # The render reference is b0's median (36 ms), not b1's single 30 ms render.
    factors = route_factors(d._recent(clock()))
    assert factors["search"] == 1.0
    assert factors["render"] == pytest.approx(0.006 / 0.036)
    _request_aware_fleet(d, clock, 5, slow={"b0": 10.0}, b1_render_every=20)
    out = {v.backend_id: v for v in d.evaluate(clock())}
    assert [b for b, v in out.items() if v.detected] == ["b0"]
    assert "route-adjusted" in out["b0"].reason  # the window p90 or the last five
