"""Off-policy estimates against a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from policies.features import ERROR_RATE, EWMA
from proxy.telemetry import RECORD_DTYPE
from train.dataset import LoadReport, Telemetry
from train.evaluate import EvaluateError, off_policy


def logged(n_decisions: int, propensity: float | None, seed: int = 0) -> Telemetry:
    """4 candidates per decision; backend k answers in 10*(k+1) ms +-10%; the logger
    chose uniformly at random (propensity 0.25) or reported nothing."""
    rng = np.random.default_rng(seed)
    rec = np.zeros(n_decisions * 4, dtype=RECORD_DTYPE)
    for d in range(n_decisions):
        rows = rec[d * 4:(d + 1) * 4]
        rows["decision_id"] = d
        rows["time_s"] = d
        rows["n_ready"] = 4
        rows["backend"] = [b"b0", b"b1", b"b2", b"b3"]
        rows["features"][:, EWMA] = [10.0, 20.0, 30.0, 40.0]
        a = int(rng.integers(4))
        rows["chosen"][a] = 1
        rows["propensity"] = np.nan if propensity is None else propensity
        rows["status"] = 200
        rows["latency_s"] = 0.01 * (a + 1) * rng.uniform(0.9, 1.1)
    return Telemetry(rec, [], [1.0], LoadReport())


def test_ips_and_dr_recover_the_target_policy_latency() -> None:
    data = logged(4000, 0.25)
    est = off_policy(data, lambda x: x[:, EWMA])  # a model that knows: picks b0 (10 ms)
    assert est.logged_mean_ms == pytest.approx(25.0, rel=0.05)
    assert est.ips_ms == pytest.approx(10.0, rel=0.1)
    assert est.snips_ms == pytest.approx(10.0, rel=0.03)
    assert est.dr_ms == pytest.approx(10.0, rel=0.03)
    assert est.match_rate == pytest.approx(0.25, abs=0.03)
    assert est.effective_sample_size == pytest.approx(1000, rel=0.1)
    # A model that gets it backwards picks b3 (40 ms).
    worse = off_policy(data, lambda x: -x[:, EWMA])
    assert worse.snips_ms == pytest.approx(40.0, rel=0.03)


def test_failure_penalty_and_cost() -> None:
    data = logged(2000, 0.25, seed=1)
    rec = data.records
    b0 = rec["backend"] == b"b0"
    rec["features"][b0, ERROR_RATE] = 1.0  # b0 is known to fail...
    fails = np.isin(rec["decision_id"], rec["decision_id"][b0 & (rec["chosen"] == 1)])
    rec["status"][fails] = 500  # ...and does
    est = off_policy(data, lambda x: x[:, EWMA], failure_penalty_ms=1000.0,
                     failure_cost_ms=1000.0)
    assert est.snips_ms == pytest.approx(20.0, rel=0.05)  # the penalty steers it to b1
    blind = off_policy(data, lambda x: x[:, EWMA], failure_penalty_ms=0.0)
    assert blind.snips_ms == pytest.approx(1000.0, rel=0.01)


def test_needs_logged_propensities() -> None:
    with pytest.raises(EvaluateError, match="no propensities"):
        off_policy(logged(100, None), lambda x: x[:, EWMA])


def test_a_logger_that_never_explored_is_refused_and_a_partial_one_warned() -> None:
    """Propensity 1: the logger's choice was certain, other backends' outcomes unseen."""
    with pytest.raises(EvaluateError, match="never explored"):
        off_policy(logged(100, 1.0), lambda x: x[:, EWMA])
    data = logged(1000, 0.25)
    first = data.records["decision_id"] < 200
    data.records["propensity"][first] = 1.0  # 200 decisions logged without exploring
    est = off_policy(data, lambda x: x[:, EWMA])
    chosen = data.records[first & (data.records["chosen"] == 1)]
    assert est.unsupported == int((chosen["backend"] != b"b0").sum()) > 100
    assert any(f"on {est.unsupported} of 1000 decisions" in w for w in est.warnings())
    assert not off_policy(logged(1000, 0.25), lambda x: x[:, EWMA]).unsupported
