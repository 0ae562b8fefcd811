"""onnx_latency: loading, hot reload, every fallback, exploration propensities, shadow mode."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client import REGISTRY

from policies.base import BackendView, PolicyContext, RequestInfo
from policies.explore import Explore
from policies.features import (
    EWMA,
    INFLIGHT,
    N_FEATURES,
    REQ_BODY,
    ROUTE0,
    ROUTE_COST,
    build,
    schema_metadata,
)
from policies.onnx_latency import (
    FALLBACKS,
    INFERENCE_ERROR,
    LOAD_ERROR,
    MISSING_FILE,
    OBSERVED_LOG_MAX,
    OVER_BUDGET,
    RELOADS,
    REQUIRED_METADATA,
    SCHEMA_MISMATCH,
    SHADOW,
    LoadedModel,
    ModelError,
    OnnxLatency,
    load_model,
)
from policies.registry import create
from proxy.state import Backend, Cluster, Outcome, Tracker
from tests.unit.file_support import CHMOD_NO_BAR, Unreadable
from tests.unit.learning_sim import ROUTES, FakeClock, Sim
from train.latency import make_candidate, to_onnx

REQ = RequestInfo(route_class="fast")


def trained_metadata(version: str = "v1") -> dict[str, str]:
    """The metadata the trainer writes that the policy requires (train/latency.py)."""
    return {**schema_metadata(ROUTES), "foretell.target": "latency_ms",
            "foretell.model_kind": "test", "foretell.model_version": version,
            "foretell.training_window": "{}", "foretell.validation": "{}"}


def linear_model(path: Path, weights: np.ndarray, bias: float = 1.0,
                 meta: dict[str, str] | None = None, version: str = "v1",
                 without: tuple[str, ...] = ()) -> Path:
    """A real linear regressor exported through the same path as training (`without`
    these metadata keys)."""
    from sklearn.linear_model import LinearRegression

    m = LinearRegression()
    m.coef_ = weights.astype(np.float64)
    m.intercept_ = bias
    m.n_features_in_ = N_FEATURES
    metadata = {**trained_metadata(version), **(meta or {})}
    for key in without:
        del metadata[key]
    path.write_bytes(to_onnx(m, metadata))
    return path


def inflight_model(path: Path, version: str = "v1") -> Path:
    w = np.zeros(N_FEATURES)
    w[INFLIGHT] = 10.0  # predicted latency grows with inflight: least-request behaviour
    return linear_model(path, w, version=version)


def count_rows(model: LoadedModel) -> list[int]:
    """The row count of every model run from now on (appended as they happen)."""
    rows_run: list[int] = []
    predict = model.predict

    def counting_predict(x: np.ndarray) -> np.ndarray:
        rows_run.append(x.shape[0])
        return predict(x)

    model.predict = counting_predict  # type: ignore[method-assign]
    return rows_run


def tree_model(path: Path) -> Path:
    """A real gradient-boosting model (onnxruntime's tree ensemble, not the numpy path):
    latency grows with inflight and the EWMA, and depends on the route."""
    rng = np.random.default_rng(0)
    x = rng.random((2000, N_FEATURES), dtype=np.float32)
    x[:, INFLIGHT] *= 8
    x[:, EWMA] *= 40
    y = 5.0 + 3.0 * x[:, INFLIGHT] + 0.5 * x[:, EWMA] + 4.0 * x[:, ROUTE0]
    model = make_candidate("hgb", seed=0).fit(x, y)
    path.write_bytes(to_onnx(model, trained_metadata()))
    return path


def fails_beyond_two_rows(path: Path) -> Path:
    """Valid for the trial run (2 rows), raises at inference with any other row count
    (a pick runs 2 rows per backend)."""
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, N_FEATURES])
    y = helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, N_FEATURES])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["features", "shape"], ["r"]),
         helper.make_node("ReduceSum", ["r", "axes"], ["variable"], keepdims=1)],
        "fails", [x], [y], initializer=[shape, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    helper.set_model_props(model, trained_metadata())
    path.write_bytes(model.SerializeToString())
    return path


def policy(sim: Sim, path: Path, seed: int = 0, **options: object) -> OnnxLatency:
    ctx = PolicyContext(clock=sim.clock, rng=random.Random(seed), cluster="t",
                        route_classes=ROUTES)
    p = create("onnx_latency", {"model_path": str(path), "min_history": 0, **options}, ctx)
    assert isinstance(p, OnnxLatency)
    return p


def count(reason: str) -> float:
    value: float = FALLBACKS.labels("t", reason)._value.get()
    return value


def test_model_routes_by_prediction(tmp_path: Path) -> None:
    sim = Sim(n_backends=3)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"))
    ready = sim.cluster.ready()
    with sim.cluster.track(ready[0]), sim.cluster.track(ready[2]):
        assert p.pick(ready, REQ) is ready[1]
    assert p.last_propensity == 1.0 and p.last_reason is None


def test_another_ready_list_is_priced_by_its_own_rows(tmp_path: Path) -> None:
    """Cached scores are rows of one ready list: a list in another order (a retry's
    subset, a health change) must not be priced with them."""
    sim = Sim(n_backends=3)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"))
    ready = sim.cluster.ready()
    b0, b1, b2 = ready
    for _ in range(8):  # b0 fails everything: its failure penalty prices it out
        with sim.cluster.track(b0) as t:
            t.finish(Outcome(500, 0.001, None, 0, "fast"))
    assert p.pick(ready, REQ) is b1  # scored for (b0, b1, b2); b1 before b2 on a tie
    with sim.cluster.track(b1):  # b1 busy: b2 is the one left
        assert p.pick((b2, b1, b0), REQ) is b2


def test_missing_file_falls_back_then_loads_when_it_appears(tmp_path: Path) -> None:
    import asyncio

    sim = Sim(n_backends=3)
    path = tmp_path / "m.onnx"
    p = policy(sim, path)
    before = count(MISSING_FILE)
    assert p.pick(sim.cluster.ready(), REQ) is not None
    assert p.last_reason == MISSING_FILE and count(MISSING_FILE) == before + 1
    inflight_model(path)
    assert asyncio.run(p.check_reload()) is True
    p.pick(sim.cluster.ready(), REQ)
    assert p.last_reason is None and p.model is not None


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b"\x08\x01garbage") and p, LOAD_ERROR),
    (lambda p: linear_model(p, np.zeros(N_FEATURES), meta={"foretell.schema_version": "999"}),
     SCHEMA_MISMATCH),
])
def test_bad_file_at_start_falls_back(tmp_path: Path, make: object, reason: str) -> None:
    sim = Sim(n_backends=3)
    path = tmp_path / "m.onnx"
    make(path)  # type: ignore[operator]
    p = policy(sim, path)
    assert p.model is None
    p.pick(sim.cluster.ready(), REQ)
    assert p.last_reason == reason


@pytest.mark.parametrize("key", REQUIRED_METADATA)
def test_a_model_without_metadata_the_trainer_writes_is_refused(tmp_path: Path, key: str) -> None:
    path = linear_model(tmp_path / "m.onnx", np.zeros(N_FEATURES), without=(key,))
    with pytest.raises(ModelError, match=rf"m\.onnx: no {key} in the model metadata") as refused:
        load_model(path)
    assert refused.value.reason == SCHEMA_MISMATCH


async def test_reload_good_then_corrupt_keeps_old(tmp_path: Path) -> None:
    sim = Sim(n_backends=3)
    path = inflight_model(tmp_path / "m.onnx", version="v1")
    p = policy(sim, path)
    assert p.model is not None and p.model.version == "v1"
    assert await p.check_reload() is False  # unchanged file
    tmp = tmp_path / "new.onnx"
    inflight_model(tmp, version="v2")
    os.replace(tmp, path)
    assert await p.check_reload() is True and p.model.version == "v2"
    failed_before = RELOADS.labels("t", "failed")._value.get()
    path.write_bytes(path.read_bytes()[:100])  # corrupt (a non-atomic writer)
    assert await p.check_reload() is False
    assert p.model.version == "v2"
    assert RELOADS.labels("t", "failed")._value.get() == failed_before + 1
    p.pick(sim.cluster.ready(), REQ)
    assert p.last_reason is None
    # A model of another schema is refused too, the old one keeps serving.
    linear_model(tmp, np.zeros(N_FEATURES), meta={"foretell.schema_version": "999"})
    os.replace(tmp, path)
    assert await p.check_reload() is False and p.model.version == "v2"


async def test_a_deleted_model_file_is_logged_once_and_the_model_keeps_serving(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sim = Sim(n_backends=2)
    path = inflight_model(tmp_path / "m.onnx")
    p = policy(sim, path)
    path.unlink()
    for _ in range(3):
        assert await p.check_reload() is False
    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1 and "keeping the current model" in gone[0].getMessage()
    p.pick(sim.cluster.ready(), REQ)
    assert p.model is not None and p.last_reason is None
    inflight_model(path, version="v2")  # back: loaded as any new file
    assert await p.check_reload() is True and p.model.version == "v2"


async def test_a_model_that_could_not_be_read_is_loaded_once_it_can(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The file changed while unreadable; then it becomes readable without changing (a
    chmod changes neither mtime, size nor inode): loaded at the next look, the failure
    logged and counted once."""
    sim = Sim(n_backends=2)
    path = inflight_model(tmp_path / "m.onnx", version="v1")
    p = policy(sim, path)
    blocked = Unreadable(monkeypatch, path)
    tmp = inflight_model(tmp_path / "new.onnx", version="v2")
    os.replace(tmp, path)
    failed = RELOADS.labels("t", "failed")._value.get()
    for _ in range(3):
        assert await p.check_reload() is False
    assert p.model is not None and p.model.version == "v1"
    refused = [r.getMessage() for r in caplog.records if "model reload refused" in r.getMessage()]
    assert len(refused) == 1 and "m.onnx: cannot read" in refused[0], refused
    assert RELOADS.labels("t", "failed")._value.get() == failed + 1
    blocked.on = False
    assert await p.check_reload() is True and p.model.version == "v2"
    assert await p.check_reload() is False


@CHMOD_NO_BAR
async def test_a_model_file_made_readable_by_chmod_is_loaded(tmp_path: Path) -> None:
    sim = Sim(n_backends=2)
    path = inflight_model(tmp_path / "m.onnx", version="v1")
    p = policy(sim, path)
    tmp = inflight_model(tmp_path / "new.onnx", version="v2")
    tmp.chmod(0)
    os.replace(tmp, path)
    assert await p.check_reload() is False and p.model is not None and p.model.version == "v1"
    path.chmod(0o644)
    assert await p.check_reload() is True and p.model.version == "v2"


def active(cluster: str = "t") -> float | None:
    return REGISTRY.get_sample_value("foretell_model_active", {"cluster": cluster})


def test_the_active_gauge_is_one_exactly_while_the_model_routes(tmp_path: Path) -> None:
    sim = Sim(n_backends=3)
    ready = sim.cluster.ready()
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), shadow=True)
    p.pick(ready, REQ)
    assert p.last_reason == SHADOW and active() == 0.0
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), min_history=1000)
    p.pick(ready, REQ)
    assert p.last_reason == "warming_up" and active() == 0.0
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), budget_us=0.001, pick_time_every=1,
               cooldown_s=10.0)
    p.pick(ready, REQ)  # the first picks are not held to the budget
    assert p.last_reason is None and active() == 1.0
    for _ in range(100):
        p.pick(ready, REQ)
        if p.last_reason is not None:
            assert p.last_reason == OVER_BUDGET and active() == 0.0
    assert p.last_reason == OVER_BUDGET
    sim.clock.t += 11.0
    p.pick(ready, REQ)
    assert p.last_reason is None and active() == 1.0
    policy(sim, tmp_path / "missing.onnx")
    assert active() == 0.0


