"""Load forecast: coefficients recovered from synthetic counts; the proxy-side forecaster."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from policies.base import PolicyContext
from policies.registry import create
from proxy.config import Forecast, Telemetry
from proxy.forecast import FORECAST_RPS, REPLICAS, ForecastError, LoadForecaster, load_coefficients
from proxy.telemetry import TelemetryRecorder
from tests.unit.learning_sim import ROUTES, Sim
from train.cli import main as train_main
from train.dataset import FileSpan, load_telemetry, run_spans
from train.forecast import Counts, ForecastTrainError, counts_from_telemetry, fit_forecast


def ar2_counts(a: float, b: float, c: float, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = [100.0, 110.0]
    for _ in range(n - 2):
        r.append(a + b * r[-1] + c * r[-2] + rng.normal(0, 2.0))
    return np.array(r)


def test_fit_recovers_coefficients() -> None:
    counts = ar2_counts(20.0, 0.6, 0.3, 3000)
    coef = fit_forecast(Counts.consecutive(counts), interval_s=10.0)
    assert coef.a == pytest.approx(20.0, rel=0.1)
    assert coef.b == pytest.approx(0.6, abs=0.03)
    assert coef.c == pytest.approx(0.3, abs=0.03)
    assert coef.metrics is not None
    assert coef.metrics["validation_mae_requests"] < coef.metrics["persistence_mae_requests"]


def test_cli_writes_coefficients_the_proxy_reads(tmp_path: Path) -> None:
    counts = tmp_path / "counts.csv"
    rows = ar2_counts(10.0, 0.5, 0.4, 500, seed=1)
    counts.write_text("interval_end_s,requests\n" + "".join(
        f"{i * 5.0:.1f},{v:.0f}\n" for i, v in enumerate(rows)))
    out = tmp_path / "forecast.json"
    assert train_main(["forecast", "--counts", str(counts), "--interval-s", "5",
                       "--out", str(out)]) == 0
    coef = load_coefficients(out)
    assert coef.interval_s == 5.0 and coef.b == pytest.approx(0.5, abs=0.1)


def test_cli_refuses_a_fit_no_better_than_persistence(tmp_path: Path) -> None:
    """Flat counts through the training intervals, then a step: the fit does no better
    than carrying the last count forward (persistence) on the validation intervals, so
    nothing is written; like train latency against its EWMA, --force overrides."""
    counts = tmp_path / "counts.csv"
    rows = [100.0] * 40 + [1000.0] * 10  # the fit learns "flat", validation jumps
    counts.write_text("".join(f"{i * 5.0:.1f},{v:.0f}\n" for i, v in enumerate(rows)))
    out = tmp_path / "forecast.json"
    args = ["forecast", "--counts", str(counts), "--interval-s", "5", "--out", str(out)]
    assert train_main(args) == 1 and not out.exists()
    assert train_main([*args, "--force"]) == 0 and out.exists()


def test_forecaster_gauges_and_replicas(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"format": "foretell-forecast", "version": 1, "interval_s": 10.0,
                                "a": 50.0, "b": 0.5, "c": 0.25}))
    counts = tmp_path / "counts.csv"
    cfg = Forecast(enabled=True, coefficients_path=path, interval_s=10.0,
                   capacity_rps_per_replica=20.0, min_replicas=2, max_replicas=10,
                   counts_path=counts)
    f = LoadForecaster(cfg, wall=lambda: 123.0)
    for _ in range(1000):
        f.on_request()
    f.close_interval()  # R(t-1)=1000, R(t-2)=0 -> 50 + 500 = 550 per 10 s
    assert f.forecast_rps == pytest.approx(55.0)
    assert f.replicas == 3  # ceil(55 / 20)
    for _ in range(400):
        f.on_request()
    f.close_interval()  # 50 + 0.5*400 + 0.25*1000 = 500 -> 50 rps
    assert f.forecast_rps == pytest.approx(50.0)
    assert FORECAST_RPS._value.get() == pytest.approx(50.0)
    assert REPLICAS._value.get() == 3
    f.close_interval()  # 50 + 0 + 100 = 150 -> 15 rps -> 1 replica, min 2
    assert f.replicas == 2
    assert counts.read_text().splitlines() == ["123.000,1000", "123.000,400", "123.000,0"]


def test_forecaster_splits_intercept_across_workers(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"format": "foretell-forecast", "version": 1, "interval_s": 1.0,
                                "a": 100.0, "b": 1.0, "c": 0.0}))
    f = LoadForecaster(Forecast(enabled=True, coefficients_path=path, interval_s=1.0,
                                capacity_rps_per_replica=50.0), workers=4)
    for _ in range(25):
        f.on_request()
    f.close_interval()
    assert f.forecast_rps == pytest.approx(25 + 100 / 4)  # this worker's share
    assert f.replicas == 4  # (50 * 4 workers) / 50


def test_persistence_without_coefficients() -> None:
    f = LoadForecaster(Forecast(enabled=True, interval_s=2.0, capacity_rps_per_replica=1.0))
    for _ in range(10):
        f.on_request()
    f.close_interval()
    assert f.forecast_rps == pytest.approx(5.0) and f.replicas == 5


@pytest.mark.parametrize("content, message", [
    (None, "no such coefficients file"),
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a forecast coefficients file"),
    ('{"format": "foretell-forecast", "version": 2}', "version 2"),
    ('{"format": "foretell-forecast", "version": 1, "interval_s": 10, "a": 1, "b": "x", "c": 0}',
     "'b' must be a finite number"),
    ('{"format": "foretell-forecast", "version": 1, "interval_s": 5, "a": 1, "b": 1, "c": 0}',
     "fitted for 5 s intervals"),
])
def test_bad_coefficients_file_is_a_clear_error(tmp_path: Path, content: str | None,
                                               message: str) -> None:
    path = tmp_path / "f.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ForecastError, match=message) as exc:
        LoadForecaster(Forecast(enabled=True, coefficients_path=path, interval_s=10.0))
    assert str(path) in str(exc.value)


async def test_start_stop_closes_intervals() -> None:
    import asyncio

    f = LoadForecaster(Forecast(enabled=True, interval_s=0.05))
    await f.start()
    f.on_request()
    await asyncio.sleep(0.18)
    await f.stop()
    assert f.intervals >= 2


def test_counts_of_several_workers_are_summed_and_gaps_not_fitted_across(tmp_path: Path) -> None:
    from train.forecast import read_counts

    rows = ar2_counts(10.0, 0.5, 0.4, 400, seed=2)
    lines = []
    for i, v in enumerate(rows):
        end_s = 1000.0 + 5.0 * i + (3600.0 if i >= 200 else 0.0)  # an hour's gap at 200
        lines.append(f"{end_s:.3f},{round(v) - 7}")  # one worker with most of the load
        lines.append(f"{end_s + 0.04:.3f},7")  # another, writing a little later
    path = tmp_path / "counts.csv"
    path.write_text("\n".join(lines) + "\n")
    counts = read_counts(path, 5.0)
    assert counts.lines == 800 and len(counts.requests) == 400
    np.testing.assert_allclose(counts.requests, np.round(rows))
    assert not counts.follows[0] and not counts.follows[200] and counts.follows.sum() == 398
    coef = fit_forecast(counts, 5.0)
    assert coef.metrics is not None and coef.metrics["fitted_intervals"] == 396
    assert coef.b == pytest.approx(0.5, abs=0.1)
    with pytest.raises(ForecastTrainError, match=r"are the counts 2\.5 s apart"):
        fit_forecast(read_counts(path, 2.5), 2.5)  # every other interval missing


def test_replicas_come_from_the_summed_forecast_of_all_workers() -> None:
    """One worker carries 14 req/s, another none: 3 replicas at 5 req/s each, where the
    largest of the workers' own extrapolations (14 x 2 workers) would say 6."""
    from prometheus_client.core import GaugeMetricFamily

    from proxy.admin import fleet_replicas
    from proxy.forecast import REPLICAS_NAME

    cfg = Forecast(enabled=True, interval_s=2.0, capacity_rps_per_replica=5.0)
    families = [GaugeMetricFamily("foretell_forecast_requests_per_second", "", value=14.0),
                GaugeMetricFamily(REPLICAS_NAME, "", value=6.0),
                GaugeMetricFamily("foretell_other", "", value=1.0)]
    out = list(fleet_replicas(families, cfg))
    replicas = [f for f in out if f.name == REPLICAS_NAME]
    assert len(replicas) == 1 and replicas[0].samples[0].value == 3
    assert [f.name for f in out][:2] == ["foretell_forecast_requests_per_second", "foretell_other"]
    disabled = list(fleet_replicas(families, Forecast()))
    assert disabled == families  # untouched without forecasting


