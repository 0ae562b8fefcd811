"""Anomaly detector: an Isolation Forest over fleet-relative window features.

Every `interval_s` the detector summarises each backend's recent window
(latency percentiles, error and timeout rates, inflight, probe RTT, reported
load) *relative to the fleet's median*, so a load spike that slows everyone
is not an anomaly, and scores all backends with one onnxruntime call.
Latencies are first scaled to the cheapest route class's terms
(health.route_mix, `route_adjusted`), so a backend that request-aware routing
gives the expensive requests does not look anomalous for its mix. The
model is trained offline (`foretell train anomaly`, train/anomaly.py) and
carries in its ONNX metadata the schema version, the feature names and the
threshold chosen from training data; a model that does not match is refused.

Never on the request path: `observe` only appends to a bounded deque. A changed
model file is loaded in a thread (`check_reload`, called by the checker every
`interval_s`) and swapped in whole; a file that fails to load leaves the old model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from health.base import Verdict
from health.config import Anomaly as AnomalyConfig
from health.route_mix import route_factors
from proxy.state import ERROR_TIMEOUT, Clock, Cluster, Outcome

log = logging.getLogger("foretell.health")

SCHEMA_VERSION = "foretell-anomaly-1"
FEATURE_NAMES: tuple[str, ...] = (
    "log_p50_ratio",  # log(p50 / fleet median p50)
    "log_p90_ratio",
    "log_p99_ratio",
    "error_rate_excess",  # error rate - fleet median error rate
    "timeout_rate_excess",
    "log_inflight_ratio",  # log((inflight + 1) / (fleet median + 1))
    "log_volume_ratio",  # log((requests + 1) / (fleet median + 1)) in the window
    "log_probe_rtt_ratio",  # 0 when no probe RTT is known
    "reported_load_excess",  # 0 when the backend reports no load
)
# Latency floor in the ratios so sub-millisecond noise is not a 10x change.
LATENCY_FLOOR_S = 0.001
MIN_FLEET = 3
# Results of a model (re)load (metric label values).
RELOAD_OK = "ok"
RELOAD_FAILED = "failed"
_MAX_SAMPLES = 1024


class AnomalyModelError(Exception):
    """An anomaly model file that cannot be used; the message names the file and the problem.
    `unreadable`: the file is there but could not be read (permissions, too many open files,
    an I/O error), which may pass without the file changing."""

    def __init__(self, message: str, *, unreadable: bool = False) -> None:
        super().__init__(message)
        self.unreadable = unreadable


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One backend's recent window, in absolute terms."""

    requests: int
    p50_s: float
    p90_s: float
    p99_s: float
    error_rate: float
    timeout_rate: float
    inflight: int
    probe_rtt_s: float | None = None
    reported_load: float | None = None


def window_stats(samples: Sequence[tuple[float, float, bool, bool]], horizon: float,
                 inflight: int, probe_rtt_s: float | None,
                 reported_load: float | None) -> WindowStats:
    """Summarise (time, latency_s, failed, timed_out) samples newer than `horizon`."""
    recent = [s for s in samples if s[0] >= horizon]
    n = len(recent)
    if n == 0:
        return WindowStats(0, math.nan, math.nan, math.nan, 0.0, 0.0, inflight,
                           probe_rtt_s, reported_load)
    lat = np.fromiter((s[1] for s in recent), dtype=np.float64, count=n)
    p50, p90, p99 = np.percentile(lat, (50, 90, 99), method="inverted_cdf")
    failed = sum(1 for s in recent if s[2])
    timeouts = sum(1 for s in recent if s[3])
    return WindowStats(n, float(p50), float(p90), float(p99), failed / n, timeouts / n,
                       inflight, probe_rtt_s, reported_load)


def _log_ratio(value: float, fleet: float, floor: float) -> float:
    return math.log(max(value, floor) / max(fleet, floor))


def fleet_features(stats: Mapping[str, WindowStats], min_requests: int) -> tuple[list[str], np.ndarray]:
    """Fleet-relative feature rows (float32, FEATURE_NAMES order) for backends with enough volume.

    Empty when fewer than MIN_FLEET backends qualify: there is no fleet to compare with.
    """
    ids = [b for b, s in stats.items() if s.requests >= min_requests]
    if len(ids) < MIN_FLEET:
        return [], np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    judged = [stats[b] for b in ids]

    def med(values: Sequence[float]) -> float:
        return float(np.median(values)) if values else math.nan

    p50 = med([s.p50_s for s in judged])
    p90 = med([s.p90_s for s in judged])
    p99 = med([s.p99_s for s in judged])
    err = med([s.error_rate for s in judged])
    tmo = med([s.timeout_rate for s in judged])
    infl = med([float(s.inflight) for s in judged])
    vol = med([float(s.requests) for s in judged])
    rtts = [s.probe_rtt_s for s in judged if s.probe_rtt_s is not None]
    rtt = med(rtts)
    loads = [s.reported_load for s in judged if s.reported_load is not None]
    load = med(loads)
    rows = np.zeros((len(ids), len(FEATURE_NAMES)), dtype=np.float32)
    for i, s in enumerate(judged):
        rows[i] = (
            _log_ratio(s.p50_s, p50, LATENCY_FLOOR_S),
            _log_ratio(s.p90_s, p90, LATENCY_FLOOR_S),
            _log_ratio(s.p99_s, p99, LATENCY_FLOOR_S),
            s.error_rate - err,
            s.timeout_rate - tmo,
            math.log((s.inflight + 1.0) / (infl + 1.0)),
            math.log((s.requests + 1.0) / (vol + 1.0)),
            _log_ratio(s.probe_rtt_s, rtt, LATENCY_FLOOR_S)
            if s.probe_rtt_s is not None and rtts else 0.0,
            s.reported_load - load if s.reported_load is not None and loads else 0.0,
        )
    return ids, rows


