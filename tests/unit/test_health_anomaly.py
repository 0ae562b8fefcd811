"""The anomaly model end to end: record healthy windows, train, export, load, score, reload."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from prometheus_client import REGISTRY

import health.anomaly
from health.anomaly import (
    FEATURE_NAMES,
    RELOAD_FAILED,
    RELOAD_OK,
    SCHEMA_VERSION,
    AnomalyDetector,
    AnomalyModel,
    AnomalyModelError,
    WindowStats,
    fleet_features,
    load_feature_rows,
)
from health.base import Verdict
from health.checker import HealthChecker
from health.config import ActiveProbe, Anomaly, Ejection, HealthConfig
from proxy.state import Backend, Cluster, Health, Outcome
from tests.unit.file_support import CHMOD_NO_BAR, Unreadable
from tests.unit.health_support import Clock
from train.anomaly import fit_and_export

SPEEDS = [1.0, 1.3, 1.6, 1.9, 2.1, 2.4, 2.7, 3.0]


def simulate(det: AnomalyDetector, clock: Clock, rng: random.Random, seconds: float,
             slow: dict[str, float] | None = None, load: float = 1.0) -> None:
    """Exponential service times per backend speed; 20 ms steps, one evaluation per step."""
    slow = slow or {}
    for _ in range(int(seconds / 0.02)):
        clock.advance(0.02)
        for i, speed in enumerate(SPEEDS):
            b = f"b{i}"
            mean_s = 0.005 * speed * load * slow.get(b, 1.0)
            # Slower backends get proportionally less traffic, as a load-aware policy does.
            if rng.random() < 1.0 / speed:
                det.observe(b, Outcome(200, rng.expovariate(1 / mean_s)))
        det.evaluate(clock())


def cluster_of(clock: Callable[[], float], name: str = "c") -> Cluster:
    return Cluster(name, [Backend(f"b{i}", f"http://127.0.0.1:{9000 + i}")
                         for i in range(len(SPEEDS))], clock=clock)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("anomaly")
    rec = tmp / "healthy.jsonl"
    clock = Clock()
    rng = random.Random(7)
    det = AnomalyDetector(Anomaly(record_path=rec, interval_s=0.2), clock, cluster_of(clock),
                          lambda _b: None)
    for load in (0.7, 1.0, 1.5):  # several load levels: relative features must not care
        simulate(det, clock, rng, 40.0, load=load)
    rows = load_feature_rows([rec])
    assert rows.shape[1] == len(FEATURE_NAMES) and len(rows) > 1000
    out = tmp / "anomaly.onnx"
    trained = fit_and_export(rows, out, quantile=0.999, n_estimators=50, seed=0)
    assert trained.max_abs_diff < 1e-3
    return out


def test_model_metadata_and_threshold(model_path: Path) -> None:
    m = AnomalyModel(model_path)
    assert m.metadata["schema_version"] == SCHEMA_VERSION
    assert m.metadata["feature_names"].split(",") == list(FEATURE_NAMES)
    assert m.metadata["threshold_quantile"] == "0.999"
    assert 0.3 < m.threshold < 0.9


def test_the_model_file_gets_the_umask_mode_not_mkstemps(model_path: Path) -> None:
    """The proxy reading the model may run as another user (as for latency models)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert model_path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_fleet_features_are_relative_so_a_global_slowdown_is_not_anomalous() -> None:
    base = {f"b{i}": WindowStats(100, 0.01 * s, 0.02 * s, 0.03 * s, 0.0, 0.0, 2, 0.001, None)
            for i, s in enumerate(SPEEDS)}
    spiked = {b: WindowStats(s.requests, s.p50_s * 5, s.p90_s * 5, s.p99_s * 5, 0.0, 0.0, 10,
                             0.005, None) for b, s in base.items()}
    ids1, rows1 = fleet_features(base, 10)
    ids2, rows2 = fleet_features(spiked, 10)
    assert ids1 == ids2 and np.allclose(rows1, rows2, atol=1e-6)
    assert fleet_features(dict(list(base.items())[:2]), 10)[0] == []


