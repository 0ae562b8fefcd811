"""HealthChecker on a real Cluster with an injected clock: decisions, guards, re-admission."""

from __future__ import annotations

import asyncio
import random
import time

from health.base import ProbeResult
from health.checker import HealthChecker
from health.config import ActiveProbe, Ejection, HealthConfig, LatencyOutlier
from proxy.state import Backend, Cluster, Health, Outcome
from tests.unit.health_support import CONNECT, HTTP_503, OK, Clock, ok


def make(n: int, clock: Clock, **cfg: object) -> tuple[Cluster, HealthChecker]:
    cluster = Cluster("c", [Backend(f"b{i}", f"http://127.0.0.1:{10000 + i}") for i in range(n)],
                      clock=clock)
    config = HealthConfig.model_validate(cfg)
    return cluster, HealthChecker(cluster, config, clock=clock, rng=random.Random(1))


def probes_fail(hc: HealthChecker, *backend_ids: str) -> None:
    """Three refused probes each: down (fall 3)."""
    for b in backend_ids:
        for _ in range(3):
            hc.on_probe(b, ProbeResult(False, 1.0, 0, "connect error: refused"))


def send(cluster: Cluster, backend_id: str, outcome: Outcome, times: int = 1) -> None:
    for _ in range(times):
        with cluster.track(cluster.get(backend_id)) as t:
            t.finish(outcome)


def test_5xx_backend_ejected_with_reason_and_removed_from_ready() -> None:
    clock = Clock()
    cluster, hc = make(4, clock)
    send(cluster, "b1", HTTP_503, 4)
    hc.evaluate()
    assert cluster.get("b1").health is Health.HEALTHY
    send(cluster, "b1", HTTP_503)
    hc.evaluate()
    state = cluster.get("b1")
    assert state.health is Health.EJECTED
    assert state.health_reason.startswith(
        "ejected by consecutive_failures: 5 5xx responses in a row (threshold 5) (5.")
    assert "b1" not in {s.id for s in cluster.ready()}
    info = hc.describe("b1")
    assert info["ejected"] is True and info["ejected_by"] == "consecutive_failures"
    assert info["verdicts"]["consecutive_failures"]["detected"] is True  # type: ignore[index]
    assert info["probe"]["up"] is False  # type: ignore[index]
    assert "ejected for 5.0 s (#1)" in info["history"][0]  # type: ignore[index]


def test_readmission_after_time_and_rise_probes_then_longer_second_ejection() -> None:
    clock = Clock()
    cluster, hc = make(4, clock)
    send(cluster, "b0", HTTP_503, 5)
    hc.evaluate()
    assert cluster.get("b0").health is Health.EJECTED
    until = clock() + 5.0 + 0.5
    clock.advance(5.6)
    hc.evaluate()
    assert cluster.get("b0").health is Health.EJECTED, "probes have not passed yet"
    assert "waiting for probes" in cluster.get("b0").health_reason
    hc.on_probe("b0", ProbeResult(True, 0.001, 200))
    hc.evaluate()
    assert cluster.get("b0").health is Health.EJECTED, "rise is 2"
    hc.on_probe("b0", ProbeResult(True, 0.001, 200))
    hc.evaluate()
    state = cluster.get("b0")
    assert state.health is Health.HEALTHY and clock() >= until
    # Slow start keys off admitted_at, which set_health moved to the re-admission time.
    assert state.admitted_at == clock()
    assert hc.describe("b0")["verdicts"] == {}
    # Old evidence was forgotten: four more 5xx are not five in a row.
    send(cluster, "b0", HTTP_503, 4)
    hc.evaluate()
    assert cluster.get("b0").health is Health.HEALTHY
    send(cluster, "b0", HTTP_503)
    hc.evaluate()
    assert cluster.get("b0").health is Health.EJECTED
    assert hc.describe("b0")["ejection_multiplier"] == 2
    assert "ejected for 10.0 s (#2)" in hc.describe("b0")["history"][-1]  # type: ignore[index]


def test_unreachable_backend_returns_as_soon_as_probes_pass() -> None:
    """Connect errors mean down, not sick: a short ejection, then the probes decide."""
    clock = Clock()
    cluster, hc = make(4, clock)
    send(cluster, "b0", CONNECT, 2)
    hc.evaluate()
    assert "ejected for 1.0 s (#1)" in hc.describe("b0")["history"][-1]  # type: ignore[index]
    clock.advance(1.6)
    hc.evaluate()
    assert cluster.get("b0").health is Health.EJECTED
    hc.on_probe("b0", ProbeResult(True, 0.001, 200))
    hc.on_probe("b0", ProbeResult(True, 0.001, 200))
    hc.evaluate()
    assert cluster.get("b0").health is Health.HEALTHY