def model_series(cluster: str) -> dict[str, float]:
    """The README's deploy check: foretell_model_(info|active) of one cluster, by version."""
    shown = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name in ("foretell_model_info", "foretell_model_active") and \
                    sample.labels["cluster"] == cluster:
                shown[sample.labels.get("version", "active")] = sample.value
    return shown


def gauges_config(policy: dict[str, object], **more_clusters: dict[str, object]) -> Any:
    """A validated config: cluster "gauges" routed by `policy`, plus any other clusters
    (name -> policy), one unreachable backend each, probes off."""
    from proxy.config import parse_config
    from proxy.loader import validate

    clusters = {name: {"policy": p, "backends": [{"id": "b0", "url": "http://127.0.0.1:9"}],
                       "health": {"active": {"enabled": False}}}
                for name, p in {"gauges": policy, **more_clusters}.items()}
    return validate(parse_config({
        "clusters": clusters,
        "routes": [{"name": r, "path_prefix": f"/{r}", "cluster": "gauges"} for r in ROUTES]}),
        "test")


LEARNED = {"kind": "onnx_latency", "min_history": 0}


async def test_model_gauges_follow_the_policy_across_config_reloads(tmp_path: Path) -> None:
    """A reload builds the new policy before it closes the old: to another policy, the
    model's series go; back with another model, only its version shows."""
    from proxy import runtime

    v1 = inflight_model(tmp_path / "v1.onnx", version="v1")
    v2 = inflight_model(tmp_path / "v2.onnx", version="v2")

    def config(**policy: object) -> Any:
        return gauges_config(policy)

    learned = LEARNED
    rt, _ = await runtime.build(config(**learned, model_path=str(v1)), None)
    try:
        assert model_series("gauges") == {"v1": 1.0, "active": 1.0}
        steps: list[tuple[dict[str, object], dict[str, float]]] = [
            ({"kind": "p2c_peak_ewma"}, {}),
            ({**learned, "model_path": str(v2)}, {"v2": 1.0, "active": 1.0}),
            ({**learned, "model_path": str(v1), "epsilon": 0.1}, {"v1": 1.0, "active": 1.0}),
            ({**learned, "model_path": str(tmp_path / "missing.onnx")}, {"active": 0.0}),
        ]
        for policy, expected in steps:
            rt, retired = await runtime.build(config(**policy), rt)
            await runtime.retire(retired.now)
            assert model_series("gauges") == expected, policy
    finally:
        await runtime.close(rt)
    assert model_series("gauges") == {}