class AnomalyModel:
    """A validated ONNX Isolation Forest and its metadata. Score = higher is more anomalous."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        # Taken before the read: a file replaced during it shows as changed next time.
        self.file_key = _file_key(self.path)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise AnomalyModelError(f"{self.path}: anomaly model file not found") from None
        except OSError as exc:
            raise AnomalyModelError(f"{self.path}: cannot read anomaly model: {exc}",
                                    unreadable=True) from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise AnomalyModelError(f"{self.path}: not a loadable ONNX model: "
                                    f"{str(exc).splitlines()[0][:200]}") from None
        meta = self._session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
        schema = meta.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise AnomalyModelError(f"{self.path}: schema_version {schema!r} in the model "
                                    f"metadata, this proxy needs {SCHEMA_VERSION!r}")
        names = tuple(meta.get("feature_names", "").split(","))
        if names != FEATURE_NAMES:
            raise AnomalyModelError(f"{self.path}: feature_names {','.join(names)!r} do not "
                                    f"match {','.join(FEATURE_NAMES)!r}")
        try:
            self.threshold = float(meta["threshold"])
            self.offset = float(meta["score_offset"])
        except (KeyError, ValueError):
            raise AnomalyModelError(f"{self.path}: metadata needs numeric 'threshold' and "
                                    f"'score_offset'") from None
        if not (math.isfinite(self.threshold) and math.isfinite(self.offset)):
            raise AnomalyModelError(f"{self.path}: threshold/score_offset must be finite")
        self._input = self._session.get_inputs()[0].name
        outputs = [o.name for o in self._session.get_outputs()]
        if "scores" not in outputs:
            raise AnomalyModelError(f"{self.path}: no 'scores' output (got {outputs})")
        self._outputs = ["scores"]
        try:  # One real call, so a broken graph fails now rather than in evaluate.
            self.score(np.zeros((2, len(FEATURE_NAMES)), dtype=np.float32))
        except Exception as exc:
            raise AnomalyModelError(f"{self.path}: model fails on a "
                                    f"{len(FEATURE_NAMES)}-feature input: "
                                    f"{str(exc).splitlines()[0][:200]}") from None

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Anomaly scores (sklearn's -score_samples: about 0.3..0.8, higher = stranger)."""
        (decision,) = self._session.run(self._outputs, {self._input: rows})
        return -(np.asarray(decision, dtype=np.float64).reshape(-1) + self.offset)


