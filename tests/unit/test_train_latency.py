"""Schema round trip: simulated traffic -> real TelemetryRecorder -> train -> ONNX ->
onnx_latency loads it -> same predictions as scikit-learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from policies.base import PolicyContext, RequestInfo
from policies.features import FEATURE_NAMES, SCHEMA_VERSION
from policies.onnx_latency import (
    CHECKSUM,
    REQUIRED_METADATA,
    ModelError,
    OnnxLatency,
    checksum_entry,
    load_model,
)
from policies.registry import create
from proxy.config import Telemetry
from proxy.telemetry import (
    SUFFIX,
    TelemetryRecorder,
    encode_header,
    header_for,
    record_dtype,
)
from tests.unit.learning_sim import ROUTES, Sim
from train.cli import main as train_main
from train.dataset import DatasetError, load_telemetry
from train.latency import TrainError, train_latency


async def collect(directory: Path, n: int, seed: int, epsilon: float = 0.3) -> Sim:
    sim = Sim(seed=seed)
    ctx = PolicyContext(clock=sim.clock, rng=random.Random(seed), route_classes=ROUTES)
    policy = create("explore", {"base": "p2c_peak_ewma", "epsilon": epsilon}, ctx)
    # Decision times on the simulated clock, so decision time + latency = completion time.
    rec = TelemetryRecorder(Telemetry(enabled=True, path=directory, sample_rate=1.0), ROUTES,
                            worker_id=0, rng=random.Random(seed + 1), clock=sim.clock,
                            wall=sim.clock)
    await rec.start()
    sim.run(policy, n, recorder=rec)
    await rec.stop()
    return sim


@pytest.fixture(scope="module")
def telemetry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import asyncio

    d = tmp_path_factory.mktemp("telemetry")
    asyncio.run(collect(d, 2500, seed=1))
    return d


def test_round_trip_train_export_load_parity(telemetry_dir: Path, tmp_path: Path) -> None:
    data = load_telemetry(telemetry_dir)
    out = tmp_path / "models" / "latency.onnx"
    lines: list[str] = []
    result = train_latency(data, out, candidates=("ridge", "mlp"), max_inference_us=1e6,
                           progress=lines.append)
    assert out.exists() and result.written == out
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed away
    assert result.chosen.val_mae < 0.7 * result.ewma_mae
    assert any("parity" in line for line in lines)
    model = load_model(out)
    assert model.metadata["foretell.schema_version"] == str(SCHEMA_VERSION)
    assert json.loads(model.metadata["foretell.feature_names"]) == list(FEATURE_NAMES)
    assert model.route_classes == list(ROUTES)
    window = json.loads(model.metadata["foretell.training_window"])
    assert window["train_rows"] > 0 and window["first_time_s"] <= window["last_time_s"]
    assert json.loads(model.metadata["foretell.validation"])["mae_ms"] == pytest.approx(
        result.chosen.val_mae)
    # The policy's own feature path + inference equals scikit-learn on the same rows.
    sim = Sim(seed=5)
    sim.run(create("p2c_peak_ewma", {}, PolicyContext(clock=sim.clock)), 300)
    policy = OnnxLatency(OnnxLatency.Options(model_path=out),
                         PolicyContext(clock=sim.clock, route_classes=ROUTES))
    x = policy._features.prepare(sim.cluster.ready(), RequestInfo(route_class="slow")).copy()
    served = policy.model.predict(x).copy()  # type: ignore[union-attr]
    np.testing.assert_allclose(served, result.chosen.model.predict(x), rtol=1e-4, atol=1e-3)


def test_learned_policy_beats_heuristic_in_simulation(telemetry_dir: Path, tmp_path: Path) -> None:
    data = load_telemetry(telemetry_dir)
    out = tmp_path / "m.onnx"
    train_latency(data, out, candidates=("ridge",), target="latency", max_inference_us=1e6,
                  progress=lambda m: None)
    means = {}
    for kind, options in (("p2c_peak_ewma", {}), ("onnx_latency", {"model_path": str(out)})):
        sim = Sim(seed=9)  # evaluation seed differs from the training seed
        policy = create(kind, options, PolicyContext(clock=sim.clock, rng=random.Random(3),
                                                     route_classes=ROUTES))
        means[kind] = float(np.mean(sim.run(policy, 1500)))
    assert means["onnx_latency"] < 0.7 * means["p2c_peak_ewma"]


async def test_refuses_model_worse_than_ewma_unless_forced(tmp_path: Path) -> None:
    # Constant latency per backend: the EWMA predictor is exact, a model cannot beat it.
    sim = Sim(seed=2, fail_rate_b0=0.0)
    sim.latency_s = lambda i, route, inflight: 0.002 * (i + 1)  # type: ignore[method-assign]
    ctx = PolicyContext(clock=sim.clock, rng=random.Random(2), route_classes=ROUTES)
    rec = TelemetryRecorder(Telemetry(enabled=True, path=tmp_path, sample_rate=1.0), ROUTES, 0,
                            clock=sim.clock, wall=sim.clock)
    await rec.start()
    sim.run(create("explore", {"base": "p2c_peak_ewma", "epsilon": 0.5}, ctx), 600, recorder=rec)
    await rec.stop()
    data = load_telemetry(tmp_path)
    out = tmp_path / "m.onnx"
    with pytest.raises(TrainError, match="not better than the EWMA"):
        train_latency(data, out, candidates=("hgb",), target="latency", max_inference_us=1e6,
                      progress=lambda m: None)
    assert not out.exists()
    train_latency(data, out, candidates=("hgb",), target="latency", max_inference_us=1e6,
                  force=True, progress=lambda m: None)
    assert out.exists()


def test_mixed_schema_is_refused_and_reported(telemetry_dir: Path, tmp_path: Path) -> None:
    import shutil

    for f in telemetry_dir.glob(f"*{SUFFIX}"):
        shutil.copy(f, tmp_path / f.name)
    header = header_for(ROUTES, 0, 1.0, 0.0)
    dtype = record_dtype(5)
    header.update(schema_version=SCHEMA_VERSION - 1, feature_names=[f"f{i}" for i in range(5)],
                  dtype=np.lib.format.dtype_to_descr(dtype))
    old = tmp_path / f"old-schema{SUFFIX}"
    old.write_bytes(encode_header(header) + np.zeros(3, dtype=dtype).tobytes())
    with pytest.raises(DatasetError, match="refusing to mix schemas"):
        load_telemetry(tmp_path)
    data = load_telemetry(tmp_path, skip_other_schemas=True)
    assert any("skipped old-schema.ftel: schema version" in line for line in data.report.lines())
    assert train_main(["latency", "--data", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert not (tmp_path / "x.onnx").exists()


def test_cli_latency_and_evaluate(telemetry_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "latency.onnx"
    assert train_main(["latency", "--data", str(telemetry_dir), "--out", str(out),
                       "--candidates", "ridge", "--target", "latency",
                       "--max-inference-us", "1000000"]) == 0
    assert out.exists()
    js = tmp_path / "est.json"
    assert train_main(["evaluate", "--model", str(out), "--data", str(telemetry_dir),
                       "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "doubly robust" in printed and "logged policy, actual" in printed
    assert "warning" not in printed  # epsilon 0.3: enough decisions carry weight
    est = json.loads(js.read_text())
    # The logger explored (epsilon 0.3 over p2c): the model should look better than it.
    assert est["dr_ms"] < est["logged_mean_ms"]
    assert train_main(["evaluate", "--model", str(tmp_path / "missing.onnx"),
                       "--data", str(telemetry_dir)]) == 2


def test_herding_check_flags_models_faster_when_busier() -> None:
    from policies.features import EWMA, INFLIGHT, N_FEATURES
    from train.latency import herding_rate, with_inflight

    rng = np.random.default_rng(0)
    x = rng.random((200, N_FEATURES)).astype(np.float32) * 10
    busier = with_inflight(x, 4.0)
    assert np.allclose(busier[:, INFLIGHT], x[:, INFLIGHT] + 4)
    assert np.allclose(busier[:, FEATURE_NAMES.index("ewma_cost_ms")],
                       x[:, EWMA] * (x[:, INFLIGHT] + 5), rtol=1e-5)
    assert herding_rate(lambda z: z[:, INFLIGHT] * 3.0 + 1.0, x) == 0.0
    assert herding_rate(lambda z: 100.0 - z[:, INFLIGHT], x) == 1.0


def test_ewma_baseline_is_causal() -> None:
    """A row sees only outcomes completed by its decision time, in completion order.

    The old baseline updated with each row's outcome in decision order, so row 1 (decided
    while row 0 was still in flight) was "predicted" from row 0's latency.
    """
    from train.latency import ewma_predictions, leaky_ewma_predictions

    backend = np.array([b"a", b"b", b"a", b"a", b"b", b"a"])
    decided_s = np.array([0.000, 0.001, 0.010, 0.050, 0.060, 0.200])
    y_ms = np.array([100.0, 1.0, 10.0, 30.0, 2.0, 5.0])
    done_s = decided_s + y_ms / 1e3  # a: 0.100, b: 0.002, a: 0.020, a: 0.080, b: 0.062
    start_ms = np.array([40.0, 7.0, 41.0, 42.0, 8.0, 43.0])  # logged peak-EWMA per row
    causal = ewma_predictions(backend, y_ms, start_ms, 1.0, decided_s, done_s)
    # row 2: a's only outcome (row 0) is still in flight -> its logged EWMA;
    # row 3: row 2 completed at 0.020; row 5: rows 2, 3, 0 completed in that order -> 100.
    np.testing.assert_allclose(causal, [40.0, 7.0, 41.0, 10.0, 1.0, 100.0])
    leaky = leaky_ewma_predictions(backend, y_ms, start_ms, 1.0)
    np.testing.assert_allclose(leaky, [40.0, 7.0, 100.0, 10.0, 1.0, 30.0])
    half = ewma_predictions(backend, y_ms, start_ms, 0.5, decided_s, done_s)
    # a at row 5: 41 -> (row 2) 25.5 -> (row 3) 27.75 -> (row 0) 63.875
    assert half[5] == pytest.approx(63.875)


def test_log_target_and_l1_boosting_export_with_parity(telemetry_dir: Path,
                                                       tmp_path: Path) -> None:
    import onnx

    from train.latency import sk_ms

    data = load_telemetry(telemetry_dir)
    for kind, target in (("ridge", "log_latency"), ("hgb_l1", "latency"), ("hgb", "log_ratio")):
        out = tmp_path / f"{kind}-{target}.onnx"
        lines: list[str] = []
        result = train_latency(data, out, candidates=(kind,), target=target, force=True,
                               max_inference_us=1e6, progress=lines.append)
        assert result.chosen.target == target and result.chosen.kind == kind
        assert "ewma_per_backend_leaky" in result.baselines
        model = load_model(out)
        assert model.metadata["foretell.fit_target"] == target
        x = data.chosen()["features"][-200:].astype(np.float32)
        # What the policy computes from the file equals the fitted model in ms.
        np.testing.assert_allclose(model.predict_ms(x), sk_ms(result.chosen.model, x, target),
                                   rtol=1e-3, atol=1e-2)
        if target.startswith("log_"):
            ops = [n.op_type for n in onnx.load(out).graph.node]
            assert ops[-2:] == ["Clip", "Exp"]


def test_no_part_of_a_trained_model_file_serves(telemetry_dir: Path, tmp_path: Path) -> None:
    """A file cut short (a copy or a write interrupted) loses its metadata first: ONNX
    stores it after the graph. Every prefix of a trained model is refused, but the one
    that drops only the checksum (the file as trainers wrote it before the checksum)."""
    data = load_telemetry(telemetry_dir)
    out = tmp_path / "latency.onnx"
    train_latency(data, out, candidates=("ridge",), target="latency", force=True,
                  max_inference_us=1e6, progress=lambda _line: None)
    whole = out.read_bytes()
    model = load_model(out)
    assert model.route_classes == list(ROUTES)
    entry = checksum_entry(model.metadata[CHECKSUM])
    assert whole.endswith(entry)
    expected = {k: model.metadata[k] for k in REQUIRED_METADATA}
    cut = tmp_path / "cut.onnx"
    accepted = []
    for n in range(len(whole)):
        cut.write_bytes(whole[:n])
        try:
            served = load_model(cut)
        except ModelError:
            continue
        accepted.append(n)
        assert {k: served.metadata.get(k) for k in REQUIRED_METADATA} == expected
    assert accepted == [len(whole) - len(entry)]


def test_a_damaged_model_file_is_refused_by_its_checksum(telemetry_dir: Path,
                                                        tmp_path: Path) -> None:
    """One bit of a weight flipped: the file still parses and runs, with another weight."""
    import onnx

    data = load_telemetry(telemetry_dir)
    out = tmp_path / "latency.onnx"
    train_latency(data, out, candidates=("ridge",), target="latency", force=True,
                  max_inference_us=1e6, progress=lambda _line: None)
    whole = bytearray(out.read_bytes())
    regressor = next(n for n in onnx.load(out).graph.node if n.op_type == "LinearRegressor")
    coefficients = next(a.floats for a in regressor.attribute if a.name == "coefficients")
    at = whole.find(np.float32(coefficients[0]).tobytes())
    assert at > 0
    whole[at] ^= 0x10  # the mantissa's low bits: still a finite weight
    out.write_bytes(bytes(whole))
    with pytest.raises(ModelError, match=rf"latency\.onnx: the file does not match its {CHECKSUM}"):
        load_model(out)


def test_atomic_write_gives_the_umask_mode_not_mkstemps(tmp_path: Path) -> None:
    """A proxy running as another user must be able to read what the trainer wrote."""
    import os

    from train.atomic import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "m.onnx", b"x")
        os.umask(0o077)
        atomic_write(tmp_path / "private.onnx", b"y")
    finally:
        os.umask(old)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.onnx").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "private.onnx"]


def test_evaluate_warns_when_few_decisions_carry_the_weights() -> None:
    from dataclasses import replace

    from train.evaluate import Estimate

    est = Estimate(decisions=4090, skipped_no_propensity=0, unsupported=0, logged_mean_ms=10.0,
                   logged_p50_ms=9.0, logged_p99_ms=30.0, ips_ms=8.0, snips_ms=8.0, dm_ms=8.5,
                   dr_ms=8.1, match_rate=0.9, effective_sample_size=40.0, target_p50_ms=7.0,
                   target_p99_ms=20.0)
    assert any(line.startswith("warning:") and "~40 of 4090" in line for line in est.lines())
    assert not replace(est, effective_sample_size=800.0).warnings()
    assert replace(est, decisions=100_000, effective_sample_size=800.0).warnings()  # < 2%


def test_a_slow_moment_while_timing_one_candidate_does_not_decide(
        telemetry_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each session's first timing comes out at 50 µs (a busy moment), later rounds at
    5 µs: the least of the rounds counts, so both candidates stay eligible. (Fixed
    timings: what is tested is the choice, not this machine's speed.)"""
    import train.latency as tl

    timed: set[int] = set()

    def first_one_slow(session: object, x16: np.ndarray, runs: int = 1500) -> float:
        if id(session) not in timed:
            timed.add(id(session))
            return 50.0
        return 5.0

    monkeypatch.setattr(tl, "inference_us", first_one_slow)
    lines: list[str] = []
    result = train_latency(load_telemetry(telemetry_dir), tmp_path / "m.onnx",
                           candidates=("ridge", "hgb"), target="latency",
                           max_inference_us=40.0, progress=lines.append)
    assert [r.inference_us for r in result.candidates] == [5.0, 5.0]
    assert any(line.startswith(f"inference, least of {tl.TIMING_ROUNDS} interleaved rounds")
               for line in lines)


