"""bench.runner / bench.report / bench.scenarios: plans, configs and summaries (no processes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench import report, runner, scenarios
from bench.loadgen import ERR_DEADLINE, ERR_NONE, Records
from proxy.config import parse_config


def test_every_scenario_is_declared_with_its_code_and_capacity() -> None:
    codes = [s.code for s in scenarios.SCENARIOS.values()]
    assert codes == [f"S{i}" for i in range(8)]
    assert scenarios.get("S1").name == "skew"
    assert scenarios.get("skew").backends[6].speed == 4.0
    assert scenarios.get("two_proxies").proxies == 2
    # 8 backends x 2 slots / 40 ms = 400 req/s; skew: 6 x 50 + 2 x 12.5.
    assert scenarios.get("homogeneous").capacity_rps() == pytest.approx(400.0)
    assert scenarios.get("skew").capacity_rps() == pytest.approx(325.0)
    assert scenarios.get("bimodal").rate_rps(0.5) == pytest.approx(100.0)
    with pytest.raises(KeyError, match="unknown scenario"):
        scenarios.get("nope")


def test_plan_interleaves_policies_and_rotates_per_repeat() -> None:
    sc = scenarios.get("homogeneous")
    plans = runner.plan([sc], ["a", "b", "c"], quick=False, repeats=2)
    assert len(plans) == len(sc.utilisations) * 2 * 3
    first = [p.policy for p in plans[:6]]
    assert first == ["a", "b", "c", "b", "c", "a"]
    assert {p.seed for p in plans[:3]} == {1} and {p.seed for p in plans[3:6]} == {2}
    quick = runner.plan([sc], ["a"], quick=True, repeats=1)
    assert [p.utilisation for p in quick] == list(sc.quick_utilisations)
    assert quick[0].duration_s == sc.quick_duration_s


@pytest.mark.parametrize("name", ["homogeneous", "request_aware"])
@pytest.mark.parametrize("health", ["default", "shadow"])
def test_generated_proxy_config_is_valid(name: str, health: str) -> None:
    sc = scenarios.get(name)
    p = runner.plan([sc], ["round_robin"], quick=True, repeats=1, health=health)[0]
    urls = [(b.id, f"http://127.0.0.1:{9000 + i}") for i, b in enumerate(sc.backends)]
    cfg = parse_config(runner.proxy_config(p, urls, 8080, 9901))
    assert cfg.listen.port == 8080
    cluster = cfg.clusters["default"]
    assert [b.id for b in cluster.backends] == [b.id for b in sc.backends]
    assert cluster.policy.kind == "round_robin"
    assert cluster.health.latency.shadow is (health == "shadow")
    if name == "request_aware":
        assert cfg.route_classes() == ["search", "render", "api", "other"]


def test_a_labelled_policy_runs_its_kind_with_its_own_options_on_top() -> None:
    sc = scenarios.get("homogeneous")
    options = {"p2c_peak_ewma": {"failure_penalty": 5.0, "slow_start_s": 10.0},
               "p2c_peak_ewma@no_penalty": {"failure_penalty": 0.0}}
    plain, labelled = runner.plan([sc], ["p2c_peak_ewma", "p2c_peak_ewma@no_penalty"], quick=True,
                                  repeats=1, policy_options=options)
    assert labelled.policy == "p2c_peak_ewma@no_penalty"  # its name in tables and results
    assert plain.policy_options == {"failure_penalty": 5.0, "slow_start_s": 10.0}
    assert labelled.policy_options == {"failure_penalty": 0.0, "slow_start_s": 10.0}
    urls = [(b.id, f"http://127.0.0.1:{9000 + i}") for i, b in enumerate(sc.backends)]
    policy = parse_config(runner.proxy_config(labelled, urls, 8080, 9901)).clusters["default"].policy
    assert policy.kind == "p2c_peak_ewma"


def test_each_scenario_gets_its_own_model_and_telemetry_directory() -> None:
    plans = runner.plan([scenarios.get("gray"), scenarios.get("skew")], ["onnx_latency"], quick=True,
                        repeats=1,
                        policy_options={"onnx_latency": {"model_path": "/m/{scenario}.onnx"}},
                        extra_config={"telemetry": {"enabled": True, "path": "/tel/{scenario}"}})
    assert [p.policy_options["model_path"] for p in plans] == ["/m/gray.onnx", "/m/skew.onnx"]
    assert [p.extra_config["telemetry"]["path"] for p in plans] == ["/tel/gray", "/tel/skew"]


def _records(n: int, slow_every: int) -> Records:
    intended = np.linspace(0.0, 10.0, n, endpoint=False)
    latency = np.full(n, 0.010)
    latency[::slow_every] = 2.0
    error = np.full(n, ERR_NONE, dtype=np.int8)
    error[::slow_every] = ERR_DEADLINE
    status = np.where(error == ERR_NONE, 200, 0).astype(np.int32)
    return Records(intended_s=intended, latency_s=latency, send_lag_s=np.zeros(n), status=status,
                   error=error, backend=(np.arange(n) % 2).astype(np.int16),
                   route=np.zeros(n, dtype=np.int16), backend_ids=["b1", "b0"], routes=["/api"])


def test_summary_counts_deadlines_as_errors_at_the_deadline_and_skips_warmup() -> None:
    sc = dataclasses.replace(scenarios.get("homogeneous"), warmup_s=2.0, deadline_s=2.0)
    p = runner.RunPlan(sc, 0.5, "round_robin", 0, duration_s=10.0, seed=1)
    s = runner.summarise(_records(1000, slow_every=50), p, proxy_cpu_s=0.5, n_sent=1000)
    assert s["requests"] == 800
    assert s["error_rate"] == pytest.approx(0.02)
    assert s["p50_ms"] == pytest.approx(10.0)
    assert s["p999_ms"] == pytest.approx(2000.0)
    assert s["goodput_rps"] == pytest.approx(784 / 8.0)
    assert s["proxy_cpu_us_per_req"] == pytest.approx(500.0)
    assert list(s["backend_share"]) == ["b0", "b1"]
    assert s["backend_share"]["b0"] == pytest.approx(0.5)
    assert len(s["p99_over_time_ms"]) == 10


def test_report_table_has_one_row_per_policy_with_ratios_to_the_best_other() -> None:
    sc = scenarios.get("skew")
    runs = []
    for pol, slow in (("round_robin", 20), ("p2c_peak_ewma", 1000)):
        p = runner.RunPlan(sc, 0.7, pol, 0, duration_s=10.0, seed=1)
        runs.append(runner.summarise(_records(1000, slow), p, 0.1, 1000))
    rows = report.aggregate(runs)
    table = report.markdown_table(rows)
    assert "### S1 skew at 70% load" in table
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:]]
             for line in table.splitlines() if line.startswith(("| round_robin", "| p2c_peak_ewma"))}
    rr, pe = cells["round_robin"], cells["p2c_peak_ewma"]
    # p50, p99, p99.9, p50 ÷ best other, p99 ÷ best other: the same p50, a p99 far apart.
    assert rr[3] == pe[3] == "1.00"
    assert float(pe[4]) == pytest.approx(float(pe[1]) / float(rr[1]), abs=0.01)
    assert float(rr[4]) == pytest.approx(float(rr[1]) / float(pe[1]), rel=0.01, abs=0.01)
    assert float(pe[4]) < 1.0 < float(rr[4])