async def test_a_reload_that_changes_options_keeps_the_model_a_broken_file_would_cost(
        tmp_path: Path) -> None:
    """v1 serves; its file is then cut short (refused), and a reload changes epsilon: the
    new policy cannot load the file, and takes over the model the old one serves."""
    from proxy import runtime

    v1 = inflight_model(tmp_path / "v1.onnx", version="v1")
    rt, _ = await runtime.build(gauges_config({**LEARNED, "model_path": str(v1)}), None)
    try:
        v1.write_bytes(v1.read_bytes()[:200])
        rt, retired = await runtime.build(
            gauges_config({**LEARNED, "model_path": str(v1), "epsilon": 0.1}), rt)
        await runtime.retire(retired.now)
        policy = rt.clusters["gauges"].policy
        assert isinstance(policy, OnnxLatency) and policy.options.epsilon == 0.1
        assert policy.model is not None and policy.model.version == "v1"
        assert model_series("gauges") == {"v1": 1.0, "active": 1.0}
    finally:
        await runtime.close(rt)


async def test_a_failed_reload_gives_the_gauges_back_to_the_policy_that_serves(
        tmp_path: Path) -> None:
    """The new onnx_latency policy is built (and takes the cluster's gauges) before another
    cluster's policy fails to build: the reload is refused and the old policy shows again."""
    from proxy import runtime

    v1 = inflight_model(tmp_path / "v1.onnx", version="v1")
    v2 = inflight_model(tmp_path / "v2.onnx", version="v2")
    rt, _ = await runtime.build(gauges_config({**LEARNED, "model_path": str(v1)}), None)
    try:
        with pytest.raises(RuntimeError, match="cannot be built"):
            await runtime.build(gauges_config({**LEARNED, "model_path": str(v2)},
                                              other={"kind": "tests.support.FailingPolicy"}), rt)
        assert model_series("gauges") == {"v1": 1.0, "active": 1.0}
    finally:
        await runtime.close(rt)