def test_ten_times_slower_backend_scores_above_threshold(model_path: Path) -> None:
    clock = Clock()
    cluster = cluster_of(clock)
    det = AnomalyDetector(Anomaly(model_path=model_path, interval_s=0.2), clock, cluster,
                          lambda _b: None)
    rng = random.Random(99)
    simulate(det, clock, rng, 10.0, load=1.2)
    healthy = dict(det.scores)
    assert all(s <= det.model.threshold for s in healthy.values()), healthy  # type: ignore[union-attr]
    simulate(det, clock, rng, 5.0, slow={"b0": 10.0}, load=1.2)
    verdicts = {v.backend_id: v for v in det.evaluate(clock.advance(0.2))}
    assert verdicts["b0"].detected, verdicts["b0"].reason
    assert [b for b, v in verdicts.items() if v.detected] == ["b0"]


def simulate_request_aware(det: AnomalyDetector, clock: Clock, rng: random.Random,
                           seconds: float, slow: dict[str, float] | None = None) -> None:
    """Eight equal backends; request-aware routing gives b0 the renders (6x a search's
    cost), b1 every other render and a search otherwise, the rest searches only."""
    slow = slow or {}
    for step in range(int(seconds / 0.02)):
        clock.advance(0.02)
        for i in range(len(SPEEDS)):
            b = f"b{i}"
            route = "render" if i == 0 or (i == 1 and step % 2) else "search"
            mean_s = (0.030 if route == "render" else 0.005) * slow.get(b, 1.0)
            det.observe(b, Outcome(200, rng.expovariate(1 / mean_s), route_class=route))
        det.evaluate(clock())


@pytest.mark.parametrize("route_adjusted", [True, False])
def test_a_backend_given_the_expensive_route_is_not_anomalous(model_path: Path,
                                                             route_adjusted: bool) -> None:
    clock = Clock()
    det = AnomalyDetector(Anomaly(model_path=model_path, interval_s=0.2,
                                  route_adjusted=route_adjusted), clock, cluster_of(clock),
                          lambda _b: None)
    simulate_request_aware(det, clock, random.Random(5), 10.0)
    verdicts = {v.backend_id: v for v in det.evaluate(clock.advance(0.2))}
    detected = sorted(b for b, v in verdicts.items() if v.detected)
    # Raw, b0's renders are ~6x the fleet's searches (b1's half renders ~3.5x): anomalous
    # for their mix alone.
    assert detected == ([] if route_adjusted else ["b0", "b1"]), verdicts["b0"].reason


def test_a_slow_render_backend_is_still_anomalous_route_adjusted(model_path: Path) -> None:
    """b1's renders set the render reference, so b0 (most renders) 10x slower shows."""
    clock = Clock()
    det = AnomalyDetector(Anomaly(model_path=model_path, interval_s=0.2), clock,
                          cluster_of(clock), lambda _b: None)
    rng = random.Random(6)
    simulate_request_aware(det, clock, rng, 10.0)
    simulate_request_aware(det, clock, rng, 5.0, slow={"b0": 10.0})
    verdicts = {v.backend_id: v for v in det.evaluate(clock.advance(0.2))}
    assert [b for b, v in verdicts.items() if v.detected] == ["b0"]


def test_missing_and_invalid_model_files_are_clear_errors(tmp_path: Path) -> None:
    clock = Clock()
    missing = tmp_path / "nope.onnx"
    with pytest.raises(AnomalyModelError, match=r"nope\.onnx: anomaly model file not found"):
        HealthChecker(cluster_of(clock),
                      HealthConfig(anomaly=Anomaly(model_path=missing),
                                   active=ActiveProbe(enabled=False)), clock=clock)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx at all")
    with pytest.raises(AnomalyModelError, match=r"garbage\.onnx: not a loadable ONNX model"):
        AnomalyModel(garbage)