class AnomalyDetector:
    name = "anomaly"

    def __init__(self, config: AnomalyConfig, clock: Clock, cluster: Cluster,
                 probe_rtt: Callable[[str], float | None],
                 model: AnomalyModel | None = None) -> None:
        """`model`: config.model_path already loaded (the config's validation loads it,
        off the event loop on a reload; loading it again here would be on it)."""
        self.config = config
        self._clock = clock
        self._cluster = cluster
        self._probe_rtt = probe_rtt
        # (finished at, latency_s, failed, timed out, route class)
        self._samples: dict[str, deque[tuple[float, float, bool, bool, str]]] = {}
        self._streak: dict[str, int] = {}
        self.scores: dict[str, float] = {}
        self._verdicts: list[Verdict] = []
        self._last_eval: float | None = None
        self.model: AnomalyModel | None = None
        self._model_key: tuple[int, int, int] | None = None
        # The file could not be read at the last look: tried again at every look.
        self._retry_read = False
        self._failure_said = ""  # the last load failure logged (each is said once)
        if config.model_path is not None:
            # Start-up: a missing or invalid model is an error the operator sees.
            self.model = model if model is not None else AnomalyModel(config.model_path)
            self._model_key = self.model.file_key

    def observe(self, backend_id: str, outcome: Outcome) -> None:
        samples = self._samples.get(backend_id)
        if samples is None:
            samples = self._samples[backend_id] = deque(maxlen=_MAX_SAMPLES)
        samples.append((self._clock(), outcome.latency_s, outcome.failed,
                        outcome.error_kind == ERROR_TIMEOUT, outcome.route_class))

    def forget(self, backend_id: str) -> None:
        self._samples.pop(backend_id, None)
        self._streak.pop(backend_id, None)
        self.scores.pop(backend_id, None)

    async def check_reload(self) -> str | None:
        """Load the model file if it changed since the last look (mtime, size, inode), or
        could not be read then (a chmod changes none of them): RELOAD_OK when a new model
        scores, RELOAD_FAILED when a load failed in a way not said before (logged once, not
        at every retry), None otherwise.

        The load runs in a thread (a 400-tree forest takes ~1 s to build, which on the
        event loop stalled every request); the old model scores until the new one is
        swapped in, here on the loop, and stays when the load fails.
        """
        path = self.config.model_path
        if path is None:
            return None
        key = _file_key(path)
        changed = key != self._model_key
        if not changed and not self._retry_read:
            return None
        self._model_key = key
        try:
            model = await asyncio.to_thread(AnomalyModel, path)
        except AnomalyModelError as exc:
            self._retry_read = exc.unreadable
            if not changed and str(exc) == self._failure_said:
                return None
            self._failure_said = str(exc)
            log.error("anomaly model reload failed, keeping the previous model%s: %s",
                      "; tried again at every look until it can be read"
                      if exc.unreadable else "", exc)
            return RELOAD_FAILED
        self._retry_read = False
        self._failure_said = ""
        self.model = model
        log.info("anomaly model reloaded from %s (threshold %.4f)", path, model.threshold)
        return RELOAD_OK

    def features(self, now: float) -> tuple[list[str], np.ndarray, dict[str, WindowStats]]:
        horizon = now - self.config.window_s
        recent = {b: [s for s in samples if s[0] >= horizon] for b, samples in self._samples.items()}
        # Route classes' references come from successful answers only: a fast failure
        # says nothing about what the class costs.
        factors = (route_factors({b: [(t, lat, rc) for t, lat, failed, _, rc in s if not failed]
                                  for b, s in recent.items()})
                   if self.config.route_adjusted else {})
        stats = {}
        for backend_id, state in self._cluster.states.items():
            samples = [(t, lat * factors.get(rc, 1.0), failed, timed_out)
                       for t, lat, failed, timed_out, rc in recent.get(backend_id, ())]
            stats[backend_id] = window_stats(samples, horizon, state.inflight,
                                             self._probe_rtt(backend_id), state.reported_load)
        ids, rows = fleet_features(stats, self.config.min_requests)
        return ids, rows, stats

    def evaluate(self, now: float) -> list[Verdict]:
        if self._last_eval is not None and now - self._last_eval < self.config.interval_s:
            return self._verdicts
        self._last_eval = now
        ids, rows, stats = self.features(now)
        if self.config.record_path is not None and ids:
            self._record(now, ids, rows, stats)
        verdicts: list[Verdict] = []
        model = self.model
        if model is None or not ids:
            self._verdicts = verdicts
            return verdicts
        scores = model.score(rows)
        for backend_id, score in zip(ids, scores, strict=True):
            score = float(score)
            self.scores[backend_id] = score
            above = score > model.threshold
            streak = self._streak[backend_id] = self._streak.get(backend_id, 0) + 1 if above else 0
            detected = streak >= self.config.consecutive
            reason = (f"anomaly score {score:.3f} {'>' if above else '<='} threshold "
                      f"{model.threshold:.3f} ({streak} evaluation(s) in a row, need "
                      f"{self.config.consecutive})")
            verdicts.append(Verdict(backend_id, self.name, detected, reason, score))
        self._verdicts = verdicts
        return verdicts

    def _record(self, now: float, ids: list[str], rows: np.ndarray,
                stats: Mapping[str, WindowStats]) -> None:
        assert self.config.record_path is not None
        lines = []
        for backend_id, row in zip(ids, rows, strict=True):
            s = stats[backend_id]
            lines.append(json.dumps({
                "schema_version": SCHEMA_VERSION, "t": round(now, 3),
                "cluster": self._cluster.name, "backend": backend_id,
                "features": [round(float(x), 6) for x in row],
                "requests": s.requests, "p90_ms": round(s.p90_s * 1e3, 3)}))
        try:
            # One write per evaluation with O_APPEND, so several workers can share a file.
            with open(self.config.record_path, "a") as fh:
                fh.write("\n".join(lines) + "\n")
        except OSError as exc:
            log.error("cannot record anomaly features to %s: %s", self.config.record_path, exc)


def load_feature_rows(paths: Sequence[Path]) -> np.ndarray:
    """Feature rows recorded by AnomalyDetector (JSON lines), checked against the schema."""
    rows: list[list[float]] = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise AnomalyModelError(f"{path}: cannot read recorded features: {exc}") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec: Any = json.loads(line)
                schema = rec["schema_version"]
                feats = rec["features"]
            except (ValueError, KeyError, TypeError):
                raise AnomalyModelError(f"{path}:{lineno}: not a recorded feature row") from None
            if schema != SCHEMA_VERSION:
                raise AnomalyModelError(f"{path}:{lineno}: schema_version {schema!r}, "
                                        f"expected {SCHEMA_VERSION!r}")
            if not isinstance(feats, list) or len(feats) != len(FEATURE_NAMES):
                raise AnomalyModelError(f"{path}:{lineno}: expected {len(FEATURE_NAMES)} "
                                        f"features")
            rows.append([float(x) for x in feats])
    return np.asarray(rows, dtype=np.float32).reshape(-1, len(FEATURE_NAMES))


def _file_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