async def test_a_policy_whose_load_raises_unexpectedly_gives_the_gauges_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a ModelError (onnxruntime failing to import, memory): the half-built policy had
    taken the gauges, and the one still serving could no longer show its state."""
    from policies import onnx_latency
    from proxy import runtime

    v1 = inflight_model(tmp_path / "v1.onnx", version="v1")
    rt, _ = await runtime.build(gauges_config({**LEARNED, "model_path": str(v1)}), None)
    try:
        def no_memory(path: object) -> object:
            raise MemoryError("no memory for a session")

        monkeypatch.setattr(onnx_latency, "load_model", no_memory)
        with pytest.raises(MemoryError):
            await runtime.build(gauges_config({**LEARNED, "model_path": str(v1), "epsilon": 0.2}), rt)
        assert model_series("gauges") == {"v1": 1.0, "active": 1.0}
    finally:
        await runtime.close(rt)


def test_inference_error_falls_back_for_cooldown(tmp_path: Path) -> None:
    sim = Sim(n_backends=3)
    p = policy(sim, fails_beyond_two_rows(tmp_path / "m.onnx"), cooldown_s=5.0)
    assert p.model is not None  # passed its trial run
    ready = sim.cluster.ready()
    assert p.pick(ready, REQ) is not None and p.last_reason == INFERENCE_ERROR
    assert p.pick(ready, REQ) is not None and p.last_reason == INFERENCE_ERROR
    sim.clock.t += 6.0
    p.pick(ready[:1], REQ)  # one backend = two rows (it and its +2 inflight twin) work:
    # the model is tried again and serves
    assert p.last_reason is None


def test_over_budget_falls_back(tmp_path: Path) -> None:
    sim = Sim(n_backends=4)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), budget_us=0.001, pick_time_every=1,
               cooldown_s=10.0)
    ready = sim.cluster.ready()
    reasons: Counter[str | None] = Counter()
    for _ in range(100):
        p.pick(ready, REQ)
        reasons[p.last_reason] += 1
    assert reasons[OVER_BUDGET] > 0
    sim.clock.t += 11.0
    p.pick(ready, REQ)
    assert p.last_reason is None


def test_shadow_mode_is_not_switched_off_by_the_budget(tmp_path: Path) -> None:
    """The budget guards routing; in shadow mode the fallback routes, so predictions (and
    the error metric they feed) go on however slow the model is."""
    sim = Sim(n_backends=4)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), budget_us=0.001, pick_time_every=1,
               shadow=True)
    ready = sim.cluster.ready()
    reasons: Counter[str | None] = Counter()
    for _ in range(200):
        p.pick(ready, REQ)
        reasons[p.last_reason] += 1
    assert reasons == {SHADOW: 200}


def test_exploration_propensities_sum_to_one(tmp_path: Path) -> None:
    sim = Sim(n_backends=4)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), seed=4, epsilon=0.2)
    ready = sim.cluster.ready()
    with sim.cluster.track(ready[0]), sim.cluster.track(ready[1]), sim.cluster.track(ready[3]):
        seen: dict[str, float] = {}
        counts: Counter[str] = Counter()
        n = 20000
        for _ in range(n):
            b = p.pick(ready, REQ)
            assert b is not None and p.last_propensity is not None
            seen[b.id] = p.last_propensity
            counts[b.id] += 1
    assert set(seen) == {"b0", "b1", "b2", "b3"}
    assert sum(seen.values()) == pytest.approx(1.0)
    assert seen["b2"] == pytest.approx(0.8 + 0.2 / 4)
    for bid, prop in seen.items():  # the logged probability is the real frequency
        assert counts[bid] / n == pytest.approx(prop, abs=0.015)


def test_explore_wrapper_propensities_sum_to_one() -> None:
    sim = Sim(n_backends=5)
    ctx = PolicyContext(clock=sim.clock, rng=random.Random(1), route_classes=ROUTES)
    p = create("explore", {"base": "round_robin", "epsilon": 0.25}, ctx)
    ready = sim.cluster.ready()
    base = create("round_robin", {}, PolicyContext(clock=sim.clock, rng=random.Random(1)))
    n, followed = 4000, 0
    for _ in range(n):
        expect = base.pick(ready, REQ)  # the same base, run alongside
        got = p.pick(ready, REQ)
        prop = getattr(p, "last_propensity", None)
        assert got is not None and prop is not None
        # P(got | the base chose `expect`): epsilon/n for each backend, plus 1 - epsilon
        # for the base's choice, so the five probabilities of a decision sum to one.
        assert prop == pytest.approx(0.25 / 5 + 0.75 * (got is expect))
        followed += got is expect
    # The logged probabilities are the real frequencies: the base's choice is taken
    # 0.75 + 0.25/5 = 80% of the time, each other backend 5%.
    assert followed / n == pytest.approx(0.8, abs=0.02)


def test_explore_forwards_the_base_policys_state(tmp_path: Path) -> None:
    sim = Sim(n_backends=3)
    ctx = PolicyContext(clock=sim.clock, rng=random.Random(1), cluster="t", route_classes=ROUTES)
    model = str(inflight_model(tmp_path / "m.onnx"))
    p = create("explore", {"base": "onnx_latency", "epsilon": 0.1,
                           "base_options": {"model_path": model, "min_history": 0}}, ctx)
    assert isinstance(p, Explore)
    sim.run(p, 50)
    state = p.describe()
    assert state["base"] == "onnx_latency" and state["epsilon"] == 0.1
    assert state["base_state"]["serving"] is True and state["base_state"]["scores"]
    plain = create("explore", {"base": "round_robin"}, ctx)
    assert isinstance(plain, Explore) and "base_state" not in plain.describe()


def test_shadow_routes_with_fallback_and_records_error(tmp_path: Path) -> None:
    from policies.onnx_latency import PREDICTION_ERROR

    sim = Sim(n_backends=3)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), shadow=True)
    hist = PREDICTION_ERROR.labels("t", "shadow")
    before = sum(b.get() for b in hist._buckets)
    sim.run(p, 400)
    assert p.last_reason == SHADOW
    assert sum(b.get() for b in hist._buckets) > before
    assert p.describe()["serving"] is False


def test_residual_correction_tracks_observed_over_predicted(tmp_path: Path) -> None:
    sim = Sim(n_backends=2)
    p = policy(sim, linear_model(tmp_path / "m.onnx", np.zeros(N_FEATURES), bias=5.0),
               residual_alpha=0.2)
    ready = sim.cluster.ready()
    for _ in range(60):
        b = p.pick(ready, REQ)
        assert b is not None
        p.observe(b, REQ, Outcome(200, 0.010 if b.id == "b0" else 0.005, None, 0, "fast"))
    corr = p.describe()["correction"]
    assert isinstance(corr, dict)
    # Both predicted 5 ms. b0 (first pick, tie) answered in 10 ms: its factor moved 0.2 of
    # the way from 1 to 2; b1 answers as predicted, so from then on b1 is preferred.
    assert corr["b0"] == pytest.approx(1.2)
    assert corr["b1"] == pytest.approx(1.0)
    assert p.pick(ready, REQ) is ready[1]


def test_an_unobserved_backends_correction_relaxes_toward_the_fleets(tmp_path: Path) -> None:
    sim = Sim(n_backends=2)
    p = policy(sim, linear_model(tmp_path / "m.onnx", np.zeros(N_FEATURES), bias=5.0),
               residual_alpha=0.5, residual_relax_s=2.0)
    ready = sim.cluster.ready()
    b0 = p.pick(ready, REQ)  # a tie: the first
    assert b0 is ready[0]
    p.observe(b0, REQ, Outcome(200, 0.010, None, 0, "fast"))  # 2x predicted: 1.5, fleet 1.5
    b1 = p.pick(ready, REQ)
    assert b1 is ready[1]  # still at the fleet's 1.0 of the first pick
    # b1 answers at 0.5x: 0.75; the fleet moves from 1.5 to 1.0.
    p.observe(b1, REQ, Outcome(200, 0.0025, None, 0, "fast"))
    assert p.describe()["correction"] == {"b0": 1.5, "b1": 0.75}
    assert p.describe()["fleet_correction"] == 1.0
    sim.clock.t += 2.0  # one time constant without an outcome
    p.pick(ready, REQ)
    corr = p.describe()["correction"]
    assert isinstance(corr, dict)
    # Shown rounded to 3 decimals.
    assert corr["b0"] == pytest.approx(1.0 + 0.5 * math.exp(-1.0), abs=5e-4)
    assert corr["b1"] == pytest.approx(1.0 - 0.25 * math.exp(-1.0), abs=5e-4)


@pytest.mark.parametrize("relax_s", [0.0, 1.0])
def test_a_recovered_backend_is_not_starved_by_its_old_correction(tmp_path: Path,
                                                                  relax_s: float) -> None:
    """b0 answers one request 3x slower than predicted, then as predicted. With three
    requests in flight on b1 (scored 8 ms against b0's 5 ms x 2.0), only a correction
    that relaxes lets b0 back in (an EWMA
    moves only on outcomes, and a backend the model does not pick has none)."""
    w = np.zeros(N_FEATURES)
    w[INFLIGHT] = 1.0
    sim = Sim(n_backends=2)
    p = policy(sim, linear_model(tmp_path / "m.onnx", w, bias=5.0), residual_alpha=0.5,
               residual_relax_s=relax_s)
    ready = sim.cluster.ready()
    # Both answer one request as predicted (b0 is busy when b1 is picked): corrections 1.0.
    # (A request is one RequestInfo: the policy matches an outcome to its pick by it.)
    r0, r1 = RequestInfo(route_class="fast"), RequestInfo(route_class="fast")
    assert p.pick(ready, r0) is ready[0]
    with sim.cluster.track(ready[0]) as t0:
        assert p.pick(ready, r1) is ready[1]
        with sim.cluster.track(ready[1]) as t1:
            for b, r, t, latency_s in ((ready[0], r0, t0, 0.005), (ready[1], r1, t1, 0.005)):
                t.finish(Outcome(200, latency_s, None, 0, "fast"))
                p.observe(b, r, Outcome(200, latency_s, None, 0, "fast"))
    first = p.pick(ready, REQ)
    assert first is ready[0]
    p.observe(first, REQ, Outcome(200, 0.015, None, 0, "fast"))  # b0's correction: 2.0
    assert p.describe()["correction"] == {"b0": 2.0, "b1": 1.0}
    in_flight: list[tuple[BackendView, RequestInfo, Tracker, float]] = []
    picks = []
    for _ in range(100):
        sim.clock.t += 0.1
        req = RequestInfo(route_class="fast")
        b = p.pick(ready, req)
        assert b is not None
        picks.append(b.id)
        tracker = sim.cluster.track(sim.cluster.get(b.id)).__enter__()
        in_flight.append((b, req, tracker, (4.0 + b.inflight) / 1e3))  # as predicted
        if len(in_flight) > 3:
            done, done_req, t, latency_s = in_flight.pop(0)
            outcome = Outcome(200, latency_s, None, 0, "fast")
            t.finish(outcome)
            t.__exit__(None, None, None)
            p.observe(done, done_req, outcome)
    if relax_s == 0.0:
        assert "b0" not in picks
    else:
        assert picks[50:].count("b0") >= 15


def test_describe_explains_each_score(tmp_path: Path) -> None:
    sim = Sim(n_backends=3)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"))  # 1 ms + 10 ms per request in flight
    ready = sim.cluster.ready()
    with sim.cluster.track(ready[0]), sim.cluster.track(ready[0]):
        chosen = p.pick(ready, REQ)
        scores = p.describe()["scores"]
        assert isinstance(scores, dict)
        terms = scores["fast GET"]["backends"]
        assert terms["b0"] == {"inflight": 2, "predicted_ms": pytest.approx(21.0),
                               "per_inflight_ms": pytest.approx(10.0), "correction": 1.0,
                               "penalty_ms": 0.0, "score": pytest.approx(21.0)}
        assert chosen is not None
        assert terms[chosen.id]["score"] == min(t["score"] for t in terms.values())


async def test_a_reloaded_model_starts_without_the_old_models_corrections(tmp_path: Path) -> None:
    sim = Sim(n_backends=2)
    path = linear_model(tmp_path / "m.onnx", np.zeros(N_FEATURES), bias=5.0)
    p = policy(sim, path, residual_alpha=0.2)
    ready = sim.cluster.ready()
    for _ in range(20):
        b = p.pick(ready, REQ)
        assert b is not None
        p.observe(b, REQ, Outcome(200, 0.010 if b.id == "b0" else 0.005, None, 0, "fast"))
    assert p.describe()["correction"]
    in_flight = p.pick(ready, REQ)  # predicted by the old model, answers after the reload
    assert in_flight is not None
    tmp = tmp_path / "new.onnx"
    linear_model(tmp, np.zeros(N_FEATURES), bias=10.0)
    os.replace(tmp, path)
    assert await p.check_reload() is True
    assert p.describe()["correction"] == {}
    p.observe(in_flight, REQ, Outcome(200, 0.020, None, 0, "fast"))  # 4x the old prediction
    assert p.describe()["correction"] == {}
    # Both backends predicted alike again: the tie goes to the first, b0.
    assert p.pick(ready, REQ) is ready[0]


@pytest.mark.parametrize(("busy", "expected_rescores"), [(False, 19), (True, 0)])
def test_rescores_take_at_most_their_cpu_share_when_busy(tmp_path: Path, busy: bool,
                                                          expected_rescores: int) -> None:
    """With outcomes arriving, predictions are recomputed every rescore_s; while the
    proxy is busy, only as often as rescore_cpu_share allows (a real run costs > 1 µs, so
    a share of 1e-9 makes the next one wait for the full refresh). The first pick below
    has no new outcome to rescore for: 19 of 20."""
    sim = Sim(n_backends=3)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), rescore_s=0.005, refresh_s=10.0,
               rescore_cpu_share=1e-9)
    p._busy = busy  # the load probe looks once a second; the test takes less
    ready = sim.cluster.ready()
    assert p.pick(ready, REQ) is not None  # the first, full run
    levels = []
    real = p._run_model

    def counting(model, ready, req, now, old):  # type: ignore[no-untyped-def]
        levels.append(old is not None)
        return real(model, ready, req, now, old)

    p._run_model = counting  # type: ignore[method-assign]
    counted_before = REGISTRY.get_sample_value("foretell_model_rescores_total", {"cluster": "t"})
    for _ in range(20):
        sim.clock.t += 0.006
        b = p.pick(ready, REQ)
        assert b is not None
        p.observe(b, REQ, Outcome(200, 0.005, None, 0, "fast"))
    assert sum(levels) == expected_rescores
    counted = REGISTRY.get_sample_value("foretell_model_rescores_total", {"cluster": "t"})
    assert counted - counted_before == expected_rescores
    gap_ms = p.describe()["rescore_gap_ms"]
    assert gap_ms > 1e3 if busy else gap_ms == 5.0  # type: ignore[operator]


def test_the_cpu_share_covers_every_request_class_together(tmp_path: Path) -> None:
    """Busy, each class waits (classes cached x cost of one run) / share: two classes
    rescored once per gap each take the share together, not twice it."""
    sim = Sim(n_backends=3)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), rescore_s=0.0, refresh_s=10.0,
               rescore_cpu_share=0.01)
    p._busy = True  # the load probe looks once a second; the test takes less
    ready = sim.cluster.ready()
    assert p.pick(ready, RequestInfo(route_class=ROUTES[0])) is not None
    one_class = p._rescore_gap_s / p._rescore_cost_s
    assert p.pick(ready, RequestInfo(route_class=ROUTES[1])) is not None
    two_classes = p._rescore_gap_s / p._rescore_cost_s
    assert one_class == pytest.approx(100.0)  # 1 / 0.01
    assert two_classes == pytest.approx(200.0)


def test_a_partial_rescore_runs_only_the_changed_rows_and_matches_a_full_one(
        tmp_path: Path) -> None:
    """Between full refreshes a rescore reruns only the backends with a new outcome or
    another inflight; its predictions (and failure penalties) must equal a run over
    every row, bit for bit. Exploration keeps sending traffic to b0, which fails fast
    20% of the time, so rows with a penalty change between rescores too."""
    sim = Sim(n_backends=8)
    p = policy(sim, tree_model(tmp_path / "m.onnx"), rescore_s=0.0, epsilon=0.3)
    model = p.model
    assert model is not None and model.weights is None  # onnxruntime, not numpy
    rows_run = count_rows(model)
    real = p._run_model
    compared, differed = 0, 0

    # Counted, not asserted here: pick() turns an exception into a fallback.
    def checked(model, ready, req, now, old, partial=True):  # type: ignore[no-untyped-def]
        nonlocal compared, differed
        got = real(model, ready, req, now, old)
        if old is not None:
            full = real(model, ready, req, now, old, partial=False)
            compared += 1
            differed += (got.a != full.a or got.a0 != full.a0 or got.cur != full.cur
                         or got.pen != full.pen)
        return got

    p._run_model = checked  # type: ignore[method-assign]
    sim.run(p, 400, dt_s=0.002)
    assert compared > 200 and differed == 0
    # Full runs are 8 or 16 rows; the partial ones (1, 2 or 4 rows) were most of the rest.
    partial_runs = sum(1 for n in rows_run if n < 8)
    assert partial_runs > compared // 2


def test_a_partial_rescore_prices_every_row_for_the_same_request(tmp_path: Path) -> None:
    """Requests of one class can differ (body size within its bucket): a partial rescore
    reruns its rows for the request the class was scored for, not a mix of the two."""
    sim = Sim(n_backends=8)
    w = np.zeros(N_FEATURES)
    w[REQ_BODY] = 10.0
    w[INFLIGHT] = 1.0
    p = policy(sim, linear_model(tmp_path / "m.onnx", w), rescore_s=0.0, refresh_s=10.0)
    ready = sim.cluster.ready()
    first = RequestInfo(method="POST", route_class="fast", body_size=1000)
    second = RequestInfo(method="POST", route_class="fast", body_size=1050)  # same bucket
    assert p.pick(ready, first) is not None
    (key,) = p._scores
    p.observe(ready[3], first, Outcome(200, 0.005, None, 0, "fast"))
    assert p.pick(ready, second) is not None
    partial = p._scores[key]
    assert partial.version == 1  # rescored after the outcome
    model = p.model
    assert model is not None
    full = p._run_model(model, ready, first, sim.clock.t, partial, partial=False)
    assert partial.a == pytest.approx(full.a)


def test_a_class_scored_before_the_outcome_log_begins_is_rescored_in_full(
        tmp_path: Path) -> None:
    sim = Sim(n_backends=4)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), rescore_s=0.0, refresh_s=10.0)
    model = p.model
    assert model is not None
    rows_run = count_rows(model)
    ready = sim.cluster.ready()
    slow = RequestInfo(route_class="slow")
    assert p.pick(ready, slow) is not None  # scored at outcome 0: 2 x 4 rows
    out = Outcome(200, 0.005, None, 0, "fast")
    for _ in range(OBSERVED_LOG_MAX + 10):  # one backend only, but the log is trimmed
        p.observe(ready[1], REQ, out)
    assert p.pick(ready, slow) is not None  # all 4 rows: the log no longer reaches back
    assert p.pick(ready, REQ) is not None  # a new class: 2 x 4 rows
    p.observe(ready[1], REQ, out)
    assert p.pick(ready, REQ) is not None  # only the observed backend's row
    assert rows_run == [8, 4, 8, 1]


def test_unknown_onnx_proto_is_load_error(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "empty", [], [])), path)
    sim = Sim(n_backends=2)
    p = policy(sim, path)
    assert p.model is None
    p.pick(sim.cluster.ready(), REQ)
    assert p.last_reason in (LOAD_ERROR, SCHEMA_MISMATCH)


def test_fallback_routes_until_every_backend_has_history(tmp_path: Path) -> None:
    from policies.onnx_latency import WARMING_UP

    sim = Sim(n_backends=3)
    p = policy(sim, inflight_model(tmp_path / "m.onnx"), min_history=5)
    ready = sim.cluster.ready()
    p.pick(ready, REQ)
    assert p.last_reason == WARMING_UP
    sim.run(create("round_robin", {}, PolicyContext(clock=sim.clock)), 14)
    p.pick(ready, REQ)
    assert p.last_reason == WARMING_UP  # 14 outcomes < 5 x 3 backends
    assert p.describe()["serving"] is False and p.describe()["warming_up"] is True
    sim.run(create("round_robin", {}, PolicyContext(clock=sim.clock)), 1)
    p.pick(ready, REQ)  # at once, not at the matrix's next refresh
    assert p.last_reason is None
    assert p.describe()["serving"] is True and p.describe()["warming_up"] is False


def test_ratio_target_scales_route_cost(tmp_path: Path) -> None:
    from policies.features import ROUTE_COST

    sim = Sim(n_backends=3)
    path = linear_model(tmp_path / "m.onnx", np.zeros(N_FEATURES), bias=2.0,
                        meta={"foretell.target": "latency_ms_over_route_cost"})
    p = policy(sim, path)
    assert p.model is not None and p.model.ratio
    ready = sim.cluster.ready()
    with sim.cluster.track(ready[0]), sim.cluster.track(ready[0]), sim.cluster.track(ready[2]):
        x = p._features.prepare(ready, REQ).copy()
        np.testing.assert_allclose(p.model.predict_ms(x), 2.0 * x[:, ROUTE_COST], rtol=1e-6)
        assert p.pick(ready, REQ) is ready[1]  # the least queued, all else equal


def test_log_target_linear_model_uses_numpy_path_matching_onnxruntime(tmp_path: Path) -> None:
    """A ridge fitted on log latency exports Scaler -> LinearRegressor -> Clip -> Exp; the
    policy runs it in numpy (cheap with cold caches) and must agree with onnxruntime."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from train.latency import LOG_MAX, LOG_MIN, sk_ms

    rng = np.random.default_rng(3)
    x = (rng.random((400, N_FEATURES)) * 20).astype(np.float32)
    y_log = 0.05 * x[:, INFLIGHT] + 0.01 * x.sum(axis=1) + rng.normal(0, 0.1, 400)
    model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x, y_log)
    path = tmp_path / "log.onnx"
    path.write_bytes(to_onnx(model, {**trained_metadata(), "foretell.fit_target": "log_latency"},
                             log=True))
    loaded = load_model(path)
    assert loaded.weights is not None and loaded.log_clip == pytest.approx((LOG_MIN, LOG_MAX))
    rows = np.ascontiguousarray(np.concatenate([x[:50], x[:5] * 1e3]))  # some hit the clip
    fast = loaded.predict(rows).copy()
    np.testing.assert_allclose(fast, loaded.predict_copy(rows), rtol=1e-4)
    np.testing.assert_allclose(fast, sk_ms(model, rows, "log_latency"), rtol=1e-4)
    assert np.all(np.isfinite(fast)) and fast.max() == pytest.approx(np.exp(LOG_MAX), rel=1e-5)


