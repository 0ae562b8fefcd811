"""End to end, seconds long: fleet processes, the proxy process, the load generator, the report.

A shrunken skew scenario (4 backends, one 4x slower, 3 s of load) run for
round robin and peak-EWMA exactly as `foretell bench run` runs them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench import report, runner, scenarios
from bench.cli import main as bench_main


def _tiny_skew() -> scenarios.Scenario:
    sc = scenarios.get("skew")
    backends = [*sc.backends[:3], dataclasses.replace(sc.backends[3], speed=4.0)]
    return dataclasses.replace(sc, backends=tuple(backends), quick_duration_s=3.0, warmup_s=0.5,
                               quick_utilisations=(0.5,))


def test_bench_run_end_to_end(tmp_path: Path) -> None:
    sc = _tiny_skew()
    # Shadow health: the latency detector would eject b3 and hide the policies' difference.
    plans = runner.plan([sc], ["round_robin", "p2c_peak_ewma"], quick=True, repeats=1,
                        health="shadow")
    lines: list[str] = []
    results = runner.run_all(plans, tmp_path, lines.append,
                             partial=lambda rs: runner.write_results(rs, tmp_path, {}))
    assert len(results) == 2, lines
    failed = [r for r in results if "failed" in r]
    assert not failed, failed
    offered = sc.rate_rps(0.5)
    for r in results:
        # Every request got a verdict; nearly all succeeded at half load.
        assert r["requests"] == pytest.approx(offered * 2.5, rel=0.25)
        assert r["error_rate"] < 0.05
        assert r["p50_ms"] > 20.0  # the fleet's 40 ms service time is really slept
        assert sum(r["backend_share"].values()) == pytest.approx(1.0, abs=0.02)
        assert r["proxy_cpu_us_per_req"] > 0
    rr = next(r for r in results if r["policy"] == "round_robin")
    ewma = next(r for r in results if r["policy"] == "p2c_peak_ewma")
    # Round robin gives the slow backend its full quarter; peak-EWMA sends it less.
    assert rr["backend_share"]["b3"] == pytest.approx(0.25, abs=0.03)
    assert ewma["backend_share"]["b3"] < rr["backend_share"]["b3"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 2
    plots = report.plot(results, tmp_path / "plots")
    assert [p.name for p in plots] == ["skew-u50.png"] and plots[0].stat().st_size > 10_000
    assert "| p2c_peak_ewma |" in report.markdown_table(report.aggregate(results))


def test_cli_rejects_unknown_scenario_and_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["run", "--scenario", "nope", "--out", "/nonexistent"]) == 2
    assert "unknown scenario" in capsys.readouterr().err
    assert bench_main(["run", "--scenario", "skew", "--policies", "no_such_policy"]) == 2
    assert "no_such_policy" in capsys.readouterr().err


def test_cli_refuses_a_model_the_proxy_would_not_load(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Before any run: the table would show the fallback's routing under the model's name."""
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    options = json.dumps({"onnx_latency": {"model_path": str(bad)}})
    assert bench_main(["run", "--scenario", "skew", "--quick", "--policies", "onnx_latency",
                       "--policy-options", options, "--out", str(tmp_path / "out")]) == 2
    assert "would not load it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


async def test_overhead_reads_the_cyclic_gc_work_from_foretells_metrics(start_proxy) -> None:
    """`bench overhead` divides what the proxy's cyclic GC freed by the requests: the
    counter it reads moves by the cyclic garbage collected (here the test's own: the
    proxy runs in this process)."""
    import asyncio
    import gc

    from bench.overhead import gc_collected
    from tests.support import proxy_config

    proxy = await start_proxy(proxy_config({"a": "http://127.0.0.1:9"}))
    url = proxy.admin_url + "/metrics"
    gc.collect()
    before = await asyncio.to_thread(gc_collected, url)
    for generation in (0, 2):  # counted per generation: the sum is read
        for _ in range(500):
            cycle: list[object] = []
            cycle.append(cycle)
        del cycle  # else the last cycle is still referenced: 499 collected, not 500
        gc.collect(generation)
    after = await asyncio.to_thread(gc_collected, url)
    assert after - before >= 1000
