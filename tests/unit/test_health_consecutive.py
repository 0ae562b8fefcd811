from __future__ import annotations

from health.config import ConsecutiveFailures as Cfg
from health.consecutive import ConsecutiveFailures
from tests.unit.health_support import CONNECT, HTTP_503, OK, RESET, TIMEOUT, Clock


def detected(d: ConsecutiveFailures, now: float) -> dict[str, bool]:
    return {v.backend_id: v.detected for v in d.evaluate(now)}


def test_five_5xx_in_a_row_detected_at_the_fifth() -> None:
    clock = Clock()
    d = ConsecutiveFailures(Cfg(), clock)
    for i in range(4):
        d.observe("a", HTTP_503)
        assert not detected(d, clock())["a"], f"after {i + 1} 5xx"
        assert not d.urgent("a")
    d.observe("a", HTTP_503)
    assert d.urgent("a")
    v = d.evaluate(clock())[0]
    assert v.detected and v.reason == "5 5xx responses in a row (threshold 5)"
    assert v.score == 1.0


def test_success_resets_both_streaks() -> None:
    clock = Clock()
    d = ConsecutiveFailures(Cfg(), clock)
    for _ in range(4):
        d.observe("a", HTTP_503)
    d.observe("a", OK)
    for _ in range(4):
        d.observe("a", HTTP_503)
    d.observe("a", CONNECT)
    d.observe("a", OK)
    d.observe("a", CONNECT)
    assert detected(d, clock()) == {"a": False}


def test_transport_errors_counted_apart_with_a_lower_threshold() -> None:
    clock = Clock()
    d = ConsecutiveFailures(Cfg(consecutive_transport=2, consecutive_5xx=5), clock)
    d.observe("a", RESET)
    d.observe("b", HTTP_503)
    d.observe("b", HTTP_503)
    assert detected(d, clock()) == {"a": False, "b": False}
    d.observe("a", TIMEOUT)
    (va, vb) = d.evaluate(clock())
    assert va.detected and "2 transport errors in a row (reset/timeout" in va.reason
    assert not vb.detected


def test_5xx_does_not_reset_the_transport_streak() -> None:
    d = ConsecutiveFailures(Cfg(consecutive_transport=3), Clock())
    d.observe("a", CONNECT)
    d.observe("a", HTTP_503)
    d.observe("a", CONNECT)
    d.observe("a", CONNECT)
    assert d.evaluate(0.0)[0].detected


def test_forget_clears_the_streak() -> None:
    d = ConsecutiveFailures(Cfg(), Clock())
    for _ in range(5):
        d.observe("a", HTTP_503)
    d.forget("a")
    assert d.evaluate(0.0) == []
    assert not d.urgent("a")