def test_wrong_schema_refused(model_path: Path, tmp_path: Path) -> None:
    m = onnx.load(str(model_path))
    for p in m.metadata_props:
        if p.key == "schema_version":
            p.value = "foretell-anomaly-0"
    bad = tmp_path / "old.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(AnomalyModelError, match="schema_version 'foretell-anomaly-0'"):
        AnomalyModel(bad)


async def test_reload_keeps_old_model_on_error_and_takes_a_good_one(
        model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    live = tmp_path / "live.onnx"
    live.write_bytes(model_path.read_bytes())
    clock = Clock()
    det = AnomalyDetector(Anomaly(model_path=live), clock, cluster_of(clock), lambda _b: None)
    old = det.model
    live.write_bytes(b"truncated")
    os.utime(live, ns=(1, 1))
    with caplog.at_level(logging.ERROR, logger="foretell.health"):
        assert await det.check_reload() == RELOAD_FAILED
    assert det.model is old
    assert "anomaly model reload failed, keeping the previous model" in caplog.text
    assert "live.onnx: not a loadable ONNX model" in caplog.text
    live.write_bytes(model_path.read_bytes())
    os.utime(live, ns=(2, 2))
    assert await det.check_reload() == RELOAD_OK and det.model is not old
    assert await det.check_reload() is None  # unchanged since


async def test_a_slow_model_load_neither_stalls_the_loop_nor_the_evaluations(
        model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose load takes 0.6 s (as a 400-tree forest's ~1 s): requests and health
    evaluations go on, with the old model, until the new one is swapped in."""
    live = tmp_path / "live.onnx"
    live.write_bytes(model_path.read_bytes())
    cluster = cluster_of(time.monotonic)
    cfg = HealthConfig(anomaly=Anomaly(model_path=live, interval_s=0.05),
                       active=ActiveProbe(enabled=False), ejection=Ejection(evaluate_interval_s=0.02))
    hc = HealthChecker(cluster, cfg)
    det = hc.anomaly
    assert det is not None and det.model is not None
    old = det.model
    load_span: list[float] = []

    class SlowModel(AnomalyModel):
        def __init__(self, path: Path) -> None:
            load_span.append(time.monotonic())
            time.sleep(0.6)  # holds its thread as building a big session does
            super().__init__(path)
            load_span.append(time.monotonic())

    monkeypatch.setattr(health.anomaly, "AnomalyModel", SlowModel)
    evaluated: list[tuple[float, object]] = []
    evaluate = det.evaluate

    def recording_evaluate(now: float) -> list[Verdict]:
        evaluated.append((time.monotonic(), det.model))
        return evaluate(now)

    det.evaluate = recording_evaluate  # type: ignore[method-assign]
    await hc.start()
    try:
        tmp = tmp_path / "new.onnx"
        tmp.write_bytes(model_path.read_bytes())
        os.utime(tmp, ns=(1, 1))
        os.replace(tmp, live)
        lag_s = 0.0
        deadline = time.monotonic() + 5.0
        while det.model is old and time.monotonic() < deadline:
            t0 = time.monotonic()
            await asyncio.sleep(0.005)
            lag_s = max(lag_s, time.monotonic() - t0 - 0.005)
    finally:
        await hc.stop()
    assert det.model is not old and len(load_span) == 2
    assert lag_s < 0.3, f"the event loop stalled {lag_s * 1e3:.0f} ms during a 600 ms load"
    during = [m for t, m in evaluated if load_span[0] < t < load_span[1]]
    assert len(during) >= 5 and all(m is old for m in during)


def with_threshold(model_path: Path, path: Path, threshold: float) -> Path:
    """The trained model with another threshold in its metadata, atomically in place."""
    m = onnx.load(str(model_path))
    for p in m.metadata_props:
        if p.key == "threshold":
            p.value = repr(threshold)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, path)
    return path


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_hot_reload_updates_the_threshold_gauge_and_failures_are_counted(
        model_path: Path, tmp_path: Path) -> None:
    live = tmp_path / "live.onnx"
    live.write_bytes(model_path.read_bytes())
    cfg = HealthConfig(anomaly=Anomaly(model_path=live, interval_s=0.02),
                       active=ActiveProbe(enabled=False))
    name = "anomaly-reload-metrics"

    def threshold() -> float | None:
        return REGISTRY.get_sample_value("foretell_health_anomaly_threshold", {"cluster": name})

    def reloads(result: str) -> float:
        value = REGISTRY.get_sample_value("foretell_health_anomaly_reloads_total",
                                          {"cluster": name, "result": result})
        return value or 0.0

    hc = HealthChecker(cluster_of(time.monotonic, name), cfg)
    det = hc.anomaly
    assert det is not None and det.model is not None
    assert threshold() == det.model.threshold
    first = det.model
    await hc.start()
    try:
        with_threshold(model_path, live, 0.6135)
        await until(lambda: det.model is not first)
        assert threshold() == 0.6135
        assert reloads("ok") == 2.0  # the start-up load and this one
        live.write_bytes(b"truncated")
        os.utime(live, ns=(1, 1))
        await until(lambda: reloads("failed") == 1.0)
        assert det.model.threshold == 0.6135 and threshold() == 0.6135
    finally:
        await hc.stop()


async def test_a_model_that_could_not_be_read_is_loaded_once_it_can(
        model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The file changed while unreadable, then becomes readable without changing (a chmod
    changes neither mtime, size nor inode): loaded at the next look, the failure logged
    and counted once."""
    live = tmp_path / "live.onnx"
    live.write_bytes(model_path.read_bytes())
    clock = Clock()
    det = AnomalyDetector(Anomaly(model_path=live), clock, cluster_of(clock), lambda _b: None)
    old = det.model
    blocked = Unreadable(monkeypatch, live)
    with_threshold(model_path, live, 0.6135)
    with caplog.at_level(logging.ERROR, logger="foretell.health"):
        results = [await det.check_reload() for _ in range(3)]
    assert results == [RELOAD_FAILED, None, None] and det.model is old
    assert caplog.text.count("anomaly model reload failed") == 1
    assert "live.onnx: cannot read anomaly model" in caplog.text
    blocked.on = False
    assert await det.check_reload() == RELOAD_OK
    assert det.model is not None and det.model.threshold == 0.6135
    assert await det.check_reload() is None


@CHMOD_NO_BAR
async def test_a_model_file_made_readable_by_chmod_is_loaded(model_path: Path,
                                                             tmp_path: Path) -> None:
    live = tmp_path / "live.onnx"
    live.write_bytes(model_path.read_bytes())
    clock = Clock()
    det = AnomalyDetector(Anomaly(model_path=live), clock, cluster_of(clock), lambda _b: None)
    tmp = tmp_path / "new.onnx"
    with_threshold(model_path, tmp, 0.6135)
    tmp.chmod(0)
    os.replace(tmp, live)
    assert await det.check_reload() == RELOAD_FAILED
    live.chmod(0o644)
    assert await det.check_reload() == RELOAD_OK
    assert det.model is not None and det.model.threshold == 0.6135


def test_checker_ejects_on_anomaly(model_path: Path) -> None:
    clock = Clock()
    cluster = cluster_of(clock)
    cfg = HealthConfig(anomaly=Anomaly(model_path=model_path, interval_s=0.2),
                       active=ActiveProbe(enabled=False),
                       latency={"enabled": False})  # type: ignore[arg-type]
    hc = HealthChecker(cluster, cfg, clock=clock)
    assert hc.anomaly is not None
    rng = random.Random(5)
    simulate(hc.anomaly, clock, rng, 5.0, load=1.0)
    hc.evaluate()
    assert all(s.health is Health.HEALTHY for s in cluster.states.values())
    for _ in range(40):
        simulate(hc.anomaly, clock, rng, 0.2, slow={"b3": 10.0})
        hc.evaluate()
        if cluster.get("b3").health is Health.EJECTED:
            break
    assert cluster.get("b3").health is Health.EJECTED
    assert cluster.get("b3").health_reason.startswith("ejected by anomaly: anomaly score")
    score = hc.describe("b3")["anomaly_score"]
    assert isinstance(score, float) and not math.isnan(score)
