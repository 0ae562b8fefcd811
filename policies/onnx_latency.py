"""Route to the backend a learned latency model predicts is fastest (kind `onnx_latency`).

Scoring is split so that most requests touch neither numpy nor onnxruntime
(each costs 5-25 µs with the caches cold between requests, several times
its hot-loop cost). A *rescore* brings the persistent feature matrix
(policies.features) up to date for the backends observed since the last one
and runs the model once over 2n rows: every ready backend at its current
inflight, and again at inflight + 2. That gives per backend a prediction
`a` at inflight `cur` and a slope `b` per extra request in flight, cached
per request class (route class, method, body size in quarter-log buckets).
Later rescores of a class keep the slopes and rerun only the rows whose
input changed since (a backend with a new outcome or another inflight),
for the request the class was last fully scored for (requests of a class
differ in body size within a bucket; all rows stay priced for one),
unless the matrix had its full refresh or more than half the rows changed:
at low request rates that is one or two rows per request, not 2n. Those
rows are copied out of the matrix element by element
(`FeatureMatrix.copy_rows`), not through the numpy calls of a full
`prepare`, which cost more than the copy for a few rows.
A pick is then plain Python over the ready list:

    (a + b * (inflight_now - cur)) * correction[backend] + failure_penalty_ms * error_rate

so queueing is priced exactly at every pick (no herding between rescores),
while the slower-moving backend statistics (EWMA, recent latencies, error
rate) are at most `rescore_s` old (and at most `refresh_s` without any
outcome). `rescore_s: 0` rescores whenever an outcome arrived since the last
pick. While the proxy is busy, rescores also take at most
`rescore_cpu_share` of a core (the wait between them grows with their
measured cost), so at saturation the model does not cost the proxy its
throughput; below that, predictions stay fresh. With `max_scored`, the
argmin is taken over a random subset of that size (P2C-style).

`correction` is an online EWMA of observed/predicted latency per backend
(drift between retrainings) that relaxes toward the fleet's EWMA while the
backend has no outcomes (`residual_relax_s`), and the penalty keeps a backend
that fails fast from looking fast. `describe()` (the admin's /backends)
shows these terms per cached request class and backend. The lowest score wins; with probability
`epsilon` a uniformly random backend is chosen instead. `last_propensity`
is P(chosen | this decision) = epsilon/n + (1-epsilon)*[chosen is the best]
(conditional on the sampled subset when there is one), which is what
off-policy evaluation needs.

Failure never stops routing: while the model is missing, fails to load,
does not match the feature schema, raises, or is slower than `budget_us`,
the `fallback` heuristic routes and `foretell_model_fallbacks_total{reason}`
counts it. `shadow: true` routes with the fallback while still predicting,
so prediction-error metrics can be read before trusting the model.

`run_background()` polls the model file every `reload_interval_s`; a changed
file is loaded off the event loop, validated (the metadata the trainer writes,
its checksum, schema version, feature names, a trial run) and swapped in whole;
a bad file is logged and counted, and the previous model keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field

from policies import registry
from policies.base import BackendView, NestedPolicy, Policy, PolicyContext, PolicyOptions, RequestInfo
from policies.features import (
    ERROR_RATE,
    EWMA,
    EWMA_COST,
    INFLIGHT,
    N_FEATURES,
    N_REQUEST,
    ROUTE_COST,
    FeatureMatrix,
    SchemaError,
    check_schema,
    flat_view,
)

log = logging.getLogger("foretell.policies.onnx_latency")

# What the model's output means. "latency_ms": the prediction itself.
# "latency_ms_over_route_cost": a factor on the route_cost_ms feature
# (route EWMA x (inflight + 1)), so predictions scale with queueing beyond
# the training range instead of saturating. Models fitted on a log target
# (foretell.fit_target log_latency / log_ratio) end their graph in Clip -> Exp,
# so their output means the same and nothing here transforms it.
TARGET = "latency_ms"
TARGET_RATIO = "latency_ms_over_route_cost"
TARGETS = (TARGET, TARGET_RATIO)

# Metadata every trainer version has written into every model (train/latency.py); a model
# without any of them is refused. ONNX stores metadata after the graph, so a file cut
# short loses it first and may still parse: 842 of a 960-byte model's bytes loaded,
# without route classes, target and version, and served (fed the config's route slots,
# its output read as ms whatever its target). foretell.validation, which serving does not
# read, is written last (but for the checksum): no file cut after the graph has it.
REQUIRED_METADATA = ("foretell.schema_version", "foretell.feature_names",
                     "foretell.route_classes", "foretell.target", "foretell.model_kind",
                     "foretell.model_version", "foretell.training_window", "foretell.validation")
# SHA-256 (hex) of the file without this entry, which the trainer appends last: a model
# carrying it must match it (a damaged or edited file is refused). Models written before
# it have none and are checked for the metadata above only.
CHECKSUM = "foretell.sha256"

# Outcomes per prediction-error observation (a power of two: a mask picks them).
ERROR_SAMPLE_EVERY = 32

PREDICTION_ERROR = Histogram(
    "foretell_model_prediction_error_seconds",
    "Absolute error of the latency model's prediction for the chosen backend (sampled: "
    f"outcomes numbered a multiple of {ERROR_SAMPLE_EVERY})",
    ["cluster", "mode"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
PICK_TIME = Histogram(
    "foretell_model_pick_seconds",
    "Time of one onnx_latency pick (features + inference + choice), sampled",
    ["cluster"],
    # Up to several times the default budget_us (1 ms): a pick that reruns the model with
    # cold caches costs hundreds of µs, and the top buckets show how close picks come.
    buckets=(5e-6, 1e-5, 1.5e-5, 2e-5, 3e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2),
)
FALLBACKS = Counter(
    "foretell_model_fallbacks_total",
    "Picks made by the fallback heuristic instead of the model, by reason",
    ["cluster", "reason"],
)
RELOADS = Counter("foretell_model_reloads_total", "Model (re)loads by result", ["cluster", "result"])
RESCORES = Counter(
    "foretell_model_rescores_total",
    "Model runs that refreshed the cached predictions of one request class", ["cluster"],
)
RESCORE_GAP = Gauge(
    "foretell_model_rescore_gap_seconds",
    "Least time between two rescores of one request class while outcomes arrive: rescore_s, "
    "or longer while the proxy is busy (rescore_cpu_share)", ["cluster"],
    multiprocess_mode="livemax",
)
MODEL_INFO = Gauge(
    "foretell_model_info", "The latency model in use (value 1)", ["cluster", "version", "kind"],
    multiprocess_mode="livemax",
)
MODEL_ACTIVE = Gauge(
    "foretell_model_active", "1 when the model routes, 0 when the fallback does", ["cluster"],
    multiprocess_mode="livemin",
)

# The newest onnx_latency policy of each cluster shows the cluster's gauges above (info,
# active, rescore gap), and its close takes them out: a config reload builds the new
# policy before it closes the old one, whose close must leave the new one's alone.
# Cluster -> that policy (weakly: one dropped without close shows nothing).
_OWNER_POLICY: weakref.WeakValueDictionary[str, OnnxLatency] = weakref.WeakValueDictionary()
# Cluster -> the (version, kind) foretell_model_info shows.
_INFO_SHOWN: dict[str, tuple[str, str]] = {}


def _drop_series(gauge: Gauge, *labels: str) -> None:
    """Take one series of a gauge out; prometheus_client cannot remove a series in
    multiprocess mode (the proxy's workers > 1), where it stays at 0."""
    gauge.labels(*labels).set(0)
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ and "prometheus_multiproc_dir" not in os.environ:
        gauge.remove(*labels)


def _drop_info(cluster: str) -> None:
    shown = _INFO_SHOWN.pop(cluster, None)
    if shown is not None:
        _drop_series(MODEL_INFO, cluster, *shown)


# A rescore also predicts every backend at inflight + SLOPE_STEP, for the slope
# (wider than 1 so a tree model's flat step still shows the queueing cost).
SLOPE_STEP = 2.0

# Requests of one route class and method share cached predictions while their body
# sizes fall in one bucket: buckets per factor e of log1p(bytes).
BODY_BUCKETS_PER_E = 4.0

# Outcomes remembered for partial rescores (a class scored longer ago is run in full).
OBSERVED_LOG_MAX = 1024

# Picks after a (re)load not counted against the time budget (first runs are slow).
WARMUP_PICKS = 64

# Fallback reasons (bounded metric label values).
MISSING_FILE = "missing_file"
LOAD_ERROR = "load_error"
SCHEMA_MISMATCH = "schema_mismatch"
INFERENCE_ERROR = "inference_error"
OVER_BUDGET = "over_budget"
SHADOW = "shadow"
WARMING_UP = "warming_up"
REASONS = (MISSING_FILE, LOAD_ERROR, SCHEMA_MISMATCH, INFERENCE_ERROR, OVER_BUDGET, SHADOW,
           WARMING_UP)


class ModelError(Exception):
    """A model file that cannot serve; `reason` is one of REASONS. `unreadable`: the file is
    there but could not be read (permissions, too many open files, an I/O error), which
    may pass without the file changing."""

    def __init__(self, reason: str, message: str, *, unreadable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.unreadable = unreadable


def session_options() -> Any:
    """onnxruntime settings for a tiny model called inline on the event loop."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A spinning worker thread would burn a core between requests.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


@dataclass
class LoadedModel:
    """An onnxruntime session validated against the feature schema."""

    path: Path
    session: Any
    input_name: str
    output_name: str
    metadata: dict[str, str]
    route_classes: list[str]
    version: str
    kind: str
    file_key: tuple[int, int, int] = (0, 0, 0)
    ratio: bool = False  # output is a factor on the route_cost_ms column
    # For an affine model (Scaler -> LinearRegressor): x @ weights + bias in numpy, which
    # stays fast when the CPU caches are cold between requests (onnxruntime's call does
    # not: ~4 µs hot, ~23 µs cold). Verified against onnxruntime at load.
    weights: np.ndarray | None = field(default=None, repr=False)
    bias: float = 0.0
    # (lo, hi) when the affine part is followed by Clip(lo, hi) -> Exp (a log-target model).
    log_clip: tuple[float, float] | None = None
    # id(input array) -> (the array, run, its argument, the binding): a few inputs stay bound.
    _bindings: dict[int, tuple[Any, Any, Any, Any]] = field(default_factory=dict, repr=False)
    _out: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), np.float32), repr=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Raw model output per row of `x` (float32, C-contiguous); a view valid until the
        next call. Buffers are bound once per input array, so a call is one run."""
        if self.weights is not None:
            out = self._out[:x.shape[0], 0] if self._out.shape[0] >= x.shape[0] else self._grow(x)
            np.dot(x, self.weights, out=out)
            out += self.bias
            if self.log_clip is not None:
                np.clip(out, self.log_clip[0], self.log_clip[1], out=out)
                np.exp(out, out=out)
            return out
        entry = self._bindings.get(id(x))
        if entry is None or entry[0] is not x:
            entry = self._bind(x)
        entry[1](entry[2], None)
        return self._out[:x.shape[0], 0]

    def _grow(self, x: np.ndarray) -> np.ndarray:
        self._out = np.zeros((max(x.shape[0], 16), 1), dtype=np.float32)
        return self._out[:x.shape[0], 0]

    def _bind(self, x: np.ndarray) -> tuple[Any, Any, Any, Any]:
        import onnxruntime as ort

        n = x.shape[0]
        if self._out.shape[0] < n:
            self._out = np.zeros((max(n, 16), 1), dtype=np.float32)
            self._bindings.clear()  # they write to the old buffer
        if len(self._bindings) >= 16:  # level, pairs and the partial-run sizes fit
            self._bindings.clear()
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x))
        binding.bind_output(self.output_name, "cpu", 0, np.float32, (n, 1),
                            self._out.ctypes.data)
        # The public wrapper re-checks GPU graph capture on every call (~1 µs); a CPU
        # session can call the binding directly. Fall back if the internals differ.
        inner = getattr(self.session, "_sess", None)
        raw = getattr(binding, "_iobinding", None)
        if inner is not None and raw is not None and hasattr(inner, "run_with_iobinding"):
            entry = (x, inner.run_with_iobinding, raw, binding)
        else:
            entry = (x, self.session.run_with_iobinding, binding, binding)
        self._bindings[id(x)] = entry  # the caller keeps x (and its rows) until it changes
        return entry

    def predict_copy(self, x: np.ndarray) -> np.ndarray:
        """The raw model output per row (a new array), always through onnxruntime."""
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def predict_ms(self, x: np.ndarray) -> np.ndarray:
        """Predicted latency in ms per row, whatever the target (a new array)."""
        out = self.predict_copy(x)
        return out * x[:, ROUTE_COST] if self.ratio else out