def test_without_panic_routing_the_checker_does_not_panic_either() -> None:
    """panic_routing: false asks for a 503 when nothing is ready; the checker's own panic
    (keep everyone serving) would have routed to the dead backend for good."""
    clock = Clock()
    cluster, hc = make(1, clock)
    cluster.panic_routing = False
    probes_fail(hc, "b0")
    hc.evaluate()
    assert not hc.panic
    assert cluster.get("b0").health is Health.EJECTED and cluster.ready() == ()


def test_max_ejection_percent_holds_back_and_counts_detected() -> None:
    clock = Clock()
    cluster, hc = make(8, clock, ejection={"max_ejection_percent": 50.0})
    for i in range(5):
        send(cluster, f"b{i}", HTTP_503, 5 + i)  # b4 is the worst streak
    hc.evaluate()
    health = {s.id: s.health for s in cluster.states.values()}
    ejected = sorted(b for b, h in health.items() if h is Health.EJECTED)
    assert ejected == ["b1", "b2", "b3", "b4"]
    assert health["b0"] is Health.SUSPECT
    assert "max_ejection_percent 50% reached (4 of 8 out)" in cluster.get("b0").health_reason
    assert len(cluster.ready()) == 4 and not cluster.panic and not hc.panic


def test_panic_when_probes_fail_for_most_backends() -> None:
    clock = Clock()
    cluster, hc = make(4, clock)
    probes_fail(hc, "b0", "b1", "b2")
    hc.evaluate()
    assert hc.panic
    assert len(cluster.ready()) == 4
    assert cluster.get("b0").health is Health.SUSPECT
    assert cluster.get("b0").health_reason.startswith(
        "panic: only 1 of 4 backends would be ready (< 30%); routing to all; active: active probe")
    assert hc.describe("b0")["panic"] is True
    # One comes back: 2 of 4 ready is 50%, the panic ends and the other two are out.
    clock.advance(6.0)
    hc.on_probe("b0", ProbeResult(True, 0.001, 200))
    hc.on_probe("b0", ProbeResult(True, 0.001, 200))
    hc.evaluate()
    assert not hc.panic
    assert [s.id for s in cluster.ready()] == ["b0", "b3"]


def test_shadow_latency_detector_marks_suspect_only() -> None:
    clock = Clock()
    cluster, hc = make(4, clock, latency=LatencyOutlier(shadow=True).model_dump())
    for _ in range(10):
        clock.advance(0.01)
        for b in ("b0", "b1", "b2"):
            send(cluster, b, OK)
        send(cluster, "b3", ok(0.5))
    hc.evaluate()
    s = cluster.get("b3")
    assert s.health is Health.SUSPECT and s.health_reason.startswith("shadow mode: latency: p90")
    assert len(cluster.ready()) == 4


def test_slow_backend_ejected_and_fast_ones_kept() -> None:
    clock = Clock()
    cluster, hc = make(8, clock)
    for _ in range(12):
        clock.advance(0.05)
        for i in range(7):
            send(cluster, f"b{i}", ok(0.010 * (1 + i / 3)))
        send(cluster, "b7", ok(0.200))
    hc.evaluate()
    assert [s.id for s in cluster.states.values() if s.health is not Health.HEALTHY] == ["b7"]
    assert cluster.get("b7").health_reason.startswith("ejected by latency: p90 200.0 ms")


async def test_a_failure_streak_is_acted_on_at_once_not_at_the_next_tick() -> None:
    cluster = Cluster("c", [Backend(f"b{i}", f"http://127.0.0.1:{10000 + i}") for i in range(4)])
    config = HealthConfig(active=ActiveProbe(enabled=False),
                          ejection=Ejection(evaluate_interval_s=30.0))
    hc = HealthChecker(cluster, config)
    await hc.start()
    try:
        await asyncio.sleep(0.05)  # the loop's first wait has begun
        started = time.monotonic()
        send(cluster, "b2", CONNECT, 2)
        while cluster.get("b2").health is not Health.EJECTED:
            assert time.monotonic() - started < 1.0
            await asyncio.sleep(0.005)
        assert time.monotonic() - started < 0.1
    finally:
        await hc.stop()