async def test_intervals_end_on_wall_clock_multiples(tmp_path: Path) -> None:
    import asyncio

    counts = tmp_path / "counts.csv"
    f = LoadForecaster(Forecast(enabled=True, interval_s=0.05, counts_path=counts))
    await f.start()
    await asyncio.sleep(0.18)
    await f.stop()
    ends = [float(line.split(",")[0]) for line in counts.read_text().splitlines()]
    assert len(ends) >= 2
    for end_s in ends:  # written with 3 decimals
        assert end_s == pytest.approx(round(end_s / 0.05) * 0.05, abs=1e-3)


async def test_telemetry_of_two_runs_an_hour_apart_leaves_the_hour_out(tmp_path: Path) -> None:
    """Two proxy runs (each a new recorder: its files start again at sequence 1), 30 s of
    16 req/s each, an hour apart: 2 x 29 whole 1 s intervals (each run's last one is
    partial), not 3600 intervals of zero requests between them. (Times in sixteenths of
    a second add up exactly in binary floating point.)"""
    sim = Sim(seed=3, fail_rate_b0=0.0)
    policy = create("round_robin", {}, PolicyContext(clock=sim.clock, route_classes=ROUTES))
    for run in range(2):
        sim.clock.t = 1000.0 + 3630.0 * run  # 30 s of requests, then an hour
        rec = TelemetryRecorder(Telemetry(enabled=True, path=tmp_path, sample_rate=1.0), ROUTES,
                                worker_id=0, rng=random.Random(run), clock=sim.clock,
                                wall=sim.clock)
        await rec.start()
        sim.run(policy, 480, dt_s=0.0625, recorder=rec)
        await rec.stop()
    counts = counts_from_telemetry(load_telemetry(tmp_path), interval_s=1.0)
    assert len(counts.requests) == 58
    assert np.all(counts.requests == 16)
    assert list(np.flatnonzero(~counts.follows)) == [0, 29]


def test_a_process_covers_the_time_between_its_rotated_files() -> None:
    spans = run_spans([
        FileSpan(0, opened_s=0.0, first_s=0.0, last_s=10.0, seq=1),
        # Rotated (sequence 2): the quiet 2 s before its first decision were recorded.
        FileSpan(0, opened_s=12.0, first_s=12.0, last_s=20.0, seq=2),
        FileSpan(0, opened_s=100.0, first_s=100.0, last_s=110.0, seq=1),  # restart
        # Sequence 3 of that process, its 2 lost: the time between is not known.
        FileSpan(0, opened_s=130.0, first_s=130.0, last_s=140.0, seq=3),
        FileSpan(1, opened_s=5.0, first_s=5.0, last_s=25.0, seq=1),  # worker 1
    ])
    assert spans == [(0.0, 25.0), (100.0, 110.0), (130.0, 140.0)]