def affine_of(data: bytes) -> tuple[np.ndarray, float, tuple[float, float] | None] | None:
    """(weights, bias, log_clip) when the graph is only Scaler -> LinearRegressor (one
    target), optionally followed by Clip(lo, hi) -> Exp (the trainer's log targets:
    log_clip is (lo, hi) then, else None)."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:  # the serving extra may not ship onnx
        return None
    try:
        graph = onnx.load_from_string(data).graph
    except Exception:
        return None
    nodes = list(graph.node)
    ops = [n.op_type for n in nodes]
    if ops not in (["Scaler", "LinearRegressor"], ["Scaler", "LinearRegressor", "Clip", "Exp"]) \
            or nodes[1].input[0] != nodes[0].output[0]:
        return None
    log_clip = None
    if len(nodes) == 4:
        clip, exp = nodes[2], nodes[3]
        if clip.input[0] != nodes[1].output[0] or exp.input[0] != clip.output[0] or \
                len(clip.input) != 3 or clip.attribute:
            return None
        consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        lo, hi = consts.get(clip.input[1]), consts.get(clip.input[2])
        if lo is None or hi is None or lo.size != 1 or hi.size != 1:
            return None
        log_clip = (float(lo.reshape(())), float(hi.reshape(())))
        nodes = nodes[:2]
    attr = {a.name: helper.get_attribute_value(a) for n in nodes for a in n.attribute}
    if attr.get("post_transform", b"NONE") not in (b"NONE", "NONE") or attr.get("targets", 1) != 1:
        return None
    offset = np.asarray(attr.get("offset", [0.0] * N_FEATURES), dtype=np.float64)
    scale = np.asarray(attr.get("scale", [1.0] * N_FEATURES), dtype=np.float64)
    coef = np.asarray(attr.get("coefficients", []), dtype=np.float64)
    intercepts = list(attr.get("intercepts", [0.0]))
    if not (len(offset) == len(scale) == len(coef) == N_FEATURES) or len(intercepts) != 1:
        return None
    # ((x - offset) * scale) @ coef + b  ==  x @ (scale * coef) + (b - (offset * scale) @ coef)
    weights = (scale * coef).astype(np.float32)
    bias = float(intercepts[0] - float((offset * scale) @ coef))
    return weights, bias, log_clip


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def checksum_entry(digest: str) -> bytes:
    """The checksum as ONNX encodes it: one ModelProto.metadata_props entry (field 14, a
    StringStringEntryProto of key 1 and value 2). Appended to a serialized model it adds
    the entry (protobuf merges repeated fields in any order)."""
    key, value = CHECKSUM.encode(), digest.encode()
    inner = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value
    return b"\x72" + _varint(len(inner)) + inner


def with_checksum(data: bytes) -> bytes:
    """A serialized model with its checksum appended (what the trainer writes)."""
    return data + checksum_entry(hashlib.sha256(data).hexdigest())


def file_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_model(path: str | Path) -> LoadedModel:
    """Load and validate a model file; ModelError(reason, message) says why not."""
    import onnxruntime as ort

    path = Path(path)
    try:
        key = file_key(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(MISSING_FILE, f"{path}: no such model file") from None
    except OSError as exc:
        raise ModelError(LOAD_ERROR, f"{path}: cannot read: {exc}", unreadable=True) from None
    try:
        session = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for corrupt files
        raise ModelError(LOAD_ERROR, f"{path}: not a loadable ONNX model: {exc}") from None
    meta = dict(session.get_modelmeta().custom_metadata_map)
    digest = meta.get(CHECKSUM)
    if digest is not None:
        entry = checksum_entry(digest)
        if not data.endswith(entry) or hashlib.sha256(data[:-len(entry)]).hexdigest() != digest:
            raise ModelError(LOAD_ERROR, f"{path}: the file does not match its {CHECKSUM} "
                                         "(damaged, or edited after training)")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ModelError(SCHEMA_MISMATCH, f"{path}: no {', '.join(missing)} in the model "
                                          "metadata (the trainer writes them all; a file cut "
                                          "short loses them first)")
    try:
        check_schema(meta["foretell.schema_version"], json.loads(meta["foretell.feature_names"]))
        target = meta["foretell.target"]
        if target not in TARGETS:
            raise SchemaError(f"target {target!r}, expected one of {TARGETS}")
        route_classes = json.loads(meta["foretell.route_classes"])
        if not isinstance(route_classes, list) or not all(isinstance(r, str) for r in route_classes):
            raise SchemaError(f"foretell.route_classes {meta['foretell.route_classes']!r} is not "
                              "a list of names")
    except (SchemaError, ValueError, TypeError) as exc:
        raise ModelError(SCHEMA_MISMATCH, f"{path}: {exc}") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].shape[-1] not in (N_FEATURES, None, "N") or not outputs:
        raise ModelError(SCHEMA_MISMATCH, f"{path}: expected one float input of width "
                                          f"{N_FEATURES}, got {[i.shape for i in inputs]}")
    model = LoadedModel(
        path=path, session=session, input_name=inputs[0].name, output_name=outputs[0].name,
        metadata=meta, route_classes=route_classes,
        version=meta["foretell.model_version"][:64],
        kind=meta["foretell.model_kind"][:32], file_key=key,
        ratio=target == TARGET_RATIO)
    # A trial run: shape and finiteness, so a broken model never reaches a request.
    try:
        trial = model.predict_copy(np.zeros((2, N_FEATURES), dtype=np.float32))
    except Exception as exc:
        raise ModelError(INFERENCE_ERROR, f"{path}: trial inference failed: {exc}") from None
    if trial.shape != (2,) or not np.all(np.isfinite(trial)):
        raise ModelError(INFERENCE_ERROR, f"{path}: trial inference gave {trial!r}")
    affine = affine_of(data)
    if affine is not None:
        # Use numpy only if it agrees with onnxruntime on varied rows (small ones too, so
        # a log model's exp is compared below its clip).
        weights, bias, log_clip = affine
        rng = np.random.default_rng(0)
        probe = np.concatenate([rng.random((64, N_FEATURES), dtype=np.float32) * 100,
                                rng.random((64, N_FEATURES), dtype=np.float32)])
        expected = model.predict_copy(probe)
        got = probe.astype(np.float64) @ weights + bias
        if log_clip is not None:
            # Outputs are exp(...) > 0 and span decades: compare relatively.
            got = np.exp(np.clip(got, *log_clip))
            rtol, atol = 1e-3, 0.0
        else:
            rtol, atol = 1e-4, 1e-3 * max(1.0, float(np.abs(expected).max()))
        if np.allclose(got, expected, rtol=rtol, atol=atol):
            model.weights, model.bias, model.log_clip = weights, bias, log_clip
    return model


class OnnxLatency:
    name: ClassVar[str] = "onnx_latency"
    learned: ClassVar[bool] = True

    class Options(PolicyOptions):
        model_path: Path = Path("models/latency.onnx")
        # The heuristic that routes whenever the model cannot (and in shadow mode).
        fallback: Annotated[str, NestedPolicy("fallback_options", heuristic=True)] = "p2c_peak_ewma"
        fallback_options: dict[str, Any] = Field(default_factory=dict)
        epsilon: float = Field(0.0, ge=0, lt=1)
        failure_penalty_ms: float = Field(1000.0, ge=0)
        shadow: bool = False
        # Take each pick's argmin over a random subset of this many ready backends (0 = all);
        # rescores still run the model for every ready backend whose input changed (all of
        # them at each full refresh).
        max_scored: int = Field(0, ge=0)
        # A rescore reruns only the rows whose input changed (false: every row, as before;
        # kept to compare the two in one bench run).
        partial_rescores: bool = True
        # Weight of one observation in the observed/predicted correction (0 = off).
        residual_alpha: float = Field(0.02, ge=0, le=1)
        residual_clip: float = Field(4.0, ge=1)
        # Time constant with which a backend's correction relaxes toward the fleet's (the
        # EWMA of observed/predicted over every backend's outcomes), 0 = never. Only the
        # backends the model picks see outcomes; without this a backend it stopped picking
        # kept the correction of its last outcomes for good, and one whose model bias was
        # shared by the whole fleet but learned only on the picked one herded all traffic
        # there (docs/learning.md). As long as PeakEwma's decay: an idle backend is tried again
        # (and at 5 outcomes/s a backend's own ratio and the fleet's weigh the same).
        residual_relax_s: float = Field(10.0, ge=0)
        # Fall back while the smoothed pick time (thread CPU, sampled) exceeds this, for
        # cooldown_s.
        # A guard against pathological models, not a tuning knob: at bench rates nearly
        # every pick reruns the model, which costs 150-250 µs with cold caches inside
        # the proxy (a 250 µs budget tripped on that in a quick run).
        budget_us: float = Field(1000.0, gt=0)
        cooldown_s: float = Field(30.0, ge=0)
        reload_interval_s: float = Field(1.0, gt=0)
        # Backend columns are fully recomputed at least this often.
        refresh_s: float = Field(0.25, gt=0)
        # Cached predictions are recomputed at most this often while outcomes arrive
        # (inflight is priced exactly at every pick through the cached slope).
        rescore_s: float = Field(0.005, ge=0)
        # ...and while the proxy is busy (its process used at least `busy_cpu_share` of a
        # core over the last second), at most this share of one core goes to recomputing
        # them: the wait between rescores grows with their measured cost and the number of
        # request classes cached. A model run with the caches cold costs ~150 µs (tree
        # model): at saturation each class is rescored every ~75 ms x classes instead of
        # 5 ms, but at least every refresh_s (which can exceed the share). A run seems to
        # cost the rest of the request path more than its own time (cache evictions, our
        # reading): `bench overhead` gave 0.82x round robin's requests/s at 1% and 0.91-0.94x
        # at 0.2% (docs/learning.md). In between, inflight is still priced at every pick and
        # the per-backend correction follows every outcome. While the proxy is not busy nothing is throttled
        # (fresh predictions matter more than spare CPU: throttled at bench rates, a
        # stalled backend kept getting traffic between rescores).
        rescore_cpu_share: float = Field(0.002, gt=0, le=1)
        busy_cpu_share: float = Field(0.5, gt=0)
        # Time every Nth pick (budget and histogram). The thread CPU clock is a system call:
        # cheap idle, but a one-off py-spy profile of a saturated proxy put 1.1% of its
        # samples on it at every 16th pick, so 64; at 170 req/s a model gone slow trips the budget in ~2-8 s
        # (the slower, the sooner: samples are clamped at 4x the budget).
        pick_time_every: int = Field(64, ge=1)
        # The fallback routes until the ready backends have this many outcomes each on
        # average (once, at start): with no history every backend looks the same to the
        # model, and an argmin over equal scores herds onto one backend.
        min_history: int = Field(8, ge=0)

    def __init__(self, options: Options, ctx: PolicyContext) -> None:
        self.options = options
        self._clock = ctx.clock
        self._rng = ctx.rng
        self.cluster = ctx.cluster
        self._ctx_routes = list(ctx.route_classes)
        self.fallback: Policy = registry.create(options.fallback, options.fallback_options, ctx)
        self._fallback_observe = getattr(self.fallback, "observe", None)
        self.last_propensity: float | None = None
        self.last_reason: str | None = None  # why the last pick fell back, None if it did not
        # Options every pick or outcome reads, as plain attributes (the options are frozen).
        self._time_every = options.pick_time_every
        self._refresh_s = options.refresh_s
        self._max_scored = options.max_scored
        self._epsilon = options.epsilon
        # Shadow mode records errors but corrects nothing (the model does not route).
        self._residual_alpha = 0.0 if options.shadow else options.residual_alpha
        self._clip_lo, self._clip_hi = 1.0 / options.residual_clip, options.residual_clip
        # True while pick can go straight to the model: loaded, enabled, warm, not shadow.
        self._plain = False
        # This policy shows the cluster's gauges from now on: no model yet, not active
        # (_update_plain sets it on every change).
        # The policy this one took the gauges from: they go back to it if this one is
        # closed unused (a reload that failed after building it).
        # (Weakly: a chain of every policy a reload ever replaced would stay alive.)
        shown = _OWNER_POLICY.get(self.cluster)
        self._displaced = weakref.ref(shown) if shown is not None else None
        self._closed = False
        _OWNER_POLICY[self.cluster] = self
        _drop_info(self.cluster)
        MODEL_ACTIVE.labels(self.cluster).set(0)
        self.model: LoadedModel | None = None
        self._features = FeatureMatrix(self._ctx_routes, ctx.clock, options.refresh_s)
        self._corr_of: dict[str, float] = {}
        self._corr_fleet = 1.0  # EWMA of observed/predicted over all backends' outcomes
        self._relaxed_at = -math.inf
        self._reset_scores()
        self._pending: dict[int, tuple[str, float]] = {}
        self._pick_ewma_us = 0.0
        self._disabled_until = -math.inf
        self._disabled_reason = ""
        self._picks = 0
        self._fallback_counters = {r: FALLBACKS.labels(self.cluster, r) for r in REASONS}
        self._pick_hist = PICK_TIME.labels(self.cluster)
        self._rescores = RESCORES.labels(self.cluster)
        self._rescore_gap_gauge = RESCORE_GAP.labels(self.cluster)
        self._err_hist = PREDICTION_ERROR.labels(self.cluster, "shadow" if options.shadow else "serving")
        self._load_error_reason = MISSING_FILE
        self._watched_key: tuple[int, int, int] | None = None
        # The file could not be read at the last look: tried again at every look.
        self._retry_read = False
        self._failure_said = ""  # the last load failure logged (each is said once)
        self._warming = options.min_history > 0
        self._update_plain()
        try:
            self._install(load_model(options.model_path))
        except ModelError as exc:
            self._load_error_reason = exc.reason
            self._retry_read, self._failure_said = exc.unreadable, str(exc)
            RELOADS.labels(self.cluster, "failed").inc()
            log.warning("cluster %s: %s; routing with %s until a valid model appears",
                        self.cluster, exc, options.fallback)
            self._watched_key = self._key_or_none()
        except BaseException:  # not built after all: the gauges go back to who had them
            self.close()
            raise

    # -- model lifecycle ----------------------------------------------------------
    def _show_gauges(self) -> None:
        """Take the cluster's gauges (back) and show this policy's state on them."""
        _OWNER_POLICY[self.cluster] = self
        MODEL_ACTIVE.labels(self.cluster).set(1 if self._plain else 0)
        if self.model is not None:
            _INFO_SHOWN[self.cluster] = (self.model.version, self.model.kind)
            MODEL_INFO.labels(self.cluster, self.model.version, self.model.kind).set(1)
        # The series was removed with the one that had it: a fresh child, set at the next rescore.
        self._rescore_gap_gauge = RESCORE_GAP.labels(self.cluster)
        self._gap_shown_s = -1.0

    def _shows_gauges(self) -> bool:
        """Whether this policy's state is what the cluster's gauges show (the newest one's)."""
        return _OWNER_POLICY.get(self.cluster) is self

    def _key_or_none(self) -> tuple[int, int, int] | None:
        try:
            return file_key(self.options.model_path)
        except OSError:
            return None

    def _install(self, model: LoadedModel) -> None:
        routes = model.route_classes or self._ctx_routes
        if model.route_classes and model.route_classes != self._ctx_routes:
            log.warning("cluster %s: model was trained with route classes %s, config has %s; "
                        "using the model's (unknown classes count as 'other')",
                        self.cluster, model.route_classes, self._ctx_routes)
        self._features = FeatureMatrix(routes, self._clock, self.options.refresh_s)
        # Corrections are the old model's errors, not the new one's; predictions still in
        # flight are the old model's too.
        self._corr_of.clear()
        self._corr_fleet = 1.0
        self._pending.clear()
        self._reset_scores()
        self.model = model
        self._watched_key = model.file_key
        self._disabled_until = -math.inf
        self._pick_ewma_us = 0.0
        self._picks = 0
        self._update_plain()
        if self._shows_gauges():
            _drop_info(self.cluster)
            _INFO_SHOWN[self.cluster] = (model.version, model.kind)
            MODEL_INFO.labels(self.cluster, model.version, model.kind).set(1)
        RELOADS.labels(self.cluster, "ok").inc()
        log.info("cluster %s: latency model %s (%s) loaded from %s",
                 self.cluster, model.version, model.kind, model.path)

    async def run_background(self) -> None:
        """Watch the model file; reload it when it changes."""
        background = getattr(self.fallback, "run_background", None)
        fallback_task = asyncio.create_task(background()) if background is not None else None
        try:
            while True:
                await asyncio.sleep(self.options.reload_interval_s)
                await self.check_reload()
        finally:
            if fallback_task is not None:
                fallback_task.cancel()

    async def check_reload(self) -> bool:
        """Load the model file if it changed since the last look, or could not be read then
        (a chmod changes neither mtime, size nor inode); True when a new model serves.
        A failure is logged and counted once, not at every retry."""
        key = self._key_or_none()
        changed = key != self._watched_key
        if not changed and not self._retry_read:
            return False
        self._watched_key = key
        self._retry_read = False
        if key is None:  # deleted (or unreadable) since the last look: said once
            log.warning("cluster %s: model file %s is gone; %s", self.cluster,
                        self.options.model_path, self._what_serves())
            return False
        try:
            model = await asyncio.to_thread(load_model, self.options.model_path)
        except ModelError as exc:
            self._retry_read = exc.unreadable
            if self.model is None:
                self._load_error_reason = exc.reason
            if changed or str(exc) != self._failure_said:
                self._failure_said = str(exc)
                RELOADS.labels(self.cluster, "failed").inc()
                log.error("cluster %s: model reload refused, %s%s: %s", self.cluster,
                          self._what_serves(),
                          "; tried again at every look until it can be read"
                          if exc.unreadable else "", exc)
            return False
        self._failure_said = ""
        self._install(model)
        return True

    def _what_serves(self) -> str:
        return "keeping the current model" if self.model else "still on the fallback"

    # -- routing -----------------------------------------------------------------
    def _fall_back(self, ready: Sequence[BackendView], req: RequestInfo,
                   reason: str) -> BackendView | None:
        self._fallback_counters[reason].inc()
        self.last_reason = reason
        chosen = self.fallback.pick(ready, req)
        self.last_propensity = getattr(self.fallback, "last_propensity", None)
        return chosen

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        # Every request runs this: the usual case (the model routes, cached scores fresh)
        # takes as few steps as it can, everything else is in _pick_other.
        if not (self._plain and ready):
            return self._pick_other(ready, req)
        self._picks = picks = self._picks + 1
        if picks % self._time_every == 0:
            return self._timed_choice(ready, req)
        try:
            return self._choose(ready, req)
        except Exception as exc:  # the model must never fail a request
            return self._inference_failed(ready, req, exc)

    def _pick_other(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        """A pick while no ready backend, no model, the model disabled, warming up, or shadow."""
        model = self.model
        if not ready:
            self.last_propensity = None
            return None
        if model is None:
            return self._fall_back(ready, req, self._load_error_reason)
        if self._disabled_until > -math.inf:
            if self._clock() < self._disabled_until:
                return self._fall_back(ready, req, self._disabled_reason)
            self._disabled_until = -math.inf
            self._pick_ewma_us = 0.0
            self._update_plain()
        if self._warming:
            # Outcomes recorded per backend, read from the state itself: the matrix's
            # window_n column would only move at its next full refresh (refresh_s).
            if sum(s.requests for s in ready) < self.options.min_history * len(ready):
                return self._fall_back(ready, req, WARMING_UP)
            self._warming = False
            self._update_plain()
        if self.options.shadow:
            # The fallback routes; the model's prediction for its choice is remembered.
            # Not timed: the budget guards routing, which the model does not do here.
            try:
                sc = self._scores_for(ready, req)
            except Exception as exc:
                return self._inference_failed(ready, req, exc)
            chosen = self._fall_back(ready, req, SHADOW)
            if chosen is not None:
                j = self._row_of.get(chosen.id)
                if j is not None and ready[j] is chosen:
                    self._remember(req, chosen.id, sc.a0[j] + sc.b[j] * chosen.inflight)
            return chosen
        assert self._plain  # every condition above is cleared: the usual pick
        return self.pick(ready, req)

    def _update_plain(self) -> None:
        """Whether pick can go straight to the model (see pick): exactly when the model
        routes, which the active gauge shows (1), not the fallback (0: no model, disabled,
        warming up, shadow)."""
        plain = (self.model is not None and self._disabled_until == -math.inf
                 and not self._warming and not self.options.shadow)
        if plain is not self._plain and self._shows_gauges():
            MODEL_ACTIVE.labels(self.cluster).set(1 if plain else 0)
        self._plain = plain

    def _inference_failed(self, ready: Sequence[BackendView], req: RequestInfo,
                          exc: Exception) -> BackendView | None:
        log.error("cluster %s: inference failed (%s); falling back for %.0f s",
                  self.cluster, exc, self.options.cooldown_s, exc_info=exc)
        self._disable(INFERENCE_ERROR)
        return self._fall_back(ready, req, INFERENCE_ERROR)

    def _timed_choice(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        """_choose, timed in thread CPU time (every pick_time_every-th pick): what a pick
        costs, not how long another process held the core (a shared machine must not trip
        the budget)."""
        started = time.thread_time_ns()
        try:
            chosen = self._choose(ready, req)
        except Exception as exc:
            return self._inference_failed(ready, req, exc)
        elapsed_us = (time.thread_time_ns() - started) / 1e3
        self._pick_hist.observe(elapsed_us / 1e6)
        if self._picks <= WARMUP_PICKS:
            return chosen
        # Clamped so one stall (GC, first run after a rebuild) cannot trip the budget alone.
        sample = min(elapsed_us, 4.0 * self.options.budget_us)
        self._pick_ewma_us += 0.05 * (sample - self._pick_ewma_us)
        if self._pick_ewma_us > self.options.budget_us:
            log.warning("cluster %s: picks take %.0f µs on average (samples clamped at 4x the "
                        "budget; this one %.0f µs, budget %.0f µs); falling back for %.0f s",
                        self.cluster, self._pick_ewma_us, elapsed_us, self.options.budget_us,
                        self.options.cooldown_s)
            self._disable(OVER_BUDGET)
        return chosen

    def _choose(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView:
        """The model's choice among `ready` (not empty), with exploration."""
        sc = self._scores_for(ready, req)
        a0, b, pen, corr = sc.a0, sc.b, sc.pen, self._corr_rows
        n = len(ready)
        k = self._max_scored
        best = 0
        best_score = math.inf
        # Plain Python: for a few to a few dozen backends cheaper than any numpy call.
        if k and n > k:
            for i in self._rng.sample(range(n), k):
                v = (a0[i] + b[i] * ready[i].inflight) * corr[i] + pen[i]
                if v < best_score:
                    best, best_score = i, v
        else:
            for i, s in enumerate(ready):
                v = (a0[i] + b[i] * s.inflight) * corr[i] + pen[i]
                if v < best_score:
                    best, best_score = i, v
        eps = self._epsilon
        if eps > 0.0:
            i = self._rng.randrange(n) if self._rng.random() < eps else best
            self.last_propensity = eps / n + (1.0 - eps) * (i == best)
        else:
            i = best
            self.last_propensity = 1.0
        chosen = ready[i]
        self.last_reason = None
        self._remember(req, chosen.id, a0[i] + b[i] * chosen.inflight)
        return chosen

    def _disable(self, reason: str) -> None:
        self._disabled_until = self._clock() + self.options.cooldown_s
        self._disabled_reason = reason
        self._update_plain()

    def _reset_scores(self) -> None:
        self._scores: dict[tuple[str, str, int], _Scores] = {}
        self._scores_ready: Sequence[BackendView] | None = None
        self._row_of: dict[str, int] = {}
        self._corr_rows: list[float] = []
        self._dirty: dict[tuple[str, str], BackendView] = {}  # (backend id, route class)
        self._version = 0  # outcomes observed; a cached score knows the count it saw
        self._rescore_cost_s = 0.0
        self._rescore_gap_s = self.options.rescore_s
        self._gap_shown_s = -1.0  # the value last set on the gap gauge
        self._busy = False  # the process used busy_cpu_share of a core over the last second
        self._busy_since_wall = time.perf_counter()
        self._busy_since_cpu = time.process_time()
        self._pairs: np.ndarray | None = None
        self._level = np.zeros((0, N_FEATURES), dtype=np.float32)
        # Row count -> input array of partial runs and its flat view.
        self._part: dict[int, tuple[np.ndarray, memoryview[float]]] = {}
        # Row of each outcome's backend in order (-1: not in the ready list), from
        # outcome number _log_base + 1 on: the rows a cached score has not seen.
        self._observed_rows: list[int] = []
        self._log_base = 0

    def _scores_for(self, ready: Sequence[BackendView], req: RequestInfo) -> _Scores:
        """Cached predictions for this request class, used as they are while fresh: for
        this ready list, slopes younger than refresh_s (so the level is too), and no
        outcome observed since or the rescore gap not over."""
        body = req.body_size
        key = (req.route_class, req.method,
               int(BODY_BUCKETS_PER_E * math.log1p(body)) if body > 0 else 0)
        sc = self._scores.get(key)
        now = self._clock()
        if sc is None or ready is not self._scores_ready or now - sc.slope_stamp >= self._refresh_s \
                or (sc.version != self._version and now - sc.stamp >= self._rescore_gap_s):
            sc = self._scores[key] = self._stale(ready, req, sc, now)
        return sc

    def _stale(self, ready: Sequence[BackendView], req: RequestInfo, sc: _Scores | None,
               now: float) -> _Scores:
        """New predictions for a class whose cached ones (`sc`, if any) are not fresh."""
        model = self.model
        assert model is not None, "scores asked for without a model"
        if ready is not self._scores_ready:
            # Another ready list (health change, or a retry's subset): rows move.
            self._scores.clear()
            self._scores_ready = ready
            self._row_of = {s.id: i for i, s in enumerate(ready)}
            # A backend without a correction yet starts from the fleet's (a bias of the
            # model is most likely shared), in the dict too, so its row and its first
            # update agree.
            corr_of, fleet = self._corr_of, self._corr_fleet
            self._corr_rows = [corr_of.setdefault(s.id, fleet) for s in ready]
            sc = None
        if now - self._relaxed_at >= self._refresh_s:
            self._relax_corrections(ready, now)
        if sc is None or now - sc.slope_stamp >= self._refresh_s:
            return self._rescore(model, ready, req, now, None,
                                 classes=len(self._scores) + (sc is None))
        return self._rescore(model, ready, req, now, sc, classes=len(self._scores))

    def _relax_corrections(self, ready: Sequence[BackendView], now: float) -> None:
        """Move every backend's correction toward the fleet's for the time since the last
        call: evidence ages, and a backend with none left gets the fleet's. Outcomes pull
        a backend's correction toward its own ratio at residual_alpha x its outcome rate,
        relaxing toward the fleet's at 1/residual_relax_s: with the defaults a backend
        keeps its own for half at 5 outcomes/s and for 87% at the bench's ~34/s."""
        elapsed_s = now - self._relaxed_at
        self._relaxed_at = now
        relax_s = self.options.residual_relax_s
        if relax_s <= 0.0 or not math.isfinite(elapsed_s):
            return
        keep = math.exp(-elapsed_s / relax_s)
        fleet = self._corr_fleet
        corr_of = self._corr_of
        for bid, c in corr_of.items():
            corr_of[bid] = fleet + (c - fleet) * keep
        # Every ready backend has an entry since the ready list was set (_stale).
        rows = self._corr_rows
        for i, s in enumerate(ready):
            rows[i] = corr_of[s.id]

    def _rescore(self, model: LoadedModel, ready: Sequence[BackendView], req: RequestInfo,
                 now: float, old: _Scores | None, *, classes: int) -> _Scores:
        """Run the model for one request class; `classes`: how many are cached with it."""
        started = time.perf_counter()
        scores = self._run_model(model, ready, req, now, old)
        ended = time.perf_counter()
        # Wall time of the run, smoothed: sets how soon the next one may come when busy.
        self._rescore_cost_s += 0.1 * (ended - started - self._rescore_cost_s)
        if ended - self._busy_since_wall >= 1.0:
            cpu_s = time.process_time()
            self._busy = ((cpu_s - self._busy_since_cpu) / (ended - self._busy_since_wall)
                          >= self.options.busy_cpu_share)
            self._busy_since_wall, self._busy_since_cpu = ended, cpu_s
        options = self.options
        # Each cached request class is rescored once per gap: the share is for all of them.
        self._rescore_gap_s = (max(options.rescore_s,
                                   max(1, classes) * self._rescore_cost_s / options.rescore_cpu_share)
                               if self._busy else options.rescore_s)
        self._rescores.inc()
        # Set on change only: a gauge's set takes a lock, and while not busy the gap stays
        # rescore_s.
        gap_s = self._effective_gap_s()
        if gap_s != self._gap_shown_s and self._shows_gauges():
            self._gap_shown_s = gap_s
            self._rescore_gap_gauge.set(gap_s)
        return scores

    def _effective_gap_s(self) -> float:
        """The least time between two rescores of a class now: never longer than refresh_s,
        which rescores regardless."""
        return min(self._rescore_gap_s, self.options.refresh_s)

    def _run_model(self, model: LoadedModel, ready: Sequence[BackendView], req: RequestInfo,
                   now: float, old: _Scores | None, *, partial: bool = True) -> _Scores:
        """Run the model for every ready backend at its inflight, and (without `old`, whose
        slopes are kept: they move slowly) at inflight + SLOPE_STEP too. With `old` and
        `partial`, only the rows whose features changed since `old` are run, when they are
        few (the other rows' inputs are the same, so their predictions are too)."""
        fm = self._features
        if self._dirty:
            # The columns an outcome moves most, for backends observed since the last
            # rescore (~1 µs each; the rest follows at the full refresh every refresh_s).
            for (_, route_class), view in self._dirty.items():
                fm.observed(view, route_class)
            self._dirty.clear()
        version = self._version
        if old is not None and partial and self.options.partial_rescores and \
                fm.current_for(ready):
            cur = [s.inflight for s in ready]
            rows = self._changed_rows(old, cur, fm.refreshes)
            if rows is not None:
                return self._run_rows(model, rows, old, now, version, cur,
                                      fm.slots.slot(req.route_class))
        x = fm.prepare(ready, req)
        cur = fm.inflight_now
        refreshes = fm.refreshes
        n = len(ready)
        penalty = self.options.failure_penalty_ms
        pairs = self._pairs
        if pairs is None or pairs.shape[0] != 2 * n:
            # Its own array per row count, so the model's input binding is reused.
            pairs = self._pairs = np.zeros((2 * n, N_FEATURES), dtype=np.float32)
            self._level = pairs[:n]  # one view object, bound once
        level = self._level
        # In double, as _run_rows computes it for its rows.
        pen = [e * penalty for e in x[:, ERROR_RATE].tolist()] if penalty else [0.0] * n
        if old is not None:  # the level only: n rows
            np.copyto(level, x)
            pred = model.predict(level)
            if model.ratio:
                np.multiply(pred, level[:, ROUTE_COST], out=pred)
            a = pred.tolist()
            return _Scores(now, version, a, old.b, cur, pen, old.slope_stamp,
                           refreshes, flat_view(x[0, :N_REQUEST].copy()), _at_zero(a, old.b, cur))
        pairs[:n] = x
        pairs[n:] = x
        up = pairs[n:]
        up[:, INFLIGHT] += SLOPE_STEP
        # (ewma, route_ewma) x (inflight + 1): both costs move by SLOPE_STEP x the EWMAs.
        up[:, EWMA_COST:EWMA_COST + 2] += SLOPE_STEP * x[:, EWMA:EWMA + 2]
        pred = model.predict(pairs)
        if model.ratio:
            np.multiply(pred, pairs[:, ROUTE_COST], out=pred)  # in place: pred is our buffer
        p = pred.tolist()
        a = p[:n]
        b = [max(0.0, (hi - lo) / SLOPE_STEP) for lo, hi in zip(a, p[n:], strict=True)]
        return _Scores(now, version, a, b, cur, pen, now, refreshes,
                       flat_view(x[0, :N_REQUEST].copy()), _at_zero(a, b, cur))

    def _changed_rows(self, old: _Scores, cur: list[int], refreshes: int) -> list[int] | None:
        """Rows whose model input moved since `old` was scored: an outcome was observed
        for the backend, or its inflight changed. None when every row should be run: a
        full refresh since (all rows moved), an outcome log that no longer reaches back
        to `old`, or more than half the rows changed (one run over all costs about as
        much)."""
        start = old.version - self._log_base
        if refreshes != old.refreshes or start < 0:
            return None
        changed = set(self._observed_rows[start:])
        changed.discard(-1)  # an outcome of a backend not in this ready list
        if cur != old.cur:
            was = old.cur
            changed.update([i for i, v in enumerate(cur) if v != was[i]])
        if 2 * len(changed) > len(cur):
            return None
        return sorted(changed)

    def _run_rows(self, model: LoadedModel, rows: list[int], old: _Scores, now: float,
                  version: int, cur: list[int], slot: int) -> _Scores:
        """`old` with the predictions of `rows` replaced (for `old`'s request, route slot
        `slot`, at inflight `cur`). onnxruntime, single-threaded, predicts a row the same
        whatever the batch, so this equals a full run bit for bit; the numpy path of an
        affine model can differ in the last bits (~1e-7 relative: BLAS blocks by row
        count)."""
        if not rows:  # the lists are shared: nothing changes them in place
            return _Scores(now, version, old.a, old.b, cur, old.pen, old.slope_stamp,
                           old.refreshes, old.request, old.a0)
        k = len(rows)
        # Row counts rounded up to a power of two (padded with the last row), so a few
        # input arrays stay bound to the model.
        size = 1 << (k - 1).bit_length()
        part = self._part.get(size)
        if part is None:
            buf = np.zeros((size, N_FEATURES), dtype=np.float32)
            part = self._part[size] = (buf, flat_view(buf))
        buf, flat = part
        self._features.copy_rows(flat, rows + [rows[-1]] * (size - k), old.request, cur, slot)
        pred = model.predict(buf)
        if model.ratio:
            np.multiply(pred, buf[:, ROUTE_COST], out=pred)
        p = pred.tolist()
        a = old.a.copy()
        a0 = old.a0.copy()
        b = old.b
        for j, i in enumerate(rows):
            a[i] = p[j]
            a0[i] = p[j] - b[i] * cur[i]
        pen = old.pen
        penalty = self.options.failure_penalty_ms
        if penalty:
            pen = pen.copy()
            for j, i in enumerate(rows):
                pen[i] = flat[j * N_FEATURES + ERROR_RATE] * penalty
        return _Scores(now, version, a, b, cur, pen, old.slope_stamp, old.refreshes,
                       old.request, a0)

    def _remember(self, req: RequestInfo, backend_id: str, pred_ms: float) -> None:
        if len(self._pending) > 65536:  # attempts that never reported back
            self._pending.clear()
        self._pending[id(req)] = (backend_id, pred_ms)

    # -- feedback -------------------------------------------------------------------
    def observe(self, backend: BackendView, req: RequestInfo, outcome: Any) -> None:
        if self._fallback_observe is not None:
            self._fallback_observe(backend, req, outcome)
        if self.model is None:  # nothing cached to keep up (a model starts afresh)
            return
        bid = backend.id
        # Its feature row is updated at the next rescore, not here.
        # Keyed by class too: each class observed since then has its route EWMA column.
        self._dirty[(bid, req.route_class)] = backend
        self._version = version = self._version + 1
        i = self._row_of.get(bid)
        log_rows = self._observed_rows
        log_rows.append(-1 if i is None else i)
        if len(log_rows) >= OBSERVED_LOG_MAX:  # older scores are rescored in full
            del log_rows[:OBSERVED_LOG_MAX // 2]
            self._log_base += OBSERVED_LOG_MAX // 2
        pending = self._pending.pop(id(req), None)
        if pending is None or pending[0] != bid or outcome.error_kind is not None:
            return
        pred_ms = pending[1]
        observed_ms = outcome.latency_s * 1e3
        if version & (ERROR_SAMPLE_EVERY - 1) == 0:  # sampled: an observation costs ~2 µs
            self._err_hist.observe(abs(observed_ms - pred_ms) / 1e3)
        alpha = self._residual_alpha
        if alpha <= 0.0 or not pred_ms > 0.0:  # (a NaN prediction must not reach the fleet's)
            return
        ratio = observed_ms / pred_ms
        if ratio > self._clip_hi:
            ratio = self._clip_hi
        elif ratio < self._clip_lo:
            ratio = self._clip_lo
        old = self._corr_of.get(bid, self._corr_fleet)
        self._corr_fleet += alpha * (ratio - self._corr_fleet)
        new = old + alpha * (ratio - old)
        self._corr_of[bid] = new
        if i is not None:
            self._corr_rows[i] = new

    def take_over(self, previous: object) -> None:
        """Called when this policy replaces `previous` (a reload): a model file that no
        longer loads does not cost the model `previous` serves from that same file."""
        if (self.model is None and isinstance(previous, OnnxLatency) and previous.model is not None
                and previous.options.model_path == self.options.model_path):
            log.warning("cluster %s: keeping the model loaded before (%s), %s does not load now",
                        self.cluster, previous.model.version, self.options.model_path)
            self._install(previous.model)

    def close(self) -> None:
        """Stop showing gauges (the README's deploy check greps foretell_model_info and
        foretell_model_active: a cluster routed by another policy now shows neither)."""
        self._closed = True
        if self._shows_gauges():
            del _OWNER_POLICY[self.cluster]
            _drop_info(self.cluster)
            _drop_series(MODEL_ACTIVE, self.cluster)
            _drop_series(RESCORE_GAP, self.cluster)
            back = self._displaced() if self._displaced is not None else None
            if back is not None and not back._closed:
                back._show_gauges()
        close = getattr(self.fallback, "close", None)
        if close is not None:
            close()

    def describe(self) -> dict[str, object]:
        m = self.model
        return {
            "model_path": str(self.options.model_path),
            "model_version": m.version if m else None,
            "model_kind": m.kind if m else None,
            # Exactly when the model routes, like the active gauge (not while warming up).
            "serving": self._plain,
            "warming_up": self._warming,
            "fallback": self.options.fallback,
            "last_fallback_reason": self.last_reason,
            "pick_ewma_us": round(self._pick_ewma_us, 2),
            "busy": self._busy,
            "rescore_gap_ms": round(self._effective_gap_s() * 1e3, 2),
            "correction": {k: round(v, 3) for k, v in self._corr_of.items()},
            "fleet_correction": round(self._corr_fleet, 3),
            "scores": self._explain(),
        }

    def _explain(self) -> dict[str, object]:
        """Why a pick goes where it goes: per cached request class (route, method, body
        size bucket), per backend, the terms of its score at its inflight now (the
        lowest wins; predictions are as of the class's last rescore, `age_ms` ago)."""
        ready = self._scores_ready
        if ready is None:
            return {}
        now = self._clock()
        out: dict[str, object] = {}
        for (route, method, body_bucket), sc in self._scores.items():
            rows = {}
            for i, s in enumerate(ready):
                predicted_ms = sc.a0[i] + sc.b[i] * s.inflight
                rows[s.id] = {
                    "inflight": s.inflight,
                    "predicted_ms": round(predicted_ms, 3),
                    "per_inflight_ms": round(sc.b[i], 3),
                    "correction": round(self._corr_rows[i], 3),
                    "penalty_ms": round(sc.pen[i], 3),
                    "score": round(predicted_ms * self._corr_rows[i] + sc.pen[i], 3),
                }
            body = (f" body bucket {body_bucket} (~{math.expm1(body_bucket / BODY_BUCKETS_PER_E):.0f} B)"
                    if body_bucket else "")
            out[f"{route} {method}{body}"] = {
                "age_ms": round((now - sc.stamp) * 1e3, 1), "backends": rows}
        return out

    def __repr__(self) -> str:
        m = self.model
        return (f"OnnxLatency(model={m.version if m else None!r}, fallback="
                f"{self.options.fallback!r}, epsilon={self.options.epsilon}, "
                f"shadow={self.options.shadow})")


@dataclass(slots=True)
class _Scores:
    """Predictions for one request class over one ready list, from one model run."""

    stamp: float  # clock at the run
    version: int  # outcomes observed before the run
    a: list[float]  # predicted ms per backend at inflight `cur`
    b: list[float]  # predicted ms per extra request in flight (>= 0)
    cur: list[int]
    pen: list[float]  # failure penalty ms
    slope_stamp: float  # clock when `b` was computed
    refreshes: int  # the feature matrix's full refreshes as of the run
    # The request columns every row was predicted for: requests of one class can differ
    # (body size within its bucket), and partial runs reuse these so that all rows of
    # one class stay priced for the same request. A flat float32 view.
    request: memoryview[float]
    # a - b * cur: a pick prices a backend at a0 + b * inflight_now (one step less).
    a0: list[float]


def _at_zero(a: list[float], b: list[float], cur: list[int]) -> list[float]:
    return [x - y * c for x, y, c in zip(a, b, cur, strict=True)]