def test_readmitted_backend_ramps_up_under_a_slow_start_policy() -> None:
    """Re-admission moves admitted_at; the policies' slow start reads it."""
    from policies.base import PolicyContext, RequestInfo
    from policies.registry import create, validate_options

    clock = Clock()
    cluster, hc = make(4, clock)
    policy = create("p2c_peak_ewma", validate_options("p2c_peak_ewma", {"slow_start_s": 10.0}),
                    PolicyContext(clock=clock, rng=random.Random(3)))

    def share_of_b0(picks: int = 2000) -> float:
        ready = cluster.ready()
        chosen = [policy.pick(ready, RequestInfo()) for _ in range(picks)]
        return sum(1 for c in chosen if c is not None and c.id == "b0") / picks

    assert 0.15 < share_of_b0() < 0.35  # serving from the start: not ramped
    # Ejected by probes, so no request failures feed the policies' failure penalty.
    for _ in range(3):
        hc.on_probe("b0", ProbeResult(False, 1.0, 0, "timeout after 1 s"))
    hc.evaluate()
    assert share_of_b0() == 0.0
    clock.advance(6.0)
    hc.on_probe("b0", ProbeResult(True, 0.001, 200))
    hc.on_probe("b0", ProbeResult(True, 0.001, 200))
    hc.evaluate()
    assert cluster.get("b0").health is Health.HEALTHY
    early = share_of_b0()
    clock.advance(10.0)
    late = share_of_b0()
    assert early < 0.1 and 0.15 < late < 0.35


def test_request_waiting_on_a_starved_slow_backend_ejects_it_when_past_the_limit() -> None:
    """Real Cluster.track: the fleet answers in 5/10/10/10/20 ms (p50 10, p90 20: window
    limit 80 ms); b0 answers three times in 60 ms, then routing sends it one more request,
    which stays waiting. b0 is ejected at the first evaluation after that request's age
    reaches 80 ms (the last five's geometric mean is then 4.4x the fleet p50), not when it
    finally answers."""
    clock = Clock()
    cluster, hc = make(8, clock)
    for r in range(32):
        clock.advance(0.02)
        for i in range(8):
            send(cluster, f"b{i}", ok((5.0, 10.0, 10.0, 10.0, 20.0)[r % 5] / 1e3))
    for _ in range(3):
        clock.advance(0.1)
        send(cluster, "b0", ok(0.060))
    hc.evaluate()
    assert cluster.get("b0").health is Health.HEALTHY
    with cluster.track(cluster.get("b0")) as t:
        started = clock()
        for step_s in (0.0, 0.079):
            clock.t = started + step_s
            hc.evaluate()
            assert cluster.get("b0").health is Health.HEALTHY, step_s
        clock.t = started + 0.081
        hc.evaluate()
        assert cluster.get("b0").health is Health.EJECTED
        assert cluster.get("b0").health_reason.startswith(
            "ejected by latency: last 5 requests incl. 1 still waiting: geometric mean 4.4x "
            "fleet median p50 10.0 ms (>= 4.0x): 10, 60, 60, 60, 81+ ms")
        t.finish(ok(0.5))
    assert [s.id for s in cluster.states.values() if s.health is not Health.HEALTHY] == ["b0"]


async def test_a_new_checker_clears_the_panic_gauge_its_predecessor_left() -> None:
    from prometheus_client import REGISTRY

    clock = Clock()
    cluster, old = make(4, clock)
    probes_fail(old, "b0", "b1", "b2")
    old.evaluate()
    assert REGISTRY.get_sample_value("foretell_health_panic", {"cluster": "c"}) == 1.0
    new = HealthChecker(cluster, HealthConfig(), clock=clock, rng=random.Random(1))
    await new.start()
    await old.stop()
    assert REGISTRY.get_sample_value("foretell_health_panic", {"cluster": "c"}) == 0.0
    await new.stop()


async def test_a_backend_or_cluster_gone_by_reload_leaves_no_health_series() -> None:
    """A removed backend's last state (an "ejected" 1 an alert fires on) stayed for good."""
    from prometheus_client import REGISTRY

    def states(backend: str) -> list[float | None]:
        return [REGISTRY.get_sample_value("foretell_backend_health_state",
                                          {"cluster": "gone", "backend": backend, "state": s})
                for s in ("healthy", "suspect", "ejected")]

    clock = Clock()
    cluster = Cluster("gone", [Backend(f"b{i}", f"http://127.0.0.1:{10000 + i}") for i in range(2)],
                      clock=clock)
    off = HealthConfig.model_validate({"active": {"enabled": False}})
    old = HealthChecker(cluster, off, clock=clock)
    await old.start()
    assert states("b1") == [1.0, 0.0, 0.0]
    cluster.set_backends([Backend("b0", "http://127.0.0.1:10000")])  # a reload drops b1
    new = HealthChecker(cluster, off, clock=clock)
    await new.start()
    await old.stop()
    assert states("b1") == [None, None, None] and states("b0") == [1.0, 0.0, 0.0]
    await new.stop()  # and then the whole cluster goes
    assert states("b0") == [None, None, None]
    assert REGISTRY.get_sample_value("foretell_health_panic", {"cluster": "gone"}) is None