@pytest.mark.parametrize("mode", ["ratio", "log_ratio"])
def test_a_ratio_target_is_not_forced_to_grow_with_inflight(mode: str) -> None:
    """latency / route_cost_ms falls as inflight grows when queueing is sublinear: a
    monotone constraint on inflight fought the target (validation MAE ~1.5-1.8x)."""
    from policies.features import EWMA, EWMA_COST, INFLIGHT, N_FEATURES, ROUTE_COST, ROUTE_EWMA
    from train.latency import RATIO_FLOOR_MS, candidate_for, fit_target, mae, sk_ms

    rng = np.random.default_rng(0)
    n, s = 20_000, 16_000
    x = np.zeros((n, N_FEATURES), np.float32)
    inflight = rng.integers(0, 12, n)
    ewma = rng.uniform(5, 40, n)
    x[:, INFLIGHT], x[:, EWMA], x[:, ROUTE_EWMA] = inflight, ewma, ewma
    x[:, EWMA_COST] = x[:, ROUTE_COST] = ewma * (inflight + 1)
    y = ewma * (1 + 0.3 * inflight) * rng.lognormal(0, 0.2, n)
    route_cost = np.maximum(x[:, ROUTE_COST].astype(np.float64), RATIO_FLOOR_MS)
    errors = {}
    for m in ("latency", mode):
        model = candidate_for("hgb", m, seed=0).fit(x[:s], fit_target(y, route_cost, m)[:s])
        errors[m] = mae(sk_ms(model, x[s:], m), y[s:])
    assert errors[mode] < 1.1 * errors["latency"], errors