def test_outcomes_of_two_classes_between_rescores_both_reach_the_features(tmp_path: Path) -> None:
    """b1 answers a "fast" request slowly, then a "slow" one: the next rescore of "fast"
    prices b1 with its new "fast" route EWMA, as telemetry's features.build sees it (the
    feature update once kept only the last class a backend was observed for)."""
    clock = FakeClock()
    cluster = Cluster("c", [Backend(f"b{i}", f"http://h:{i}") for i in range(4)], clock=clock)
    w = np.zeros(N_FEATURES)
    w[ROUTE_COST] = 1.0
    path = linear_model(tmp_path / "m.onnx", w, bias=0.0)
    ctx = PolicyContext(clock=clock, rng=random.Random(0), cluster="c", route_classes=ROUTES)
    p = create("onnx_latency", {"model_path": str(path), "min_history": 0, "rescore_s": 0.0}, ctx)
    assert isinstance(p, OnnxLatency)
    ready = cluster.ready()
    fast, slow = RequestInfo(route_class="fast"), RequestInfo(route_class="slow")

    def answer(state: BackendView, req: RequestInfo, ms: float) -> None:
        with cluster.track(state) as t:  # type: ignore[arg-type]
            out = Outcome(200, ms / 1e3, None, 0, req.route_class)
            t.finish(out)
            p.observe(state, req, out)

    for s in ready:
        answer(s, fast, 10.0)
        answer(s, slow, 10.0)
    clock.t += 1.0
    p.pick(ready, fast)
    p.pick(ready, slow)
    clock.t += 0.01
    answer(ready[1], fast, 200.0)
    answer(ready[1], slow, 10.0)
    clock.t += 0.01
    p.pick(ready, fast)  # a partial rescore: b1's row is rerun
    served = p._scores[("fast", "GET", 0)].a
    logged = build(ready, fast, p._features.slots, clock())[:, ROUTE_COST].tolist()
    assert served == pytest.approx(logged, rel=1e-6)
    assert served[1] > 40.0
