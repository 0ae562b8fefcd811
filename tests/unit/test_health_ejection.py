from __future__ import annotations

from health.ejection import (
    Action,
    BackendStatus,
    Finding,
    decayed_multiplier,
    decide,
    ejection_duration_s,
    in_panic,
    may_eject,
)


def test_may_eject_follows_envoy_rule() -> None:
    assert may_eject(8, 0, 10.0)  # one ejection always allowed
    assert not may_eject(8, 1, 10.0)
    assert may_eject(8, 3, 50.0)
    assert not may_eject(8, 4, 50.0)
    assert not may_eject(1, 1, 100.0)
    assert not may_eject(0, 0, 100.0)


def test_panic_threshold() -> None:
    assert not in_panic(8, 3, 30.0)  # 37.5%
    assert in_panic(8, 2, 30.0)  # 25%
    assert not in_panic(0, 0, 30.0)


def test_ejection_time_grows_and_is_capped() -> None:
    assert [ejection_duration_s(5.0, 12.0, n) for n in (0, 1, 2, 3)] == [5.0, 5.0, 10.0, 12.0]


def test_multiplier_decays_per_period() -> None:
    assert decayed_multiplier(3, 100.0, 129.9, 30.0) == 3
    assert decayed_multiplier(3, 100.0, 130.0, 30.0) == 2
    assert decayed_multiplier(3, 100.0, 1000.0, 30.0) == 0
    assert decayed_multiplier(0, None, 1000.0, 30.0) == 0


def F(det: str, score: float = 1.0, enforced: bool = True, hard: bool = False) -> Finding:
    return Finding(det, f"{det} fired", score, enforced, hard)


def test_cap_keeps_the_worst_out_and_marks_the_rest_suspect() -> None:
    statuses = [BackendStatus(f"b{i}", False) for i in range(6)]
    statuses[1] = BackendStatus("b1", False, findings=(F("latency", 4.0),))
    statuses[2] = BackendStatus("b2", False, findings=(F("latency", 9.0),))
    plan = decide(statuses, 0.0, max_ejection_percent=10.0, panic_threshold_percent=30.0)
    actions = {d.backend_id: d.action for d in plan.decisions}
    assert actions["b2"] is Action.EJECT
    assert actions["b1"] is Action.SUSPECT
    assert actions["b0"] is Action.HEALTHY
    b1 = next(d for d in plan.decisions if d.backend_id == "b1")
    assert b1.reason == ("latency: latency fired; not ejected: max_ejection_percent 10% "
                         "reached (1 of 6 out)")
    assert [d.backend_id for d in plan.decisions] == [f"b{i}" for i in range(6)]
    assert plan.ejected == 1 and not plan.panic


def test_shadow_findings_only_suspect() -> None:
    plan = decide([BackendStatus("a", False, findings=(F("anomaly", enforced=False),)),
                   BackendStatus("b", False)], 0.0, 100.0, 0.0)
    assert plan.decisions[0].action is Action.SUSPECT
    assert plan.decisions[0].reason == "shadow mode: anomaly: anomaly fired"


def test_active_probe_failure_is_not_capped_and_can_panic() -> None:
    statuses = [BackendStatus(f"b{i}", False, probe_up=False,
                              findings=(F("active", hard=True),)) for i in range(3)]
    statuses.append(BackendStatus("b3", False, probe_up=True))
    plan = decide(statuses, 0.0, max_ejection_percent=10.0, panic_threshold_percent=30.0)
    assert [d.action for d in plan.decisions] == [Action.EJECT] * 3 + [Action.HEALTHY]
    assert plan.panic
    assert plan.panic_reason == ("panic: only 1 of 4 backends would be ready (< 30%); "
                                 "routing to all")


def test_readmission_needs_time_over_and_probes_passing() -> None:
    st = [BackendStatus("a", True, eject_until=10.0, probe_up=True),
          BackendStatus("b", True, eject_until=10.0, probe_up=False),
          BackendStatus("c", True, eject_until=10.0, probe_up=None),
          BackendStatus("d", False)]
    early = decide(st, 9.9, 100.0, 0.0)
    assert [d.action for d in early.decisions[:3]] == [Action.KEEP_EJECTED] * 3
    assert early.decisions[0].reason == "ejected: 0.1 s of ejection left"
    late = decide(st, 10.0, 100.0, 0.0)
    assert [d.action for d in late.decisions[:3]] == [Action.READMIT, Action.KEEP_EJECTED,
                                                      Action.READMIT]
    assert late.decisions[1].reason == "ejected: waiting for probes to pass"
    assert late.decisions[2].reason == "re-admitted: ejection time over, no active probe"
    assert late.ejected == 1
