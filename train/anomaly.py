"""`foretell train anomaly`: fit the Isolation Forest of health/anomaly.py offline.

Input: feature rows recorded by the proxy's anomaly detector while the fleet
was healthy (`health.anomaly.record_path`, JSON lines; e.g. from
`foretell bench health --record-anomaly FILE`). Output: an ONNX model whose
metadata carries the schema version, the feature names, the threshold (the
`quantile` of the training scores: a healthy window scores above it with
probability about 1 - quantile) and sklearn's score offset. The model is
verified against scikit-learn through onnxruntime before it atomically
replaces the target, so a running proxy never sees a half-written file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from health.anomaly import FEATURE_NAMES, SCHEMA_VERSION, AnomalyModel, load_feature_rows
from train.atomic import atomic_write

DEFAULT_QUANTILE = 0.999
MIN_ROWS = 50


@dataclass(frozen=True)
class Trained:
    path: Path
    rows: int
    threshold: float
    quantile: float
    max_abs_diff: float  # onnxruntime vs scikit-learn on the training rows


def fit_and_export(rows: np.ndarray, output: Path, *, quantile: float = DEFAULT_QUANTILE,
                   n_estimators: int = 100, max_samples: int = 256, seed: int = 0,
                   source: str = "") -> Trained:
    from onnx import helper
    from skl2onnx import to_onnx
    from sklearn.ensemble import IsolationForest

    if rows.ndim != 2 or rows.shape[1] != len(FEATURE_NAMES):
        raise ValueError(f"expected rows with {len(FEATURE_NAMES)} features, got shape {rows.shape}")
    if len(rows) < MIN_ROWS:
        raise ValueError(f"only {len(rows)} feature rows; need at least {MIN_ROWS} healthy windows")
    if not 0.5 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0.5, 1), got {quantile}")
    x = np.ascontiguousarray(rows, dtype=np.float32)
    forest = IsolationForest(n_estimators=n_estimators, max_samples=min(max_samples, len(x)),
                             contamination="auto", random_state=seed).fit(x)
    train_scores = -forest.score_samples(x)
    threshold = float(np.quantile(train_scores, quantile))
    onx = to_onnx(forest, x[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    meta = {
        "schema_version": SCHEMA_VERSION,
        "feature_names": ",".join(FEATURE_NAMES),
        "threshold": repr(threshold),
        "threshold_quantile": repr(quantile),
        "score_offset": repr(float(forest.offset_)),
        "n_train_rows": str(len(x)),
        "n_estimators": str(n_estimators),
        "seed": str(seed),
        "trained_at_unix_s": str(int(time.time())),
        "source": source[:500],
    }
    helper.set_model_props(onx, meta)
    output = Path(output)
    diff = float("nan")

    def parity(tmp: Path) -> None:
        """The file as the proxy will load it scores like scikit-learn."""
        nonlocal diff
        diff = float(np.max(np.abs(AnomalyModel(tmp).score(x) - train_scores)))
        if diff > 1e-3:
            raise ValueError(f"ONNX scores differ from scikit-learn by {diff:.2e}; not exported")

    atomic_write(output, onx.SerializeToString(), verify=parity)
    return Trained(output, len(x), threshold, quantile, diff)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="foretell train anomaly",
                                description="Fit the health anomaly model (Isolation Forest -> ONNX) "
                                            "from feature rows recorded on a healthy fleet.")
    p.add_argument("--input", "-i", nargs="+", type=Path, required=True,
                   help="JSON-lines feature files (health.anomaly.record_path)")
    p.add_argument("--output", "-o", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                   help="threshold = this quantile of the training scores (default %(default)s)")
    p.add_argument("--n-estimators", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from health.anomaly import AnomalyModelError

    try:
        rows = load_feature_rows(args.input)
        trained = fit_and_export(rows, args.output, quantile=args.quantile,
                                 n_estimators=args.n_estimators, seed=args.seed,
                                 source=",".join(str(p) for p in args.input))
    except (AnomalyModelError, ValueError) as exc:
        print(f"foretell train anomaly: {exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"output": str(trained.path), "rows": trained.rows,
                              "threshold": round(trained.threshold, 6),
                              "quantile": trained.quantile,
                              "onnx_vs_sklearn_max_abs_diff": trained.max_abs_diff}
    print(json.dumps(report))
    return 0
